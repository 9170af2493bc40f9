#!/usr/bin/env python3
"""Where the BPF watcher's per-exit cost goes: kvmiso's bench_out guest (one port OUT, one
KVM_RUN round trip, per iteration) timed per exit by its Python loop, untraced and under
variants of the watcher's programs, in alternating runs of one process.

    sudo python3 scripts/bench_chain_cost.py [--exits 4000] [--runs 8] [--cpu 1]

Variants (all four watchers attached at once, only the one measured records; the others test
their flag and return):
  off       every program attached, none recording: the perf tracepoint path and a flag test
  records   records into the ring buffer, no call chain (bpf_get_stackid replaced by a constant)
  cached    what `kvmiso trace --pid` runs: records, each chain walked (bpf_get_stackid into the
            stack map) when its path key is new and 1 in 256 times after, else the key's id
  chains    `--every-chain`: records plus bpf_get_stackid on every event
  inline    every chain copied into its record by bpf_get_stack (a stack map of one bucket)
The differences are what a record and what a chain's unwinding cost each exit (about 4 kvm
events per exit here: two kvm_fpu, kvm_pio, kvm_userspace_exit).
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import threading
import time

import kvmiso.observe.tracing.bpfwatch as bpfwatch
from kvmiso.guest import Machine
from kvmiso.observe.tracing.attach import _kvm_events, default_events
from kvmiso.observe.kernel.bpfprog import _GET_STACKID
from kvmiso.observe.tracing.bpfwatch import BpfTracer

MOV_R0_1 = struct.pack("<BBhi", 0xB7, 0, 0, 1)  # r0 = 1: a chain id, no unwinding


def without_chains(*args, **kwargs) -> bytes:
    code = bytearray(EVENT_PROGRAM(*args, **kwargs))
    for at in range(0, len(code), 8):
        if code[at] == 0x85 and struct.unpack_from("<i", code, at + 4)[0] == _GET_STACKID:
            code[at:at + 8] = MOV_R0_1
    return bytes(code)


EVENT_PROGRAM = bpfwatch.event_program


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--exits", type=int, default=4000)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--cpu", type=int, default=1)
    args = ap.parse_args()
    os.sched_setaffinity(0, {args.cpu})
    events = default_events(_kvm_events())
    me = threading.get_native_id()
    tracers = {"cached": BpfTracer(events, pids=[me]), "chains": BpfTracer(events, pids=[me], walk_every_chain=True),
               "inline": BpfTracer(events, pids=[me], stack_buckets=1, walk_every_chain=True)}
    for t in tracers.values():
        t.open()
    bpfwatch.event_program = without_chains
    try:
        tracers["records"] = BpfTracer(events, pids=[me], walk_every_chain=True)
        tracers["records"].open()
    finally:
        bpfwatch.event_program = EVENT_PROGRAM
    per_exit: dict[str, list[float]] = {"off": [], "records": [], "cached": [], "chains": [], "inline": []}
    per_run: dict[str, int] = {}
    try:
        with Machine("bench_out", mode="long") as m:
            def run() -> float:
                t0 = time.perf_counter()
                m.run(max_exits=args.exits, record=False)
                return (time.perf_counter() - t0) / args.exits * 1e6

            run()  # warm-up
            for _ in range(args.runs):
                per_exit["off"].append(run())
                for name in ("records", "cached", "chains", "inline"):
                    t = tracers[name]
                    t.start()
                    per_exit[name].append(run())
                    t.stop()
                    per_run[name] = per_run.get(name, 0) + len(t.decode(t.read_raw()))
        lost = {name: t.lost for name, t in tracers.items()}
    finally:
        for t in tracers.values():
            t.close()
    base = statistics.median(per_exit["off"])
    print(f"{'variant':>8} {'min µs/exit':>12} {'median':>8} {'added':>7} {'events/exit':>12} {'inferred':>9} "
          f"{'lost':>5}   ({args.runs} runs of {args.exits} exits)")
    for name, xs in per_exit.items():
        med = statistics.median(xs)
        events = per_run.get(name, 0) / args.exits / args.runs
        inferred = f"{tracers[name].inferred / per_run[name]:.1%}" if name in tracers else "-"
        print(f"{name:>8} {min(xs):>12.2f} {med:>8.2f} {med - base:>+7.2f} {events:>12.2f} {inferred:>9} "
              f"{lost.get(name, 0):>5}")


if __name__ == "__main__":
    main()
