"""Running guests under capture and handing what they showed to the check: the orchestration
between :mod:`kvmiso.guest`, :mod:`kvmiso.observe` and :mod:`kvmiso.isolation` (which runs no
guest itself).

>>> with Capture() as cap:
...     run = capture_checked(Machine("portio"), cap, "portio")
>>> check_run(run, "rfc-v1").fault_lines()[0]
'KVM isolation: page fault #0 (31) at x86_emulate_instruction+0x253/0x850 on ffff88811a2d0000 (emulate_ctxt)'
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .guest import Machine, RunResult
from .isolation import (AccessModel, CheckResult, KvmAddressSpace, address_space, build_layout, check,
                        load_access_model, load_regions)
from .isolation.layout import Layout
from .isolation.mapset import DenylistSpace
from .observe.capture import Capture
from .observe.evidence import Evidence, collect_evidence
from .observe.exitlog import ExitLog
from .observe.vmobjects import possible_cpus


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


__all__ = ["CapturedRun", "capture_checked", "check_run", "host_cpus", "layout_of", "machine_evidence",
           "measure_switches", "space_for"]
