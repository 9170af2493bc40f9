"""Running QEMU for `kvmiso boot`: the accelerator this host allows, the command line, and the
loop that streams the guest's output and follows its control channel until it powers off.

QEMU runs in its own session, so a terminal's Ctrl-C reaches kvmiso alone, which then stops
QEMU itself; PR_SET_PDEATHSIG stops it too should kvmiso be killed outright.
"""

from __future__ import annotations

import collections
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..host import Host
from ..interrupt import SIGNAL_CHECK_S
from ..kvm._libc import libc
from ..commandtree import stop
from .booterror import BootError
from .initramfs import MOUNT_TAG, RECORD_TAG

QEMU = "qemu-system-x86_64"
CONSOLE, STDOUT, STDERR, CONTROL = range(4)  # ttyS0..ttyS3
NESTED_FLAG = {"kvm_amd": "svm", "kvm_intel": "vmx"}
CONSOLE_TAIL = 12  # console lines kept for an error message
STOP_GRACE = 5.0  # seconds QEMU gets to exit on SIGTERM before SIGKILL
PR_SET_PDEATHSIG = 1
# TCG's most capable CPU (it offers SVM), less 5-level paging: with la57 the guest's kernel
# runs 5-level page tables, which kvmiso's kvm_mm model does not cover (and few hosts run)
TCG_CPU = "max,la57=off"


@dataclass(frozen=True)
class Accel:
    """How QEMU runs the guest's CPU, and why that one."""

    name: str  # "tcg" or "kvm"
    cpu: str  # QEMU's -cpu model
    why: str


def choose_accel(requested: str = "auto", cpu: str | None = None) -> Accel:
    """KVM when this host's vendor module nests (kvm_amd or kvm_intel with nested=1 and the
    CPU flag), else TCG, QEMU's software emulation, whose ``max`` CPU offers SVM."""
    nests, why = host_nests(Host.read())
    if requested == "kvm" and not nests:
        raise BootError(f"--accel kvm: {why}")
    if requested == "kvm" or (requested == "auto" and nests):
        return Accel("kvm", cpu or "host", why)
    return Accel("tcg", cpu or TCG_CPU, "asked for TCG" if requested == "tcg" else why)


def host_nests(host: Host) -> tuple[bool, str]:
    """Whether KVM here can run QEMU's KVM accelerator for a guest that runs KVM itself, and why."""
    vendor = host.vendor
    if not os.path.exists("/dev/kvm"):
        return False, "this host has no /dev/kvm"
    if vendor not in NESTED_FLAG:
        return False, f"/dev/kvm here is {vendor or 'an unknown vendor module'}, which cannot run an unmodified kernel"
    nested = Path(f"/sys/module/{vendor}/parameters/nested")
    if not nested.exists() or nested.read_text().strip() not in ("1", "Y"):
        return False, f"{vendor} does not nest here (nested=0)"
    if NESTED_FLAG[vendor] not in host.cpu_flags:
        return False, f"this CPU does not offer {NESTED_FLAG[vendor]}"
    return True, f"{vendor} with nested virtualization"


def qemu_binary() -> str:
    """The path of qemu-system-x86_64, or BootError naming the Debian package that has it."""
    found = shutil.which(QEMU)
    if not found:
        raise BootError(f"{QEMU} not found: install Debian's qemu-system-x86 package")
    return found


def qemu_command(qemu: str, accel: Accel, image: Path, initrd: Path, memory_mib: int,
                 port_fds: list[int], extra: list[str] = ()) -> list[str]:
    """One CPU (TCG is heavy and the host is shared), the host's / over 9p read-only, four
    serial ports written to ``port_fds``, no display, no reboot: a panic ends QEMU. ``extra``
    (the access record's plugin and folder) goes last."""
    cmd = [qemu, "-accel", accel.name, "-cpu", accel.cpu, "-smp", "1", "-m", str(memory_mib),
           "-nodefaults", "-display", "none", "-no-reboot",
           "-kernel", str(image), "-initrd", str(initrd),
           "-append", "console=ttyS0 panic=-1",
           "-virtfs", f"local,path=/,mount_tag={MOUNT_TAG},security_model=none,readonly=on,multidevs=remap"]
    for i, fd in enumerate(port_fds):
        cmd += ["-chardev", f"file,id=port{i},path=/proc/self/fd/{fd}", "-serial", f"chardev:port{i}"]
    return cmd + list(extra)


def record_options(plugin_arg: str, record_dir: Path) -> list[str]:
    """QEMU's options for ``--record-accesses``: the plugin (``-plugin``'s value made by
    :func:`kvmiso.boot.record.plugin_argument`) and the record's folder, shared writable."""
    path = str(record_dir.resolve()).replace(",", ",,")
    return ["-plugin", plugin_arg,
            "-virtfs", f"local,path={path},mount_tag={RECORD_TAG},security_model=none,multidevs=remap"]


@dataclass
class GuestRun:
    """What the control channel said, and the console's last lines."""

    vendor: str | None = None
    up_after: float | None = None  # seconds from start to the command's start
    status: int | None = None
    failure: str | None = None
    on_up: Callable[["GuestRun"], None] | None = None
    console_helps: bool = True  # a module's own dmesg line says more than the console's end
    console: collections.deque = field(default_factory=lambda: collections.deque(maxlen=CONSOLE_TAIL))


def run_qemu(command: Callable[[list[int]], list[str]], extra_fds: list[int], timeout: float,
             show_console: bool, on_up: Callable[[GuestRun], None] | None = None) -> GuestRun:
    """Start QEMU with ``command(port_fds)``, stream the ports to this process's stdout and
    stderr, and return what the control channel said. QEMU is stopped and every pipe closed
    on every way out."""
    started = time.monotonic()
    run = GuestRun(on_up=on_up)
    proc = None
    reads: list[int] = []
    writes: list[int] = []
    try:
        for _ in range(4):
            r, w = os.pipe()
            reads.append(r)
            writes.append(w)
        proc = subprocess.Popen(command(writes), stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, pass_fds=writes + extra_fds, start_new_session=True,
                                preexec_fn=_die_with_parent)
        while writes:  # QEMU's copies alone stay open: its exit is our end of file
            os.close(writes.pop())
        _follow(reads, run, started, timeout, show_console)
        if run.failure:
            return run  # stopped below, without waiting for a guest that may never end
        proc.wait()
        if run.status is None:
            err = proc.stderr.read().decode(errors="replace").strip()
            run.failure = (f"QEMU failed (status {proc.returncode}): {err.splitlines()[-1]}" if err else
                           f"the guest stopped before the command ended (QEMU status {proc.returncode})")
        return run
    finally:
        if proc is not None:
            _stop(proc)
        for fd in reads + writes:
            os.close(fd)


def _follow(reads: list[int], run: GuestRun, started: float,
            timeout: float, show_console: bool) -> None:
    sel = selectors.DefaultSelector()
    partial = {CONSOLE: b"", CONTROL: b""}
    try:
        for port, r in enumerate(reads):
            sel.register(r, selectors.EVENT_READ, port)
        while sel.get_map():
            if run.up_after is None and time.monotonic() - started >= timeout:
                run.failure = f"the guest did not come up within {timeout:g} s"
                return
            # never an untimed select(): a Ctrl-C that lands just before it sleeps would wait
            # for QEMU's next output (Python's C handler only notes the signal)
            for key, _ in sel.select(SIGNAL_CHECK_S):
                data = os.read(key.fd, 65536)
                if not data:
                    sel.unregister(key.fd)
                    continue
                _take(key.data, data, run, partial, started, show_console)
            if run.failure:
                return
    finally:
        sel.close()
        if partial[CONSOLE]:
            run.console.append(partial[CONSOLE].decode(errors="replace"))


def _take(port: int, data: bytes, run: GuestRun, partial: dict[int, bytes], started: float,
          show_console: bool) -> None:
    """``data`` read from the guest's ``port``: the command's own output passed on, the console
    and the control channel cut into lines (``partial`` keeps what no newline ended yet)."""
    if port == STDOUT:
        _write(sys.stdout, data)
        return
    if port == STDERR:
        _write(sys.stderr, data)
        return
    if port == CONSOLE and show_console:
        _write(sys.stderr, data)
    lines = (partial[port] + data).split(b"\n")
    partial[port] = lines.pop()
    for line in lines:
        text = line.decode(errors="replace").rstrip("\r")
        if port == CONSOLE:
            run.console.append(text)
        else:
            _control(run, text, started)


def _control(run: GuestRun, line: str, started: float) -> None:
    word, _, rest = line.partition(" ")
    if word == "up":
        run.up_after = time.monotonic() - started
        if run.on_up:
            run.on_up(run)
    elif word == "vendor":
        run.vendor = None if rest == "none" else rest
    elif word == "exit":
        run.status = int(rest)
    elif word == "module":
        name, _, said = rest.partition(" ")
        run.failure = f"module {name} did not load: {said.strip() or 'no message'}"
        run.console_helps = False
    elif word == "failed":
        run.failure = f"the guest's init could not {rest}"


def _write(stream, data: bytes) -> None:
    stream.buffer.write(data)
    stream.buffer.flush()


def _die_with_parent() -> None:
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _stop(proc: subprocess.Popen) -> None:
    stop(proc, STOP_GRACE)
    proc.stderr.close()
