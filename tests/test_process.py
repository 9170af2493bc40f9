"""Another process's KVM fds, copied with pidfd_getfd(2): a copy must be the fd that was listed,
even when the process closed it and reused its number in between."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from kvmiso.observe.foreign.vms import ForeignVm, ProcessEnded, ProcessError, kvm_fds

_CHILD = """
import os, sys
from kvmiso.kvm import Kvm
with Kvm() as kvm, kvm.create_vm() as vm:
    vcpu = vm.create_vcpu(0)
    print(vcpu.fd, flush=True)
    sys.stdin.readline()  # the test has listed this process's fds
    os.dup2(os.open("/dev/null", os.O_RDONLY), vcpu.fd)  # the vCPU's fd number, reused
    print("reused", flush=True)
    sys.stdin.readline()
    os._exit(0)
"""


def test_a_vcpu_fd_reused_after_the_listing_is_not_taken_for_the_vcpu(kvm):
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        number = int(child.stdout.readline())
        listed = kvm_fds(child.pid)
        assert listed.vcpus == {0: number}
        with ForeignVm.attach(child.pid, listed) as vm:  # while it is still the vCPU's
            assert [(v.id, v.their_fd) for v in vm.vcpus] == [(0, number)]
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "reused"
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ProcessError, match=f"its fd {number} was no longer vCPU 0's when copied"):
            ForeignVm.attach(child.pid, listed)
        assert len(os.listdir("/proc/self/fd")) == before  # the wrong copy was closed
    finally:
        child.kill()
        child.wait()


def test_a_process_that_ended_after_the_listing_is_named_as_ended(kvm):
    # A process that has ended but is not yet reaped still has a pidfd; pidfd_getfd then fails
    # (ESRCH), and attach says the process ended rather than that a copy failed.
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        int(child.stdout.readline())
        listed = kvm_fds(child.pid)
        child.kill()
        for _ in range(5000):  # 1 ms each: until the kernel has made it a zombie
            if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.001)
        else:
            pytest.fail(f"pid {child.pid} did not become a zombie")
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ProcessEnded, match=f"pid {child.pid}: ended while its vCPU fds were being copied"):
            ForeignVm.attach(child.pid, listed)
        assert len(os.listdir("/proc/self/fd")) == before  # the pidfd was closed
    finally:
        child.kill()
        child.wait()


_NEW_VM = """
import sys
from kvmiso.kvm import Kvm
with Kvm() as kvm:
    for _ in range(2):
        with kvm.create_vm() as vm:
            vcpu = vm.create_vcpu(0)
            print(vcpu.fd, flush=True)
            sys.stdin.readline()
"""


def test_a_vm_replaced_by_another_in_the_same_fd_numbers_is_no_longer_held(kvm):
    child = subprocess.Popen([sys.executable, "-c", _NEW_VM], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        first = int(child.stdout.readline())
        with ForeignVm.attach(child.pid) as vm:
            assert vm.still_held()
            child.stdin.write("\n")
            child.stdin.flush()
            assert int(child.stdout.readline()) == first  # the second VM's vCPU, at the first one's number
            assert kvm_fds(child.pid).vcpus == {0: first}
            assert not vm.still_held()  # the listing cannot tell; kcmp can
            with ForeignVm.attach(child.pid) as second:
                assert second.still_held()
    finally:
        child.kill()
        child.wait()


_TWO_VMS = """
import time
from kvmiso.guest import Machine
for _ in range(2):
    with Machine("hello", mode="long") as m:
        m.run(timeout=10)
        time.sleep(1)  # kvmiso looks every 0.1 s: it sees each VM
        m.run(timeout=10)
"""


def test_a_watched_command_that_creates_vm_after_vm_is_followed_and_says_so(kvm):
    from kvmiso.session import watch_process

    w = watch_process([sys.executable, "-c", _TWO_VMS])
    assert len(w.vms) == 2 and all(vm.created_ns is not None for vm in w.vms)
    first, second = w.vms
    # each VM's records go with its own objects, read while it lived
    assert first.evidence.real and second.evidence.real and first.evidence.threads and second.evidence.threads
    assert first.evidence.object("vcpu_struct").address != second.evidence.object("vcpu_struct").address
    assert len(first.records) == len(second.records) > 0 and len(w.log.records) == 2 * len(first.records)
    assert max(r.end_ns for r in first.records) < second.created_ns < min(r.end_ns for r in second.records)


_MANY_VMS = """
import sys
from kvmiso.guest import Machine
for _ in range(int(sys.argv[1])):
    with Machine("hello", mode="long") as m:
        m.run(timeout=10)
"""


def test_check_of_a_command_that_makes_many_short_lived_vms_counts_them_and_names_those_modeled(kvm):
    """Before: 50 VMs of a few ms each were reported as "created 4 VMs" (or 14, or none), and
    the exits of those never read were judged on modeled objects without a word."""
    p = _kvmiso("check", "--json", "--", sys.executable, "-c", _MANY_VMS, "50")
    out, err = p.communicate(timeout=300)
    got = json.loads(out)
    pid = got["pid"]
    assert got["vms"].startswith(f"pid {pid}: 50 VMs, one at a time (50 created while traced, each seen as one "
                                 "kvm_update_master_clock from kvm_arch_init_vm)"), got["vms"]
    hello = got["total"]["runs"] // 50
    assert got["total"]["runs"] == 50 * hello and hello > 0
    modeled = re.search(r"the objects and page table of (VMs? [\d, -]+) of 50 are modeled \((\d+) KVM_RUN", got["vms"])
    assert modeled and int(modeled[2]) % hello == 0, got["vms"]  # whole VMs, not a count of looks
    p = _kvmiso("check", "--require-real", "--", sys.executable, "-c", _MANY_VMS, "50")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 1 and out == "", err
    assert re.fullmatch(rf"kvmiso: pid \d+: --require-real, but the objects and page table of VMs? [\d, -]+ of 50 are "
                        rf"modeled \(\d+ KVM_RUN calls judged on them\)\n", err), err


_BUSY = """\
        .include "kvmiso.inc"
        .text
        .globl main
main:
        mov $20000, %ecx        # 20,000 MMIO writes, each an instruction KVM's emulator decodes
        mov $MMIO_BASE, %ebx    # on every host (and seconds of them: the count is read while the
1:      mov $10, %eax           # guest runs, a tick apart), after 10 turns of a loop that a host
2:      dec %eax                # whose CPL0 code is emulated (kvm_pvm) emulates too
        jnz 2b
        movb %al, (%ebx)
        loop 1b
        ret
"""


def test_check_of_a_command_counts_the_instructions_it_did_not_trace(kvm, tmp_path):
    """A watch leaves the per-instruction events out, so a guest busy in emulated code came out
    'all stay' under asi although every emulated instruction is fetched from guest memory, which
    ASI does not map. The instructions are counted (vcpu->stat.insn_emulation, through BPF) and
    each is checked along the fetch path; what stays uncounted is said, and makes a lower bound."""
    src = tmp_path / "busy.S"
    src.write_text(_BUSY)
    run = f"exec {sys.executable} -m kvmiso.cli run {src} --mode long >/dev/null"
    p = _kvmiso("check", "--policy", "asi", "--json", "--", "sh", "-c", run)
    out, err = p.communicate(timeout=300)
    total = json.loads(out)["total"]
    counted = re.search(r"kvm:kvm_emulate_insn: not traced; (\d+) counted", " ".join(total["unseen"]))
    assert counted and int(counted[1]) > 0, total["unseen"]
    assert total["by_kind"]["host_mm"]["untraced:kvm:kvm_emulate_insn"] == int(counted[1])
    assert total["classes"]["kvm_mm"] < total["exits"] and any("guest_memory" in r for r in total["host_mm_reasons"])
    assert any(u.startswith("kvmmmu:*: not traced and not counted") for u in total["unseen"])


def _kvmiso(*args: str, **kw) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "kvmiso.cli", *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, **kw)


def test_a_thread_id_is_refused_in_one_line_naming_its_process(capsys):
    """Before: /proc/TID/fd listed the process's fds and pidfd_open failed with 'Invalid argument'."""
    from kvmiso.cli import main

    started, done, tid = threading.Event(), threading.Event(), []
    t = threading.Thread(target=lambda: (tid.append(threading.get_native_id()), started.set(), done.wait(60)))
    t.start()
    try:
        assert started.wait(10) and tid[0] != os.getpid()
        with pytest.raises(ProcessError, match=rf"^pid {tid[0]}: is a thread of process {os.getpid()}; give the process id"):
            kvm_fds(tid[0])
        assert main(["trace", "--pid", str(tid[0]), "--duration", "1"]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"is a thread of process {os.getpid()}" in err, err
    finally:
        done.set()
        t.join()


def test_a_command_killed_by_a_signal_is_named_so_and_check_refuses_a_run_with_no_kvm_run(kvm):
    p = _kvmiso("trace", "--", "sh", "-c", "kill -9 $$")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 128 + signal.SIGKILL, err  # the command's status, as a shell gives it
    assert "until the process was killed by SIGKILL" in out and "0 KVM_RUN calls" in out
    p = _kvmiso("check", "--", "sh", "-c", "exit 0")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2 and out == "", err  # a check of nothing is not a pass
    assert err.strip().splitlines() == [
        f"kvmiso: pid {err.split('pid ')[1].split(':')[0]}: no KVM_RUN was traced before the process exited "
        "with status 0: nothing to check"]


def test_trace_of_a_command_passes_its_status_on(kvm):
    """Before: trace -- COMMAND returned 0 whatever the command's status; as time(1) does, it
    now returns the command's own when kvmiso itself succeeded."""
    p = _kvmiso("trace", "--", sys.executable, "-m", "kvmiso.cli", "run", "triplefault", "--timeout", "2")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 1 and "until the process exited with status 1" in out, err
    assert int(re.search(r"until the process exited with status 1: (\d+) KVM_RUN calls", out)[1]) > 0  # traced
    p = _kvmiso("trace", "--", "sh", "-c", "exit 3")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 3 and "until the process exited with status 3" in out, err


def test_sigterm_while_kvmiso_stops_its_command_still_stops_it(kvm, tmp_path):
    # at --duration kvmiso SIGTERMs the command and gives it a grace period; a SIGTERM to kvmiso
    # then must not end kvmiso before the command is gone (this one ignores SIGTERM: SIGKILL)
    got = tmp_path / "got-term"
    p = _kvmiso("trace", "--duration", "0.5", "--", "sh", "-c", f"trap 'touch {got}' TERM; while :; do sleep 0.05; done")
    try:
        for _ in range(3000):  # 10 ms each
            if got.exists():  # kvmiso is inside the grace period it gives the command
                break
            assert p.poll() is None, p.communicate()
            time.sleep(0.01)
        else:
            pytest.fail("the command never got kvmiso's SIGTERM")
        shells = [c for c in psutil.Process(p.pid).children() if c.name() == "sh"]
        p.send_signal(signal.SIGTERM)
        _, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + signal.SIGTERM and "interrupted by SIGTERM" in err
    assert shells and not [s for s in shells if s.is_running() and s.status() != psutil.STATUS_ZOMBIE]


_STUBBORN = """
import os, signal, sys, time
if os.fork() == 0:
    os.setsid()  # out of the command's process group and session
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    with open(sys.argv[1] + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(sys.argv[1] + ".tmp", sys.argv[1])
    time.sleep(600)
    os._exit(0)
time.sleep(600)
"""


def _left_behind(pidfile: Path) -> list[psutil.Process]:
    """What still runs of the stubborn command (killed here, so no test leaves it behind): every
    process with ``pidfile`` in its command line, once the grandchild has written it."""
    for _ in range(3000):  # 10 ms each
        if pidfile.exists():
            break
        time.sleep(0.01)
    left = []
    for p in psutil.process_iter(["cmdline", "status"]):
        if str(pidfile) in (p.info["cmdline"] or []) and p.info["status"] != psutil.STATUS_ZOMBIE:
            p.kill()
            left.append(p)
    return left


def _trace_leaving(pidfile: Path, *args: str) -> tuple[list[psutil.Process], int, str, str]:
    """``kvmiso trace ARGS`` of the stubborn command: what it left behind, its status and output
    (read once kvmiso has ended: a leftover holding the pipe would make the read hang)."""
    p = _kvmiso("trace", *args)
    try:
        p.wait(timeout=120)
        left = _left_behind(pidfile)
        out, err = p.communicate(timeout=60)
    finally:
        p.kill()
        p.wait()
    return left, p.returncode, out, err


def test_a_command_stopped_at_its_duration_takes_a_child_that_left_its_session_and_ignores_sigterm(tracing, tmp_path):
    """Before: only the command got SIGTERM; its child, in a session of its own, ignoring SIGTERM,
    ran on with parent 1, holding kvmiso's stdout (a caller reading it would hang)."""
    pidfile = tmp_path / "stubborn"
    left, status, out, err = _trace_leaving(pidfile, "--duration", "1", "--", sys.executable, "-c", _STUBBORN,
                                            str(pidfile))
    assert left == [] and status == 0, err
    assert "until 1 s passed" in out


def test_a_command_that_ends_leaving_a_daemon_takes_it_along_and_says_so(tracing, tmp_path):
    """Before: the shell exited, the trace ended, and what it started in the background ran on."""
    pidfile = tmp_path / "daemon"
    started = '"$1" -c "$0" "$2" & while [ ! -e "$2" ]; do sleep 0.01; done'  # then exit 0
    left, status, out, err = _trace_leaving(pidfile, "--", "sh", "-c", started, _STUBBORN, sys.executable,
                                            str(pidfile))
    assert left == [] and status == 0, err
    assert "until the process exited with status 0" in out
    assert err.startswith("kvmiso: the command ended leaving pid ") and err.endswith(" running: stopped\n"), err
    assert f"pid {pidfile.read_text()} (python" in err


def _need_a_pid_namespace() -> None:
    if subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"]).returncode != 0:
        pytest.skip("needs unshare(1) and CAP_SYS_ADMIN for a new PID namespace")


def _kvm_runs_traced(out: str) -> int:
    return int(out.split("until the process exited with status 0: ")[1].split(" KVM_RUN calls")[0])


def test_trace_of_a_command_inside_a_pid_namespace_sees_what_it_sees_outside(kvm):
    # the kernel's trace filter and records use the initial namespace's thread ids; seeded with
    # the namespace's own pid, the trace of a command there saw nothing (0 KVM_RUN calls)
    _need_a_pid_namespace()
    command = ["trace", "--", sys.executable, "-m", "kvmiso.cli", "run", "hello"]
    outside = subprocess.run([sys.executable, "-m", "kvmiso.cli", *command], capture_output=True, text=True, timeout=120)
    inside = subprocess.run(["unshare", "-p", "-f", "--mount-proc", sys.executable, "-m", "kvmiso.cli", *command],
                            capture_output=True, text=True, timeout=120)
    assert outside.returncode == 0 and inside.returncode == 0, inside.stderr
    assert _kvm_runs_traced(inside.stdout) == _kvm_runs_traced(outside.stdout) > 0


def test_trace_pid_inside_a_pid_namespace_is_refused_in_one_line(kvm):
    _need_a_pid_namespace()
    code = ("import subprocess, sys\n"
            f"c = subprocess.Popen([sys.executable, '-c', {_CHILD!r}], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)\n"
            "c.stdout.readline()\n"
            "from kvmiso.cli import main\n"
            "rc = main(['trace', '--pid', str(c.pid)])\n"
            "c.kill(); c.wait(); sys.exit(rc)\n")
    p = subprocess.run(["unshare", "-p", "-f", "--mount-proc", sys.executable, "-c", code],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--pid inside a PID namespace" in p.stderr
