"""kvmiso as a user who may open /dev/kvm but is not root (the README's `kvm` group case), for
real: uid nobody, in a private mount namespace where /dev/kvm is a copy of the device node that
only nobody may open. The host's /dev/kvm is never touched. Every command works with what that
user may see and says once what it could not read."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import sys
import sysconfig
import tempfile
from pathlib import Path
from typing import Callable, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


class Nobody(NamedTuple):
    """The unprivileged user: ``run(*kvmiso_args)``, its home, ``sh(script)``."""

    run: Callable[..., subprocess.CompletedProcess]
    home: Path
    sh: Callable[..., subprocess.CompletedProcess]


@pytest.fixture(scope="module")
def as_nobody(checkout_open_to_nobody):
    if os.geteuid() != 0:
        pytest.skip("needs root to make the unprivileged user's copy of /dev/kvm (mknod, a mount namespace)")
    for tool in ("unshare", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool} (util-linux)")
    top = Path(tempfile.mkdtemp(prefix="kvmiso-nobody-"))
    os.chmod(top, 0o755)
    dev, home = top / "kvm", top / "home"
    os.mknod(dev, stat.S_IFCHR | 0o600, os.stat("/dev/kvm").st_rdev)
    os.chown(dev, NOBODY, NOBODY)
    home.mkdir()
    os.chown(home, NOBODY, NOBODY)
    path = os.pathsep.join([str(ROOT), sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]])
    script = ('mount --bind "$0" /dev/kvm && cd "$1" && shift && exec setpriv --reuid=65534 --regid=65534 '
              '--clear-groups -- env -i PATH=/usr/bin:/bin HOME="$PWD" PYTHONPATH="$KVMISO_PATH" "$@"')

    def as_user(*argv: str, timeout: float = 300) -> subprocess.CompletedProcess:
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script, str(dev),
                               str(home), *argv], capture_output=True, text=True, timeout=timeout,
                              env=dict(os.environ, KVMISO_PATH=path))

    # a Python of this minor version that nobody may execute (a pyenv under /root may not be)
    version = "import sys; print(sys.version_info[:2])"
    python = next((c for c in (os.path.realpath(sys.executable), "/usr/bin/python3")
                   if as_user(c, "-c", version).stdout.strip() == str(sys.version_info[:2])), None)
    if python is None:
        shutil.rmtree(top)
        pytest.skip(f"no Python {sys.version_info[0]}.{sys.version_info[1]} that uid {NOBODY} may execute")

    def run(*args: str, timeout: float = 300, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        settings = [f"{k}={v}" for k, v in (env or {}).items()]
        return as_user("env", *settings, python, "-m", "kvmiso.cli", *args, timeout=timeout)

    def sh(script: str, timeout: float = 300) -> subprocess.CompletedProcess:
        """``script`` in sh as the user, with ``$0`` the Python that runs kvmiso."""
        return as_user("sh", "-c", script, python, timeout=timeout)

    yield Nobody(run, home, sh)
    shutil.rmtree(top)


def test_probe_run_trace_and_bench_work_for_a_user_with_only_dev_kvm(kvm, as_nobody):
    run = as_nobody.run
    p = run("probe")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
    if os.path.ismount("/sys/kernel/tracing"):
        assert "not readable: /sys/kernel/tracing/events: Permission denied (tracefs is root-only)" in p.stdout
    else:  # a fresh boot, before any kvmiso run as root mounted it
        assert "tracefs                 not mounted at /sys/kernel/tracing; needs root to mount" in p.stdout
    p = run("run", "hello")
    assert p.returncode == 0 and "Hello from a kvmiso guest!" in p.stdout, p.stderr
    p = run("trace", "hello")
    assert p.returncode == 0, p.stderr
    assert p.stderr == "kvmiso: in-kernel events not traced: tracing kvm events needs root (tracefs instances are root-only)\n"
    p = run("bench", "--kinds", "out", "--samples", "20", "--runs", "1", "--no-python")
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr


@pytest.mark.slow
def test_report_for_a_user_with_only_dev_kvm_knows_the_vendor(kvm, vendor, as_nobody):
    run, home = as_nobody.run, as_nobody.home
    p = run("report", "--out", "rep", timeout=900)
    assert p.returncode == 0 and "Traceback" not in p.stderr, (p.stdout[-3000:], p.stderr)
    data = json.loads((home / "rep" / "report.json").read_text())
    assert data["complete"] and data["host"]["vendor"] == vendor  # from /sys/module, not tracefs
    assert all(x["as_expected"] for x in data["suite"]), [x for x in data["suite"] if not x["as_expected"]]
    assert "needs root" in data["skipped"]["in-kernel events"]
    assert "modeled addresses" in data["skipped"]["kernel addresses"]


def test_check_that_could_trace_nothing_is_not_a_pass(kvm, as_nobody):
    """Before: a user without tracefs checked 0 exits of `hello` and check returned 0."""
    run = as_nobody.run
    p = run("check", "hello")
    assert p.returncode == 1 and "KVM_RUN calls, 0 exits checked" in p.stdout, p.stderr
    assert p.stderr == ("kvmiso: hello: no exit was checked (in-kernel events were not traced: tracing kvm events "
                        "needs root (tracefs instances are root-only)): a check of nothing is not a pass\n")


def test_a_user_without_a_writable_home_builds_into_a_private_cache_and_says_so_once(kvm, as_nobody):
    """Before: every command failed with PermissionError: '/nonexistent' (the build cache)."""
    run = as_nobody.run
    for command in (["run", "hello"], ["trace", "portio", "--mode", "long"]):
        p = run(*command, env={"HOME": "/nonexistent"})
        assert p.returncode == 0 and "Traceback" not in p.stderr, p.stderr
        said = [line for line in p.stderr.splitlines() if "cache" in line]
        assert len(said) == 1 and said[0].startswith(
            "kvmiso: warning: no writable cache folder (/nonexistent: Permission denied); building into "), p.stderr
        private = said[0].split("building into ")[1].split(",")[0]
        assert not os.path.exists(private)  # removed at exit



_HOLDS_A_VM = """
import pathlib, time
from kvmiso.kvm import Kvm
with Kvm() as kvm, kvm.create_vm() as vm:
    vm.create_vcpu(0)
    pathlib.Path("holds-a-vm").touch()
    time.sleep(120)
"""

WATCH_NEEDS_ROOT = ("kvmiso: cannot watch another process: tracing kvm events needs root (tracefs instances are "
                    "root-only); without root, run, trace PAYLOAD (its exits to userspace), bench and model still work")


def test_watching_another_process_says_in_one_line_that_it_needs_root(kvm, as_nobody):
    """Before: PermissionError: '/sys/kernel/tracing/instances', a traceback, status 1."""
    for command in (["trace", "--", "true"], ["check", "--duration", "1", "--", "true"]):
        p = as_nobody.run(*command)
        assert p.returncode == 2 and p.stdout == "" and p.stderr == WATCH_NEEDS_ROOT + "\n", p.stderr
    # --pid of the user's own VMM: readable, but not traceable
    p = as_nobody.sh(f"""rm -f holds-a-vm; "$0" -c '{_HOLDS_A_VM}' & vmm=$!
        while [ ! -e holds-a-vm ]; do sleep 0.05; done
        "$0" -m kvmiso.cli trace --pid $vmm; rc=$?; kill $vmm; exit $rc""")
    assert p.returncode == 2 and p.stdout == "" and p.stderr == WATCH_NEEDS_ROOT + "\n", p.stderr
