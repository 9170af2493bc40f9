"""The ioctls the KVM selftests use, through kvmiso's typed wrappers, on the real /dev/kvm: memory
slots the caller backs, moves and deletes (``Vm.slots`` follows), KVM_SET_NR_MMU_PAGES,
KVM_X86_SET_MSR_FILTER, KVM_GET_CPUID2's E2BIG, the guest-debug injections, debug registers, XSAVE,
XCRs, MP state, a vCPU's whole state saved and loaded, the raw escapes, ``cpu_has`` and the
CR0/CR4/EFER bits. tests/selftests/ port upstream tests that use them the way they do."""

from __future__ import annotations

import errno
import mmap

import pytest

from kvmiso import Source
from kvmiso.kvm import KvmError, MsrFilterRange, abi
from kvmiso.kvm.x86 import CR0, CR4, EFER, X86_FEATURES, cpuid_entry

from selftests.facts import cpuid2_buffer, msr_index_list_has_one_kvm_refuses, svm_without_nrips

MSR_GS_BASE = 0xC0000101

READ_AT_SCRATCH = Source.asm(r"""
        .include "kvmiso.inc"
        .globl main
main:   mov SCRATCH + 0x200000, %eax    # the slot the test adds, then moves
        REPORT 0, %eax
        ret
""")


def test_a_slot_of_the_caller_s_memory_is_moved_and_deleted_and_vm_slots_follows(machine):
    m = machine(READ_AT_SCRATCH, "long")
    buf = mmap.mmap(-1, 2 << 20)  # the caller's: the VM must not unmap it
    buf[0x1000:0x1004] = (0xCAFE).to_bytes(4, "little")
    gpa = 0x300000  # SCRATCH + 2 MiB
    s = m.vm.add_memory(gpa - 0x1000, 2 << 20, slot=5, memory=buf)
    assert m.vm.slots[5] is s and not s.owned and m.vm.read(gpa, 4) == buf[0x1000:0x1004]
    assert m.run().report(0) == 0xCAFE
    with pytest.raises(ValueError, match="overlaps slot 0"):
        m.vm.move_memory(5, 0)
    m.vm.move_memory(5, gpa)  # now the guest sees the buffer's first page there
    assert (m.vm.slots[5].guest_phys_addr, m.vm.slot_for(gpa)) == (gpa, s)
    m.reset()
    assert m.run().report(0) == 0
    m.vm.delete_memory(5)
    assert 5 not in m.vm.slots
    m.reset()
    assert m.run().report(0) == 0xFFFFFFFF  # an MMIO read now, answered all-ones
    buf[0:4] = b"kept"  # still the caller's, still mapped
    with pytest.raises(ValueError, match="page"):
        m.vm.add_memory(gpa, 0x1000, memory=bytearray(0x2000))  # not page-aligned


def test_set_nr_mmu_pages_takes_64_and_refuses_fewer(vm):
    vm.set_nr_mmu_pages(64)
    with pytest.raises(KvmError, match="KVM_SET_NR_MMU_PAGES failed: EINVAL"):
        vm.set_nr_mmu_pages(1)


@pytest.mark.kvm_cap("X86_USER_SPACE_MSR", "X86_MSR_FILTER")
def test_an_msr_the_filter_denies_goes_to_userspace(machine):
    m = machine(Source.asm(r"""
        .include "kvmiso.inc"
        .globl main
main:   mov $0xc0000101, %ecx           # MSR_GS_BASE
        rdmsr
        REPORT 0, %eax
        ret
"""), "long")
    m.vm.enable_cap("X86_USER_SPACE_MSR", abi.KVM_MSR_EXIT_REASON_FILTER)
    m.vm.set_msr_filter([MsrFilterRange.allowing(abi.KVM_MSR_FILTER_READ, 0xC0000000, 0x200, deny=[MSR_GS_BASE])])
    seen = []
    r = m.run(on_msr=lambda e: (seen.append((e.index, e.msr_reason)), e.reply(0x1234)))
    assert seen == [(MSR_GS_BASE, abi.KVM_MSR_EXIT_REASON_FILTER)] and r.report(0) == 0x1234
    with pytest.raises(KvmError, match="KVM_X86_SET_MSR_FILTER failed: EINVAL"):
        m.vm.set_msr_filter(flags=1 << 5)


def test_get_cpuid2_says_e2big_while_the_buffer_is_too_small(vm):
    vcpu = vm.create_vcpu()
    entries = vm.kvm.get_supported_cpuid()
    vcpu.set_cpuid2(entries)
    # the wrapper grows its buffer past E2BIG (the values: see selftests/test_cpuid.py)
    assert [(e.function, e.index) for e in vcpu.get_cpuid2()] == [(e.function, e.index) for e in entries]
    small = cpuid2_buffer(4)
    with pytest.raises(KvmError) as e:
        vcpu.ioctl(abi.KVM_GET_CPUID2, small)
    assert e.value.errno == errno.E2BIG  # (nent: written on E2BIG before Linux 6.x, left alone since)


@pytest.mark.parametrize("inject", [pytest.param("inject_bp", marks=pytest.mark.kvm_deviation(
    svm_without_nrips, "a soft exception cannot be injected: the #BP is lost", raises=AttributeError)), "inject_db"])
def test_guest_debug_injects_an_exception_into_the_guest(machine, inject):
    m = machine("hello", "long")
    m.vcpu.set_guest_debug(**{inject: True})
    r = m.run()
    assert (r.exception.vector, r.exception.rip) == ({"inject_bp": 3, "inject_db": 1}[inject], m.image.entry)


def test_debugregs_xsave_xcrs_and_mp_state_read_back_what_was_set(vm):
    vm.create_irqchip()  # a vCPU may halt only with KVM's local APIC
    vcpu = vm.create_vcpu()
    dr = vcpu.get_debugregs()
    dr.db[0], dr.dr7 = 0x1234, 0x401
    vcpu.set_debugregs(dr)
    assert (vcpu.get_debugregs().db[0], vcpu.get_debugregs().dr7) == (0x1234, 0x401)
    assert vcpu.get_mp_state() == abi.KVM_MP_STATE_RUNNABLE
    vcpu.set_mp_state(abi.KVM_MP_STATE_HALTED)
    assert vcpu.get_mp_state() == abi.KVM_MP_STATE_HALTED
    area = vcpu.get_xsave()
    assert len(area) == max(4096, vm.check_extension("XSAVE2"))
    fcw = (0x37A).to_bytes(2, "little")  # the legacy area opens with the x87 control word
    vcpu.set_xsave(fcw + area[2:512] + bytes([area[512] | 1]) + area[513:])  # XSTATE_BV.x87: load it
    assert vcpu.get_xsave()[:2] == fcw and vcpu.get_fpu().fcw == 0x37A
    xcrs = vcpu.get_xcrs()
    vcpu.set_xcrs(xcrs)
    assert xcrs.nr_xcrs == 0 or (xcrs.xcrs[0].xcr, xcrs.xcrs[0].value & 1) == (0, 1)  # XCR0.x87 is always set


@pytest.mark.kvm_deviation(msr_index_list_has_one_kvm_refuses,
                           "KVM_SET_MSRS refuses a value KVM_GET_MSRS read of an MSR of KVM_GET_MSR_INDEX_LIST",
                           raises=KvmError)
def test_a_saved_state_loads_back_and_the_guest_runs_again_from_it(machine):
    m = machine("hello", "long")
    state = m.vcpu.save_state()
    assert set(state.msrs) == set(m.kvm.get_msr_index_list())
    assert m.run().console_text == "Hello from a kvmiso guest!\n"
    m.vcpu.load_state(state)
    assert m.vcpu.get_regs().rip == m.image.entry
    assert m.run().console_text == "Hello from a kvmiso guest!\n"


def test_every_part_of_a_saved_state_but_a_refused_msr_loads_back(machine):
    # the same round trip where KVM refuses an MSR of its own list (the test above): without it
    m = machine("hello", "long")
    state = m.vcpu.save_state()
    for index, value in list(state.msrs.items()):
        try:
            m.vcpu.set_msrs({index: value})
        except KvmError:
            del state.msrs[index]
    assert m.run().ok
    m.vcpu.load_state(state)
    assert bytes(m.vcpu.get_regs()) == bytes(state.regs) and bytes(m.vcpu.get_sregs()) == bytes(state.sregs)
    # not the TSC, nor Hyper-V's counters (VP_RUNTIME, TIME_REF_COUNT): they count on
    msrs = [i for i in state.msrs if i not in (0x10, 0x40000010, 0x40000020)]
    assert m.vcpu.get_msrs(msrs) == {i: state.msrs[i] for i in msrs}
    assert m.run().console_text == "Hello from a kvmiso guest!\n"


def test_the_raw_escapes_reach_each_fd(kvm, vm):
    assert kvm.ioctl(abi.KVM_CHECK_EXTENSION, abi.capability_number("SYNC_REGS")) == kvm.check_extension("SYNC_REGS")
    assert vm.ioctl(abi.KVM_SET_NR_MMU_PAGES, 64) == 0
    vcpu = vm.create_vcpu()
    regs = abi.kvm_regs()
    assert vcpu.ioctl(abi.KVM_GET_REGS, regs) == 0 and regs.rip == vcpu.get_regs().rip
    with pytest.raises(KvmError, match="^KVM_GET_SREGS failed: EFAULT"):
        vcpu.ioctl(abi.KVM_GET_SREGS, 0)  # an int is passed as it is: a NULL pointer here


def test_cpu_has_reads_the_supported_cpuid_by_feature_name(kvm):
    leaf1 = cpuid_entry(kvm.get_supported_cpuid(), 1)
    assert kvm.cpu_has("XSAVE") == bool(leaf1.ecx >> 26 & 1) == kvm.cpu_has("x86_feature_xsave")
    assert kvm.cpu_has("LM")  # every x86-64 KVM offers long mode
    assert X86_FEATURES["LA57"] == (7, 0, "ecx", 16)
    with pytest.raises(KeyError, match="no X86_FEATURE_NOPE"):
        kvm.cpu_has("NOPE")


def test_control_register_bits_are_flags(vm):
    sregs = vm.create_vcpu().get_sregs()
    assert CR0(sregs.cr0) & CR0.ET and not CR0(sregs.cr0) & CR0.PE  # a reset vCPU: real mode
    assert CR4.PAE | CR4.OSXSAVE == (1 << 5) | (1 << 18) and EFER.LME == 1 << 8
    assert str(CR4.PAE.name) == "PAE"
