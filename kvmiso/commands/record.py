"""``kvmiso record DIR [PAYLOAD ...]``: inside ``kvmiso boot --record-accesses DIR``, the guest
suite run plainly and traced, with each VM's evidence (:mod:`kvmiso.session.recording`), for
``kvmiso check --measured DIR``; 0 when every entry ended as the suite expects."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..exitstatus import EXIT_FAILED, positive_seconds


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso record``."""
    sp = subparsers.add_parser("record", help="inside kvmiso boot --record-accesses DIR: run the suite plainly and "
                               "traced, with each VM's evidence, for kvmiso check --measured DIR")
    sp.add_argument("dir", metavar="DIR", help="the record's folder (the one given to --record-accesses)")
    sp.add_argument("payload", nargs="*", help="only these payloads (portio) or suite labels (portio/long)")
    sp.add_argument("--timeout", type=positive_seconds, default=30.0,
                    help="seconds before a guest is stopped (default 30: the record slows TCG down)")
    return sp


def run(args: argparse.Namespace) -> int:
    """Record every entry asked for; status 1 when one did not end as expected."""
    from ..session.recording import record_suite  # it needs the guest, BPF and tracing

    return EXIT_FAILED if record_suite(Path(args.dir), args.payload, args.timeout) else 0


__all__ = ["add_parser", "run"]
