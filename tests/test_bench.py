"""The benchmark harness: the compiled loop on the real /dev/kvm (counts, exits, answers,
timestamps; never a wall-clock bound), the statistics as pure logic, the CLI end to end."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import struct
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st
from ready import wait_until_counted

from kvmiso.bench import environment, latency, results, runloop, table
from kvmiso.bench import samples as stats
from kvmiso.bench.overhead import MODEL, SwitchCost, format_isolation, isolation_rows, rfc_switches
from kvmiso.bench.runloop import LoopError
from kvmiso.guest import Machine, build
from kvmiso.interrupt import Interrupted
from kvmiso.kvm import abi
from kvmiso.kvm.exitdecode import decode
from kvmiso.kvm.exits import IoExit, MmioExit

PORT_BENCH = build("bench_out", "long").symbols["PORT_BENCH"]  # guests/lib/kvmiso.inc


def kvmiso(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvmiso.cli", *args], capture_output=True, text=True, timeout=timeout)


def assert_monotonic(t):
    for i in range(t.n):
        assert t.t_start[i] <= t.t_end[i]
        if i + 1 < t.n:
            assert t.t_end[i] <= t.t_start[i + 1]
    if t.c_start is not None:
        assert all(a <= b for a, b in zip(t.c_start, t.c_end))


# --- the compiled loop and its Python twin on the real device ------------------------------------

@pytest.mark.parametrize("cpl", [0, 3])
def test_compiled_loop_runs_n_round_trips(kvm, cpl):
    with Machine("bench_out", kvm=kvm, cpl=cpl) as m, m.vcpu.stats() as s:
        before = s.snapshot()
        t = runloop.compiled_loop(m.vcpu, 500, "io", PORT_BENCH)
        delta = s.snapshot() - before
        assert t.n == 500 and len(t.latencies()) == 500 and len(t.periods()) == 499
        assert_monotonic(t)
        assert all(x > 0 for x in t.latencies())
        assert delta["exits"] >= 500  # every KVM_RUN came back with an exit
        e = decode(m.vcpu.page)
        assert isinstance(e, IoExit) and e.port == PORT_BENCH and not e.is_in


def test_compiled_loop_answers_in_and_mmio_reads(kvm):
    with Machine("bench_in", kvm=kvm) as m:
        t = runloop.compiled_loop(m.vcpu, 100, "io", PORT_BENCH, reply=0x5A)
        assert t.answered == 100
        runloop.compiled_loop(m.vcpu, 1, "io", PORT_BENCH, reply=0x5A)  # the guest consumed the 100th
        assert m.vcpu.get_regs().rax & 0xFF == 0x5A
    with Machine("bench_mmio_read", kvm=kvm) as m:
        t = runloop.compiled_loop(m.vcpu, 100, "mmio", reply=0x12345678)
        assert t.answered == 100
        runloop.compiled_loop(m.vcpu, 1, "mmio", reply=0x12345678)
        assert m.vcpu.get_regs().rax & 0xFFFFFFFF == 0x12345678
    with Machine("bench_hlt", kvm=kvm) as m:
        assert runloop.compiled_loop(m.vcpu, 50, "hlt").n == 50


def test_compiled_loop_stops_at_an_unexpected_exit(kvm):
    with Machine("bench_out", kvm=kvm) as m:
        with pytest.raises(LoopError, match="unexpected exit IO") as e:
            runloop.compiled_loop(m.vcpu, 10, "mmio")
        assert e.value.reason == abi.KVM_EXIT_IO and e.value.timings.n == 0
    with Machine("bench_out", kvm=kvm) as m:
        with pytest.raises(LoopError):  # an OUT to another port (a ucall, say) is not the benchmark's
            runloop.compiled_loop(m.vcpu, 10, "io", port=0xEA)


def test_compiled_loop_survives_a_guest_that_never_exits(kvm):
    with Machine("spin", mode="long", kvm=kvm) as m:
        with pytest.raises(LoopError, match="no exit within"):
            runloop.compiled_loop(m.vcpu, 10, "io", timeout=0.2)


def test_floors_in_c(kvm):
    t = runloop.null_ioctl_loop(kvm, 200)
    assert t.n == 200
    assert_monotonic(t)
    s = runloop.syscall_loop(200)
    assert s.n == 200
    assert_monotonic(s)
    assert runloop.python_null_ioctl_loop(kvm, 50).n == 50


def test_immediate_exit_floor_never_enters_the_guest(kvm):
    with Machine("bench_out", kvm=kvm) as m, m.vcpu.stats() as s:
        before = s.snapshot()
        t = runloop.immediate_exit_loop(m.vcpu, 200)
        p = runloop.python_immediate_exit_loop(m.vcpu, 50)
        assert t.n == 200 and p.n == 50
        assert_monotonic(t)
        assert (s.snapshot() - before).get("exits", 0) == 0  # KVM returned before entering the guest
        assert not m.vcpu.immediate_exit
        runloop.compiled_loop(m.vcpu, 5, "io", PORT_BENCH)  # and the vCPU still runs normally


def test_python_loop_matches_the_compiled_one(kvm):
    with Machine("bench_in", kvm=kvm) as m:
        t = runloop.python_loop(m.vcpu, 200, "io", PORT_BENCH, reply=0x33)
        assert t.n == 200 and t.answered == 200
        assert_monotonic(t)
        runloop.python_loop(m.vcpu, 1, "io", PORT_BENCH, reply=0x33)
        assert m.vcpu.get_regs().rax & 0xFF == 0x33
        with pytest.raises(LoopError):
            runloop.python_loop(m.vcpu, 5, "mmio")


@pytest.mark.parametrize("guest", ["bench_cpuid", "bench_rdmsr", "bench_page_fault", "bench_cr3"])
def test_in_kernel_kind_reports_guest_cycles(kvm, guest):
    image = build(guest, "long")
    with Machine(image, kvm=kvm, memory=latency.BENCH_MEMORY) as m:
        m.vm.write(image.symbols["iterations"], struct.pack("<Q", 10))
        t = runloop.compiled_loop(m.vcpu, 20, "io", PORT_BENCH)
        cycles = latency.guest_cycles(m, 0, 21)
        assert t.n == 20 and all(c > 0 for c in cycles[:20])
        assert cycles[20] == 0  # 20 batches, no more


def test_fast_exit_constructors_build_ordinary_frozen_exits(kvm):
    with Machine("bench_mmio_write", kvm=kvm) as m:
        e = m.vcpu.run()
        assert e == MmioExit(0xD0000000, 4, True, memoryview(b""))
        assert e.to_dict()["exit"] == "MMIO" and repr(e).startswith("MmioExit(address=")
        with pytest.raises(dataclasses.FrozenInstanceError):
            e.address = 0
    with Machine("bench_out", kvm=kvm) as m:
        e = m.vcpu.run()
        assert e == IoExit(PORT_BENCH, 1, 1, False, memoryview(b"")) and hash(e) == hash(IoExit(PORT_BENCH, 1, 1, False, b""))


# --- bench() -----------------------------------------------------------------------------------

def test_bench_measures_skips_and_summarizes(kvm):
    r = latency.bench(kvm, kinds=["out", "hlt", "cpuid", "hypercall"], cpls=(0, 3), samples=40, runs=2,
                      iterations=5)
    keys = {x.key for x in r.results}
    for key in [("null_ioctl", "c", None), ("syscall", "c", None), ("immediate_exit", "c", None), ("out", "c", 0), ("out", "python", 0),
                ("hlt", "c", 0), ("cpuid", "host", 0), ("out", "c", 3)]:
        assert key in keys
    # the guest's own RDTSC timing needs an invariant TSC (QEMU's TCG, under kvmiso boot, has none)
    tsc = runloop.tsc_usable()
    assert (("cpuid", "guest", 0) in keys) == tsc
    skipped = {(s["kind"], s["cpl"]): s["reason"] for s in r.skipped}
    assert "privileged" in skipped[("hlt", 3)] and ("hypercall", 3) in skipped
    # a CPL3 CPUID row exists only where the probe saw KVM intercept CPUID at CPL3
    if r.host["cpuid_intercepted"]["cpl3"]:
        assert ("cpuid", "host", 3) in keys and (("cpuid", "guest", 3) in keys) == tsc
    else:
        assert "CPUID at CPL3 is not intercepted on this host" in skipped[("cpuid", 3)]
        assert ("cpuid", "guest", 3) not in keys
    # a CPL0 hypercall row exists only where the probe saw a hypercall return; KVM handles it in
    # the kernel, so it is timed as CPUID is: from the host, and by the guest where the TSC allows
    hypercall = {k for k in keys if k[0] == "hypercall"}
    if r.host["cpl0_hypercall_returns"]:
        assert ("hypercall", "host", 0) in hypercall and (("hypercall", "guest", 0) in hypercall) == tsc
    else:
        assert "never returns" in skipped[("hypercall", 0)] and not hypercall
    out = next(x for x in r.results if x.key == ("out", "c", 0))
    assert out.summary["n"] == 80 and len(out.runs) == 2 and out.insns == 2
    floor = next(x for x in r.results if x.key == ("null_ioctl", "c", None))
    assert out.ratio_to_floor == out.summary["p50"] / floor.summary["p50"]  # a ratio, not a race
    d = json.loads(json.dumps(r.to_dict()))
    assert d["schema_version"] == results.SCHEMA_VERSION and d["complete"] is True
    for k in ("cpu", "kernel", "vendor", "cpl0", "mitigations", "pinning", "governor", "tsc", "under_hypervisor"):
        assert k in d["host"]
    assert "out" in table.format_table(r)


def test_a_cpu_that_cannot_be_pinned_is_a_recorded_warning(capsys):
    p = environment.pin(cpu=100000)
    assert p["pinned"] is False and "100000" in capsys.readouterr().err


# --- statistics as pure logic ------------------------------------------------------------------

values = st.lists(st.floats(min_value=0, max_value=1e9, allow_nan=False), min_size=1, max_size=200)


@given(values, st.floats(min_value=0, max_value=100))
def test_percentile_lies_within_the_values(v, q):
    o = sorted(v)
    assert o[0] <= stats.percentile(o, q) <= o[-1]


@given(values)
def test_summary_is_ordered_and_p50_is_the_median(v):
    s = stats.summarize_samples(v)
    assert s["min"] <= s["p50"] <= s["p90"] <= s["p99"] <= s["max"]
    assert s["p50"] == pytest.approx(sorted(v)[len(v) // 2] if len(v) % 2 else
                                     (sorted(v)[len(v) // 2 - 1] + sorted(v)[len(v) // 2]) / 2)
    assert s["n"] == len(v)


def test_unstable_runs_are_flagged():
    assert stats.warnings([100, 101, 99], [100, 101, 99]) == []
    assert stats.warnings([100, 150, 80], [100, 101, 99]) == ["disturbed: run means differ by 33%"]
    assert stats.warnings([100, 101, 99], [100, 150, 80]) == ["unstable: run p50s differ by 33%"]
    with pytest.raises(ValueError):
        stats.summarize_samples([])


def test_the_run_off_its_siblings_is_the_unstable_one():
    assert stats.unstable_runs([100, 101, 99, 130], [100, 101, 99, 130]) == [3]
    assert stats.unstable_runs([100, 101, 99, 100], [100, 101, 99, 150]) == [3]  # a long tail in one run
    assert stats.unstable_runs([100, 130], [100, 130]) == []  # of two runs neither is the odd one out
    assert stats.stable_p50([100, 101, 99, 130]) == 100


def test_an_unstable_run_is_measured_again_not_pooled(kvm):
    """A run a neighbour slowed (here: a real run's samples made half as slow again) is dropped
    for a new one; the others stay, and the row says how many were replaced."""
    with Machine("bench_out", kvm=kvm) as m:
        base = runloop.compiled_loop(m.vcpu, 200, expect="io", port=m.image.symbols["PORT_BENCH"]).latencies()
    col, key = latency._Collector(), ("out", "c", 0)
    for run in (base, base, [v * 1.5 for v in base]):
        col.add(key, list(run))
    assert col.keep_stable([key], 3) is True and len(col.rows[key]) == 3  # unstable, nothing to swap yet
    col.add(key, list(base))  # the run measured again
    assert col.keep_stable([key], 3) is False
    assert col.rows[key] == [base, base, base] and col.replaced[key] == 1
    (row,) = latency._rows(col, {"iterations": 1})
    assert row.replaced == 1 and row.to_dict()["replaced"] == 1 and row.summary["stable_p50"] == row.runs[0]["p50"]


def test_isolation_rule_and_overhead():
    assert rfc_switches("out") == 2 and rfc_switches("null_ioctl") == 0
    # each touch leaves kvm_mm and comes back before the next VM entry, as `kvmiso check` counts
    assert rfc_switches("page_fault", iterations=100) == pytest.approx(2.02)
    assert rfc_switches("cpuid", iterations=100) == pytest.approx(0.02)
    res = results.BenchResult({}, {}, [results.Result("out", "c", 0, stats.summarize_samples([1000, 1000]), [])])
    row = isolation_rows(res, SwitchCost(100, "given"))[0]
    assert row["added_ns"] == 200 and row["added_pct"] == 20
    row = isolation_rows(res, SwitchCost(100, "given"), switches={"out": 3})[0]
    assert row["added_ns"] == 300 and row["switch_source"] == MODEL
    row = isolation_rows(res, SwitchCost(100, "given"), switches={("out", 0): 4, ("out", 3): 9})[0]
    assert row["added_ns"] == 400  # (kind, cpl) keys: this row is CPL0
    assert isolation_rows(res, SwitchCost(None, "unknown"))[0]["added_ns"] is None



def test_isolation_table_columns_line_up_for_the_longest_kind():
    res = results.BenchResult({}, {}, [results.Result(k, "c", None if k == "immediate_exit" else 0,
                                                      stats.summarize_samples([1000, 1000]), [])
                                       for k in ("immediate_exit", "out")])
    header, *rows = format_isolation(isolation_rows(res, SwitchCost(100, "given")), SwitchCost(100, "given")).splitlines()[1:-1]
    assert "(modeled)" in header and len(rows) == 2
    for row in rows:
        assert row.index(" c ") == header.index("path") - 1, (header, row)


# --- the command line ----------------------------------------------------------------------------

def test_cli_bench_small_run_writes_a_result_file(kvm, tmp_path):
    out = tmp_path / "r.json"
    p = kvmiso("bench", "--kinds", "out,cpuid", "--samples", "30", "--runs", "2", "--iterations", "5",
               "--json", str(out), "--isolation", "--switch-cost", "100")
    assert p.returncode == 0, p.stderr
    assert "null_ioctl" in p.stdout and "isolation overhead at 100 ns per switch (given with --switch-cost)" in p.stdout
    d = json.loads(out.read_text())
    assert d["complete"] and d["settings"]["command"].startswith("kvmiso bench --kinds out,cpuid")
    # the in-kernel kind is timed by the guest where the TSC is invariant, else from the host
    cpuid = ("cpuid", "guest" if runloop.tsc_usable() else "host")
    assert {(r["kind"], r["path"]) for r in d["results"]} >= {("out", "c"), ("out", "python"), cpuid}
    iso = {(r["kind"], r["path"]): r for r in d["settings"]["isolation"]["rows"]}
    assert iso[("out", "c")]["switch_source"] == MODEL and iso[("out", "c")]["switches"] >= 2  # entry + return
    assert iso[cpuid]["switch_source"] != MODEL


def test_cli_bench_bad_input(kvm):
    p = kvmiso("bench", "--kinds", "out,warp")
    assert p.returncode == 2 and "unknown kind(s) warp" in p.stderr
    p = kvmiso("bench", "--switch-cost", "5")
    assert p.returncode == 2 and "--isolation" in p.stderr
    p = kvmiso("bench", "--regions", "modern")
    assert p.returncode == 2 and "--isolation" in p.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_cli_bench_ctrl_c_writes_what_was_measured(kvm, tmp_path, sig):
    out = tmp_path / "r.json"
    proc = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "bench", "--kinds", "out", "--samples", "300000",
                             "--runs", "1", "--no-python", "--json", str(out)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # the floors make no exit (KVM_RUN with immediate_exit never enters the guest) and the host
    # probe's guests a few, or thousands where a build intercepts more of them: a vCPU past
    # 100,000 exits is the `out` kind's (330,000 here), so the floors are done and the kind is not
    wait_until_counted(proc.pid, "exits", proc=proc, at_least=100_000)
    os.kill(proc.pid, sig)
    stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, stderr
    assert out.exists(), f"no {out.name}: {stderr}"
    d = json.loads(out.read_text())
    assert d["complete"] is False and f"interrupted by {sig.name} during" in d["incomplete_reason"]
    assert stderr.strip().splitlines()[-1] == f"kvmiso: interrupted by {sig.name}"
    assert any(r["kind"] == "null_ioctl" for r in d["results"])
    assert "INCOMPLETE" in stdout


def test_ctrl_c_keeps_the_interrupted_runs_samples(kvm, monkeypatch):
    real = runloop.compiled_loop
    calls = []

    def interrupted_midway(vcpu, n, *args, **kw):
        calls.append(n)
        if len(calls) < 2:  # the warm-up runs whole
            return real(vcpu, n, *args, **kw)
        raise Interrupted(signal.SIGINT, real(vcpu, n // 2, *args, **kw))  # Ctrl-C mid-loop

    monkeypatch.setattr(runloop, "compiled_loop", interrupted_midway)
    r = latency.bench(kvm, kinds=["out", "in"], samples=100, runs=2, python=False)
    assert r.complete is False and r.incomplete_reason == "interrupted by SIGINT during out at CPL0"
    (row,) = [x for x in r.results if x.key == ("out", "c", 0)]
    assert row.summary["n"] == 50 and not any(x.kind == "in" for x in r.results)


def test_cli_bench_plot_or_a_clear_message(kvm, tmp_path):
    png = tmp_path / "b.png"
    p = kvmiso("bench", "--kinds", "out", "--samples", "20", "--runs", "1", "--plot", str(png))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert p.returncode == 2 and "pip install 'kvmiso[plot]'" in p.stderr
        assert not png.exists()  # refused before measuring, not after
    else:
        assert p.returncode == 0, p.stderr
        assert png.read_bytes()[:4] == b"\x89PNG"


def test_a_kind_that_fails_at_run_time_is_skipped_with_what_happened(kvm, monkeypatch):
    # pretend HLT were legal at CPL3: the guest takes #GP, the kind is skipped, the others run
    monkeypatch.setitem(latency.KINDS, "hlt", dataclasses.replace(latency.KINDS["hlt"], cpl3=None))
    r = latency.bench(kvm, kinds=["hlt", "out"], cpls=(3,), samples=20, runs=1, python=False)
    (skip,) = [s for s in r.skipped if s["kind"] == "hlt"]
    assert "failed in run 1: the guest took #GP" in skip["reason"]
    assert any(x.key == ("out", "c", 3) for x in r.results)


def test_cli_bench_on_a_cpu_that_cannot_be_pinned(kvm, tmp_path):
    out = tmp_path / "r.json"
    p = kvmiso("bench", "--kinds", "out,parallel", "--samples", "20", "--runs", "1", "--cpu", "100000",
               "--json", str(out))
    assert p.returncode == 0, p.stderr
    assert "cannot pin to CPU 100000" in p.stderr
    d = json.loads(out.read_text())
    assert d["host"]["pinning"]["pinned"] is False and d["host"]["pinning"]["requested"] == 100000


def test_a_signal_between_kvm_runs_stops_the_compiled_loop(kvm):
    """The C loop issues KVM_RUN after KVM_RUN without Python in between: a SIGINT landing
    between two of them used to be noted and then wait for the whole loop. The wakeup-fd kicker
    stops it at once. The handler here only notes the signal, so only that kick can stop it."""
    import threading

    from ready import wait_until_counted

    noted = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        with Machine(build("bench_out", "long"), kvm=kvm) as m:
            def send() -> None:
                try:
                    wait_until_counted(os.getpid(), "exits")  # the loop is under way
                finally:  # even if that wait failed: the loop must not run out its 600 s
                    signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

            sender = threading.Thread(target=send)
            sender.start()
            with pytest.raises(LoopError, match="the vCPU was kicked") as info:
                runloop.compiled_loop(m.vcpu, 50_000_000, "io", PORT_BENCH, timeout=600)
            sender.join()
    finally:
        signal.signal(signal.SIGINT, old)
    assert noted == [signal.SIGINT] and 0 < info.value.timings.n < 50_000_000


def test_python_overhead_for_every_userspace_exit_kind_at_both_cpls(kvm):
    kinds = [k for k, kind in latency.KINDS.items() if kind.guest and not kind.in_kernel
             and k not in ("vm_create", "parallel")]
    r = latency.bench(kvm, kinds=kinds, cpls=(0, 3), samples=20, runs=1, warmup=5)
    d = r.to_dict()
    got = {(o["kind"], o["cpl"]): o for o in d["python_overhead"]}
    expected = {(k, cpl) for k in kinds for cpl in (0, 3) if not (cpl == 3 and latency.KINDS[k].cpl3)}
    assert set(got) == expected | {("immediate_exit", None), ("null_ioctl", None)}
    p50 = {(x["kind"], x["cpl"], x["path"]): x["summary"]["p50"] for x in d["results"]}
    for (kind, cpl), o in got.items():
        assert o["added_ns"] == p50[kind, cpl, "python"] - p50[kind, cpl, "c"]
        assert o["ratio"] == p50[kind, cpl, "python"] / p50[kind, cpl, "c"]
    assert "Python API over the compiled loop" in table.format_table(r)
