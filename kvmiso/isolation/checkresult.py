"""What :func:`.check.check` finds: each distinct fault as the RFC's log line, and the totals of
one or more exit logs (classes, switches and their estimated cost, what was lost or modeled)."""

from __future__ import annotations

import dataclasses
import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any


class ExitClass(enum.StrEnum):
    """An exit's verdict (see :mod:`.check`); its value is what the text and JSON print."""

    KVM_MM = "kvm_mm"  # handled inside the isolated space
    HOST_MM = "host_mm"  # reached a designed switch
    FAULT = "fault"  # an access the isolated space does not map, before any designed switch
    UNKNOWN = "unknown"  # a frame on the path nothing places

    @property
    def leaves(self) -> bool:
        """Whether the exit leaves the isolated space (a switch to the full one)."""
        return self in (ExitClass.HOST_MM, ExitClass.FAULT)


# The CR3 switch cost used when none is given: an assumption, always printed with its source.
DEFAULT_SWITCH_COST_NS = 250.0
DEFAULT_SWITCH_COST_SOURCE = ("assumed 250 ns: a CR3 write with PCID (no TLB flush) plus the RFC's bookkeeping; "
                              "not measured on this host (pass --switch-cost)")


@dataclass
class Fault:
    """One distinct missing mapping: on what (address, object), and where it is attributed.

    kvmiso sees return addresses, not the faulting instruction: ``function+offset`` is the frame
    of the chain whose function (or a callee that returned before the event, ``first_access``)
    touches the object, at the call it was making (``after_call``: once that call returned);
    ``on_chain`` False for a function no chain shows (a handler path from source)."""

    function: str
    offset: int
    size: int
    address: int
    region: str
    source: str
    count: int = 0
    kinds: set[str] = field(default_factory=set)
    stack: tuple[str, ...] = ()
    first_access: str = ""  # the callee the source says touches the object first, if not the function
    after_call: bool = False
    on_chain: bool = True
    basis: str = "source"  # how the attributed function's accesses are known (access.BASES)

    def where(self) -> str:
        """Where the miss is attributed: the frame, and what the frame's offset means."""
        if not self.on_chain:
            return f"{self.function} (not on the chain)"
        at = f"{self.function}+{self.offset:#x}" + (f"/{self.size:#x}" if self.size else "")
        at += " after that call returned" if self.after_call else ""
        return at + (f", first access in {self.first_access}" if self.first_access else "")

    def line(self, n: int) -> str:
        """This miss, numbered ``n``. Not the RFC's patch-24 line: that prints the faulting
        instruction and the error code, which a call chain cannot show; this prints the frame the
        miss is attributed at and how many exits hit it."""
        label = f" [access: {self.basis.upper()}]" if self.basis != "source" else ""
        return (f"kvm_mm miss #{n} on {self.address:016x} ({self.region}) attributed at {self.where()}: "
                f"{self.count} exits{label}")


@dataclass
class CheckResult:
    """Totals over one or more logs; see :func:`check`."""

    policy: str
    vendor: str
    evidence: str  # where the objects and page tables came from ("bpf+btf", or modeled and why)
    exits: int = 0
    runs: int = 0
    # the verdicts, then the events not checked: outside the window, not on the KVM_RUN path (plain
    # strings as keys, so the dict reads the same wherever it is printed)
    classes: dict[str, int] = field(default_factory=lambda: dict.fromkeys([c.value for c in ExitClass]
                                                                          + ["outside", "not_kvm_run"], 0))
    by_kind: dict[str, Counter] = field(default_factory=dict)  # class -> Counter of exit kinds
    reasons: Counter = field(default_factory=Counter)  # "why" of host_mm switches
    faults: list[Fault] = field(default_factory=list)
    unknown_functions: Counter = field(default_factory=Counter)
    unplaced: Counter = field(default_factory=Counter)  # objects the access model names that this VM lacks
    switches: int = 0
    switch_hist: Counter = field(default_factory=Counter)  # switches per KVM_RUN -> runs
    wall_ns: int = 0
    switch_cost_ns: float = DEFAULT_SWITCH_COST_NS
    switch_cost_source: str = DEFAULT_SWITCH_COST_SOURCE
    lost_events: int = 0
    missing_chains: int = 0  # events that came without a call chain
    source_paths: int = 0  # exits whose handler path after kvm_exit was also checked from source
    emulated_paths: int = 0  # exits whose emulated instruction's execution was checked from source
    unresolved_frames: int = 0
    tracing: bool = False
    modeled: list[str] = field(default_factory=list)  # facts the verdicts rest on that were not read
    unseen: list[str] = field(default_factory=list)  # what the check could not see, and what that means
    notes: list[str] = field(default_factory=list)
    # verdicts resting on access entries not read in source: basis -> Counter(function -> exits),
    # and basis -> Counter(class -> exits); and the functions access.toml does not name, as placed
    resting: dict[str, Counter] = field(default_factory=lambda: {"inference": Counter(), "derived": Counter()})
    resting_exits: dict[str, Counter] = field(default_factory=lambda: {"inference": Counter(), "derived": Counter()})
    placed: dict[str, dict[str, Any]] = field(default_factory=dict)  # function -> basis, objects, cite

    @property
    def switches_per_run(self) -> float:
        """Address-space switches per KVM_RUN."""
        return self.switches / self.runs if self.runs else 0.0

    @property
    def overhead_ns(self) -> float:
        """Estimated cost of the switches, at ``switch_cost_ns`` each."""
        return self.switches * self.switch_cost_ns

    @property
    def overhead_share(self) -> float:
        """Estimated isolation cost as a share of the measured KVM_RUN round trips."""
        return self.overhead_ns / self.wall_ns if self.wall_ns else 0.0

    @property
    def lost(self) -> int:
        """Evidence the check did not get: lost trace records plus events without a chain."""
        return self.lost_events + self.missing_chains

    def rest(self, cls: ExitClass, resting: dict[str, str], n: int) -> None:
        """Count ``n`` exits of class ``cls`` whose verdict rests on ``resting`` (function ->
        basis): each basis once per exit, each function once per exit."""
        for basis in set(resting.values()):
            self.resting_exits[basis][cls] += n
        for fn, basis in resting.items():
            self.resting[basis][fn] += n

    def failed(self, allow_lost: bool = False) -> bool:
        """A fault, an unknown function, or (unless allowed) lost evidence."""
        return bool(self.classes[ExitClass.FAULT] or self.unknown_functions or (self.lost and not allow_lost))

    def add(self, other: "CheckResult") -> None:
        """Fold ``other`` (the same policy, another VM's log) into this result. Faults merge by
        function and object: their addresses differ between VMs."""
        for name in ("exits", "runs", "switches", "wall_ns", "lost_events", "missing_chains", "unresolved_frames",
                     "source_paths", "emulated_paths"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        for c, n in other.classes.items():
            self.classes[c] = self.classes.get(c, 0) + n
        for c, k in other.by_kind.items():
            self.by_kind.setdefault(c, Counter()).update(k)
        for attr in ("reasons", "unknown_functions", "unplaced", "switch_hist"):
            getattr(self, attr).update(getattr(other, attr))
        for basis in self.resting:
            self.resting[basis].update(other.resting[basis])
            self.resting_exits[basis].update(other.resting_exits[basis])
        for fn, how in other.placed.items():
            self.placed.setdefault(fn, how)
        mine = {(f.function, f.region): f for f in self.faults}
        for f in other.faults:
            if (f.function, f.region) in mine:
                mine[(f.function, f.region)].count += f.count
                mine[(f.function, f.region)].kinds |= f.kinds
            else:
                self.faults.append(dataclasses.replace(f, kinds=set(f.kinds)))
                mine[(f.function, f.region)] = self.faults[-1]
        for attr in ("modeled", "unseen", "notes"):
            have = getattr(self, attr)
            have.extend(x for x in getattr(other, attr) if x not in have)
        self.tracing = self.tracing or other.tracing

    def fault_lines(self) -> list[str]:
        """The RFC's report line for each distinct fault, in order of first occurrence."""
        return [f.line(i) for i, f in enumerate(self.faults)]

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready data (the keys ``kvmiso check --json`` prints)."""
        return {
            "policy": self.policy, "vendor": self.vendor, "evidence": self.evidence, "runs": self.runs,
            "exits": self.exits, "classes": self.classes, "by_kind": {c: dict(k) for c, k in self.by_kind.items()},
            "host_mm_reasons": dict(self.reasons),
            "faults": [{"line": f.line(i), "function": f.function, "offset": f.offset, "address": f.address,
                        "region": f.region, "source": f.source, "count": f.count, "kinds": sorted(f.kinds),
                        "first_access": f.first_access, "after_call": f.after_call, "on_chain": f.on_chain,
                        "stack": list(f.stack), "basis": f.basis} for i, f in enumerate(self.faults)],
            "unknown_functions": sorted(self.unknown_functions), "unplaced_objects": dict(self.unplaced),
            "switches": self.switches, "switches_per_run": self.switches_per_run,
            "switches_per_run_histogram": {str(k): v for k, v in sorted(self.switch_hist.items())},
            "wall_ns": self.wall_ns, "switch_cost_ns": self.switch_cost_ns,
            "switch_cost_source": self.switch_cost_source, "overhead_ns": self.overhead_ns,
            "overhead_share": self.overhead_share, "lost_events": self.lost_events,
            "missing_chains": self.missing_chains, "source_paths": self.source_paths,
            "emulated_paths": self.emulated_paths, "tracing": self.tracing, "modeled": self.modeled,
            "unseen": self.unseen,
            "notes": self.notes,
            **{basis: {"exits": dict(self.resting_exits[basis]), "functions": dict(self.resting[basis])}
               for basis in ("inference", "derived")},
            "placed_functions": self.placed,
        }
