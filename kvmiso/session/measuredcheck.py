"""The measured check of a record ``kvmiso record`` made (``kvmiso check --measured DIR``): every
run's windows against its own VM (evidence of the same boot), each exit's measured verdict per
policy beside the model's for the same exit of the traced run, and the access model measured
function by function. Reading files is here; what is compared is :mod:`kvmiso.isolation`'s pure
logic.

>>> from kvmiso.observe.accesses.accessrecord import read_record
>>> from kvmiso.observe.accesses.recordruns import read_runs
>>> result = measure_record(read_record("/tmp/rec"), read_runs("/tmp/rec"))   # doctest: +SKIP
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..isolation import AccessModel, DenylistSpace, address_space, build_layout, load_access_model
from ..isolation.accessmeasure import AccessTable
from ..isolation.accessnames import AccessNamer
from ..isolation.check import exit_verdicts
from ..isolation.measuredcompare import RunComparison, compare_run
from ..isolation.measuredexits import SpaceView
from ..isolation.measuredresult import MeasuredResult
from ..isolation.windowpath import Sites, WindowPath
from ..observe.accesses.accessrecord import AccessRecord, RecordError, Window
from ..observe.kernel.evidence import read_evidence, resolve_code
from ..observe.tracing.exitlog import read_jsonl
from ..observe.accesses.recordruns import FIELDS, RecordedRun, RecordRuns

POLICIES = ("rfc-v1", "asi", "asi-2022")


def measure_record(record: AccessRecord, runs: RecordRuns, model: AccessModel | None = None,
                   policies: tuple[str, ...] = POLICIES) -> MeasuredResult:
    """Every run of ``runs`` compared (see the module docstring)."""
    model = model or load_access_model()
    if record.symbols is None:
        raise RecordError(f"{record.directory} has no kallsyms of the guest: the record cannot be symbolized")
    fields = _fields(runs.path(FIELDS))
    windows = runs.plain_windows(record)
    sites = Sites(record.symbols)
    table = AccessTable(model)
    compared = []
    for run in runs.runs:
        compared.append(_measure_run(run, windows[run.index], runs, record, fields, sites, model, table, policies))
    return MeasuredResult(compared, table, policies)


def _measure_run(run: RecordedRun, windows: list[Window], runs: RecordRuns, record: AccessRecord,
                 fields: dict[str, Any] | None, sites: Sites, model: AccessModel, table: AccessTable,
                 policies: tuple[str, ...]) -> RunComparison:
    """One run: its evidence and traced log read, its windows compared and tabled."""
    evidence = read_evidence(runs.path(run.evidence))
    log = read_jsonl(runs.path(run.log)) if run.log else None
    if log is not None:  # the traced run's chains, named with the same boot's kallsyms
        evidence.code.update(resolve_code(record.symbols, {a for _, e in log.events() for a in e.stack}))
    layout = build_layout(evidence)
    spaces = {policy: address_space(layout, policy) for policy in policies}
    aliases = [d for s in spaces.values() if isinstance(s, DenylistSpace) for d in s.denied
               if d[0].endswith("(direct-map alias)")]
    namer = AccessNamer(layout, record.symbols, fields, aliases)
    paths = [WindowPath.of(w, sites) for w in windows]
    views = {policy: SpaceView(space) for policy, space in spaces.items()}
    for p in paths:
        table.add(p, namer, evidence.vendor, evidence.config, evidence.kernel, views)
    exits = {policy: exit_verdicts(space, log, model) if log is not None else [] for policy, space in spaces.items()}
    return compare_run(run.label, paths, views, namer, exits)


def _fields(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, json.JSONDecodeError) as e:
        raise RecordError(f"{path}: {e}") from None


__all__ = ["POLICIES", "measure_record"]
