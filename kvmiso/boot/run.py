"""One `kvmiso boot`: build the initramfs, run QEMU, turn what the guest said into a status."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..observe.accesses.accessrecord import RecordError, read_record
from .booterror import BootError
from .initramfs import build_initramfs, command_script, host_winsize
from .kernel import Kernel
from .qemu import TCG_CPU, Accel, GuestRun, choose_accel, qemu_binary, qemu_command, record_options, run_qemu
from .record import build_plugin, check_qemu, clear_record, plugin_argument

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
         show_console: bool = False, log: Callable[[str], None] | None = None,
         record_dir: Path | None = None) -> BootResult:
    """Run ``argv`` in ``kernel`` under QEMU with the host's ``/`` (read-only, tmpfs overlay),
    in this process's working directory and environment; its output streams to this process's
    stdout and stderr. Raises :class:`BootError` when the guest cannot run the command:
    ``timeout`` bounds the time until the command starts, not the command itself.

    ``record_dir`` (an existing folder) turns on the access record: the TCG plugin writes one
    ``vcpuN.rec`` per vCPU there, and the guest its ``kallsyms`` and ``modules`` when the
    command has ended (see :mod:`kvmiso.observe.accesses.accessrecord`). It needs TCG and a QEMU the
    plugin supports; the folder's earlier record is removed first."""
    if not argv:
        raise BootError("no command given: kvmiso boot [options] -- COMMAND ...")
    log = log or (lambda text: print(text, file=sys.stderr))
    qemu = qemu_binary()
    acc = choose_accel(accel, cpu)
    if record_dir is not None and accel == "auto" and acc.name != "tcg":  # the record is TCG's
        acc = Accel("tcg", cpu or TCG_CPU, "--record-accesses records what TCG emulates")
    extra = _record_setup(qemu, acc.name, record_dir) if record_dir is not None else []
    script = command_script(argv, os.getcwd(), dict(os.environ))
    initrd = build_initramfs(kernel, list(modules), script, host_winsize(), pipes=not sys.stdout.isatty(),
                             record_dir=str(record_dir.resolve()) if record_dir is not None else None)
    log(f"kvmiso: booting {kernel.origin} under QEMU {acc.name.upper()} (-cpu {acc.cpu}: {acc.why})")
    # the initramfs lives in a memfd that QEMU opens by /proc/self/fd (a minimal root, such as
    # the lane's, has no /dev/fd): no file to leave behind
    memfd = os.memfd_create("kvmiso-initramfs", os.MFD_CLOEXEC)
    try:
        os.write(memfd, initrd)
        initrd_path = Path(f"/proc/self/fd/{memfd}")
        run = run_qemu(lambda ports: qemu_command(qemu, acc, kernel.image, initrd_path, memory_mib, ports, extra),
                       [memfd], timeout, show_console, on_up=lambda r: log(_up_text(r)))
    finally:
        os.close(memfd)
    if record_dir is not None and run.status is not None:
        log(record_text(record_dir))
    return _result(run, acc.name)


def _record_setup(qemu: str, accel: str, record_dir: Path) -> list[str]:
    if accel != "tcg":
        raise BootError("--record-accesses needs QEMU's TCG (the plugin sees what TCG emulates), not --accel kvm")
    check_qemu(qemu)
    plugin = build_plugin()
    clear_record(record_dir)
    return record_options(plugin_argument(plugin, record_dir), record_dir)


def record_text(record_dir: Path) -> str:
    """One line on what a boot recorded: windows, vCPUs, accesses, bytes, and whether the
    guest's kallsyms (which symbolize it) are there."""
    try:
        rec = read_record(record_dir)
    except (RecordError, OSError) as e:
        return f"kvmiso: no access record: {e}"
    size = sum(f.stat().st_size for f in record_dir.glob("vcpu*.rec"))
    n = sum(len(w.accesses) for w in rec.windows)
    paused = rec.paused()
    cut = sum(1 for w in rec.windows if w.dropped) - len(paused)
    return (f"kvmiso: access record in {record_dir}: {len(rec.windows)} windows on {len(rec.vcpus())} vCPU(s), "
            f"{n:,} accesses, {size / 1e6:.1f} MB" + (f", {cut} windows cut at {rec.cap:,} accesses" if cut else "")
            + (f", {len(paused)} windows while paused (accesses counted only)" if paused else "")
            + ("; the guest's kallsyms beside it" if rec.symbols else "; no kallsyms from the guest: it cannot be symbolized"))


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
