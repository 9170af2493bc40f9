"""Running guests under capture and handing what they showed to the check: the orchestration
between :mod:`kvmiso.guest`, :mod:`kvmiso.observe` and :mod:`kvmiso.isolation` (which runs no
guest itself).

>>> with Capture() as cap, Machine("portio", kvm=kvm) as portio:   # needs root: tracefs and BPF
...     run = capture_checked(portio, cap, "portio")
>>> result = check_run(run, "rfc-v1")
>>> result.runs, result.exits == sum(result.classes[c] for c in ("kvm_mm", "host_mm", "fault", "unknown"))
(7, True)

(On kvm_pvm, 6.18.44-fc-v1300, all 24 exits checked fault, and ``result.fault_lines()[0]`` is
``kvm_mm miss #0 on ... (emulate_ctxt) attributed at x86_decode_emulated_instruction+0x36/0xb0,
first access in init_emulate_ctxt: 24 exits``.)
"""

from __future__ import annotations

import bisect
import os
import platform
from dataclasses import dataclass, field
from typing import Any

from .guest import Machine, RunResult
from .host import vendor_module
from .interrupt import Interrupted, deferred
from .isolation import (AccessModel, CheckResult, KvmAddressSpace, address_space, build_layout, check,
                        load_access_model, load_regions)
from .isolation.layout import Layout
from .isolation.mapset import DenylistSpace
from .observe.capture import Capture
from .observe.evidence import Evidence, collect_evidence, vcpu_counters
from .observe.exitlog import ExitLog, RunRecord
from .observe.attach import Attached, watch
from .observe.process import ForeignVm, ProcessChanged, ProcessError, kvm_fds
from .observe.kobject import possible_cpus
from .process import CommandTree

EVIDENCE_EVERY_S = 0.1  # a watched VM is read this often until every vCPU's thread is known,
EVIDENCE_SETTLED_S = 1.0  # then this often, while it lives
STOP_GRACE_S = 5.0  # a command stopped at --duration gets SIGTERM, then SIGKILL after this


@dataclass
class CapturedRun:
    """One guest run: its result, its exit log (events with call chains) and the evidence of
    its VM, read while the VM lived."""

    label: str
    result: RunResult
    log: ExitLog
    evidence: Evidence


def capture_checked(machine: Machine, cap: Capture, label: str, timeout: float = 5.0, **run_kwargs: Any) -> CapturedRun:
    """Run ``machine`` under ``cap``, then read its VM's evidence (in this thread: the vCPU task)."""
    result, log = cap.run(machine, timeout=timeout, payload=label, **run_kwargs)
    return CapturedRun(label, result, log, machine_evidence(machine, log))


def machine_evidence(machine: Machine, log: ExitLog | None = None) -> Evidence:
    """The evidence of ``machine``'s VM, with the functions of ``log``'s call chains."""
    code = {a for _, e in log.events() for a in e.stack} if log is not None else set()
    return collect_evidence(machine.vm, machine.vendor or "", code)


def host_cpus() -> int:
    """The number of possible CPUs (the per-CPU units the kernel set up)."""
    try:
        with open("/sys/devices/system/cpu/possible") as f:
            return possible_cpus(f.read())
    except OSError:
        return os.cpu_count() or 1


def layout_of(evidence: Evidence, machine: Machine | None = None) -> Layout:
    """The layout of ``evidence``; with no real objects, ``machine`` gives the real userspace side."""
    user = None
    if machine is not None and not evidence.real:
        user = {"kvm_run": [(v.page_address, v.page_address + machine.kvm.vcpu_mmap_size) for v in machine.vcpus],
                "guest_memory": sorted((s.host_addr, s.host_addr + s.size) for s in machine.vm.slots.values())}
    vcpus = len(machine.vcpus) if machine is not None else 1
    return build_layout(evidence, vcpus=vcpus, cpus=host_cpus(), user=user)


def space_for(layout: Layout, policy: str = "rfc-v1", regions: str | None = None,
              drop: tuple[str, ...] = ()) -> KvmAddressSpace | DenylistSpace:
    """The isolated address space of ``policy`` (with a region file for an allowlist)."""
    if regions:
        return load_regions(regions, layout, policy, drop, ram=_ram())
    return address_space(layout, policy, drop, ram=_ram())


def check_run(run: CapturedRun, policy: str = "rfc-v1", regions: str | None = None, drop: tuple[str, ...] = (),
              access: AccessModel | None = None, **check_kwargs: Any) -> CheckResult:
    """Check ``run``'s exits under ``policy`` against its own VM's evidence."""
    space = space_for(layout_of(run.evidence), policy, regions, drop)
    return check(space, run.log, access or load_access_model(), source=run.label, **check_kwargs)


def measure_switches(kvm: Any, payload: Any, cpl: int = 0, regions: str | None = None, policy: str = "rfc-v1",
                     max_exits: int = 32, timeout: float = 5.0) -> CheckResult:
    """Run ``payload`` for at most ``max_exits`` KVM_RUNs under capture and check every exit
    (the RFC's set, or ``regions``): ``result.switches_per_run`` is then what the model says
    isolation adds to one round trip of that guest."""
    with Machine(payload, cpl=cpl, kvm=kvm) as m, Capture() as cap:
        run = capture_checked(m, cap, m.image.name, timeout=timeout, max_exits=max_exits)
    return check_run(run, policy, regions)


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


def watch_process(target: int | list[str], duration: float | None = None,
                  events: list[str] | None = None, tracer: str = "bpf") -> WatchedProcess:
    """Trace a running process (a pid) or a command (started here, traced from its first event)
    until it exits or ``duration`` seconds pass. Its VM's evidence is read through copies of its
    vCPU fds as soon as its vCPUs have run, while it lives. A command started here is stopped
    (SIGTERM, then SIGKILL) on every way out, with every process it started in turn
    (:class:`kvmiso.process.CommandTree`). Interrupted, it raises :class:`Interrupted` with
    the :class:`WatchedProcess` so far as ``partial`` (its log marked incomplete). ``tracer``:
    ``bpf`` or ``tracefs``, as :func:`kvmiso.observe.attach.watch` takes it."""
    import time

    got: dict[str, Any] = {"most": 0}  # most: the most VMs the process held at one look
    emulated = EmulationCount()
    readings: list[tuple[int, Evidence | None]] = []  # (when kvmiso attached to a VM, its evidence)
    tree = CommandTree()
    # a process without KVM, gone, or not ours to read: refused before tracing
    held = len(kvm_fds(target).vms) if isinstance(target, int) else 0

    def start() -> int:
        try:
            return tree.start(target)
        except OSError as e:
            raise ProcessError(f"cannot start {target[0]}: {e.strerror}") from None

    def keep() -> None:
        """The VM followed so far, with what was read of it, before the next is followed."""
        readings.append((got.pop("since"), got.pop("evidence", None)))
        got.pop("read", None)

    def complete() -> bool:
        return "evidence" in got and len(got["evidence"].threads) >= len(got["vm"].vcpus)

    def read(now: float) -> None:
        emulated.read(got["vm"])
        reading, got["read"] = collect_evidence(got["vm"], vendor_module() or ""), now
        if "evidence" not in got or _completeness(reading) >= _completeness(got["evidence"]):
            got["evidence"] = reading

    def until(pid: int) -> str | None:
        """Every 0.1 s: take copies of the process's vCPU fds as they appear (the VM outlives
        the process through them), and read the VM's evidence while the process lives: every
        0.1 s until it names a thread for each vCPU, then every second. The latest reading is
        kept unless it knows fewer vCPU threads or objects than the one before: a vCPU thread's
        task, stack and mm are gone as the process exits."""
        now = time.monotonic()
        got.setdefault("t0", now)
        try:
            fds = kvm_fds(pid)
            seen, got["most"] = len(fds.vcpus), max(got["most"], len(fds.vms))
        except ProcessError:
            seen = 0  # gone, or exec'ing
        # another VM in the same fd numbers (a test program creating VM after VM): kcmp tells
        replaced = seen > 0 and "vm" in got and not got["vm"].still_held()
        if seen > (len(got["vm"].vcpus) if "vm" in got else 0) or replaced:
            try:
                vm = ForeignVm.attach(pid)
            except ProcessChanged:
                pass  # an fd closed or reused since the listing, or the process ended: next tick
            else:
                if replaced:  # the last VM's evidence is kept apart, this one's read anew
                    keep()
                if "vm" in got:
                    emulated.read(got["vm"])
                    got["vm"].close()
                emulated.read(vm)
                got["vm"] = vm
                got.setdefault("since", time.monotonic_ns())
        if "vm" in got and now - got.get("read", 0.0) >= (EVIDENCE_SETTLED_S if complete() else EVIDENCE_EVERY_S):
            read(now)
        if duration is not None and now - got["t0"] >= duration:
            return f"{duration:g} s passed"
        return None

    interrupted: Interrupted | None = None
    try:
        try:
            attached = watch(target if isinstance(target, int) else start, until, events, tracer)
        except Interrupted as e:  # Ctrl-C is how a watch without --duration ends: keep what it saw
            if not isinstance(e.partial, Attached):
                raise
            interrupted, attached = e, e.partial
        if "vm" in got and not complete():
            # it exited before a reading saw every vCPU's thread (a reading takes seconds under
            # TCG): the VM outlives it through the copies, and vcpu->pid still names the threads
            read(time.monotonic())
    finally:
        if "vm" in got:
            emulated.read(got["vm"])
            got["vm"].close()
            keep()
        with deferred():  # a command kvmiso started goes with it, on every way out
            left = tree.stop(STOP_GRACE_S)
    emulated.charge(attached.log)
    pid = target if isinstance(target, int) else tree.proc.pid
    evidence = next((ev for _, ev in reversed(readings) if ev is not None), None) or unread_evidence()
    created = attached.vm_created
    # VMs one at a time, each created where the trace shows it (or held from the start): records
    # and readings go by time
    apart = (created is not None and len(created) + held >= max(1, len(readings))
             and max(got["most"], held) <= 1)
    vms = (split_by_vm(created, held, readings, attached.log.records) if apart else
           [WatchedVm(None, evidence, attached.log.records, mixed=len(readings) > 1)])
    for vm in vms:
        vm.evidence = vm.evidence or unread_evidence()
        resolve_chains(vm.evidence, attached.log)
        by_thread = {tid: vid for vid, tid in vm.evidence.threads.items()}
        for r in vm.records:
            r.vcpu = by_thread.get(r.vcpu, r.vcpu)
    watched = WatchedProcess(pid, attached, evidence, left, vms)
    if interrupted is not None:
        raise Interrupted.of(interrupted, watched)
    return watched


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


def unread_evidence() -> Evidence:
    """The evidence of a VM kvmiso could not read: every object and the page table modeled."""
    return Evidence(kernel=platform.release(), vendor=vendor_module() or "",
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
    from .observe.evidence import image_sections, resolve_code
    from .observe.kallsyms import read_kallsyms

    symbols = read_kallsyms()
    if symbols is not None:
        evidence.code.update(resolve_code(symbols, {a for _, e in log.events() for a in e.stack}))
        evidence.sections = evidence.sections or image_sections(symbols)


def _ram() -> int:
    """MemTotal: the size of the modeled direct map when there is no live table."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 1 << 30


__all__ = ["WatchedProcess", "WatchedVm", "split_by_vm", "unread_evidence", "resolve_chains", "watch_process", "CapturedRun", "capture_checked", "check_run", "host_cpus", "layout_of", "machine_evidence",
           "measure_switches", "space_for"]
