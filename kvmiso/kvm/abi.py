"""ctypes mirrors of <linux/kvm.h> and <asm/kvm.h> (x86-64), and the ioctl numbers.

Data only: no function here touches a file descriptor. Every struct's size and field offsets
are checked against the installed kernel headers by ``tests/test_abi.py``. The vCPU state
structs live in :mod:`kvmiso.kvm.abi_vcpu`, struct kvm_run and the KVM_EXIT_* numbers in
:mod:`kvmiso.kvm.abi_run`; both are re-exported here, so ``abi.kvm_regs``, ``abi.kvm_run`` and
``abi.KVM_EXIT_IO`` name the whole ABI from one namespace.
"""

from __future__ import annotations

import ctypes
import functools
from ctypes import c_int32, c_int16, c_uint8, c_uint16, c_uint32, c_uint64

# the vCPU state structs and struct kvm_run with the exit reasons live beside this file; every
# name is re-exported here by name, so that abi.kvm_regs and abi.KVM_EXIT_IO name the whole ABI
from .abi_run import (  # struct kvm_run, its exit union, KVM_EXIT_*
    kvm_run_io, KVM_EXIT_IO_IN, KVM_EXIT_IO_OUT, kvm_run_mmio, kvm_run_hw,
    kvm_run_fail_entry, kvm_run_ex, kvm_debug_exit_arch, kvm_run_hypercall, kvm_run_tpr_access,
    kvm_run_internal, kvm_run_system_event, kvm_run_msr, kvm_run_notify, kvm_run_memory_fault,
    KVM_MEMORY_EXIT_FLAG_PRIVATE, kvm_run_exit, kvm_run_s,
    kvm_run, KVM_EXIT_UNKNOWN, KVM_EXIT_EXCEPTION, KVM_EXIT_IO, KVM_EXIT_HYPERCALL, KVM_EXIT_DEBUG,
    KVM_EXIT_HLT, KVM_EXIT_MMIO, KVM_EXIT_IRQ_WINDOW_OPEN, KVM_EXIT_SHUTDOWN, KVM_EXIT_FAIL_ENTRY,
    KVM_EXIT_INTR, KVM_EXIT_SET_TPR, KVM_EXIT_TPR_ACCESS, KVM_EXIT_S390_SIEIC, KVM_EXIT_S390_RESET,
    KVM_EXIT_DCR, KVM_EXIT_NMI, KVM_EXIT_INTERNAL_ERROR, KVM_EXIT_OSI, KVM_EXIT_PAPR_HCALL,
    KVM_EXIT_S390_UCONTROL, KVM_EXIT_WATCHDOG, KVM_EXIT_S390_TSCH, KVM_EXIT_EPR, KVM_EXIT_SYSTEM_EVENT,
    KVM_EXIT_S390_STSI, KVM_EXIT_IOAPIC_EOI, KVM_EXIT_HYPERV, KVM_EXIT_ARM_NISV, KVM_EXIT_X86_RDMSR,
    KVM_EXIT_X86_WRMSR, KVM_EXIT_DIRTY_RING_FULL, KVM_EXIT_AP_RESET_HOLD, KVM_EXIT_X86_BUS_LOCK,
    KVM_EXIT_XEN, KVM_EXIT_RISCV_SBI, KVM_EXIT_RISCV_CSR, KVM_EXIT_NOTIFY, KVM_EXIT_LOONGARCH_IOCSR,
    KVM_EXIT_MEMORY_FAULT, KVM_EXIT_TDX, KVM_EXIT_REASONS, KVM_INTERNAL_ERROR_NAMES,
    KVM_SYSTEM_EVENT_NAMES, KVM_MSR_EXIT_REASON_INVAL, KVM_MSR_EXIT_REASON_UNKNOWN,
    KVM_MSR_EXIT_REASON_FILTER, KVM_MSR_EXIT_REASON_MASK,
)
from .abi_vcpu import (  # registers, FPU, MSRs, CPUID, debug, events
    KVM_NR_INTERRUPTS, kvm_regs, kvm_segment, kvm_dtable, kvm_sregs, kvm_fpu, kvm_msr_entry, kvm_msrs,
    kvm_msr_list, kvm_cpuid_entry2, kvm_cpuid2, KVM_CPUID_FLAG_SIGNIFCANT_INDEX, kvm_translation,
    kvm_guest_debug_arch, kvm_guest_debug, KVM_GUESTDBG_ENABLE, KVM_GUESTDBG_SINGLESTEP,
    KVM_GUESTDBG_USE_SW_BP, KVM_GUESTDBG_USE_HW_BP, KVM_GUESTDBG_INJECT_DB, KVM_GUESTDBG_INJECT_BP,
    KVM_GUESTDBG_BLOCKIRQ, kvm_vcpu_events, kvm_debugregs, kvm_xsave, KVM_MAX_XCRS, kvm_xcr, kvm_xcrs,
    kvm_mp_state, KVM_MP_STATE_NAMES, KVM_MP_STATE_RUNNABLE, KVM_MP_STATE_UNINITIALIZED,
    KVM_MP_STATE_INIT_RECEIVED, KVM_MP_STATE_HALTED, KVM_MP_STATE_SIPI_RECEIVED, KVM_MP_STATE_STOPPED,
    KVM_MP_STATE_CHECK_STOP, KVM_MP_STATE_OPERATING, KVM_MP_STATE_LOAD, KVM_MP_STATE_AP_RESET_HOLD,
    KVM_MP_STATE_SUSPENDED, kvm_sync_regs, KVM_SYNC_X86_REGS, KVM_SYNC_X86_SREGS, KVM_SYNC_X86_EVENTS,
    KVM_SYNC_X86_VALID_FIELDS,
)

# --- ioctl number encoding (<asm-generic/ioctl.h>) -------------------------------------------

_IOC_NRBITS, _IOC_TYPEBITS, _IOC_SIZEBITS = 8, 8, 14
_IOC_NRSHIFT = 0
_IOC_TYPESHIFT = _IOC_NRSHIFT + _IOC_NRBITS
_IOC_SIZESHIFT = _IOC_TYPESHIFT + _IOC_TYPEBITS
_IOC_DIRSHIFT = _IOC_SIZESHIFT + _IOC_SIZEBITS
_IOC_NONE, _IOC_WRITE, _IOC_READ = 0, 1, 2


def _IOC(direction: int, typ: int, nr: int, size: int) -> int:
    return (direction << _IOC_DIRSHIFT) | (typ << _IOC_TYPESHIFT) | (nr << _IOC_NRSHIFT) | (
        size << _IOC_SIZESHIFT
    )


def _IO(typ: int, nr: int) -> int:
    return _IOC(_IOC_NONE, typ, nr, 0)


def _IOR(typ: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_READ, typ, nr, ctypes.sizeof(ctype))


def _IOW(typ: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_WRITE, typ, nr, ctypes.sizeof(ctype))


def _IOWR(typ: int, nr: int, ctype: type) -> int:
    return _IOC(_IOC_READ | _IOC_WRITE, typ, nr, ctypes.sizeof(ctype))


def ioc_size(request: int) -> int:
    """_IOC_SIZE: the argument size an ioctl request number encodes (0 for _IO requests)."""
    return request >> _IOC_SIZESHIFT & ((1 << _IOC_SIZEBITS) - 1)


@functools.lru_cache(maxsize=64)
def with_entries(header: type, entry: type, n: int) -> type:
    """A struct with a flexible array member (``kvm_msrs``, ``kvm_cpuid2``, ``kvm_msr_list``)
    with room for ``n`` entries: fields ``hdr`` and ``entries``. Its ``header_type`` is what the
    request number's size describes. One class per shape, made once: making a ctypes class
    costs more than the ioctl."""
    class _WithEntries(ctypes.Structure):
        _fields_ = [("hdr", header), ("entries", entry * n)]
        header_type = header

    return _WithEntries


KVMIO = 0xAE
KVM_API_VERSION = 12

# --- structures --------------------------------------------------------------------------------


class kvm_userspace_memory_region(ctypes.Structure):
    """struct kvm_userspace_memory_region (KVM_SET_USER_MEMORY_REGION): one memory slot."""

    _fields_ = [
        ("slot", c_uint32),
        ("flags", c_uint32),
        ("guest_phys_addr", c_uint64),
        ("memory_size", c_uint64),
        ("userspace_addr", c_uint64),
    ]


class kvm_userspace_memory_region2(ctypes.Structure):
    """struct kvm_userspace_memory_region2 (KVM_SET_USER_MEMORY_REGION2, Linux 6.8+): a memory
    slot that may also take its private memory from a guest_memfd."""

    _fields_ = kvm_userspace_memory_region._fields_ + [  # the first five are struct kvm_userspace_memory_region's
        ("guest_memfd_offset", c_uint64),
        ("guest_memfd", c_uint32),
        ("pad1", c_uint32),
        ("pad2", c_uint64 * 14),
    ]


class kvm_create_guest_memfd(ctypes.Structure):
    """struct kvm_create_guest_memfd (KVM_CREATE_GUEST_MEMFD, Linux 6.8+): the size of a guest_memfd."""

    _fields_ = [("size", c_uint64), ("flags", c_uint64), ("reserved", c_uint64 * 6)]


KVM_MEM_LOG_DIRTY_PAGES = 1 << 0
KVM_MEM_READONLY = 1 << 1
KVM_MEM_GUEST_MEMFD = 1 << 2
KVM_X86_DEFAULT_VM = 0
KVM_X86_SW_PROTECTED_VM = 1
KVM_MEMORY_ATTRIBUTE_PRIVATE = 1 << 3
KVM_X86_QUIRK_SLOT_ZAP_ALL = 1 << 7  # KVM_CAP_DISABLE_QUIRKS2 argument (<asm/kvm.h>, 6.12)


class kvm_msr_filter_range(ctypes.Structure):
    """struct kvm_msr_filter_range: ``nmsrs`` MSRs from ``base`` whose ``flags`` accesses
    (KVM_MSR_FILTER_READ/WRITE) ``bitmap`` allows (a 1 bit) or denies (a 0 bit)."""

    _fields_ = [("flags", c_uint32), ("nmsrs", c_uint32), ("base", c_uint32), ("bitmap", c_uint64)]


KVM_MSR_FILTER_MAX_BITMAP_SIZE = 0x600
KVM_MSR_FILTER_MAX_RANGES = 16


class kvm_msr_filter(ctypes.Structure):
    """struct kvm_msr_filter (KVM_X86_SET_MSR_FILTER): the default (allow or deny) and up to 16 ranges."""

    _fields_ = [("flags", c_uint32), ("ranges", kvm_msr_filter_range * KVM_MSR_FILTER_MAX_RANGES)]


KVM_MSR_FILTER_READ = 1 << 0
KVM_MSR_FILTER_WRITE = 1 << 1
KVM_MSR_FILTER_RANGE_VALID_MASK = KVM_MSR_FILTER_READ | KVM_MSR_FILTER_WRITE
KVM_MSR_FILTER_DEFAULT_ALLOW = 0
KVM_MSR_FILTER_DEFAULT_DENY = 1 << 0
KVM_MSR_FILTER_VALID_MASK = KVM_MSR_FILTER_DEFAULT_DENY


class kvm_irq_level(ctypes.Structure):
    """struct kvm_irq_level (KVM_IRQ_LINE): an interrupt line and its level."""

    _fields_ = [("irq", c_uint32), ("level", c_uint32)]


class kvm_ioeventfd(ctypes.Structure):
    """struct kvm_ioeventfd (KVM_IOEVENTFD): an address whose guest writes signal an eventfd in the kernel."""

    _fields_ = [
        ("datamatch", c_uint64),
        ("addr", c_uint64),
        ("len", c_uint32),
        ("fd", c_int32),
        ("flags", c_uint32),
        ("pad", c_uint8 * 36),
    ]


KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IOEVENTFD_FLAG_DEASSIGN = 1 << 2


class kvm_dirty_log(ctypes.Structure):
    """struct kvm_dirty_log (KVM_GET_DIRTY_LOG): a slot and the userspace bitmap of its written pages."""

    _fields_ = [("slot", c_uint32), ("padding1", c_uint32), ("dirty_bitmap", c_uint64)]


class kvm_enable_cap(ctypes.Structure):
    """struct kvm_enable_cap (KVM_ENABLE_CAP): a capability number and its arguments."""

    _fields_ = [("cap", c_uint32), ("flags", c_uint32), ("args", c_uint64 * 4), ("pad", c_uint8 * 64)]


class kvm_stats_header(ctypes.Structure):
    """struct kvm_stats_header: the start of a KVM_GET_STATS_FD file (where the id, descriptors and data are)."""

    _fields_ = [
        ("flags", c_uint32),
        ("name_size", c_uint32),
        ("num_desc", c_uint32),
        ("id_offset", c_uint32),
        ("desc_offset", c_uint32),
        ("data_offset", c_uint32),
    ]


class kvm_stats_desc(ctypes.Structure):
    """Header only; a NUL-padded name of ``kvm_stats_header.name_size`` bytes follows it."""

    _fields_ = [
        ("flags", c_uint32),
        ("exponent", c_int16),
        ("size", c_uint16),
        ("offset", c_uint32),
        ("bucket_size", c_uint32),
    ]


KVM_STATS_TYPE_SHIFT, KVM_STATS_TYPE_MASK = 0, 0xF << 0
KVM_STATS_UNIT_SHIFT, KVM_STATS_UNIT_MASK = 4, 0xF << 4
KVM_STATS_BASE_SHIFT, KVM_STATS_BASE_MASK = 8, 0xF << 8
KVM_STATS_TYPE_NAMES = {0: "cumulative", 1: "instant", 2: "peak", 3: "linear_hist", 4: "log_hist"}
KVM_STATS_UNIT_NAMES = {0: "none", 1: "bytes", 2: "seconds", 3: "cycles", 4: "boolean"}
KVM_STATS_BASE_NAMES = {0: "pow10", 1: "pow2"}

# --- capabilities (KVM_CHECK_EXTENSION) --------------------------------------------------------

KVM_CAPS = {
    "IRQCHIP": 0, "HLT": 1, "USER_MEMORY": 3, "SET_TSS_ADDR": 4, "VAPIC": 6, "EXT_CPUID": 7,
    "CLOCKSOURCE": 8, "NR_VCPUS": 9, "NR_MEMSLOTS": 10, "PIT": 11, "NOP_IO_DELAY": 12,
    "MP_STATE": 14, "COALESCED_MMIO": 15, "SYNC_MMU": 16, "USER_NMI": 22, "SET_GUEST_DEBUG": 23,
    "REINJECT_CONTROL": 24, "IRQ_ROUTING": 25, "IRQ_INJECT_STATUS": 26, "MCE": 31, "IRQFD": 32,
    "PIT2": 33, "SET_BOOT_CPU_ID": 34, "PIT_STATE2": 35, "IOEVENTFD": 36,
    "SET_IDENTITY_MAP_ADDR": 37, "ADJUST_CLOCK": 39, "INTERNAL_ERROR_DATA": 40,
    "VCPU_EVENTS": 41, "HYPERV": 44, "INTR_SHADOW": 49, "DEBUGREGS": 50,
    "X86_ROBUST_SINGLESTEP": 51, "ENABLE_CAP": 54, "XSAVE": 55, "XCRS": 56, "ASYNC_PF": 59,
    "TSC_CONTROL": 60, "GET_TSC_KHZ": 61, "MAX_VCPUS": 66, "ONE_REG": 70,
    "TSC_DEADLINE_TIMER": 72, "SYNC_REGS": 74, "KVMCLOCK_CTRL": 76, "SIGNAL_MSI": 77,
    "READONLY_MEM": 81, "IRQFD_RESAMPLE": 82, "IOEVENTFD_NO_LENGTH": 100, "MAX_VCPU_ID": 128,
    "X2APIC_API": 129, "IMMEDIATE_EXIT": 136, "X86_DISABLE_EXITS": 143, "GET_MSR_FEATURES": 153,
    "NESTED_STATE": 157, "EXCEPTION_PAYLOAD": 164, "MANUAL_DIRTY_LOG_PROTECT2": 168,
    "PMU_EVENT_FILTER": 173, "HALT_POLL": 182, "SMALLER_MAXPHYADDR": 185,
    "X86_USER_SPACE_MSR": 188, "X86_MSR_FILTER": 189, "DIRTY_LOG_RING": 192,
    "X86_BUS_LOCK_EXIT": 193, "EXIT_HYPERCALL": 201, "BINARY_STATS_FD": 203,
    "XSAVE2": 208, "SYS_ATTRIBUTES": 209, "PMU_CAPABILITY": 212, "X86_NOTIFY_VMEXIT": 219,
    "DISABLE_QUIRKS": 116, "DISABLE_QUIRKS2": 213, "DIRTY_LOG_RING_ACQ_REL": 223, "USER_MEMORY2": 231, "MEMORY_FAULT_INFO": 232,
    "MEMORY_ATTRIBUTES": 233, "GUEST_MEMFD": 234, "VM_TYPES": 235,
}


def capability_number(cap: str | int) -> int:
    """A KVM_CAP_* number from its name, with or without the prefix (``"IMMEDIATE_EXIT"``,
    ``"KVM_CAP_IMMEDIATE_EXIT"``); a number is returned as it is. ValueError for an unknown name."""
    if isinstance(cap, int):
        return cap
    try:
        return KVM_CAPS[cap.upper().removeprefix("KVM_CAP_")]
    except KeyError:
        raise ValueError(f"unknown KVM capability {cap!r}") from None


# --- ioctl numbers -----------------------------------------------------------------------------

# system
KVM_GET_API_VERSION = _IO(KVMIO, 0x00)
KVM_CREATE_VM = _IO(KVMIO, 0x01)
KVM_GET_MSR_INDEX_LIST = _IOWR(KVMIO, 0x02, kvm_msr_list)
KVM_CHECK_EXTENSION = _IO(KVMIO, 0x03)
KVM_GET_VCPU_MMAP_SIZE = _IO(KVMIO, 0x04)
KVM_GET_SUPPORTED_CPUID = _IOWR(KVMIO, 0x05, kvm_cpuid2)
# vm
KVM_CREATE_VCPU = _IO(KVMIO, 0x41)
KVM_GET_DIRTY_LOG = _IOW(KVMIO, 0x42, kvm_dirty_log)
KVM_SET_NR_MMU_PAGES = _IO(KVMIO, 0x44)
KVM_GET_NR_MMU_PAGES = _IO(KVMIO, 0x45)
KVM_SET_USER_MEMORY_REGION = _IOW(KVMIO, 0x46, kvm_userspace_memory_region)
KVM_SET_USER_MEMORY_REGION2 = _IOW(KVMIO, 0x49, kvm_userspace_memory_region2)
KVM_SET_TSS_ADDR = _IO(KVMIO, 0x47)
KVM_SET_IDENTITY_MAP_ADDR = _IOW(KVMIO, 0x48, c_uint64)
KVM_CREATE_IRQCHIP = _IO(KVMIO, 0x60)
KVM_IRQ_LINE = _IOW(KVMIO, 0x61, kvm_irq_level)
KVM_IOEVENTFD = _IOW(KVMIO, 0x79, kvm_ioeventfd)
KVM_ENABLE_CAP = _IOW(KVMIO, 0xA3, kvm_enable_cap)
KVM_X86_SET_MSR_FILTER = _IOW(KVMIO, 0xC6, kvm_msr_filter)
KVM_GET_STATS_FD = _IO(KVMIO, 0xCE)
KVM_CREATE_GUEST_MEMFD = _IOWR(KVMIO, 0xD4, kvm_create_guest_memfd)
# vcpu
KVM_RUN = _IO(KVMIO, 0x80)
KVM_GET_REGS = _IOR(KVMIO, 0x81, kvm_regs)
KVM_SET_REGS = _IOW(KVMIO, 0x82, kvm_regs)
KVM_GET_SREGS = _IOR(KVMIO, 0x83, kvm_sregs)
KVM_SET_SREGS = _IOW(KVMIO, 0x84, kvm_sregs)
KVM_TRANSLATE = _IOWR(KVMIO, 0x85, kvm_translation)
KVM_GET_MSRS = _IOWR(KVMIO, 0x88, kvm_msrs)
KVM_SET_MSRS = _IOW(KVMIO, 0x89, kvm_msrs)
KVM_GET_FPU = _IOR(KVMIO, 0x8C, kvm_fpu)
KVM_SET_FPU = _IOW(KVMIO, 0x8D, kvm_fpu)
KVM_SET_CPUID2 = _IOW(KVMIO, 0x90, kvm_cpuid2)
KVM_GET_CPUID2 = _IOWR(KVMIO, 0x91, kvm_cpuid2)
KVM_SET_GUEST_DEBUG = _IOW(KVMIO, 0x9B, kvm_guest_debug)
KVM_GET_MP_STATE = _IOR(KVMIO, 0x98, kvm_mp_state)
KVM_SET_MP_STATE = _IOW(KVMIO, 0x99, kvm_mp_state)
KVM_GET_VCPU_EVENTS = _IOR(KVMIO, 0x9F, kvm_vcpu_events)
KVM_SET_VCPU_EVENTS = _IOW(KVMIO, 0xA0, kvm_vcpu_events)
KVM_GET_DEBUGREGS = _IOR(KVMIO, 0xA1, kvm_debugregs)
KVM_SET_DEBUGREGS = _IOW(KVMIO, 0xA2, kvm_debugregs)
KVM_GET_XSAVE = _IOR(KVMIO, 0xA4, kvm_xsave)
KVM_SET_XSAVE = _IOW(KVMIO, 0xA5, kvm_xsave)
KVM_GET_XCRS = _IOR(KVMIO, 0xA6, kvm_xcrs)
KVM_SET_XCRS = _IOW(KVMIO, 0xA7, kvm_xcrs)
KVM_GET_XSAVE2 = _IOR(KVMIO, 0xCF, kvm_xsave)

IOCTL_NAMES = {v: k for k, v in globals().items() if k.startswith("KVM_") and k.isupper()
               and isinstance(v, int) and (v >> _IOC_TYPESHIFT) & 0xFF == KVMIO}
