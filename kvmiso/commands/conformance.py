"""``kvmiso conformance``: run kvmiso's ports of the KVM selftests (tests/selftests/ of a checkout)
on this host and print, test by test, where its KVM passes, departs from upstream KVM (a
``kvm_deviation`` that holds here, with the fact that decides it), or cannot run the test.

    $ kvmiso conformance
    kvm_pvm, Linux 6.18.44-fc-v1300: 16 pass, 7 deviation, 2 skip, 0 fail
    test                                                        result     reason
    cpuid::test_the_vcpu_reads_back_the_supported_cpuid         deviation  get_cpuid2_differs_from_set: ...

Other vendor modules: ``kvmiso boot --kernel debian -- kvmiso conformance --json > amd.json`` runs
it under kvm_amd, and ``kvmiso conformance --merge pvm.json amd.json`` sets the tables side by
side. The tests run in a pytest of their own (:mod:`kvmiso.conformance_plugin` is its plugin), whose
progress goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ..exitstatus import EXIT_FAILED, CliError
from ..conformance_plugin import RESULTS_OPTION
from ..host import Host

PORTS = Path(__file__).resolve().parents[2] / "tests" / "selftests"  # in a checkout (an editable install)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso conformance``."""
    sp = subparsers.add_parser("conformance", help="run the ports of KVM selftests: where this KVM departs from upstream's")
    sp.add_argument("path", nargs="?", default=str(PORTS), help="the ports (default: tests/selftests of this checkout)")
    sp.add_argument("-k", metavar="EXPR", help="only the tests pytest's -k EXPR selects")
    sp.add_argument("--json", action="store_true", help="print the results as JSON (for --merge)")
    sp.add_argument("--merge", nargs="+", metavar="FILE", help="set saved --json results side by side, one column a host")
    return sp


def run(args: argparse.Namespace) -> int:
    """Run the ports (or read saved results) and print the table; 1 when a test failed."""
    runs = [_read(f) for f in args.merge] if args.merge else [run_ports(args.path, args.k)]
    if args.json:
        print(json.dumps(runs[0] if len(runs) == 1 else runs, indent=2))
    elif len(runs) == 1:
        print_table(runs[0])
    else:
        print_merged(runs)
    return EXIT_FAILED if any(r["result"] == "fail" for run in runs for r in run["results"]) else 0


def run_ports(path: str, select: str | None = None) -> dict[str, Any]:
    """Run pytest on ``path`` in a child process with kvmiso's conformance plugin: the host, and
    one result for each test (``pass``, ``deviation``, ``skip`` or ``fail``, with the reason)."""
    if not Path(path).exists():
        raise CliError(f"no selftest ports at {path}: give the path to tests/selftests of a kvmiso checkout")
    with tempfile.TemporaryDirectory(prefix="kvmiso-conformance-") as tmp:
        out = Path(tmp) / "results.json"
        argv = [sys.executable, "-m", "pytest", path, "-p", "kvmiso.conformance_plugin", RESULTS_OPTION, str(out), "-q",
                "-p", "no:cacheprovider", *(["-k", select] if select else [])]
        try:
            status = subprocess.run(argv, stdout=_stderr(), check=False).returncode
        except FileNotFoundError as e:
            raise CliError(f"cannot run {sys.executable}: {e.strerror}") from None
        if not out.exists():
            raise CliError(f"pytest ended with status {status} before any result (is pytest installed? "
                           "pip install 'kvmiso[test]')")
        results = json.loads(out.read_text())
    host = Host.read()
    return {"vendor": host.vendor, "kernel": host.kernel, "path": path, "results": results}


def print_table(run: dict[str, Any]) -> None:
    """One host's results: a summary line, then test, result and reason, aligned."""
    counts = {k: sum(r["result"] == k for r in run["results"]) for k in ("pass", "deviation", "skip", "fail")}
    print(f"{_host(run)}: " + ", ".join(f"{n} {k}" for k, n in counts.items()))
    rows = [("test", "result", "reason")] + [(r["test"], r["result"], r["reason"]) for r in run["results"]]
    width = [max(len(row[i]) for row in rows) for i in range(2)]
    for test, result, reason in rows:
        print(f"{test:<{width[0]}}  {result:<{width[1]}}  {reason}".rstrip())


def print_merged(runs: list[dict[str, Any]]) -> None:
    """Several hosts' results: a column each, then every reason that is not a pass, by host."""
    tests = list(dict.fromkeys(r["test"] for run in runs for r in run["results"]))
    by = [{r["test"]: r for r in run["results"]} for run in runs]
    rows = [("test", *(_host(run) for run in runs))]
    rows += [(t, *(b[t]["result"] if t in b else "-" for b in by)) for t in tests]
    width = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for row in rows:
        print("  ".join(f"{cell:<{w}}" for cell, w in zip(row, width)).rstrip())
    for run, b in zip(runs, by):
        notes = [f"  {t}: {b[t]['result']}: {b[t]['reason']}" for t in tests if t in b and b[t]["result"] != "pass"]
        if notes:
            print(f"\n{_host(run)}:", *notes, sep="\n")


def _stderr() -> int | None:
    """Where the child's pytest prints its progress: our stderr where it is a file (not in a
    test's capture), else our stdout."""
    try:
        return sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):
        return None


def _host(run: dict[str, Any]) -> str:
    return f"{run['vendor'] or 'no vendor module'}, Linux {run['kernel']}"


def _read(path: str) -> dict[str, Any]:
    try:
        run = json.loads(Path(path).read_text())
    except (OSError, ValueError) as e:
        raise CliError(f"{path}: not a kvmiso conformance --json file: {e}") from None
    if not isinstance(run, dict) or not isinstance(run.get("results"), list):
        raise CliError(f"{path}: not a kvmiso conformance --json file (no results)")
    return run
