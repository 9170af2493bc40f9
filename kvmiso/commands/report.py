"""``kvmiso report``: the whole picture of this host (:mod:`kvmiso.session.hostreport`), its
summary on the terminal and its files in one folder; 0 when the guest suite ended as built."""

from __future__ import annotations

import argparse
import sys

from ..exitstatus import EXIT_FAILED
from ..interrupt import Interrupted


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso report``."""
    sp = subparsers.add_parser("report", help="the whole picture of this host (the main job)")
    sp.add_argument("--out", default="kvmiso-report", help="directory for report.json and plots")
    return sp


def run(args: argparse.Namespace) -> int:
    """Every part, its summary, report.json; an interrupted report prints what was done."""
    from ..output import writable_dir
    from ..session import hostreport as report

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
