"""The table ``kvmiso bench`` prints: one aligned row per measured (kind, path, CPL), times in µs."""

from __future__ import annotations

import statistics

from .results import BenchResult, python_overhead


def _us(ns: float) -> str:
    us = ns / 1000
    return f"{us:.3f}" if us < 10 else f"{us:.2f}" if us < 100 else f"{us:.1f}" if us < 10000 else f"{us:.0f}"


def format_table(result: BenchResult) -> str:
    """The aligned table ``kvmiso bench`` prints (times in µs)."""
    head = ("kind", "cpl", "path", "n", "min", "p50", "p90", "p99", "max", "mean", "stdev",
            "x null", "insn/it", "emul/it", "notes")
    lines = [head]
    for r in result.results:
        s = r.summary
        notes = list(r.warnings)
        if r.replaced:
            notes.append(f"{r.replaced} unstable run{'s' if r.replaced > 1 else ''} measured again")
        if r.extra.get("exits_per_s"):
            eps = r.extra["exits_per_s"]
            notes.insert(0, f"{statistics.fmean(eps):,.0f} exits/s")
        if r.iterations > 1:
            notes.insert(0, f"per iteration, {r.iterations}/sample")
        lines.append((r.kind, "-" if r.cpl is None else str(r.cpl), r.path, str(s["n"]),
                      *(_us(s[k]) for k in ("min", "p50", "p90", "p99", "max", "mean", "stdev")),
                      f"{r.ratio_to_floor:.1f}" if r.ratio_to_floor else "-",
                      str(r.insns) if r.insns else "-",
                      f"{r.emulated:.2f}" if r.emulated is not None else "-", "; ".join(notes)))
    widths = [max(len(row[i]) for row in lines) for i in range(len(head) - 1)]
    text = []
    for row in lines:
        cells = [c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))]
        text.append("  ".join(cells + [row[-1]]).rstrip())
    text.insert(1, "-" * len(text[0]))
    overhead = python_overhead([r.to_dict() for r in result.results])
    if overhead:
        text += ["", "Python API over the compiled loop (Vcpu.run() with decoding; median of the stable runs' p50s):"]
        text += [f"  {o['kind']:<15} cpl {'-' if o['cpl'] is None else o['cpl']}  {o['added_ns']:+8.0f} ns  "
                 f"{o['ratio']:.3f}x" for o in overhead]
    for s in result.skipped:
        cpl = "" if s["cpl"] is None else f" at CPL{s['cpl']}"
        text.append(f"skipped {s['kind']}{cpl}: {s['reason']}")
    if not result.complete:
        text.append(f"INCOMPLETE: {result.incomplete_reason}")
    return "\n".join(text)
