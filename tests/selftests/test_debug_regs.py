"""x86/debug_regs (tools/testing/selftests/kvm/x86_64/debug_regs.c, Linux 6.12, as upstream is
today): KVM_SET_GUEST_DEBUG. INT3 exits with USE_SW_BP; an instruction breakpoint in each of
DR0-DR3 and a data (write) breakpoint in each exit with DR6 naming it; SINGLESTEP exits after
each instruction, plain and emulated (STI, XOR, CPUID, MOV, WRMSR of TSC_DEADLINE, CLI), with a
pending interrupt kept out by BLOCKIRQ; DR7.GD makes MOV from DR0 exit with DR6.BD. Upstream runs
the five in a row on one vCPU; here each is a test that enters the guest at its own label (main
raises the interrupt first, as upstream's guest does).

Upstream assertions (upstream line: assertion -> line here):
    111 INT3: TEST_ASSERT(KVM_EXIT_DEBUG, BP_VECTOR, pc == sw_bp) -> 82
    128 INS_HW_BP (DR0-3): TEST_ASSERT(KVM_EXIT_DEBUG, DB_VECTOR, pc == hw_bp, dr6) -> 82
    151 DATA_HW_BP (DR0-3): TEST_ASSERT(KVM_EXIT_DEBUG, DB_VECTOR, pc == write_data, dr6) -> 82
    177 SINGLE_STEP[0-5]: TEST_ASSERT(KVM_EXIT_DEBUG, DB_VECTOR, pc == next insn, dr6 BS) -> 82
    195 DR7.GD: TEST_ASSERT(KVM_EXIT_DEBUG, DB_VECTOR, pc == bd_start, dr6 BD) -> 82
    210 TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO) -> 123
    212 TEST_ASSERT(cmd == UCALL_DONE) -> 123
(TEST_REQUIRE(KVM_CAP_SET_GUEST_DEBUG) is the kvm_cap mark.)

Lines: 77 here (Python and guest code, without this docstring, blank and comment lines) for
upstream's 155 (217 with comments and blank lines).
"""

import functools

import pytest

from kvmiso import Source
from kvmiso.kvm.exits import DebugExit

from .facts import hw_breakpoints_never_exit, int3_reaches_the_guest, single_step_skips_the_sti_shadow

GUEST = Source.asm(r"""
        .include "kvmiso.inc"
        .globl main
main:   mov $0x1b, %ecx                 # IA32_APIC_BASE: x2APIC on
        rdmsr
        or $0x400, %eax
        wrmsr
        mov $0x830, %ecx                # x2APIC ICR: to self, assert, fixed, vector 0xaa
        mov $0x440aa, %eax              # (edx is still 0: the APIC base is below 4 GiB)
        wrmsr                           # now pending; interrupts are off (IF=0)
        jmp ss_start                    # the single-step test's way in (the others start at their label)
sw_bp:  int3
hw_bp:  nop
        mov $1234, %rax
        mov %rax, guest_value(%rip)     # 7 bytes
write_data: ss_start: sti
        xor %eax, %eax
        cpuid
        movl $0x6e0, %ecx               # MSR_IA32_TSC_DEADLINE
        wrmsr
        cli
bd_start: mov %dr0, %rax
        GUEST_DONE
guest_value: .long 0                    # (data in the code's page: the guest's page tables make it writable)
""")
DR6_BD, DR7_GD, DR6_FIXED = 1 << 13, 1 << 13, 0xFFFF0FF0
pytestmark = pytest.mark.kvm_cap("SET_GUEST_DEBUG")


def deviates(*facts):  # kvm_deviation marks: (the fact, what this KVM does instead), each a failed assertion
    return lambda test: functools.reduce(lambda t, f: pytest.mark.kvm_deviation(*f, raises=AssertionError)(t), facts, test)


def jump(m, rip):
    regs = m.vcpu.get_regs()
    regs.rip = rip
    m.vcpu.set_regs(regs)


def guest_at(machine, label, offset=0):
    jump(m := machine(GUEST, "long", irqchip=True), m.image.symbols[label] + offset)
    return m


def debug_exit(m, **debug):
    m.vcpu.set_guest_debug(**debug)
    return m.run(on_exit=lambda e: isinstance(e, DebugExit)).exits[-1]


def expect(exit, vector, pc, dr6=None):
    assert isinstance(exit, DebugExit) and (exit.exception, exit.pc, exit.dr6 if dr6 else None) == (vector, pc, dr6), exit


@deviates(("cpl0_emulated", "KVM's emulator fails at INT3 under USE_SW_BP"), (int3_reaches_the_guest, "INT3 is the guest's #BP"))
def test_int3_exits_with_sw_bp(machine):
    m = guest_at(machine, "sw_bp")
    expect(debug_exit(m, sw_bp=True), 3, m.image.symbols["sw_bp"])


@deviates((hw_breakpoints_never_exit, "the guest runs past its breakpoint"))
def test_an_instruction_breakpoint_in_each_of_dr0_to_dr3(machine):
    m = guest_at(machine, "hw_bp")
    for i in range(4):
        dr = [0] * i + [m.image.symbols["hw_bp"]] + [0] * (6 - i) + [0x400 | 1 << (2 * i + 1)]
        expect(debug_exit(m, debugreg=dr), 1, m.image.symbols["hw_bp"], DR6_FIXED | 1 << i)


@deviates(("cpl0_emulated", "KVM's emulator checks no data breakpoint"), (hw_breakpoints_never_exit, "no exit"))
def test_a_write_breakpoint_in_each_of_dr0_to_dr3(machine):
    m = guest_at(machine, "hw_bp", 1)  # past the nop
    for i in range(4):
        dr = [0] * i + [m.image.symbols["guest_value"]] + [0] * (6 - i) + [0x400 | 1 << (2 * i + 1) | 0xD0000 << (4 * i)]
        expect(debug_exit(m, debugreg=dr), 1, m.image.symbols["write_data"], DR6_FIXED | 1 << i)
        jump(m, m.image.symbols["write_data"] - 7)  # back to the mov (RW=01 LEN=11 above: a 4-byte write)


@deviates((single_step_skips_the_sti_shadow, "the step after STI stops one instruction later"))
def test_single_step_with_an_interrupt_pending_and_blocked(machine):
    m = guest_at(machine, "main")
    ss = m.image.symbols["ss_start"]
    while debug_exit(m, single_step=True, block_irq=True).pc != ss:
        pass  # main raises the interrupt, one instruction a step, then jumps to ss_start
    for pc in (ss + n for n in (1, 3, 5, 10, 12, 13)):  # after sti, xor, cpuid, mov, wrmsr, cli
        expect(debug_exit(m, single_step=True, block_irq=True, hw_bp=False, debugreg=[0] * 7 + [0x400]), 1, pc, 0xFFFF4FF0)


@deviates(("cpl0_emulated", "KVM's emulator lets MOV from DR0 run under DR7.GD"), (hw_breakpoints_never_exit, "no exit"))
def test_dr7_gd_makes_mov_from_dr0_exit_then_the_guest_ends(machine):
    m = guest_at(machine, "bd_start")
    expect(debug_exit(m, debugreg=[0] * 7 + [0x400 | DR7_GD]), 1, m.image.symbols["bd_start"], DR6_FIXED | DR6_BD)
    m.vcpu.set_guest_debug(enable=False)
    m.run().raise_for_guest()  # KVM_EXIT_IO with UCALL_DONE: any other end raises
