#!/usr/bin/env python3
"""The full benchmark sweep behind the README's table: `kvmiso bench` at CPL0 and CPL3, the
reference C program beside the compiled loop, and the table as Markdown with the date, the
host fingerprint and the commands that made it.

    python3 scripts/bench_sweep.py [--samples 5000] [--runs 5] [--out bench-out]
    python3 scripts/bench_sweep.py --markdown bench-out/bench.json   # re-render only

Run it on a quiet host: every row flagged unstable or disturbed is a reason to run it again.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from kvmiso.bench.results import load, python_overhead

HERE = Path(__file__).resolve().parent


def us(ns: float | None) -> str:
    return "-" if ns is None else f"{ns / 1000:.2f}"


def markdown(data: dict, ref_text: str = "") -> str:
    """The README table: one line per kind and CPL, the paths side by side (p50, µs)."""
    rows: dict[tuple, dict] = {}
    for r in data["results"]:
        rows.setdefault((r["kind"], r["cpl"]), {})[r["path"]] = r
    h = data["host"]
    out = [f"Measured {data['created']} with `{data['settings'].get('command', 'kvmiso bench')}`"
           + ("" if data.get("complete", True) else f" (INCOMPLETE: {data.get('incomplete_reason')})") + ".",
           "",
           f"Host: {h['cpu']} ({h['cpus']} CPUs), kernel {h['kernel']}, {h['vendor']} (CPL0 {h['cpl0']}, "
           f"CPL3 {h['cpl3']}){', itself under a hypervisor' if h.get('under_hypervisor') else ''}, pinned: {h['pinning'].get('cpu') if h['pinning'].get('pinned') else 'no'}, "
           f"governor: {h['governor']}.",
           "",
           "| kind | CPL | compiled loop p50 (µs) | Python API p50 (µs) | Python adds (ns) | Python / compiled "
           "| guest-timed p50 (µs) | insn/iter | emulated/iter | x null ioctl | notes |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    overhead = {(o["kind"], o["cpl"]): o for o in python_overhead(data["results"])}
    for (kind, cpl), paths in rows.items():
        main = paths.get("c") or paths.get("host") or paths.get("python")
        notes = sorted({w.split(":")[0] for p in paths.values() for w in p["warnings"]})
        if main.get("iterations", 1) > 1:
            notes.insert(0, f"per iteration, {main['iterations']} in one KVM_RUN")
        eps = main.get("extra", {}).get("exits_per_s")
        if eps:
            notes.insert(0, f"{sum(eps) / len(eps):,.0f} exits/s")
        c = paths.get("c") or paths.get("host")
        emulated = main.get("emulated")
        o = overhead.get((kind, cpl))
        added, ratio = ("-", "-") if o is None else (f"{o['added_ns']:+.0f}", f"{o['ratio']:.3f}x")
        out.append(f"| {kind} | {'-' if cpl is None else cpl} | {us(c['summary']['p50'] if c else None)} | "
                   f"{us(paths['python']['summary']['p50'] if 'python' in paths else None)} | {added} | {ratio} | "
                   f"{us(paths['guest']['summary']['p50'] if 'guest' in paths else None)} | {main.get('insns') or '-'} | "
                   f"{'-' if emulated is None else f'{emulated:.2f}'} | "
                   f"{main['ratio_to_floor']:.1f} | {'; '.join(notes)} |")
    for s in data["skipped"]:
        out.append(f"\nSkipped {s['kind']} at CPL{s['cpl']}: {s['reason']}.")
    if ref_text:
        out += ["", "Port OUT against the plain C reference (`python3 scripts/ref_runloop.py`):", "", "```",
                ref_text.strip(), "```"]
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=5000)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", default="bench-out", help="directory for bench.json, ref.txt and table.md")
    ap.add_argument("--markdown", metavar="FILE", help="only render an existing result file")
    args = ap.parse_args()
    if args.markdown:
        print(markdown(load(args.markdown)))
        return 0
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "kvmiso.cli", "bench", "--cpl", "0", "3", "--samples", str(args.samples),
                    "--runs", str(args.runs), "--json", str(out / "bench.json")], check=True)
    ref = subprocess.run([sys.executable, str(HERE / "ref_runloop.py")], check=True, capture_output=True, text=True).stdout
    (out / "ref.txt").write_text(ref)
    table = markdown(load(out / "bench.json"), ref)
    (out / "table.md").write_text(table + "\n")
    print(f"\n{table}\n\nwrote {out / 'table.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
