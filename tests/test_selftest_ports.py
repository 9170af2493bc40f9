"""The ports of upstream selftests (tests/selftests/) keep their docstrings true: the line count
each states is its own, at most half of upstream's, and every line its assertion map points at
holds an assertion. (Upstream's counts are stated from the Linux 6.12 sources, which the suite
does not have; they were counted by the same rule: no comment and no blank line.)"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PORTS = sorted((Path(__file__).parent / "selftests").glob("test_*.py"))
LINES = re.compile(r"Lines: (\d+) here \(.*?\) for\s+upstream's (\d+)\s+\((\d+) with comments and blank lines\)", re.S)
MAPPED = re.compile(r"^\s+[\d+][\d, -]* .+ -> ([\d, ]+)$", re.M)  # "+": an assertion upstream added later
# what an assertion line holds: a host assert, a guest one, or a call that raises on failure
ASSERTING = re.compile(r"\basserts?\b|GUEST_ASSERT|GUEST_FAIL|raise_for_guest|pytest\.raises|run_until_sync|\bsyncs\(")


def code_lines(path: Path) -> int:
    """Lines of Python and guest code: not the module docstring, not blank, not only a comment."""
    text = path.read_text()
    doc = ast.get_docstring(ast.parse(text), clean=False) or ""
    body = text.split('"""', 2)[2] if doc else text
    return sum(1 for line in body.splitlines()
               if (s := line.strip()) and not s.startswith(("#", "/*", "*", "//")))


def test_every_port_the_issue_asks_for_is_here():
    upstream = {"x86/userspace_io_test", "x86/debug_regs", "x86/userspace_msr_exit_test", "x86/set_sregs_test",
                "x86/cpuid_test", "x86/sync_regs_test", "set_memory_region_test"}
    assert {ast.get_docstring(ast.parse(p.read_text())).split()[0] for p in PORTS} == upstream


@pytest.mark.parametrize("port", PORTS, ids=lambda p: p.stem)
def test_a_port_states_its_own_size_and_is_at_most_half_of_upstream(port):
    m = LINES.search(ast.get_docstring(ast.parse(port.read_text())))
    assert m, f"{port.name}: no 'Lines: N here (...) for upstream's M (K with comments and blank lines)'"
    ours, upstream, upstream_raw = map(int, m.groups())
    assert code_lines(port) == ours
    assert 2 * ours <= upstream and len(port.read_text().splitlines()) <= upstream_raw


@pytest.mark.parametrize("port", PORTS, ids=lambda p: p.stem)
def test_every_mapped_upstream_assertion_points_at_an_assertion(port):
    lines = port.read_text().splitlines()
    targets = [int(n) for m in MAPPED.finditer(ast.get_docstring(ast.parse(port.read_text()))) for n in m.group(1).split(",")]
    assert targets, f"{port.name}: no upstream assertion mapped"
    wrong = [f"line {n}: {lines[n - 1].strip()!r}" for n in targets if not ASSERTING.search(lines[n - 1])]
    assert not wrong, wrong
