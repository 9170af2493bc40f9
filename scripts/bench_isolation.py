#!/usr/bin/env python3
"""Benchmarks of the grounded kvm_mm model (not tests: timings are printed, never asserted).

1. Evidence: reading a VM's objects and the live page table through BPF, the first time in a
   process (BTF, kallsyms, the kernel image's and cpu_entry_area's tables, the census of the
   kernel half) and for each further VM (its own objects only).
2. Model build: the layout, the kernel table rebuilt from the captured frames and the RFC's
   copies (``address_space``), from saved evidence.
3. Check throughput: the foundation payloads are captured once with call chains, their KVM_RUN
   records repeated to ``--records``, and check() timed over them (each payload against the
   evidence of the first VM: a throughput figure, not a verdict).
4. Placement (``--vms N``): N fresh VMs, each read from the kernel; the mapped-size figure of
   rfc-v1 and asi-2022 in distinct physical bytes (a page mapped at many addresses, as ESPFIX's,
   counts once) and in address space, min/median/max over the VMs, with the date, host and
   command; for each object, the leaf size the direct map gives it, and how often the RFC's set
   maps it without naming it (a neighbour's huge leaf, copied whole, exposes it).

Run as root on a KVM host: ``python3 scripts/bench_isolation.py [--records N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kvmiso.guest import Machine
from kvmiso.isolation import address_space, build_layout, check, load_access_model
from kvmiso.observe.tracing.capture import Capture
from kvmiso.observe.tracing.exitlog import ExitLog, RunRecord
from kvmiso.session import capture_checked, host_cpus, machine_evidence

PAYLOADS = ["portio", "cpuid", "msr", "mmio", "hlt", "hello"]


def _stats(xs: list[float]) -> dict[str, float]:
    return {"min": min(xs), "median": statistics.median(xs), "max": max(xs), "runs": len(xs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--vms", type=int, default=0, help="also: object placement over this many fresh VMs")
    ap.add_argument("--one-vm", action="store_true", help=argparse.SUPPRESS)  # a child of --vms: one VM, as JSON
    args = ap.parse_args()
    if args.one_vm:
        print(json.dumps(one_vm()))
        return
    if args.vms:
        placement(args.vms, args.json)
        return

    first, further = [], []
    for i in range(args.repeat + 1):
        with Machine("hello", mode="long") as m:
            m.run(timeout=5)
            t0 = time.perf_counter()
            machine_evidence(m)
            (first if i == 0 else further).append(time.perf_counter() - t0)
    log, evidence = ExitLog(), None
    with Capture() as cap:
        for p in PAYLOADS:
            with Machine(p, mode="long") as m:
                run = capture_checked(m, cap, p)
            log.extend(run.log)
            evidence = evidence or run.evidence
    builds = []
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        space = address_space(build_layout(evidence, cpus=host_cpus()))
        builds.append(time.perf_counter() - t0)
    access = load_access_model()
    base = log.records
    big = ExitLog(host=log.host, tracing=True, records=[
        RunRecord(i, r.vcpu, r.start_ns, r.end_ns, r.exit, r.payload, r.events)
        for i, r in ((i, base[i % len(base)]) for i in range(args.records))])
    from kvmiso.session import resolve_chains

    resolve_chains(evidence, big)
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        res = check(space, big, access)
        rates.append(args.records / (time.perf_counter() - t0))
    out = {"evidence_first_s": first[0], "evidence_next_s": _stats(further), "model_build_s": _stats(builds),
           "frames": len(evidence.frames), "objects": len(evidence.objects),
           "check_records": args.records, "check_events": sum(len(r.events) for r in big.records),
           "check_records_per_s": _stats(rates), "classes": res.classes}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"evidence: {out['evidence_first_s'] * 1e3:.0f} ms for the first VM of a process, then median "
          f"{out['evidence_next_s']['median'] * 1e3:.1f} ms per VM ({out['objects']} objects, {out['frames']} table pages)")
    b = out["model_build_s"]
    print(f"model build from evidence: median {b['median'] * 1e3:.1f} ms (min {b['min'] * 1e3:.1f}, max {b['max'] * 1e3:.1f})")
    c = out["check_records_per_s"]
    print(f"check of {args.records} records ({out['check_events']} events with call chains, {len(base)} captured "
          f"KVM_RUNs repeated): median {c['median'] / 1e3:.0f}k records/s (min {c['min'] / 1e3:.0f}k, "
          f"max {c['max'] / 1e3:.0f}k)")
    print(f"classes: {res.classes}")


# The policies whose mapped-size figure the placement census reports (asi maps the kernel half
# but for guest pages: its figure says nothing about placement).
FIGURE_POLICIES = ("rfc-v1", "asi-2022")


def _spread(xs: list[float]) -> dict[str, float | bool]:
    """min, median, max and runs, with pyperf's warning: stdev at 10% of the mean or more."""
    out: dict[str, float | bool] = dict(_stats(xs))
    out["unstable"] = len(xs) > 1 and statistics.stdev(xs) >= 0.1 * statistics.mean(xs)
    return out


def one_vm() -> dict[str, dict]:
    """A fresh VM of this process, read from the kernel: each figure policy's model summary."""
    from kvmiso.isolation import model_summary

    with Machine("hello", mode="long") as m:
        m.run(timeout=5)
        ev = machine_evidence(m)
    if not ev.real:
        raise SystemExit(f"the census needs the running kernel's objects: {ev.source}")
    lay = build_layout(ev, cpus=host_cpus())
    out = {}
    for policy in FIGURE_POLICIES:
        space = address_space(lay, policy)
        s = model_summary(space)
        s["named"] = sorted({r.name for spec in space.regions for r in lay.matching(spec.layout or spec.name)})
        out[policy] = s
    return out


def placement(n: int, as_json: bool) -> None:
    """N fresh VMs, each made and read by a process of its own (so that no VM reuses the last
    one's freed objects in the same process): the mapped-size figure of each policy in distinct
    physical bytes (a page mapped at many addresses counts once) and in address space, with their
    spread; and, for the RFC's set, the leaf each object sat in and what a neighbour's huge leaf
    mapped without the set naming it."""
    import datetime
    import subprocess
    import sys
    from collections import Counter

    from kvmiso.host import Host

    leaves: dict[str, Counter] = {}
    exposed: Counter = Counter()
    figures: dict[str, dict[str, list[float]]] = {p: {} for p in FIGURE_POLICIES}
    for _ in range(n):
        child = subprocess.run([sys.executable, __file__, "--one-vm"], capture_output=True, text=True, check=True)
        vm = json.loads(child.stdout)
        for policy, s in vm.items():
            for key in ("isolated_physical_bytes", "kernel_physical_bytes", "share_of_kernel_physical",
                        "isolated_mapped_bytes", "kernel_mapped_bytes", "share_of_kernel_mapped"):
                figures[policy].setdefault(key, []).append(s[key])
        s = vm["rfc-v1"]
        for o in s["objects"]:
            if o["index"]:
                continue
            leaves.setdefault(o["name"], Counter())[o["leaf_level"]] += 1
            if o["mapped"] and o["name"] not in s["named"] and o["start"] >= 1 << 47:
                exposed[o["name"]] += 1
    info = Host.read()
    out = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
           "command": " ".join(["python3"] + sys.argv), "vms": n,
           "host": {"kernel": info.kernel, "vendor": info.vendor, "cpu": info.cpu, "cpus": info.cpus},
           "figures": {p: {k: _spread(v) for k, v in f.items()} for p, f in figures.items()},
           "leaf_levels": {k: dict(v) for k, v in leaves.items()}, "mapped_without_being_in_the_set": dict(exposed)}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    h = out["host"]
    print(f"{n} fresh VMs, {out['date']}, {h['kernel']} ({h['vendor']}, {h['cpus']} x {h['cpu']}): {out['command']}")
    for policy, f in out["figures"].items():
        ph, sh, va, sv = (f[k] for k in ("isolated_physical_bytes", "share_of_kernel_physical",
                                         "isolated_mapped_bytes", "share_of_kernel_mapped"))
        kern = f["kernel_physical_bytes"]["median"] / (1 << 30)
        print(f"{policy:<9} distinct physical: median {ph['median'] / (1 << 20):.1f} MiB = {100 * sh['median']:.2f}% "
              f"of the kernel half's {kern:.2f} GiB (min {100 * sh['min']:.2f}%, max {100 * sh['max']:.2f}%)"
              f"{' (wide: stdev >= 10% of the mean)' if sh['unstable'] else ''}")
        print(f"{'':<9} address space:     median {va['median'] / (1 << 20):.1f} MiB = {100 * sv['median']:.2f}% "
              f"(min {100 * sv['min']:.2f}%, max {100 * sv['max']:.2f}%)")
    print(f"{'object':<16} {'leaf sizes (VMs)':<28} mapped by a neighbour's leaf (rfc-v1)")
    for name, c in sorted(leaves.items()):
        sizes = ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))
        print(f"{name:<16} {sizes:<28} {exposed.get(name, 0)}/{n}")


if __name__ == "__main__":
    main()
