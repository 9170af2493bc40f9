"""The guest runs of an access record, as ``kvmiso record`` made them inside the recorded boot:
which payload each run was, the evidence of its VM (read through BPF+BTF in the same boot, after
the run, while the VM lived), the exit log of the same payload run again under tracing (for the
model's verdict), and the marks that cut the record into runs.

Each payload runs twice, one after the other. First plainly (no tracing: the record of a traced
run holds the tracer's own accesses, tens of thousands per exit), then under capture. ``kvmiso
record`` puts mark 0 in the record before the first run, mark ``2i + 1`` after the plain run of
entry ``i`` (it pauses the record) and ``2i + 2`` after its traced run (it resumes it): the
windows between marks ``2i`` and ``2i + 1`` are the plain run's.

The folder, beside the plugin's files (:mod:`.accessrecord`)::

    runs.json                 the manifest (below)
    runs/NN-LABEL.evidence.json   the plain run's VM (:func:`kvmiso.observe.kernel.evidence.write_evidence`)
    runs/NN-LABEL.trace.jsonl     the traced run's exit log, with call chains
    fields.json               the members of each object's C type, from the guest's BTF
                              (:mod:`kvmiso.observe.kernel.btffields`)

>>> runs = read_runs("/tmp/rec")                                # doctest: +SKIP
>>> runs.runs[0].label, len(runs.plain_windows(read_record("/tmp/rec"))[0])   # doctest: +SKIP
('hello/real', 41)
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from .accessrecord import AccessRecord, RecordError, Window

MANIFEST = "runs.json"
RUNS_DIR = "runs"
FIELDS = "fields.json"
FORMAT = 1
START_MARK = 0


@dataclass
class RecordedRun:
    """One suite entry, recorded: its plain run (outcome, the exit of each KVM_RUN, its VM's
    evidence) and its traced run (outcome, exit log). Paths are relative to the record folder."""

    index: int
    label: str
    payload: str
    mode: str
    cpl: int
    outcome: str
    exits: list[str]  # the plain run's KVM_RUNs, each by the exit it returned (IO, MMIO, HLT ...)
    evidence: str
    log: str | None = None  # None: not traced (a payload built to spin is run bare)
    traced_outcome: str = ""
    traced_exits: list[str] = field(default_factory=list)

    @property
    def plain_mark(self) -> int:
        """The mark after the plain run."""
        return 2 * self.index + 1

    @property
    def traced_mark(self) -> int:
        """The mark after the traced run."""
        return 2 * self.index + 2


@dataclass
class RecordRuns:
    """A record folder's manifest: the kernel, the vendor module and the runs in order."""

    directory: Path
    kernel: str
    vendor: str
    runs: list[RecordedRun]

    def path(self, relative: str) -> Path:
        """A file of the record folder."""
        return self.directory / relative

    def plain_windows(self, record: AccessRecord) -> dict[int, list[Window]]:
        """Each run's plain windows (by run index): those between the mark before the run and the
        mark after it. RecordError when a mark is missing: the record would not say which run a
        window belongs to."""
        orders = {}
        for m in record.marks:
            if m.id in orders:
                raise RecordError(f"{record.directory}: mark {m.id} appears twice (a record of two commands?)")
            orders[m.id] = m.order
        out: dict[int, list[Window]] = {}
        for r in self.runs:
            before, after = orders.get(r.plain_mark - 1), orders.get(r.plain_mark)
            if before is None or after is None:
                raise RecordError(f"{record.directory}: run {r.index} ({r.label}) has no mark "
                                  f"{r.plain_mark - 1 if before is None else r.plain_mark}: the record "
                                  "cannot say which windows are its own")
            out[r.index] = [w for w in record.windows if before < w.order < after]
        return out


def write_runs(directory: Path, kernel: str, vendor: str, runs: list[RecordedRun]) -> None:
    """Write the manifest (after every run: a record cut short still says what it holds)."""
    doc = {"kvmiso_record_runs": FORMAT, "kernel": kernel, "vendor": vendor, "runs": [asdict(r) for r in runs]}
    tmp = directory / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(directory / MANIFEST)


def read_runs(directory: str | Path) -> RecordRuns | None:
    """The manifest of a record folder, or None where ``kvmiso record`` did not make the record
    (a record of another command: its windows belong to no run)."""
    d = Path(directory)
    try:
        doc: dict[str, Any] = json.loads((d / MANIFEST).read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{d / MANIFEST}: {e}") from None
    if doc.get("kvmiso_record_runs") != FORMAT:
        raise RecordError(f"{d / MANIFEST}: not a manifest of format {FORMAT}")
    try:
        runs = [RecordedRun(**r) for r in doc["runs"]]
    except (KeyError, TypeError) as e:
        raise RecordError(f"{d / MANIFEST}: malformed ({e})") from None
    return RecordRuns(d, doc.get("kernel", ""), doc.get("vendor", ""), runs)


def run_file(index: int, label: str, suffix: str) -> str:
    """``runs/NN-LABEL.SUFFIX``, the label's slashes made dashes."""
    return f"{RUNS_DIR}/{index:02d}-{label.replace('/', '-')}.{suffix}"


__all__ = ["FIELDS", "MANIFEST", "RecordRuns", "RecordedRun", "START_MARK", "read_runs", "run_file", "write_runs"]
