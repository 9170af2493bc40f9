"""`kvmiso report`: the whole picture of a host in one command.

It probes the host, runs the guest suite under capture (one tracefs session), checks every exit
against kvm_mm (the RFC's 2019 set and the ``modern`` set), runs a short benchmark, and writes
``report.json``, the exit log, the benchmark result file and, with matplotlib, a latency plot.
A part that cannot run here raises :class:`Unavailable` and is reported as skipped with the
reason; the report still gives the rest. Any other exception is a bug and shows as one.
Interrupted (SIGINT, SIGTERM), it writes ``report.json`` with what was done, marked
``"complete": false``, and raises :class:`kvmiso.interrupt.Interrupted` with the Report.
"""

from __future__ import annotations

import contextlib
import json
import signal
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from ..bench.results import BenchResult
from ..guest import GuestTimeout, Machine, Outcome, RunResult
from ..guest.probe import fingerprint, probe
from ..guest.suite import SuiteEntry, suite
from ..interrupt import Interrupted
from ..kvm import Kvm
from ..observe.kernel.evidence import Evidence
from ..observe.tracing.capture import Capture
from ..observe.tracing.exitlog import ExitLog
from ..output import OutputError, write_whole

SUITE_TIMEOUT = 5.0
EXPECTED_TIMEOUT = 0.5  # for payloads built to spin: enough to prove the stop, no more
# The checks the report runs: (label, policy, region file): the RFC's 2019 set, the same plus
# what a 6.x kernel allocates apart, ASI's denylist, and the 2022 ASI RFC's allowlist.
CHECKS = (("rfc-v1", "rfc-v1", None), ("rfc-v1+modern", "rfc-v1", "modern"), ("asi", "asi", None),
          ("asi-2022", "asi-2022", None))
BENCH = {"kinds": ("out", "in", "mmio_write", "mmio_read", "hlt", "cpuid", "rdmsr", "page_fault"),
         "cpls": (0, 3), "samples": 2000, "runs": 3}


class Unavailable(Exception):
    """A part of the report that cannot run on this host; the message says why."""


@dataclass
class Report:
    """What ``kvmiso report`` found: its parts by name, those skipped (with the reason), and
    whether it ran to its end."""

    parts: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    text: dict[str, str] = field(default_factory=dict)  # tables for the terminal summary
    started: float = field(default_factory=time.time)
    stage: str = ""  # what it is doing now
    incomplete_reason: str = ""  # empty when it ran to its end
    error: str = ""  # the bug that stopped it, if one did

    @property
    def complete(self) -> bool:
        """Whether the report ran to its end (no interruption, no error)."""
        return not self.incomplete_reason

    def part(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one part; Unavailable makes it 'skipped' with the reason. Anything else is a bug
        and goes up."""
        try:
            self.parts[name] = fn()
        except Unavailable as e:
            self.skipped[name] = str(e)
            self.parts[name] = None
        return self.parts[name]

    def to_dict(self) -> dict[str, Any]:
        """report.json: every part, the skipped ones with their reasons, and ``complete``."""
        d = {"kvmiso_report": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
             "elapsed_s": round(time.time() - self.started, 1), "complete": self.complete, **self.parts,
             "skipped": self.skipped}
        if self.incomplete_reason:
            d["incomplete_reason"] = self.incomplete_reason
        if self.error:
            d["error"] = self.error
        return d

    def write(self, path: Path) -> None:
        """report.json at ``path``."""
        path.write_text(json.dumps(self.to_dict(), indent=2, default=str))


@dataclass
class SuiteRun:
    """One suite entry's run: its result, its exit log (None for a run kept out of the
    capture) and the evidence of its VM (None when not captured)."""

    entry: SuiteEntry
    result: RunResult
    log: ExitLog | None
    evidence: Evidence | None = None  # read while the VM lived


def run_suite(kvm: Kvm, cap: Capture, hypercall_returns: bool, runs: list[SuiteRun]) -> list[SuiteRun]:
    """Every suite entry on its own VM, under ``cap``, appended to ``runs`` as it ends (so an
    interruption keeps the runs done); the evidence is read while the VM lives."""
    from .capture import capture_checked

    for entry in suite(hypercall_returns):
        timeout = EXPECTED_TIMEOUT if entry.expected is Outcome.TIMEOUT else SUITE_TIMEOUT
        with Machine(entry.payload, mode=entry.mode, cpl=entry.cpl, kvm=kvm) as m:
            entry.setup(m)
            if entry.expected is Outcome.TIMEOUT:
                # built to spin inside one KVM_RUN: traced, it would fill the buffer with
                # millions of emulator events and drown every other count, so it runs bare
                try:
                    result = m.run(timeout=timeout, **entry.run_kwargs())
                except GuestTimeout as e:
                    result = e.result
                runs.append(SuiteRun(entry, result, None))
                continue
            got = capture_checked(m, cap, entry.label, timeout=timeout, **entry.run_kwargs())
            runs.append(SuiteRun(entry, got.result, got.log, got.evidence))
    return runs


def suite_part(runs: list[SuiteRun]) -> list[dict[str, Any]]:
    """report.json's suite: each run's outcome against the one it was built to reach."""
    out = []
    for r in runs:
        kinds: dict[str, int] = {}
        for e in r.result.exits:
            kinds[e.name] = kinds.get(e.name, 0) + 1
        out.append({"label": r.entry.label, "outcome": r.result.outcome, "expected": r.entry.expected,
                    "as_expected": r.result.outcome is r.entry.expected, "detail": r.result.detail,
                    "runs": r.result.runs, "exits": kinds, "stats_delta": r.result.stats,
                    "captured": r.log is not None})
    return out


def isolation_part(runs: list[SuiteRun], rep: Report) -> dict[str, Any]:
    """Each run checked under each policy against its own VM's evidence, then folded."""
    from ..isolation import check, load_access_model, result_text
    from .modelcheck import layout_of, space_for

    runs = [r for r in runs if r.log is not None]
    access = load_access_model()
    totals = {}
    for label, policy, regions in CHECKS:
        total = None
        for r in runs:
            res = check(space_for(layout_of(r.evidence), policy, regions), r.log, access, source=r.entry.label)
            if total is None:
                total = res
            else:
                total.add(res)
        totals[label] = total.to_dict()
        rep.text[f"isolation:{label}"] = result_text(total, f"{label}: ")
    evidence = runs[0].evidence if runs else None
    if evidence is not None:
        totals["evidence"] = {"source": evidence.source, "checks": [{"what": w, "agreed": ok, "detail": d}
                                                                   for w, ok, d in evidence.checks]}
    return totals


def bench_part(kvm: Kvm, out_dir: Path, rep: Report) -> dict[str, Any]:
    """The short benchmark, written to bench.json (and latency.png with matplotlib). An
    interrupted benchmark keeps what it measured and raises Interrupted."""
    from ..bench.latency import bench
    from ..bench.runloop import NotBuilt
    from ..bench.table import format_table

    try:
        result = bench(kvm, BENCH["kinds"], BENCH["cpls"], samples=BENCH["samples"], runs=BENCH["runs"])
    except NotBuilt as e:
        raise Unavailable(str(e)) from None
    write_whole(out_dir / "bench.json", "the benchmark results", result.write)
    rep.text["bench"] = format_table(result)
    if not result.complete:  # bench() stops at a signal and returns what it measured
        rep.parts["bench"] = result.to_dict()
        raise Interrupted(signal.Signals[result.interrupted_by])
    rep.part("plot", lambda: _plot(result, out_dir / "latency.png"))
    return result.to_dict()


def _plot(result: BenchResult, path: Path) -> str:
    try:
        from ..bench.plot import plot

        write_whole(path, "the plot", lambda name: plot(result, str(name)))
    except ImportError:
        raise Unavailable("matplotlib is not installed (pip install -e '.[plot]')") from None
    return str(path)


def _suite_parts(rep: Report, kvm: Kvm, hypercall_returns: bool, out_dir: Path) -> list[SuiteRun]:
    """The guest suite under one capture session, then the parts made of what it recorded:
    written even when the suite was interrupted, from the runs that ended."""
    from ..observe.tracing.exitstat import summarize_exits

    runs: list[SuiteRun] = []
    with Capture() as cap:
        try:
            run_suite(kvm, cap, hypercall_returns, runs)
        finally:
            rep.parts["suite"] = suite_part(runs)
            write_whole(out_dir / "exitlog.jsonl", "the exit log", cap.log.write_jsonl)
            rep.parts["trace"] = {"tracing": cap.log.tracing, "tracing_reason": cap.log.tracing_reason,
                                  "lost_events": cap.log.lost_events, "records": len(cap.log.records),
                                  "events": sum(len(r.events) for r in cap.log.records)}
            rep.text["trace"] = summarize_exits(cap.log).table()
            if not cap.log.tracing:
                rep.skipped["in-kernel events"] = cap.log.tracing_reason
    return runs


FILES = ("report.json", "exitlog.jsonl", "bench.json", "latency.png")  # what build() writes in its folder
STAGES = ("probing the host", "running the guest suite", "checking every exit against kvm_mm",
          "a short benchmark")


def build(out_dir: Path, progress: Callable[[str], None] | None = None) -> Report:
    """Run every part, write ``out_dir/report.json`` and return the Report. ``progress`` hears
    each stage as it starts. Interrupted, it writes what was done (``"complete": false``) and
    raises Interrupted whose ``partial`` is the Report."""
    rep = Report()
    out_dir.mkdir(parents=True, exist_ok=True)

    def stage(text: str) -> None:
        rep.stage = text
        if progress is not None:
            progress(text)

    try:
        with Kvm() as kvm:
            stage(STAGES[0])
            host = rep.part("host", lambda: probe(kvm))
            rep.parts["fingerprint"] = fingerprint(host)
            if not host["kallsyms"]["real_addresses"]:  # said once, here; the check still runs
                rep.skipped["kernel addresses"] = (f"/proc/kallsyms: {host['kallsyms'].get('reason', '')}: kernel "
                                                   "objects are placed at modeled addresses")
            stage(STAGES[1])
            runs = _suite_parts(rep, kvm, host["cpl0_hypercall_returns"], out_dir)
            stage(STAGES[2])
            rep.part("isolation", lambda: isolation_part(runs, rep))
            stage(STAGES[3])
            rep.part("bench", lambda: bench_part(kvm, out_dir, rep))
    except KeyboardInterrupt as e:
        stop = Interrupted.of(e, rep)
        rep.incomplete_reason = f"interrupted by {stop.signal.name} while {rep.stage}"
        raise stop from None
    except BaseException as e:
        rep.incomplete_reason = f"stopped by an error while {rep.stage}"
        rep.error = "".join(traceback.format_exception_only(e)).strip()
        raise
    finally:
        # after an error, that error is the one to report, even if report.json cannot be written
        with contextlib.suppress(OutputError) if rep.error else contextlib.nullcontext():
            write_whole(out_dir / "report.json", "the report", rep.write)
    return rep


def print_summary(rep: Report, out_dir: Path) -> None:
    """The terminal summary: each part's table, what was skipped and why, the files written."""
    host = rep.parts.get("host")
    if host:
        cpl0 = "native" if host["cpl0_native"] else "emulated"
        print(f"host     {host['cpu']}, Linux {host['kernel']}, {host['vendor']} (CPL0 guest code {cpl0})")
        print(f"         {host['vendor_notes']}")
    s = rep.parts.get("suite")
    if s:
        ok = sum(x["as_expected"] for x in s)
        bare = [x["label"] for x in s if not x["captured"]]
        print(f"\n== guest suite: {ok}/{len(s)} payload runs ended as expected")
        if bare:
            print(f"  not traced (built to spin inside KVM_RUN until the deadline): {', '.join(bare)}")
        for x in s:
            if not x["as_expected"]:
                print(f"  UNEXPECTED {x['label']}: {x['outcome']} (expected {x['expected']}): {x['detail']}")
    t = rep.parts.get("trace")
    if t:
        print(f"\n== exits by kind ({t['records']} KVM_RUN calls, {t['events']} in-kernel events, "
              f"{t['lost_events']} lost)")
        print(rep.text["trace"])
    if rep.parts.get("isolation"):
        print("\n== kvm_mm: what stays isolated, what switches, what faults")
        for label, _policy, _regions in CHECKS:
            print(rep.text[f"isolation:{label}"] + "\n")
    if rep.parts.get("bench"):
        print(f"== KVM_RUN round trips (short run: {BENCH['samples']} samples x {BENCH['runs']} runs; "
              "`kvmiso bench` for the full method)")
        print(rep.text["bench"])
    for name, why in rep.skipped.items():
        print(f"\nskipped {name}: {why}")
    print("\nwrote " + ", ".join(str(out_dir / f) for f in FILES if (out_dir / f).exists()))
    if not rep.complete:
        print(f"INCOMPLETE: {rep.incomplete_reason}; report.json holds what was done (\"complete\": false)")


def suite_ok(rep: Report) -> bool:
    """Whether every suite payload ended as it was built to (kvmiso report's exit status)."""
    s = rep.parts.get("suite")
    return bool(s) and all(x["as_expected"] for x in s)
