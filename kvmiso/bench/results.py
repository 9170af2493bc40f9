"""The result file of ``kvmiso bench``: one :class:`BenchResult` of :class:`Result` rows, written
as JSON with the host fingerprint, and :func:`load`, which reads one back and says what is
wrong with a file that is not one.
"""

from __future__ import annotations

import datetime
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SCHEMA = "kvmiso-bench"
SCHEMA_VERSION = 1


@dataclass
class Result:
    """One measured row: a kind on one path (c, python, guest, host) at one CPL."""

    kind: str
    path: str
    cpl: int | None
    summary: dict[str, float]
    runs: list[dict[str, float]]
    warnings: list[str] = field(default_factory=list)
    iterations: int = 1  # guest iterations per sample
    insns: int | None = None
    emulated: float | None = None  # instructions KVM emulated per iteration (vCPU stats)
    ratio_to_floor: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    replaced: int = 0  # unstable runs measured again (see stats.unstable_runs)
    samples: list[float] = field(default_factory=list, repr=False)  # for --plot; not saved

    @property
    def key(self) -> tuple[str, str, int | None]:
        """(kind, path, cpl): what identifies the row across result files."""
        return self.kind, self.path, self.cpl

    def to_dict(self) -> dict[str, Any]:
        """The row as the result file holds it (``samples`` are not saved)."""
        d = {k: getattr(self, k) for k in ("kind", "path", "cpl", "summary", "runs", "warnings",
                                            "iterations", "insns", "emulated", "ratio_to_floor", "extra",
                                            "replaced")}
        d["unit"] = "ns"
        return d


@dataclass
class BenchResult:
    """Everything one ``kvmiso bench`` produced; ``complete`` is false after Ctrl-C (or SIGTERM)."""

    host: dict[str, Any]
    settings: dict[str, Any]
    results: list[Result] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    complete: bool = True
    incomplete_reason: str = ""
    interrupted_by: str = ""  # the signal that cut the run short
    created: str = field(default_factory=lambda: datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))

    def to_dict(self) -> dict[str, Any]:
        """The whole result file: schema, version, host, settings, rows, the Python API's
        overhead (derived from the rows), skips."""
        rows = [r.to_dict() for r in self.results]
        return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": self.created,
                "complete": self.complete, "incomplete_reason": self.incomplete_reason,
                "host": self.host, "settings": self.settings, "results": rows,
                "python_overhead": python_overhead(rows), "skipped": self.skipped}

    def write(self, path: str | os.PathLike) -> None:
        """Write :meth:`to_dict` as JSON to ``path``."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1) + "\n")


def python_overhead(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """For every (kind, CPL) timed both by the compiled loop and through the Python API
    (``Vcpu.run()``, decoding included): both p50s, what Python adds per round trip in ns, and
    the ratio. ``rows`` are result rows as the file holds them (:meth:`Result.to_dict`)."""
    p50 = {(r["kind"], r["cpl"], r["path"]): row_p50(r) for r in rows}
    out = []
    for (kind, cpl, path), c in p50.items():
        py = p50.get((kind, cpl, "python"))
        if path == "c" and py is not None and c:
            out.append({"kind": kind, "cpl": cpl, "c_p50_ns": c, "python_p50_ns": py,
                        "added_ns": py - c, "ratio": py / c})
    return out


def row_p50(row: dict[str, Any]) -> float:
    """A result row's figure for ratios: the median of its stable runs' p50s (files written
    before runs were checked for stability: the pooled p50)."""
    return row["summary"].get("stable_p50", row["summary"]["p50"])


class ResultFileError(ValueError):
    """A result file that is unreadable, not JSON, not a kvmiso bench file, or of another
    schema version."""


def load(path: str | Path) -> dict[str, Any]:
    """Read and check a result file; raises ResultFileError saying what is wrong with it."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as e:
        raise ResultFileError(f"{path}: cannot read: {e.strerror}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ResultFileError(f"{path}: not a kvmiso bench result (corrupt JSON: {e})") from None
    if not isinstance(data, dict) or data.get("schema") != SCHEMA:
        raise ResultFileError(f"{path}: not a kvmiso bench result (no \"schema\": \"{SCHEMA}\")")
    if data.get("schema_version") != SCHEMA_VERSION:
        raise ResultFileError(f"{path}: schema version {data.get('schema_version')!r}; this kvmiso reads "
                              f"version {SCHEMA_VERSION}: re-run kvmiso bench with this version")
    results = data.get("results")
    if not isinstance(results, list) or not all(_entry_ok(r) for r in results):
        raise ResultFileError(f"{path}: corrupt: a result entry lacks kind, path, cpl, summary.p50 or runs[].mean")
    return data


def _entry_ok(r: Any) -> bool:
    return (isinstance(r, dict) and all(k in r for k in ("kind", "path", "cpl", "summary", "runs"))
            and isinstance(r["summary"], dict) and isinstance(r["summary"].get("p50"), (int, float))
            and isinstance(r["runs"], list) and all(isinstance(x, dict) and "mean" in x for x in r["runs"]))
