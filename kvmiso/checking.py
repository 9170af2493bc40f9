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


def process_target(args: argparse.Namespace) -> int | list[str] | None:
    """--pid or -- COMMAND (one of them, with no payload), or None for a payload."""
    wanted = [x for x in (args.pid is not None, bool(args.command), bool(args.payload)) if x]
    if len(wanted) > 1:
        raise CliError("give a payload, --pid PID or -- COMMAND ..., one of them")
    if args.duration is not None and not (args.pid is not None or args.command):
        raise CliError("--duration is for --pid or -- COMMAND")
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
        w, interrupted = watch_process(process_target(args), args.duration), None
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
    print(f"traced pid {w.pid} until {w.attached.ended}{' (INCOMPLETE)' if log.incomplete else ''}: "
          f"{len(log.records)} KVM_RUN calls on {len(vcpus)} vCPU threads, {events} in-kernel kvm events "
          f"(kvm_emulate_insn and kvmmmu left out: once per emulated instruction)\n")
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
    """check --pid / -- COMMAND: every vCPU of another process, apart and in total."""
    import dataclasses

    from .isolation import check, result_text

    w, interrupted = _watch(args)
    evidence = w.evidence
    if not w.log.records and interrupted is None:
        raise CliError(f"pid {w.pid}: no KVM_RUN was traced before {w.attached.ended}: nothing to check")
    try:
        _require_real(args, evidence, f"pid {w.pid}")
    except RealFactsMissing as e:
        print(f"kvmiso: {e}", file=sys.stderr)
        return EXIT_FAILED
    space = _space(args, evidence)
    vcpus = sorted({r.vcpu for r in w.log.records})
    per = []
    for v in vcpus:
        part = dataclasses.replace(w.log, records=[r for r in w.log.records if r.vcpu == v])
        part.lost_events = 0  # lost records cannot be told apart by vCPU: counted once, in the total
        per.append((f"vCPU {v}" if v in evidence.threads else f"thread {v}", check(space, part, access, **cost)))
    total = check(space, w.log, access, **cost)
    title = f"pid {w.pid} (traced until {w.attached.ended}{', INCOMPLETE' if w.log.incomplete else ''})"
    if args.json:
        print(json.dumps({"pid": w.pid, "ended": w.attached.ended, "incomplete": bool(w.log.incomplete),
                          "evidence": evidence.source,
                          "vcpus": [{"vcpu": name, **r.to_dict()} for name, r in per], "total": total.to_dict()},
                         indent=2))
    else:
        for name, r in per:
            print(result_text(r, f"{title} {name}: ", stack=args.stack) + "\n")
        print(result_text(total, f"{title} all vCPUs: ", stack=False))
    if interrupted is not None:
        raise interrupted
    if not total.exits:
        print(f"kvmiso: {_checked_nothing(f'pid {w.pid}', w.log)}", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_FAILED if total.failed(args.allow_lost) else 0


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


def _checked_nothing(what: str, log) -> str:
    """Why ``what`` had no exit to check, in one line: a check of nothing is not a pass."""
    why = (f"in-kernel events were not traced: {log.tracing_reason}" if not log.tracing
           else "no traced event fell inside a KVM_RUN's isolated window")
    return f"{what}: no exit was checked ({why}): a check of nothing is not a pass"
