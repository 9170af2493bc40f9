"""Two ``kvmiso bench --json`` files side by side: ratios of the median of stable runs' p50s, and
whether a difference is outside the noise (Welch's t-test at 95% over the stable runs' means, as
pyperf's compare_to tests its values); a run off its siblings by the instability threshold
(:func:`.stats.unstable_runs`) counts in neither.

>>> from kvmiso.bench import bench, load
>>> for name in ("a.json", "b.json"):
...     bench(kvm, kinds=["out"], samples=500, runs=3, python=False).write(name)
>>> print(format_compare(compare(load("a.json"), load("b.json"))))
kind            cpl  path  A p50 us  B p50 us  B vs A ...  significant
null_ioctl      -    c ...
out             0    c ...
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .results import row_p50
from .samples import significant, unstable_runs


@dataclass(frozen=True)
class Row:
    """One (kind, path, CPL) in A and B: both p50s in ns, and Welch's verdict on their run means."""

    kind: str
    path: str
    cpl: int | None
    a: float | None  # p50 ns
    b: float | None
    significant: bool = False
    t: float = 0.0

    @property
    def ratio(self) -> float | None:
        """B's p50 over A's, where both have one."""
        return self.b / self.a if self.a and self.b else None

    def verdict(self) -> str:
        """``1.23x slower`` / ``1.10x faster`` / ``same`` (B relative to A), or which side lacks it."""
        if self.a is None:
            return "only in B"
        if self.b is None:
            return "only in A"
        r = self.ratio
        if r is None:
            return "-"
        if abs(r - 1) < 0.005 and not self.significant:
            return "same"
        # a real difference under 0.5% still gets its direction, with the digits to show it
        digits = 2 if abs(r - 1) >= 0.005 else 3
        return f"{r:.{digits}f}x slower" if r > 1 else f"{1 / r:.{digits}f}x faster"


def compare(a: dict[str, Any], b: dict[str, Any]) -> list[Row]:
    """One row per (kind, path, cpl) in either file, in A's order, then B's new ones."""
    def index(d: dict[str, Any]) -> dict[tuple, dict[str, Any]]:
        return {(r["kind"], r["path"], r["cpl"]): r for r in d["results"]}

    ia, ib = index(a), index(b)
    rows = []
    for key in list(ia) + [k for k in ib if k not in ia]:
        ra, rb = ia.get(key), ib.get(key)
        sig, t = (False, 0.0)
        if ra and rb:
            sig, t = significant(stable_means(ra), stable_means(rb))
        rows.append(Row(*key, row_p50(ra) if ra else None, row_p50(rb) if rb else None, sig, t))
    return rows


def stable_means(row: dict[str, Any]) -> list[float]:
    """The run means of a result row less its unstable runs (the bench's own rule, applied to
    a file: an old one may still hold them)."""
    runs = row["runs"]
    bad = set(unstable_runs([r.get("p50", r["mean"]) for r in runs], [r["mean"] for r in runs]))
    return [r["mean"] for i, r in enumerate(runs) if i not in bad] or [r["mean"] for r in runs]


def host_differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """Fingerprint facts that differ, which a reader must weigh before trusting a ratio."""
    out = []
    for k in ("cpu", "kernel", "vendor", "cpl0", "governor", "mitigations"):
        va, vb = a["host"].get(k), b["host"].get(k)
        if va != vb:
            out.append(f"{k}: {va} vs {vb}")
    pa, pb = a["host"].get("pinning", {}).get("pinned"), b["host"].get("pinning", {}).get("pinned")
    if pa != pb:
        out.append(f"pinned: {pa} vs {pb}")
    return out


def format_compare(rows: list[Row], a: dict[str, Any] | None = None, b: dict[str, Any] | None = None) -> str:
    """The side-by-side table ``kvmiso compare`` prints (p50 in µs)."""
    def us(v: float | None) -> str:
        return "-" if v is None else f"{v / 1000:.3f}"

    table = [("kind", "cpl", "path", "A p50 us", "B p50 us", "B vs A", "significant")]
    for r in rows:
        sig = "-" if r.a is None or r.b is None else (f"yes (t={r.t:.1f})" if r.significant else "no: within the noise")
        table.append((r.kind, "-" if r.cpl is None else str(r.cpl), r.path, us(r.a), us(r.b), r.verdict(), sig))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.rjust(w) if i in (3, 4) else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
             for row in table]
    if a is not None and b is not None:
        for d, name in ((a, "A"), (b, "B")):
            if not d.get("complete", True):
                lines.append(f"{name} is incomplete: {d.get('incomplete_reason', '')}")
        diffs = host_differences(a, b)
        if diffs:
            lines.append("the hosts differ: " + "; ".join(diffs))
    return "\n".join(lines)
