"""The kvm_mm check of what a run showed: the layout of its evidence, the isolated address space
of a policy over it, and the verdicts (:mod:`kvmiso.isolation` judges; this module hands it the
run and the host's facts)."""

from __future__ import annotations

import os
from typing import Any

from ..guest import Machine
from ..isolation import (AccessModel, CheckResult, KvmAddressSpace, address_space, build_layout, check,
                         load_access_model, load_regions)
from ..isolation.layout import Layout
from ..isolation.mapset import DenylistSpace
from ..kvm import Kvm
from ..observe.kernel.evidence import Evidence
from ..observe.kernel.kobject import possible_cpus
from ..observe.tracing.capture import Capture
from .capture import CapturedRun, capture_checked


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


def measure_switches(kvm: Kvm, payload: str, cpl: int = 0, regions: str | None = None, policy: str = "rfc-v1",
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
