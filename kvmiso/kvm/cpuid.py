"""CPUID leaves as KVM hands them over: ``struct kvm_cpuid_entry2`` lists read with
KVM_GET_SUPPORTED_CPUID (system fd) or KVM_GET_CPUID2 (vCPU fd) and written with KVM_SET_CPUID2."""

from __future__ import annotations

import ctypes
import errno
from dataclasses import dataclass
from typing import Callable

from . import abi
from .errors import KvmError


@dataclass(frozen=True)
class CpuidEntry:
    """One ``struct kvm_cpuid_entry2``: leaf ``function``, subleaf ``index`` (significant when
    ``flags`` has KVM_CPUID_FLAG_SIGNIFCANT_INDEX) and the four output registers."""

    function: int
    index: int
    flags: int
    eax: int
    ebx: int
    ecx: int
    edx: int


def _cpuid2_buffer(nent: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` followed by room for ``nent`` entries, ``nent`` set."""
    buf = abi.with_entries(abi.kvm_cpuid2, abi.kvm_cpuid_entry2, nent)()
    buf.hdr.nent = nent
    return buf


Issue = Callable[[int, ctypes.Structure], int]  # ioctl(request, arg) on the fd that answers


def get_cpuid(ioctl: Issue, request: int, nent: int = 100) -> list[CpuidEntry]:
    """KVM_GET_SUPPORTED_CPUID (system fd) or KVM_GET_CPUID2 (vCPU fd) through ``ioctl``: the
    buffer grows until the kernel's list fits (E2BIG says it did not)."""
    while True:
        buf = _cpuid2_buffer(nent)
        try:
            ioctl(request, buf)
        except KvmError as e:
            if e.errno == errno.E2BIG and nent < 4096:
                nent *= 2
                continue
            raise
        count = buf.hdr.nent
        if request == abi.KVM_GET_CPUID2 and count == nent:
            count = _vcpu_cpuid_count(ioctl, nent)
        return [CpuidEntry(e.function, e.index, e.flags, e.eax, e.ebx, e.ecx, e.edx)
                for e in buf.entries[:count]]


def _vcpu_cpuid_count(ioctl: Issue, room: int) -> int:
    """How many entries a KVM_GET_CPUID2 that fit in ``room`` and left nent as it was copied.
    Today's KVM writes the count to nent on success; Linux 6.1 (say) writes it nowhere, but says
    E2BIG exactly while nent is below it: the smallest nent it takes is the count."""
    lo, hi = 0, room  # E2BIG below lo never seen; hi is taken
    while lo < hi:
        mid = (lo + hi) // 2
        try:
            ioctl(abi.KVM_GET_CPUID2, _cpuid2_buffer(mid))
        except KvmError as e:
            if e.errno != errno.E2BIG:
                raise
            lo = mid + 1
        else:
            hi = mid
    return hi


def set_cpuid(ioctl: Issue, entries: list[CpuidEntry]) -> None:
    """KVM_SET_CPUID2 through ``ioctl`` (a vCPU's): ``entries`` become the guest's CPUID."""
    buf = _cpuid2_buffer(len(entries))
    for dst, e in zip(buf.entries, entries):
        dst.function, dst.index, dst.flags = e.function, e.index, e.flags
        dst.eax, dst.ebx, dst.ecx, dst.edx = e.eax, e.ebx, e.ecx, e.edx
    ioctl(abi.KVM_SET_CPUID2, buf)
