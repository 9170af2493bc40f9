"""Watching another process's KVM vCPUs: its threads' kvm events and call chains, cut into
KVM_RUNs by the kernel's own markers (``kvm_userspace_exit`` ends every KVM_RUN; ``kvm_exit``
opens each hardware exit where it fires), one exit log for all its vCPUs, kept apart by thread.

The trace follows the process's threads, and the threads and children they create
(``options/event-fork``), from the moment kvmiso attaches or starts the command. The buffers are
drained while it runs. Events that fire once per emulated instruction (``kvm_emulate_insn`` and
the ``kvmmmu`` page-walk events) are left out by default: a firmware or an OS booting under
kvm_pvm emulates millions of instructions, which no trace buffer holds; name them with
``events`` to have them.
"""

from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ...host import Host
from ...interrupt import Interrupted
from ...kvm.exits import DATALESS, Exit, IoExit, MmioExit, ObservedExit
from ..kernel.bpf import BpfUnavailable
from ..kernel.bpfprog import VERIFY_EVERY
from . import TRACERS
from .bpfwatch import BpfTracer
from .exitlog import ExitLog, RunRecord, TraceEvent
from ..foreign.vms import ProcessError, pidfd_open, threads
from .tracefs import TraceInstance, TracefsUnavailable
from .tracefsmount import pid_namespace

DEFAULT_EXCLUDED = ("kvm_emulate_insn",)  # and the kvmmmu system: once per emulated instruction
BUFFER_KB = 16384
DRAIN_S = 0.1
# kvm_mmio's type field (its format's symbol table: KVM_TRACE_MMIO_* in include/trace/events/kvm.h)
MMIO_UNSATISFIED_READ, MMIO_WRITE = 0, 2


@dataclass
class Attached:
    """What watching a process gave: the log, how it ended, and the events it could not place."""

    log: ExitLog
    ended: str  # what ``until`` said ("2 s passed"), how the process exited, or "interrupted"
    # the status a shell gives the process (its exit code, or 128 + the signal that killed it)
    # when it ended by itself and was kvmiso's child; None otherwise
    status: int | None = None
    threads: list[int] = field(default_factory=list)
    unplaced: int = 0  # events of a thread after its last KVM_RUN ended
    # when each VM the process created while watched was created (CLOCK_MONOTONIC ns); None
    # where the trace cannot tell (see :func:`vm_creations`)
    vm_created: list[int] | None = None
    tracer: str = "bpf"  # what recorded the events: "bpf" or "tracefs" (kvmiso.observe.tracing.bpfwatch)
    tracer_note: str = ""  # why BPF was asked for and tracefs ran, in one line


def default_events(root_events: Iterable[str]) -> list[str]:
    """Every ``kvm`` event but the per-instruction ones (see the module docstring)."""
    return [e for e in root_events if e.rpartition(":")[2] not in DEFAULT_EXCLUDED]


def kvm_tracer(kind: str, events: list[str], pids: list[int], buffer_kb: int,
               every_chain: bool = False) -> tuple[BpfTracer | TraceInstance, str]:
    """An opened tracer of ``events`` with call chains for ``pids`` and the threads and children
    they create: a :class:`BpfTracer` for ``bpf`` where this host lets kvmiso load and attach its
    programs (walking every event's chain with ``every_chain``, else only where its path is new
    or verified), else (and for ``tracefs``) a :class:`.tracefs.TraceInstance` of ``buffer_kb``
    per CPU. The second item says in one line why ``bpf`` was asked for and tracefs runs ('' else).

    >>> import threading
    >>> tracer, note = kvm_tracer("bpf", ["kvm:kvm_pio"], [threading.get_native_id()], 4096)    # needs root
    >>> type(tracer).__name__, note
    ('BpfTracer', '')
    >>> tracer.close()
    """
    if kind not in TRACERS:
        raise ValueError(f"tracer {kind!r}: bpf or tracefs")
    note = ""
    if kind == "bpf":
        bpf = BpfTracer(events, pids=pids, follow_forks=True, walk_every_chain=every_chain)
        try:
            bpf.open()
            return bpf, ""
        except BpfUnavailable as e:
            note = f"BPF unavailable ({e}): tracing through tracefs, which costs each event more"
    tracer = TraceInstance(events, pids=pids, buffer_kb=buffer_kb, stacks=True, follow_forks=True)
    tracer.open()
    return tracer, note


def watch(target: int | Callable[[], int], until: Callable[[int], str | None],
          events: Iterable[str] | None = None, tracer: str = "bpf", every_chain: bool = False) -> Attached:
    """Trace a process until ``until(pid)`` returns why to stop (polled every 0.1 s) or the
    process exits. ``target``: a pid to attach to, or a function that starts the process and
    returns its pid (called once tracing runs, so the command is traced from its first event).
    ``events``: names for :class:`TraceInstance` (default: kvm events but ``kvm_emulate_insn``).
    ``tracer``: ``bpf`` (compact records, call chains kept once in the kernel and walked only
    where an exit's path is new or verified, every time with ``every_chain``; tracefs where the
    host refuses BPF, said in ``tracer_note``) or ``tracefs`` (see :mod:`.bpfwatch`).
    A KeyboardInterrupt stops the watch and is re-raised with ``.partial`` (the
    :class:`Attached` so far, ended ``interrupted``)."""
    in_namespace = pid_namespace() is not None
    if isinstance(target, int) and in_namespace:
        raise ProcessError(f"pid {target}: --pid inside a PID namespace: the kernel's trace filter takes the "
                           "initial namespace's ids, which this namespace does not show (use -- COMMAND, or "
                           "run kvmiso outside the namespace)")
    # a command is followed from this thread, which forks it (event-fork adds the child)
    seed = [target, *threads(target)] if isinstance(target, int) else [threading.get_native_id()]
    if events is None:
        events = default_events(_kvm_events())
    tracer, note = kvm_tracer(tracer, list(events), seed, BUFFER_KB, every_chain)
    pages = _Pages(tracer)
    with contextlib.closing(tracer):
        own = tracer.kernel_tid()  # as trace records name this thread (read back in a namespace)
        if in_namespace and not isinstance(target, int):
            tracer.set_pids([own])
        if isinstance(target, int):  # threads it started between the listing and the filter
            tracer.add_pids(threads(target))
        lost_before = tracer.lost
        tracer.start()
        pid = target if isinstance(target, int) else target()
        try:
            ended, status = _follow(pid, until, pages.drain)
        except KeyboardInterrupt as e:
            partial = _records(pid, pages.final(), tracer, lost_before, "interrupted", own, None, note)
            raise Interrupted.of(e, partial) from None
        return _records(pid, pages.final(), tracer, lost_before, ended, own, status, note)


class _Pages:
    """The trace's raw pages, drained while the watch runs and decoded once at its end: decoding
    a boot's flood of records takes seconds, during which the buffer would fill and ``until``
    not run."""

    def __init__(self, tracer: TraceInstance | BpfTracer) -> None:
        self.tracer = tracer
        self.pages: dict[int, list[bytes]] = defaultdict(list)

    def drain(self) -> None:
        """Move what the buffer holds here (cheap: no decoding)."""
        for cpu, data in self.tracer.read_raw().items():
            self.pages[cpu].append(data)

    def final(self) -> list[TraceEvent]:
        """Stop tracing, drain the rest, and decode every page."""
        self.tracer.stop()
        self.drain()
        return self.tracer.decode({cpu: b"".join(p) for cpu, p in self.pages.items()})


def _follow(pid: int, until: Callable[[int], str | None], drain: Callable[[], None]) -> tuple[str, int | None]:
    """Drain the trace every DRAIN_S until the process exits or ``until(pid)`` says why to stop:
    how the watch ended, and the process's status (:func:`_exit_status`)."""
    pidfd = pidfd_open(pid)
    try:
        while True:
            r, _, _ = select.select([pidfd], [], [], DRAIN_S)
            drain()
            if r:
                return _exit_status(pid)
            ended = until(pid)
            if ended:
                return ended, None
    finally:
        os.close(pidfd)


def _records(pid: int, events: list[TraceEvent], tracer: TraceInstance | BpfTracer, lost_before: int, ended: str,
             own: int, status: int | None, note: str = "") -> Attached:
    """One record per KVM_RUN of every thread but kvmiso's own (``own``), in time order."""
    by_thread: dict[int, list[TraceEvent]] = defaultdict(list)
    for e in events:
        if e.pid != own:  # kvmiso itself, when it started the command
            by_thread[e.pid].append(e)
    records: list[RunRecord] = []
    unplaced = 0
    for tid, evs in by_thread.items():
        start, pending = evs[0].ts_ns, []
        for e in evs:
            pending.append(e)
            if e.name == "kvm_userspace_exit" and e.fields.get("errno", 0) == 0:
                records.append(RunRecord(run=0, vcpu=tid, start_ns=start, end_ns=e.ts_ns,
                                         exit=exit_of_events(e.fields["reason"], pending),
                                         payload=f"pid {pid} thread {tid}", events=pending))
                start, pending = e.ts_ns, []
        unplaced += len(pending)
    records.sort(key=lambda r: r.end_ns)
    for i, r in enumerate(records):
        r.run = i
    kind = "bpf" if isinstance(tracer, BpfTracer) else "tracefs"
    host = {**Host.read().exitlog_host(pid), "tracer": kind}
    if isinstance(tracer, BpfTracer):
        host |= {"chains_inferred": tracer.inferred, "chain_mismatches": tracer.chain_mismatches,
                 "chains_verify_every": VERIFY_EVERY}
    log = ExitLog(records=records, host=host,
                  tracing=True, events_enabled=list(tracer.enabled), untraced=untraced_events(tracer.enabled),
                  lost_events=tracer.lost - lost_before,
                  tracing_reason=tracer.describe(), incomplete="interrupted" if ended == "interrupted" else "")
    created = vm_creations(events) if f"kvm:{VM_CREATED[0]}" in tracer.enabled else None
    return Attached(log, ended, status, sorted(by_thread), unplaced, created, kind, note)


# x86's kvm_arch_init_vm calls pvclock_update_vm_gtod_copy, which fires kvm_update_master_clock:
# once per KVM_CREATE_VM, in the creating thread (arch/x86/kvm/x86.c; seen on this host's kvm_pvm,
# 6.18.44-fc-v1300). A kernel where it does not gives no creation, and the VMs are not told apart.
VM_CREATED = ("kvm_update_master_clock", "kvm_arch_init_vm")


def vm_creations(events: list[TraceEvent]) -> list[int] | None:
    """When each VM was created, in order (CLOCK_MONOTONIC ns): the ``kvm_update_master_clock``
    events whose call chain passes through ``kvm_arch_init_vm`` (no kvm event names the VM
    created). None where the chains cannot be named (kallsyms hidden)."""
    from ..kernel.kallsyms import read_kallsyms

    symbols = read_kallsyms()
    if symbols is None:
        return None
    event, caller = VM_CREATED

    def from_caller(e: TraceEvent) -> bool:
        return any((hit := symbols.resolve(a)) is not None and hit[0] == caller for a in e.stack)

    return sorted(e.ts_ns for e in events if e.name == event and from_caller(e))


def untraced_events(enabled: Iterable[str]) -> dict[str, int | None]:
    """The per-instruction events a watch left out (uncounted here: None), by name."""
    enabled = set(enabled)
    left_out = {f"kvm:{e}" for e in DEFAULT_EXCLUDED} - enabled
    if not any(e.startswith("kvmmmu:") for e in enabled):
        left_out.add("kvmmmu:*")
    return dict.fromkeys(sorted(left_out))


def _kvm_events() -> list[str]:
    from .tracefsmount import TRACEFS, tracefs_root

    try:
        root = tracefs_root(TRACEFS)
    except (TracefsUnavailable, OSError):  # not root: the instance says why, in one line
        return ["kvm"]
    d = root / "events" / "kvm"
    return sorted(f"kvm:{e}" for e in os.listdir(d) if (d / e / "format").exists()) if d.is_dir() else ["kvm"]


def exit_of_events(reason: int, events: list[TraceEvent]) -> Exit:
    """The exit another process's KVM_RUN returned, as far as its trace events tell: port I/O
    from its last ``kvm_pio`` (an OUT's data is the first element, the tracepoint's ``val``),
    MMIO from its last unsatisfied read or write ``kvm_mmio``, exits without data as they are;
    any other by its reason alone (:class:`ObservedExit`)."""
    last = {e.name: e for e in events}
    pio, mmio = last.get("kvm_pio"), last.get("kvm_mmio")
    if reason == IoExit.reason and pio is not None:
        f = pio.fields
        out = f["rw"] == 1
        data = f["val"].to_bytes(4, "little")[: f["size"]] if out else b""
        return IoExit(f["port"], f["size"], f["count"], not out, memoryview(data))
    if reason == MmioExit.reason and mmio is not None and mmio.fields["type"] in (MMIO_UNSATISFIED_READ, MMIO_WRITE):
        f = mmio.fields
        write = f["type"] == MMIO_WRITE
        data = f["val"].to_bytes(8, "little")[: f["len"]] if write else b""
        return MmioExit(f["gpa"], f["len"], write, memoryview(data))
    return DATALESS.get(reason) or ObservedExit(reason)


def _exit_status(pid: int) -> tuple[str, int | None]:
    """Why the watched process is gone, and the status a shell would give it (where it is our
    child: its exit code, or 128 + the signal that killed it)."""
    try:
        _, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        return "the process exited", None
    code = os.waitstatus_to_exitcode(status)
    if code < 0:
        return f"the process was killed by {signal.Signals(-code).name}", 128 - code
    return f"the process exited with status {code}", code


__all__ = ["Attached", "DEFAULT_EXCLUDED", "VM_CREATED", "default_events", "untraced_events", "vm_creations", "watch"]
