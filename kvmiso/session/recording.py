"""The guest runs behind an access record, made inside the recorded boot (``kvmiso boot
--record-accesses DIR -- kvmiso record DIR``, :mod:`kvmiso.commands.record`).

Every suite entry (or those of the payloads named) runs twice on a fresh VM. First plainly: the
record's windows of that run are the measured exits, and the VM's evidence (its objects at their
addresses, the live page table) is read through BPF+BTF right after the run, while the VM lives,
in the same boot. Then under capture, with call chains: the model's verdict for the same exits
comes from that exit log, checked against the plain run's evidence. A mark after each run cuts
the record into runs (:mod:`kvmiso.observe.accesses.recordruns`); the record is paused while the
traced run runs (its windows would hold the tracer's own accesses, tens of thousands per exit).

>>> from pathlib import Path
>>> record_suite(Path("/tmp/rec"), ["portio"], timeout=30.0)  # doctest: +SKIP
[]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..exitstatus import CliError
from ..guest import GuestTimeout, Machine, Outcome, RunResult
from ..guest.suite import SuiteEntry, suite
from ..host import Host
from ..kvm import Kvm
from ..observe.accesses.recordmark import mark
from ..observe.accesses.recordruns import FIELDS, RUNS_DIR, START_MARK, RecordedRun, run_file, write_runs
from ..observe.kernel.btf import Btf, BtfError
from ..observe.kernel.btffields import flatten
from ..observe.kernel.evidence import Evidence, collect_evidence, write_evidence
from ..observe.tracing.capture import Capture
from .capture import capture_run

SPIN_TIMEOUT = 0.5  # a payload built to spin: enough to prove the stop


def record_suite(directory: Path, payloads: list[str], timeout: float) -> list[str]:
    """Run the suite's entries (or those of ``payloads``) plainly and traced, one after the
    other, writing what the record needs into ``directory``, each entry's line printed as it
    ends. The labels of the entries whose plain run did not end as the suite expects."""
    from ..guest.probe import hypercall_returns

    if not directory.is_dir():
        raise CliError(f"{directory}: no such folder (kvmiso boot --record-accesses DIR makes it)")
    (directory / RUNS_DIR).mkdir(exist_ok=True)
    host = Host.read()
    vendor = host.vendor or ""
    runs: list[RecordedRun] = []
    evidence: list[Evidence] = []
    with Kvm() as kvm:
        entries = _entries(payloads, hypercall_returns(kvm))
        mark(START_MARK)  # the probe's windows above are nobody's
        for i, entry in enumerate(entries):
            run, ev = _record_entry(directory, kvm, i, entry, timeout)
            runs.append(run)
            evidence.append(ev)
            write_runs(directory, host.kernel, vendor, runs)
            print(f"{entry.label}: {run.outcome} ({len(run.exits)} KVM_RUN calls); traced: "
                  f"{run.traced_outcome or 'not traced'}; evidence: {ev.source}", flush=True)
    _write_fields(directory, vendor, evidence)
    failed = [r.label for r in runs if r.outcome != _expected(entries, r)]
    print(f"kvmiso record: {len(runs)} entries, each run plainly and traced, in {directory}"
          + (f"; not as expected: {', '.join(failed)}" if failed else ""))
    return failed


def _entries(payloads: list[str], hypercall_ok: bool) -> list[SuiteEntry]:
    """The suite, or its entries of the named payloads (``portio``) or labels (``portio/long``)."""
    every = suite(hypercall_ok)
    if not payloads:
        return every
    chosen = [e for e in every if e.payload in payloads or e.label in payloads]
    unknown = [p for p in payloads if not any(p in (e.payload, e.label) for e in every)]
    if unknown:
        raise CliError(f"not in the suite: {', '.join(unknown)} (its labels: {', '.join(e.label for e in every)})")
    return chosen


def _expected(entries: list[SuiteEntry], run: RecordedRun) -> str:
    return str(entries[run.index].expected)


def _record_entry(directory: Path, kvm: Kvm, index: int, entry: SuiteEntry,
                  timeout: float) -> tuple[RecordedRun, Evidence]:
    """The entry's plain run, its mark and its VM's evidence; then its traced run and mark."""
    spins = entry.expected is Outcome.TIMEOUT
    with Machine(entry.payload, mode=entry.mode, cpl=entry.cpl, kvm=kvm) as m:
        entry.setup(m)
        result = _run(m, entry, SPIN_TIMEOUT if spins else timeout)
        run = RecordedRun(index, entry.label, entry.payload, entry.mode, entry.cpl, str(result.outcome),
                          [e.name for e in result.exits], run_file(index, entry.label, "evidence.json"))
        # the record pauses from here to the traced run's mark: reading the evidence runs no
        # guest, and the traced run's windows would be the tracer's accesses, tens of MB
        mark(run.plain_mark, pause=True)
        ev = collect_evidence(m.vm, m.vendor or "")
        write_evidence(ev, directory / run.evidence)
    with Machine(entry.payload, mode=entry.mode, cpl=entry.cpl, kvm=kvm) as m:
        entry.setup(m)
        if spins:  # traced, it would fill the buffer with millions of events (as report does)
            traced = _run(m, entry, SPIN_TIMEOUT)
        else:
            with Capture() as cap:
                traced, log = capture_run(cap, m, timeout=timeout, payload=entry.label, **entry.run_kwargs())
            run.log = run_file(index, entry.label, "trace.jsonl")
            log.write_jsonl(directory / run.log)
        run.traced_outcome, run.traced_exits = str(traced.outcome), [e.name for e in traced.exits]
    mark(run.traced_mark)
    return run, ev


def _run(m: Machine, entry: SuiteEntry, timeout: float) -> RunResult:
    """The entry's run, a timeout being a result like any other (a payload built to spin)."""
    try:
        return m.run(timeout=timeout, **entry.run_kwargs())
    except GuestTimeout as e:
        return e.result


def _write_fields(directory: Path, vendor: str, evidence: list[Evidence]) -> None:
    """fields.json: the members of every object's C type, from this kernel's BTF (the record is
    read on another kernel). Per-CPU variables are named from kallsyms, which lists them at
    their offsets in a CPU's unit."""
    try:
        btf = Btf.running(tuple(m for m in ("kvm", vendor) if (Path("/sys/kernel/btf") / m).exists()))
    except BtfError as e:
        print(f"kvmiso record: no fields.json: {e}", file=sys.stderr)
        return
    types = {}
    for o in {o.ctype: o for ev in evidence for o in ev.objects}.values():
        flat = flatten(btf, o.ctype)
        if flat is not None:
            types[o.ctype] = flat
    doc = {"source": f"btf: {btf.source}", "types": types}
    (directory / FIELDS).write_text(json.dumps(doc))


__all__ = ["record_suite"]
