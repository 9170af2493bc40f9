"""kvmiso: drive KVM through raw ioctls, run tiny guests, see every exit, model kvm_mm.

Every failure is one line naming the cause on stderr and a non-zero exit status: 1 when the
guest or the check did not succeed, 2 for bad input (a payload that does not build, no usable
/dev/kvm, a bad argument, an output that cannot be written).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import NoReturn

from .commands import COMMANDS
from .exitstatus import EXIT_BAD_INPUT, EXIT_FAILED, CliError
from .guest import BuildError
from .interrupt import Interrupted, signals_raise_interrupted
from .kvm import KvmError, KvmUnavailable
from .output import CheckedStdout, StdoutError

# Bad input, status 2, one line: the declared errors. CliError is the family commands raise
# (BootError and OutputError among them); a payload that does not build and a /dev/kvm that
# cannot be used are bad input too. Any other exception is a bug and shows as one.
BAD_INPUT: tuple[type[Exception], ...] = (CliError, BuildError, KvmUnavailable)


def main(argv: list[str] | None = None) -> int:
    """Run one kvmiso command; returns its exit status. SIGINT and SIGTERM end any command as
    :class:`kvmiso.interrupt.Interrupted`: every command unwinds through its with-blocks and
    finally-clauses, one with partial results writes them marked incomplete, and main() prints
    ``kvmiso: interrupted by SIGTERM`` and returns 128 + the signal number."""
    parser = parser_of_commands()
    argv = list(sys.argv[1:] if argv is None else argv)
    command = argv[argv.index("--") + 1:] if "--" in argv else []  # trace/check -- COMMAND ...
    args = parser.parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    args.command = command
    if not getattr(args, "run", None):
        parser.print_help()
        return EXIT_BAD_INPUT
    stdout = sys.stdout
    sys.stdout = CheckedStdout(stdout)
    try:
        with signals_raise_interrupted():
            status = args.run(args)
            sys.stdout.flush()  # here, not at exit: a full or closed stdout is reported below
            return status
    except BAD_INPUT as e:
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


def parser_of_commands() -> argparse.ArgumentParser:
    """``kvmiso``'s parser: one subparser per module of :mod:`kvmiso.commands`, whose ``run`` it calls."""
    p = _Parser(prog="kvmiso", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(metavar="COMMAND", parser_class=_Parser)
    for command in COMMANDS:
        command.add_parser(sub).set_defaults(run=command.run)
    return p


if __name__ == "__main__":
    sys.exit(main())
