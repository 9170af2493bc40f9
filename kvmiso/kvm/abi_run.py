"""struct kvm_run, the page KVM shares with userspace for each vCPU (<linux/kvm.h>, x86-64):
its ctypes mirror, the structs of its exit union, and the KVM_EXIT_* numbers.

Data, and :func:`member` and :func:`unpacker`, which read offsets and struct formats off it, so
no kvm_run layout is ever written twice. C gives the union's members no type names; here each
is ``kvm_run_<member>`` (``kvm_run.u.io`` is a :class:`kvm_run_io`). ``tests/test_abi.py``
checks every offset against the installed kernel header. :mod:`kvmiso.kvm.abi` re-exports the
structs and numbers.
"""

from __future__ import annotations

import ctypes
import struct
from ctypes import c_char, c_uint8, c_uint16, c_uint32, c_uint64
from typing import Callable

from .abi_vcpu import kvm_sync_regs


class kvm_run_io(ctypes.Structure):
    """kvm_run.io (KVM_EXIT_IO): direction, access size, port, count and the data's offset in the page."""

    _fields_ = [
        ("direction", c_uint8),
        ("size", c_uint8),
        ("port", c_uint16),
        ("count", c_uint32),
        ("data_offset", c_uint64),
    ]


KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1


class kvm_run_mmio(ctypes.Structure):
    """kvm_run.mmio (KVM_EXIT_MMIO): guest-physical address, up to 8 data bytes, length, direction."""

    _fields_ = [("phys_addr", c_uint64), ("data", c_uint8 * 8), ("len", c_uint32), ("is_write", c_uint8)]


class kvm_run_hw(ctypes.Structure):
    """kvm_run.hw (KVM_EXIT_UNKNOWN): the hardware exit reason KVM could not handle."""

    _fields_ = [("hardware_exit_reason", c_uint64)]


class kvm_run_fail_entry(ctypes.Structure):
    """kvm_run.fail_entry (KVM_EXIT_FAIL_ENTRY): the vendor's entry failure reason and the CPU."""

    _fields_ = [("hardware_entry_failure_reason", c_uint64), ("cpu", c_uint32)]


class kvm_run_ex(ctypes.Structure):
    """kvm_run.ex (KVM_EXIT_EXCEPTION): an exception vector and error code."""

    _fields_ = [("exception", c_uint32), ("error_code", c_uint32)]


class kvm_debug_exit_arch(ctypes.Structure):
    """struct kvm_debug_exit_arch, kvm_run.debug.arch (KVM_EXIT_DEBUG): vector, pc, DR6, DR7."""

    _fields_ = [("exception", c_uint32), ("pad", c_uint32), ("pc", c_uint64), ("dr6", c_uint64), ("dr7", c_uint64)]


class kvm_run_hypercall(ctypes.Structure):
    """kvm_run.hypercall (KVM_EXIT_HYPERCALL): call number, six arguments, return value, long mode."""

    _fields_ = [
        ("nr", c_uint64),
        ("args", c_uint64 * 6),
        ("ret", c_uint64),
        ("longmode", c_uint32),
        ("pad", c_uint32),
    ]


class kvm_run_tpr_access(ctypes.Structure):
    """kvm_run.tpr_access (KVM_EXIT_TPR_ACCESS): where the guest touched the TPR, and how."""

    _fields_ = [("rip", c_uint64), ("is_write", c_uint32), ("pad", c_uint32)]


class kvm_run_internal(ctypes.Structure):
    """kvm_run.internal (KVM_EXIT_INTERNAL_ERROR): suberror and up to 16 words of data."""

    _fields_ = [("suberror", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_system_event(ctypes.Structure):
    """kvm_run.system_event (KVM_EXIT_SYSTEM_EVENT): event type and up to 16 words of data."""

    _fields_ = [("type", c_uint32), ("ndata", c_uint32), ("data", c_uint64 * 16)]


class kvm_run_msr(ctypes.Structure):
    """kvm_run.msr (KVM_EXIT_X86_RDMSR/WRMSR): the error flag userspace sets, why, index, value."""

    _fields_ = [("error", c_uint8), ("pad", c_uint8 * 7), ("reason", c_uint32), ("index", c_uint32), ("data", c_uint64)]


class kvm_run_notify(ctypes.Structure):
    """kvm_run.notify (KVM_EXIT_NOTIFY): flags of a notify VM exit."""

    _fields_ = [("flags", c_uint32)]


class kvm_run_memory_fault(ctypes.Structure):
    """kvm_run.memory_fault (KVM_EXIT_MEMORY_FAULT, Linux 6.8+; newer than some installed headers,
    so written from the kernel's include/uapi/linux/kvm.h): the guest-physical range
    [gpa, gpa + size) KVM could not resolve, and why (``flags``)."""

    _fields_ = [("flags", c_uint64), ("gpa", c_uint64), ("size", c_uint64)]


KVM_MEMORY_EXIT_FLAG_PRIVATE = 1 << 3  # the access was to private (guest_memfd) memory


class kvm_run_exit(ctypes.Union):
    """The anonymous union of struct kvm_run that holds the exit's details (``kvm_run.u``)."""

    _fields_ = [
        ("hw", kvm_run_hw),
        ("fail_entry", kvm_run_fail_entry),
        ("ex", kvm_run_ex),
        ("io", kvm_run_io),
        ("debug", kvm_debug_exit_arch),
        ("mmio", kvm_run_mmio),
        ("hypercall", kvm_run_hypercall),
        ("tpr_access", kvm_run_tpr_access),
        ("internal", kvm_run_internal),
        ("system_event", kvm_run_system_event),
        ("msr", kvm_run_msr),
        ("notify", kvm_run_notify),
        ("memory_fault", kvm_run_memory_fault),
        ("padding", c_char * 256),
    ]


class kvm_run_s(ctypes.Union):
    """The union ``kvm_run.s``: the synced registers (``regs``) in 2048 bytes."""

    _fields_ = [("regs", kvm_sync_regs), ("padding", c_char * 2048)]


class kvm_run(ctypes.Structure):
    """struct kvm_run: the page KVM_RUN shares with userspace (mmap of the vCPU fd), exit and all."""

    _fields_ = [
        ("request_interrupt_window", c_uint8),
        ("immediate_exit", c_uint8),
        ("padding1", c_uint8 * 6),
        ("exit_reason", c_uint32),
        ("ready_for_interrupt_injection", c_uint8),
        ("if_flag", c_uint8),
        ("flags", c_uint16),
        ("cr8", c_uint64),
        ("apic_base", c_uint64),
        ("u", kvm_run_exit),
        ("kvm_valid_regs", c_uint64),
        ("kvm_dirty_regs", c_uint64),
        ("s", kvm_run_s),
    ]


# KVM_EXIT_* reasons (<linux/kvm.h>), including ones newer than the installed headers.
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_EXCEPTION = 1
KVM_EXIT_IO = 2
KVM_EXIT_HYPERCALL = 3
KVM_EXIT_DEBUG = 4
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_IRQ_WINDOW_OPEN = 7
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_SET_TPR = 11
KVM_EXIT_TPR_ACCESS = 12
KVM_EXIT_S390_SIEIC = 13
KVM_EXIT_S390_RESET = 14
KVM_EXIT_DCR = 15
KVM_EXIT_NMI = 16
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_OSI = 18
KVM_EXIT_PAPR_HCALL = 19
KVM_EXIT_S390_UCONTROL = 20
KVM_EXIT_WATCHDOG = 21
KVM_EXIT_S390_TSCH = 22
KVM_EXIT_EPR = 23
KVM_EXIT_SYSTEM_EVENT = 24
KVM_EXIT_S390_STSI = 25
KVM_EXIT_IOAPIC_EOI = 26
KVM_EXIT_HYPERV = 27
KVM_EXIT_ARM_NISV = 28
KVM_EXIT_X86_RDMSR = 29
KVM_EXIT_X86_WRMSR = 30
KVM_EXIT_DIRTY_RING_FULL = 31
KVM_EXIT_AP_RESET_HOLD = 32
KVM_EXIT_X86_BUS_LOCK = 33
KVM_EXIT_XEN = 34
KVM_EXIT_RISCV_SBI = 35
KVM_EXIT_RISCV_CSR = 36
KVM_EXIT_NOTIFY = 37
KVM_EXIT_LOONGARCH_IOCSR = 38
KVM_EXIT_MEMORY_FAULT = 39
KVM_EXIT_TDX = 40

KVM_EXIT_REASONS = {  # number -> name, as the kernel's exit_reason reads
    KVM_EXIT_UNKNOWN: "UNKNOWN", KVM_EXIT_EXCEPTION: "EXCEPTION", KVM_EXIT_IO: "IO",
    KVM_EXIT_HYPERCALL: "HYPERCALL", KVM_EXIT_DEBUG: "DEBUG", KVM_EXIT_HLT: "HLT", KVM_EXIT_MMIO: "MMIO",
    KVM_EXIT_IRQ_WINDOW_OPEN: "IRQ_WINDOW_OPEN", KVM_EXIT_SHUTDOWN: "SHUTDOWN",
    KVM_EXIT_FAIL_ENTRY: "FAIL_ENTRY", KVM_EXIT_INTR: "INTR", KVM_EXIT_SET_TPR: "SET_TPR",
    KVM_EXIT_TPR_ACCESS: "TPR_ACCESS", KVM_EXIT_S390_SIEIC: "S390_SIEIC", KVM_EXIT_S390_RESET: "S390_RESET",
    KVM_EXIT_DCR: "DCR", KVM_EXIT_NMI: "NMI", KVM_EXIT_INTERNAL_ERROR: "INTERNAL_ERROR", KVM_EXIT_OSI: "OSI",
    KVM_EXIT_PAPR_HCALL: "PAPR_HCALL", KVM_EXIT_S390_UCONTROL: "S390_UCONTROL", KVM_EXIT_WATCHDOG: "WATCHDOG",
    KVM_EXIT_S390_TSCH: "S390_TSCH", KVM_EXIT_EPR: "EPR", KVM_EXIT_SYSTEM_EVENT: "SYSTEM_EVENT",
    KVM_EXIT_S390_STSI: "S390_STSI", KVM_EXIT_IOAPIC_EOI: "IOAPIC_EOI", KVM_EXIT_HYPERV: "HYPERV",
    KVM_EXIT_ARM_NISV: "ARM_NISV", KVM_EXIT_X86_RDMSR: "X86_RDMSR", KVM_EXIT_X86_WRMSR: "X86_WRMSR",
    KVM_EXIT_DIRTY_RING_FULL: "DIRTY_RING_FULL", KVM_EXIT_AP_RESET_HOLD: "AP_RESET_HOLD",
    KVM_EXIT_X86_BUS_LOCK: "X86_BUS_LOCK", KVM_EXIT_XEN: "XEN", KVM_EXIT_RISCV_SBI: "RISCV_SBI",
    KVM_EXIT_RISCV_CSR: "RISCV_CSR", KVM_EXIT_NOTIFY: "NOTIFY", KVM_EXIT_LOONGARCH_IOCSR: "LOONGARCH_IOCSR",
    KVM_EXIT_MEMORY_FAULT: "MEMORY_FAULT", KVM_EXIT_TDX: "TDX",
}

KVM_INTERNAL_ERROR_NAMES = {1: "EMULATION", 2: "SIMUL_EX", 3: "DELIVERY_EV", 4: "UNEXPECTED_EXIT_REASON"}
KVM_SYSTEM_EVENT_NAMES = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND", 6: "SEV_TERM", 7: "TDX_FATAL"}
KVM_MSR_EXIT_REASON_INVAL = 1 << 0
KVM_MSR_EXIT_REASON_UNKNOWN = 1 << 1
KVM_MSR_EXIT_REASON_FILTER = 1 << 2
# the KVM_CAP_X86_USER_SPACE_MSR argument that asks for every kind of MSR exit
KVM_MSR_EXIT_REASON_MASK = KVM_MSR_EXIT_REASON_INVAL | KVM_MSR_EXIT_REASON_UNKNOWN | KVM_MSR_EXIT_REASON_FILTER


# --- reading it: offsets and struct formats derived from the mirror above -----------------------

_CODES = {c_uint8: "B", c_uint16: "H", c_uint32: "I", c_uint64: "Q"}


def member(path: str) -> tuple[int, type]:
    """Offset in struct kvm_run and ctypes type of a member, e.g. ``member("u.io.port")``."""
    cls, off = kvm_run, 0
    for name in path.split("."):
        off += getattr(cls, name).offset
        cls = dict(cls._fields_)[name]
    return off, cls


def unpacker(*paths: str) -> Callable[..., tuple]:
    """``struct.Struct(fmt).unpack_from`` that reads the kvm_run members ``paths`` (in offset
    order) from the start of a kvm_run page; arrays of u64 give their elements, byte arrays bytes.
    The format comes from abi's ctypes structs, which tests/test_abi.py checks against the kernel
    header, so it is never written by hand."""
    fmt, pos = "<", 0
    for path in paths:
        off, ctype = member(path)
        if off < pos:
            raise ValueError(f"kvm_run member {path} at {off} is not after the previous one (ends at {pos})")
        fmt += f"{off - pos}x" * (off > pos)
        if issubclass(ctype, ctypes.Array):
            elem = ctype._type_
            fmt += f"{ctype._length_}{'s' if elem is c_uint8 else _CODES[elem]}"
        else:
            fmt += _CODES[ctype]
        pos = off + ctypes.sizeof(ctype)
    return struct.Struct(fmt).unpack_from


__all__ = [name for name in globals() if name.startswith(("kvm_", "KVM_"))]
