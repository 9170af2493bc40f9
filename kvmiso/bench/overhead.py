"""What KVM address space isolation would add to each measured round trip.

The cost is ``extra switches per round trip x the cost of one switch``. The switch counts are
an input (a mapping kind -> switches), so the isolation model (kvmiso.isolation) can supply
them; until it does, :func:`rfc_switches` applies the RFC's rule: two more address-space
switches per KVM_RUN (into kvm_mm on entry, back to host_mm on the return to userspace), plus
two for each exit handled on host_mm that goes back into the guest (patch 07: guest page faults,
sched-out, IRQs, ...): out, and back in at the next VM entry (patch 04), as kvmiso's isolation
check counts them.

The switch cost is given by the user, or estimated by :func:`estimate_switch_cost` where this
host allows an honest estimate; its source is always carried next to the figure.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any, Mapping

from ..guest import Machine, build
from ..kvm import Kvm
from . import runloop
from .kinds import KINDS
from .latency import BENCH_MEMORY, guest_cycles
from .results import BenchResult

RFC_RULE = ("RFC rule: 2 switches per KVM_RUN + 2 per exit handled on host_mm inside it (used for the "
            "in-kernel batch kinds and the floors)")
MODEL = ("model: switches per KVM_RUN of a short captured run of the kind's own guest, every exit "
         "classified by kvmiso.isolation (used for the kinds that exit to userspace)")


@dataclass(frozen=True)
class SwitchCost:
    """The cost of one address-space switch in ns (None: unknown) and what it rests on."""

    ns: float | None
    source: str


def rfc_switches(kind: str, iterations: int = 1) -> float:
    """Extra switches per measured round trip of ``kind`` under the RFC rule.

    A sample of an in-kernel kind is one iteration of a batch of ``iterations`` inside one
    KVM_RUN, so its KVM_RUN switches are shared by the batch.
    """
    base = KINDS.get("parallel" if kind.startswith("parallel_") else kind)
    if base is None:  # the floors make no KVM_RUN
        return 0.0
    runs = 1.0 / iterations if base.in_kernel else base.kvm_runs_per_iteration
    return 2 * runs + 2 * base.host_mm_exits  # each such exit re-enters the guest in the batch


def estimate_switch_cost(kvm: Kvm, host: Mapping[str, Any], iterations: int = 1000,
                         batches: int = 50) -> SwitchCost:
    """Time MOV to CR3 (same value: a TLB flush, as an isolation switch without PCID) in a
    CPL0 guest with RDTSC, where CPL0 runs natively and the write does not exit.

    Where CPL0 is emulated (kvm_pvm) a guest CR3 write times KVM's emulator and shadow MMU, not
    the hardware, and without perf counters or kprobes the host's own switch cannot be timed:
    then the cost is unknown and the user must give it.
    """
    if host.get("cpl0") != "native":
        return SwitchCost(None, "not estimated: CPL0 guest code is emulated on this host, so a guest CR3 "
                                "write would time KVM's emulator, and there are no perf counters or kprobes "
                                "to time the host's own; give --switch-cost NS")
    image = build("bench_cr3", "long")
    with Machine(image, kvm=kvm, memory=BENCH_MEMORY) as m:
        m.vm.write(image.symbols["iterations"], struct.pack("<Q", iterations))
        t = runloop.compiled_loop(m.vcpu, batches, "io", image.symbols["PORT_BENCH"])
        hz = t.tsc_hz()
        cycles = sorted(guest_cycles(m, 0, batches))
    if not hz:
        return SwitchCost(None, "not estimated: the TSC is not usable on this host; give --switch-cost NS")
    ns = cycles[len(cycles) // 2] / iterations * 1e9 / hz
    return SwitchCost(ns, f"estimated: guest MOV to CR3 at native CPL0, median of {batches} x {iterations}, "
                          "TSC-timed; the flush only, not the TLB refills that follow")


def isolation_rows(result: BenchResult, cost: SwitchCost,
                   switches: Mapping[Any, float] | None = None) -> list[dict[str, Any]]:
    """Per measured row: extra switches per round trip, and the ns and % they would add.

    ``switches`` maps (kind, cpl), or a kind for every CPL, to extra switches per round trip
    (from the isolation model); rows it lacks fall back to :func:`rfc_switches`.
    """
    rows = []
    switches = switches or {}
    for r in result.results:
        n = switches.get((r.kind, r.cpl), switches.get(r.kind))
        given = n is not None
        if n is None:
            n = rfc_switches(r.kind, r.iterations)
        added = None if cost.ns is None else n * cost.ns
        rows.append({"kind": r.kind, "path": r.path, "cpl": r.cpl, "p50_ns": r.summary["p50"],
                     "switches": n, "switch_source": MODEL if given else RFC_RULE,
                     "added_ns": added,
                     "added_pct": None if added is None else 100 * added / r.summary["p50"]})
    return rows


def format_isolation(rows: list[dict[str, Any]], cost: SwitchCost) -> str:
    """The isolation table, with the switch cost's source printed next to it."""
    cost_text = "unknown" if cost.ns is None else f"{cost.ns:.0f} ns"
    w = max([len("kind")] + [len(r["kind"]) for r in rows])  # immediate_exit is 14
    out = [f"isolation overhead at {cost_text} per switch ({cost.source})",
           f"{'kind':<{w}} {'cpl':>3} {'path':<7} {'p50 us':>9} {'switches':>8} {'adds us':>8} {'adds %':>7}  switches from (modeled)"]
    for r in rows:
        cpl = "-" if r["cpl"] is None else str(r["cpl"])
        add = "n/a" if r["added_ns"] is None else f"{r['added_ns'] / 1000:.3f}"
        pct = "n/a" if r["added_pct"] is None else f"{r['added_pct']:.1f}"
        src = "model" if r["switch_source"] == MODEL else "RFC rule"
        out.append(f"{r['kind']:<{w}} {cpl:>3} {r['path']:<7} {r['p50_ns'] / 1000:>9.3f} {r['switches']:>8.2f} {add:>8} {pct:>7}  {src}")
    sources = {r["switch_source"] for r in rows}
    out += [f"  {x}" for x in sorted(sources)]
    return "\n".join(out)
