"""The access model measured: for each function and exit kind of a record, the objects access.toml
predicts and those the function's own instructions touched, compared.

Which accesses count: those of the exit's own handling (:meth:`.windowpath.WindowPath.in_exit`:
from the instruction after VMRUN to the end of vcpu_run, outside interrupts and other tasks),
by the function whose code made them (the compiler's inlining decides which that is: a static
helper inlined into its caller is the caller's). Objects are named by :mod:`.accessnames`.

The comparison is over (function, object) pairs:

* **touched and predicted** (a hit), **touched, not predicted** (the model misses an access:
  recall), **predicted, never touched** (the model claims one the record never shows:
  precision);
* an object the record cannot name (an address no object of the evidence covers: ``direct_map?``)
  is counted apart, never in either score;
* a predicted object this VM does not have (``lapic`` without an in-kernel LAPIC) or kvmiso does
  not read (``mmu_caches``, ``pte_list_desc``) cannot be seen touched: counted apart;
* the stack (``implicit`` in access.toml) is predicted for every function, but a function that
  does not touch it is no miss;
* a function on the run loop (role ``run-loop``: entered before the window opens, it runs part of
  its code outside every window) is not charged with what it never touched here.

>>> table = AccessTable(model)                                         # doctest: +SKIP
>>> table.add(path, namer, "kvm_amd", {})                              # doctest: +SKIP
>>> table.scores().recall                                              # doctest: +SKIP
0.993
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from .access import AccessModel
from .accessnames import AREA_OBJECT, AccessNamer
from .measuredexits import SpaceView
from .windowpath import WindowPath

# Objects named by the area they lie in, not read from the VM: always there to be touched.
AREA_NAMES = frozenset(AREA_OBJECT.values()) | {"cpu_entry_area"}
_INDEX = re.compile(r"\[\d+\]")


@dataclass
class Cell:
    """One function in one exit kind: accesses per object touched, objects predicted (and that
    could be seen touched on these VMs), objects predicted that could not, windows seen."""

    module: str
    touched: Counter = field(default_factory=Counter)
    predicted: set[str] = field(default_factory=set)
    unmeasurable: set[str] = field(default_factory=set)
    windows: int = 0
    # objects touched in exits handled in the kernel (windows that ended at the next VMRUN), and
    # how many such windows ran the function: an object touched only on the way to userspace
    # is the model's name@userspace
    in_kernel: set[str] = field(default_factory=set)
    kernel_windows: int = 0
    members: Counter = field(default_factory=Counter)  # (object, member, array indexes dropped) -> accesses
    unmapped: dict[str, set[str]] = field(default_factory=dict)  # policy -> objects it left unmapped in some access


@dataclass(frozen=True)
class Row:
    """One (function, kind) compared: hits, misses each way, unplaced accesses, whether the
    model knows the function and whether its untouched predictions are charged."""

    function: str
    kind: str
    module: str
    known: bool
    partial: bool
    hit: tuple[str, ...]
    unpredicted: tuple[str, ...]
    untouched: tuple[str, ...]
    unplaced: int
    unmeasurable: tuple[str, ...]
    windows: int
    userspace_only: tuple[str, ...] = ()  # touched only in exits to userspace, where it also ran in others
    kernel_windows: int = 0  # of ``windows``, those of exits handled in the kernel
    members: tuple[tuple[str, str, int], ...] = ()  # the members touched most, per object
    unmapped: dict[str, tuple[str, ...]] = field(default_factory=dict)  # policy -> objects its space left unmapped


@dataclass(frozen=True)
class Scores:
    """Distinct (function, object) pairs over the whole record: recall = hits / touched,
    precision = hits / predicted (both of placed, measurable objects)."""

    touched: int
    predicted: int
    hits: int
    unplaced_accesses: int
    accesses: int

    @property
    def recall(self) -> float:
        """Share of the touched pairs the model predicts."""
        return self.hits / self.touched if self.touched else 1.0

    @property
    def precision(self) -> float:
        """Share of the predicted pairs the record shows touched."""
        return self.hits / self.predicted if self.predicted else 1.0


class AccessTable:
    """The comparison, filled window by window (:meth:`add`)."""

    def __init__(self, model: AccessModel) -> None:
        self.model = model
        self.cells: dict[tuple[str, str], Cell] = {}
        self.implicit = set(model.implicit)

    def add(self, path: WindowPath, namer: AccessNamer, vendor: str, config: dict[str, str], kernel: str = "",
            views: dict[str, SpaceView] | None = None) -> None:
        """Count one window's exit accesses (see the module docstring) against the model, and
        note which objects each policy's isolated space (``views``) does not map."""
        seen: set[tuple[str, str]] = set()
        to_user = path.window.reason == "user"
        for i in path.in_exit():
            site, a = path.sites[i], path.accesses[i]
            key = (site.function, path.kind)
            cell = self.cells.get(key)
            if cell is None:
                cell = self.cells[key] = Cell(site.module)
            if key not in seen:
                seen.add(key)
                cell.windows += 1
                cell.kernel_windows += not to_user
                self._predict(cell, site.function, namer, vendor, config, to_user, kernel)
            named = namer.name(a.addr, a.size)
            obj = named.object
            cell.touched[obj] += 1
            cell.members[(obj, _INDEX.sub("[]", named.member).split("+")[0])] += 1
            for policy, view in (views or {}).items():
                if not view.maps(a.addr):
                    cell.unmapped.setdefault(policy, set()).add(obj)
            if not to_user:
                cell.in_kernel.add(obj)

    def _predict(self, cell: Cell, function: str, namer: AccessNamer, vendor: str, config: dict[str, str],
                 to_user: bool, kernel: str) -> None:
        fa = self.model.lookup(function)
        if fa is None:
            return
        for obj in fa.objects(vendor, config, to_user, kernel):
            (cell.predicted if _measurable(obj, namer) else cell.unmeasurable).add(obj)

    def rows(self) -> list[Row]:
        """Every (function, kind), in the order first seen."""
        out = []
        for (fn, kind), c in self.cells.items():
            fa = self.model.lookup(fn)
            placed = {o for o in c.touched if namer_placed(o)}
            partial = fa is not None and fa.role == "run-loop"
            predicted = c.predicted | (self.implicit & placed)
            out.append(Row(fn, kind, c.module, fa is not None, partial, tuple(sorted(placed & predicted)),
                           tuple(sorted(placed - predicted)),
                           () if partial else tuple(sorted(c.predicted - placed - self.implicit)),
                           sum(n for o, n in c.touched.items() if not namer_placed(o)),
                           tuple(sorted(c.unmeasurable)), c.windows,
                           tuple(o for o in c.touched if c.kernel_windows and o not in c.in_kernel), c.kernel_windows,
                           _top_members(c.members), {p: tuple(sorted(o)) for p, o in c.unmapped.items()}))
        return out

    def pairs(self) -> tuple[set[tuple[str, str]], set[tuple[str, str]]]:
        """(touched, predicted) distinct (function, object) pairs over every kind: a pair the model
        predicts in one kind and the record shows in another is a hit (an object written only
        for exits to userspace is predicted for those)."""
        touched, predicted = set(), set()
        for r in self.rows():
            touched |= {(r.function, o) for o in r.hit + r.unpredicted}
            predicted |= {(r.function, o) for o in r.hit + r.untouched}
        return touched, predicted

    def scores(self) -> Scores:
        """Recall and precision over distinct (function, object) pairs."""
        touched, predicted = self.pairs()
        unplaced = sum(n for c in self.cells.values() for o, n in c.touched.items() if not namer_placed(o))
        every = sum(sum(c.touched.values()) for c in self.cells.values())
        return Scores(len(touched), len(predicted), len(touched & predicted), unplaced, every)


def _top_members(members: Counter, per_object: int = 3) -> tuple[tuple[str, str, int], ...]:
    """The members touched most of each object (named ones only), most first."""
    out, shown = [], Counter()
    for (obj, member), n in members.most_common():
        if member and shown[obj] < per_object:
            shown[obj] += 1
            out.append((obj, member, n))
    return tuple(out)


def _measurable(obj: str, namer: AccessNamer) -> bool:
    """Could an access to ``obj`` be named on this VM? (an object of its layout, or an area)"""
    lay = namer.layout
    return obj in AREA_NAMES or bool(lay.matching(obj) or lay.matching(obj + ":*"))


def namer_placed(obj: str) -> bool:
    """Is ``obj`` a named object (not an address no object of the evidence covers)?"""
    return not obj.endswith("?")


__all__ = ["AccessTable", "Cell", "Row", "Scores", "namer_placed"]
