#!/usr/bin/env python3
"""Cut a ``kvmiso record`` folder down to what its runs need, for a test fixture.

Kept: the windows and marks from the first run's mark on (the probe ``kvmiso record`` runs
before it is nobody's); the kallsyms lines that name an instruction of those windows or a
return address of the traced logs (with the next code symbol, which sizes it), a global or
per-CPU variable they touch, the image's and each module's first and last symbol (their spans);
the manifest, evidence, exit logs, modules and fields as they are. Every byte kept is the
record's own: nothing is made up.

    python3 scripts/trim_record.py /tmp/rec tests/fixtures/record/portio-hlt
"""

from __future__ import annotations

import argparse
import bisect
import shutil
from pathlib import Path

from kvmiso.observe.accesses.accessrecord import ACCESS, FILE_HEADER, WINDOW_HEADER, read_record
from kvmiso.observe.tracing.exitlog import read_jsonl
from kvmiso.observe.kernel.kallsyms import START_KERNEL_MAP
from kvmiso.observe.accesses.recordruns import FIELDS, MANIFEST, START_MARK, read_runs


def trim_vcpu_file(src: Path, dst: Path, first_order: int) -> None:
    """Copy ``src`` keeping the windows and marks at or after ``first_order``."""
    data = src.read_bytes()
    out = bytearray(data[:FILE_HEADER.size])
    off = FILE_HEADER.size
    while off < len(data):
        head = WINDOW_HEADER.unpack_from(data, off)
        end = off + WINDOW_HEADER.size + head[6] * ACCESS.size
        if head[-1] >= first_order:
            out += data[off:end]
        off = end
    dst.write_bytes(bytes(out))


def needed_lines(directory: Path, first_order: int) -> set[int]:
    """Indexes of the kallsyms lines the kept windows and the traced logs need."""
    rec, runs = read_record(directory), read_runs(directory)
    lines = (directory / "kallsyms").read_text().splitlines()
    rows = []
    for n, line in enumerate(lines):
        parts = line.split()
        rows.append((int(parts[0], 16), parts[1], parts[2], parts[3] if len(parts) > 3 else "", n))
    code = sorted(r for r in rows if r[1] in "TtWw" and not r[2].startswith("__pfx_"))
    data = sorted(r for r in rows if r[1] in "DdBbRr" and r[0] >= START_KERNEL_MAP)
    pcpu = sorted(r for r in rows if r[1] in "Aa" and not r[3] and r[0] < START_KERNEL_MAP)
    keep: set[int] = set()

    def around(table: list, addr: int, with_next: bool) -> None:
        i = bisect.bisect_right([r[0] for r in table], addr) - 1
        if i >= 0:
            keep.add(table[i][4])
            if with_next and i + 1 < len(table):
                keep.add(table[i + 1][4])

    pcs, addrs = set(), set()
    for w in rec.windows:
        if w.order >= first_order:
            pcs.update(a.pc for a in w.accesses)
            addrs.update(a.addr for a in w.accesses)
    for r in runs.runs:
        if r.log:
            pcs.update(a for _, e in read_jsonl(runs.path(r.log)).events() for a in e.stack)
    for pc in pcs:
        around(code, pc, True)
    for a in addrs:
        if a >= START_KERNEL_MAP:
            around(data, a, False)
    for r in pcpu:  # per-CPU variables are few: all of them (they name offsets in any unit)
        keep.add(r[4])
    for name in ("_text", "_stext", "_etext", "_end", "__per_cpu_start", "__per_cpu_end"):
        keep.update(r[4] for r in rows if r[2] == name and not r[3])
    image = [r for r in rows if not r[3] and r[0] >= START_KERNEL_MAP]
    keep.update((min(image)[4], max(image)[4]))
    for module in {r[3] for r in rows if r[3]}:
        mine = [r for r in rows if r[3] == module and r[0] >= START_KERNEL_MAP]
        keep.update((min(mine)[4], max(mine)[4]))
    return keep


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", type=Path)
    ap.add_argument("out", type=Path)
    args = ap.parse_args()
    rec = read_record(args.record)
    first = next(m.order for m in rec.marks if m.id == START_MARK)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "runs").mkdir(exist_ok=True)
    for f in args.record.glob("vcpu*.rec"):
        trim_vcpu_file(f, args.out / f.name, first)
    lines = (args.record / "kallsyms").read_text().splitlines()
    keep = needed_lines(args.record, first)
    (args.out / "kallsyms").write_text("".join(lines[n] + "\n" for n in sorted(keep)))
    for name in (MANIFEST, FIELDS, "modules"):
        shutil.copyfile(args.record / name, args.out / name)
    for f in (args.record / "runs").iterdir():
        shutil.copyfile(f, args.out / "runs" / f.name)
    print(f"{args.out}: {len(keep)} of {len(lines)} kallsyms lines; "
          f"{sum(f.stat().st_size for f in args.out.rglob('*') if f.is_file()) / 1e6:.2f} MB")


if __name__ == "__main__":
    main()
