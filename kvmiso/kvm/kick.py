"""The signal that kicks a vCPU's thread out of KVM_RUN (:meth:`Vcpu.kick`, and the timer of
:meth:`Vcpu.kick_after` behind every timeout): its number, its handler, and whether a thread
can receive it.

A thread that blocks the signal never leaves KVM_RUN for it: KVM ends a KVM_RUN for a pending
signal only if it is not blocked. kvmiso refuses a timeout or a kick for such a thread
(:class:`KickSignalBlocked`) rather than unblock the signal itself: a thread blocks signals on
purpose, and a kick arriving after the run (the handler has no SA_RESTART) would interrupt the
thread's other system calls. The error says the one line that makes it work.
"""

from __future__ import annotations

import os
import signal
import threading

from ._compiled import lib
from .errors import KickSignalBlocked

# A real-time signal, so it never collides with SIGINT/SIGTERM handling. Its handler (in C,
# installed by sigaction from whichever thread makes the first vCPU) interrupts KVM_RUN; for the
# kick timer it also sets immediate_exit.
KICK_SIGNAL = signal.SIGRTMIN


def install_kick_handler() -> None:
    """Install the kick signal's handler (once per process; any thread may)."""
    r = lib.kvmiso_kick_install(KICK_SIGNAL)
    if r < 0:
        raise OSError(-r, f"cannot install the vCPU kick signal's handler: {os.strerror(-r)}")
    if r:
        raise RuntimeError(f"signal {signal.Signals(KICK_SIGNAL).name} already has a handler that is not kvmiso's; "
                           "kvmiso stops vCPUs with it (KVM_RUN is interrupted by a signal)")


def check_kick_reaches(thread: threading.Thread) -> None:
    """Raise KickSignalBlocked if ``thread`` blocks the kick signal."""
    if _blocks_kick(thread):
        raise KickSignalBlocked(
            f"thread {thread.name!r} blocks {signal.Signals(KICK_SIGNAL).name}, the signal that kvmiso's timeouts "
            "and kicks stop KVM_RUN with: its KVM_RUN would never end. Unblock it in that thread first: "
            "signal.pthread_sigmask(signal.SIG_UNBLOCK, [kvmiso.kvm.KICK_SIGNAL])")


def _blocks_kick(thread: threading.Thread) -> bool:
    if thread is threading.current_thread():  # its own mask, without reading /proc (every Machine.run asks)
        return KICK_SIGNAL in signal.pthread_sigmask(signal.SIG_BLOCK, [])
    try:
        with open(f"/proc/self/task/{thread.native_id}/status") as f:
            blocked = next(int(line.split()[1], 16) for line in f if line.startswith("SigBlk:"))
    except FileNotFoundError:
        return False  # it has ended: there is no KVM_RUN to stop
    return bool(blocked >> (KICK_SIGNAL - 1) & 1)
