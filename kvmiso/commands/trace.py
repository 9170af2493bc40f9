"""``kvmiso trace``: ``perf kvm stat report`` for one payload, a running process (``--pid``) or a
command (``-- COMMAND``): the exit log's kinds counted and timed, per vCPU for another process
(the table's footer says how time inside the kernel is computed on this host)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Callable

from ..exitstatus import EXIT_FAILED, CliError
from ..interrupt import Interrupted
from ..output import writable, write_whole
from .options import add_guest_args, add_process_args, check_cpl, process_target, warn_if_undeclared, watch

if TYPE_CHECKING:
    from ..observe.kernel.evidence import Evidence
    from ..observe.tracing.exitlog import ExitLog


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso trace``."""
    sp = subparsers.add_parser("trace", help="run one payload under tracefs capture: every exit kind, counted and timed")
    sp.add_argument("payload", nargs="?", help="a name from guests/ or a .S path (or --pid PID, or -- COMMAND ...)")
    add_guest_args(sp)
    add_process_args(sp)
    sp.add_argument("--json", metavar="FILE", help="write the exit log as JSON lines to FILE")
    sp.add_argument("--evidence", metavar="FILE", help="also write the VM's objects and page tables (for kvmiso check LOG)")
    sp.add_argument("--events", action="store_true", help="print every traced event, in order, run by run")
    sp.add_argument("--stacks", action="store_true", help="with --events: each event's kernel call chain")
    return sp


def run(args: argparse.Namespace) -> int:
    """Trace what the arguments name; the guest's status (a payload), or a command's own."""
    if process_target(args) is not None:
        return _trace_process(args)
    if not args.payload:
        raise CliError("trace what? a payload, --pid PID or -- COMMAND ...")
    return _trace_payload(args)


def _trace_payload(args: argparse.Namespace) -> int:
    """One payload on its own VM: its exits, with --events each event, then the table."""
    from ..guest import Machine
    from ..observe.tracing.exitstat import summarize_exits
    from ..session import capture, machine_evidence

    warn_if_undeclared(args.payload, args.mode)
    check_cpl(args.payload, args.mode, args.cpl)
    outputs_writable(args)  # before the run: an output that cannot be written is bad input, not a lost capture
    with Machine(args.payload, mode=args.mode, cpl=args.cpl) as m:
        try:
            result, log = capture(m, timeout=args.timeout, payload=m.image.name)
        except Interrupted as e:
            _keep_partial(args, e.partial.log if e.partial else None)
            raise
        write_outputs(args, log, lambda: machine_evidence(m, log))
        where = f"{m.image.name} in {m.mode} mode at CPL{args.cpl} on {m.vendor or 'an unknown vendor module'}"
    _say_what_was_traced(log)
    events = sum(len(r.events) for r in log.records)
    print(f"traced {where}: {len(log.records)} KVM_RUN calls, {events} in-kernel events\n")
    if args.events:
        _print_events(log, args.stacks)
    print(summarize_exits(log).table())
    print(f"\n{result.outcome}: {result.detail}")
    return 0 if result.ok else EXIT_FAILED


def _keep_partial(args: argparse.Namespace, partial: ExitLog | None) -> None:
    """--json: an interrupted capture's log, marked incomplete, written before the signal goes up."""
    if args.json and partial is not None:
        write_whole(args.json, "the exit log", partial.write_jsonl)
        print(f"kvmiso: wrote the partial exit log ({len(partial.records)} KVM_RUN calls, "
              f"marked incomplete) to {args.json}", file=sys.stderr)


def _say_what_was_traced(log: ExitLog) -> None:
    """On stderr: why in-kernel events are missing or partial, and the records the buffer lost."""
    if not log.tracing:
        print(f"kvmiso: in-kernel events not traced: {log.tracing_reason}", file=sys.stderr)
    elif log.tracing_reason:
        print(f"kvmiso: note: {log.tracing_reason}", file=sys.stderr)
    if log.lost_events:
        print(f"kvmiso: {log.lost_events} trace records lost (the trace buffer was full)", file=sys.stderr)


def _print_events(log: ExitLog, stacks: bool) -> None:
    """Every KVM_RUN with its exit, then its events in order (with ``stacks``, each one's call chain)."""
    from ..observe.kernel.kallsyms import read_kallsyms
    from ..observe.tracing.exitstat import format_event

    symbols = read_kallsyms() if stacks else None
    for r in log.records:
        fields = " ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}"
                          for k, v in r.exit.to_dict().items() if k != "exit")  # data as hex
        print(f"run {r.run}: KVM_EXIT_{r.exit.name} {fields} ({r.wall_ns / 1e3:.2f} µs)")
        for e in r.events:
            print("  " + format_event(e, r.start_ns))
            for a in e.stack if stacks else ():
                hit = symbols.resolve(a) if symbols else None
                print(f"        {hit[0]}+{hit[1]:#x}" if hit else f"        {a:#x}")
    print()


def _trace_process(args: argparse.Namespace) -> int:
    """--pid / -- COMMAND: another process's vCPUs, per vCPU and in total. Returns the command's
    own status when it ended by itself, else 0."""
    from ..isolation.render import chain_inference_note
    from ..observe.tracing.exitstat import summarize_exits

    outputs_writable(args)
    w, interrupted = watch(args)
    log = w.log
    write_outputs(args, log, lambda: w.evidence)
    if log.lost_events:
        print(f"kvmiso: {log.lost_events} trace records lost (the trace buffer was full)", file=sys.stderr)
    vcpus = sorted({r.vcpu for r in log.records})
    events = sum(len(r.events) for r in log.records)
    vms = f" of {len(w.vms)} VMs" if len(w.vms) > 1 else ""  # one at a time, counted as each was created
    print(f"traced pid {w.pid} until {w.attached.ended}{' (INCOMPLETE)' if log.incomplete else ''}: "
          f"{len(log.records)} KVM_RUN calls on {len(vcpus)} vCPU threads{vms}, {events} in-kernel kvm events "
          f"through {w.attached.tracer} (kvm_emulate_insn and kvmmmu left out: once per emulated instruction)")
    if log.host.get("chains_inferred"):
        print(chain_inference_note(log.host))
    print()
    for v in vcpus:  # a vCPU id where the evidence named its thread, else the thread's id
        name = f"vCPU {v}" if v in w.evidence.threads else f"thread {v}"
        print(f"{name}: {sum(1 for r in log.records if r.vcpu == v)} KVM_RUN calls")
    print()
    print(summarize_exits(log).table())
    if interrupted is not None:
        raise interrupted
    # as time(1) does: the status of a command that ended by itself (kvmiso's own work succeeded)
    return w.attached.status or 0


def outputs_writable(args: argparse.Namespace) -> None:
    """--json and --evidence are checked before the trace: a path that cannot take the result
    is bad input, not a lost trace."""
    for path, what in ((args.json, "the exit log"), (args.evidence, "the evidence")):
        if path:
            writable(path, what)


def write_outputs(args: argparse.Namespace, log: ExitLog, evidence: Callable[[], Evidence]) -> None:
    """--json (``log``) and --evidence (what ``evidence()`` reads), each written whole."""
    from ..observe.kernel.evidence import write_evidence

    if args.json:
        write_whole(args.json, "the exit log", log.write_jsonl)
    if args.evidence:
        ev = evidence()
        write_whole(args.evidence, "the evidence", lambda path: write_evidence(ev, path))
