#!/usr/bin/env python3
"""The long fuzz run: COUNT random payloads per mode (default 20,000; half random bytes, half
random instruction sequences) on one reused VM per mode, then the outcome table and the leak
check. Exit status 1 if the harness raised, left a run unclassified, or leaked.

The run uses the C allocator (it re-executes itself with PYTHONMALLOC=malloc): pymalloc's
1 MiB arenas come and go with Python's own memory use and would look like leaked mappings.

    python3 scripts/fuzz.py                  # 4 x 20,000 payloads
    python3 scripts/fuzz.py --count 2000 --seed 7 --targets long long-cpl3
    python3 scripts/fuzz.py --jobs 2         # two machines per mode side by side (one per CPU)
    python3 scripts/fuzz.py --json fuzz.json  # the figures as JSON as well

The figure kvmiso answers for is the harness cost per payload: what it spends around the guest,
whatever the guest does until its deadline. It is the median of Machine.reset() plus writing the
payload, timed on every case, plus the case's KVM_RUN calls times what Vcpu.run() adds to a KVM_RUN
round trip (decoding and the Python loop: its p50 over the compiled loop's, measured in the same
process). Payloads per second are printed too, but they mostly count deadlines: a payload that
spins costs the whole deadline; the summary says how much of the time that was, and what an empty
payload (DONE only; reset plus run) costs, timed on a fresh machine after the cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time
from collections import Counter

from kvmiso.bench import runloop
from kvmiso.guest import Machine, build
from kvmiso.guest.fuzz import DONE_UCALL, KINDS, TARGETS, Fuzzer, FuzzStats, Resources, fuzz
from kvmiso.guest.result import Outcome
from kvmiso.kvm import Kvm


def main() -> int:
    # the docstring whole: its first paragraph says what the run is, the rest how to use and read it
    summary, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=summary, epilog=rest,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="payloads per mode (default 20000)")
    ap.add_argument("--seed", type=int, default=0,
                    help="the cases' seed (default 0): a failing case's label names it, with its index, to make it again")
    ap.add_argument("--timeout", type=float, default=0.03, help="seconds per payload (default 0.03)")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS),
                    help="CPU modes (and long mode at CPL3) to fuzz (default: all)")
    ap.add_argument("--jobs", type=int, default=1, help="machines per mode, one thread each (default 1)")
    ap.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = ap.parse_args()
    if os.environ.get("PYTHONMALLOC") != "malloc":
        os.execve(sys.executable, [sys.executable, *sys.argv], {**os.environ, "PYTHONMALLOC": "malloc"})

    t0 = time.perf_counter()
    results: dict[str, FuzzStats] = {}
    with Kvm() as kvm:
        for target in args.targets:  # warm up: lazy imports and allocator growth are not leaks
            fuzz(target, 20 * args.jobs, seed=args.seed + 1, timeout=args.timeout, jobs=args.jobs, kvm=kvm)
        before = Resources.now()
        for target in args.targets:
            results[target] = s = fuzz(target, args.count, seed=args.seed, timeout=args.timeout, jobs=args.jobs, kvm=kvm)
            print(f"{target}: {s.runs} runs in {s.elapsed:.1f} s ({s.per_second:.0f} payloads/s, {s.jobs} "
                  f"job{'s' * (s.jobs > 1)}), {s.kvm_runs} KVM_RUN calls", file=sys.stderr)
        after = Resources.after(before)
        wall = time.perf_counter() - t0
        # after the leak check: runs in this thread start the process's kick helper (a thread, a pipe)
        floor = {target: _empty_payload_s(target, kvm) for target in args.targets}
        decode_ns = _decode_ns(kvm)

    _table(results)
    _throughput(results, args.timeout, floor)
    harness = {t: _harness_us(s, decode_ns) for t, s in results.items()}
    print(f"\nharness cost per payload (reset and payload write, median, plus KVM_RUN calls x {decode_ns:.0f} ns "
          "that Vcpu.run() adds to a round trip):")
    for target, (total, setup, runs) in harness.items():
        print(f"  {target:<10} {total:7.1f} us = {setup:.1f} us + {runs:.2f} KVM_RUN calls x {decode_ns:.0f} ns")
    failed = False
    for target, s in results.items():
        for label, tb in s.errors:
            failed = True
            print(f"\nHARNESS ERROR {label}:\n{tb}")
        for label, outcome, detail in s.unclassified:
            failed = True
            print(f"UNCLASSIFIED {label}: outcome {outcome!r}, detail {detail!r}")
    leak = after != before
    print(f"\nresources before {before}\n          after  {after}: {'LEAK' if leak else 'no leak'}")
    runs = sum(s.runs for s in results.values())
    print(f"{runs} payloads ({args.count} per mode, seed {args.seed}, timeout {args.timeout:g} s) in "
          f"{wall:.0f} s; {sum(len(s.errors) for s in results.values())} harness errors, "
          f"{sum(len(s.unclassified) for s in results.values())} unclassified")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"count": args.count, "seed": args.seed, "timeout_s": args.timeout, "jobs": args.jobs, "wall_s": wall,
                       "resources_before": vars(before), "resources_after": vars(after),
                       "targets": {t: {"runs": s.runs, "kvm_runs": s.kvm_runs, "elapsed_s": s.elapsed,
                                       "payloads_per_s": s.per_second,
                                       "empty_payload_us": floor[t] * 1e6,
                                       "harness_us": harness[t][0], "setup_us_median": harness[t][1],
                                       "kvm_runs_per_payload": harness[t][2], "decode_ns": decode_ns,
                                       "outcomes": dict(s.outcomes),
                                       "by_kind": {k: dict(c) for k, c in s.by_kind.items()},
                                       "errors": s.errors, "unclassified": s.unclassified}
                                   for t, s in results.items()}}, f, indent=2)
    return 1 if failed or leak else 0


def _table(results: dict[str, FuzzStats]) -> None:
    """One row per outcome, one column per mode and payload kind."""
    cols = [(t, k) for t in results for k in KINDS]
    seen = Counter()
    for s in results.values():
        seen.update(s.outcomes)
    rows = [o for o in Outcome if seen[o]]
    head = ["outcome"] + [f"{t}/{k}" for t, k in cols] + ["total"]
    width = [max(len(h), 8) for h in head]
    width[0] = max([len(o) for o in rows] + [width[0]])
    print("  ".join(h.rjust(w) if i else h.ljust(w) for i, (h, w) in enumerate(zip(head, width))))
    for o in rows:
        cells = [str(results[t].by_kind[k][o]) for t, k in cols] + [str(seen[o])]
        print("  ".join([o.ljust(width[0])] + [c.rjust(w) for c, w in zip(cells, width[1:])]))

def _empty_payload_s(target: str, kvm: Kvm, n: int = 300) -> float:
    """Median seconds of Machine.reset() plus the run of a payload that only reports DONE:
    what kvmiso and KVM cost per case before the payload does anything. The deadline is 5 s, not
    the fuzz's: a loaded host must not turn this figure into a deadline's length."""
    with Fuzzer(target, 5.0, kvm) as f:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            r = f.run(DONE_UCALL)
            times.append(time.perf_counter() - t0)
            if r.outcome is not Outcome.DONE:
                raise RuntimeError(f"{target}: the empty payload ended {r.outcome}: {r.detail}")
    return statistics.median(times)


def _decode_ns(kvm: Kvm, n: int = 5000, rounds: int = 7) -> float:
    """What Vcpu.run() adds to a KVM_RUN round trip: the median over ``rounds`` back-to-back pairs
    of the Python loop's p50 less the compiled loop's, on the port-OUT guest at CPL0 (pairs, so
    a neighbour's load falls on both sides of each difference)."""
    with Machine(build("bench_out", "long"), kvm=kvm) as m:
        args = dict(expect="io", port=m.image.symbols["PORT_BENCH"])
        runloop.compiled_loop(m.vcpu, n, **args)
        runloop.python_loop(m.vcpu, n, **args)
        diffs = [statistics.median(runloop.python_loop(m.vcpu, n, **args).latencies())
                 - statistics.median(runloop.compiled_loop(m.vcpu, n, **args).latencies()) for _ in range(rounds)]
    return statistics.median(diffs)


def _harness_us(s: FuzzStats, decode_ns: float) -> tuple[float, float, float]:
    """(harness cost per payload, its reset-and-write median, KVM_RUN calls per payload), in us."""
    setup = statistics.median(s.setup_ns) / 1e3 if s.setup_ns else 0.0
    runs = s.kvm_runs / s.runs if s.runs else 0.0
    return setup + runs * decode_ns / 1e3, setup, runs


def _throughput(results: dict[str, FuzzStats], timeout: float, floor: dict[str, float]) -> None:
    """Payloads per second per mode, the share of the time that went to payloads waiting out
    their deadline (each timeout costs the whole deadline, on one machine of ``jobs``), and the
    cost of an empty payload."""
    print()
    for target, s in results.items():
        waited = s.outcomes[Outcome.TIMEOUT] * timeout / s.jobs
        print(f"{target:<10} {s.per_second:7.0f} payloads/s ({s.runs} in {s.elapsed:.1f} s, {s.jobs} "
              f"job{'s' * (s.jobs > 1)}); {s.outcomes[Outcome.TIMEOUT]} timeouts = {waited:.1f} s "
              f"({100 * waited / s.elapsed if s.elapsed else 0:.0f}%) of deadlines; an empty payload "
              f"(reset + run) {floor[target] * 1e6:.0f} us")


if __name__ == "__main__":
    sys.exit(main())
