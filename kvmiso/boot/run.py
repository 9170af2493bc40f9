"""One `kvmiso boot`: build the initramfs, run QEMU, turn what the guest said into a status."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .errors import BootError
from .initramfs import build_initramfs, command_script, host_winsize
from .kernel import Kernel
from .qemu import GuestRun, choose_accel, qemu_binary, qemu_command, run_qemu

DEFAULT_MEMORY_MIB = 2048


@dataclass(frozen=True)
class BootResult:
    """The command's exit status, the vendor module the guest loaded, and the time from
    QEMU's start to the command's start."""

    status: int
    vendor: str | None
    up_after: float
    accel: str


def boot(argv: list[str], kernel: Kernel, *, cpu: str | None = None, accel: str = "auto",
         modules: list[str] = (), timeout: float = 300.0, memory_mib: int = DEFAULT_MEMORY_MIB,
         show_console: bool = False, log: Callable[[str], None] | None = None) -> BootResult:
    """Run ``argv`` in ``kernel`` under QEMU with the host's ``/`` (read-only, tmpfs overlay),
    in this process's working directory and environment; its output streams to this process's
    stdout and stderr. Raises :class:`BootError` when the guest cannot run the command:
    ``timeout`` bounds the time until the command starts, not the command itself."""
    if not argv:
        raise BootError("no command given: kvmiso boot [options] -- COMMAND ...")
    log = log or (lambda text: print(text, file=sys.stderr))
    qemu = qemu_binary()
    acc = choose_accel(accel, cpu)
    script = command_script(argv, os.getcwd(), dict(os.environ))
    initrd = build_initramfs(kernel, list(modules), script, host_winsize(), pipes=not sys.stdout.isatty())
    log(f"kvmiso: booting {kernel.origin} under QEMU {acc.name.upper()} (-cpu {acc.cpu}: {acc.why})")
    # the initramfs lives in a memfd that QEMU opens by /dev/fd: no file to leave behind
    memfd = os.memfd_create("kvmiso-initramfs", os.MFD_CLOEXEC)
    try:
        os.write(memfd, initrd)
        run = run_qemu(lambda ports: qemu_command(qemu, acc, kernel.image, Path(f"/dev/fd/{memfd}"), memory_mib, ports),
                       [memfd], timeout, show_console, on_up=lambda r: log(_up_text(r)))
    finally:
        os.close(memfd)
    return _result(run, acc.name)


def _up_text(run: GuestRun) -> str:
    what = f"{run.vendor} loaded" if run.vendor else "no KVM: the guest's CPU offers neither SVM nor VMX"
    return f"kvmiso: guest up after {run.up_after:.1f} s ({what}); running the command"


def _result(run: GuestRun, accel: str) -> BootResult:
    if run.status is not None:
        return BootResult(run.status, run.vendor, run.up_after or 0.0, accel)
    if not run.console_helps:
        raise BootError(run.failure)
    tail = "\n".join(f"  console| {line}" for line in run.console if line.strip())
    raise BootError(f"{run.failure}" + (f"; the console's last lines:\n{tail}" if tail else "; the console was silent"))
