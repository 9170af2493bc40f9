"""Facts the ports' ``kvm_deviation`` marks name: each measures one behaviour of this host's KVM
on a VM of its own, once per process, so a deviation is decided by what KVM does, not by the
vendor module's name. Each takes the Kvm (the plugin's callable facts) and returns a bool."""

from __future__ import annotations

import ctypes
import functools
from typing import Any, Callable

from kvmiso.guest import Machine, RunResult, Source, build
from kvmiso.kvm import Kvm, KvmError, abi
from kvmiso.kvm.exits import DebugExit

_measured: dict[str, bool] = {}


def cpuid2_buffer(room: int) -> ctypes.Structure:
    """A ``struct kvm_cpuid2`` with room for ``room`` entries and nent saying so."""
    fields = [("hdr", abi.kvm_cpuid2), ("entries", abi.kvm_cpuid_entry2 * room)]
    return type("kvm_cpuid2", (ctypes.Structure,), {"_fields_": fields, "header_type": abi.kvm_cpuid2})(abi.kvm_cpuid2(room))


def _once(fact):
    """Measure ``fact`` once per process (the host cannot change while the tests run)."""
    @functools.wraps(fact)
    def measured(kvm: Kvm) -> bool:
        if fact.__name__ not in _measured:
            _measured[fact.__name__] = fact(kvm)
        return _measured[fact.__name__]

    return measured


@_once
def msr_index_list_has_one_kvm_refuses(kvm: Kvm) -> bool:
    """Some MSR of KVM_GET_MSR_INDEX_LIST takes no KVM_SET_MSRS of the value KVM_GET_MSRS read,
    on a fresh vCPU with the supported CPUID (kvm_pvm v1300: MSR_KVM_POLL_CONTROL, 0x4b564d06)."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        for index, value in vcpu.get_msrs(kvm.get_msr_index_list()).items():
            try:
                vcpu.set_msrs({index: value})
            except KvmError:
                return True
    return False


@_once
def set_sregs_ignores_cpuid(kvm: Kvm) -> bool:
    """KVM_SET_SREGS takes a CR4 or EFER bit whose feature the vCPU's CPUID (the supported one)
    lacks, where KVM refuses it with EINVAL (kvm_pvm v1300: CR4.OSXSAVE without XSAVE; Linux 6.1:
    EFER bits, which its KVM_SET_SREGS never checked)."""
    from kvmiso.kvm.x86 import CR4, EFER

    lacking = [(reg, bit) for reg, name, bit in (
        ("cr4", "XSAVE", CR4.OSXSAVE), ("cr4", "LA57", CR4.LA57), ("cr4", "VMX", CR4.VMXE), ("cr4", "PKU", CR4.PKE),
        ("cr4", "SMAP", CR4.SMAP), ("cr4", "FSGSBASE", CR4.FSGSBASE), ("efer", "SVM", EFER.SVME),
        ("efer", "FXSR_OPT", EFER.FFXSR), ("efer", "AUTOIBRS", EFER.AUTOIBRS)) if not kvm.cpu_has(name)]
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        for reg, bit in lacking:
            sregs = vcpu.get_sregs()
            setattr(sregs, reg, getattr(sregs, reg) | bit)
            try:
                vcpu.set_sregs(sregs)
            except KvmError:
                continue
            return True
    return False


@_once
def get_cpuid2_differs_from_set(kvm: Kvm) -> bool:
    """KVM_GET_CPUID2 gives other values than KVM_SET_CPUID2 set (the supported CPUID), beyond
    the bits KVM changes at run time (kvm_pvm v1300: leaf 1 as the host CPU has it)."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        return {(e.function, e.index): (e.eax, e.edx) for e in vcpu.get_cpuid2() if e.function != 0xD} != {
            (e.function, e.index): (e.eax, e.edx) for e in kvm.get_supported_cpuid() if e.function != 0xD}


@_once
def get_cpuid2_keeps_nent_on_success(kvm: Kvm) -> bool:
    """KVM_GET_CPUID2 with room to spare leaves nent as it was instead of writing the count
    (Linux 6.1; it writes nent on E2BIG instead)."""
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        entries = kvm.get_supported_cpuid()
        vcpu.set_cpuid2(entries)
        vcpu.ioctl(abi.KVM_GET_CPUID2, buf := cpuid2_buffer(len(entries) + 1))
        return buf.hdr.nent != len(entries)



PROBE = Source.asm(r"""
        .include "kvmiso.inc"
        .globl main
main:
probe_nop: nop
probe_int3: int3
probe_sti: sti
        nop
        cli
        ret
""", name="debug_probe")


def _probe_debug(kvm: Kvm, label: str, debug: Callable[[dict[str, int]], dict[str, Any]]) -> tuple[RunResult, dict[str, int]]:
    """A run of PROBE from ``label`` under KVM_SET_GUEST_DEBUG(**debug(its symbols)), to its first
    KVM_EXIT_DEBUG or its end, and the symbols."""
    image = build(PROBE, "long")
    with Machine(image, kvm=kvm) as m:
        regs = m.vcpu.get_regs()
        regs.rip = image.symbols[label]
        m.vcpu.set_regs(regs)
        m.vcpu.set_guest_debug(**debug(image.symbols))
        return m.run(on_exit=lambda e: isinstance(e, DebugExit)), image.symbols


@_once
def hw_breakpoints_never_exit(kvm: Kvm) -> bool:
    """An instruction breakpoint in DR0 (KVM_GUESTDBG_USE_HW_BP) ends in no KVM_EXIT_DEBUG: the
    guest runs on past it (kvm_amd under QEMU's TCG, whose SVM leaves the guest's DR7 unused)."""
    r, _ = _probe_debug(kvm, "probe_nop", lambda s: dict(debugreg=[s["probe_nop"]] + [0] * 6 + [0x402]))
    return not isinstance(r.exits[-1], DebugExit)


@_once
def int3_reaches_the_guest(kvm: Kvm) -> bool:
    """Under KVM_GUESTDBG_USE_SW_BP an INT3 is the guest's own #BP, not a KVM_EXIT_DEBUG (kvm_amd
    under QEMU's TCG)."""
    r, _ = _probe_debug(kvm, "probe_int3", lambda s: dict(sw_bp=True))
    return r.exception is not None and r.exception.vector == 3


@_once
def single_step_skips_the_sti_shadow(kvm: Kvm) -> bool:
    """Single-stepping STI stops after the instruction that follows it, not at that instruction
    (kvm_amd under QEMU's TCG: the interrupt shadow holds the trap back)."""
    r, s = _probe_debug(kvm, "probe_sti", lambda s: dict(single_step=True))
    return isinstance(r.exits[-1], DebugExit) and r.exits[-1].pc != s["probe_sti"] + 1


def svm_without_nrips(kvm: Kvm) -> bool:
    """KVM offers a guest SVM but not next-RIP saving (kvm_amd with nrips=0, as QEMU's TCG runs
    it): KVM cannot inject a soft exception (#BP) it cannot find the next instruction of."""
    return kvm.cpu_has("SVM") and not kvm.cpu_has("NRIPS")
