#!/usr/bin/env python3
"""Draft access.toml entries from an access record (``kvmiso record``), for a person to review.

For every function the record shows touching memory in the exits' own handling that access.toml
does not know, an entry with the objects its own instructions touched (in the order it first
touched them) and the source line that defines it in the kernel tree given (``--source``: the
exact source of the recorded kernel, e.g. Debian's linux-source-6.1 for 6.1.192). For every
known function the record contradicts, a ``measured = { "VENDOR@SERIES" = [...] }`` line. For
every exit kind, the functions from its handler on, ordered by where they first touch memory
(the median over the kind's windows) and kept where they ran in at least ``--share`` of them: a
draft ``[[exit_path]]`` measured on that kernel series.

What it prints is a draft: the objects are measured, the citations are where each function is
defined; what the source says about each object is the reviewer's to add.

    python3 scripts/draft_access_entries.py /tmp/rec --source /work/src/linux-source-6.1 --series 6.1
"""

from __future__ import annotations

import argparse
import re
import statistics
from collections import defaultdict
from pathlib import Path

from kvmiso.isolation import load_access_model
from kvmiso.session.measuredcheck import measure_record
from kvmiso.observe.accesses.accessrecord import read_record
from kvmiso.observe.accesses.recordruns import read_runs

_C_DEF = re.compile(r"^(?!static_assert|#|\s)[\w\s\*]*?\b(\w+)\(")
_ASM_DEF = re.compile(r"^SYM_(?:FUNC_START|CODE_START|INNER_LABEL)\w*\((\w+)")
_OBJ = re.compile(r"^obj-\$\((CONFIG_\w+)\)\s*[+:]?=\s*(.*)$")
_FNAME = {"paging64_": "paging_tmpl.h", "paging32_": "paging_tmpl.h", "ept_": "paging_tmpl.h"}
FOR_THE_VMM = ("kvm_run_page", "pio_data")
ORDER = ("arch/x86/kvm/", "virt/kvm/", "arch/x86/", "mm/", "kernel/", "lib/", "include/", "fs/", "security/")


def unbuilt(root: Path, config: Path | None) -> set[str]:
    """Files the kernel's config leaves out: ``obj-$(CONFIG_X) += f.o`` in their folder's Makefile
    with CONFIG_X not set (srcutiny.c beside srcutree.c, slab.c beside slub.c)."""
    if config is None:
        return set()
    on = {line.split("=", 1)[0] for line in config.read_text().splitlines() if line.startswith("CONFIG_")}
    maybe, built = set(), set()
    for mk in root.rglob("Makefile"):
        for line in mk.read_text(errors="replace").splitlines():
            m = _OBJ.match(line)
            if m:  # a file listed under several options is built when any of them is set
                files = {str((mk.parent / o).with_suffix(".c").relative_to(root)) for o in m.group(2).split()
                         if o.endswith(".o")}
                (built if m.group(1) in on else maybe).update(files)
    return maybe - built


def _is_definition(lines: list[str], i: int) -> bool:
    """Does the signature starting at line ``i`` open a body before it ends with ';'?"""
    for line in lines[i:i + 8]:
        if "{" in line:
            return True
        if line.rstrip().endswith(";"):
            return False
    return False


def definitions(root: Path, wanted: set[str], config: Path | None = None) -> dict[str, str]:
    """Where each wanted function is defined: ``file:line`` under ``root`` (the kernel tree): in
    a built .c or .S file before a header (a function with a symbol of its own is out of line),
    then KVM's files before arch/x86, mm, kernel, lib."""
    found: dict[str, list[str]] = defaultdict(list)
    skip = unbuilt(root, config)
    for path in sorted(root.rglob("*")):
        if path.suffix not in (".c", ".h", ".S") or not path.is_file():
            continue
        rel = str(path.relative_to(root))
        if rel in skip:
            continue
        lines = path.read_text(errors="replace").splitlines()
        for n, line in enumerate(lines, 1):
            m = _ASM_DEF.match(line)
            if m is None and not line.rstrip().endswith(";"):
                m = _C_DEF.match(line)
                m = m if m and m.group(1) in wanted and _is_definition(lines, n - 1) else None
            if m and m.group(1) in wanted:
                found[m.group(1)].append(f"{rel}:{n}")
    for fn in wanted - set(found):  # paging_tmpl.h's FNAME(x) makes paging64_x, paging32_x, ept_x
        for prefix, tmpl in _FNAME.items():
            if fn.startswith(prefix):
                hit = next((p for p in root.rglob(tmpl)), None)
                if hit:
                    for n, line in enumerate(hit.read_text().splitlines(), 1):
                        if f"FNAME({fn[len(prefix):]})(" in line and not line.rstrip().endswith(";"):
                            found[fn].append(f"{hit.relative_to(root)}:{n}")
    def rank(p: str) -> tuple[int, int]:
        return (p.split(":")[0].endswith(".h"), next((i for i, o in enumerate(ORDER) if p.startswith(o)), 99))

    return {fn: sorted(places, key=rank)[0] for fn, places in found.items()}


def touches(fn: str, objects: dict[str, dict[str, None]], in_kernel: dict[str, set[str]], ran: set[str]) -> list[str]:
    """The measured objects, ``@userspace`` on the VMM's pages (kvm_run, pio_data) where only
    exits to userspace touched them, by a function that also ran in exits handled in the kernel
    (access.toml's meaning of the mark: filled in for the VMM)."""
    return [o + ("@userspace" if o in FOR_THE_VMM and fn in ran and o not in in_kernel[fn] else "") for o in objects[fn]]


def member_text(members: dict[str, dict[str, None]]) -> str:
    """`` Members: vcpu_struct (vcpu.arch.regs[], ...); ...`` from BTF, where the record named them."""
    parts = [f"{obj} ({', '.join(list(ms)[:3])})" for obj, ms in members.items() if ms]
    return f" Members: {'; '.join(parts)}." if parts else ""


def toml_list(items: list[str]) -> str:
    """A TOML array of strings."""
    return "[" + ", ".join(f'"{x}"' for x in items) + "]"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("record", help="a kvmiso record folder")
    ap.add_argument("--source", required=True, help="the recorded kernel's source tree")
    ap.add_argument("--series", required=True, help="the kernel series measured (6.1)")
    ap.add_argument("--version", default="", help="how to name the source in citations")
    ap.add_argument("--config", type=Path, help="the recorded kernel's config: files it does not build are not cited")
    ap.add_argument("--share", type=float, default=0.5, help="exit paths: keep functions in this share of windows")
    args = ap.parse_args()
    model = load_access_model()
    record, runs = read_record(args.record), read_runs(args.record)
    res = measure_record(record, runs, model)
    rows = res.table.rows()
    vendor = runs.vendor
    objects: dict[str, dict[str, None]] = defaultdict(dict)
    in_kernel: dict[str, set[str]] = defaultdict(set)  # objects touched in some exit handled in the kernel
    ran_in_kernel: set[str] = set()
    kinds: dict[str, dict[str, int]] = defaultdict(dict)
    unplaced: dict[str, int] = defaultdict(int)
    modules: dict[str, str] = {}
    members: dict[str, dict[str, dict[str, None]]] = defaultdict(lambda: defaultdict(dict))
    for r in rows:
        objects[r.function].update(dict.fromkeys(o for o in r.hit + r.unpredicted if o != "cpu_entry_area"))
        if r.kernel_windows:
            in_kernel[r.function] |= set(r.hit + r.unpredicted) - set(r.userspace_only)
            ran_in_kernel.add(r.function)
        kinds[r.function][r.kind] = kinds[r.function].get(r.kind, 0) + r.windows
        unplaced[r.function] += r.unplaced
        modules[r.function] = r.module
        for obj, member, _ in r.members:
            members[r.function][obj][member] = None
    where = definitions(Path(args.source), {r.function for r in rows}, args.config)
    source = args.version or f"Linux {args.series}"
    print(f"# drafted from {args.record} ({len(runs.runs)} runs, kernel {runs.kernel}) against {source}\n")
    for fn in dict.fromkeys(r.function for r in rows if not r.known):
        cite = (f"{where[fn]} ({source}): definition" if fn in where else f"not found in {source}'s tree (generated)")
        seen = ", ".join(f"{k} {n}" for k, n in kinds[fn].items())
        note = f"Measured on {runs.kernel} ({vendor}): its own instructions in exits of kind {seen} (windows)."
        note += member_text(members[fn])
        if unplaced[fn]:
            note += f" Plus {unplaced[fn]} accesses to addresses no object of the evidence covers."
        print(f'[[function]]\nname = "{fn}"\ntouches = {toml_list(touches(fn, objects, in_kernel, ran_in_kernel))}\ncite = "{cite}"\n'
              f'note = "{note}"\n')
    touched = {(r.function, o) for r in rows for o in r.hit + r.unpredicted}
    for fn in dict.fromkeys(r.function for r in rows if r.known and (r.unpredicted or r.untouched)):
        extra = sorted({o for r in rows if r.function == fn for o in r.unpredicted})
        never = sorted({o for r in rows if r.function == fn for o in r.untouched if (fn, o) not in touched})
        said = "; ".join(x for x in (f"touched, not predicted: {', '.join(extra)}" if extra else "",
                                     f"predicted, never touched: {', '.join(never)}" if never else "") if x)
        print(f'[[measured]]\nname = "{fn}"\nvendor = "{vendor}"\nkernel = "{args.series}"\n'
              f'touches = {toml_list(touches(fn, objects, in_kernel, ran_in_kernel))}\n'
              f'cite = "RECORD: exits of kind {", ".join(f"{k} {n}" for k, n in kinds[fn].items())} (windows)"\n'
              f'note = "The record against the entry: {said}.{member_text(members[fn])} WHY"\n')
    for kind, order in exit_paths(res, args.share).items():
        print(f'\n[[exit_path]]\nvendor = "{vendor}"\nreason = "{kind}"\nkernel = "{args.series}"\n'
              f'functions = {toml_list(order)}')


def exit_paths(res, share: float) -> dict[str, list[str]]:
    """Per exit kind: the functions from the handler on, by median first-access index, kept where
    they ran in at least ``share`` of the kind's windows."""
    firsts: dict[str, dict[str, list[int]]] = defaultdict(lambda: defaultdict(list))
    count: dict[str, int] = defaultdict(int)
    for _, p in res.windows():
        path = p.window
        count[path.kind] += 1
        start = next((i for i, s in enumerate(path.sites) if s.function == path.handler), 0)
        seen: set[str] = set()
        for n, i in enumerate(k for k in path.in_exit() if k >= start):
            fn = path.sites[i].function
            if fn not in seen:
                seen.add(fn)
                firsts[path.kind][fn].append(n)
    return {kind: sorted((fn for fn, xs in fns.items() if len(xs) >= share * count[kind]),
                         key=lambda fn: statistics.median(fns[fn])) for kind, fns in firsts.items()}


if __name__ == "__main__":
    main()
