"""Another process's VMs: its KVM file descriptors (``/proc/PID/fd``), its threads, and copies of
its vCPU fds in this process (``pidfd_getfd(2)``), through which kvmiso reads the real objects of
its VM exactly as it reads its own.

>>> import os
>>> with ForeignVm.attach(os.getpid()) as foreign:    # needs root; this process holds m's VM
...     [(v.id, v.fd != m.vcpu.fd) for v in foreign.vcpus]   # vCPU 0, through a copy of its fd
[(0, True)]
"""

from __future__ import annotations

import ctypes
import errno
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ...kvm._libc import libc as _libc

_NR_PIDFD_GETFD = 438  # the same on every architecture but alpha (os has pidfd_open, not pidfd_getfd)
_NR_KCMP, _KCMP_FILE = 312, 0  # x86_64 (KVM's own architecture here); os has no kcmp
_libc.syscall.restype = ctypes.c_long
_VCPU = re.compile(r"anon_inode:kvm-vcpu:(\d+)$")
VCPU_STATS_LINK = "anon_inode:kvm-vcpu-stats:"  # a vCPU's binary stats fd, then its id


class ProcessError(RuntimeError):
    """A process kvmiso cannot attach to; the message names the pid and why (one line)."""


class ProcessChanged(ProcessError):
    """The process changed what kvmiso had read of it (closed or reused an fd, or ended) before
    kvmiso could use it: a later try may succeed."""


class ProcessEnded(ProcessChanged):
    """The process is not there (any more): no such pid, or it ended meanwhile."""


@dataclass(frozen=True)
class KvmFds:
    """The KVM fds of one process: ``vms`` fd numbers of ``anon_inode:kvm-vm``, ``vcpus``
    {vCPU id: fd number} of ``anon_inode:kvm-vcpu:N``."""

    pid: int
    vms: tuple[int, ...]
    vcpus: dict[int, int]


def fd_links(pid: int, proc: Path = Path("/proc")) -> dict[int, str]:
    """What each fd of ``pid`` links to in ``/proc/PID/fd`` (an fd closed while it is read is
    left out).

    :raises ProcessError: no such process, or another user's.
    """
    fd_dir = proc / str(pid) / "fd"
    try:
        names = os.listdir(fd_dir)
    except FileNotFoundError:
        raise ProcessEnded(f"pid {pid}: no such process") from None
    except PermissionError:
        raise ProcessError(f"pid {pid}: its file descriptors are not readable (another user's process; run as root)") from None
    links = {}
    for n in names:
        try:
            links[int(n)] = os.readlink(fd_dir / n)
        except OSError:
            continue  # closed meanwhile
    return links


def kvm_fds(pid: int, proc: Path = Path("/proc")) -> KvmFds:
    """The KVM fds ``pid`` holds.

    :raises ProcessError: no such process, another user's, or no KVM fd at all.
    """
    tgid = _thread_group(pid, proc)
    if tgid is not None and tgid != pid:  # /proc/TID/fd lists the process's fds, pidfd_open says EINVAL
        raise ProcessError(f"pid {pid}: is a thread of process {tgid}; give the process id, {tgid}")
    vms, vcpus = [], {}
    for fd, target in fd_links(pid, proc).items():
        if target == "anon_inode:kvm-vm":
            vms.append(fd)
        m = _VCPU.match(target)
        if m:
            vcpus[int(m.group(1))] = fd
    if not vms and not vcpus:
        raise ProcessError(f"pid {pid}: holds no KVM file descriptor (no anon_inode:kvm-vm or kvm-vcpu)")
    return KvmFds(pid, tuple(sorted(vms)), dict(sorted(vcpus.items())))


def _thread_group(pid: int, proc: Path) -> int | None:
    """The Tgid /proc/PID/status gives ``pid`` (None where it cannot be read)."""
    try:
        status = (proc / str(pid) / "status").read_text()
    except OSError:
        return None
    return next((int(line.split()[1]) for line in status.splitlines() if line.startswith("Tgid:")), None)


def threads(pid: int, proc: Path = Path("/proc")) -> list[int]:
    """The thread ids of ``pid`` (as the kernel's init namespace numbers them, when /proc is)."""
    try:
        return sorted(int(t) for t in os.listdir(proc / str(pid) / "task"))
    except FileNotFoundError:
        raise ProcessEnded(f"pid {pid}: no such process") from None


def pidfd_open(pid: int) -> int:
    """A pidfd for ``pid`` (ProcessError, one line, where there is none)."""
    try:
        return os.pidfd_open(pid)
    except ProcessLookupError:
        raise ProcessEnded(f"pid {pid}: no such process") from None
    except OSError as e:
        raise ProcessError(f"pid {pid}: pidfd_open failed: {e.strerror}") from None


def copy_fd(pidfd: int, fd: int, link: str) -> int | None:
    """This process's copy of the process's fd ``fd`` (``pidfd_getfd(2)``), if it still is what
    ``link`` names (its /proc/PID/fd link); None if it was closed, or closed and its number
    reused, since it was listed (a copy that is not ``link`` is closed again).

    :raises OSError: pidfd_getfd refused for another reason (ESRCH: the process has ended, or is
        ending; EPERM: another user's process, or ptrace is restricted).
    """
    mine = _libc.syscall(ctypes.c_long(_NR_PIDFD_GETFD), ctypes.c_long(pidfd), ctypes.c_long(fd), ctypes.c_long(0))
    if mine < 0:
        e = ctypes.get_errno()
        if e == errno.EBADF:
            return None
        raise OSError(e, os.strerror(e))
    try:
        if os.readlink(f"/proc/self/fd/{mine}") == link:
            return mine
    except BaseException:
        os.close(mine)
        raise
    os.close(mine)
    return None


@dataclass(frozen=True)
class ForeignVcpu:
    """A vCPU of another process: its id, and this process's copy of its fd."""

    id: int
    fd: int
    their_fd: int
    page_address: int = 0  # its kvm_run page is not mapped in this process


@dataclass
class ForeignVm:
    """Copies, in this process, of another process's vCPU fds (a context manager that closes
    them). Anything that takes a :class:`kvmiso.kvm.Vm` for evidence takes this."""

    pid: int
    vcpus: list[ForeignVcpu] = field(default_factory=list)

    @classmethod
    def attach(cls, pid: int, fds: KvmFds | None = None) -> "ForeignVm":
        """Copies of ``pid``'s vCPU fds, as ``fds`` (default: :func:`kvm_fds` now) lists them
        (ProcessError, one line, where it cannot be done). Each copy is checked to be the vCPU
        listed: the process may have closed an fd after the listing, and its number be reused.
        The pidfd is opened before the listing: had the process ended and its pid gone to
        another process in between, the copies would come from that one's fds."""
        pidfd = pidfd_open(pid)
        vm = cls(pid)
        try:
            fds = kvm_fds(pid) if fds is None else fds
            if not fds.vcpus:
                raise ProcessError(f"pid {pid}: has a VM but no vCPU yet")
            for vid, fd in fds.vcpus.items():
                try:
                    mine = copy_fd(pidfd, fd, f"anon_inode:kvm-vcpu:{vid}")
                except OSError as e:
                    if e.errno == errno.ESRCH:
                        raise ProcessEnded(f"pid {pid}: ended while its vCPU fds were being copied") from None
                    hint = " (another user's process, or ptrace is restricted)" if e.errno == errno.EPERM else ""
                    raise ProcessError(f"pid {pid}: pidfd_getfd of its vCPU {vid} fd {fd} failed: "
                                       f"{e.strerror}{hint}") from None
                if mine is None:
                    raise ProcessChanged(f"pid {pid}: its fd {fd} was no longer vCPU {vid}'s when copied "
                                       "(closed, or its number reused, since it was listed)")
                vm.vcpus.append(ForeignVcpu(vid, mine, fd))
        except BaseException:
            vm.close()
            raise
        finally:
            os.close(pidfd)
        return vm

    def still_held(self) -> bool:
        """Whether the process still holds, at each fd they were copied from, the very files
        copied (kcmp(2), KCMP_FILE): False once it has closed this VM, or replaced it with
        another whose vCPU fds took the same numbers. True where kcmp cannot tell (a kernel
        without it, or not allowed to compare)."""
        for v in self.vcpus:
            r = _libc.syscall(ctypes.c_long(_NR_KCMP), ctypes.c_long(os.getpid()), ctypes.c_long(self.pid),
                              ctypes.c_long(_KCMP_FILE), ctypes.c_long(v.fd), ctypes.c_long(v.their_fd))
            if r != 0:
                return r < 0 and ctypes.get_errno() in (errno.ENOSYS, errno.EPERM)
        return True

    def close(self) -> None:
        """Close the copies (the process keeps its own fds)."""
        while self.vcpus:  # each copy off the list before its close: an interrupt never leaves one to close twice
            os.close(self.vcpus.pop().fd)

    def __enter__(self) -> "ForeignVm":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["ForeignVcpu", "ForeignVm", "KvmFds", "ProcessChanged", "ProcessEnded", "ProcessError", "VCPU_STATS_LINK", "copy_fd",
           "fd_links", "kvm_fds", "pidfd_open", "threads"]
