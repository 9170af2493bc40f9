"""Kvm: the /dev/kvm system file descriptor."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
from typing import Any

from . import abi
from ._fd import FdOwner, fd_cell, ioctl_into, open_into
from ._libc import ioctl
from .cpuid import CpuidEntry, get_cpuid
from .errors import KvmError, KvmUnavailable
from .vcpu import ffi
from .vm import Vm
from .x86 import cpu_has

DEV_KVM = "/dev/kvm"


class Kvm(FdOwner):
    """The KVM system fd. A context manager; ``close()`` is idempotent.

    >>> with Kvm() as kvm:
    ...     kvm.api_version, kvm.check_extension("IMMEDIATE_EXIT")
    (12, 1)
    """

    def __init__(self, path: str = DEV_KVM) -> None:
        self._supported_cpuid: tuple[CpuidEntry, ...] | None = None
        self._msr_index_list: tuple[int, ...] | None = None
        fd = fd_cell()
        try:
            open_into(fd, path, os.O_RDWR | os.O_CLOEXEC)
        except FileNotFoundError:
            raise KvmUnavailable(f"{path} does not exist: this kernel has no KVM, or the device node is missing") from None
        except PermissionError:
            raise KvmUnavailable(
                f"{path}: permission denied: run as root or as a member of the group owning {path}"
            ) from None
        except OSError as e:
            raise KvmUnavailable(f"{path}: cannot open: {e.strerror}") from None
        self._fd = fd
        try:
            self.api_version = ioctl(self.fd, abi.KVM_GET_API_VERSION)
            check_api_version(self.api_version, path)
            self.vcpu_mmap_size = ioctl(self.fd, abi.KVM_GET_VCPU_MMAP_SIZE)
        except BaseException:
            self.close()
            raise

    def check_extension(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION by name ("IMMEDIATE_EXIT") or number; 0 means absent."""
        return ioctl(self.fd, abi.KVM_CHECK_EXTENSION, abi.capability_number(cap))

    def capabilities(self) -> dict[str, int]:
        """Every named capability with its KVM_CHECK_EXTENSION value."""
        return {name: self.check_extension(nr) for name, nr in abi.KVM_CAPS.items()}

    def get_msr_index_list(self) -> list[int]:
        """KVM_GET_MSR_INDEX_LIST: the MSRs KVM saves and restores (asked once per handle,
        like the supported CPUID: it cannot change while the module is loaded)."""
        if self._msr_index_list is None:
            self._msr_index_list = tuple(self._msr_list(abi.KVM_GET_MSR_INDEX_LIST))
        return list(self._msr_index_list)

    def _msr_list(self, request: int) -> list[int]:
        n = 64
        while True:
            buf = abi.with_entries(abi.kvm_msr_list, ctypes.c_uint32, n)()
            buf.hdr.nmsrs = n
            try:
                ioctl(self.fd, request, buf)
            except KvmError as e:
                if e.errno != errno.E2BIG:
                    raise
                n = buf.hdr.nmsrs  # the kernel wrote the count it needs
                continue
            return list(buf.entries[: buf.hdr.nmsrs])

    def get_supported_cpuid(self) -> list[CpuidEntry]:
        """KVM_GET_SUPPORTED_CPUID: every leaf KVM can expose to a guest. Asked once per
        handle: the answer cannot change while the module is loaded, and every VM wants it."""
        if self._supported_cpuid is None:
            self._supported_cpuid = tuple(get_cpuid(functools.partial(ioctl, self.fd), abi.KVM_GET_SUPPORTED_CPUID))
        return list(self._supported_cpuid)

    def cpu_has(self, feature: str) -> bool:
        """Whether KVM can offer a guest the CPU feature ``feature``, by its Linux name
        (``"XSAVE"``, ``"X86_FEATURE_LA57"``; the table is :data:`kvmiso.kvm.x86.X86_FEATURES`),
        read in KVM_GET_SUPPORTED_CPUID: selftests' ``kvm_cpu_has(X86_FEATURE_XSAVE)``."""
        return cpu_has(self.get_supported_cpuid(), feature)

    def ioctl(self, request: int, arg: int | ctypes._CData | None = None) -> int:
        """Any ioctl on /dev/kvm that kvmiso does not wrap: ``request`` (an ``abi.KVM_*`` number,
        or one built with ``abi._IOW``...) with ``arg`` (an int, or a ctypes object passed by
        address); returns the ioctl's result, raises KvmError naming it. The escape hatch, as
        selftests' ``kvm_ioctl``; :meth:`Vm.ioctl` and :meth:`Vcpu.ioctl` are the same for theirs.

        >>> kvm.ioctl(abi.KVM_CHECK_EXTENSION, abi.KVM_CAPS["SYNC_REGS"])
        7
        """
        return ioctl(self.fd, request, arg)

    def check_extension_call(self, cap: str | int) -> Any:
        """KVM_CHECK_EXTENSION(``cap``) on this fd as compiled code issues it: a
        ``struct kvmiso_ioctl *`` (kvm/_vcpu.h), the null ioctl the bench loop times."""
        return ffi.new("struct kvmiso_ioctl *", {"fd": self.fd, "request": abi.KVM_CHECK_EXTENSION,
                                                 "arg": abi.capability_number(cap)})

    def create_vm(self, vm_type: int = 0) -> Vm:
        """KVM_CREATE_VM: a new VM of ``vm_type`` (0: the default x86 VM)."""
        fd = fd_cell()
        ioctl_into(fd, self.fd, abi.KVM_CREATE_VM, vm_type)
        return Vm(self, fd)


def check_api_version(version: int, path: str = DEV_KVM) -> None:
    """Refuse any KVM API version but 12 (the only one since Linux 2.6.22)."""
    if version != abi.KVM_API_VERSION:
        raise KvmUnavailable(f"{path} speaks KVM API version {version}; kvmiso needs {abi.KVM_API_VERSION}")
