"""``kvmiso run``: one payload, every exit printed as it happens; 0 only on DONE."""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING, Callable

from ..exitstatus import EXIT_FAILED
from ..guest.build import available_payloads
from ..interrupt import Interrupted
from ..output import printable
from .options import add_guest_args, check_cpl, warn_if_undeclared

if TYPE_CHECKING:
    from ..guest import Machine, RunResult
    from ..kvm.exits import Exit


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso run``."""
    sp = subparsers.add_parser("run", help="run one payload and print every exit")
    sp.add_argument("payload", help=f"a name from guests/ ({', '.join(available_payloads())}) or a .S path")
    add_guest_args(sp)
    sp.add_argument("--single-step", action="store_true", help="one DEBUG exit per guest instruction")
    sp.add_argument("--json", action="store_true", help="print the result as JSON instead")
    return sp


def run(args: argparse.Namespace) -> int:
    """Run the payload, print each exit (or the result as JSON), then the outcome."""
    from ..guest import Machine, Outcome

    warn_if_undeclared(args.payload, args.mode)
    check_cpl(args.payload, args.mode, args.cpl)
    console = ConsoleLines()
    with Machine(args.payload, mode=args.mode, cpl=args.cpl) as m:
        if args.single_step:
            m.vcpu.set_guest_debug(single_step=True)
        if not args.json:
            print(f"running {m.image.name} in {m.mode} mode at CPL{args.cpl} (timeout {args.timeout:g} s)")
        result, interrupted = _run(m, args.timeout, None if args.json else console.exit)
    if args.json:
        print(json.dumps({**result.to_dict(), "incomplete": interrupted is not None}, indent=2))
    else:
        _print_result(result, console)
    if interrupted is not None:
        raise interrupted  # what the run got is printed: main() reports the signal
    if result.outcome is Outcome.TIMEOUT:
        print(f"kvmiso: guest did not finish within {args.timeout:g} s: {result.detail}", file=sys.stderr)
    return 0 if result.ok else EXIT_FAILED


def _run(m: Machine, timeout: float, on_exit: Callable[[Exit], None] | None) -> tuple[RunResult, Interrupted | None]:
    """The run's result, a timeout's included, and the interruption that cut it short (None when
    none did); an interruption before the run began goes up (there is nothing to print)."""
    from ..guest import GuestTimeout

    try:
        return m.run(timeout=timeout, on_exit=on_exit), None
    except GuestTimeout as e:
        return e.result, None
    except Interrupted as e:
        if e.partial is None:
            raise
        return e.partial, e


class ConsoleLines:
    """Each exit numbered and described as it comes, with the guest's console text cut into
    lines between them."""

    def __init__(self) -> None:
        self.exits = 0
        self.pending = bytearray()  # console bytes not yet ended by a newline

    def exit(self, e: Exit) -> None:
        """Print exit ``e``; console output it carries is printed line by line."""
        from ..guest.ucall import PORT_CONSOLE
        from ..kvm.exits import IoExit

        self.exits += 1
        print(f"{self.exits:6d}  {e.name:<14} {describe_exit(e)}")
        if isinstance(e, IoExit) and e.port == PORT_CONSOLE and not e.is_in:
            self.pending.extend(bytes(e.data))
            while b"\n" in self.pending:
                text, _, rest = bytes(self.pending).partition(b"\n")
                print(f"        console| {printable(text)}")
                self.pending[:] = rest


def _print_result(result: RunResult, console: ConsoleLines) -> None:
    if console.pending:
        print(f"        console| {printable(bytes(console.pending))}")
    for r in result.reports:
        print(f"report  tag {r.tag}: {r.value} ({r.value:#x})")
    print(f"{result.outcome}: {result.detail} ({result.runs} KVM_RUN calls, {result.elapsed * 1e3:.1f} ms)")


def describe_exit(e: Exit) -> str:
    """One line per exit, for people: ``IO     out port 0xe9 size 1 count 1 data 48``."""
    from ..kvm.exits import DebugExit, IoExit, MmioExit

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
