"""Knowing that a guest is inside KVM_RUN, from its vCPU's own KVM statistics.

The ``ready_*`` guests in tests/guests/ make one MMIO write just before the instruction that
never ends; KVM counts it in the vCPU's binary stats (``mmio_exits``). A test reads those stats
through the process's own stats fds (``anon_inode:kvm-vcpu-stats``), borrowed with
pidfd_getfd(2), so it works for a child process as well as for the test's own VMs. Once the
count shows, every later signal lands while the guest spins (or between its announcement and
the endless KVM_RUN, where the stopped RIP is the same instruction). No sleep, no guess.
"""

from __future__ import annotations

import ctypes
import os
import time
from pathlib import Path
from typing import Callable

from kvmiso.kvm.stats import Stats

GUESTS = Path(__file__).parent / "guests"
READY_SPIN = str(GUESTS / "ready_spin.S")
READY_HYPERCALL = str(GUESTS / "ready_hypercall.S")
SYS_PIDFD_GETFD = 438  # x86_64
_libc = ctypes.CDLL(None, use_errno=True)
POLLS = 12000  # 10 ms each: a bound so that a child that never gets there fails, not hangs


def _stats_fds(pid: int) -> list[int]:
    fds = []
    try:
        names = os.listdir(f"/proc/{pid}/fd")
    except FileNotFoundError:
        return fds
    for name in names:
        try:
            if os.readlink(f"/proc/{pid}/fd/{name}").startswith("anon_inode:kvm-vcpu-stats"):
                fds.append(int(name))
        except OSError:
            continue  # closed meanwhile
    return fds


def vcpu_counts(pid: int, stat: str) -> dict[str, int]:
    """``stat`` of each vCPU process ``pid`` holds a stats fd of now, by the stats id."""
    out = {}
    pidfd = os.pidfd_open(pid)
    try:
        for target in _stats_fds(pid):
            fd = _libc.syscall(SYS_PIDFD_GETFD, pidfd, target, 0)
            if fd < 0:
                continue  # closed since it was listed
            if not os.readlink(f"/proc/self/fd/{fd}").startswith("anon_inode:kvm-vcpu-stats"):
                os.close(fd)  # closed since it was listed, and its number reused: not a stats fd
                continue
            with Stats(fd) as st:
                out[st.id] = st.snapshot()[stat]
    finally:
        os.close(pidfd)
    return out


def wait_until_counted(pid: int, stat: str = "mmio_exits", vcpus: int = 1, proc=None, at_least: int = 1) -> None:
    """Return once ``vcpus`` of process ``pid``'s vCPUs count ``stat`` >= ``at_least``.

    ``proc`` (a Popen): fail at once if it ends first."""
    for _ in range(POLLS):
        try:
            if sum(1 for n in vcpu_counts(pid, stat).values() if n >= at_least) >= vcpus:
                return
        except ProcessLookupError:
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended before its guest was ready: {proc.stderr.read()}")
        time.sleep(0.01)
    raise AssertionError(f"no vCPU of process {pid} counted {stat} within {POLLS} polls")


def interrupt_when(p, sig: int, ready: Callable[[], None], timeout: float = 300) -> tuple[str, str]:
    """Send ``sig`` to child ``p`` once ``ready()`` returns, then its stdout and stderr; the
    child is killed if it does not end within ``timeout`` (a hang fails, never stalls)."""
    try:
        ready()
        p.send_signal(sig)
        return p.communicate(timeout=timeout)
    finally:
        p.kill()
        p.wait()
