#!/usr/bin/env python3
"""What capture costs: KVM_RUN round trips of guests/bench_out (one OUT exit per iteration)
run plainly and under capture, p50 of the per-KVM_RUN time and of the whole loop per exit.

    sudo python3 scripts/bench_capture.py [--exits 5000] [--repeats 3] [--json FILE]

Configurations, each at CPL0 and CPL3:
  plain          Machine.run with an on_exit hook that only takes the two timestamps
  capture        capture(trace=False): + the stats read and the exit's dict at every exit
  capture+trace  capture(): + every kvm/kvmmmu event of this kernel recorded in the kernel
  +trace(kvm)    capture(trace=["kvm"]): the kvm events only, without the kvmmmu page walks
"KVM_RUN" is end - start as the exit log defines it (from handing the previous exit back to
the next exit arriving); "loop/exit" is the run's elapsed time over its exits.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

from kvmiso.guest import Machine
from kvmiso.host import vendor_module
from kvmiso.observe.tracing.capture import Capture
from kvmiso.session import capture_run


def plain(m: Machine, exits: int) -> tuple[list[int], float]:
    starts, ends = [time.monotonic_ns()], []

    def hook(exit) -> None:
        ends.append(time.monotonic_ns())
        starts.append(time.monotonic_ns())

    r = m.run(timeout=60, on_exit=hook, max_exits=exits, record=False)
    return [e - s for s, e in zip(starts, ends)], r.elapsed / r.runs


def captured(m: Machine, exits: int, trace: bool | list[str]) -> tuple[list[int], float, int, int]:
    # a buffer big enough for every record of the run: nothing lost, nothing to skew the numbers
    with Capture(trace, buffer_kb=65536) as cap:
        r, log = capture_run(cap, m, timeout=60, max_exits=exits, record=False)
    events = sum(len(x.events) for x in log.records)
    return [x.wall_ns for x in log.records], r.elapsed / r.runs, events, log.lost_events


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exits", type=int, default=5000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--cpu", type=int, default=1, help="pin to this CPU (-1: do not pin)")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.cpu >= 0:
        os.sched_setaffinity(0, {args.cpu})
    results = []
    for cpl in (0, 3):
        for config in ("plain", "capture", "capture+trace", "+trace(kvm)"):
            p50s, loops, events, lost = [], [], 0, 0
            for _ in range(args.repeats):
                with Machine("bench_out", mode="long", cpl=cpl) as m:
                    m.run(timeout=10, max_exits=200, record=False)  # warm up: page in, shadow tables
                    if config == "plain":
                        times, loop = plain(m, args.exits)
                    else:
                        trace = {"capture": False, "capture+trace": True, "+trace(kvm)": ["kvm"]}[config]
                        times, loop, events, lost = captured(m, args.exits, trace)
                p50s.append(statistics.median(times[1:]))
                loops.append(loop)
            results.append({"cpl": cpl, "config": config, "kvm_run_p50_us": statistics.median(p50s) / 1e3,
                            "kvm_run_p50_spread_us": (max(p50s) - min(p50s)) / 1e3,
                            "loop_per_exit_us": statistics.median(loops) * 1e6,
                            "events_per_exit": events / args.exits, "lost": lost})
    print(f"bench_out, {args.exits} exits x {args.repeats} runs, {vendor_module()}, pinned to cpu {args.cpu}")
    print(f"{'CPL':>3}  {'config':<14} {'KVM_RUN p50 µs':>15} {'(spread)':>9} {'loop/exit µs':>13} "
          f"{'events/exit':>12} {'lost':>5}")
    base = {r["cpl"]: r for r in results if r["config"] == "plain"}
    for r in results:
        ratio = r["kvm_run_p50_us"] / base[r["cpl"]]["kvm_run_p50_us"]
        print(f"{r['cpl']:>3}  {r['config']:<14} {r['kvm_run_p50_us']:>15.2f} {r['kvm_run_p50_spread_us']:>9.2f} "
              f"{r['loop_per_exit_us']:>13.2f} {r['events_per_exit']:>12.1f} {r['lost']:>5}   {ratio:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"exits": args.exits, "repeats": args.repeats, "vendor": vendor_module(),
                       "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
