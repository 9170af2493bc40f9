"""The pytest plugin of ``kvmiso conformance``'s child pytest (``-p kvmiso.conformance_plugin``):
one result per selftest port (``pass``, ``deviation``, ``skip`` or ``fail``, with the reason),
written as JSON where :mod:`kvmiso.commands.conformance` reads them."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

RESULTS_OPTION = "--kvmiso-conformance-results"
DEVIATION = re.compile(r"known deviation on this host \((.*?)\): (.*)", re.S)

_results: list[dict[str, str]] = []


def pytest_addoption(parser: Any) -> None:
    """The file the results go to."""
    parser.addoption(RESULTS_OPTION, metavar="FILE", help="kvmiso conformance: write each test's result here")


def pytest_runtest_logreport(report: Any) -> None:
    """One result per test: its call's outcome, or its setup's skip or error."""
    if report.when == "call" or (report.when == "setup" and not report.passed):
        _results.append({"test": _name(report.nodeid), **_outcome(report)})


def pytest_sessionfinish(session: Any) -> None:
    """Write the results where ``kvmiso conformance`` reads them."""
    out = session.config.getoption(RESULTS_OPTION)
    if out:
        Path(out).write_text(json.dumps(_results))


def _name(nodeid: str) -> str:
    """``tests/selftests/test_cpuid.py::test_x`` as ``cpuid::test_x``."""
    file, _, test = nodeid.partition("::")
    return f"{os.path.basename(file).removeprefix('test_').removesuffix('.py')}::{test}"


def _outcome(report: Any) -> dict[str, str]:
    if hasattr(report, "wasxfail"):
        m = DEVIATION.match(report.wasxfail)
        reason = f"{m[1]}: {m[2]}" if m else report.wasxfail
        if report.skipped:
            return {"result": "deviation", "reason": reason}
        return {"result": "pass", "reason": f"the deviation did not show ({reason})"}  # a strict=False one
    if report.failed and str(report.longrepr).startswith("[XPASS(strict)]"):
        return {"result": "fail", "reason": f"the deviation is gone: {str(report.longrepr).removeprefix('[XPASS(strict)] ')}"}
    if report.passed:
        return {"result": "pass", "reason": ""}
    if report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return {"result": "skip", "reason": reason.removeprefix("Skipped: ")}
    crash = getattr(report.longrepr, "reprcrash", None)
    return {"result": "fail", "reason": crash.message.splitlines()[0] if crash else str(report.longrepr)[:200]}
