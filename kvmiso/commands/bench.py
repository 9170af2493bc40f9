"""``kvmiso bench``: KVM_RUN round trips per exit kind, timed beside the floors, with
``--isolation`` what kvm_mm's extra address-space switches would add (the model's switches per
round trip, from a short captured run of each kind's guest)."""

from __future__ import annotations

import argparse
import signal
import sys
from typing import TYPE_CHECKING, Callable

from ..exitstatus import CliError
from ..interrupt import Interrupted
from ..output import writable, write_whole
from ..bench.kinds import DEFAULT_KINDS, KINDS

if TYPE_CHECKING:
    from ..kvm import Kvm
    from ..bench.results import BenchResult


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso bench``."""
    sp = subparsers.add_parser("bench", help="time KVM_RUN round trips per exit kind, beside the floors")
    sp.add_argument("--kinds", default=",".join(DEFAULT_KINDS),
                    help=f"comma-separated exit kinds (default: all): {', '.join(KINDS)}; the floors always run")
    sp.add_argument("--samples", type=int, default=5000, help="round trips per run and kind (default 5000)")
    sp.add_argument("--runs", type=int, default=5, help="runs, each on a fresh VM (default 5)")
    sp.add_argument("--warmup", type=int, help="untimed round trips before each run (default samples/10)")
    sp.add_argument("--iterations", type=int, default=100,
                    help="guest iterations per sample for the in-kernel kinds (default 100)")
    sp.add_argument("--cpl", type=int, nargs="+", choices=(0, 3), default=[0],
                    help="guest privilege level(s) to measure at (default 0; e.g. --cpl 0 3)")
    sp.add_argument("--cpu", type=int, help="CPU to pin to (default: the last one this process may use)")
    sp.add_argument("--no-python", action="store_true", help="skip the Python API path")
    sp.add_argument("--json", metavar="FILE", help="write the results (with the host fingerprint) to FILE")
    sp.add_argument("--plot", metavar="FILE.png", help="draw the latency distributions (needs matplotlib)")
    sp.add_argument("--isolation", action="store_true",
                    help="add what KVM address space isolation's extra switches would cost per kind")
    sp.add_argument("--switch-cost", type=float, metavar="NS",
                    help="cost of one address-space switch for --isolation (default: estimated where possible)")
    sp.add_argument("--regions", metavar="FILE.toml",
                    help="kvm_mm region set the model uses for --isolation (a TOML file or a shipped set: modern)")
    return sp


def _progress() -> tuple[Callable[[str], None] | None, Callable[[], None]]:
    """A one-line progress display on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        return None, lambda: None

    def show(text: str) -> None:
        sys.stderr.write(f"\r\x1b[K{text}")
        sys.stderr.flush()

    def clear() -> None:
        sys.stderr.write("\r\x1b[K")
        sys.stderr.flush()

    return show, clear


def _check_plot_backend() -> None:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CliError("--plot needs matplotlib, an optional extra: pip install 'kvmiso[plot]'") from None


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces this run, for the result file and the README."""
    parts = ["kvmiso bench", f"--kinds {args.kinds}", f"--samples {args.samples}", f"--runs {args.runs}",
             f"--iterations {args.iterations}", "--cpl " + " ".join(map(str, args.cpl))]
    for flag, value in (("--warmup", args.warmup), ("--cpu", args.cpu), ("--switch-cost", args.switch_cost)):
        if value is not None:
            parts.append(f"{flag} {value:g}")
    parts += ["--no-python"] * args.no_python + ["--isolation"] * args.isolation
    return " ".join(parts)


def _checked_input(args: argparse.Namespace) -> list[str]:
    """The kinds --kinds names, every argument checked before minutes of measuring: bad input,
    a missing plotting extra, or an output that cannot be written is CliError."""
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    if not kinds:
        raise CliError(f"--kinds names no kind; kinds: {', '.join(KINDS)}")
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise CliError(f"unknown kind(s) {', '.join(unknown)}; kinds: {', '.join(KINDS)}")
    if args.samples < 2 or args.runs < 1 or args.iterations < 1:
        raise CliError("--samples must be >= 2, --runs and --iterations >= 1")
    if (args.switch_cost is not None or args.regions) and not args.isolation:
        raise CliError("--switch-cost and --regions are for --isolation")
    if args.plot:
        _check_plot_backend()
    for path, what in ((args.json, "the results"), (args.plot, "the plot")):
        if path:
            writable(path, what)  # before measuring: a result nobody can keep is not worth minutes
    return kinds


def run(args: argparse.Namespace) -> int:
    """Time every kind asked for, print the table (and --isolation's), write --json and --plot."""
    from ..kvm import Kvm
    from ..bench.latency import bench
    from ..bench.plot import plot
    from ..bench.table import format_table
    from ..bench.runloop import NotBuilt

    kinds = _checked_input(args)
    show, clear = _progress()
    with Kvm() as kvm:
        try:
            result = bench(kvm, kinds, cpls=args.cpl, samples=args.samples, runs=args.runs, warmup=args.warmup,
                           iterations=args.iterations, cpu=args.cpu, python=not args.no_python, progress=show)
        except NotBuilt as e:
            raise CliError(str(e)) from None
        finally:
            clear()
        result.settings["command"] = _command(args)
        isolation = _isolation(kvm, result, args.switch_cost, args.regions) if args.isolation else None
    print(format_table(result))
    if isolation is not None:
        print()
        print(isolation)
    if args.json:
        write_whole(args.json, "the results", result.write)
        print(f"\nwrote {args.json}")
    if args.plot:
        write_whole(args.plot, "the plot", lambda name: plot(result, str(name)))
        print(f"wrote {args.plot}")
    if not result.complete:
        # what was measured is printed and written; the CLI reports the signal (exit 128 + signo)
        raise Interrupted(signal.Signals[result.interrupted_by], result)
    return 0


def _isolation(kvm: Kvm, result: BenchResult, switch_cost: float | None, regions: str | None) -> str:
    from ..bench.overhead import SwitchCost, estimate_switch_cost, format_isolation, isolation_rows
    from ..session import measure_switches

    if switch_cost is not None:
        cost = SwitchCost(switch_cost, "given with --switch-cost")
    else:
        cost = estimate_switch_cost(kvm, result.host)
    # The model classifies a short captured run of each userspace-exit kind's own guest: every
    # such KVM_RUN is one round trip. In-kernel kinds share one KVM_RUN per batch: the rule.
    switches, notes = {}, []
    for kind, cpl in sorted({(r.kind, r.cpl) for r in result.results if r.cpl is not None}):
        k = KINDS.get(kind)
        if k is None or k.in_kernel or k.guest is None or kind in ("vm_create", "parallel"):
            continue
        res = measure_switches(kvm, k.guest, cpl=cpl, regions=regions)
        switches[(kind, cpl)] = res.switches_per_run
        if res.classes["fault"] or res.classes["unknown"]:
            notes.append(f"{kind} at CPL{cpl}: {res.classes['fault']} exits fault on a missing mapping and "
                         f"{res.classes['unknown']} meet a function the access model does not know in {res.runs} "
                         f"KVM_RUNs (kvmiso check shows which)")
    rows = isolation_rows(result, cost, switches)
    result.settings["isolation"] = {"switch_cost_ns": cost.ns, "switch_cost_source": cost.source,
                                    "regions": regions or "rfc", "rows": rows, "notes": notes}
    text = format_isolation(rows, cost) + f"\n  model region set: {regions or 'the RFC default set'}"
    return "\n".join([text, *(f"  note: {n}" for n in notes)])
