"""`kvmiso boot`: the pieces on real data (Debian's modules.dep, busybox, the host's sh), then
real boots of Debian's kernel under QEMU, with their errors, signals and what they leave behind.

The boots need qemu-system-x86 and busybox-static (Debian packages) and Debian's kernel in the
cache (fetched on first use with apt-get download); a missing one skips, naming it, unless
KVMISO_REQUIRE_BOOT=1 (CI), which makes it a failure.
"""

from __future__ import annotations

import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from kvmiso.boot import BootError, Kernel
from kvmiso.boot.initramfs import _elf_interpreter, command_script, newc_archive
from kvmiso.boot.kernel import bzimage_release, debian_kernel, module_key
from kvmiso.boot.qemu import QEMU, GuestRun, _follow, choose_accel, host_nests
from kvmiso.host import Host

FIXTURES = Path(__file__).parent / "fixtures" / "boot"
BUSYBOX = "/bin/busybox"


def kvmiso(*args, env=None, cwd=None, timeout=600):
    return subprocess.run([sys.executable, "-m", "kvmiso.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=timeout)


def _missing(what: str) -> None:
    if os.environ.get("KVMISO_REQUIRE_BOOT") == "1":
        pytest.fail(f"KVMISO_REQUIRE_BOOT=1 but {what}")
    pytest.skip(what)


@pytest.fixture(scope="session")
def debian() -> Kernel:
    """Debian's kernel from kvmiso's cache (fetched once), with QEMU and busybox present."""
    if not shutil.which(QEMU):
        _missing(f"{QEMU} is not installed (Debian package qemu-system-x86)")
    if not os.path.isfile(BUSYBOX):
        _missing("busybox is not installed (Debian package busybox-static)")
    try:
        return debian_kernel(log=lambda text: None)
    except BootError as e:
        _missing(f"Debian's kernel is not in the cache and cannot be fetched: {e}")


def _qemu_children(pid: int) -> list[psutil.Process]:
    try:
        return [c for c in psutil.Process(pid).children(recursive=True) if c.name().startswith("qemu-system")]
    except psutil.NoSuchProcess:
        return []


def _mounts() -> list[str]:
    return Path("/proc/self/mountinfo").read_text().splitlines()


# --- the pieces ------------------------------------------------------------------------------

def test_command_script_keeps_arguments_directory_and_environment(tmp_path):
    argv = ["sh", "-c", 'printf "%s|" "$@" "$PWD" "$KVMISO_T"', "sh", "it's", "$HOME", "a b", ""]
    script = command_script(argv, str(tmp_path), {"KVMISO_T": "x'y z", "not-a-name": "dropped", "PATH": os.environ["PATH"]})
    p = subprocess.run(["sh", "-c", script], capture_output=True, text=True, cwd="/")
    assert p.returncode == 0, p.stderr
    assert p.stdout == f"it's|$HOME|a b||{tmp_path}|x'y z|"
    assert "not-a-name" not in script


def test_command_script_names_a_missing_directory(tmp_path):
    p = subprocess.run(["sh", "-c", command_script(["true"], str(tmp_path / "gone"), {})], capture_output=True, text=True)
    assert p.returncode == 2 and "is not there in the guest" in p.stderr


def test_modules_load_after_their_dependencies_from_debians_modules_dep():
    k = Kernel(Path("/nonexistent"), "6.1.0-57-amd64", FIXTURES, "fixture")
    names = [module_key(f.name) for f in k.module_files(["kvm_amd", "9p", "virtio_pci", "9pnet_virtio", "overlay"])]
    assert names == ["ccp", "irqbypass", "kvm", "kvm_amd", "9pnet", "netfs", "fscache", "9p",
                     "virtio_pci_legacy_dev", "virtio_pci_modern_dev", "virtio_ring", "virtio", "virtio_pci",
                     "9pnet_virtio", "overlay"]
    assert k.module_files(["kvm"]) == [FIXTURES / "kernel/virt/lib/irqbypass.ko", FIXTURES / "kernel/arch/x86/kvm/kvm.ko"]
    assert k.module_files(["8250", "kvm-intel"])[-1].name == "kvm-intel.ko"  # built in: no file
    with pytest.raises(BootError, match="module nosuch is neither in .*modules.dep nor built into 6.1.0-57-amd64"):
        k.module_files(["nosuch"])


def test_initramfs_archive_unpacks_with_busybox_cpio(tmp_path):
    if not os.path.isfile(BUSYBOX):
        _missing("busybox is not installed (Debian package busybox-static)")
    files = {"bin": None, "bin/tool": b"#!/bin/sh\necho hi\n", "data/x": b"abc", "data": None, "empty": b""}
    (tmp_path / "a.cpio").write_bytes(newc_archive(files, executable={"bin/tool"}))
    out = tmp_path / "out"
    out.mkdir()
    p = subprocess.run([BUSYBOX, "cpio", "-i", "-d", "-F", str(tmp_path / "a.cpio")], cwd=out, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert (out / "bin/tool").read_bytes() == files["bin/tool"] and os.access(out / "bin/tool", os.X_OK)
    assert (out / "data/x").read_bytes() == b"abc" and not os.access(out / "data/x", os.X_OK)
    assert (out / "empty").read_bytes() == b"" and (out / "data").is_dir()


def test_busybox_static_and_a_dynamic_program_told_apart():
    if not os.path.isfile(BUSYBOX):
        _missing("busybox is not installed (Debian package busybox-static)")
    assert _elf_interpreter(Path(BUSYBOX).read_bytes()) is False
    assert _elf_interpreter(Path(shutil.which("sh")).resolve().read_bytes()) is True


EPOLL_WAITS = {"x86_64": ("232", "281")}  # epoll_wait, epoll_pwait: where select() sleeps


def _in_epoll_wait(tid: int) -> bool:
    # the file holds "running" while the thread is on a CPU, else its syscall number first
    return Path(f"/proc/self/task/{tid}/syscall").read_text().split()[0] in EPOLL_WAITS[platform.machine()]


@pytest.mark.skipif(platform.machine() not in EPOLL_WAITS, reason="needs the epoll syscall numbers of x86-64")
def test_sigint_taken_by_another_thread_still_ends_the_console_loop():
    # The loop that follows QEMU's ports waits in select(). Python's C handler only notes a
    # signal, so one that lands while select() sleeps and is taken by another thread (or lands
    # just before it sleeps) wakes nothing until QEMU writes again: a quiet guest kept kvmiso
    # from answering Ctrl-C. Here the guest is up and silent, and another thread takes the SIGINT.
    r, w = os.pipe()
    main = threading.get_native_id()
    outcome = {}
    ended = threading.Event()

    def signal_once_main_sleeps() -> None:
        try:
            for _ in range(10000):  # 1 ms each: a main thread that never gets there fails the test
                if _in_epoll_wait(main):
                    signal.pthread_kill(threading.get_ident(), signal.SIGINT)
                    outcome["sent"] = True
                    break
                time.sleep(0.001)
            outcome["rescued"] = not ended.wait(20)  # slept through it: the close below ends it
        finally:
            os.close(w)  # the end of the console: the loop always ends, never hangs the suite

    sender = threading.Thread(target=signal_once_main_sleeps)
    sender.start()
    try:
        with pytest.raises(KeyboardInterrupt):
            _follow([r], GuestRun(up_after=0.0), time.monotonic(), 600, show_console=False)
    finally:
        ended.set()
        sender.join()
        os.close(r)
    assert outcome == {"sent": True, "rescued": False}, "the loop slept through a SIGINT until the guest wrote again"


def test_bzimage_release_read_from_the_setup_header(debian, tmp_path):
    assert bzimage_release(debian.image) == debian.release
    notimage = tmp_path / "vmlinux"
    notimage.write_bytes(Path(shutil.which("sh")).resolve().read_bytes())
    with pytest.raises(BootError, match="is not a bzImage"):
        bzimage_release(notimage)


def test_accelerator_follows_what_this_host_can_nest():
    nests, why = host_nests(Host.read())  # from /dev/kvm, /sys/module/*/parameters/nested and the CPU flags
    acc = choose_accel()
    assert acc.why == why
    if nests:
        assert (acc.name, acc.cpu) == ("kvm", "host")
    else:
        assert (acc.name, acc.cpu) == ("tcg", "max,la57=off")
        with pytest.raises(BootError, match="--accel kvm: "):
            choose_accel("kvm")
    assert choose_accel("tcg", "qemu64").cpu == "qemu64"


def test_bad_input_is_one_line_and_status_2(tmp_path):
    p = kvmiso("boot", "--kernel", str(tmp_path / "nonesuch"), "--", "true")
    assert p.returncode == 2 and p.stderr.strip() == f"kvmiso: kernel {tmp_path / 'nonesuch'}: no such file"
    p = kvmiso("boot", "--kernel", str(tmp_path / "nonesuch"))
    assert p.returncode == 2 and p.stderr.strip() == "kvmiso: no command given: kvmiso boot [options] -- COMMAND ..."
    # a kernel given as a file (a bzImage header is all boot reads before it looks for QEMU): with
    # --kernel debian, a host that has not fetched that kernel yet is told about apt-get first
    header = bytearray(0x1000)
    header[0x202:0x206] = b"HdrS"
    (tmp_path / "bzImage").write_bytes(header)
    p = kvmiso("boot", "--kernel", str(tmp_path / "bzImage"), "--", "true", env=dict(os.environ, PATH=str(tmp_path)))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"kvmiso: {QEMU} not found: install Debian's qemu-system-x86 package"


# --- real boots ------------------------------------------------------------------------------

@pytest.mark.slow
def test_boot_runs_the_command_in_the_same_directory_and_returns_its_status(debian, tmp_path):
    before = _mounts()
    env = dict(os.environ, KVMISO_T="passed through", TMPDIR=str(tmp_path))
    p = kvmiso("boot", "--", "sh", "-c", 'echo "out $(uname -r) $PWD $KVMISO_T"; echo err >&2; '
               'ls /dev/kvm; touch written; test -f written || exit 9; exit 3', env=env, cwd=tmp_path)
    assert p.returncode == 3, p.stderr
    assert p.stdout == f"out {debian.release} {tmp_path} passed through\n/dev/kvm\n"
    assert p.stderr.endswith("err\n") and "(kvm_amd loaded); running the command" in p.stderr
    assert list(tmp_path.iterdir()) == []  # the guest wrote to its tmpfs overlay, not to the host
    assert _mounts() == before


@pytest.mark.slow
def test_a_module_that_does_not_load_gives_its_dmesg_line(debian):
    # TCG offers SVM, so kvm_amd is loaded first; KVM then refuses a second vendor module
    p = kvmiso("boot", "--modules", "kvm_intel", "--", "true")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == "kvmiso: module kvm_intel did not load: kvm: already loaded vendor module 'kvm_amd'"


def test_a_guest_that_does_not_come_up_in_time_is_stopped(debian, tmp_path):
    # the command would never end: kvmiso must stop QEMU at the timeout, not wait for it
    p = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "boot", "--timeout", "1", "--", "sleep", "1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    qemu = _wait_for_qemu(p)
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "kvmiso: the guest did not come up within 1 s; the console" in err
    assert not qemu.is_running()


def _wait_for_qemu(p: subprocess.Popen) -> psutil.Process:
    for _ in range(3000):
        found = _qemu_children(p.pid)
        if found:
            return found[0]
        assert p.poll() is None, p.stderr.read()
        time.sleep(0.01)
    raise AssertionError("kvmiso boot never started QEMU")


@pytest.mark.slow
def test_sigterm_while_the_command_runs_stops_qemu(debian):
    p = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "boot", "--", "sh", "-c", "echo ready; sleep 1000"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        qemu = _wait_for_qemu(p)
        assert p.stdout.readline() == "ready\n"  # the command itself is running in the guest
        before = _mounts()
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + signal.SIGTERM
    assert err.strip().splitlines()[-1] == "kvmiso: interrupted by SIGTERM" and "Traceback" not in err
    assert not qemu.is_running() and _mounts() == before


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL])
def test_a_signal_during_boot_leaves_no_qemu(debian, sig):
    # SIGINT unwinds kvmiso, which stops QEMU; SIGKILL cannot be caught: QEMU's parent-death
    # signal stops it
    p = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "boot", "--", "true"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        qemu = _wait_for_qemu(p)
        p.send_signal(sig)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == (128 + sig if sig != signal.SIGKILL else -sig), err
    qemu.wait(timeout=30)  # a QEMU that outlives kvmiso fails here
    assert not qemu.is_running()
