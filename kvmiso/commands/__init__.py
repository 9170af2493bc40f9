"""The subcommands of ``kvmiso``, one module each, all of one shape.

``kvmiso NAME`` is the module ``commands/NAME.py``, with two public functions:

- ``add_parser(subparsers) -> ArgumentParser`` adds NAME, its help and its arguments. It imports
  nothing heavy (``kvmiso --help`` loads every command module); the layers a command drives are
  imported inside ``run``.
- ``run(args) -> int`` does the work and returns the exit status: 0 done and passed, 1 done and
  failed (:mod:`kvmiso.exitstatus`). Bad input raises :class:`kvmiso.exitstatus.CliError`
  (status 2), which :func:`kvmiso.cli.main` prints as one line; any other exception is a bug.

:data:`COMMANDS` holds them in the order ``kvmiso --help`` lists them; :mod:`kvmiso.cli` only
assembles the parser from it. What several commands share (argument groups, the guest's mode
check, the model's address space, the watch of another process) is in :mod:`.options`.
"""

from . import bench, boot, check, compare, conformance, model, probe, record, report, run, trace

COMMANDS = (probe, bench, compare, report, run, trace, model, check, record, conformance, boot)

__all__ = ["COMMANDS"]
