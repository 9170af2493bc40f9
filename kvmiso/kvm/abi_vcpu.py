"""The vCPU state structs of <linux/kvm.h> and <asm/kvm.h> (x86-64): registers, segments, FPU,
MSRs, CPUID, KVM_TRANSLATE, guest debug and pending events, as ctypes mirrors.

Data only; ``tests/test_abi.py`` checks every size and offset against the installed kernel
headers, and :mod:`kvmiso.kvm.abi` re-exports every name.
"""

from __future__ import annotations

import ctypes
from ctypes import c_uint8, c_uint16, c_uint32, c_uint64

KVM_NR_INTERRUPTS = 256


class kvm_regs(ctypes.Structure):
    """struct kvm_regs (KVM_GET_REGS, KVM_SET_REGS): the general-purpose registers, rip and rflags."""

    _fields_ = [
        (name, c_uint64)
        for name in (
            "rax rbx rcx rdx rsi rdi rsp rbp r8 r9 r10 r11 r12 r13 r14 r15 rip rflags".split()
        )
    ]


class kvm_segment(ctypes.Structure):
    """struct kvm_segment: one segment register as VMX/SVM hold it (base, limit, selector, attributes)."""

    _fields_ = [
        ("base", c_uint64),
        ("limit", c_uint32),
        ("selector", c_uint16),
        ("type", c_uint8),
        ("present", c_uint8),
        ("dpl", c_uint8),
        ("db", c_uint8),
        ("s", c_uint8),
        ("l", c_uint8),
        ("g", c_uint8),
        ("avl", c_uint8),
        ("unusable", c_uint8),
        ("padding", c_uint8),
    ]


class kvm_dtable(ctypes.Structure):
    """struct kvm_dtable: a descriptor table register (GDTR, IDTR)."""

    _fields_ = [("base", c_uint64), ("limit", c_uint16), ("padding", c_uint16 * 3)]


class kvm_sregs(ctypes.Structure):
    """struct kvm_sregs (KVM_GET_SREGS, KVM_SET_SREGS): segments, descriptor tables, control registers, EFER."""

    _fields_ = [
        ("cs", kvm_segment),
        ("ds", kvm_segment),
        ("es", kvm_segment),
        ("fs", kvm_segment),
        ("gs", kvm_segment),
        ("ss", kvm_segment),
        ("tr", kvm_segment),
        ("ldt", kvm_segment),
        ("gdt", kvm_dtable),
        ("idt", kvm_dtable),
        ("cr0", c_uint64),
        ("cr2", c_uint64),
        ("cr3", c_uint64),
        ("cr4", c_uint64),
        ("cr8", c_uint64),
        ("efer", c_uint64),
        ("apic_base", c_uint64),
        ("interrupt_bitmap", c_uint64 * ((KVM_NR_INTERRUPTS + 63) // 64)),
    ]


class kvm_fpu(ctypes.Structure):
    """struct kvm_fpu (KVM_GET_FPU, KVM_SET_FPU): x87 and SSE state."""

    _fields_ = [
        ("fpr", (c_uint8 * 16) * 8),
        ("fcw", c_uint16),
        ("fsw", c_uint16),
        ("ftwx", c_uint8),
        ("pad1", c_uint8),
        ("last_opcode", c_uint16),
        ("last_ip", c_uint64),
        ("last_dp", c_uint64),
        ("xmm", (c_uint8 * 16) * 16),
        ("mxcsr", c_uint32),
        ("pad2", c_uint32),
    ]


class kvm_msr_entry(ctypes.Structure):
    """struct kvm_msr_entry: one MSR index and value of a struct kvm_msrs."""

    _fields_ = [("index", c_uint32), ("reserved", c_uint32), ("data", c_uint64)]


class kvm_msrs(ctypes.Structure):
    """Header only; the entries follow it (flexible array member)."""

    _fields_ = [("nmsrs", c_uint32), ("pad", c_uint32)]


class kvm_msr_list(ctypes.Structure):
    """Header only; ``nmsrs`` u32 indices follow it."""

    _fields_ = [("nmsrs", c_uint32)]


class kvm_cpuid_entry2(ctypes.Structure):
    """struct kvm_cpuid_entry2: one CPUID leaf/subleaf and its four output registers."""

    _fields_ = [
        ("function", c_uint32),
        ("index", c_uint32),
        ("flags", c_uint32),
        ("eax", c_uint32),
        ("ebx", c_uint32),
        ("ecx", c_uint32),
        ("edx", c_uint32),
        ("padding", c_uint32 * 3),
    ]


class kvm_cpuid2(ctypes.Structure):
    """Header only; ``nent`` kvm_cpuid_entry2 follow it."""

    _fields_ = [("nent", c_uint32), ("padding", c_uint32)]


KVM_CPUID_FLAG_SIGNIFCANT_INDEX = 1 << 0


class kvm_translation(ctypes.Structure):
    """struct kvm_translation (KVM_TRANSLATE): a guest-virtual address and what it maps to."""

    _fields_ = [
        ("linear_address", c_uint64),
        ("physical_address", c_uint64),
        ("valid", c_uint8),
        ("writeable", c_uint8),
        ("usermode", c_uint8),
        ("pad", c_uint8 * 5),
    ]


class kvm_guest_debug_arch(ctypes.Structure):
    """struct kvm_guest_debug_arch: the debug registers DR0-DR7 for KVM_SET_GUEST_DEBUG."""

    _fields_ = [("debugreg", c_uint64 * 8)]


class kvm_guest_debug(ctypes.Structure):
    """struct kvm_guest_debug (KVM_SET_GUEST_DEBUG): KVM_GUESTDBG_* control bits and debug registers."""

    _fields_ = [("control", c_uint32), ("pad", c_uint32), ("arch", kvm_guest_debug_arch)]


KVM_GUESTDBG_ENABLE = 0x00000001
KVM_GUESTDBG_SINGLESTEP = 0x00000002
KVM_GUESTDBG_USE_SW_BP = 0x00010000
KVM_GUESTDBG_USE_HW_BP = 0x00020000
KVM_GUESTDBG_INJECT_DB = 0x00040000
KVM_GUESTDBG_INJECT_BP = 0x00080000
KVM_GUESTDBG_BLOCKIRQ = 0x00100000


class _events_exception(ctypes.Structure):
    _fields_ = [
        ("injected", c_uint8),
        ("nr", c_uint8),
        ("has_error_code", c_uint8),
        ("pending", c_uint8),
        ("error_code", c_uint32),
    ]


class _events_interrupt(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("nr", c_uint8), ("soft", c_uint8), ("shadow", c_uint8)]


class _events_nmi(ctypes.Structure):
    _fields_ = [("injected", c_uint8), ("pending", c_uint8), ("masked", c_uint8), ("pad", c_uint8)]


class _events_smi(ctypes.Structure):
    _fields_ = [
        ("smm", c_uint8),
        ("pending", c_uint8),
        ("smm_inside_nmi", c_uint8),
        ("latched_init", c_uint8),
    ]


class _events_triple_fault(ctypes.Structure):
    _fields_ = [("pending", c_uint8)]


class kvm_vcpu_events(ctypes.Structure):
    """struct kvm_vcpu_events (KVM_GET_VCPU_EVENTS, KVM_SET_VCPU_EVENTS): pending exceptions, interrupts, NMIs, SMIs."""

    _fields_ = [
        ("exception", _events_exception),
        ("interrupt", _events_interrupt),
        ("nmi", _events_nmi),
        ("sipi_vector", c_uint32),
        ("flags", c_uint32),
        ("smi", _events_smi),
        ("triple_fault", _events_triple_fault),
        ("reserved", c_uint8 * 26),
        ("exception_has_payload", c_uint8),
        ("exception_payload", c_uint64),
    ]


class kvm_debugregs(ctypes.Structure):
    """struct kvm_debugregs (KVM_GET_DEBUGREGS, KVM_SET_DEBUGREGS): the guest's own DR0-3, DR6, DR7."""

    _fields_ = [("db", c_uint64 * 4), ("dr6", c_uint64), ("dr7", c_uint64), ("flags", c_uint64),
                ("reserved", c_uint64 * 9)]


class kvm_xsave(ctypes.Structure):
    """struct kvm_xsave (KVM_GET_XSAVE, KVM_SET_XSAVE, KVM_GET_XSAVE2): the XSAVE area, laid out as
    the host's CPUID leaf 0xD says; KVM_GET_XSAVE2 may write past these 4096 bytes (the flexible
    ``extra``), as many as KVM_CHECK_EXTENSION(KVM_CAP_XSAVE2) on the VM says."""

    _fields_ = [("region", c_uint32 * 1024)]


KVM_MAX_XCRS = 16


class kvm_xcr(ctypes.Structure):
    """struct kvm_xcr: one extended control register (XCR0 is ``xcr`` 0) and its value."""

    _fields_ = [("xcr", c_uint32), ("reserved", c_uint32), ("value", c_uint64)]


class kvm_xcrs(ctypes.Structure):
    """struct kvm_xcrs (KVM_GET_XCRS, KVM_SET_XCRS): ``nr_xcrs`` extended control registers."""

    _fields_ = [("nr_xcrs", c_uint32), ("flags", c_uint32), ("xcrs", kvm_xcr * KVM_MAX_XCRS),
                ("padding", c_uint64 * 16)]


class kvm_mp_state(ctypes.Structure):
    """struct kvm_mp_state (KVM_GET_MP_STATE, KVM_SET_MP_STATE): a KVM_MP_STATE_* value."""

    _fields_ = [("mp_state", c_uint32)]


KVM_MP_STATE_NAMES = {0: "RUNNABLE", 1: "UNINITIALIZED", 2: "INIT_RECEIVED", 3: "HALTED", 4: "SIPI_RECEIVED",
                      5: "STOPPED", 6: "CHECK_STOP", 7: "OPERATING", 8: "LOAD", 9: "AP_RESET_HOLD", 10: "SUSPENDED"}
globals().update({f"KVM_MP_STATE_{name}": nr for nr, name in KVM_MP_STATE_NAMES.items()})


class kvm_sync_regs(ctypes.Structure):
    """struct kvm_sync_regs: ``kvm_run.s.regs``, the registers KVM_RUN copies out (the
    KVM_SYNC_X86_* bits of ``kvm_run.kvm_valid_regs``) and in (``kvm_dirty_regs``)."""

    _fields_ = [("regs", kvm_regs), ("sregs", kvm_sregs), ("events", kvm_vcpu_events)]


KVM_SYNC_X86_REGS = 1 << 0
KVM_SYNC_X86_SREGS = 1 << 1
KVM_SYNC_X86_EVENTS = 1 << 2
KVM_SYNC_X86_VALID_FIELDS = KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS | KVM_SYNC_X86_EVENTS


__all__ = [name for name in globals() if name.startswith(("kvm_", "KVM_"))]
