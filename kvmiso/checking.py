"""The commands that hand what kvmiso saw to the kvm_mm check: ``kvmiso model``, ``kvmiso
check`` (payloads, saved logs, ``--pid PID``, ``-- COMMAND``) and ``kvmiso trace`` of another
process. Bad input raises :class:`kvmiso.exitstatus.CliError` (status 2); a fault, an unknown function
or lost evidence is status 1, as a failed test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Any, Callable

from .exitstatus import EXIT_FAILED, CliError
from .guest import Machine
from .interrupt import Interrupted

if TYPE_CHECKING:
    from .observe.exitlog import ExitLog
    from .session import WatchedProcess


def process_target(args: argparse.Namespace) -> int | list[str] | None:
    """--pid or -- COMMAND (one of them, with no payload), or None for a payload."""
    wanted = [x for x in (args.pid is not None, bool(args.command), bool(args.payload)) if x]
    if len(wanted) > 1:
        raise CliError("give a payload, --pid PID or -- COMMAND ..., one of them")
    if args.duration is not None and not (args.pid is not None or args.command):
        raise CliError("--duration is for --pid or -- COMMAND")
    if args.tracer is not None and not (args.pid is not None or args.command):
        raise CliError("--tracer is for --pid or -- COMMAND (a payload is traced through tracefs)")
    if args.pid is not None:
        return args.pid
    return args.command or None


def _watch(args):
    """The watched process, and the Interrupted that ended the watch (None if it ended by itself
    or at --duration): the caller reports what was seen, marked incomplete, then raises it."""
    from .observe.process import ProcessError
    from .observe.tracefs import TracefsUnavailable
    from .session import WatchedProcess, watch_process

    try:
        w, interrupted = watch_process(process_target(args), args.duration, tracer=args.tracer or "bpf"), None
    except ProcessError as e:
        raise CliError(str(e)) from None
    except TracefsUnavailable as e:
        # what a user with /dev/kvm alone can still do (the kvm group case the README describes)
        still = "; without root, run, trace PAYLOAD (its exits to userspace), bench and model still work"
        raise CliError(f"cannot watch another process: {e}{still if os.geteuid() else ''}") from None
    except Interrupted as e:
        if not isinstance(e.partial, WatchedProcess):
            raise
        w, interrupted = e.partial, e
    if w.attached.tracer_note:
        print(f"kvmiso: {w.attached.tracer_note}", file=sys.stderr)
    if w.left_running:  # a wrapper's VMM, a daemon: gone with the watch, and not silently
        print(f"kvmiso: the command ended leaving {', '.join(w.left_running)} running: stopped", file=sys.stderr)
    return w, interrupted


def trace_outputs_writable(args: argparse.Namespace) -> None:
    """trace's --json and --evidence files are checked before the trace: a path that cannot
    take the result is bad input, not a lost trace."""
    from .output import writable

    for path, what in ((args.json, "the exit log"), (args.evidence, "the evidence")):
        if path:
            writable(path, what)


def write_trace_outputs(args: argparse.Namespace, log: ExitLog, evidence: Callable[[], Any]) -> None:
    """trace's --json (``log``) and --evidence (what ``evidence()`` reads), each written whole."""
    from .observe.evidence import write_evidence
    from .output import write_whole

    if args.json:
        write_whole(args.json, "the exit log", log.write_jsonl)
    if args.evidence:
        ev = evidence()
        write_whole(args.evidence, "the evidence", lambda path: write_evidence(ev, path))


def cmd_trace_process(args: argparse.Namespace) -> int:
    """trace --pid / -- COMMAND: another process's vCPUs, per vCPU and in total. Returns the
    command's own status when it ended by itself, else 0."""
    from .observe.exitstat import summarize

    trace_outputs_writable(args)
    w, interrupted = _watch(args)
    log = w.log
    write_trace_outputs(args, log, lambda: w.evidence)
    if log.lost_events:
        print(f"kvmiso: {log.lost_events} trace records lost (the trace buffer was full)", file=sys.stderr)
    vcpus = sorted({r.vcpu for r in log.records})
    events = sum(len(r.events) for r in log.records)
    vms = f" of {len(w.vms)} VMs" if len(w.vms) > 1 else ""  # one at a time, counted as each was created
    print(f"traced pid {w.pid} until {w.attached.ended}{' (INCOMPLETE)' if log.incomplete else ''}: "
          f"{len(log.records)} KVM_RUN calls on {len(vcpus)} vCPU threads{vms}, {events} in-kernel kvm events "
          f"through {w.attached.tracer} (kvm_emulate_insn and kvmmmu left out: once per emulated instruction)\n")
    for v in vcpus:  # a vCPU id where the evidence named its thread, else the thread's id
        name = f"vCPU {v}" if v in w.evidence.threads else f"thread {v}"
        print(f"{name}: {sum(1 for r in log.records if r.vcpu == v)} KVM_RUN calls")
    print()
    print(summarize(log).table())
    if interrupted is not None:
        raise interrupted
    # as time(1) does: the status of a command that ended by itself (kvmiso's own work succeeded)
    return w.attached.status or 0


def _check_process(args, access, cost: dict) -> int:
    """check --pid / -- COMMAND: every vCPU of another process, apart and in total; each VM's
    records against that VM's own evidence, where its VMs can be told apart."""
    import dataclasses

    from .isolation import check, result_text

    w, interrupted = _watch(args)
    if not w.log.records and interrupted is None:
        raise CliError(f"pid {w.pid}: no KVM_RUN was traced before {w.attached.ended}: nothing to check")
    if args.require_real and (not_own := _not_own(w)):
        print(f"kvmiso: pid {w.pid}: --require-real, but {not_own}", file=sys.stderr)
        return EXIT_FAILED
    per: dict[str, Any] = {}
    total = None
    for vm in [vm for vm in w.vms if vm.records] or w.vms[:1]:  # an empty log (interrupted) is checked too
        space = _space(args, vm.evidence)
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
    title = f"pid {w.pid} (traced until {w.attached.ended}{', INCOMPLETE' if w.log.incomplete else ''})"
    said = vms_line(w)
    if args.json:
        print(json.dumps({"pid": w.pid, "ended": w.attached.ended, "incomplete": bool(w.log.incomplete),
                          "evidence": w.evidence.source, "vms": said,
                          "vcpus": [{"vcpu": name, **r.to_dict()} for name, r in per.items()], "total": total.to_dict()},
                         indent=2))
    else:
        for name, r in per.items():
            print(result_text(r, f"{title} {name}: ", stack=args.stack) + "\n")
        print(result_text(total, f"{title} all vCPUs: ", stack=False) + (f"\n\n{said}" if said else ""))
    if interrupted is not None:
        raise interrupted
    if not total.exits:
        print(f"kvmiso: {_checked_nothing(f'pid {w.pid}', w.log)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if total.failed(args.allow_lost) else 0


def _fold(results: dict[str, Any], name: str, result: Any) -> None:
    """``result`` added to ``results[name]``: the same vCPU in several VMs."""
    if name in results:
        results[name].add(result)
    else:
        results[name] = result


def vms_line(w: WatchedProcess) -> str:
    """The VMs of a watched process and what each one's exits were judged on, in one line; ""
    for one VM whose objects were read (nothing to say)."""
    from .observe.attach import VM_CREATED
    from .session import EVIDENCE_EVERY_S

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


def _space(args, evidence, machine=None):
    from .isolation import MapSetError
    from .isolation.policy import POLICIES
    from .session import layout_of, space_for

    if args.policy not in POLICIES:
        raise CliError(f"unknown policy {args.policy!r}; one of {', '.join(POLICIES)}")
    try:
        return space_for(layout_of(evidence, machine), args.policy, args.regions, tuple(args.drop))
    except MapSetError as e:
        raise CliError(str(e)) from None


def _require_real(args, evidence, what: str) -> None:
    """--require-real: every fact the verdicts rest on must have been read, not modeled."""
    if args.require_real and not evidence.real:
        raise RealFactsMissing(f"{what}: --require-real, but the objects and page table are modeled "
                               f"({evidence.source or 'no evidence'})")


class RealFactsMissing(Exception):
    """--require-real and a fact had to be modeled: status 1, one line naming it."""


def _read_evidence(path: str):
    from .observe.evidence import EvidenceError, read_evidence

    try:
        return read_evidence(path)
    except OSError as e:
        raise CliError(f"cannot read evidence {path}: {e.strerror}") from None
    except EvidenceError as e:
        raise CliError(str(e)) from None


def cmd_model(args: argparse.Namespace) -> int:
    """The isolated address space of a fresh VM of this host (or of saved evidence)."""
    from .isolation import model_summary, model_text
    from .session import machine_evidence

    if args.evidence:
        evidence, machine_ctx = _read_evidence(args.evidence), contextlib.nullcontext(None)
    else:
        machine_ctx = Machine("hello", mode="long")
    with machine_ctx as m:
        if m is not None:
            m.run(timeout=5)  # a VM that has run: its MMU root, kvm_run page and vCPU thread exist
            evidence = machine_evidence(m)
        space = _space(args, evidence, m)
    try:
        _require_real(args, evidence, "model")
    except RealFactsMissing as e:
        print(f"kvmiso: {e}", file=sys.stderr)
        return EXIT_FAILED
    print(json.dumps(model_summary(space), indent=2) if args.json else model_text(space))
    return 0


def cmd_check(args: argparse.Namespace) -> int:
    """Each payload runs under capture on its own VM and is checked against that VM's evidence;
    an exit log is checked against the evidence saved with it (--evidence)."""
    from .isolation import AccessModelError, CheckError, check, load_access_model, result_text
    from .observe.capture import Capture
    from .observe.exitlog import ExitLogError, read_jsonl
    from .session import capture_checked, machine_evidence

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
    results = []
    interrupted: Interrupted | None = None
    with Capture() as cap:
        for p in args.payload:
            if p.endswith(".jsonl"):
                if not args.evidence:
                    raise CliError(f"{p}: an exit log is checked against the evidence saved with it: "
                                   f"--evidence FILE (kvmiso trace --json LOG --evidence FILE writes both)")
                try:
                    log = read_jsonl(p)
                except OSError as e:
                    raise CliError(f"cannot read exit log {p}: {e.strerror}") from None
                except ExitLogError as e:
                    raise CliError(str(e)) from None
                evidence = _read_evidence(args.evidence)
                space = _space(args, evidence)
            else:
                with Machine(p, mode=args.mode, cpl=args.cpl) as m:
                    try:
                        run = capture_checked(m, cap, m.image.name, timeout=args.timeout)
                        log, evidence = run.log, run.evidence
                    except Interrupted as e:  # check what was seen, marked incomplete, then stop
                        interrupted = e
                        log = e.partial[1] if e.partial else None
                        if log is None:
                            break
                        evidence = machine_evidence(m, log)
                    space = _space(args, evidence, m)
            try:
                _require_real(args, evidence, p)
                res = check(space, log, access, source=p, **cost)
            except RealFactsMissing as e:
                print(f"kvmiso: {e}", file=sys.stderr)
                return EXIT_FAILED
            except CheckError as e:
                raise CliError(str(e)) from None
            results.append((p, log.incomplete, res, log))
            if interrupted is not None:
                break
    if args.json:
        print(json.dumps([{"payload": p, "incomplete": bool(why), "incomplete_reason": why, **r.to_dict()}
                          for p, why, r, _ in results], indent=2))
    else:
        for p, why, r, _ in results:
            print(result_text(r, f"{p}{' (INCOMPLETE: ' + why + ')' if why else ''}: ", stack=args.stack) + "\n")
    if interrupted is not None:
        raise interrupted
    empty = [_checked_nothing(p, log) for p, _, r, log in results if not r.exits]
    for line in empty:
        print(f"kvmiso: {line}", file=sys.stderr)
    # a missing mapping, an unknown function or lost evidence is a finding: non-zero, like a failed test
    return EXIT_FAILED if empty or any(r.failed(args.allow_lost) for _, _, r, _ in results) else 0



def cmd_measured(args: argparse.Namespace) -> int:
    """check --measured DIR: a record kvmiso record made gets each exit's measured verdict beside
    the model's and the access model measured (:mod:`kvmiso.measuring`); any other record is
    listed per window, symbolized, with the functions access.toml does not know."""
    from dataclasses import asdict

    from .isolation import AccessModelError, load_access_model
    from .isolation.measured import model_coverage, window_coverage
    from .observe.accessrecord import RecordError, read_record
    from .observe.accesssummary import summarize, summary_dict, summary_text
    from .observe.recordruns import read_runs

    if args.payload or process_target(args) is not None:
        raise CliError("--measured DIR reads a record: give no payload, --pid or -- COMMAND with it")
    try:
        record = read_record(args.measured)
        runs = read_runs(args.measured)
        if runs is not None and not args.windows:
            from .measuring import cmd_measured_runs

            return cmd_measured_runs(args, record, runs)
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


def _checked_nothing(what: str, log) -> str:
    """Why ``what`` had no exit to check, in one line: a check of nothing is not a pass."""
    why = (f"in-kernel events were not traced: {log.tracing_reason}" if not log.tracing
           else "no traced event fell inside a KVM_RUN's isolated window")
    return f"{what}: no exit was checked ({why}): a check of nothing is not a pass"
