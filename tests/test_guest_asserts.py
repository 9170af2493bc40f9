"""GUEST_ASSERT*, GUEST_SYNC, GUEST_PRINTF and GUEST_FAIL (guests/lib/kvmiso.inc, kvmiso.h) on the
real /dev/kvm, in every mode and at CPL3, and what the host makes of them: the message names the
file and line the macro is written at (this file's own lines, for guest code written here), the
values and the label the guest was at."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvmiso.guest import GuestAssertionError, GuestError, Machine, Outcome, Source, build
from kvmiso.guest.build import BuildError

MODES_CPL = [("real", 0), ("protected", 0), ("long", 0), ("long", 3)]
HERE = Path(__file__).relative_to(Path.cwd()) if Path(__file__).is_relative_to(Path.cwd()) else Path(__file__)


def line_of(marker: str) -> int:
    """The line of this file holding ``marker`` (once): where a guest macro below is written."""
    lines = [i for i, text in enumerate(Path(__file__).read_text().splitlines(), 1)
             if marker in text and "line_of(" not in text]
    assert len(lines) == 1, (marker, lines)
    return lines[0]


# Every passing form first, each checked to leave the registers (and for SYNC and PRINTF the
# flags) as they were; then one comparison that fails.
CHECKS = Source.asm(r"""
        .include "kvmiso.inc"
        .text
        .globl main
main:
        mov $0xaa, %eax
        mov $0x1234, %ebx
        mov $7, %ecx
        mov $0x55, %edx
        mov $0x66, %esi
        mov $0x77, %edi
        GUEST_ASSERT_EQ %eax, $0xaa
        GUEST_ASSERT_NE %eax, %ebx
        GUEST_ASSERT_LT %ecx, $8
        GUEST_ASSERT_LE %ecx, $7
        GUEST_ASSERT_GT %ebx, %eax
        GUEST_ASSERT_GE %ebx, $0x1234
        stc
        GUEST_SYNC $1, %ebx, $0x99
        GUEST_ASSERT c                  # SYNC leaves the flags alone
        clc
        GUEST_PRINTF "eax=%#x ecx=%u\n", %eax, %ecx
        GUEST_ASSERT nc                 # and so does PRINTF
        GUEST_ASSERT_EQ %eax, $0xaa     # and the registers, every one
        GUEST_ASSERT_EQ %ebx, $0x1234
        GUEST_ASSERT_EQ %ecx, $7
        GUEST_ASSERT_EQ %edx, $0x55
        GUEST_ASSERT_EQ %esi, $0x66
        GUEST_ASSERT_EQ %edi, $0x77
        GUEST_ASSERT_EQ %ecx, $0xab     # fails: the end of CHECKS
        ret
""")


@pytest.mark.parametrize("mode,cpl", MODES_CPL)
def test_a_failed_assert_names_the_line_the_values_and_the_label(kvm, mode, cpl):
    with Machine(CHECKS, mode=mode, cpl=cpl, kvm=kvm) as m:
        r = m.run(timeout=10)
        assert r.outcome is Outcome.FAIL, r.detail
        assert r.detail.startswith(f"{HERE}:{line_of('fails: the end of CHECKS')}: "
                                   "GUEST_ASSERT_EQ(%ecx, $0xab) failed: expected 0xab, got 0x7 (main+0x")
        assert r.assertion.values == (7, 0xAB) and r.assertion.site.line == line_of("fails: the end of CHECKS")
        assert [(s.value, s.args) for s in r.syncs] == [(1, (0x1234, 0x99))]  # recorded; the run went on
        assert r.console_text == "eax=0xaa ecx=7\n"
        with pytest.raises(GuestAssertionError, match=r"failed: expected 0xab, got 0x7") as info:
            r.raise_for_guest()
        assert isinstance(info.value, AssertionError) and info.value.result is r


SYNCS = Source.asm(r"""
        .include "kvmiso.inc"
        .set SHARED, 0x7f00             # below the image, mapped in every mode
        .text
        .globl main
main:
        movl $1, SHARED
        GUEST_SYNC $1                   # the host writes SHARED here
        GUEST_ASSERT_EQ SHARED, $0x1234 # the host wrote it at sync 1
        GUEST_SYNC $2, SHARED, $0x42
        GUEST_ASSERT_EQ SHARED, $0x5678 # and this at sync 2
        ret
""")


@pytest.mark.parametrize("mode,cpl", MODES_CPL)
def test_the_host_acts_at_each_sync_and_the_guest_resumes(kvm, mode, cpl):
    with Machine(SYNCS, mode=mode, cpl=cpl, kvm=kvm) as m:
        s = m.run_until_sync()
        assert (s.value, s.args, s.site.line) == (1, (), line_of("GUEST_SYNC $1  "))
        assert m.vm.read(0x7F00, 4) == (1).to_bytes(4, "little")  # the guest stands at its sync
        m.vm.write(0x7F00, (0x1234).to_bytes(4, "little"))
        s = m.run_until_sync()
        assert (s.value, s.args) == (2, (0x1234, 0x42)) and str(s).startswith("GUEST_SYNC($2) at ")
        m.vm.write(0x7F00, (0x5678).to_bytes(4, "little"))
        assert m.run().raise_for_guest().outcome is Outcome.DONE


def test_syncs_iterates_until_done_and_raises_for_a_failure(kvm):
    with Machine(SYNCS, mode="long", kvm=kvm) as m:
        values = []
        for s in m.syncs():
            values.append(s.value)
            m.vm.write(0x7F00, (0x1234 if s.value == 1 else 0x5678).to_bytes(4, "little"))
        assert values == [1, 2]
    with Machine(SYNCS, mode="long", kvm=kvm) as m:  # the host forgets to act at sync 2
        with pytest.raises(GuestAssertionError, match=r"GUEST_ASSERT_EQ\(SHARED, \$0x5678\) failed: "
                                                      r"expected 0x5678, got 0x1234"):
            for s in m.syncs():
                if s.value == 1:
                    m.vm.write(0x7F00, (0x1234).to_bytes(4, "little"))
    with Machine("hello", kvm=kvm) as m, pytest.raises(GuestError, match="finished without a GUEST_SYNC"):
        m.run_until_sync()


FORMATS = Source.asm(r"""
        .include "kvmiso.inc"
        .text
        .globl main
main:
        GUEST_PRINTF "%d %u %x ", $-2, $-2, $0xBEEF
        GUEST_PRINTF "%#06x %c %s", $0x2a, $'k', $word
        GUEST_PRINTF "|%-4s|%%\n", $word
        GUEST_PRINTF "%hhx %hd\n", $0x1ff, $0xffff
.if BITS == 64
        mov $0x123456789a, %rax
        GUEST_PRINTF "%lx %x %p %ld %lu\n", %rax, %rax, %rax, $-1, %rax
.endif
        GUEST_FAIL "gave up at %d of %s", $3, $word
        .data
word:   .asciz "kvm"
""")


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_printf_formats_as_c_and_fail_carries_its_message(kvm, mode):
    with Machine(FORMATS, mode=mode, kvm=kvm) as m:
        r = m.run(timeout=10)
    expected = "-2 4294967294 beef 0x002a k kvm|kvm |%\nff -1\n"
    if mode == "long":  # %x is 32 bits as in C; %ld of $-1 is the 32-bit operand zero-extended
        expected += "123456789a 3456789a 0x123456789a 4294967295 78187493530\n"
    assert r.console_text == expected
    assert r.outcome is Outcome.FAIL
    line = line_of("GUEST_FAIL \"gave up")
    assert r.detail.startswith(f"{HERE}:{line}: GUEST_FAIL: gave up at 3 of kvm (main+0x"), r.detail


def test_64_bit_registers_compare_whole_in_long_mode(kvm):
    guest = Source.asm(r"""
        .include "kvmiso.inc"
        .globl main
main:   mov $0x100000001, %rax
        mov $1, %ebx
        GUEST_ASSERT_GT %rax, %rbx      # a 64-bit register is read whole
        GUEST_ASSERT_EQ %rax, %rbx      # fails: 64 bits
        ret
""")
    with Machine(guest, mode="long", kvm=kvm) as m:
        r = m.run()
    assert r.assertion.values == (0x100000001, 1) and r.assertion.site.line == line_of("fails: 64 bits")
    assert "expected 0x1, got 0x100000001" in r.detail


def test_assert_on_flags_and_an_s_file_without_the_preprocessor(kvm, tmp_path):
    # a .s file is assembled as it is: the same macros, with no file and line to name
    plain = tmp_path / "plain.s"
    plain.write_text('        .include "kvmiso.inc"\n        .globl main\nmain:\n        xor %eax, %eax\n'
                     "        GUEST_ASSERT nz\n        ret\n")
    with Machine(plain, mode="long", kvm=kvm) as m:
        r = m.run()
    assert r.outcome is Outcome.FAIL and r.detail.startswith("GUEST_ASSERT(nz) failed (main+0x"), r.detail


def test_a_source_that_does_not_assemble_names_the_test_file_line(kvm):
    bad = Source.asm("""
        .include "kvmiso.inc"
        .globl main
main:   movq %rax, %nosuchreg            # the assembler stops here
""")
    with pytest.raises(BuildError, match=f"{HERE}:{line_of('the assembler stops here')}: Error: bad register"):
        build(bad, "long")


def test_hostile_ucalls_are_decoded_without_raising(kvm):
    # an ASSERT whose site pointer leads nowhere, and a PRINTF whose %s does
    guest = Source.asm(r"""
        .include "kvmiso.inc"
        .globl main
main:   GUEST_PRINTF "[%s]\n", $0xfffff000
        mov $0x7ffff000, %edi
        mov $UCALL_ASSERT, %al
        out %al, $PORT_UCALL
""")
    with Machine(guest, mode="long", kvm=kvm, memory=4 << 20) as m:
        r = m.run()
    assert r.console_text == "[?]\n"
    assert r.outcome is Outcome.FAIL and r.detail.startswith("GUEST_ASSERT() failed (main+0x"), r.detail
    assert r.assertion.site.file == "?"


def test_timeouts_shutdowns_and_exceptions_name_the_label(kvm):
    with Machine("spin", mode="long", kvm=kvm) as m:
        with pytest.raises(TimeoutError, match=r"stopped at rip 0x[0-9a-f]+ \(main\) \(eb fe"):
            m.run(timeout=0.2)
    with Machine("triplefault", mode="long", kvm=kvm) as m:
        detail = m.run().detail
        # where KVM resets the vCPU on shutdown (kvm_amd), the RIP left is the reset vector's,
        # which no label names; elsewhere it is the faulting instruction's, in main
        if m.vcpu.get_sregs().cs.base == 0xFFFF0000:
            assert "near rip 0xfff0 (the vCPU's reset state: KVM reset it on shutdown" in detail
        else:
            assert " (main+0x" in detail


def test_an_emulation_failure_names_the_label(kvm):
    from kvmiso.guest.probe import PROBE_INSNS, emulated_instructions

    if emulated_instructions(kvm, "long", 0) < PROBE_INSNS:
        pytest.skip("CPL0 code runs natively here: KVM's emulator never sees the instruction")
    guest = Source.asm("""
        .include "kvmiso.inc"
        .globl main
main:   nop
emulate_me:
        aesenc %xmm1, %xmm0             # no instruction KVM's emulator knows
        ret
""")
    with Machine(guest, mode="long", kvm=kvm) as m:
        r = m.run()
    assert r.outcome is Outcome.INTERNAL_ERROR
    assert r.detail.startswith("KVM_EXIT_INTERNAL_ERROR suberror EMULATION at rip 0x")
    assert " (emulate_me); KVM's emulator cannot execute 66 0f 38 dc c1" in r.detail
    assert repr(r.exits[-1]).startswith("InternalErrorExit(suberror=1 EMULATION, data=(0x1, ")


def test_setup_vm_and_irqchip_come_before_the_vcpus(kvm):
    seen = []
    with Machine("hlt", mode="long", kvm=kvm, setup_vm=lambda vm: seen.append(len(vm.vcpus))) as m:
        assert seen == [0] and m.run().outcome is Outcome.HALT
    # with KVM's in-kernel local APIC, HLT waits inside KVM_RUN for an interrupt none sends
    with Machine("hlt", mode="long", kvm=kvm, irqchip=True) as m:
        with pytest.raises(TimeoutError, match="stopped at rip"):
            m.run(timeout=0.3)


C_GUEST = Source.c(r"""
static volatile unsigned int mailbox;

void main(void)
{
	unsigned long big = 0x123456789aUL;

	GUEST_ASSERT_EQ(big >> 32, 0x12);
	GUEST_ASSERT_LT(1, 2);
	GUEST_PRINTF("big=%lx %s %d\n", big, "kvm", -5);
	GUEST_SYNC(1, &mailbox);
	GUEST_ASSERT(mailbox == 7);
	GUEST_ASSERT_EQ(mailbox, 8);    /* fails: the end of C_GUEST */
}
""")


@pytest.mark.parametrize("cpl", [0, 3])
def test_a_c_guest_asserts_syncs_and_prints(kvm, cpl):
    with Machine(C_GUEST, cpl=cpl, kvm=kvm) as m:  # long mode: C's only one
        s = m.run_until_sync()
        assert (s.value, s.site.text) == (1, "1")
        m.vm.write(s.args[0], (7).to_bytes(4, "little"))  # the guest passed its variable's address
        r = m.run()
    assert r.detail.startswith(f"{HERE}:{line_of('fails: the end of C_GUEST')}: "
                               "GUEST_ASSERT_EQ(mailbox, 8) failed: expected 0x8, got 0x7 (main+0x"), r.detail
    assert m.console == b"big=123456789a kvm -5\n"  # printed before the sync, kept by the machine


def test_a_c_guest_is_long_mode_only():
    assert C_GUEST.modes == ("long",)
    with pytest.raises(BuildError, match="a C payload runs in long mode only, not in protected mode"):
        build(C_GUEST, "protected")


# --- the host side alone, on memory that is a dict (no device: what a hostile guest could write)

def _memory(blobs: dict[int, bytes]):
    # guest memory comes in pages: each blob is one, zero-filled after its bytes
    blobs = {base: blob.ljust(0x1000, b"\0") for base, blob in blobs.items()}

    def read(address: int, length: int) -> bytes:
        for base, blob in blobs.items():
            if base <= address and address + length <= base + len(blob):
                return blob[address - base:address - base + length]
        raise ValueError(f"{address:#x} is not mapped")
    return read


def test_a_site_whose_strings_lead_nowhere_reads_as_question_marks():
    import struct

    from kvmiso.guest.sites import SITE_EQ, read_site

    read = _memory({0x1000: struct.pack("<IBBHQQ", 12, SITE_EQ, 9, 0, 0xDEAD0000, 0x2000), 0x2000: b"a, b\0"})
    site = read_site(read, 0x1000)
    assert (site.file, site.line, site.kind, site.nargs, site.text) == ("?", 12, SITE_EQ, 5, "a, b")
    assert read_site(read, 0x5000).file == "?" and read_site(read, 0x5000).line == 0


def test_printf_keeps_what_it_cannot_format():
    from kvmiso.guest.sites import format_printf

    read = _memory({0x3000: b"guest\0"})
    assert format_printf("%s|%5s|%.2s", [0x3000, 0x3000, 0x3000], read) == "guest|guest|gu"
    assert format_printf("%d %d", [1]) == "1 %d"  # no argument left: the conversion stays
    assert format_printf("%*d %q 100%%", [3, 4]) == "%*d %q 100%"  # * is not formatted; %q is no conversion
    assert format_printf("%hhd %hu %lld %zx", [0x80, -1, -1, 1 << 63]) == "-128 65535 -1 8000000000000000"
    assert format_printf("%s", [0x9000], read) == "?"
    # C's alternate forms, which Python's % writes otherwise (0x0, 0o10)
    cases = ["%#x", "%#x", "%#o", "%#o", "%#06x", "%#5o", "%#-5o|", "%#05o"]
    assert [format_printf(f, [v]) for f, v in zip(cases, [0, 16, 8, 0, 42, 8, 8, 8])] == \
        ["0", "0x10", "010", "0", "0x002a", "  010", "010  |", "00010"]  # printf(1)'s answers


def test_internal_error_repr_names_the_suberror():
    from kvmiso.kvm.exits import InternalErrorExit

    assert repr(InternalErrorExit(1, (1, 0x20))) == "InternalErrorExit(suberror=1 EMULATION, data=(0x1, 0x20))"
    assert repr(InternalErrorExit(99, ())) == "InternalErrorExit(suberror=99, data=())"


def test_symbolize_names_the_nearest_label_not_a_constant():
    image = build("hello", "long")
    main = image.symbols["main"]
    assert image.symbolize(main) == "main" and image.symbolize(main + 4) == "main+0x4"
    assert image.symbolize(image.symbols["_start"]) == "_start"
    assert image.symbolize(image.load_address - 1) is None
    assert image.symbolize(image.load_address + len(image.code)) is None
    # PORT_UCALL (0xea) and SCRATCH are absolute values, never a label
    assert "PORT_UCALL" not in (image.symbolize(a) or "" for a in range(image.load_address, main))
