"""x86/set_sregs_test (tools/testing/selftests/kvm/x86/set_sregs_test.c, upstream 67f8bc848ee3,
which grew EFER and CPUID enforcement since Linux 6.12): KVM_SET_SREGS takes every CR4 and
EFER bit the vCPU's CPUID offers and refuses the rest, with the sregs left as they were; with no
KVM_SET_CPUID2 only the always-allowed bits; never CR0 bits 32-63, NW without CD, PG without
PE, nor an IA32_APIC_BASE with reserved bits (the regression of d3802286fa0f).

Upstream assertions (upstream line: assertion -> line here):
    37 TEST_INVALID_SREG_BIT: TEST_ASSERT(rc, "KVM allowed invalid ...") -> 45
    41 TEST_INVALID_SREG_BIT: TEST_ASSERT(!memcmp(...), "KVM modified sregs") -> 47
    106 TEST_ASSERT(!rc, "Failed to set supported CR4 bits") -> 53
    108 TEST_ASSERT(OSXSAVE in CPUID == CR4.OSXSAVE) -> 55
    113 TEST_ASSERT(OSPKE in CPUID == CR4.PKE) -> 56
    119 TEST_ASSERT_EQ(sregs.cr4, cr4) -> 57
    121-130 TEST_INVALID_SREG_BIT(cr4, UMIP ... PKE), called at 58 -> 45, 47
    132-137 TEST_INVALID_SREG_BIT(cr0, bits 32-63, NW, PG), called at 59 -> 45, 47
    148 TEST_ASSERT(!rc, "Failed to set supported EFER bits") -> 65
    151 TEST_ASSERT_EQ(sregs.efer, efer) -> 66
    153-157 TEST_INVALID_SREG_BIT(efer, LME, NX, SVME, FFXSR, AUTOIBRS), called at 67 -> 45, 47
    186 TEST_ASSERT(rc, "Set IA32_APIC_BASE to 1 << 10 (invalid)") -> 81
    190 TEST_ASSERT(!rc, "Couldn't set IA32_APIC_BASE to 1 << 11 (valid)") -> 84

Lines: 50 here (Python, without this docstring, blank and comment lines) for upstream's 101
(141 with comments and blank lines), counted in Linux 6.12's set_sregs_test.c, the smaller.
"""

import pytest

from kvmiso.kvm import KvmError, abi
from kvmiso.kvm.x86 import CR0, CR4, EFER, cpu_has

from .facts import set_sregs_ignores_cpuid as ignores_cpuid

DEVIATION = pytest.mark.kvm_deviation(ignores_cpuid, "KVM_SET_SREGS takes bits the CPUID lacks", raises=pytest.fail.Exception)

ALWAYS_CR4 = CR4(sum(CR4[name] for name in "VME PVI TSD DE PSE PAE MCE PGE PCE OSFXSR OSXMMEXCPT".split()))
CR4_OF = {"UMIP": CR4.UMIP, "LA57": CR4.LA57, "VMX": CR4.VMXE, "SMX": CR4.SMXE, "FSGSBASE": CR4.FSGSBASE,
          "PCID": CR4.PCIDE, "XSAVE": CR4.OSXSAVE, "SMEP": CR4.SMEP, "SMAP": CR4.SMAP, "PKU": CR4.PKE}
EFER_OF = {"LM": EFER.LME | EFER.LMA, "NX": EFER.NX, "SVM": EFER.SVME, "FXSR_OPT": EFER.FFXSR, "AUTOIBRS": EFER.AUTOIBRS}


def invalid_bits(vcpu, orig, reg, bits):
    for bit in bits:
        if not getattr(orig, reg) & bit:  # else the feature is there: nothing to refuse
            setattr(new := abi.kvm_sregs.from_buffer_copy(orig), reg, getattr(orig, reg) | bit)
            with pytest.raises(KvmError, match="KVM_SET_SREGS failed: EINVAL"):
                vcpu.set_sregs(new)  # KVM allowed an invalid bit
            assert bytes(vcpu.get_sregs()) == bytes(orig), "KVM modified sregs"


def cr_bits(vcpu, cr4, cpuid):
    sregs = vcpu.get_sregs()
    sregs.cr0, sregs.cr4 = sregs.cr0 & ~(CR0.CD | CR0.NW), sregs.cr4 | cr4
    vcpu.set_sregs(sregs)  # asserts the supported CR4 bits are taken: KvmError otherwise
    ours = vcpu.get_cpuid2() if cpuid else []
    assert bool(sregs.cr4 & CR4.OSXSAVE) == cpu_has(ours, "OSXSAVE"), "KVM did not mirror CR4.OSXSAVE in CPUID"
    assert bool(sregs.cr4 & CR4.PKE) == cpu_has(ours, "OSPKE"), "KVM did not mirror CR4.PKE in CPUID"
    assert (sregs := vcpu.get_sregs()).cr4 == cr4
    invalid_bits(vcpu, sregs, "cr4", CR4_OF.values())
    invalid_bits(vcpu, sregs, "cr0", [1 << i for i in range(32, 64)] + [CR0.NW, CR0.PG])  # NW without CD, PG without PE


def efer_bits(vcpu, efer):
    sregs = vcpu.get_sregs()
    sregs.efer |= efer
    vcpu.set_sregs(sregs)  # asserts the supported EFER bits are taken: KvmError otherwise
    assert (sregs := vcpu.get_sregs()).efer == efer
    invalid_bits(vcpu, sregs, "efer", (EFER.LME, EFER.NX, EFER.SVME, EFER.FFXSR, EFER.AUTOIBRS))


@DEVIATION
def test_without_cpuid_only_the_always_allowed_bits(vm):
    vcpu = vm.create_vcpu()  # no KVM_SET_CPUID2: KVM enforces an empty CPUID all the same
    efer_bits(vcpu, EFER.SCE)
    cr_bits(vcpu, ALWAYS_CR4, cpuid=False)


def test_apic_base_with_reserved_bits_is_refused(machine):
    vcpu = machine("hello").vcpu
    sregs = vcpu.get_sregs()
    sregs.apic_base = 1 << 10
    with pytest.raises(KvmError, match="KVM_SET_SREGS failed: EINVAL"):
        vcpu.set_sregs(sregs)  # invalid
    sregs.apic_base = 1 << 11
    vcpu.set_sregs(sregs)  # asserts a valid one is taken: KvmError otherwise


@DEVIATION
def test_with_the_supported_cpuid_its_bits(kvm, machine):
    vcpu = machine("hello").vcpu  # long mode, the supported CPUID
    cr_bits(vcpu, ALWAYS_CR4 | sum(bit for name, bit in CR4_OF.items() if kvm.cpu_has(name)), cpuid=True)
    efer_bits(vcpu, EFER.SCE | sum(EFER_OF[name] for name in EFER_OF if kvm.cpu_has(name)))
