"""The text and JSON of ``kvmiso check --measured`` on a ``kvmiso record`` folder. Every line says
where its facts come from: the record (tcg-plugin), the VM's objects (bpf+btf, the same boot),
the model (access.toml and the traced run's call chains).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from ..observe.accesses.accessrecord import AccessRecord
from ..observe.accesses.recordruns import RecordRuns
from .accessmeasure import Row
from .measuredexits import MeasuredVerdict
from .policy import POLICIES
from .measuredresult import UNMODELED, MeasuredResult, measured_text, modeled_text

SHOWN = 12  # functions listed per line before "... and N more"


def result_text(res: MeasuredResult, record: AccessRecord, runs: RecordRuns, table: bool = False, exits: bool = False) -> str:
    """A person's view: header, each policy's verdicts and agreement, the access model's scores,
    the disagreements one by one; ``table``: every (function, exit kind) row too; ``exits``:
    every exit's measured and modeled verdicts side by side."""
    windows = res.windows()
    scores = res.table.scores()
    lines = [f"access record {record.directory}: {len(runs.runs)} runs (kvmiso record, kernel {runs.kernel}, "
             f"{runs.vendor}), {len(windows)} exits recorded (source: tcg-plugin; objects: each run's VM read "
             "through bpf+btf in the same boot; symbols: the guest's kallsyms)"]
    unpaired_w, unpaired_x = res.unpaired()
    for policy in res.policies:
        lines += _policy_lines(res, policy, len(windows), unpaired_w, unpaired_x)
    lines.append(f"the access model measured (access.toml against each exit's own accesses, from VMRUN to the end of "
                 f"vcpu_run, interrupts left out: {scores.accesses:,} accesses, {scores.unplaced_accesses:,} of them "
                 "to addresses no object of the evidence covers, not counted):")
    lines.append(f"  recall {scores.recall:.1%} ({scores.hits} of {scores.touched} (function, object) pairs touched "
                 f"are predicted); precision {scores.precision:.1%} ({scores.hits} of {scores.predicted} predicted "
                 "pairs are touched)")
    lines += _model_misses(res.table.rows())
    for policy in res.policies:
        for d in res.disagreements(policy):
            lines.append(f"  disagreement {policy} {d.run} window {d.window} ({d.kind}, {d.category}): measured "
                         f"{d.measured}; model {d.modeled}: {d.reason}")
    if table:
        lines += _table_lines(res.table.rows())
    if exits:
        lines += _exit_lines(res)
    return "\n".join(lines)


def _exit_lines(res: MeasuredResult) -> list[str]:
    lines = ["each exit, measured | modeled (the traced exit paired with it; none: unpaired):"]
    for r in res.runs:
        for p in r.pairs:
            where = f"{r.label} window {p.window.window.seq} ({p.window.kind})" if p.window else \
                f"{r.label} traced exit ({p.model_kind}, no window)"
            for policy in res.policies:
                m = measured_text(p.measured[policy]) if policy in p.measured else "no window"
                v = modeled_text(p.modeled.get(policy)) if p.model_kind is not None else "unpaired"
                lines.append(f"  {where} {policy}: {m} | {v}")
    return lines


def _policy_lines(res: MeasuredResult, policy: str, n: int, unpaired_w: int, unpaired_x: int) -> list[str]:
    cls = res.classes(policy)
    lines = [f"{policy}: {n} exits measured: {cls['kvm_mm']} stay isolated, {cls['host_mm']} switch, "
             f"{cls['fault']} fault"]
    asi = POLICIES[policy].miss_is_switch
    for i, d in enumerate(res.misses(policy)):
        kinds = ", ".join(f"{k} {c}" for k, c in d.kinds.most_common())
        lines.append(f"  {d.miss.line(i, asi)}: {d.count} exits ({kinds})")
    for why, c in res.switches(policy).most_common():
        lines.append(f"  switch: {why}: {c} exits")
    agree, paired = res.agreement(policy)
    ok, counted = res.agreement(policy, UNMODELED)
    lines.append(f"  the model (the same exits traced, access.toml; modeled) agrees on {agree} of {paired} paired "
                 f"exits{_share(agree, paired)}; leaving out the {paired - counted} whose verdicts hinge on timing or on "
                 f"state the trace does not show, {ok} of {counted}{_share(ok, counted)}; unpaired: {unpaired_w} "
                 f"recorded, {unpaired_x} traced")
    return lines


def _share(a: int, n: int) -> str:
    return f" ({a / n:.1%})" if n else ""


def _model_misses(rows: list[Row]) -> list[str]:
    unpredicted: dict[str, set[str]] = {}
    untouched: dict[str, set[str]] = {}
    unknown: dict[str, str] = {}
    for r in rows:
        if not r.known:
            unknown.setdefault(r.function, r.module)
            continue
        if r.unpredicted:
            unpredicted.setdefault(r.function, set()).update(r.unpredicted)
        if r.untouched:
            untouched.setdefault(r.function, set()).update(r.untouched)
    touched = {(r.function, o) for r in rows for o in r.hit + r.unpredicted}
    untouched = {f: {o for o in objs if (f, o) not in touched} for f, objs in untouched.items()}
    lines = []
    if unknown:
        names = [f + (f" [{m}]" if m else "") for f, m in unknown.items()]
        lines.append(f"  functions access.toml does not know ({len(names)}): " + _some(names))
    if unpredicted:
        lines.append("  touched, not predicted: " + _some([f"{f} {sorted(o)}" for f, o in unpredicted.items()]))
    if any(untouched.values()):
        lines.append("  predicted, never touched: " + _some([f"{f} {sorted(o)}" for f, o in untouched.items() if o]))
    return lines


def _some(items: list[str]) -> str:
    more = len(items) - SHOWN
    return "; ".join(items[:SHOWN]) + (f"; ... and {more} more (--table, --json)" if more > 0 else "")


def _table_lines(rows: list[Row]) -> list[str]:
    lines = ["the access model, function by function and exit kind (hit: predicted and touched; +: touched, not "
             "predicted; -: predicted, never touched; ?: accesses no object covers; n/a: predicted, not on these VMs; "
             "and the objects each policy's isolated space left unmapped in some access, measured):"]
    for r in rows:
        state = "" if r.known else " (not in access.toml)"
        lines.append(f"  {r.function}{f' [{r.module}]' if r.module else ''} {r.kind}{state}: hit {list(r.hit)}"
                     + (f" + {list(r.unpredicted)}" if r.unpredicted else "")
                     + (f" - {list(r.untouched)}" if r.untouched else "")
                     + (f" ? {r.unplaced}" if r.unplaced else "")
                     + (f" n/a {list(r.unmeasurable)}" if r.unmeasurable else "")
                     + "".join(f"; {p} leaves unmapped {list(o)}" for p, o in r.unmapped.items())
                     + (f" ({r.windows} windows)"))
    return lines


def result_dict(res: MeasuredResult, record: AccessRecord, runs: RecordRuns) -> dict[str, Any]:
    """The same as JSON-ready data, with each exit's verdicts."""
    scores = res.table.scores()
    exits = []
    for label, p in res.windows():
        w = p.window
        exits.append({"run": label, "window": w.window.seq, "kind": w.kind, "reason": w.window.reason,
                      "paired": p.paired,
                      "measured": {pol: _measured_dict(v, pol) for pol, v in p.measured.items()},
                      "modeled": {pol: modeled_text(v) for pol, v in p.modeled.items()} if p.paired else None})
    return {
        "directory": str(record.directory), "kernel": runs.kernel, "vendor": runs.vendor, "source": "tcg-plugin",
        "runs": [r.label for r in runs.runs],
        "policies": {pol: {"classes": dict(res.classes(pol)),
                           "misses": [{"line": d.miss.line(i, POLICIES[pol].miss_is_switch), "function": d.miss.site.function,
                                       "offset": d.miss.site.offset, "address": d.miss.address,
                                       "object": d.miss.named.object, "member": d.miss.named.member,
                                       "count": d.count, "kinds": dict(d.kinds)} for i, d in enumerate(res.misses(pol))],
                           "switches": dict(res.switches(pol)),
                           "agreement": dict(zip(("agree", "paired"), res.agreement(pol))),
                           "agreement_modeled": dict(zip(("agree", "paired"), res.agreement(pol, UNMODELED))),
                           "disagreements": [asdict(d) for d in res.disagreements(pol)]}
                     for pol in res.policies},
        "unpaired": dict(zip(("recorded", "traced"), res.unpaired())),
        "access_model": {"recall": scores.recall, "precision": scores.precision, **asdict(scores),
                         "rows": [asdict(r) for r in res.table.rows()]},
        "exits": exits,
    }


def _measured_dict(v: MeasuredVerdict, policy: str) -> dict[str, Any]:
    d = {"class": v.cls, "kind": v.kind, "why": v.why, "text": measured_text(v)}
    if v.miss is not None:
        d["line"] = v.miss.line(0, POLICIES[policy].miss_is_switch)
    return d


__all__ = ["result_dict", "result_text"]
