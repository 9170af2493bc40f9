#!/usr/bin/env python3
"""What watching a VMM costs it: a QEMU guest's progress untraced, under `kvmiso trace --pid`
(its default, BPF with chains walked where an exit's path is new or verified; with
--every-chain; and through tracefs) and under `perf record -e 'kvm:*'` with and without call
chains, in alternating windows of one run.

    sudo python3 scripts/bench_attach.py [--delay 1 1000] [--window 3] [--rounds 3]
        [--watchers none kvmiso kvmiso-every-chain kvmiso-tracefs perf-g perf] [--json FILE]

The guest is tests/guests/multiboot.S built with LOOP: it writes a byte to QEMU's debugcon
(port 0xe9, one KVM_EXIT_IO to QEMU per byte) every DELAY iterations of a dec/jnz loop, for
ever. Its progress is the debugcon file's growth in bytes per second. DELAY=1 is exit-bound
(every exit gives the watcher its kvm events with call chains); DELAY=1000 puts 1,000 loop
iterations of guest work between exits (on kvm_pvm a CPL0 guest's instructions are emulated by
KVM, so that work is in-kernel emulation: 2,000 ``kvm_emulate_insn`` per exit, which perf's
``kvm:*`` records and kvmiso leaves out by default).

Every round measures each watcher once, in an order that rotates from round to round, so that a
noisy neighbour falls on all of them alike. A watched window starts once the watcher records
(kvmiso's BPF ``kvmiso_on`` flag is set, its tracefs instance's tracing_on is 1, perf's events
stopped growing) and ends before the watcher stops. QEMU runs pinned to --qemu-cpu, the
watchers to --watcher-cpu (default: another CPU), so the figure is the cost on the vCPU's own
path rather than two programs sharing a CPU. Lost: kvmiso's lost_events; perf's "lost N
chunks" (each chunk many records) from its summary line.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import re
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from kvmiso.guest.probe import fingerprint, probe
from kvmiso.kvm import Kvm
from kvmiso.observe.kernel.bpf import BPF_MAP_LOOKUP_ELEM, BPF_OBJ_GET_INFO_BY_FD, _bpf
from kvmiso.observe.kernel.bpfprog import SWITCH
from kvmiso.observe.tracing.exitlog import read_jsonl
from kvmiso.observe.foreign.vms import copy_fd, fd_links, pidfd_open
from kvmiso.observe.tracing.tracefsmount import tracefs_root

GUEST = Path(__file__).resolve().parent.parent / "tests" / "guests" / "multiboot.S"
WATCHERS = ("none", "kvmiso", "kvmiso-every-chain", "kvmiso-tracefs", "perf-g", "perf")
KVMISO_OPTIONS = {"kvmiso": [], "kvmiso-every-chain": ["--every-chain"], "kvmiso-tracefs": ["--tracer", "tracefs"]}
READY_TIMEOUT_S = 120  # setting up 90 BPF programs takes seconds on a loaded host


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


def bpf_recording(pid: int) -> bool:
    """Whether kvmiso process ``pid`` has its BPF watcher's ``kvmiso_on`` flag set (read through
    a copy of its map fd)."""
    pidfd = pidfd_open(pid)
    try:
        for fd, link in fd_links(pid).items():
            if link != "anon_inode:bpf-map":
                continue
            copy = copy_fd(pidfd, fd, link)
            if copy is None:
                continue
            try:
                info = ctypes.create_string_buffer(128)
                _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", copy, 128, ctypes.addressof(info)))
                if info.raw[24:40].rstrip(b"\0") != b"kvmiso_on":
                    continue
                key, value = ctypes.c_uint32(0), ctypes.create_string_buffer(SWITCH.size)
                _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("<IIQQQ", copy, 0, ctypes.addressof(key),
                                                      ctypes.addressof(value), 0))
                return SWITCH.unpack(value.raw)[0] == 1
            finally:
                os.close(copy)
    finally:
        os.close(pidfd)
    return False


def perf_events_settled(pid: int, seen: list[int]) -> bool:
    """perf has opened all its events: the count of its perf_event fds stopped growing."""
    n = sum(1 for link in fd_links(pid).values() if link == "anon_inode:[perf_event]")
    seen.append(n)
    return n > 0 and len(seen) >= 4 and seen[-4] == n


def watched_window(watcher: str, qemu: int, con: Path, args: argparse.Namespace, work: Path) -> dict:
    """One window with ``watcher`` attached to QEMU: the guest's rate, and what the watcher saw."""
    pin = ["taskset", "-c", str(args.watcher_cpu)]
    log, data = work / "attached.jsonl", work / "perf.data"
    if watcher.startswith("kvmiso"):
        cmd = [*pin, sys.executable, "-m", "kvmiso.cli", "trace", "--pid", str(qemu), *KVMISO_OPTIONS[watcher],
               "--duration", f"{args.window + 1.5:g}", "--json", str(log)]
    else:
        cmd = [*pin, "perf", "record", "-e", "kvm:*", *(["-g"] if watcher == "perf-g" else []), "-p", str(qemu),
               "-o", str(data)]
    w = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    started, seen = time.monotonic(), []
    instance = tracefs_root() / "instances" / f"kvmiso-{w.pid}" / "tracing_on"

    def ready() -> bool:
        if watcher == "kvmiso-tracefs":
            return instance.exists() and instance.read_text().strip() == "1"
        if watcher.startswith("kvmiso"):
            return bpf_recording(w.pid)
        return perf_events_settled(w.pid, seen)

    try:
        while not ready():
            if w.poll() is not None or time.monotonic() - started > READY_TIMEOUT_S:
                raise SystemExit(f"{watcher} did not start recording: "
                                 f"{w.stderr.read() if w.poll() is not None else 'timeout'}")
            time.sleep(0.05)
        rate = grows(con, args.window)
        if watcher.startswith("perf"):
            w.send_signal(signal.SIGINT)
        _, err = w.communicate(timeout=600)
    finally:
        if w.poll() is None:
            w.kill()
            w.wait()
    if w.returncode not in (0, -signal.SIGINT):  # perf ends by the SIGINT it was sent, re-raised
        raise SystemExit(f"{watcher} failed ({w.returncode}): {err}")
    if watcher.startswith("kvmiso"):
        got = read_jsonl(log)
        span_s = (got.records[-1].end_ns - got.records[0].start_ns) / 1e9 if got.records else 0.0
        events = sum(len(r.events) for r in got.records)
        return {"rate": rate, "events": events, "events_per_s": events / span_s if span_s else 0.0,
                "lost": got.lost_events, "inferred": got.host.get("chains_inferred", 0),
                "mismatches": got.host.get("chain_mismatches", 0)}
    samples = re.search(r"\((\d+) samples\)", err)
    lost = re.search(r"lost (\d+) chunks", err)
    data.unlink(missing_ok=True)
    return {"rate": rate, "events": int(samples.group(1)) if samples else None, "events_per_s": None,
            "lost": f"{lost.group(1)} chunks" if lost else 0}


def measure(delay: int, args: argparse.Namespace, work: Path) -> dict:
    elf, con = image(work, delay), work / f"con{delay}"
    q = subprocess.Popen(["taskset", "-c", str(args.qemu_cpu), shutil.which("qemu-system-x86_64") or "qemu-system-x86_64",
                          "-enable-kvm", "-nodefaults", "-display", "none", "-m", "64", "-kernel", str(elf),
                          "-debugcon", f"file:{con}"], stderr=subprocess.DEVNULL)
    runs: dict[str, list[dict]] = {w: [] for w in args.watchers}
    try:
        deadline = time.monotonic() + 120
        while not (con.exists() and con.stat().st_size > 0):  # past SeaBIOS: the guest prints
            if q.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("QEMU did not start the guest")
            time.sleep(0.1)
        time.sleep(1)
        for r in range(args.rounds):
            order = args.watchers[r % len(args.watchers):] + args.watchers[:r % len(args.watchers)]
            for watcher in order:
                if watcher == "none":
                    runs[watcher].append({"rate": grows(con, args.window), "events": 0, "lost": 0})
                else:
                    runs[watcher].append(watched_window(watcher, q.pid, con, args, work))
                print(f"  DELAY {delay} round {r + 1} {watcher:>18}: {runs[watcher][-1]['rate']:>9.0f} B/s", file=sys.stderr)
                time.sleep(0.5)
    finally:
        q.kill()
        q.wait()
    base = statistics.median(x["rate"] for x in runs["none"]) if runs.get("none") else None
    out = {}
    for watcher, xs in runs.items():
        median = statistics.median(x["rate"] for x in xs)
        out[watcher] = {"windows": xs, "median": median, "share": median / base if base else None}
    return {"delay": delay, "watchers": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--delay", type=int, nargs="+", default=[1, 1000])
    ap.add_argument("--window", type=float, default=3.0, help="seconds per measured window")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--watchers", nargs="+", choices=WATCHERS, default=list(WATCHERS))
    ap.add_argument("--qemu-cpu", type=int, default=1)
    ap.add_argument("--watcher-cpu", type=int, default=None, help="default: another CPU than QEMU's")
    ap.add_argument("--json", help="write the results here")
    args = ap.parse_args()
    if args.watcher_cpu is None:
        args.watcher_cpu = next(c for c in sorted(os.sched_getaffinity(0)) if c != args.qemu_cpu)
    if any(w.startswith("perf") for w in args.watchers) and shutil.which("perf") is None:
        print("perf is not installed: measuring without it", file=sys.stderr)
        args.watchers = [w for w in args.watchers if not w.startswith("perf")]
    with Kvm() as kvm:  # first: a host kvmiso cannot probe fails before minutes of measuring
        host = fingerprint(probe(kvm))
    results = []
    with tempfile.TemporaryDirectory(prefix="kvmiso-bench-attach-") as d:
        for delay in args.delay:
            results.append(measure(delay, args, Path(d)))
    print(f"{'DELAY':>5} {'watcher':>18} {'B/s per window':>28} {'median':>8} {'share':>7} {'events/s':>9} "
          f"{'inferred':>8} {'lost':>10}   ({args.rounds} rounds of {args.window:g} s windows)")
    for r in results:
        for watcher, x in r["watchers"].items():
            rates = " ".join(f"{w['rate']:.0f}" for w in x["windows"])
            ev = [w["events_per_s"] for w in x["windows"] if w.get("events_per_s")]
            lost = [w["lost"] for w in x["windows"]]
            events = sum(w.get("events") or 0 for w in x["windows"])
            inferred = sum(w.get("inferred", 0) for w in x["windows"])
            print(f"{r['delay']:>5} {watcher:>18} {rates:>28} {x['median']:>8.0f} "
                  f"{100 * x['share']:>6.1f}% {statistics.median(ev) if ev else 0:>9.0f} "
                  f"{f'{inferred / events:.0%}' if inferred else '-':>8} {','.join(str(v) for v in lost):>10}")
    if args.json:
        Path(args.json).write_text(json.dumps({"host": host, "args": vars(args), "results": results},
                                              indent=1) + "\n")


if __name__ == "__main__":
    main()
