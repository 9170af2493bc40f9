"""Facts the ports' ``kvm_deviation`` marks name: each measures one behaviour of this host's KVM
on a VM of its own, once per process, so a deviation is decided by what KVM does, not by the
vendor module's name. Each takes the Kvm (the plugin's callable facts) and returns a bool."""

from __future__ import annotations

import functools

from kvmiso.kvm import Kvm, KvmError

_measured: dict[str, bool] = {}


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
    """KVM_SET_SREGS takes a CR4 bit whose feature the vCPU's CPUID (the supported one) lacks,
    where KVM refuses it with EINVAL (kvm_pvm v1300: CR4.OSXSAVE without XSAVE)."""
    from kvmiso.kvm.x86 import CR4

    lacking = [bit for name, bit in (("XSAVE", CR4.OSXSAVE), ("LA57", CR4.LA57), ("VMX", CR4.VMXE), ("PKU", CR4.PKE),
                                     ("SMAP", CR4.SMAP), ("FSGSBASE", CR4.FSGSBASE)) if not kvm.cpu_has(name)]
    with kvm.create_vm() as vm:
        vcpu = vm.create_vcpu()
        vcpu.set_cpuid2(kvm.get_supported_cpuid())
        for bit in lacking:
            sregs = vcpu.get_sregs()
            sregs.cr4 |= bit
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
