"""Exceptions of the ioctl layer: each carries the fact that explains it."""

from __future__ import annotations

import errno as _errno


class KvmError(OSError):
    """An ioctl on a KVM file descriptor failed.

    ``str()`` names the ioctl, the errno and what that errno means for it, e.g.
    ``KVM_SET_USER_MEMORY_REGION failed: EEXIST (File exists): slot 1 overlaps slot 0``.
    """

    def __init__(self, ioctl: str, err: int, detail: str = "") -> None:
        super().__init__(err, detail or _errno_text(err))
        self.ioctl = ioctl
        self.detail = detail

    @property
    def errno_name(self) -> str:
        """The errno's symbolic name, e.g. ``EEXIST``."""
        return _errno.errorcode.get(self.errno, str(self.errno))

    def __str__(self) -> str:
        text = f"{self.ioctl} failed: {self.errno_name} ({_errno_text(self.errno)})"
        return f"{text}: {self.detail}" if self.detail else text


class KvmUnavailable(RuntimeError):
    """/dev/kvm is missing, not accessible, or speaks another API version."""


class VmDead(KvmError):
    """KVM refuses every ioctl of the VM with EIO, its own KVM_CHECK_EXTENSION included (the
    test kvm_util makes): KVM killed it (a KVM_BUG_ON, or a guest error it cannot recover
    from), or this process is not the one that created it (a fork's child). ``detail`` says
    which."""


class KickSignalBlocked(RuntimeError):
    """A timeout or a kick was asked for a thread that blocks the vCPU kick signal, which is
    then never delivered: its KVM_RUN would not end."""


class VcpuBusy(RuntimeError):
    """A thread asked to run a vCPU that another thread is running (or holds for a run)."""


class VcpuClosed(ValueError):
    """An exit's data or reply was used after its vCPU was closed: the kvm_run page it viewed is
    unmapped, and its address may be another vCPU's page by now (a ValueError, as the use of a
    closed file is)."""


def _errno_text(err: int) -> str:
    import os

    return os.strerror(err) if err else "unknown error"
