"""The package's style, checked by ruff with pyproject.toml's [tool.ruff] settings: no function
with more than 12 paths through it (C901), and pycodestyle's blank lines (E30x)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import kvmiso

ROOT = Path(kvmiso.__file__).resolve().parents[1]


def test_ruff_finds_nothing_in_the_package():
    # ruff is in the test extra (pip install -e '.[test]'); its settings are pyproject.toml's
    p = subprocess.run([sys.executable, "-m", "ruff", "check", "--output-format", "concise", "kvmiso"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "No module named ruff" not in p.stderr, "ruff is missing: pip install -e '.[test]'"
    assert p.returncode == 0, p.stdout + p.stderr
