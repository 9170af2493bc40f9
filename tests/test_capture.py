"""Capture on the real /dev/kvm: each foundation payload's in-kernel events, assigned to the
KVM_RUN they happened in and agreeing with the vCPU stats; other processes never seen; lost
records counted; the log without tracing; and ``kvmiso trace``."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from ready import READY_SPIN, wait_until_counted

from kvmiso.guest import Machine, Outcome
from kvmiso.observe.tracing.capture import Capture
from kvmiso.session import capture, capture_run
from kvmiso.kvm.exits import HltExit, IntrExit, IoExit, MmioExit, RdmsrExit, WrmsrExit
from kvmiso.observe.tracing.exitlog import parse_jsonl, read_jsonl
from kvmiso.observe.tracing.exitstat import summarize_exits

ROOT = Path(__file__).parent.parent


def _answer_io(e) -> None:
    if e.is_in:
        e.reply(0x5A if e.size == 1 else 0x1234)


def _answer_msr(e) -> None:
    e.reply(0x77) if e.name == "X86_RDMSR" else e.reply()


# (payload, mode, cpl): the foundation payloads, captured once in one session
RUNS = [("portio", "real", 0), ("portio", "protected", 0), ("portio", "long", 0), ("portio", "long", 3),
        ("cpuid", "long", 0), ("cpuid", "protected", 0), ("msr", "long", 0), ("mmio", "long", 0),
        ("mmio", "protected", 0), ("hlt", "long", 0)]


@pytest.fixture(scope="module")
def session(tracing):
    if not os.path.exists("/dev/kvm"):  # the kvm fixture's rule, for a fixture that outlives it
        (pytest.fail if os.environ.get("KVMISO_REQUIRE_KVM") == "1" else pytest.skip)("/dev/kvm does not exist on this host")
    out = {}
    with Capture() as cap:
        assert cap.tracer is not None, cap.log.tracing_reason
        for payload, mode, cpl in RUNS:
            with Machine(payload, mode=mode, cpl=cpl) as m:
                if payload == "msr":
                    m.vm.enable_cap("X86_USER_SPACE_MSR", 2)
                result, log = capture_run(cap, m, payload=f"{payload}/{mode}/{cpl}", on_io=_answer_io, on_msr=_answer_msr)
                image = m.image
            out[(payload, mode, cpl)] = (result, log, image)
        out["foreign"] = cap.tracer.foreign
        out["session"] = cap.log
    return out


def _events(log, name):
    return [e for _, e in log.events() if e.name == name]


@pytest.mark.parametrize("key", RUNS, ids=["/".join(map(str, k)) for k in RUNS])
def test_every_run_ends_with_its_userspace_exit_and_agrees_with_stats(session, key):
    result, log, image = session[key]
    assert result.ok or result.outcome is Outcome.HALT, result.detail
    assert log.tracing and log.lost_events == 0, log.tracing_reason
    assert len(log.records) == result.runs
    for r in log.records:
        last = r.events[-1]
        assert last.name == "kvm_userspace_exit" and last.fields["errno"] == 0
        assert last.symbols["reason"] == f"KVM_EXIT_{r.exit.name}"
        assert r.start_ns <= r.events[0].ts_ns and last.ts_ns <= r.end_ns
        # the stats delta of each KVM_RUN counts exactly the emulations traced inside it
        assert r.stats.get("insn_emulation", 0) == sum(e.name == "kvm_emulate_insn" for e in r.events)
        assert r.stats.get("mmio_exits", 0) == isinstance(r.exit, MmioExit)
        assert r.stats.get("halt_exits", 0) == isinstance(r.exit, HltExit)
    # the emulated instructions are the payload's own: RIP inside the image (linear: + CS base)
    lo, hi = image.load_address, image.load_address + len(image.code)
    for e in _events(log, "kvm_emulate_insn"):
        assert lo <= e.fields["csbase"] + e.fields["rip"] < hi, hex(e.fields["rip"])


@pytest.mark.parametrize("mode,cpl", [("real", 0), ("protected", 0), ("long", 0), ("long", 3)])
def test_portio_gives_kvm_pio(session, mode, cpl):
    result, log, _ = session[("portio", mode, cpl)]
    pio = [(e.fields["rw"], e.fields["port"], e.fields["size"], e.fields["val"]) for e in _events(log, "kvm_pio")]
    assert [p for p in pio if p[1] in (0x3000, 0x3002)] == [
        (1, 0x3000, 1, 0xA5), (1, 0x3002, 2, 0xBEEF), (0, 0x3000, 1, 0x5A), (0, 0x3002, 2, 0x1234)]
    # an IN completes when the vCPU runs again: its kvm_pio is in the KVM_RUN after the IO exit
    ins = [i for i, r in enumerate(log.records) if isinstance(r.exit, IoExit) and r.exit.is_in]
    for i in ins:
        assert any(e.name == "kvm_pio" and e.fields["rw"] == 0 for e in log.records[i + 1].events)


@pytest.mark.parametrize("mode", ["long", "protected"])
def test_cpuid_gives_kvm_cpuid_with_its_leaves(session, mode):
    result, log, _ = session[("cpuid", mode, 0)]
    cpuid = _events(log, "kvm_cpuid")
    assert [(e.fields["function"], e.fields["index"]) for e in cpuid] == [(0, 0), (1, 0)]
    assert cpuid[0].fields["rax"] == result.report(0) and cpuid[1].fields["rax"] == result.report(4)
    assert all(isinstance(r.exit, IoExit) for r in log.records)  # CPUID never left the kernel


def test_msr_gives_kvm_msr_with_its_index(session):
    result, log, _ = session[("msr", "long", 0)]
    msr = [(e.fields["write"], e.fields["ecx"], e.fields["data"]) for e in _events(log, "kvm_msr")]
    assert (1, 0x174, 0x10) in msr and (0, 0x174, 0x10) in msr
    assert [r.exit.index for r in log.records if isinstance(r.exit, (RdmsrExit, WrmsrExit))] == [0x474F4F00] * 2


@pytest.mark.parametrize("mode", ["long", "protected"])
def test_mmio_gives_kvm_mmio_with_address_and_value(session, mode):
    _, log, _ = session[("mmio", mode, 0)]
    mmio = [(e.symbols["type"], e.fields["gpa"], e.fields["len"], e.fields["val"]) for e in _events(log, "kvm_mmio")]
    assert ("write", 0xD0000000, 4, 0x12345678) in mmio
    assert any(t in ("read", "unsatisfied-read") and gpa == 0xD0000008 for t, gpa, _, _ in mmio)


def test_one_session_log_holds_every_run_in_order(session):
    log = session["session"]
    assert [r.run for r in log.records] == list(range(len(log.records)))
    assert [r.payload for r in log.records] == [p for k in RUNS for p in [f"{k[0]}/{k[1]}/{k[2]}"] * len(session[k][1].records)]
    assert session["foreign"] == 0  # the kernel's pid filter let nothing else through


def test_exit_log_json_lines_round_trip(session, tmp_path):
    log = session["session"]
    log.write_jsonl(tmp_path / "log.jsonl")
    back = read_jsonl(tmp_path / "log.jsonl")
    assert back == log
    # every exit these payloads made (IO both ways, MMIO both ways, MSR both ways, HLT) comes back
    # with its class and fields; the data of OUTs and MMIO writes byte for byte
    assert {type(r.exit) for r in back.records} >= {IoExit, MmioExit, RdmsrExit, WrmsrExit, HltExit}
    assert [r.exit.to_dict() for r in back.records] == [r.exit.to_dict() for r in log.records]
    assert parse_jsonl(log.iter_jsonl()) == back


def test_summary_counts_every_event_and_run(session):
    _, log, _ = session[("portio", "long", 0)]
    s = summarize_exits(log)
    assert s.method == "events"
    events = [e for _, e in log.events() if e.name != "kvm_userspace_exit"]
    assert sum(k.count for k in s.kernel) == len(events)
    assert sum(k.timed for k in s.kernel) == len(events)  # every run ended with its userspace exit
    assert [(k.kind, k.count) for k in s.userspace] == [("KVM_EXIT_IO", len(log.records))]
    assert abs(sum(k.share for k in s.kernel) - 1) < 1e-9
    text = " ".join(s.table().split())  # the footer is wrapped
    assert "kvm_pio" in text and "to the next traced event of the same KVM_RUN" in text


_OTHER_VM = """
from kvmiso.guest import Machine
import sys
with Machine("spin", mode="long") as m:
    print("running", flush=True)
    try:
        m.run(timeout=float(sys.argv[1]))
    except Exception:
        pass
"""


def test_another_process_running_a_vm_is_never_seen(kvm, tracing):
    other = subprocess.Popen([sys.executable, "-c", _OTHER_VM, "20"], stdout=subprocess.PIPE, text=True, cwd=ROOT)
    try:
        assert other.stdout.readline().strip() == "running"  # its vCPU is emulating a spin loop now
        with Capture() as cap:
            for _ in range(3):
                with Machine("portio", mode="long", kvm=kvm) as m:
                    result, log = capture_run(cap, m, on_io=_answer_io)
                assert result.ok
            assert other.poll() is None  # it ran all along
            mine = cap.tracer.pids
            assert {e.pid for _, e in cap.log.events()} <= mine
            assert any(e.name == "kvm_pio" for _, e in cap.log.events())  # its own events did arrive
            assert cap.tracer.foreign == 0
            assert other.pid not in mine
    finally:
        other.kill()
        other.wait()


def test_timeout_is_a_result_not_an_exception_and_lost_records_are_counted(kvm, tracing):
    with Capture(buffer_kb=16) as cap, Machine("hostile_fuzz", mode="long", kvm=kvm) as m:
        # CPUID forever: an in-kernel exit each time (kvm_exit and kvm_cpuid where CPL0 is native,
        # emulated instructions where it is not), and never one to userspace
        m.vm.write(m.image.symbols["fuzz_code"], bytes([
            0x0F, 0xA2,  # cpuid
            0xEB, 0xFC,  # jmp back to the cpuid
        ]))
        result, log = capture_run(cap, m, timeout=0.3)
    assert result.outcome is Outcome.TIMEOUT and result.detail.startswith("stopped at rip")
    assert [r.exit for r in log.records] == [IntrExit()]
    assert log.records[0].stats["exits"] > 0
    assert log.lost_events > 0  # far more than 16 KiB of records in 0.3 s
    assert "LOST" in summarize_exits(log).table()


def test_without_tracing_the_log_keeps_exits_and_stats(kvm):
    with Machine("portio", mode="long", kvm=kvm) as m:
        result, log = capture(m, trace=False, on_io=_answer_io)
    assert result.ok and not log.tracing and log.tracing_reason == "tracing not requested"
    assert [type(r.exit) for r in log.records] == [IoExit] * result.runs
    assert sum(r.stats.get("exits", 0) for r in log.records) >= result.runs
    assert "not traced" in summarize_exits(log).table()


def test_not_root_captures_what_it_can(kvm):
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged euid")
    with Machine("portio", mode="long", kvm=kvm) as m:
        os.seteuid(65534)
        try:
            result, log = capture(m, on_io=_answer_io)
        finally:
            os.seteuid(0)
    assert result.ok and not log.tracing and "root" in log.tracing_reason
    assert len(log.records) == result.runs and log.records[0].stats


def test_missing_event_named_and_capture_goes_on(kvm, tracing):
    with Machine("cpuid", mode="long", kvm=kvm) as m:
        result, log = capture(m, trace=["kvm:kvm_cpuid", "kvm:kvm_no_such_event"])
    assert result.ok and log.tracing
    assert "not on this kernel: kvm:kvm_no_such_event" in log.tracing_reason
    assert "kvm_userspace_exit not traced" in log.tracing_reason  # so events went by timestamp
    assert [(e.fields["function"]) for _, e in log.events()] == [0, 1]


def test_user_on_exit_hook_still_sees_every_exit(kvm):
    seen = []
    with Machine("portio", mode="long", kvm=kvm) as m:
        result, log = capture(m, trace=False, on_exit=lambda e: seen.append(e.name), on_io=_answer_io)
    assert seen == [r.exit.name for r in log.records] and result.ok


# --- kvmiso trace ----------------------------------------------------------------------------

def kvmiso(*args):
    return subprocess.run([sys.executable, "-m", "kvmiso.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=ROOT)


def test_cli_trace_table_json_and_events(kvm, tracing, tmp_path):
    p = kvmiso("trace", "portio", "--mode", "protected", "--json", str(tmp_path / "t.jsonl"), "--events")
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "traced portio in protected mode at CPL0" in out
    assert "userspace round trips" in out and "KVM_EXIT_IO" in out
    assert "kvm_pio" in out and "port=0x3000" in out  # the raw stream
    assert any(line.startswith("kind ") and line.endswith("max µs") for line in out.splitlines())
    log = read_jsonl(tmp_path / "t.jsonl")
    assert log.tracing and any(e.name == "kvm_pio" for _, e in log.events())
    assert "done: the guest reported DONE" in out


def test_cli_trace_failures(kvm, tracing, tmp_path):
    p = kvmiso("trace", "spin", "--timeout", "0.2")
    assert p.returncode == 1 and "timeout:" in p.stdout
    p = kvmiso("trace", "nonesuch")
    assert p.returncode == 2 and "unknown payload 'nonesuch'" in p.stderr
    p = kvmiso("trace", "portio", "--json", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "cannot write the exit log" in p.stderr


def test_two_kvmiso_processes_tracing_at_once_each_see_only_their_own(kvm, tracing, tmp_path):
    """Issue 6's concurrency case: two `kvmiso trace` processes, each with its own instance,
    overlapping in time; every event in each log comes from that process's own vCPU thread."""
    from kvmiso.observe.tracing.exitlog import read_jsonl

    a_log, b_log = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    cmd = [sys.executable, "-m", "kvmiso.cli", "trace"]
    a = subprocess.Popen(cmd + [READY_SPIN, "--timeout", "600", "--json", str(a_log)], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_counted(a.pid, proc=a)  # a's guest spins now, a's instance tracing it
        # a hang guard, not a time limit: while a's vCPU spins, b's tracefs mkdir, opens and
        # rmdir are slow (measured here: trace portio 16 s, 4.5 s without a; over 60 s on a
        # loaded host)
        b = subprocess.run(cmd + ["portio", "--json", str(b_log)], cwd=ROOT, capture_output=True, text=True,
                           timeout=600)
        assert a.poll() is None, "the two traces did not overlap"
        a.send_signal(signal.SIGINT)  # a writes its partial log and ends
        a.communicate(timeout=60)
    finally:
        a.kill()
        a.wait()
    assert a.returncode == 128 + signal.SIGINT and b.returncode == 0, b.stderr
    logs = {"a": read_jsonl(a_log), "b": read_jsonl(b_log)}
    pids = {k: log.host["pid"] for k, log in logs.items()}
    assert pids["a"] != pids["b"]
    for k, log in logs.items():
        assert log.tracing and log.records
        assert {e.pid for _, e in log.events()} == {pids[k]}  # the CLI runs its vCPU on its main thread
    pio = [e for _, e in logs["b"].events() if e.name == "kvm_pio"]
    assert pio and not [e for _, e in logs["a"].events() if e.name == "kvm_pio" and e.fields.get("port") == 0x3000]


def test_lost_end_records_are_called_lost_not_untraced(kvm, tracing):
    """A trace whose kvm_userspace_exit records were all lost (a full buffer) says so; "not
    traced" is only for a trace that did not enable the event."""
    import dataclasses

    from kvmiso.observe.tracing.capture import assign_events

    with Machine("portio", mode="long", kvm=kvm) as m:
        _, log = capture(m, on_io=_answer_io)
    events = [e for _, e in log.events() if e.name != "kvm_userspace_exit"]  # what a full buffer keeps
    fresh = [dataclasses.replace(r, events=[]) for r in log.records]
    note = assign_events(fresh, events, lost=7, ends_traced=True)
    assert note.startswith("no kvm_userspace_exit record arrived (7 trace records lost)") and "not traced" not in note
    assert "kvm_userspace_exit not traced" in assign_events([dataclasses.replace(r, events=[]) for r in log.records],
                                                            events)
