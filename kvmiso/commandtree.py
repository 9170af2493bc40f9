"""Stopping processes kvmiso started: SIGTERM first, SIGKILL if they do not go, reaped either way
so no zombie is left behind.

A command kvmiso traces (``trace -- COMMAND``) is stopped with every process it started in turn
(:class:`CommandTree`). A wrapper (``sh -c 'qemu-system-x86_64 ...; echo done'``) must not leave
its VMM running, holding the caller's stdout. A process group would lose a child that calls
setsid(), and a cgroup needs a writable cgroup v2 hierarchy (this host mounts a hybrid one; root
only) and leaves a directory behind when kvmiso is killed. kvmiso instead becomes the command's
*child subreaper* (PR_SET_CHILD_SUBREAPER, Linux 3.4): a descendant whose parent exits is
reparented to kvmiso, not to init, so walking kvmiso's children down finds every process the
command started, setsid() or double fork included, as any user, leaving nothing behind.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import time

import psutil

from .kvm._libc import libc

PR_SET_CHILD_SUBREAPER, PR_GET_CHILD_SUBREAPER = 36, 37  # <linux/prctl.h>
POLL_S = 0.05  # how often a stopping tree is looked at again


def stop(proc: subprocess.Popen, grace: float) -> None:
    """SIGTERM ``proc`` if it still runs, give it ``grace`` seconds, then SIGKILL; always reaped."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _prctl(option: int, arg: int) -> int:
    value = ctypes.c_int(0)
    r = libc.prctl(option, ctypes.byref(value) if option == PR_GET_CHILD_SUBREAPER else ctypes.c_ulong(arg), 0, 0, 0)
    if r != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return value.value


class CommandTree:
    """A command kvmiso starts, and every process it starts in turn, stopped together.

    >>> tree = CommandTree()
    >>> pid = tree.start(["sh", "-c", "sleep 60 & exit 0"])   # as a VMM under a wrapper
    >>> tree.proc.wait()                                      # the shell ends at once
    0
    >>> tree.stop(grace=5.0)                                  # sleep too, though the shell has gone
    ['pid ... (sleep)']
    """

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self._me = psutil.Process()
        self._others: set[psutil.Process] = set()  # this process's children that are not the command's
        self._was_subreaper = 0

    def start(self, argv: list[str]) -> int:
        """Start ``argv`` with this process as the subreaper of its descendants; its pid.

        :raises OSError: the command cannot be started.
        """
        self._others = set(self._me.children())
        self._was_subreaper = _prctl(PR_GET_CHILD_SUBREAPER, 0)
        _prctl(PR_SET_CHILD_SUBREAPER, 1)
        try:
            self.proc = subprocess.Popen(argv)
        except BaseException:
            _prctl(PR_SET_CHILD_SUBREAPER, self._was_subreaper)
            raise
        return self.proc.pid

    def stop(self, grace: float) -> list[str]:
        """Stop every process of the tree: SIGTERM, then SIGKILL to those still there after
        ``grace`` seconds; reap them. Returns those the command left running when it had ended
        by itself (``pid N (name)``), the processes it would otherwise have left behind."""
        if self.proc is None:
            return []
        try:
            ended = self.proc.poll() is not None
            left = [f"pid {p.pid} ({_name(p)})" for p in self._members() if p.pid != self.proc.pid] if ended else []
            self._signal_until_gone(grace)
            return left
        finally:
            self._reap()
            _prctl(PR_SET_CHILD_SUBREAPER, self._was_subreaper)

    def _signal_until_gone(self, grace: float) -> None:
        """SIGTERM each process of the tree as it is found, SIGKILL all of them after ``grace``
        (and as long again, at most, for them to go: a process stuck in the kernel cannot be
        waited for without end). Gone means two looks in a row find nothing: a process being
        reparented to this one as its parent exits may be missing from one look."""
        termed: set[psutil.Process] = set()
        started, empty = time.monotonic(), 0
        while empty < 2 and time.monotonic() - started < 2 * grace:
            late = time.monotonic() - started >= grace
            alive = self._members()
            for p in alive:
                if late or p not in termed:
                    try:
                        p.send_signal(signal.SIGKILL if late else signal.SIGTERM)
                    except psutil.Error:
                        pass  # gone meanwhile
                    termed.add(p)
            empty = 0 if alive else empty + 1
            time.sleep(POLL_S)
            self._reap()

    def _members(self) -> list[psutil.Process]:
        """The tree's processes still running (not zombies): the command and the orphans
        adopted from it (this process's children that are not :attr:`_others`), and theirs."""
        found = []
        for root in self._me.children():
            if root in self._others:
                continue
            try:
                tree = [root, *root.children(recursive=True)]
            except psutil.Error:
                continue  # gone meanwhile: its children are this process's now, and found next look
            for p in tree:
                try:
                    if p.status() != psutil.STATUS_ZOMBIE:
                        found.append(p)
                except psutil.Error:
                    pass  # gone meanwhile
        return found

    def _reap(self) -> None:
        """Collect the exit status of the command and of every orphan adopted from it."""
        assert self.proc is not None
        self.proc.poll()
        for p in self._me.children():
            if p not in self._others and p.pid != self.proc.pid:
                try:
                    os.waitpid(p.pid, os.WNOHANG)
                except ChildProcessError:
                    pass  # reaped meanwhile


def _name(p: psutil.Process) -> str:
    try:
        return p.name()
    except psutil.Error:
        return "gone"


__all__ = ["CommandTree", "stop"]
