#!/usr/bin/env python3
"""Build scripts/ref_runloop.c and run it beside kvmiso's compiled loop and Python API, in
turns, pinned to one CPU, then print the port-OUT p50 of each and the ratios to the reference.

    python3 scripts/ref_runloop.py [--rounds 20] [--samples 5000] [--cpl 0 3] [--cpu N]

Targets (issue 5): compiled loop within 3% of the reference, Python API within 1.25x.
Each round runs the three in a rotated order, so a slow moment of a shared host does not
always land on the same one; times are medians of the rounds' p50s, ratios the medians of the
rounds' own ratios. Short rounds (--samples) keep each round's three runs close in time.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from kvmiso.bench import runloop
from kvmiso.bench.environment import pin, unpin
from kvmiso.bench.samples import percentile
from kvmiso.guest import Machine, build
from kvmiso.kvm import Kvm

SRC = Path(__file__).resolve().parent / "ref_runloop.c"
TARGETS = {"compiled": 1.03, "python": 1.25}


def build_reference() -> Path:
    """Compile the reference once per source version, into kvmiso's cache directory."""
    cc = os.environ.get("CC", "cc")
    if shutil.which(cc) is None:
        sys.exit(f"ref_runloop: no C compiler: {cc!r} is not on PATH (apt-get install gcc, or set CC)")
    key = hashlib.sha256(SRC.read_bytes()).hexdigest()[:16]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "kvmiso"
    exe = cache / f"ref_runloop-{key}"
    if not exe.exists():
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run([cc, "-O2", "-Wall", "-o", str(exe), str(SRC)], check=True)
    return exe


def p50(values: list[int]) -> float:
    return percentile(sorted(values), 50)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--cpl", type=int, nargs="+", choices=(0, 3), default=[0, 3])
    ap.add_argument("--cpu", type=int)
    args = ap.parse_args()
    exe = build_reference()
    warmup = max(100, args.samples // 10)
    pinning = pin(args.cpu)  # the reference inherits the affinity
    print(f"pinned: {pinning}; {args.rounds} rounds x {args.samples} samples, warm-up {warmup}")
    try:
        with Kvm() as kvm:
            image = build("bench_out", "long")
            port = image.symbols["PORT_BENCH"]
            for cpl in args.cpl:
                got: dict[str, list[float]] = {"reference": [], "compiled": [], "python": []}

                def reference() -> None:
                    out = subprocess.run([str(exe), "-n", str(args.samples), "-w", str(warmup), "-c", str(cpl)],
                                         capture_output=True, text=True, check=True).stdout
                    got["reference"].append(json.loads(out)["p50_ns"])

                def compiled() -> None:
                    with Machine(image, cpl=cpl, kvm=kvm) as m:
                        runloop.compiled_loop(m.vcpu, warmup, "io", port)
                        got["compiled"].append(p50(runloop.compiled_loop(m.vcpu, args.samples, "io", port).latencies()))

                def python() -> None:
                    with Machine(image, cpl=cpl, kvm=kvm) as m:
                        runloop.python_loop(m.vcpu, warmup, "io", port)
                        got["python"].append(p50(runloop.python_loop(m.vcpu, args.samples, "io", port).latencies()))

                order = [reference, compiled, python]
                for r in range(args.rounds):
                    for f in order[r % 3:] + order[: r % 3]:
                        f()
                print(f"\nport OUT at CPL{cpl}: median of {args.rounds} p50s; the ratio is the median of the "
                      "rounds' own ratios (each round's three runs are close in time)")
                for name, vals in got.items():
                    line = f"  {name:<10} {statistics.median(vals) / 1000:8.3f} us"
                    if name in TARGETS:
                        per_round = sorted(v / rv for v, rv in zip(vals, got["reference"]))
                        ratio = statistics.median(per_round)
                        line += (f"  x{ratio:.3f} of the reference (rounds {per_round[0]:.3f}-{per_round[-1]:.3f}; "
                                 f"target <= {TARGETS[name]:g}x: {'met' if ratio <= TARGETS[name] else 'NOT met'})")
                    print(line)
    finally:
        unpin(pinning)
    return 0


if __name__ == "__main__":
    sys.exit(main())
