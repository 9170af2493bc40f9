"""kvmiso: drive KVM through raw ioctls, run tiny guests, see every exit, model kvm_mm.

Every failure is one line naming the cause on stderr and a non-zero exit status: 1 when the
guest or the check did not succeed, 2 for bad input (a payload that does not build, no usable
/dev/kvm, a bad argument, an output that cannot be written).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
from typing import Callable, NoReturn

from .bench import command as bench_command
from .boot import BootError
from .boot import command as boot_command
from .conformance import add_conformance_args, cmd_conformance
from .guest import BuildError, GuestTimeout, Machine, Outcome
from .guest.build import MODES, available_payloads, payload_modes, payload_path
from .guest.ucall import PORT_CONSOLE
from .exitstatus import EXIT_BAD_INPUT, EXIT_FAILED, CliError, positive_seconds
from .interrupt import Interrupted, signals_raise_interrupted
from .output import CheckedStdout, StdoutError, printable, write_whole, writable_dir
from .kvm import KvmError, KvmUnavailable
from .kvm.exits import DebugExit, Exit, IoExit, MmioExit

def main(argv: list[str] | None = None) -> int:
    """Run one kvmiso command; returns its exit status. SIGINT and SIGTERM end any command as
    :class:`kvmiso.interrupt.Interrupted`: every command unwinds through its with-blocks and
    finally-clauses, one with partial results writes them marked incomplete, and main() prints
    ``kvmiso: interrupted by SIGTERM`` and returns 128 + the signal number."""
    parser = _parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []  # trace/check -- COMMAND ...
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.command = command
    if not getattr(args, "func", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    stdout = sys.stdout
    sys.stdout = CheckedStdout(stdout)
    try:
        with signals_raise_interrupted():
            status = args.func(args)
            sys.stdout.flush()  # here, not at exit: a full or closed stdout is reported below
            return status
    except (CliError, BuildError, BootError, KvmUnavailable, ValueError) as e:
        print(f"kvmiso: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KvmError as e:
        print(f"kvmiso: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as e:  # an Interrupted, or a plain Ctrl-C outside the main thread
        stop = Interrupted.of(e)
        print(f"kvmiso: interrupted by {stop.signal.name}", file=sys.stderr)
        return stop.status
    except BrokenPipeError:
        # the reader went away (kvmiso run ... | head): stop quietly, as SIGPIPE would, and keep
        # the interpreter's final flush from raising again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + signal.SIGPIPE
    except StdoutError as e:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # what is left is lost
        print(f"kvmiso: cannot write to standard output: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    finally:
        sys.stdout = stdout


class _Parser(argparse.ArgumentParser):
    """argparse, with a bad argument reported as one line (``kvmiso run: ...``), status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"kvmiso: {self.prog.removeprefix('kvmiso ')}: {message}" if self.prog != "kvmiso"
              else f"kvmiso: {message}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def _parser() -> argparse.ArgumentParser:
    p = _Parser(prog="kvmiso", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(metavar="COMMAND", parser_class=_Parser)

    sp = sub.add_parser("probe", help="what this host's KVM is and can do")
    sp.add_argument("--json", action="store_true", help="print the facts as JSON")
    sp.set_defaults(func=_probe)

    sp = sub.add_parser("bench", help="time KVM_RUN round trips per exit kind, beside the floors")
    bench_command.add_bench_args(sp)
    sp.set_defaults(func=cmd_bench)  # bad input: ValueError, exit status 2

    sp = sub.add_parser("compare", help="two bench result files side by side, with ratios and significance")
    bench_command.add_compare_args(sp)
    sp.set_defaults(func=bench_command.cmd_compare)

    sp = sub.add_parser("report", help="the whole picture of this host (the main job)")
    sp.add_argument("--out", default="kvmiso-report", help="directory for report.json and plots")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("run", help="run one payload and print every exit")
    sp.add_argument("payload", help=f"a name from guests/ ({', '.join(available_payloads())}) or a .S path")
    _add_guest_args(sp)
    sp.add_argument("--single-step", action="store_true", help="one DEBUG exit per guest instruction")
    sp.add_argument("--json", action="store_true", help="print the result as JSON instead")
    sp.set_defaults(func=cmd_run)

    sp = sub.add_parser("trace", help="run one payload under tracefs capture: every exit kind, counted and timed")
    sp.add_argument("payload", nargs="?", help="a name from guests/ or a .S path (or --pid PID, or -- COMMAND ...)")
    _add_guest_args(sp)
    _add_process_args(sp)
    sp.add_argument("--json", metavar="FILE", help="write the exit log as JSON lines to FILE")
    sp.add_argument("--evidence", metavar="FILE", help="also write the VM's objects and page tables (for kvmiso check LOG)")
    sp.add_argument("--events", action="store_true", help="print every traced event, in order, run by run")
    sp.add_argument("--stacks", action="store_true", help="with --events: each event's kernel call chain")
    sp.set_defaults(func=cmd_trace)

    sp = sub.add_parser("model", help="the kvm_mm mapping set: regions, levels, sizes, share of the kernel mapped")
    _add_model_args(sp)
    sp.add_argument("--json", action="store_true", help="print the model as JSON")
    sp.set_defaults(func=_checking("cmd_model"))

    sp = sub.add_parser("check", help="run payloads (or read exit logs) and classify every exit against kvm_mm")
    sp.add_argument("payload", nargs="*", help="a name from guests/, a .S path, or an exit log (.jsonl) "
                    "(or --pid PID, or -- COMMAND ...)")
    _add_guest_args(sp)
    _add_process_args(sp)
    _add_model_args(sp)
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
    sp.set_defaults(func=_checking("cmd_check"))

    sp = sub.add_parser("record", help="inside kvmiso boot --record-accesses DIR: run the suite plainly and traced, "
                        "with each VM's evidence, for kvmiso check --measured DIR")
    sp.add_argument("dir", metavar="DIR", help="the record's folder (the one given to --record-accesses)")
    sp.add_argument("payload", nargs="*", help="only these payloads (portio) or suite labels (portio/long)")
    sp.add_argument("--timeout", type=positive_seconds, default=30.0,
                    help="seconds before a guest is stopped (default 30: the record slows TCG down)")
    sp.set_defaults(func=_recording)

    sp = sub.add_parser("conformance", help="run the ports of KVM selftests: where this KVM departs from upstream's")
    add_conformance_args(sp)
    sp.set_defaults(func=cmd_conformance)

    sp = sub.add_parser("boot", help="run a command in a kernel under QEMU with this host's files (kvm_amd anywhere)")
    boot_command.add_boot_args(sp)
    sp.set_defaults(func=boot_command.cmd_boot)
    return p


def _checking(name: str) -> Callable[[argparse.Namespace], int]:
    """A command of :mod:`kvmiso.checking`, imported when it runs (it needs the isolation model)."""
    def run(args: argparse.Namespace) -> int:
        from . import checking

        return getattr(checking, name)(args)

    return run


def _recording(args: argparse.Namespace) -> int:
    from .recording import cmd_record  # imported when it runs: it needs the guest, BPF and tracing

    return cmd_record(args)


def _probe(args: argparse.Namespace) -> int:
    from .probing import cmd_probe  # imported when it runs: parsing arguments needs none of it

    return cmd_probe(args)


def _add_model_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--policy", default="rfc-v1", metavar="NAME",
                    help="rfc-v1 (the 2019 RFC's allowlist, the default), asi (2024-2025 denylist) or asi-2022")
    sp.add_argument("--regions", metavar="FILE.toml", help="change rfc-v1's mapping set with a TOML file, "
                    "or a shipped set by name (modern)")
    sp.add_argument("--drop", action="append", default=[], metavar="REGION", help="leave a default region out")
    sp.add_argument("--evidence", metavar="FILE", help="objects and page tables saved by kvmiso trace --evidence")
    sp.add_argument("--require-real", action="store_true",
                    help="fail when an address or page table had to be modeled (no BPF, not root)")


def _add_process_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--pid", type=int, help="watch the KVM vCPUs of a running process (QEMU, your VMM)")
    sp.add_argument("--duration", type=positive_seconds, metavar="S", help="with --pid or -- COMMAND: stop after S seconds (a COMMAND gets SIGTERM then)")
    sp.add_argument("--tracer", choices=("bpf", "tracefs"), help="with --pid or -- COMMAND: bpf (the default: compact "
                    "records, each call chain kept once in the kernel; tracefs where BPF is refused) or tracefs "
                    "(every chain copied whole)")


def _add_guest_args(sp: argparse.ArgumentParser) -> None:
    sp.add_argument("--mode", choices=MODES, help="CPU mode (default: the payload's first declared mode)")
    sp.add_argument("--cpl", type=int, choices=(0, 3), default=0, help="privilege level (3: long mode only)")
    sp.add_argument("--timeout", type=positive_seconds, default=5.0,
                    help="seconds before the guest is stopped (default 5; positive and finite)")


def _warn_if_undeclared(payload: str, mode: str | None) -> None:
    """A --mode the payload does not declare runs anyway (the user may know better), but not
    silently: a payload written for long mode misbehaves in real mode."""
    declared = payload_modes(payload_path(payload))
    if mode is not None and mode not in declared:
        print(f"kvmiso: warning: {payload} declares {', '.join(declared)} mode only; running it in {mode} mode anyway",
              file=sys.stderr)


def cmd_bench(args: argparse.Namespace) -> int:
    """``kvmiso bench``, with the isolation overhead measured through :mod:`kvmiso.session`."""
    from .session import measure_switches

    return bench_command.cmd_bench(args, measure_switches)


# --- report ----------------------------------------------------------------------------------

def cmd_report(args: argparse.Namespace) -> int:
    """``kvmiso report``: every part, its summary, report.json; 0 when the suite ended as built."""
    from . import report

    out = writable_dir(args.out, "the report", report.FILES)

    def progress(stage: str) -> None:
        print(f"kvmiso report: {stage}", file=sys.stderr, flush=True)

    try:
        rep = report.build(out, progress)
    except Interrupted as e:
        if e.partial is not None:  # None: it came before the report began
            report.print_summary(e.partial, out)  # what was done; main() reports the signal
        raise
    report.print_summary(rep, out)
    return 0 if report.suite_ok(rep) else EXIT_FAILED


# --- run -------------------------------------------------------------------------------------

def describe_exit(e: Exit) -> str:
    """One line per exit, for people: ``IO     out port 0xe9 size 1 count 1 data 48``."""
    if isinstance(e, IoExit):
        text = f"{'in ' if e.is_in else 'out'} port {e.port:#x} size {e.size} count {e.count}"
        return text + ("" if e.is_in else f" data {bytes(e.data[:16]).hex()}")
    if isinstance(e, MmioExit):
        text = f"{'write' if e.is_write else 'read '} {e.address:#x} len {e.length}"
        return text + (f" data {e.value:#x}" if e.is_write else "")
    if isinstance(e, DebugExit):
        return f"pc {e.pc:#x} dr6 {e.dr6:#x}"
    d = e.to_dict()
    d.pop("exit")
    return " ".join(f"{k} {v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k} {v}" for k, v in d.items())


def cmd_run(args: argparse.Namespace) -> int:
    """``kvmiso run``: one payload, every exit printed as it happens; 0 only on DONE."""
    n = 0
    line = bytearray()

    def stream(e: Exit) -> None:
        nonlocal n
        n += 1
        print(f"{n:6d}  {e.name:<14} {describe_exit(e)}")
        if isinstance(e, IoExit) and e.port == PORT_CONSOLE and not e.is_in:
            line.extend(bytes(e.data))
            while b"\n" in line:
                text, _, rest = bytes(line).partition(b"\n")
                print(f"        console| {printable(text)}")
                line[:] = rest

    _warn_if_undeclared(args.payload, args.mode)
    with Machine(args.payload, mode=args.mode, cpl=args.cpl) as m:
        if args.single_step:
            m.vcpu.set_guest_debug(single_step=True)
        if not args.json:
            print(f"running {m.image.name} in {m.mode} mode at CPL{args.cpl} (timeout {args.timeout:g} s)")
        on_exit: Callable[[Exit], None] | None = None if args.json else stream
        interrupted: Interrupted | None = None
        try:
            result = m.run(timeout=args.timeout, on_exit=on_exit)
        except GuestTimeout as e:
            result = e.result
        except Interrupted as e:
            if e.partial is None:  # the signal came before the run had begun: nothing to print
                raise
            result, interrupted = e.partial, e  # print what the run got, then let main() report it
    if args.json:
        print(json.dumps({**result.to_dict(), "incomplete": interrupted is not None}, indent=2))
    else:
        if line:
            print(f"        console| {printable(bytes(line))}")
        for r in result.reports:
            print(f"report  tag {r.tag}: {r.value} ({r.value:#x})")
        print(f"{result.outcome}: {result.detail} ({result.runs} KVM_RUN calls, {result.elapsed * 1e3:.1f} ms)")
    if interrupted is not None:
        raise interrupted
    if result.outcome is Outcome.TIMEOUT:
        print(f"kvmiso: guest did not finish within {args.timeout:g} s: {result.detail}", file=sys.stderr)
    return 0 if result.ok else EXIT_FAILED



# --- trace -----------------------------------------------------------------------------------

def cmd_trace(args: argparse.Namespace) -> int:  # noqa: C901 - the payload path; --pid and -- COMMAND are checking.py's
    """``perf kvm stat report`` for one payload: the exit log's kinds counted and timed (the
    table's footer says how time inside the kernel is computed on this host)."""
    from .checking import cmd_trace_process, process_target, trace_outputs_writable, write_trace_outputs

    if process_target(args) is not None:
        return cmd_trace_process(args)
    if not args.payload:
        raise CliError("trace what? a payload, --pid PID or -- COMMAND ...")
    from .observe.capture import capture
    from .observe.exitstat import format_event, summarize
    from .session import machine_evidence

    _warn_if_undeclared(args.payload, args.mode)
    trace_outputs_writable(args)  # before the run: an output that cannot be written is bad input, not a lost capture
    with Machine(args.payload, mode=args.mode, cpl=args.cpl) as m:
        try:
            result, log = capture(m, timeout=args.timeout, payload=m.image.name)
        except Interrupted as e:
            partial = e.partial[1] if e.partial else None
            if args.json and partial is not None:
                write_whole(args.json, "the exit log", partial.write_jsonl)
                print(f"kvmiso: wrote the partial exit log ({len(partial.records)} KVM_RUN calls, "
                      f"marked incomplete) to {args.json}", file=sys.stderr)
            raise
        write_trace_outputs(args, log, lambda: machine_evidence(m, log))
        where = f"{m.image.name} in {m.mode} mode at CPL{args.cpl} on {m.vendor or 'an unknown vendor module'}"
    if not log.tracing:
        print(f"kvmiso: in-kernel events not traced: {log.tracing_reason}", file=sys.stderr)
    elif log.tracing_reason:
        print(f"kvmiso: note: {log.tracing_reason}", file=sys.stderr)
    if log.lost_events:
        print(f"kvmiso: {log.lost_events} trace records lost (the trace buffer was full)", file=sys.stderr)
    events = sum(len(r.events) for r in log.records)
    print(f"traced {where}: {len(log.records)} KVM_RUN calls, {events} in-kernel events\n")
    if args.events:
        symbols = None
        if args.stacks:
            from .observe.kallsyms import read_kallsyms

            symbols = read_kallsyms()
        for r in log.records:
            fields = " ".join(f"{k}={v:#x}" if isinstance(v, int) and not isinstance(v, bool) else f"{k}={v}"
                              for k, v in r.exit.to_dict().items() if k != "exit")  # data as hex
            print(f"run {r.run}: KVM_EXIT_{r.exit.name} {fields} ({r.wall_ns / 1e3:.2f} µs)")
            for e in r.events:
                print("  " + format_event(e, r.start_ns))
                for a in e.stack if args.stacks else ():
                    hit = symbols.resolve(a) if symbols else None
                    print(f"        {hit[0]}+{hit[1]:#x}" if hit else f"        {a:#x}")
        print()
    print(summarize(log).table())
    print(f"\n{result.outcome}: {result.detail}")
    return 0 if result.ok else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
