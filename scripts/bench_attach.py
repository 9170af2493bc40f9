#!/usr/bin/env python3
"""What `kvmiso trace --pid` costs the VMM it watches: a QEMU guest's progress with and without
kvmiso attached.

    sudo python3 scripts/bench_attach.py [--delay 1 1000] [--window 3] [--rounds 5] [--json FILE]

The guest is tests/guests/multiboot.S built with LOOP: it writes a byte to QEMU's debugcon
(port 0xe9, one KVM_EXIT_IO to QEMU per byte) every DELAY iterations of a dec/jnz loop, for
ever. Its progress is the debugcon file's growth in bytes per second. DELAY=1 is exit-bound
(every exit gives kvmiso kvm events with call chains), larger delays are mostly guest work.

Rounds alternate an untraced window and a traced one (the order swaps every round): the traced
window starts once `kvmiso trace --pid QEMU` has its tracefs instance and tracing is on, and
ends before kvmiso's --duration does. QEMU runs pinned to --qemu-cpu, kvmiso to --kvmiso-cpu
(default: the other CPU), so the figure is the kernel-side cost on the vCPU's own path rather
than two programs sharing a CPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmiso.guest.probe import fingerprint, probe
from kvmiso.kvm import Kvm
from kvmiso.observe.tracing.exitlog import read_jsonl
from kvmiso.observe.tracing.tracefsmount import tracefs_root

GUEST = Path(__file__).resolve().parent.parent / "tests" / "guests" / "multiboot.S"


def image(work: Path, delay: int) -> Path:
    obj, elf = work / f"loop{delay}.o", work / f"loop{delay}.elf"
    subprocess.run(["as", "--32", "--defsym=LOOP=1", f"--defsym=DELAY={delay}", "-o", str(obj), str(GUEST)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-o", str(elf), str(obj)], check=True)
    return elf


def grows(path: Path, seconds: float) -> float:
    """Bytes per second ``path`` grows by over ``seconds``."""
    s0, t0 = path.stat().st_size, time.monotonic()
    time.sleep(seconds)
    s1, t1 = path.stat().st_size, time.monotonic()
    return (s1 - s0) / (t1 - t0)


def traced_window(qemu: int, con: Path, window: float, cpu: int, work: Path) -> dict:
    """One window with `kvmiso trace --pid` attached: the guest's rate, and what kvmiso saw."""
    log = work / "attached.jsonl"
    k = subprocess.Popen(["taskset", "-c", str(cpu), sys.executable, "-m", "kvmiso.cli", "trace", "--pid", str(qemu),
                          "--duration", f"{window + 1.5:g}", "--json", str(log)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    on = tracefs_root() / "instances" / f"kvmiso-{k.pid}" / "tracing_on"
    deadline = time.monotonic() + 60
    while not (on.exists() and on.read_text().strip() == "1"):
        if k.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"kvmiso trace --pid did not start tracing: {k.stderr.read() if k.poll() is not None else 'timeout'}")
        time.sleep(0.01)
    rate = grows(con, window)
    _, err = k.communicate(timeout=120)
    if k.returncode != 0:
        raise SystemExit(f"kvmiso trace --pid failed ({k.returncode}): {err}")
    got = read_jsonl(log)
    span_s = (got.records[-1].end_ns - got.records[0].start_ns) / 1e9 if got.records else 0.0
    return {"rate": rate, "records": len(got.records), "events": sum(len(r.events) for r in got.records),
            "lost": got.lost_events, "span_s": span_s}


def measure(delay: int, args: argparse.Namespace, work: Path) -> dict:
    elf, con = image(work, delay), work / f"con{delay}"
    q = subprocess.Popen(["taskset", "-c", str(args.qemu_cpu), shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
                          "-enable-kvm", "-nodefaults", "-display", "none", "-m", "64", "-kernel", str(elf),
                          "-debugcon", f"file:{con}"], stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while not (con.exists() and con.stat().st_size > 0):  # past SeaBIOS: the guest prints
            if q.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("QEMU did not start the guest")
            time.sleep(0.1)
        time.sleep(1)
        plain, traced = [], []
        for r in range(args.rounds):
            for which in (("plain", "traced") if r % 2 == 0 else ("traced", "plain")):
                if which == "plain":
                    plain.append(grows(con, args.window))
                else:
                    traced.append(traced_window(q.pid, con, args.window, args.kvmiso_cpu, work))
                time.sleep(0.5)
    finally:
        q.kill()
        q.wait()
    p50, t50 = statistics.median(plain), statistics.median(t["rate"] for t in traced)
    return {"delay": delay, "plain_bytes_per_s": plain, "traced": traced, "plain_median": p50, "traced_median": t50,
            "slowdown_pct": 100 * (1 - t50 / p50) if p50 else None}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--window", type=float, default=3.0, help="seconds per measured window")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--qemu-cpu", type=int, default=1)
    ap.add_argument("--kvmiso-cpu", type=int, default=None, help="default: another CPU than QEMU's")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.kvmiso_cpu is None:
        args.kvmiso_cpu = next(c for c in sorted(os.sched_getaffinity(0)) if c != args.qemu_cpu)
    with Kvm() as kvm:  # first: a host kvmiso cannot probe fails before minutes of measuring
        host = fingerprint(probe(kvm))
    results = []
    with tempfile.TemporaryDirectory(prefix="kvmiso-bench-attach-") as d:
        for delay in args.delay:
            results.append(measure(delay, args, Path(d)))
    print(f"{'DELAY':>7} {'untraced B/s':>13} {'traced B/s':>11} {'slowdown':>9} {'events/s':>9} {'lost':>6}"
          f"   (median of {args.rounds} windows of {args.window:g} s)")
    for r in results:
        ev = statistics.median(t["events"] / t["span_s"] for t in r["traced"] if t["span_s"])
        lost = sum(t["lost"] for t in r["traced"])
        print(f"{r['delay']:>7} {r['plain_median']:>13.0f} {r['traced_median']:>11.0f} {r['slowdown_pct']:>8.1f}% "
              f"{ev:>9.0f} {lost:>6}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "args": vars(args), "results": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
