#!/usr/bin/env python3
"""Benchmarks of the kvm_mm model (not tests: timings are printed, never asserted).

1. Model build: this machine's /proc/kallsyms -> layout -> kernel table -> the default
   KvmAddressSpace (target: well under 1 s).
2. Check throughput: the foundation payloads are captured once on the real device, their
   KVM_RUN records repeated to one million, and check() timed over them (target: at least
   500k records/s).

Run as root on a KVM host: ``python3 scripts/bench_isolation.py [--records N] [--json]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from kvmiso.guest import Machine
from kvmiso.isolation.check import check, load_handlers
from kvmiso.isolation.layout import host_layout, known_region_names
from kvmiso.isolation.mapset import KvmAddressSpace
from kvmiso.observe.capture import capture
from kvmiso.observe.exitlog import ExitLog, RunRecord

PAYLOADS = ["portio", "cpuid", "msr", "mmio", "hlt", "hello"]


def bench_build(repeat: int) -> list[float]:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        KvmAddressSpace.default(host_layout())
        times.append(time.perf_counter() - t0)
    return times


def _rates(kas, log: ExitLog, table, n: int) -> list[float]:
    rates = []
    for _ in range(3):
        t0 = time.perf_counter()
        check(kas, log, table)
        rates.append(n / (time.perf_counter() - t0))
    return rates


def sample_log() -> tuple[ExitLog, object]:
    log = ExitLog()
    layout = None
    for p in PAYLOADS:
        with Machine(p, mode="long") as m:
            _, part = capture(m, timeout=5, payload=p)
            layout = layout or host_layout(m.vm)
        log.extend(part)
    return log, layout


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--records", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()

    build = bench_build(args.repeat)
    sample, layout = sample_log()
    kas = KvmAddressSpace.default(layout)
    table = load_handlers(regions=known_region_names())
    base = sample.records
    big = ExitLog(host=sample.host, tracing=sample.tracing, records=[
        RunRecord(i, r.vcpu, r.start_ns, r.end_ns, r.exit, r.payload, r.events)
        for i, r in ((i, base[i % len(base)]) for i in range(args.records))])
    events = sum(len(r.events) for r in big.records)
    rates = _rates(kas, big, table, args.records)
    res = check(kas, big, table)
    # the same KVM_RUNs as a log without trace events (tracing off, or a host where only the
    # userspace exit is seen): the per-record floor of the check
    bare = ExitLog(host=sample.host, records=[RunRecord(r.run, r.vcpu, r.start_ns, r.end_ns, r.exit) for r in big.records])
    bare_rates = _rates(kas, bare, table, args.records)
    out = {
        "model_build_s": {"min": min(build), "median": statistics.median(build), "max": max(build), "runs": len(build)},
        "kallsyms_symbols": len(layout.symbols) if layout.symbols else 0,
        "kvm_pages_4k": kas.summary()["kvm_pages_4k"],
        "check_records": args.records, "check_events": events,
        "check_records_per_s": {"min": min(rates), "median": statistics.median(rates), "max": max(rates)},
        "check_classes": res.classes,
        "check_untraced_records_per_s": {"min": min(bare_rates), "median": statistics.median(bare_rates),
                                         "max": max(bare_rates)},
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    b = out["model_build_s"]
    print(f"model build from /proc/kallsyms ({out['kallsyms_symbols']} symbols): median {b['median'] * 1e3:.0f} ms "
          f"(min {b['min'] * 1e3:.0f}, max {b['max'] * 1e3:.0f}, {b['runs']} runs)")
    c = out["check_records_per_s"]
    print(f"check of {args.records} records ({events} trace events, {len(base)} distinct captured KVM_RUNs repeated): "
          f"median {c['median'] / 1e3:.0f}k records/s (min {c['min'] / 1e3:.0f}k, max {c['max'] / 1e3:.0f}k)")
    c = out["check_untraced_records_per_s"]
    print(f"check of the same records without trace events: median {c['median'] / 1e3:.0f}k records/s "
          f"(min {c['min'] / 1e3:.0f}k, max {c['max'] / 1e3:.0f}k)")
    print(f"classes: {res.classes}")


if __name__ == "__main__":
    main()
