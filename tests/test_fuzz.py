"""Fuzzing the harness on the real device: thousands of random payloads per mode on one reused
VM each; every run ends classified, nothing raises, hangs or leaks. Also the pieces: the
instruction generator, reproducible cases, and Machine.reset."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import pytest

from kvmiso.guest import Machine, Outcome, build
from kvmiso.guest.fuzz import DONE_UCALL, KINDS, TARGETS, Fuzzer, make_case, random_instructions

PER_TARGET = 2000
SEED = 20261124
SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "fuzz.py"


@pytest.mark.parametrize("bits,arch", [(16, "i8086"), (32, "i386"), (64, "i386:x86-64")])
def test_generator_emits_instructions_the_assembler_knows(tmp_path, bits, arch):
    rng = random.Random(bits)
    code = b"".join(random_instructions(rng, bits, 8) for _ in range(200))
    blob = tmp_path / "code.bin"
    blob.write_bytes(code)
    out = subprocess.run(["objdump", "-D", "-b", "binary", "-m", arch, str(blob)],
                         capture_output=True, text=True, check=True).stdout
    assert "(bad)" not in out
    assert "out " in out and "mov " in out  # the templates are all in play


def test_cases_are_reproducible_from_their_label():
    a, b = make_case("long", "insns", 7, 3), make_case("long", "insns", 7, 3)
    assert a == b and a.label == "long/insns/seed 7/#3"
    assert make_case("long", "insns", 7, 4).code != a.code
    assert make_case("long", "bytes", 7, 3).code.endswith(DONE_UCALL)  # then DONE


def test_reset_runs_the_image_again_from_scratch(kvm):
    with Machine("hello", mode="long", kvm=kvm) as m:
        first = m.run(timeout=10)
        m.vm.write(0x100000, b"dirty")
        m.reset()
        second = m.run(timeout=10)
        assert m.vm.read(0x100000, 5) == bytes(5)  # RAM was zeroed
    assert first.ok and second.ok and first.console == second.console


def test_reset_after_a_triple_fault_loads_a_new_image(kvm):
    with Machine("triplefault", mode="protected", kvm=kvm) as m:
        assert m.run(timeout=10).outcome is Outcome.SHUTDOWN
        m.reset(build("hello", "protected"))
        r = m.run(timeout=10)
        assert r.ok and r.console == b"Hello from a kvmiso guest!\n"
        with pytest.raises(ValueError, match="runs protected mode; image hello is for long"):
            m.reset(build("hello", "long"))


@pytest.mark.parametrize("target", list(TARGETS))
def test_reset_after_a_run_stopped_at_a_rep_ins_exit_runs_the_next_payload_alone(kvm, target):
    """KVM completes the instruction behind an I/O exit at the next KVM_RUN, before it looks at
    immediate_exit. reset() has it completed first, whoever ran the vCPU: before, the next
    payload's first KVM_RUN finished the old rep ins against the new registers, exit after exit,
    past any deadline."""
    wide = TARGETS[target][0] != "real"
    imm = (lambda v: v.to_bytes(4 if wide else 2, "little"))
    rep_ins = (b"\xb9" + imm(0x400) + b"\xba" + imm(0x1F0) + b"\xbf" + imm(0x9000)  # ecx, edx, edi
               + b"\xf3\x6c")                                                       # rep insb
    with Fuzzer(target, timeout=10, kvm=kvm) as f:
        f.machine.reset()
        f.machine.vm.write(f._at, rep_ins + DONE_UCALL)
        first = f.machine.run(timeout=10, on_exit=lambda e: True)
        assert first.outcome is Outcome.STOPPED and first.exits[0].is_in and first.exits[0].count == 0x400
        f.machine.reset()
        f.machine.vm.write(f._at, b"\x90" * 8 + DONE_UCALL)
        second = f.machine.run(timeout=10, max_exits=1000)
        assert second.outcome is Outcome.DONE and second.runs == 1, second.detail
        f.machine.reset()  # the same after a KVM_RUN of the caller's own, outside Machine.run
        f.machine.vm.write(f._at, rep_ins + DONE_UCALL)
        assert f.machine.vcpu.run() == first.exits[0]
        f.machine.reset()
        f.machine.vm.write(f._at, b"\x90" * 8 + DONE_UCALL)
        third = f.machine.run(timeout=10, max_exits=1000)
        assert third.outcome is Outcome.DONE and third.runs == 1, third.detail


def test_reset_loads_what_a_fresh_machine_has_after_a_payload_overwrote_it(kvm):
    """reset() loads the tables, sregs and regs setup built once: after a payload that
    overwrote its IDT and moved its registers, they are again exactly a fresh vCPU's."""
    from kvmiso.guest.modes import GDT, TSS

    def state(m):
        return bytes(m.vcpu.get_regs()), bytes(m.vcpu.get_sregs()), m.vm.read(GDT, TSS + 0x100 - GDT)

    with Fuzzer("long", kvm=kvm) as f:
        fresh = state(f.machine)
        r = f.run(bytes([
            0xB8, 0x00, 0x10, 0x01, 0x00,              # mov $0x11000, %eax   (the IDT)
            0xC7, 0x00, 0x78, 0x56, 0x34, 0x12,        # movl $0x12345678, (%rax)
        ]) + DONE_UCALL)
        assert r.ok, r.detail
        after = state(f.machine)
        assert after[0] != fresh[0] and after[2] != fresh[2]
        f.machine.reset()
        assert state(f.machine) == fresh


def test_a_reset_to_an_image_that_cannot_be_set_up_is_not_undone_by_the_next(kvm):
    """reset(image) that fails setting up the vCPU must not leave the previous image's boot
    state for the next plain reset() to load under the new image's code."""
    import dataclasses

    with Machine("hello", mode="long", kvm=kvm) as m:
        broken = dataclasses.replace(m.image, symbols={"_start": m.image.entry + 1})  # no exception stubs
        with pytest.raises(KeyError, match="exception_stubs"):
            m.reset(broken)
        with pytest.raises(KeyError, match="exception_stubs"):
            m.reset()
        m.reset(build("hello", "long"))
        assert m.run(timeout=10).ok


def test_reset_restores_the_msrs_a_payload_wrote(kvm):
    lstar = 0xC0000082
    with Fuzzer("long", kvm=kvm) as f:
        before = f.machine.vcpu.get_msrs([lstar])
        r = f.run(bytes([
            0xB9, 0x82, 0x00, 0x00, 0xC0,  # mov $0xc0000082, %ecx   (LSTAR)
            0xB8, 0x00, 0x10, 0x00, 0x00,  # mov $0x1000, %eax
            0x31, 0xD2,                    # xor %edx, %edx
            0x0F, 0x30,                    # wrmsr
        ]) + DONE_UCALL)
        assert r.ok, r.detail
        assert f.machine.vcpu.get_msrs([lstar]) == {lstar: 0x1000}
        f.machine.reset()
        assert f.machine.vcpu.get_msrs([lstar]) == before


@pytest.mark.slow
def test_fuzz_every_mode_classifies_every_run_and_leaks_nothing(kvm, tmp_path):
    # scripts/fuzz.py in its own process: the leak check there runs on the C allocator, and a
    # crash of the harness shows as the process's status; a hang fails at the timeout
    out = tmp_path / "fuzz.json"
    p = subprocess.run([sys.executable, str(SCRIPT), "--count", str(PER_TARGET), "--seed", str(SEED), "--jobs", "2",
                        "--json", str(out)], capture_output=True, text=True, timeout=1200)
    print(p.stdout, p.stderr)
    r = json.loads(out.read_text())
    for target, s in r["targets"].items():
        assert s["errors"] == [], f"{target}: the harness raised on {s['errors'][0][0]}:\n{s['errors'][0][1]}"
        assert s["unclassified"] == [], f"{target}: unclassified ends {s['unclassified'][:5]}"
        assert s["runs"] == PER_TARGET
        assert all(sum(c.values()) == PER_TARGET // len(KINDS) for c in s["by_kind"].values())
        assert set(s["outcomes"]) <= set(Outcome)
        # the generator reaches the interesting ends, not just one
        assert {"done", "exception", "malformed-ucall", "timeout"} <= set(s["outcomes"]), s["outcomes"]
        # the harness cost is what kvmiso adds: its parts, each measured, add up
        assert s["setup_us_median"] > 0 and s["kvm_runs_per_payload"] == s["kvm_runs"] / s["runs"]
        assert s["harness_us"] == pytest.approx(s["setup_us_median"] + s["kvm_runs_per_payload"] * s["decode_ns"] / 1e3)
    assert list(r["targets"]) == list(TARGETS)
    assert r["resources_after"] == r["resources_before"]
    assert p.returncode == 0, p.stderr
