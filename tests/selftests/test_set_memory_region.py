"""set_memory_region_test (tools/testing/selftests/kvm/set_memory_region_test.c, Linux 6.12, the
newest upstream the sources here have): KVM_RUN with no memory at all ends in an internal error;
unsupported flags are refused by KVM_SET_USER_MEMORY_REGION(2); KVM_CAP_NR_MEMSLOTS slots fit and
one more does not; guest_memfd slots take only a guest_memfd of their own VM at an aligned
offset, and no two overlap in it; a slot moved or deleted under a running vCPU gives it MMIO or
the memory it had, and deleting the slot of its code and page tables ends it. Move and delete run
10 times each, and again with KVM_X86_QUIRK_SLOT_ZAP_ALL disabled where KVM offers that.

Upstream assertions (upstream line: assertion -> line here):
    79-83 vcpu_worker: TEST_ASSERT(!mmio.is_write, mmio.len == 8, mmio.phys_addr) -> 115
    90 vcpu_worker: REPORT_GUEST_ASSERT -> 151, 166
    99, 103 wait_for_vcpu: TEST_ASSERT(clock_gettime, sem_timedwait) -> 128
    128 spawn_vm: TEST_ASSERT(gpa == MEM_REGION_GPA) -> 143
    158-173 guest move: GUEST_ASSERT(1 or MMIO), (1 or 0), (1 or MMIO), EQ(1) -> 75, 77, 79, 81
    244-252 guest delete: GUEST_ASSERT_EQ(MMIO), (0), (MMIO) -> 86, 87, 88
    269 guest delete: GUEST_ASSERT(0) -> 92
    309 TEST_ASSERT(exit SHUTDOWN or INTERNAL_ERROR) -> 166
    320 TEST_ASSERT(final_rip_start <= rip < final_rip_end) -> 169
    340 test_zero_memory_regions: TEST_ASSERT_KVM_EXIT_REASON(INTERNAL_ERROR) -> 175
    374, 382 TEST_ASSERT(EINVAL) from KVM_SET_USER_MEMORY_REGION(2) for each flag -> 190, 200
    392, 398 TEST_ASSERT(EINVAL) for dirty-logged and read-only guest_memfd slots -> 205
    426 TEST_ASSERT(max_mem_slots > 0) -> 212
    443 vm_set_user_memory_region for each slot (kvm_util asserts) -> 217
    456 TEST_ASSERT(EINVAL) for one more slot -> 218
    472 test_invalid_guest_memfd: TEST_ASSERT(EINVAL), 4 cases and 4095 offsets -> 237
    495, 504 vm_set_user_memory_region2 of a good guest_memfd (kvm_util asserts) -> 251, 256
    523-534 vm_set_user_memory_region2: two slots, one deleted (kvm_util asserts) -> 263, 264, 265
    542, 550 TEST_ASSERT(EEXIST) for overlapping guest_memfd bindings -> 267, 269
(mmap's TEST_ASSERTs at 439 and 451 are Python's OSError here; KVM_SET_USER_MEMORY_REGION2's
flags are a test of their own, which kvm_cap skips where the ioctl does not exist: before 6.8.)

Lines: 193 here (Python and guest code, without this docstring, blank and comment lines) for
upstream's 387 (605 with comments and blank lines).
"""

import ctypes
import errno
import mmap
import os
import threading
import time

import pytest

from kvmiso import Source
from kvmiso.guest import Outcome
from kvmiso.kvm import KvmError, abi
from kvmiso.kvm.exits import InternalErrorExit

GPA, SLOT, SIZE, MMIO_VAL = 0xC0000000, 10, 0x200000, 0xBEEF
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)  # Python names it from 3.13
GUEST = Source.c(r"""
#define MEM_REGION_GPA 0xc0000000UL
#define MMIO_VAL 0xbeefUL
volatile unsigned long delete;          /* the host writes it: which test this is */

static unsigned long spin_on(unsigned long spin_val)
{
	unsigned long val;

	do
		val = *(volatile unsigned long *)MEM_REGION_GPA;
	while (val == spin_val);
	GUEST_SYNC(0);
	return val;
}

void main(void)
{
	unsigned long val, idt[2] = {0, 0};

	if (!delete) {
		GUEST_SYNC(0);
		val = spin_on(0);               /* the region starts moving (MMIO while it does) */
		GUEST_ASSERT(val == 1 || val == MMIO_VAL);
		val = spin_on(MMIO_VAL);        /* the move to a misaligned address is done */
		GUEST_ASSERT(val == 1 || val == 0);
		val = spin_on(0);               /* it moves back */
		GUEST_ASSERT(val == 1 || val == MMIO_VAL);
		val = spin_on(MMIO_VAL);
		GUEST_ASSERT_EQ(val, 1);
		return;
	}
	__asm__ volatile("lidt %0" : : "m"(idt));   /* a #PF now ends in a shutdown */
	GUEST_SYNC(0);
	GUEST_ASSERT_EQ(spin_on(0), MMIO_VAL);          /* deleted */
	GUEST_ASSERT_EQ(spin_on(MMIO_VAL), 0);          /* back */
	GUEST_ASSERT_EQ(spin_on(0), MMIO_VAL);          /* deleted again */
	__asm__ volatile("final_rip_start:");
	spin_on(MMIO_VAL);                              /* until the code's slot goes */
	__asm__ volatile("final_rip_end:");
	GUEST_FAIL("the guest outlived its code's memory slot");
}
""")
def zap_quirk(kvm):
    return [False, True] if kvm.check_extension("DISABLE_QUIRKS2") & abi.KVM_X86_QUIRK_SLOT_ZAP_ALL else [False]


class Running:
    """A vCPU thread that runs the guest, answers its MMIO reads of the region with MMIO_VAL and
    signals each GUEST_SYNC (upstream's spawn_vm and vcpu_worker)."""

    def __init__(self, machine, delete, disable_quirk):
        self.m = m = machine(GUEST)
        m.vm.write(m.image.symbols["delete"], int(delete).to_bytes(8, "little"))
        if disable_quirk:
            m.vm.enable_cap("DISABLE_QUIRKS2", abi.KVM_X86_QUIRK_SLOT_ZAP_ALL)
        m.vm.add_memory(GPA, SIZE, slot=SLOT)  # fresh memory: its two pages are zero
        self.ready, self.result, self.error = threading.Semaphore(0), None, None
        self.thread = threading.Thread(target=self.work)
        self.thread.start()
        self.wait()

    def answer(self, exit):
        assert (exit.is_write, exit.length, exit.address) == (False, 8, GPA), f"unexpected {exit}"
        exit.reply(MMIO_VAL.to_bytes(8, "little"))

    def work(self):
        try:
            while (r := self.m.run(timeout=600, stop_at_sync=True, on_mmio=self.answer)).outcome is Outcome.SYNC:
                self.ready.release()
            self.result = r
        except BaseException as e:  # the test's thread raises it
            self.error = e
        self.ready.release()

    def wait(self):
        assert self.ready.acquire(timeout=600) and self.error is None, self.error
        time.sleep(0.1)  # for the vCPU to enter the guest again, as upstream

    def join(self):
        self.thread.join()
        if self.error is not None:
            raise self.error
        return self.result


def test_move_memory_region(kvm, machine):
    for disable_quirk in zap_quirk(kvm):
        for _ in range(10):
            run = Running(machine, False, disable_quirk)
            region = run.m.vm.slots[SLOT]
            assert region.guest_phys_addr == GPA  # where the guest reads it
            run.m.vm.move_memory(SLOT, GPA - 4096)  # misaligned: the guest must not see the 2 below
            region.view[0:8] = (2).to_bytes(8, "little")
            time.sleep(0.1)  # maybe MMIO meanwhile: the sync waits until the region is back
            region.view[0:8] = (1).to_bytes(8, "little")
            run.m.vm.move_memory(SLOT, GPA)
            run.wait()
            run.wait()  # the deferred sync of the misaligned stretch
            run.join().raise_for_guest()


def test_delete_memory_region(kvm, machine):
    for disable_quirk in zap_quirk(kvm):
        for _ in range(10):
            run = Running(machine, True, disable_quirk)
            run.m.vm.delete_memory(SLOT)
            run.wait()
            run.m.vm.add_memory(GPA, SIZE, slot=SLOT)
            run.wait()
            run.m.vm.delete_memory(SLOT)
            run.wait()
            run.m.vm.delete_memory(0)  # the code and the page tables: an emulation error or a shutdown
            r = run.join()
            assert r.outcome in (Outcome.SHUTDOWN, Outcome.INTERNAL_ERROR), r.detail
            if r.outcome is Outcome.INTERNAL_ERROR:
                sym = run.m.image.symbols
                assert sym["final_rip_start"] <= run.m.vcpu.get_regs().rip < sym["final_rip_end"]


def test_zero_memory_regions(vm):
    vcpu = vm.create_vcpu()
    vm.set_nr_mmu_pages(64)
    assert isinstance(vcpu.run(), InternalErrorExit)


def flags_vm(kvm):  # a protected VM where KVM has them; the flags it takes
    protected = kvm.check_extension("VM_TYPES") & 1 << abi.KVM_X86_SW_PROTECTED_VM
    vm = kvm.create_vm(abi.KVM_X86_SW_PROTECTED_VM if protected else 0)
    private = vm.check_extension("MEMORY_ATTRIBUTES") & abi.KVM_MEMORY_ATTRIBUTE_PRIVATE
    return vm, abi.KVM_MEM_LOG_DIRTY_PAGES | abi.KVM_MEM_READONLY | (abi.KVM_MEM_GUEST_MEMFD if private else 0)


def test_invalid_memory_region_flags(kvm):
    vm, supported = flags_vm(kvm)
    with vm:
        for flag in (1 << i for i in range(32)):
            if not supported & flag or flag & abi.KVM_MEM_GUEST_MEMFD:  # the second only in region2
                with pytest.raises(KvmError, match="EINVAL"):
                    vm.set_user_memory_region(0, 0, SIZE, 0, flag)


@pytest.mark.kvm_cap("USER_MEMORY2")  # KVM_SET_USER_MEMORY_REGION2: Linux 6.8 and later
def test_invalid_memory_region2_flags(kvm):
    vm, supported = flags_vm(kvm)
    with vm:
        for flag in (1 << i for i in range(32)):
            if not supported & flag:
                with pytest.raises(KvmError, match="EINVAL"):
                    vm.set_user_memory_region2(0, 0, SIZE, 0, flag)
        if supported & abi.KVM_MEM_GUEST_MEMFD:
            memfd = guest_memfd(vm, SIZE)
            for flag in (abi.KVM_MEM_LOG_DIRTY_PAGES, abi.KVM_MEM_READONLY):  # not with private memory
                with pytest.raises(KvmError, match="EINVAL"):
                    vm.set_user_memory_region2(0, 0, SIZE, 0, flag | abi.KVM_MEM_GUEST_MEMFD, memfd)
            os.close(memfd)


def test_add_max_memory_regions(kvm):
    slots = kvm.check_extension("NR_MEMSLOTS")
    assert slots > 0
    flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE
    with kvm.create_vm() as vm, mmap.mmap(-1, slots * SIZE, flags=flags) as mem:
        base = mmap_address(mem)
        for slot in range(slots):
            vm.set_user_memory_region(slot, slot * SIZE, SIZE, base + slot * SIZE)  # asserts each is taken
        with mmap.mmap(-1, SIZE) as extra, pytest.raises(KvmError, match="EINVAL"):
            vm.set_user_memory_region(slots, slots * SIZE, SIZE, mmap_address(extra))


def mmap_address(m):
    return ctypes.addressof(ctypes.c_char.from_buffer(m))


def guest_memfd(vm, size):
    return vm.ioctl(abi.KVM_CREATE_GUEST_MEMFD, abi.kvm_create_guest_memfd(size=size))


def protected_vm(kvm):
    if not (kvm.check_extension("GUEST_MEMFD") and kvm.check_extension("VM_TYPES") & 1 << abi.KVM_X86_SW_PROTECTED_VM):
        pytest.skip("no KVM_CAP_GUEST_MEMFD with KVM_X86_SW_PROTECTED_VM here")
    return kvm.create_vm(abi.KVM_X86_SW_PROTECTED_VM)


def invalid_guest_memfd(vm, fd, offset=0):
    with pytest.raises(KvmError, match="EINVAL"):
        vm.set_user_memory_region2(SLOT, GPA, SIZE, 0, abi.KVM_MEM_GUEST_MEMFD, fd, offset)


def test_add_private_memory_region(kvm):
    with protected_vm(kvm) as vm, protected_vm(kvm) as vm2:
        invalid_guest_memfd(vm, kvm.fd)  # the KVM fd
        invalid_guest_memfd(vm, vm.fd)  # the VM's fd
        fd = os.memfd_create("kvmiso", os.MFD_CLOEXEC)
        os.ftruncate(fd, SIZE)
        invalid_guest_memfd(vm, fd)  # a plain memfd
        os.close(fd)
        fd = guest_memfd(vm2, SIZE)
        invalid_guest_memfd(vm, fd)  # another VM's guest_memfd
        vm2.set_user_memory_region2(SLOT, GPA, SIZE, 0, abi.KVM_MEM_GUEST_MEMFD, fd)  # asserts it is taken
        os.close(fd)
        fd = guest_memfd(vm, SIZE)
        for offset in range(1, 4096):
            invalid_guest_memfd(vm, fd, offset)  # unaligned
        vm.set_user_memory_region2(SLOT, GPA, SIZE, 0, abi.KVM_MEM_GUEST_MEMFD, fd)  # asserts it is taken
        os.close(fd)


def test_add_overlapping_private_memory_regions(kvm):
    with protected_vm(kvm) as vm:
        fd = guest_memfd(vm, SIZE * 4)
        vm.set_user_memory_region2(SLOT, GPA, SIZE * 2, 0, abi.KVM_MEM_GUEST_MEMFD, fd)  # asserts it is taken
        vm.set_user_memory_region2(SLOT + 1, GPA * 2, SIZE * 2, 0, abi.KVM_MEM_GUEST_MEMFD, fd, SIZE * 2)  # asserts so
        vm.set_user_memory_region2(SLOT, GPA, 0, 0, abi.KVM_MEM_GUEST_MEMFD)  # asserts deleting it, to add it again below
        for gpa in (GPA * 2 - SIZE, GPA * 2 + SIZE):  # the front half of the other slot, then the back half
            with pytest.raises(KvmError) as e:
                vm.set_user_memory_region2(SLOT, gpa, SIZE * 2, 0, abi.KVM_MEM_GUEST_MEMFD, fd)
            assert e.value.errno == errno.EEXIST
        os.close(fd)
