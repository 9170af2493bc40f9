"""The ioctl layer on the real device: every VM and vCPU ioctl kvmiso wraps."""

from __future__ import annotations

import errno
import mmap
import os

import pytest

from kvmiso.guest import Machine
from kvmiso.kvm import KvmError, abi
from kvmiso.kvm._fd import map_into, mapping_cell, release_mapping
from kvmiso.kvm._libc import ioctl
from kvmiso.kvm.exits import HltExit, IoExit, MemoryFaultExit


def real_mode_vcpu(vm, code: bytes, at: int = 0x1000):
    """A vCPU at CS:IP = 0:``at`` in real mode, running ``code``."""
    vm.write(at, code)
    vcpu = vm.create_vcpu()
    sregs = vcpu.get_sregs()
    sregs.cs.base = sregs.cs.selector = 0
    vcpu.set_sregs(sregs)
    regs = vcpu.get_regs()
    regs.rip, regs.rflags = at, 2
    vcpu.set_regs(regs)
    return vcpu


def test_system_queries(kvm):
    assert kvm.api_version == 12
    assert kvm.vcpu_mmap_size >= 4096
    assert kvm.check_extension("IMMEDIATE_EXIT") == 1
    assert kvm.check_extension("KVM_CAP_USER_MEMORY") == 1  # the C spelling works too
    with pytest.raises(ValueError, match="unknown KVM capability"):
        kvm.check_extension("NO_SUCH_CAP")
    leaves = kvm.get_supported_cpuid()
    assert any(e.function == 0 for e in leaves) and len(leaves) > 10
    msrs = kvm.get_msr_index_list()
    assert 0x174 in msrs  # IA32_SYSENTER_CS is always saved/restored


def test_ioeventfd_write_never_reaches_userspace(kvm):
    # out %al,$0x80 ; out %al,$0x81 ; hlt -- 0x80 is an ioeventfd, 0x81 an exit
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vcpu = real_mode_vcpu(vm, bytes([0xE6, 0x80, 0xE6, 0x81, 0xF4]))
        efd = vm.ioeventfd(0x80, 1)
        e = vcpu.run()
        assert isinstance(e, IoExit) and e.port == 0x81  # 0x80 was handled in the kernel
        assert os.eventfd_read(efd) == 1
        assert isinstance(vcpu.run(), HltExit)


def test_dirty_log_reports_written_pages(kvm):
    # mov %al,0x5000 ; mov %al,0x7123 ; hlt
    code = bytes([0xA2, 0x00, 0x50, 0xA2, 0x23, 0x71, 0xF4])
    with kvm.create_vm() as vm:
        slot = vm.add_memory(0, 0x10000, log_dirty=True)
        vcpu = real_mode_vcpu(vm, code)
        vm.get_dirty_log(slot.slot)  # start clean
        assert isinstance(vcpu.run(), HltExit)
        dirty = vm.get_dirty_log(slot.slot)
        assert 0x5000 in dirty and 0x7000 in dirty
        assert 0x6000 not in dirty and 0x2000 not in dirty
        assert vm.get_dirty_log(slot.slot) == []  # the log was cleared by reading it


def test_irqchip_and_irq_line(kvm):
    with kvm.create_vm() as vm:
        vm.create_irqchip()
        vm.irq_line(4, 1)
        vm.irq_line(4, 0)
        with pytest.raises(KvmError) as info:
            vm.create_irqchip()  # only one per VM
        assert info.value.ioctl == "KVM_CREATE_IRQCHIP"


def test_tss_and_identity_map_addresses(kvm):
    with kvm.create_vm() as vm:
        vm.set_identity_map_addr(0xFEFFC000)  # before any vCPU, as the API requires
        vm.set_tss_addr(0xFFFBD000)
        vm.create_vcpu()
        with pytest.raises(KvmError) as info:
            vm.set_identity_map_addr(0xFEFFC000)  # after a vCPU exists: refused
        assert info.value.errno == errno.EINVAL


def test_vcpu_state_round_trips(kvm):
    with Machine("hello", mode="long", kvm=kvm) as m:
        v = m.vcpu
        fpu = v.get_fpu()
        fpu.xmm[3][0] = 0x5A
        v.set_fpu(fpu)
        assert v.get_fpu().xmm[3][0] == 0x5A
        v.set_msrs({0x174: 0x10})
        assert v.get_msrs([0x174]) == {0x174: 0x10}
        with pytest.raises(KvmError, match="MSR 0xdeadbeef was refused"):
            v.set_msrs({0x174: 0x10, 0xDEADBEEF: 1})  # no such MSR: the error names it, not the first
        # IA32_ARCH_CAPABILITIES is refused on some hosts (kvm_pvm's builds seen so far) and taken on
        # others: either way the answer is exact, a refusal names the MSR and a write reads back
        try:
            v.set_msrs({0x10A: 1})
        except KvmError as e:
            assert "MSR 0x10a was refused" in str(e)
        else:
            assert v.get_msrs([0x10A]) == {0x10A: 1}
        ev = v.get_vcpu_events()
        v.set_vcpu_events(ev)
        assert v.get_vcpu_events().exception.injected == 0
        cpuid = v.get_cpuid2()
        assert {e.function for e in cpuid} == {e.function for e in kvm.get_supported_cpuid()}
        sregs = v.get_sregs()
        assert sregs.cr3 == 0x12000 and sregs.efer & 0x400  # long mode active
        t = v.translate(0x8000)
        assert t.valid and t.physical_address == 0x8000
        assert not v.translate(0x1_0000_0000).valid  # past the 4 GiB identity map


def test_immediate_exit_returns_intr_without_running(kvm):
    with Machine("hello", mode="long", kvm=kvm) as m:
        m.vcpu.immediate_exit = True
        assert m.vcpu.run().name == "INTR"
        m.vcpu.immediate_exit = False
        assert m.run(timeout=5).ok


def test_stats_fd_for_vm_and_vcpu(kvm):
    with Machine("portio", mode="long", kvm=kvm) as m:
        with m.vm.stats() as vs, m.vcpu.stats() as cs:
            assert vs.id.startswith("kvm-") and cs.id.endswith("/vcpu-0")
            assert "exits" in cs and cs.desc("exits").type == "cumulative"
            hist = [d for d in cs.descriptors if d.is_histogram]
            assert hist and all(d.size > 1 for d in hist)
            before = cs.snapshot()
            r = m.run(timeout=5)
            delta = cs.snapshot() - before
    assert delta["exits"] >= r.runs


def test_an_argument_of_another_size_than_the_request_encodes_is_refused(kvm):
    # as kvm_util's kvm_do_ioctl asserts _IOC_SIZE(cmd) == sizeof(*arg): a struct kvm_sregs
    # handed to KVM_GET_REGS would have the kernel write a kvm_regs into it (or, the other way
    # round, past its end)
    with Machine("hello", mode="long", kvm=kvm) as m:
        with pytest.raises(TypeError, match=r"KVM_GET_REGS takes a 144-byte argument .* not a \d+-byte kvm_sregs"):
            ioctl(m.vcpu.fd, abi.KVM_GET_REGS, abi.kvm_sregs())
        # structs with a flexible array are checked by their header: these go through
        assert m.vcpu.get_msrs([0x10])[0x10] >= 0
        assert kvm.get_msr_index_list() and m.vcpu.get_cpuid2()


def _vcpu_mappings() -> int:
    with open("/proc/self/maps") as f:
        return sum("anon_inode:kvm-vcpu" in line for line in f)


def test_a_vcpu_is_a_context_manager_that_releases_its_fd_and_page(kvm):
    with kvm.create_vm() as vm:
        with vm.create_vcpu() as vcpu:
            fd = vcpu.fd
            assert os.readlink(f"/proc/self/fd/{fd}") == "anon_inode:kvm-vcpu:0" and _vcpu_mappings() == 1
        assert vcpu.fd == -1 and repr(vcpu) == "<Vcpu fd=-1>" and _vcpu_mappings() == 0
        assert not os.path.exists(f"/proc/self/fd/{fd}") or os.readlink(f"/proc/self/fd/{fd}") != "anon_inode:kvm-vcpu:0"
        vm.create_vcpu(1)  # the VM goes on; it closes this one with itself
    assert vm.fd == -1 and _vcpu_mappings() == 0


PROT_NONE = 0  # the mmap module names it from Python 3.13


def test_a_kvm_run_that_faults_on_guest_memory_is_a_memory_fault_exit_where_kvm_reports_one(kvm):
    # a slot whose host memory is PROT_NONE: KVM cannot fault the guest's read in, and KVM_RUN
    # fails with EFAULT. A kernel that reports it (KVM_EXIT_MEMORY_FAULT, as for guest_memfd)
    # gives MemoryFaultExit; one that does not (6.18 kvm_pvm: error pfns are not annotated)
    # leaves a plain EFAULT, which must stay an error
    gpa = 0x40000000  # where the unbacked payload reads (1 GiB), inside the guest's identity map
    backing = mapping_cell(4096)
    try:
        with Machine("unbacked", mode="long", cpl=3, kvm=kvm) as m:
            addr = map_into(backing, PROT_NONE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            m.vm.set_user_memory_region(5, gpa, 4096, addr)
            try:
                exits = [m.vcpu.run() for _ in range(64)]
            except KvmError as e:
                assert e.errno == errno.EFAULT and m.vcpu.kvm_run.exit_reason != abi.KVM_EXIT_MEMORY_FAULT
            else:
                assert [e for e in exits if isinstance(e, MemoryFaultExit)][0].gpa == gpa
    finally:
        release_mapping(backing)
