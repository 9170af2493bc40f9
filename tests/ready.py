"""Knowing that a guest is inside KVM_RUN, from its vCPU's own KVM statistics.

The ``ready_*`` guests in tests/guests/ make one MMIO write just before the instruction that
never ends; KVM counts it in the vCPU's binary stats (``mmio_exits``). A test reads those stats
through the process's own stats fds (``anon_inode:kvm-vcpu-stats``), borrowed with
pidfd_getfd(2), so it works for a child process as well as for the test's own VMs. Once the
count shows, every later signal lands while the guest spins (or between its announcement and
the endless KVM_RUN, where the stopped RIP is the same instruction). No sleep, no guess.
"""

from __future__ import annotations

import errno
import os
import time
from pathlib import Path
from typing import Callable

from kvmiso.kvm.stats import Stats
from kvmiso.observe.foreign.vms import VCPU_STATS_LINK, ProcessEnded, copy_fd, fd_links

GUESTS = Path(__file__).parent / "guests"
READY_SPIN = str(GUESTS / "ready_spin.S")
READY_HYPERCALL = str(GUESTS / "ready_hypercall.S")
POLLS = 12000  # 10 ms each: a bound so that a child that never gets there fails, not hangs


def vcpu_counts(pid: int, stat: str) -> dict[str, int]:
    """``stat`` of each vCPU process ``pid`` holds a stats fd of now, by the stats id."""
    out = {}
    pidfd = os.pidfd_open(pid)
    try:
        for target, link in fd_links(pid).items():
            if not link.startswith(VCPU_STATS_LINK):
                continue
            fd = copy_fd(pidfd, target, link)
            if fd is None:
                continue  # closed since it was listed
            with Stats(fd) as st:
                out[st.id] = st.snapshot()[stat]
    except ProcessEnded as e:  # ended meanwhile
        raise ProcessLookupError(errno.ESRCH, str(e)) from None
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
