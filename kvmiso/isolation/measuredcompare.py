"""Measured against modeled, exit by exit: each window of a run's plain record (its measured
verdict, :mod:`.measuredexits`) paired with an exit of the same payload's traced run (its
model verdict, :func:`.check.exit_verdicts`), both against the plain run's VM: the same objects
at the same addresses, the same page table, so a disagreement is the model's and not the
allocator's.

Pairing is by order and kind: the two runs make the same KVM_RUNs and, in each, the same exits
in the same order, but for interrupts (a timer fires when it fires) and a few exits tracing adds
or removes. KVM_RUN k of the record (its windows up to the one that reached the end of vcpu_run
on the way to the VMM) goes with KVM_RUN k of the traced log, and inside it the longest common
subsequence of the two kind sequences pairs the exits (difflib). Where the two runs made
different numbers of KVM_RUNs, the whole run is paired that way at once. The rest stay unpaired
and are counted. (A long run of one kind, such as hello's 28 port writes, pairs arbitrarily
without the KVM_RUNs: any window matches any exit of its kind.)

>>> run = compare_run("portio/long", paths, spaces, namer, model_exits)   # doctest: +SKIP
>>> run.agreement("rfc-v1")                                              # doctest: +SKIP
(12, 12)
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field

from .accessnames import AccessNamer
from .chainwalk import Verdict
from .checkresult import ExitClass
from .measuredexits import MeasuredVerdict, SpaceView, measured_verdict
from .windowpath import WindowPath

ModelExit = tuple[int, str, "Verdict | None"]  # (KVM_RUN index in the traced log, kind, verdict)


@dataclass
class ExitPair:
    """One window and, where paired, the traced exit of the same place: each policy's verdicts."""

    window: WindowPath | None
    model_kind: str | None
    measured: dict[str, MeasuredVerdict] = field(default_factory=dict)
    modeled: dict[str, Verdict | None] = field(default_factory=dict)

    @property
    def paired(self) -> bool:
        """Both sides are here."""
        return self.window is not None and self.model_kind is not None

    def model_class(self, policy: str) -> ExitClass:
        """The model's class of this exit under ``policy`` (kvm_mm where its verdict is None)."""
        v = self.modeled.get(policy)
        return v.cls if v is not None else ExitClass.KVM_MM

    def agrees(self, policy: str) -> bool:
        """Same class measured and modeled."""
        return self.measured[policy].cls == self.model_class(policy)


@dataclass
class RunComparison:
    """One run: its exit pairs in order (unpaired windows and exits included)."""

    label: str
    pairs: list[ExitPair]

    def paired(self) -> list[ExitPair]:
        """The pairs with both sides."""
        return [p for p in self.pairs if p.paired]

    def agreement(self, policy: str) -> tuple[int, int]:
        """(pairs that agree under ``policy``, pairs)."""
        both = self.paired()
        return sum(p.agrees(policy) for p in both), len(both)


def pair_kinds(windows: list[str], exits: list[str]) -> list[tuple[int | None, int | None]]:
    """Indexes of windows and exits paired by the longest common subsequence of their kinds, in
    order; (i, None) and (None, j) for those left over."""
    out: list[tuple[int | None, int | None]] = []
    sm = difflib.SequenceMatcher(None, windows, exits, autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            out += list(zip(range(i1, i2), range(j1, j2)))
        else:
            out += [(i, None) for i in range(i1, i2)] + [(None, j) for j in range(j1, j2)]
    return out


def kvm_runs(paths: list[WindowPath]) -> list[list[int]]:
    """The windows of each KVM_RUN, by index: a KVM_RUN ends with the window that reached the end
    of vcpu_run and went on to user mode (the exit went to the VMM); a window that reached user
    mode otherwise (the thread gave way) does not end one."""
    runs: list[list[int]] = [[]]
    for i, p in enumerate(paths):
        runs[-1].append(i)
        if p.window.reason == "user" and p.vcpu_run_end < len(p.sites):
            runs.append([])
    return [r for r in runs if r] or [[]]


def pair_runs(paths: list[WindowPath], exits: list[ModelExit]) -> list[tuple[int | None, int | None]]:
    """Window and exit indexes paired KVM_RUN by KVM_RUN (see the module docstring)."""
    groups = kvm_runs(paths)
    traced: dict[int, list[int]] = {}
    for j, (run, _, _) in enumerate(exits):
        traced.setdefault(run, []).append(j)
    if len(groups) != len(traced):
        return pair_kinds([p.kind for p in paths], [k for _, k, _ in exits])
    out: list[tuple[int | None, int | None]] = []
    for windows, js in zip(groups, (traced[k] for k in sorted(traced))):
        for i, j in pair_kinds([paths[w].kind for w in windows], [exits[x][1] for x in js]):
            out.append((windows[i] if i is not None else None, js[j] if j is not None else None))
    return out


def compare_run(label: str, paths: list[WindowPath], views: dict[str, SpaceView], namer: AccessNamer,
                model: dict[str, list[ModelExit]]) -> RunComparison:
    """Pair ``paths`` (the plain run's windows) with the traced run's exits (``model``: each
    policy's :func:`.check.exit_verdicts`, the same exits in the same order under every policy)
    and give every pair each policy's verdicts."""
    first = next(iter(model.values()), [])
    pairs = []
    for i, j in pair_runs(paths, first):
        pair = ExitPair(paths[i] if i is not None else None, first[j][1] if j is not None else None)
        for policy, view in views.items():
            if i is not None:
                pair.measured[policy] = measured_verdict(paths[i], view, namer)
            if j is not None:
                pair.modeled[policy] = model[policy][j][2]
        pairs.append(pair)
    return RunComparison(label, pairs)


__all__ = ["ExitPair", "ModelExit", "RunComparison", "compare_run", "kvm_runs", "pair_kinds", "pair_runs"]
