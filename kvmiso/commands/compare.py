"""``kvmiso compare A.json B.json``: two bench result files side by side, with ratios and
significance."""

from __future__ import annotations

import argparse

from ..exitstatus import CliError


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso compare``."""
    sp = subparsers.add_parser("compare", help="two bench result files side by side, with ratios and significance")
    sp.add_argument("a", metavar="A.json", help="the baseline result file")
    sp.add_argument("b", metavar="B.json", help="the result file compared with it")
    return sp


def run(args: argparse.Namespace) -> int:
    """Both files' rows side by side with ratios; a file that is not a result is bad input."""
    from ..bench.compare import compare, format_compare
    from ..bench.results import ResultFileError, load

    try:
        a, b = load(args.a), load(args.b)
    except ResultFileError as e:
        raise CliError(str(e)) from None
    print(f"A: {args.a} ({a.get('created', '?')})\nB: {args.b} ({b.get('created', '?')})")
    print(format_compare(compare(a, b), a, b))
    return 0
