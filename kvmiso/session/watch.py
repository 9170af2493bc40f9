"""Watching another process's VMs: its exit log, each VM's evidence read through copies of its
vCPU fds while it lives, and which records belong to which VM."""

from __future__ import annotations

import bisect
import time
from dataclasses import dataclass, field

from ..host import Host, vendor_module
from ..interrupt import Interrupted, deferred
from ..observe.kernel.evidence import Evidence, collect_evidence, vcpu_counters
from ..observe.tracing.exitlog import ExitLog, RunRecord
from ..observe.tracing.attach import Attached, watch
from ..observe.foreign.vms import ForeignVm, ProcessChanged, ProcessError, kvm_fds
from ..commandtree import CommandTree

EVIDENCE_EVERY_S = 0.1  # a watched VM is read this often until every vCPU's thread is known,
EVIDENCE_SETTLED_S = 1.0  # then this often, while it lives
STOP_GRACE_S = 5.0  # a command stopped at --duration gets SIGTERM, then SIGKILL after this


@dataclass
class WatchedVm:
    """One VM of a watched process: when it was created (CLOCK_MONOTONIC ns; None: before the
    watch began), its evidence (:func:`unread_evidence`, all modeled, where it lived between two
    of kvmiso's looks), and the records of its KVM_RUNs."""

    created_ns: int | None
    evidence: Evidence | None = None
    records: list[RunRecord] = field(default_factory=list)
    # its records include those of other VMs that kvmiso could not tell apart (held at once, or
    # their creation not traced), checked against this VM's objects
    mixed: bool = False


@dataclass
class WatchedProcess:
    """Another process watched for a while: its exit log (records' ``vcpu`` is the vCPU id where
    the evidence names the thread, else the thread id), the evidence of its (last) VM, and how it
    ended. ``vms``: each VM it had, with its own evidence and records, in the order they were
    created; one ``mixed`` VM with every record where they cannot be told apart."""

    pid: int
    attached: Attached
    evidence: Evidence
    left_running: list[str] = field(default_factory=list)  # what a command that ended left, then stopped
    vms: list[WatchedVm] = field(default_factory=list)

    @property
    def log(self) -> ExitLog:
        """The exit log of the watched process."""
        return self.attached.log


class EmulationCount:
    """The instructions KVM emulated for another process's vCPUs while kvmiso watched, from each
    vCPU's insn_emulation stat (vcpu->stat, read through BPF behind the copies of its fds): per
    vCPU, the last value read less the first. What ran before kvmiso first read a vCPU, or after
    its last read, is not counted."""

    EVENT = "kvm:kvm_emulate_insn"  # the per-instruction event a watch leaves out

    def __init__(self) -> None:
        self.first: dict[tuple[int, int], int] = {}  # (the copy's identity, vCPU id) -> value
        self.last: dict[tuple[int, int], int] = {}

    def read(self, vm: ForeignVm) -> None:
        """Read every vCPU's counter now (through BPF; nothing where it cannot be read)."""
        for vid, n in vcpu_counters(vm, "insn_emulation").items():
            self.first.setdefault((id(vm), vid), n)
            self.last[(id(vm), vid)] = n

    def charge(self, log: ExitLog) -> None:
        """Put the count in ``log`` as the untraced kvm_emulate_insn events, where the watch
        left them out and some vCPU was read; traced ones are not counted twice."""
        if self.EVENT in log.untraced and self.last:
            log.untraced[self.EVENT] = sum(self.last[k] - self.first[k] for k in self.last)


@dataclass
class VmFollower:
    """What the watch of a process follows between two looks (every 0.1 s): the VM whose vCPU
    fds kvmiso holds copies of, when it attached to it (``since``), its best reading so far and
    when it was read, the readings of the VMs it followed before, the most VMs the process
    held at one look, and the instructions KVM emulated for them (``emulated``)."""

    duration: float | None = None
    t0: float | None = None
    most: int = 0
    vm: ForeignVm | None = None
    since: int | None = None  # CLOCK_MONOTONIC ns when kvmiso attached to ``vm``
    evidence: Evidence | None = None
    read_at: float = 0.0
    readings: list[tuple[int, Evidence | None]] = field(default_factory=list)  # (since, evidence) of each VM
    emulated: EmulationCount = field(default_factory=EmulationCount)

    def complete(self) -> bool:
        """Whether the reading names a thread for each vCPU of the VM."""
        return self.evidence is not None and self.vm is not None and len(self.evidence.threads) >= len(self.vm.vcpus)

    def read(self, now: float) -> None:
        """Read the VM's evidence; kept unless it knows fewer vCPU threads or objects than the
        reading before (a vCPU thread's task, stack and mm are gone as the process exits)."""
        self.emulated.read(self.vm)
        reading, self.read_at = collect_evidence(self.vm, vendor_module() or ""), now
        if self.evidence is None or _completeness(reading) >= _completeness(self.evidence):
            self.evidence = reading

    def keep(self) -> None:
        """The VM followed so far, with what was read of it, before the next is followed."""
        self.readings.append((self.since, self.evidence))
        self.since, self.evidence, self.read_at = None, None, 0.0

    def follow(self, vm: ForeignVm, replaced: bool) -> None:
        """Follow ``vm`` from now on (the same VM with more vCPUs, or, ``replaced``, another)."""
        if replaced:  # the last VM's evidence is kept apart, this one's read anew
            self.keep()
        if self.vm is not None:
            self.emulated.read(self.vm)
            self.vm.close()
        self.emulated.read(vm)
        self.vm = vm
        self.since = self.since if self.since is not None else time.monotonic_ns()

    def until(self, pid: int) -> str | None:
        """Every 0.1 s: take copies of the process's vCPU fds as they appear (the VM outlives
        the process through them), and read the VM's evidence while the process lives: every
        0.1 s until it names a thread for each vCPU, then every second. Why to stop, or None."""
        now = time.monotonic()
        self.t0 = self.t0 if self.t0 is not None else now
        try:
            fds = kvm_fds(pid)
            seen, self.most = len(fds.vcpus), max(self.most, len(fds.vms))
        except ProcessError:
            seen = 0  # gone, or exec'ing
        # another VM in the same fd numbers (a test program creating VM after VM): kcmp tells
        replaced = seen > 0 and self.vm is not None and not self.vm.still_held()
        if seen > (len(self.vm.vcpus) if self.vm is not None else 0) or replaced:
            try:
                self.follow(ForeignVm.attach(pid, fds), replaced)  # this listing: a second may find the VM gone
            except ProcessChanged:
                pass  # an fd closed or reused since the listing, or the process ended: next tick
        if self.vm is not None and now - self.read_at >= (EVIDENCE_SETTLED_S if self.complete() else EVIDENCE_EVERY_S):
            self.read(now)
        if self.duration is not None and now - self.t0 >= self.duration:
            return f"{self.duration:g} s passed"
        return None

    def close(self) -> None:
        """Let go of the VM's fd copies, its reading kept."""
        if self.vm is not None:
            self.emulated.read(self.vm)
            self.vm.close()
            self.keep()


def watch_process(target: int | list[str], duration: float | None = None,
                  events: list[str] | None = None, tracer: str = "bpf", every_chain: bool = False) -> WatchedProcess:
    """Trace a running process (a pid) or a command (started here, traced from its first event)
    until it exits or ``duration`` seconds pass. Its VM's evidence is read through copies of its
    vCPU fds as soon as its vCPUs have run, while it lives. A command started here is stopped
    (SIGTERM, then SIGKILL) on every way out, with every process it started in turn
    (:class:`kvmiso.commandtree.CommandTree`). Interrupted, it raises :class:`Interrupted` with
    the :class:`WatchedProcess` so far as ``partial`` (its log marked incomplete). ``tracer``:
    ``bpf`` or ``tracefs``, and ``every_chain``, as :func:`kvmiso.observe.tracing.attach.watch`
    takes them."""
    follower = VmFollower(duration)
    tree = CommandTree()
    # a process without KVM, gone, or not ours to read: refused before tracing
    held = len(kvm_fds(target).vms) if isinstance(target, int) else 0

    def start() -> int:
        try:
            return tree.start(target)
        except OSError as e:
            raise ProcessError(f"cannot start {target[0]}: {e.strerror}") from None

    interrupted: Interrupted | None = None
    try:
        try:
            attached = watch(target if isinstance(target, int) else start, follower.until, events, tracer, every_chain)
        except Interrupted as e:  # Ctrl-C is how a watch without --duration ends: keep what it saw
            if not isinstance(e.partial, Attached):
                raise
            interrupted, attached = e, e.partial
        if follower.vm is not None and not follower.complete():
            # it exited before a reading saw every vCPU's thread (a reading takes seconds under
            # TCG): the VM outlives it through the copies, and vcpu->pid still names the threads
            follower.read(time.monotonic())
    finally:
        follower.close()
        with deferred():  # a command kvmiso started goes with it, on every way out
            left = tree.stop(STOP_GRACE_S)
    follower.emulated.charge(attached.log)
    pid = target if isinstance(target, int) else tree.proc.pid
    watched = _watched(pid, attached, follower, held, left)
    if interrupted is not None:
        raise Interrupted.of(interrupted, watched)
    return watched


def _watched(pid: int, attached: Attached, follower: VmFollower, held: int, left: list[str]) -> WatchedProcess:
    """What the watch saw, each VM with its records and evidence (kallsyms naming its call
    chains), each record's ``vcpu`` the vCPU id where the evidence names its thread."""
    readings = follower.readings
    evidence = next((ev for _, ev in reversed(readings) if ev is not None), None) or unread_evidence()
    created = attached.vm_created
    # VMs one at a time, each created where the trace shows it (or held from the start): records
    # and readings go by time
    apart = (created is not None and len(created) + held >= max(1, len(readings))
             and max(follower.most, held) <= 1)
    vms = (split_by_vm(created, held, readings, attached.log.records) if apart else
           [WatchedVm(None, evidence, attached.log.records, mixed=len(readings) > 1)])
    for vm in vms:
        vm.evidence = vm.evidence or unread_evidence()
        resolve_chains(vm.evidence, attached.log)
        by_thread = {tid: vid for vid, tid in vm.evidence.threads.items()}
        for r in vm.records:
            r.vcpu = by_thread.get(r.vcpu, r.vcpu)
    return WatchedProcess(pid, attached, evidence, left, vms)


def unread_evidence() -> Evidence:
    """The evidence of a VM kvmiso could not read: every object and the page table modeled."""
    host = Host.read()
    return Evidence(kernel=host.kernel, vendor=host.vendor or "",
                    source="the VM ended before its vCPUs could be read")


def split_by_vm(created: list[int], held: int, readings: list[tuple[int, Evidence | None]],
                records: list[RunRecord]) -> list[WatchedVm]:
    """The VMs of a process that had one at a time: ``held`` (0 or 1) before the watch, then one
    per time in ``created``. Each record goes to the VM that was the latest when its KVM_RUN
    returned, each reading to the VM that was the latest when kvmiso attached to it."""
    vms = [WatchedVm(None) for _ in range(held)] + [WatchedVm(t) for t in created]

    def at(ns: int) -> WatchedVm:
        return vms[max(0, bisect.bisect_right(created, ns) - 1 + held)]

    for since, evidence in readings:
        at(since).evidence = evidence or at(since).evidence
    for r in records:
        at(r.end_ns).records.append(r)
    return vms


def _completeness(evidence: Evidence) -> tuple[int, int]:
    """How much of a VM a reading found: vCPU threads, then objects."""
    return len(evidence.threads), len(evidence.objects)


def resolve_chains(evidence: Evidence, log: ExitLog) -> None:
    """Name the functions of ``log``'s call chains in ``evidence`` (kallsyms)."""
    from ..observe.kernel.evidence import image_sections, resolve_code
    from ..observe.kernel.kallsyms import read_kallsyms

    symbols = read_kallsyms()
    if symbols is not None:
        evidence.code.update(resolve_code(symbols, {a for _, e in log.events() for a in e.stack}))
        evidence.sections = evidence.sections or image_sections(symbols)
