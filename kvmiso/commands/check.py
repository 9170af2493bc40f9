"""``kvmiso check``: payloads (each on its own VM, under capture), saved exit logs, ``--pid PID``
or ``-- COMMAND``, every exit classified against kvm_mm; or ``--measured DIR``, an access record.
Bad input raises :class:`kvmiso.exitstatus.CliError` (status 2); a fault, an unknown function or
lost evidence is status 1, as a failed test.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..exitstatus import EXIT_FAILED, CliError
from ..interrupt import Interrupted
from .options import (RealFactsMissing, add_guest_args, add_model_args, add_process_args, check_cpl, process_target,
                      read_evidence_file, require_real, space_for_args, watch)

if TYPE_CHECKING:
    from ..isolation import AccessModel, CheckResult, KvmAddressSpace
    from ..isolation.mapset import DenylistSpace
    from ..isolation.measuredresult import MeasuredResult
    from ..observe.accesses.accessrecord import AccessRecord
    from ..observe.accesses.recordruns import RecordRuns
    from ..observe.kernel.evidence import Evidence
    from ..observe.tracing.capture import Capture
    from ..observe.tracing.exitlog import ExitLog
    from ..session import WatchedProcess


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso check``."""
    sp = subparsers.add_parser("check", help="run payloads (or read exit logs) and classify every exit against kvm_mm")
    sp.add_argument("payload", nargs="*", help="a name from guests/, a .S path, or an exit log (.jsonl) "
                    "(or --pid PID, or -- COMMAND ...)")
    add_guest_args(sp)
    add_process_args(sp)
    add_model_args(sp)
    sp.add_argument("--switch-cost", type=float, metavar="NS", help="cost of one address-space switch in ns")
    sp.add_argument("--stack", action="store_true", help="print each fault's call trace, as the RFC does")
    sp.add_argument("--allow-lost", action="store_true",
                    help="lost trace records or missing call chains do not fail the check")
    sp.add_argument("--json", action="store_true", help="print the results as JSON")
    sp.add_argument("--measured", metavar="DIR", help="the access record of kvmiso boot --record-accesses DIR: "
                    "each exit's measured verdict beside the model's, and the access model measured (a record "
                    "kvmiso record made), or per exit the functions that ran and their reads and writes")
    sp.add_argument("--windows", action="store_true", help="with --measured: list every window's functions instead")
    sp.add_argument("--table", action="store_true", help="with --measured: every (function, exit kind) compared")
    sp.add_argument("--exits", action="store_true", help="with --measured: every exit's measured and modeled verdicts")
    for name, what in (("recall", "the access model's recall"), ("precision", "the access model's precision"),
                       ("agreement", "measured and modeled verdicts' agreement per policy, on the exits whose verdicts do not hinge on "
                        "timing or on state the trace does not show")):
        sp.add_argument(f"--min-{name}", type=float, metavar="PCT", help=f"with --measured: exit 1 when {what} is under PCT %%")
    return sp


def run(args: argparse.Namespace) -> int:
    """Each payload runs under capture on its own VM and is checked against that VM's evidence;
    an exit log is checked against the evidence saved with it (--evidence)."""
    from ..isolation import AccessModelError, load_access_model

    if args.measured:
        return cmd_measured(args)
    try:
        access = load_access_model()
    except AccessModelError as e:
        raise CliError(str(e)) from None
    cost = {} if args.switch_cost is None else {"switch_cost_ns": args.switch_cost,
                                                 "switch_cost_source": "given with --switch-cost"}
    if process_target(args) is not None:
        return _check_process(args, access, cost)
    if not args.payload:
        raise CliError("check what? payloads, exit logs, --pid PID or -- COMMAND ...")
    try:
        checked, interrupted = _check_each(args, access, cost)
    except RealFactsMissing as e:
        print(f"kvmiso: {e}", file=sys.stderr)
        return EXIT_FAILED
    _print_checked(args, checked)
    if interrupted is not None:
        raise interrupted
    empty = [_checked_nothing(c.source, c.log) for c in checked if not c.result.exits]
    for line in empty:
        print(f"kvmiso: {line}", file=sys.stderr)
    # a missing mapping, an unknown function or lost evidence is a finding: non-zero, like a failed test
    return EXIT_FAILED if empty or any(c.result.failed(args.allow_lost) for c in checked) else 0


@dataclass
class Seen:
    """What one payload or exit log showed: its log, the evidence and the address space it is
    checked against, and the interruption that cut it short (its log then partial, or None)."""

    log: ExitLog | None
    evidence: Evidence | None = None
    space: KvmAddressSpace | DenylistSpace | None = None
    interrupted: Interrupted | None = None


@dataclass
class Checked:
    """One payload or exit log, checked."""

    source: str
    log: ExitLog
    result: CheckResult


def _check_each(args: argparse.Namespace, access: AccessModel, cost: dict[str, Any]) -> tuple[list[Checked], Interrupted | None]:
    """Every payload and exit log in turn, under one capture session; an interruption ends the
    series after the one it cut short is checked as far as it got."""
    from ..isolation import CheckError, check
    from ..observe.tracing.capture import Capture

    checked: list[Checked] = []
    with Capture() as cap:
        for p in args.payload:
            seen = _saved(args, p) if p.endswith(".jsonl") else _captured(args, p, cap)
            if seen.log is None:  # interrupted before the run began
                return checked, seen.interrupted
            require_real(args, seen.evidence, p)
            try:
                checked.append(Checked(p, seen.log, check(seen.space, seen.log, access, source=p, **cost)))
            except CheckError as e:
                raise CliError(str(e)) from None
            if seen.interrupted is not None:
                return checked, seen.interrupted
    return checked, None


def _saved(args: argparse.Namespace, path: str) -> Seen:
    """An exit log and the evidence saved with it (--evidence)."""
    from ..observe.tracing.exitlog import ExitLogError, read_jsonl

    if not args.evidence:
        raise CliError(f"{path}: an exit log is checked against the evidence saved with it: "
                       f"--evidence FILE (kvmiso trace --json LOG --evidence FILE writes both)")
    try:
        log = read_jsonl(path)
    except OSError as e:
        raise CliError(f"cannot read exit log {path}: {e.strerror}") from None
    except ExitLogError as e:
        raise CliError(str(e)) from None
    evidence = read_evidence_file(args.evidence)
    return Seen(log, evidence, space_for_args(args, evidence))


def _captured(args: argparse.Namespace, payload: str, cap: Capture) -> Seen:
    """``payload`` run under ``cap`` on its own VM, with that VM's evidence."""
    from ..guest import Machine
    from ..session import capture_checked, machine_evidence

    check_cpl(payload, args.mode, args.cpl)
    with Machine(payload, mode=args.mode, cpl=args.cpl) as m:
        try:
            run = capture_checked(m, cap, m.image.name, timeout=args.timeout)
            return Seen(run.log, run.evidence, space_for_args(args, run.evidence, m))
        except Interrupted as e:  # check what was seen, marked incomplete, then stop
            log = e.partial.log if e.partial else None
            if log is None:
                return Seen(None, interrupted=e)
            evidence = machine_evidence(m, log)
            return Seen(log, evidence, space_for_args(args, evidence, m), e)


def _print_checked(args: argparse.Namespace, checked: list[Checked]) -> None:
    """Each result as JSON or as text, an interrupted one marked INCOMPLETE."""
    from ..isolation import result_text

    if args.json:
        print(json.dumps([{"payload": c.source, "incomplete": bool(c.log.incomplete),
                           "incomplete_reason": c.log.incomplete, **c.result.to_dict()} for c in checked], indent=2))
        return
    for c in checked:
        why = c.log.incomplete
        print(result_text(c.result, f"{c.source}{' (INCOMPLETE: ' + why + ')' if why else ''}: ", stack=args.stack) + "\n")


def _check_process(args: argparse.Namespace, access: AccessModel, cost: dict[str, Any]) -> int:
    """check --pid / -- COMMAND: every vCPU of another process, apart and in total; each VM's
    records against that VM's own evidence, where its VMs can be told apart."""
    w, interrupted = watch(args)
    if not w.log.records and interrupted is None:
        raise CliError(f"pid {w.pid}: no KVM_RUN was traced before {w.attached.ended}: nothing to check")
    if args.require_real and (not_own := _not_own(w)):
        print(f"kvmiso: pid {w.pid}: --require-real, but {not_own}", file=sys.stderr)
        return EXIT_FAILED
    per, total = _check_vms(args, w, access, cost)
    _print_process(args, w, per, total)
    if interrupted is not None:
        raise interrupted
    if not total.exits:
        print(f"kvmiso: {_checked_nothing(f'pid {w.pid}', w.log)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if total.failed(args.allow_lost) else 0


def _check_vms(args: argparse.Namespace, w: WatchedProcess, access: AccessModel,
               cost: dict[str, Any]) -> tuple[dict[str, CheckResult], CheckResult]:
    """Each vCPU's records (by name) and all of them, each VM's against its own evidence."""
    import dataclasses

    from ..isolation import check

    per: dict[str, CheckResult] = {}
    total = None
    for vm in [vm for vm in w.vms if vm.records] or w.vms[:1]:  # an empty log (interrupted) is checked too
        space = space_for_args(args, vm.evidence)
        for v in sorted({r.vcpu for r in vm.records}):
            part = dataclasses.replace(w.log, records=[r for r in vm.records if r.vcpu == v])
            part.lost_events = 0  # lost records cannot be told apart by vCPU: counted once, in the total
            part.untraced = dict.fromkeys(w.log.untraced)  # counted for the whole process, not per vCPU
            name = f"vCPU {v}" if v in vm.evidence.threads else f"thread {v}"
            _fold(per, name, check(space, part, access, **cost))
        whole = dataclasses.replace(w.log, records=vm.records)
        whole.lost_events = w.log.lost_events if total is None else 0  # counted once
        result = check(space, whole, access, **cost)
        if total is None:
            total = result
        else:
            total.add(result)
    return per, total


def _print_process(args: argparse.Namespace, w: WatchedProcess, per: dict[str, CheckResult], total: CheckResult) -> None:
    """The per-vCPU results and the total, as JSON or as text."""
    from ..isolation import result_text

    title = f"pid {w.pid} (traced until {w.attached.ended}{', INCOMPLETE' if w.log.incomplete else ''})"
    said = vms_line(w)
    if args.json:
        print(json.dumps({"pid": w.pid, "ended": w.attached.ended, "incomplete": bool(w.log.incomplete),
                          "evidence": w.evidence.source, "vms": said,
                          "vcpus": [{"vcpu": name, **r.to_dict()} for name, r in per.items()], "total": total.to_dict()},
                         indent=2))
        return
    for name, r in per.items():
        print(result_text(r, f"{title} {name}: ", stack=args.stack) + "\n")
    print(result_text(total, f"{title} all vCPUs: ", stack=False) + (f"\n\n{said}" if said else ""))


def _fold(results: dict[str, CheckResult], name: str, result: CheckResult) -> None:
    """``result`` added to ``results[name]``: the same vCPU in several VMs."""
    if name in results:
        results[name].add(result)
    else:
        results[name] = result


def vms_line(w: WatchedProcess) -> str:
    """The VMs of a watched process and what each one's exits were judged on, in one line; ""
    for one VM whose objects were read (nothing to say)."""
    from ..observe.tracing.attach import VM_CREATED
    from ..session import EVIDENCE_EVERY_S

    not_own = _not_own(w)
    if len(w.vms) == 1:
        return f"pid {w.pid}: {not_own}" if not_own else ""
    created = sum(vm.created_ns is not None for vm in w.vms)
    read = [n for n, vm in enumerate(w.vms, 1) if vm.evidence.real]
    line = (f"pid {w.pid}: {len(w.vms)} VMs, one at a time ({created} created while traced, each seen as one "
            f"{VM_CREATED[0]} from {VM_CREATED[1]}); each VM's exits are checked against its own objects where "
            f"kvmiso read them ({_numbered(read) or 'no VM'})")
    return line + (f"; {not_own}: they lived between kvmiso's looks, {EVIDENCE_EVERY_S:g} s apart" if not_own else "")


def _not_own(w: WatchedProcess) -> str:
    """Which of ``w``'s VMs have verdicts that rest on other facts than their own objects: modeled
    ones, or another VM's ("" when none)."""
    vm = w.vms[0]
    if vm.mixed:
        return ("its VMs cannot be told apart (held at once, or their creation not traced): every exit is checked "
                f"against the last one's objects ({vm.evidence.source or 'no evidence'})")
    modeled = [(n, vm) for n, vm in enumerate(w.vms, 1) if vm.records and not vm.evidence.real]
    if not modeled:
        return ""
    if len(w.vms) == 1:
        return f"the objects and page table are modeled ({vm.evidence.source or 'no evidence'})"
    runs = sum(len(vm.records) for _, vm in modeled)
    return (f"the objects and page table of {_numbered([n for n, _ in modeled])} of {len(w.vms)} are modeled "
            f"({runs} KVM_RUN calls judged on them)")


def _numbered(numbers: list[int]) -> str:
    """``VMs 1-3, 7`` from [1, 2, 3, 7]; ``VM 5`` from [5]; "" from []."""
    spans: list[list[int]] = []
    for n in numbers:
        if spans and spans[-1][1] == n - 1:
            spans[-1][1] = n
        else:
            spans.append([n, n])
    text = ", ".join(f"{a}-{b}" if a != b else f"{a}" for a, b in spans)
    return f"VM{'s' * (len(numbers) > 1)} {text}" if numbers else ""


def cmd_measured(args: argparse.Namespace) -> int:
    """check --measured DIR: a record kvmiso record made gets each exit's measured verdict beside
    the model's and the access model measured (:func:`_measured_runs`); any other record is
    listed per window, symbolized, with the functions access.toml does not know."""
    from dataclasses import asdict

    from ..isolation import AccessModelError, load_access_model
    from ..isolation.measured import model_coverage, window_coverage
    from ..observe.accesses.accessrecord import RecordError, read_record
    from ..observe.accesses.accesssummary import summarize, summary_dict, summary_text
    from ..observe.accesses.recordruns import read_runs

    if args.payload or process_target(args) is not None:
        raise CliError("--measured DIR reads a record: give no payload, --pid or -- COMMAND with it")
    try:
        record = read_record(args.measured)
        runs = read_runs(args.measured)
        if runs is not None and not args.windows:
            return _measured_runs(args, record, runs)
        summaries = summarize(record)
        model = load_access_model()
    except OSError as e:
        raise CliError(f"cannot read the access record in {args.measured}: {e.strerror}") from None
    except (RecordError, AccessModelError, ValueError) as e:
        raise CliError(str(e)) from None
    total = model_coverage(summaries, model)
    if args.json:
        out = summary_dict(record, summaries)
        for w, s in zip(out["windows"], summaries):
            w["access_model"] = asdict(window_coverage(s, model))
        out["access_model"] = asdict(total)
        print(json.dumps(out, indent=2))
    else:
        print(summary_text(record, summaries, note=lambda s: window_coverage(s, model).text()))
        print(f"all windows: {total.text()}")
    return 0


def _measured_runs(args: argparse.Namespace, record: AccessRecord, runs: RecordRuns) -> int:
    """The measured check of a ``kvmiso record`` folder (:mod:`kvmiso.session.measuredcheck`);
    status 1 below a ``--min-*`` target."""
    from ..isolation import load_access_model
    from ..isolation.measuredrender import result_dict, result_text
    from ..observe.accesses.accessrecord import RecordError
    from ..observe.kernel.evidence import EvidenceError
    from ..observe.tracing.exitlog import ExitLogError
    from ..session.measuredcheck import measure_record

    try:
        model = load_access_model()
        result = measure_record(record, runs, model)
    except (RecordError, EvidenceError, ExitLogError) as e:
        raise CliError(str(e)) from None
    if args.json:
        print(json.dumps(result_dict(result, record, runs), indent=1))
    else:
        print(result_text(result, record, runs, table=args.table, exits=args.exits))
    below = _below_targets(args, result)
    for line in below:
        print(f"kvmiso: below target: {line}")
    return EXIT_FAILED if below else 0


def _below_targets(args: argparse.Namespace, result: MeasuredResult) -> list[str]:
    """The targets given with --min-recall, --min-precision and --min-agreement that the result
    misses, one line each."""
    from ..isolation.measuredresult import UNMODELED

    out = []
    scores = result.table.scores()
    for name, got, want in (("recall", scores.recall, args.min_recall), ("precision", scores.precision, args.min_precision)):
        if want is not None and got * 100 < want:
            out.append(f"the access model's {name} is {got:.1%}, under {want:g}%")
    if args.min_agreement is not None:
        for policy in result.policies:
            agree, n = result.agreement(policy, UNMODELED)
            if n and agree * 100 < args.min_agreement * n:
                out.append(f"{policy}: measured and modeled verdicts agree on {agree} of {n} exits whose verdicts do "
                           f"not hinge on timing or unseen state ({agree / n:.1%}), under {args.min_agreement:g}%")
    return out


def _checked_nothing(what: str, log: ExitLog) -> str:
    """Why ``what`` had no exit to check, in one line: a check of nothing is not a pass."""
    why = (f"in-kernel events were not traced: {log.tracing_reason}" if not log.tracing
           else "no traced event fell inside a KVM_RUN's isolated window")
    return f"{what}: no exit was checked ({why}): a check of nothing is not a pass"
