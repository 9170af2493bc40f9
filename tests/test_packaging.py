"""The package as a user gets it: a normal (non-editable) install into a fresh venv builds and
runs a guest from any directory, and the Python floor pyproject.toml declares is the one the
code needs."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_declared_python_floor_is_what_the_code_needs():
    # kvmiso reads TOML with the standard library's tomllib, new in 3.11; no backport is a
    # dependency, so 3.11 is the floor, and this suite runs on that floor here (see README)
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert declared == ">=3.11"
    users = [p for p in (ROOT / "kvmiso").rglob("*.py") if re.search(r"^\s*import tomllib", p.read_text(), re.M)]
    assert users, "nothing imports tomllib any more: the floor may be lowered"


@pytest.mark.slow
def test_non_editable_install_runs_a_guest_from_another_directory(kvm, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "build", "*.egg-info", "__pycache__",
                                                             "*.so", ".pytest_cache", ".hypothesis", "kvmiso-report"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    p = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(src)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr[-4000:]
    shutil.rmtree(src)  # nothing may be read from the source tree after the install
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = subprocess.run([str(venv / "bin" / "kvmiso"), "run", "hello"], cwd=elsewhere, capture_output=True,
                       text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "console| Hello from a kvmiso guest!" in p.stdout and "done: the guest reported DONE" in p.stdout
    site = next(venv.glob("lib/python3*/site-packages/kvmiso"))
    assert (site / "guests" / "lib" / "guest.ld").is_file() and (site / "guests" / "hello.S").is_file()
    assert (site / "guests" / "lib" / "kvmiso.h").is_file()  # every .S and C payload includes it
    # the pytest plugin comes with the wheel: its entry point is what pytest loads it by
    p = subprocess.run([str(venv / "bin" / "python"), "-c", "from importlib.metadata import entry_points\n"
                        "print(*[e.value for e in entry_points(group='pytest11', name='kvmiso')])"],
                       cwd=elsewhere, capture_output=True, text=True, env=env, timeout=60)
    assert p.stdout.split() == ["kvmiso.pytest_plugin"], p.stderr
