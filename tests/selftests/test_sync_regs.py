"""x86/sync_regs_test (tools/testing/selftests/kvm/x86_64/sync_regs_test.c, Linux 6.12, as
upstream is today): KVM_CAP_SYNC_REGS. KVM_RUN refuses unknown kvm_valid_regs/kvm_dirty_regs
bits; copies regs, sregs and events out to ``kvm_run.s.regs`` for each valid bit and in for each
dirty bit, and leaves them alone otherwise; and survives a thread changing them (CR4.PAE, an
exception vector, an exception both pending and injected) while it reads them.

Upstream assertions (upstream line: assertion -> line here):
    48 compare_regs: REG_COMPARE(rax ... rflags), called at 264 and 302 -> 59
    178 race_sync_regs: TEST_ASSERT(CR4.PAE && EFER.LME) -> 157
    184 TEST_ASSERT_EQ(pthread_create(...), 0) -> 160
    194 vcpu_load_state (kvm_util asserts each ioctl) -> 169
    202-203 TEST_ASSERT_EQ(pthread_cancel, pthread_join, 0) -> 176
    216, 223 read_invalid: TEST_ASSERT(rv < 0 && errno == EINVAL) -> 74
    237, 244 set_invalid: TEST_ASSERT(rv < 0 && errno == EINVAL) -> 74
    261-377 TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO), after each of 8 runs -> 55
    294 set_and_verify_various: TEST_ASSERT(s.regs.regs.rbx == 0xBAD1DEA + 1) -> 91
    297 TEST_ASSERT(s.regs.sregs.apic_base == 1 << 11) -> 92
    323 clear_kvm_dirty_regs_bits: TEST_ASSERT(s.regs.regs.rbx != 0xDEADBEEF) -> 100
    350 clear_kvm_valid_and_dirty_regs: TEST_ASSERT(s.regs.regs.rbx == 0xAAAA) -> 112
    354 TEST_ASSERT(regs.rbx == 0xBAC0 + 1) -> 113
    378 clear_kvm_valid_regs_bits: TEST_ASSERT(s.regs.regs.rbx == 0xBBBB) -> 122
    382 TEST_ASSERT(regs.rbx == 0xBBBB + 1) -> 123
(compare_sregs and compare_vcpu_events are empty upstream; TEST_REQUIRE at 407-408 is the
fixture's skip.)

Lines: 118 here (Python and guest code, without this docstring, blank and comment lines) for
upstream's 288 (411 with comments and blank lines).
"""

import contextlib
import threading
import time

import pytest

from kvmiso import Source
from kvmiso.kvm import KvmError, abi
from kvmiso.kvm.exits import IoExit, ShutdownExit
from kvmiso.kvm.x86 import CR4, EFER

FIELDS = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS | abi.KVM_SYNC_X86_EVENTS
INVALID = 0x80000000
GUEST = Source.asm(r"""
        .include "kvmiso.inc"
        .globl main
main:   mov $0x1000, %dx                # an exit to userspace that keeps every register
1:      in %dx, %al
        add $1, %rbx
        jmp 1b
""")


def run_io(vcpu):
    exit = vcpu.run()
    assert isinstance(exit, IoExit), f"wanted KVM_EXIT_IO, got {exit}"


def same_regs(left, right):
    assert {n: getattr(left, n) for n, _ in left._fields_} == {n: getattr(right, n) for n, _ in right._fields_}


@pytest.fixture
def vcpu(kvm, machine):
    cap = kvm.check_extension("SYNC_REGS")
    if cap & FIELDS != FIELDS or cap & INVALID:
        pytest.skip(f"KVM_CAP_SYNC_REGS is {cap:#x}: not the regs, sregs and events fields alone")
    return machine(GUEST, "long").vcpu


@pytest.mark.parametrize("field", ["kvm_valid_regs", "kvm_dirty_regs"])
def test_invalid_fields_are_refused(vcpu, field):
    for bits in (INVALID, INVALID | FIELDS):
        setattr(vcpu.kvm_run, field, bits)
        with pytest.raises(KvmError, match="KVM_RUN failed: EINVAL"):
            vcpu.run()
        setattr(vcpu.kvm_run, field, 0)


def test_valid_fields_are_the_vcpu_s(vcpu):
    vcpu.kvm_run.kvm_valid_regs = FIELDS
    run_io(vcpu)
    same_regs(vcpu.get_regs(), vcpu.sync_regs.regs)


def test_dirty_fields_are_loaded(vcpu):
    vcpu.kvm_run.kvm_valid_regs = FIELDS
    run_io(vcpu)
    vcpu.sync_regs.regs.rbx, vcpu.sync_regs.sregs.apic_base = 0xBAD1DEA, 1 << 11
    vcpu.kvm_run.kvm_dirty_regs = abi.KVM_SYNC_X86_REGS | abi.KVM_SYNC_X86_SREGS
    run_io(vcpu)
    assert vcpu.sync_regs.regs.rbx == 0xBAD1DEA + 1
    assert vcpu.sync_regs.sregs.apic_base == 1 << 11
    same_regs(vcpu.get_regs(), vcpu.sync_regs.regs)


def test_without_dirty_fields_the_guest_s_overwrite_them(vcpu):
    vcpu.kvm_run.kvm_valid_regs, vcpu.kvm_run.kvm_dirty_regs = FIELDS, 0
    vcpu.sync_regs.regs.rbx = 0xDEADBEEF
    run_io(vcpu)
    assert vcpu.sync_regs.regs.rbx != 0xDEADBEEF


def test_without_valid_or_dirty_fields_neither_side_changes(vcpu):
    vcpu.kvm_run.kvm_valid_regs = FIELDS
    run_io(vcpu)
    vcpu.kvm_run.kvm_valid_regs = vcpu.kvm_run.kvm_dirty_regs = 0
    vcpu.sync_regs.regs.rbx = 0xAAAA
    regs = vcpu.get_regs()
    regs.rbx = 0xBAC0
    vcpu.set_regs(regs)
    run_io(vcpu)
    assert vcpu.sync_regs.regs.rbx == 0xAAAA
    assert vcpu.get_regs().rbx == 0xBAC0 + 1


def test_dirty_without_valid_fields_loads_and_leaves_them(vcpu):
    vcpu.kvm_run.kvm_valid_regs = FIELDS
    run_io(vcpu)
    vcpu.kvm_run.kvm_valid_regs, vcpu.kvm_run.kvm_dirty_regs = 0, FIELDS
    vcpu.sync_regs.regs.rbx = 0xBBBB
    run_io(vcpu)
    assert vcpu.sync_regs.regs.rbx == 0xBBBB
    assert vcpu.get_regs().rbx == 0xBBBB + 1


def race_cr4(run, stop):
    cr4 = run.s.regs.sregs.cr4
    while not stop.is_set():
        run.kvm_dirty_regs = abi.KVM_SYNC_X86_SREGS
        run.s.regs.sregs.cr4 = cr4  # EFER.LME with CR4.PAE clear is invalid state, below
        run.s.regs.sregs.cr4 = cr4 & ~CR4.PAE


def race_exc(run, stop):
    events = run.s.regs.events
    while not stop.is_set():
        run.kvm_dirty_regs = abi.KVM_SYNC_X86_EVENTS
        events.flags, events.exception.nr, events.exception.pending = 0, 6, 1  # #UD
        events.exception.nr = 255  # a vector KVM must refuse


def race_inj_pen(run, stop):
    events = run.s.regs.events
    events.exception.nr = 6
    while not stop.is_set():
        run.kvm_dirty_regs = abi.KVM_SYNC_X86_EVENTS
        events.flags, events.exception.injected, events.exception.pending = 0, 1, 1  # both: KVM drops the pending one


@pytest.mark.parametrize("racer", [race_cr4, race_exc, race_inj_pen], ids=lambda r: r.__name__)
def test_kvm_survives_a_thread_changing_sync_regs_under_it(vcpu, racer):
    run = vcpu.kvm_run
    run.kvm_valid_regs = abi.KVM_SYNC_X86_SREGS
    vcpu.run()
    run.kvm_valid_regs = 0
    state = vcpu.save_state()  # before the thread mucks with the vCPU
    assert run.s.regs.sregs.cr4 & CR4.PAE and run.s.regs.sregs.efer & EFER.LME, "the vCPU should be in long mode"
    stop = threading.Event()
    thread = threading.Thread(target=racer, args=(run, stop))
    thread.start()  # asserts it starts: RuntimeError otherwise
    try:
        deadline = time.monotonic() + 2  # seconds of racing, as upstream: a duration, never asserted
        while time.monotonic() < deadline:
            try:
                exit = vcpu.run()
            except KvmError:
                continue  # KVM refused what the thread wrote: allowed (upstream ignores the error)
            if isinstance(exit, ShutdownExit):  # #GPs injected: back to a known good state
                vcpu.load_state(state)  # asserts it loads, as vcpu_load_state does
            if racer is race_cr4:
                with contextlib.suppress(KvmError):
                    vcpu.translate(0)
    finally:
        stop.set()
        thread.join(timeout=60)
    assert not thread.is_alive()
