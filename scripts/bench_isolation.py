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
4. Placement (``--vms N``): N fresh VMs, each read from the kernel; for each object, the leaf size
   the direct map gives it, and how often the RFC's set maps it without naming it (a neighbour's
   huge leaf, copied whole, exposes it); the share of the kernel half kvm_mm then maps.

Run as root on a KVM host: ``python3 scripts/bench_isolation.py [--records N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kvmiso.guest import Machine
from kvmiso.isolation import address_space, build_layout, check, load_access_model
from kvmiso.observe.capture import Capture
from kvmiso.observe.exitlog import ExitLog, RunRecord
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
    args = ap.parse_args()
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


def placement(n: int, as_json: bool) -> None:
    from collections import Counter

    from kvmiso.isolation import model_summary

    leaves: dict[str, Counter] = {}
    exposed: Counter = Counter()
    shares = []
    for _ in range(n):
        with Machine("hello", mode="long") as m:
            m.run(timeout=5)
            ev = machine_evidence(m)
        s = model_summary(address_space(build_layout(ev, cpus=host_cpus())))
        shares.append(s["share_of_kernel_mapped"])
        named = {r["name"] for r in s["regions"]}
        for o in s["objects"]:
            if o["index"]:
                continue
            leaves.setdefault(o["name"], Counter())[o["leaf_level"]] += 1
            family = o["name"].split(":")[0]
            if o["mapped"] and o["name"] not in named and family not in ("bus", "memslots") and o["start"] >= 1 << 47:
                exposed[o["name"]] += 1
    out = {"vms": n, "share_of_kernel_mapped": _stats(shares), "leaf_levels": {k: dict(v) for k, v in leaves.items()},
           "mapped_without_being_in_the_set": dict(exposed)}
    if as_json:
        print(json.dumps(out, indent=2))
        return
    sh = out["share_of_kernel_mapped"]
    print(f"{n} fresh VMs: the RFC's set maps {100 * sh['median']:.1f}% of what the kernel half maps "
          f"(median; {100 * sh['min']:.1f}% to {100 * sh['max']:.1f}%)")
    print(f"{'object':<16} {'leaf sizes (VMs)':<28} mapped by a neighbour's leaf")
    for name, c in sorted(leaves.items()):
        sizes = ", ".join(f"{k} x{v}" for k, v in sorted(c.items()))
        print(f"{name:<16} {sizes:<28} {exposed.get(name, 0)}/{n}")


if __name__ == "__main__":
    main()
