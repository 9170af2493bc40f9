"""x86/cpuid_test (tools/testing/selftests/kvm/x86/cpuid_test.c, upstream 6574f01ef95d, which
masks the runtime bits and toggles CR4 since Linux 6.12): a vCPU given the supported CPUID
reads it back with KVM_GET_CPUID2 (but for the bits KVM changes at run time), its guest's CPUID
instruction answers the same, and KVM's own leaf says 0x40000001; after KVM_RUN only the same
CPUID is taken again; KVM_GET_CPUID2 says E2BIG, nent untouched, while there is no room.

Upstream assertions (upstream line: assertion -> line here):
    37-40 GUEST_ASSERT_EQ(eax/ebx/ecx/edx, entries[i]) -> 50, 51, 52, 53
    53 GUEST_ASSERT_EQ(MAX_KVM_LEAF, 0x40000001) -> 57
    89 TEST_ASSERT(cpuid1->nent == cpuid2->nent) -> 85
    98 TEST_ASSERT(function, index, flags equal) -> 87
    107 TEST_ASSERT(masked values equal) -> 88
    128 run_vcpu: TEST_ASSERT(args "hello", stage + 1) -> 78
    133-139 run_vcpu: UCALL_DONE, REPORT_GUEST_ASSERT, unexpected exit -> 77
    164 TEST_ASSERT(!rc, "Setting unmodified CPUID after KVM_RUN failed") -> 97
    178 TEST_ASSERT(!rc, ... after the CR4 toggles) -> 101
    185 TEST_ASSERT(rc, "Changing CPU features should fail") -> 104
    194 TEST_ASSERT(rc, "Changing MAXPHYADDR should fail") -> 104
    204 TEST_ASSERT(nent updated on success) -> 114
    211 TEST_ASSERT(r && errno == E2BIG) -> 117
    212 TEST_ASSERT(cpuid->nent == i, "KVM modified nent on failure") -> 119

Lines: 75 here (Python and guest code, without this docstring, blank and comment lines) for
upstream's 152 (208 with comments and blank lines), counted in Linux 6.12's cpuid_test.c.
"""

import dataclasses
import struct

import pytest

from kvmiso import Source
from kvmiso.kvm import KvmError, abi
from kvmiso.kvm.x86 import CR4, feature

from .facts import cpuid2_buffer, get_cpuid2_differs_from_set, get_cpuid2_keeps_nent_on_success

GUEST = Source.c(r"""
struct entry { unsigned int function, index, flags, eax, ebx, ecx, edx, padding[3]; };

void main(void)
{
	const unsigned int *nent = (const unsigned int *)SCRATCH;   /* struct kvm_cpuid2, the host's copy */
	const struct entry *e = (const struct entry *)(SCRATCH + 8);
	unsigned int eax, ebx, ecx, edx;

	GUEST_SYNC(1);
	for (unsigned int i = 0; i < *nent; i++, e++) {
		cpuid(e->function, e->index, &eax, &ebx, &ecx, &edx);
		GUEST_ASSERT_EQ(eax, e->eax);
		GUEST_ASSERT_EQ(ebx, e->ebx);
		GUEST_ASSERT_EQ(ecx, e->ecx);
		GUEST_ASSERT_EQ(edx, e->edx);
	}
	GUEST_SYNC(2);
	cpuid(0x40000000, 0, &eax, &ebx, &ecx, &edx);
	GUEST_ASSERT_EQ(eax, 0x40000001);   /* the largest KVM leaf */
}
""")
SCRATCH = 0x100000  # the guest's copy of the vCPU's CPUID (struct kvm_cpuid2), as kvmiso.h says


def const(e):  # the entry without the bits KVM changes at run time (OSXSAVE, OSPKE, the XSAVE sizes)
    regs = dataclasses.asdict(e)
    for f in (feature("OSXSAVE"), feature("OSPKE")):
        if (e.function, e.index) == (f.function, f.index):
            regs[f.reg] &= ~(1 << f.bit)
    regs["ebx"] *= not (e.function == 0xD and e.index < 2)
    return regs


def guest_runs(machine, check=True):
    m = machine(GUEST)
    entries = m.vcpu.get_cpuid2()  # what selftests copy into the guest (vcpu_alloc_cpuid)
    m.vm.write(SCRATCH, struct.pack("<II", len(entries), 0) +
               b"".join(struct.pack("<7I12x", *dataclasses.astuple(e)) for e in entries))
    for stage, sync in enumerate(m.syncs() if check else m.run().syncs):  # a guest that fails raises here
        assert sync.value == stage + 1, f"Stage {stage + 1}: unexpected sync {sync.value}"
    return m, entries


@pytest.mark.kvm_deviation(get_cpuid2_differs_from_set, "KVM_GET_CPUID2 gives other values", raises=AssertionError)
def test_the_vcpu_reads_back_the_supported_cpuid(kvm, machine):
    supported, ours = kvm.get_supported_cpuid(), machine("hello").vcpu.get_cpuid2()
    assert len(supported) == len(ours), "CPUID nent mismatch"
    for i, (e1, e2) in enumerate(zip(supported, ours)):
        assert (e1.function, e1.index, e1.flags) == (e2.function, e2.index, e2.flags), f"CPUID entries[{i}] mismatch"
        assert const(e1) == const(e2), f"CPUID {e1.function:#x}.{e1.index:x} differ"


def test_the_guest_s_cpuid_is_the_vcpu_s(machine):
    guest_runs(machine)


def test_after_kvm_run_only_the_same_cpuid_is_taken(kvm, machine):
    m, entries = guest_runs(machine, check=False)
    m.vcpu.set_cpuid2(entries)  # asserts the unmodified CPUID is taken after KVM_RUN
    sregs = m.vcpu.get_sregs()
    sregs.cr4 ^= (CR4.OSXSAVE if kvm.cpu_has("XSAVE") else 0) | (CR4.PKE if kvm.cpu_has("PKU") else 0)
    m.vcpu.set_sregs(sregs)
    m.vcpu.set_cpuid2(entries)  # asserts it still is, with the runtime bits changed
    for leaf, change in ((7, lambda e: dict(ebx=(e.ebx - 1) & 0xFFFFFFFF)),  # CPU features, then MAXPHYADDR
                         (0x80000008, lambda e: dict(eax=e.eax & ~0xFF | (e.eax & 0xFF) - 1))):
        with pytest.raises(KvmError, match="KVM_SET_CPUID2 failed: EINVAL"):
            m.vcpu.set_cpuid2([dataclasses.replace(e, **change(e)) if (e.function, e.index) == (leaf, 0) else e for e in entries])


@pytest.mark.kvm_deviation(get_cpuid2_keeps_nent_on_success, "nent written on E2BIG, not on success", raises=AssertionError)
def test_get_cpuid2_says_e2big_without_room_for_every_entry(machine):
    vcpu = machine("hello").vcpu
    n = len(vcpu.get_cpuid2())
    buf = cpuid2_buffer(n + 1)
    vcpu.ioctl(abi.KVM_GET_CPUID2, buf)
    assert buf.hdr.nent == n, "KVM didn't update nent on success"
    for i in range(n):
        buf.hdr.nent = i
        with pytest.raises(KvmError) as e:
            vcpu.ioctl(abi.KVM_GET_CPUID2, buf)
        assert e.value.errno_name == "E2BIG" and buf.hdr.nent == i, "KVM modified nent on failure"
