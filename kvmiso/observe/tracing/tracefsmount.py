"""Where tracefs is (mounted if need be), which PID namespace kvmiso runs in, and the
``kvmiso-<pid>`` instances a killed kvmiso left behind: what :class:`.tracefs.TraceInstance`
needs before it makes its own instance."""

from __future__ import annotations

import ctypes
import os
import re
from pathlib import Path

from ...kvm._libc import libc

TRACEFS = Path("/sys/kernel/tracing")
PREFIX = "kvmiso-"


class TracefsUnavailable(RuntimeError):
    """tracefs cannot be used here; the message says why and what would make it work."""


def _mount(root: Path) -> None:
    """Mount tracefs at ``root`` (mount(2) through libc: kvmiso runs no external commands)."""
    if libc.mount(b"nodev", str(root).encode(), b"tracefs", 0, None) != 0:
        err = ctypes.get_errno()
        raise TracefsUnavailable(f"tracefs is not mounted at {root} and mounting it failed: {os.strerror(err)}")


def tracefs_root(root: Path = TRACEFS, mount: bool = True) -> Path:
    """The tracefs mount point, mounting it when it is missing and we are root."""
    if (root / "instances").is_dir():
        return root
    legacy = Path("/sys/kernel/debug/tracing")  # where older systems mount it, under debugfs
    if root == TRACEFS and (legacy / "instances").is_dir():
        return legacy
    if os.geteuid() != 0:
        raise TracefsUnavailable(f"tracefs is not mounted at {root} and only root can mount it "
                                 f"(as root: mount -t tracefs nodev {root})")
    if not mount:
        raise TracefsUnavailable(f"tracefs is not mounted at {root}")
    if not root.is_dir():
        raise TracefsUnavailable(f"{root} does not exist: this kernel has no tracefs (CONFIG_TRACING)")
    _mount(root)
    if not (root / "instances").is_dir():
        raise TracefsUnavailable(f"mounted tracefs at {root} but it has no instances/ directory")
    return root


def remove_stale(root: Path) -> list[str]:
    """Remove ``kvmiso-<pid>`` instances whose process is gone; return what was removed.

    An instance whose pid is alive is left alone, and so is one the kernel says is busy
    (EBUSY: somebody holds its files open). From inside another PID namespace nothing is
    removed: its pids are not the ones in the names."""
    removed: list[str] = []
    if pid_namespace() is not None:
        return removed
    try:
        names = os.listdir(root / "instances")
    except OSError:
        return removed
    for name in names:
        m = re.fullmatch(rf"{PREFIX}(\d+)(?:-\d+)?", name)
        if not m or _pid_alive(int(m.group(1))):
            continue
        try:
            os.rmdir(root / "instances" / name)
            removed.append(name)
        except OSError:
            pass  # busy or already gone: not ours to force
    return removed


INIT_PID_NS = "pid:[4026531836]"  # PROC_PID_INIT_INO: the initial PID namespace's inode


def pid_namespace() -> str | None:
    """The inode of this process's PID namespace when it is not the initial one, else None.

    Trace records carry the kernel's own thread ids (task->pid, the initial namespace's), and
    set_event_pid takes those; inside another PID namespace getpid() and gettid() differ."""
    try:
        ns = os.readlink("/proc/self/ns/pid")
    except OSError:
        return None
    return None if ns == INIT_PID_NS else ns.removeprefix("pid:[").rstrip("]")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
