"""kvmiso's one interruption protocol: SIGINT and SIGTERM end work as :class:`Interrupted`, which
names the signal and carries the ``partial`` result of the call it cut short.

The policy, all of it here:

- A program that wants kvmiso's behaviour (the CLI does) wraps its work in
  :func:`signals_raise_interrupted`: in the main thread, SIGINT and SIGTERM both raise
  ``Interrupted(signal)`` wherever it is. A signal also ends a KVM_RUN in that thread (the ioctl
  returns EINTR), even a guest's endless CPL0 hypercall on kvm_pvm.
- A call that has something to keep catches ``KeyboardInterrupt`` (a plain Ctrl-C without that
  wrapper is one too) and raises ``Interrupted.of(e, partial)``: the same signal, with what the
  call would have returned, cut short. ``Machine.run`` gives a ``RunResult``, ``capture_run``
  its ``RunCapture(result, log)``, the bench loops their ``Timings``, ``bench`` its ``BenchResult``,
  ``report.build`` its ``Report``. Callers read ``e.partial``; nothing rides on ad-hoc attributes.
- A block that must not be cut in half (creating or removing a tracefs instance) runs under
  :func:`deferred`; the signals arrive once it is done.
- While kvmiso holds something outside the process (a tracefs instance) in a program with no
  SIGTERM handler of its own, :func:`sigterm_unwinds` makes SIGTERM raise :class:`Terminated`:
  an Interrupted that is also ``SystemExit(143)``, so every ``finally`` runs and the process
  still ends with the status SIGTERM asks for, without a traceback.
- Threads kvmiso starts are started under :func:`threads_without_interrupts`: the kernel gives
  a process-wide signal to any thread that does not block it, and only the main thread can act
  on one.
- A guest run in the main thread runs under :func:`kicked_by_interrupts`. Python runs a signal
  handler between bytecodes, so a signal that arrives after the last check and before the
  KVM_RUN ioctl is entered is noted and then waits inside a guest that may never exit. The C
  part of Python's handler writes the signal to a wakeup fd at once; a helper thread reading it
  kicks the vCPU (``immediate_exit`` plus the kick signal), so that KVM_RUN returns and the
  handler runs.

- A main thread that waits for something with no bound of its own (vCPU threads, a guest's
  output) waits in slices of :data:`SIGNAL_CHECK_S` (:func:`wait_seeing_signals` for an event),
  not in one untimed wait: the C part of Python's handler only notes a signal, so one that
  lands just before the wait sleeps (or that another thread takes, as the kernel may do with a
  signal sent to the process) would wake nothing. (Waiting for kicked vCPU threads to end is
  bounded, and runs under :func:`deferred`: that wait is untimed.)

The vCPU kick signal (a real-time signal that only ends a KVM_RUN) is not part of this policy.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Any, Callable, Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM ended the work. ``signal`` names it; ``partial`` is the result of the
    interrupted call as far as it got (None where there is nothing to keep).

    A KeyboardInterrupt, so code that handles Ctrl-C handles this too.

    >>> import os, threading
    >>> from kvmiso import Machine
    >>> ctrl_c = threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGINT))  # Ctrl-C, 0.2 s on
    >>> with Machine("spin", kvm=kvm) as spin:
    ...     ctrl_c.start()
    ...     try:
    ...         spin.run(timeout=600)
    ...     except Interrupted as e:
    ...         print(e.signal.name, e.partial.outcome)
    ...     finally:
    ...         ctrl_c.cancel()
    SIGINT interrupted
    """

    def __init__(self, signum: int = signal.SIGINT, partial: Any = None) -> None:
        self.signal = signal.Signals(signum)
        self.partial = partial
        super().__init__(self.signal.name)

    @property
    def status(self) -> int:
        """The exit status a shell gives a process this signal ended: 128 + the signal number."""
        return 128 + self.signal

    @classmethod
    def of(cls, e: BaseException, partial: Any = None) -> "Interrupted":
        """The same interruption as ``e`` (SIGINT for a plain KeyboardInterrupt), carrying
        ``partial`` instead of whatever ``e`` carried."""
        if isinstance(e, Terminated):
            return Terminated(partial)
        return Interrupted(e.signal if isinstance(e, Interrupted) else signal.SIGINT, partial)

    def __reduce__(self) -> tuple:
        return (type(self), (self.signal, self.partial))


class Terminated(Interrupted, SystemExit):
    """SIGTERM in a program without a SIGTERM handler of its own, while kvmiso held something
    outside the process. Also a SystemExit (status 143): uncaught, it ends the process as SIGTERM
    asked, after every cleanup, and Python prints no traceback for it."""

    def __init__(self, partial: Any = None) -> None:
        super().__init__(signal.SIGTERM, partial)
        self.code = self.status

    def __reduce__(self) -> tuple:
        return (type(self), (self.partial,))


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise_interrupted() -> Iterator[None]:
    """SIGINT and SIGTERM raise :class:`Interrupted` in the main thread for the block; the
    handlers before it are put back after. A signal the process was started with ignored stays
    ignored (a shell's background job ignores SIGINT, so the terminal's Ctrl-C is not for it),
    as Python itself does. Elsewhere than the main thread it does nothing (only the main thread
    may set handlers)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, _raise_interrupted) for s in SIGNALS
                if signal.getsignal(s) != signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)


@contextlib.contextmanager
def deferred() -> Iterator[dict[int, Any]]:
    """Hold SIGINT and SIGTERM back for the block, then deliver them to the handlers put back:
    those in place before, unless the block replaced one in the dict it is given (so a signal
    that came meanwhile goes to the handler the block chose to restore)."""
    if threading.current_thread() is not threading.main_thread():
        yield {}  # handlers run in the main thread only; nothing to defer here
        return
    pending: list[int] = []
    restore = {s: signal.signal(s, lambda signum, frame: pending.append(signum)) for s in SIGNALS}
    try:
        yield restore
    finally:
        for s, handler in restore.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        for s in pending:
            signal.raise_signal(s)


def _raise_terminated(signum: int, frame: object) -> None:
    raise Terminated()


def sigterm_unwinds() -> Callable[[dict[int, Any]], None] | None:
    """Make SIGTERM raise :class:`Terminated` if the program has no SIGTERM handler of its own
    (in the main thread). Returns the function that undoes it, to be called with the dict
    :func:`deferred` yields; None when nothing was changed."""
    if threading.current_thread() is not threading.main_thread():
        return None
    if signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None):
        return None  # the program handles SIGTERM itself (kvmiso's CLI raises Interrupted)
    old = signal.signal(signal.SIGTERM, _raise_terminated)

    def undo(restore: dict[int, Any]) -> None:
        if restore:
            restore[signal.SIGTERM] = old
        else:
            signal.signal(signal.SIGTERM, old)

    return undo


@contextlib.contextmanager
def threads_without_interrupts() -> Iterator[None]:
    """Threads started in the block inherit a signal mask that blocks SIGINT and SIGTERM, so
    the kernel delivers those to a thread that can act on them (the main thread)."""
    old = signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


#: The longest a signal waits, in a wait that no signal may be slept through, to be acted on.
SIGNAL_CHECK_S = 0.05


def wait_seeing_signals(event: threading.Event) -> None:
    """Wait for ``event``, running signal handlers within :data:`SIGNAL_CHECK_S` of a signal's
    arrival (an exception one raises ends the wait), however the signal reached the process."""
    while not event.wait(SIGNAL_CHECK_S):
        pass


class _Kicker:
    """The helper thread behind :func:`kicked_by_interrupts` and the kicks it may call."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kicks: dict[int, Callable[[], None]] = {}
        self._rfd, self.wfd = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self.wfd, False)  # the signal handler must never block on it
        with threads_without_interrupts():
            threading.Thread(target=self._loop, name="kvmiso-interrupt-kicker", daemon=True).start()

    def _loop(self) -> None:
        while True:
            for signum in os.read(self._rfd, 64):
                if signum in SIGNALS:
                    with self.lock:
                        for kick in self.kicks.values():
                            kick()


_kicker: _Kicker | None = None
_kicker_lock = threading.Lock()


def start_kicker() -> None:
    """Start the process's one kicker thread (and its pipe) now rather than at the first guest
    run; idempotent. A leak check measures after this: the thread lives as long as the process."""
    global _kicker
    with _kicker_lock:
        if _kicker is None:
            _kicker = _Kicker()


@contextlib.contextmanager
def kicked_by_interrupts(kick: Callable[[], None]) -> Iterator[None]:
    """While the block runs, SIGINT and SIGTERM also call ``kick`` (from a helper thread, as
    soon as the signal arrives), unless the program already uses Python's wakeup fd. Only in
    the main thread, where Python runs signal handlers; elsewhere it does nothing. After the
    block, ``kick`` is never called."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    start_kicker()
    kicker = _kicker
    assert kicker is not None
    try:
        previous = signal.set_wakeup_fd(kicker.wfd, warn_on_full_buffer=False)
    except ValueError:  # not the main interpreter
        yield
        return
    if previous not in (-1, kicker.wfd):  # somebody else's (asyncio): theirs stays
        signal.set_wakeup_fd(previous)
        yield
        return
    token = id(kick)
    with kicker.lock:
        kicker.kicks[token] = kick
    try:
        yield
    finally:
        with kicker.lock:  # from here on no kick can come
            del kicker.kicks[token]
        signal.set_wakeup_fd(previous)


__all__ = ["Interrupted", "SIGNALS", "Terminated", "deferred", "kicked_by_interrupts", "signals_raise_interrupted",
           "sigterm_unwinds", "start_kicker", "threads_without_interrupts", "wait_seeing_signals"]
