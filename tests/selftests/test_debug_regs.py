"""x86/debug_regs (tools/testing/selftests/kvm/x86_64/debug_regs.c, Linux 6.12, as upstream is
today): KVM_SET_GUEST_DEBUG. INT3 exits with USE_SW_BP; an instruction breakpoint in each of
DR0-DR3 and a data (write) breakpoint in each exit with DR6 naming it; SINGLESTEP exits after
each instruction, plain and emulated (STI, XOR, CPUID, MOV, WRMSR of TSC_DEADLINE, CLI), with a
pending interrupt kept out by BLOCKIRQ; DR7.GD makes MOV from DR0 exit with DR6.BD. Upstream runs
the five in a row on one vCPU; here each is a test that enters the guest at its own label (main
raises the interrupt first, as upstream's guest does).

Upstream assertions (upstream line: assertion -> line here):
    111 INT3: TEST_ASSERT(KVM_EXIT_DEBUG, BP_VECTOR, pc == sw_bp) -> 80
    128 INS_HW_BP (DR0-3): TEST_ASSERT(KVM_EXIT_DEBUG, DB_VECTOR, pc == hw_bp, dr6) -> 80
    151 DATA_HW_BP (DR0-3): TEST_ASSERT(KVM_EXIT_DEBUG, DB_VECTOR, pc == write_data, dr6) -> 80
    177 SINGLE_STEP[0-5]: TEST_ASSERT(KVM_EXIT_DEBUG, DB_VECTOR, pc == next insn, dr6 BS) -> 80
    195 DR7.GD: TEST_ASSERT(KVM_EXIT_DEBUG, DB_VECTOR, pc == bd_start, dr6 BD) -> 80
    210 TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO) -> 120
    212 TEST_ASSERT(cmd == UCALL_DONE) -> 120
(TEST_REQUIRE(KVM_CAP_SET_GUEST_DEBUG) is the kvm_cap mark.)

Lines: 76 here (Python and guest code, without this docstring, blank and comment lines) for
upstream's 155 (217 with comments and blank lines).
"""

import pytest

from kvmiso import Source
from kvmiso.kvm.exits import DebugExit

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
write_data:
ss_start: sti
        xor %eax, %eax
        cpuid
        movl $0x6e0, %ecx               # MSR_IA32_TSC_DEADLINE
        wrmsr
        cli
bd_start: mov %dr0, %rax
        GUEST_DONE
        .data
guest_value: .long 0
""")
DR6_BD, DR7_GD, DR6_FIXED = 1 << 13, 1 << 13, 0xFFFF0FF0
pytestmark = pytest.mark.kvm_cap("SET_GUEST_DEBUG")


def emulated(what):  # a deviation where KVM's emulator runs the CPL0 guest
    return pytest.mark.kvm_deviation("cpl0_emulated", f"KVM's emulator, which runs CPL0 here, {what}", raises=AssertionError)


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


@emulated("fails at INT3 under USE_SW_BP")
def test_int3_exits_with_sw_bp(machine):
    m = guest_at(machine, "sw_bp")
    expect(debug_exit(m, sw_bp=True), 3, m.image.symbols["sw_bp"])


def test_an_instruction_breakpoint_in_each_of_dr0_to_dr3(machine):
    m = guest_at(machine, "hw_bp")
    for i in range(4):
        dr = [0] * i + [m.image.symbols["hw_bp"]] + [0] * (6 - i) + [0x400 | 1 << (2 * i + 1)]
        expect(debug_exit(m, debugreg=dr), 1, m.image.symbols["hw_bp"], DR6_FIXED | 1 << i)


@emulated("checks no data breakpoint")
def test_a_write_breakpoint_in_each_of_dr0_to_dr3(machine):
    m = guest_at(machine, "hw_bp", 1)  # past the nop
    for i in range(4):
        dr = [0] * i + [m.image.symbols["guest_value"]] + [0] * (6 - i) + [0x400 | 1 << (2 * i + 1) | 0xD0000 << (4 * i)]
        expect(debug_exit(m, debugreg=dr), 1, m.image.symbols["write_data"], DR6_FIXED | 1 << i)
        jump(m, m.image.symbols["write_data"] - 7)  # back to the mov (RW=01 LEN=11 above: a 4-byte write)


def test_single_step_with_an_interrupt_pending_and_blocked(machine):
    m = guest_at(machine, "main")
    pc = m.image.symbols["ss_start"]
    while debug_exit(m, single_step=True, block_irq=True).pc != pc:
        pass  # main raises the interrupt, one instruction a step, then jumps to ss_start
    for size in (1, 2, 2, 5, 2, 1):  # sti, xor, cpuid, mov, wrmsr, cli
        pc += size
        expect(debug_exit(m, single_step=True, block_irq=True, hw_bp=False, debugreg=[0] * 7 + [0x400]), 1, pc, 0xFFFF4FF0)


@emulated("lets MOV from DR0 run under DR7.GD")
def test_dr7_gd_makes_mov_from_dr0_exit_then_the_guest_ends(machine):
    m = guest_at(machine, "bd_start")
    expect(debug_exit(m, debugreg=[0] * 7 + [0x400 | DR7_GD]), 1, m.image.symbols["bd_start"], DR6_FIXED | DR6_BD)
    m.vcpu.set_guest_debug(enable=False)
    m.run().raise_for_guest()  # KVM_EXIT_IO with UCALL_DONE: any other end raises
