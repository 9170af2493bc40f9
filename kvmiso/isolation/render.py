"""Text and JSON views of a model and a check result: ``kvmiso model`` and ``kvmiso check``.

Every line says where its address came from; a modeled one says ``modeled``.
"""

from __future__ import annotations

from typing import Any

from .checkresult import CheckResult
from .layout import PAGE
from .mapset import DenylistSpace, KvmAddressSpace
from .pagetable import LEVEL_NAMES

_LEAF = {1: "4K", 2: "2M", 3: "1G"}


def chain_inference_note(host: dict[str, Any]) -> str:
    """What the verdicts rest on when the BPF watcher inferred chains, from its log's ``host``:
    how many events took the chain of their path key, how often a key is walked to verify it
    (``chains_verify_every``), and how many walks disagreed."""
    every = host.get("chains_verify_every")
    sampled = f"1 in {every} times after" if every else "sampled after"
    mismatches = host.get("chain_mismatches", 0)
    note = (f"{host['chains_inferred']} events' call chains inferred from their exit's path (the BPF watcher walks "
            f"a path's chain when new and {sampled}): {mismatches} walks disagreed")
    if mismatches:
        note += (" (each such path took the walked chain and was walked again on its next repeats; an event "
                 "inferred on it, before or since, may carry another path's chain: --every-chain walks them all)")
    return note


def size_text(n: int) -> str:
    """``n`` bytes for people: ``2 MiB``, ``50.28 KiB``."""
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} B"


def _leaf(space: KvmAddressSpace | DenylistSpace, addr: int) -> str:
    try:
        steps = space.kernel.walk(addr)
    except (ValueError, KeyError):
        return "?"
    last = steps[-1]
    return _LEAF.get(last.level, LEVEL_NAMES[last.level]) if last.leaf else "none"


def model_summary(space: KvmAddressSpace | DenylistSpace) -> dict[str, Any]:
    """Regions (mapping-set rows for an allowlist), every object with its leaf and whether the
    isolated space maps it, and what the isolated space adds up to."""
    lay = space.layout
    rows = []
    for spec in space.regions:
        regs = lay.matching(spec.layout or spec.name)
        if not regs:
            continue
        exposed, own = space.exposed(spec.name)
        first = regs[0]
        rows.append({"name": spec.name, "start": first.start, "size": own, "source": first.source,
                     "modeled": any(r.modeled for r in regs) or bool(spec.assumed), "assumed": spec.assumed,
                     "leaf_level": _leaf(space, first.start) if first.kind in ("object", "user") else "-",
                     "copy_level": spec.level, "exposed_bytes": exposed,
                     "other_pages": max(0, exposed - _pages(regs)) // PAGE, "allocator": first.allocator,
                     "cite": spec.cite, "ranges": sum(len(r.ranges) for r in regs)})
    objects = []
    for r in lay.regions.values():
        if r.kind not in ("object", "user"):
            continue
        for i, (s, e) in enumerate(r.ranges):
            objects.append({"name": r.name, "index": i, "start": s, "size": e - s, "source": r.source,
                            "modeled": r.modeled, "allocator": r.allocator, "leaf_level": _leaf(space, s),
                            "mapped": space.mapped(s), "sensitive": space.sensitive(s)})
    kern = space.kernel.mapped_bytes()
    mapped = space.mapped_bytes()
    # the figure: distinct physical bytes (a page mapped at many addresses counts once), beside
    # the bytes of address space each side maps
    phys, kern_phys = space.physical_bytes(), space.kernel.physical_bytes()
    p = space.policy
    return {"policy": p.name, "policy_title": p.title, "mapping": p.mapping, "policy_enter": p.enter,
            "policy_leave": p.leave_text, "policy_cite": p.cite, "vendor": lay.vendor, "evidence": lay.source,
            "real": lay.real, "levels": lay.levels, "regions": rows, "objects": objects, "missing": space.missing,
            "isolated_physical_bytes": phys, "kernel_physical_bytes": kern_phys,
            "share_of_kernel_physical": phys / kern_phys if phys is not None and kern_phys else None,
            "unread_bytes": sum(e - s for s, e in getattr(space, "unread", [])),
            "isolated_mapped_bytes": mapped, "kernel_mapped_bytes": kern,
            "kernel_mapped_source": "the live table, counted leaf by leaf" if lay.real else "modeled table",
            "share_of_kernel_mapped": mapped / kern if kern else 0.0,
            "checks": [{"what": w, "agreed": ok, "detail": d} for w, ok, d in lay.evidence.checks],
            "facts": {k: {"value": v, "source": src} for k, (v, src) in lay.evidence.facts.items()},
            "notes": lay.notes + list(getattr(space, "notes", []))}


def _pages(regions) -> int:
    return sum(((e + PAGE - 1) & ~(PAGE - 1)) - (s & ~(PAGE - 1)) for r in regions for s, e in r.ranges)


def model_text(space: KvmAddressSpace | DenylistSpace) -> str:
    """``kvmiso model``: the regions, each object with its leaf and whether it is mapped, the totals."""
    s = model_summary(space)
    out = [f"{s['policy']} ({s['policy_title']}, {s['mapping']}) on {s['vendor']}; objects and page table: "
           f"{s['evidence']}",
           f"  enter: {s['policy_enter']}", f"  leave: {s['policy_leave']}", ""]
    if s["regions"]:
        out.append(f"{'region':<16} {'start':<18} {'size':>10} {'leaf':>4} {'copy':>4} {'exposed':>10} "
                   f"{'others':>7}  allocator / source")
        for r in s["regions"]:
            src = ("MODELED " if r["modeled"] and not r["assumed"] else "") + r["source"]
            src += f" (MODELED: {r['assumed']})" if r["assumed"] else ""
            out.append(f"{r['name']:<16} {r['start']:#018x} {size_text(r['size']):>10} {r['leaf_level']:>4} "
                       f"{r['copy_level']:>4} {size_text(r['exposed_bytes']):>10} {r['other_pages']:>7}  "
                       f"{r['allocator'] or '-'}; {src}")
        out.append("")
    out.append("objects of this VM and whether the isolated space maps them:")
    for o in s["objects"]:
        state = "mapped" if o["mapped"] else ("SENSITIVE" if o["sensitive"] else "not mapped")
        idx = f"[{o['index']}]" if o["index"] else ""
        out.append(f"  {o['name'] + idx:<22} {o['start']:#018x} {size_text(o['size']):>9} leaf {o['leaf_level']:>4} "
                   f"{state:<10} {o['allocator'] or '-'}; {'MODELED ' if o['modeled'] else ''}{o['source']}")
    out += ["", figure_text(s)]
    out += [f"not in this layout: {m}" for m in s["missing"]]
    out += [f"cross-check {'agreed' if c['agreed'] else 'FAILED'}: {c['what']} ({c['detail']})" for c in s["checks"]]
    out += [f"note: {n}" for n in s["notes"]]
    return "\n".join(out)


def figure_text(s: dict[str, Any]) -> str:
    """The mapped-size line of a :func:`model_summary`: distinct physical bytes first (a page
    mapped at many addresses, as ESPFIX's, counts once), then bytes of address space."""
    phys, kern = s["isolated_physical_bytes"], s["kernel_physical_bytes"]
    if phys is None:
        line = "the isolated space maps distinct physical memory this evidence cannot count"
    else:
        line = f"the isolated space maps {size_text(phys)} of distinct physical memory"
    if kern:
        line += f" of the {size_text(kern)} behind the kernel half ({s['kernel_mapped_source']})"
    else:
        line += " (the kernel half's is not in this evidence: it predates that count)"
    if s["share_of_kernel_physical"] is not None:
        line += f": {100 * s['share_of_kernel_physical']:.2f}%"
    line += (f"; of address space, {size_text(s['isolated_mapped_bytes'])} of "
             f"{size_text(s['kernel_mapped_bytes'])}: {100 * s['share_of_kernel_mapped']:.2f}%")
    if s["unread_bytes"]:
        line += f" (not counted: {size_text(s['unread_bytes'])} under table pages the evidence did not read)"
    return line


def result_text(res: CheckResult, title: str = "", stack: bool = False) -> str:
    """``kvmiso check``: classes, faults in the RFC's format, unknown functions, switches, cost."""
    c = res.classes
    out = [f"{title}{res.runs} KVM_RUN calls, {res.exits} exits checked, policy {res.policy}: "
           f"{c['kvm_mm']} stay isolated, {c['host_mm']} switch, {c['fault']} fault, {c['unknown']} unknown "
           f"({c['outside']} events outside the isolated window, {c['not_kvm_run']} not on the KVM_RUN path)"]
    for reason, n in res.reasons.most_common():
        out.append(f"  switch x{n}: {reason}")
    for i, f in enumerate(res.faults):
        out.append("  " + f.line(i) + (f"  [address: {f.source}]" if f.source.startswith("modeled") else ""))
        if stack:
            out += [f"    {frame}" for frame in f.stack]
    for fn, n in res.unknown_functions.most_common():
        out.append(f"  unknown function on the path: {fn} ({n} events): not in the access model")
    out += _resting_lines(res)
    out.append(f"  switches: {res.switches} ({res.switches_per_run:.2f} per KVM_RUN); estimated overhead "
               f"{res.overhead_ns / 1e3:.1f} µs = {100 * res.overhead_share:.2f}% of {res.wall_ns / 1e3:.1f} µs measured "
               f"in KVM_RUN round trips, at {res.switch_cost_ns:g} ns per switch ({res.switch_cost_source})")
    if res.lost:
        out.append(f"  LOST EVIDENCE: {res.lost_events} trace records lost, {res.missing_chains} events without a call "
                   f"chain: the verdicts above are incomplete")
    if res.source_paths:
        out.append(f"  {res.source_paths} exits also checked along their handler's path from source (after kvm_exit the "
                   f"handler runs functions no tracepoint shows; access.toml [[exit_path]])")
    if res.emulated_paths:
        out.append(f"  {res.emulated_paths} exits also checked along the emulator's path for their decoded instruction, "
                   f"from source (no event shows it executing; access.toml [[emulated]])")
    if res.unplaced:
        out.append("  not checked (this VM has no such object, or kvmiso cannot read it): " +
                   ", ".join(f"{k} ({v} accesses)" for k, v in res.unplaced.most_common()))
    out += [f"  modeled: {m}" for m in res.modeled]
    out += [f"  not seen: {u}" for u in res.unseen]
    out += [f"  note: {n}" for n in res.notes]
    return "\n".join(out)


_RESTING = {"inference": "on access entries INFERRED from call chains, not read in kernel source",
            "derived": "on functions access.toml does not name, their objects DERIVED from this kernel's BTF prototypes"}


def _resting_lines(res: CheckResult) -> list[str]:
    """The INFERENCE and DERIVED labels of the verdicts: how many exits of each class rest on
    which entries, and how each function access.toml does not name was placed."""
    out = []
    for basis, what in _RESTING.items():
        exits = res.resting_exits[basis]
        if not exits:
            continue
        classes = ", ".join(f"{c} {n}" for c, n in exits.most_common())
        fns = ", ".join(f"{fn} ({n})" for fn, n in res.resting[basis].most_common())
        out.append(f"  {basis.upper()}: {sum(exits.values())} of {res.exits} exits rest {what} ({classes}): {fns}")
    for fn, how in sorted(res.placed.items()):
        out.append(f"    {fn}: {how['basis'].upper()} objects {', '.join(how['objects']) or '(none)'}: {how['cite']}")
    return out


__all__ = ["figure_text", "model_summary", "model_text", "result_text", "size_text"]
