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

Throughput is payloads per second of wall-clock time per mode. Payloads that run into their
deadline cost the whole deadline each; the summary says how much of the time that was, and what
kvmiso itself costs per payload: the median of Machine.reset() plus the run of an empty payload
(DONE only), timed on a fresh machine after the cases.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import statistics
import time
from collections import Counter

from kvmiso.guest.fuzz import DONE_UCALL, KINDS, TARGETS, Fuzzer, FuzzStats, Resources, fuzz
from kvmiso.guest.result import Outcome
from kvmiso.kvm import Kvm


def main() -> int:
    # the docstring whole: its first paragraph says what the run is, the rest how to use and read it
    summary, _, rest = __doc__.partition("\n\n")
    ap = argparse.ArgumentParser(description=summary, epilog=rest,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=20000, help="payloads per mode (default 20000)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=0.03, help="seconds per payload (default 0.03)")
    ap.add_argument("--targets", nargs="+", choices=list(TARGETS), default=list(TARGETS))
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
        after = Resources.now()
        wall = time.perf_counter() - t0
        # after the leak check: runs in this thread start the process's kick helper (a thread, a pipe)
        floor = {target: _empty_payload_s(target, kvm) for target in args.targets}

    _table(results)
    _throughput(results, args.timeout, floor)
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
