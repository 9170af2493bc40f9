"""What ``kvmiso check --measured`` finds over a whole record: per policy, the measured verdicts
(each distinct miss numbered, as the RFC numbers its faults), their agreement with the model's
on the paired exits, and each disagreement with its reason; the access model's table and scores.

>>> res = MeasuredResult(runs, table, ("rfc-v1", "asi"))               # doctest: +SKIP
>>> res.agreement("rfc-v1")                                            # doctest: +SKIP
(402, 404)
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from .accessmeasure import AccessTable
from .measuredcompare import ExitPair, RunComparison
from .chainwalk import Verdict
from .checkresult import ExitClass
from .measuredexits import MeasuredVerdict, Miss
from .policy import CONTEXT_SWITCH
from .windowpath import IRQ_STUBS

FAULT_IN = ("clear_page", "copy_page")  # a new page of a user mapping, filled through the direct map


# Why a paired exit's two verdicts can differ without the model being wrong: the recorded exit
# and the traced one are two runs of the same payload.
TIMING = "timing"  # an interrupt or a context switch came before the first miss in one of them
STATE = "state"  # the recorded exit met state the trace cannot show (a guest page not yet populated)
MODEL = "model"  # the model's path or objects differ from the record's
UNMODELED = (TIMING, STATE)


@dataclass(frozen=True)
class Disagreement:
    """One paired exit whose measured and modeled classes differ, why, and whose it is
    (``category``: timing, state or model)."""

    policy: str
    run: str
    window: int  # the window's sequence number on its vCPU
    kind: str
    measured: str
    modeled: str
    reason: str
    category: str


@dataclass
class DistinctMiss:
    """One distinct measured miss (function and object): the first exit's miss, how many exits
    made it, and of which kinds."""

    miss: Miss
    count: int
    kinds: Counter


class MeasuredResult:
    """The runs compared and the access table, over ``policies``."""

    def __init__(self, runs: list[RunComparison], table: AccessTable, policies: tuple[str, ...]) -> None:
        self.runs = runs
        self.table = table
        self.policies = policies

    def windows(self) -> list[tuple[str, ExitPair]]:
        """Every pair that has a window, with its run's label."""
        return [(r.label, p) for r in self.runs for p in r.pairs if p.window is not None]

    def classes(self, policy: str) -> Counter:
        """Measured classes of every window under ``policy``."""
        return Counter(p.measured[policy].cls for _, p in self.windows())

    def misses(self, policy: str) -> list[DistinctMiss]:
        """Each distinct (function, object) measured miss under ``policy``, in order of first
        occurrence (the #N of its line)."""
        out: dict[tuple[str, str], DistinctMiss] = {}
        for _, p in self.windows():
            m = p.measured[policy].miss
            if m is None:
                continue
            d = out.get((m.site.function, m.named.object))
            if d is None:
                d = out[(m.site.function, m.named.object)] = DistinctMiss(m, 0, Counter())
            d.count += 1
            d.kinds[p.measured[policy].kind] += 1
        return list(out.values())

    def switches(self, policy: str) -> Counter:
        """Why exits switched (not on a miss) under ``policy``, counted."""
        return Counter(p.measured[policy].why for _, p in self.windows()
                       if p.measured[policy].cls is ExitClass.HOST_MM and p.measured[policy].miss is None)

    def agreement(self, policy: str, leave_out: tuple[str, ...] = ()) -> tuple[int, int]:
        """(paired exits whose classes agree, paired exits) under ``policy``; ``leave_out``:
        the categories of disagreement (:data:`UNMODELED`) whose exits are not counted."""
        got = [r.agreement(policy) for r in self.runs]
        left = sum(1 for d in self.disagreements(policy) if d.category in leave_out)
        return sum(a for a, _ in got), sum(n for _, n in got) - left

    def unpaired(self) -> tuple[int, int]:
        """(windows, traced exits) left without a partner."""
        ps = [p for r in self.runs for p in r.pairs]
        return sum(p.model_kind is None for p in ps), sum(p.window is None for p in ps)

    def disagreements(self, policy: str) -> list[Disagreement]:
        """Every paired exit whose classes differ under ``policy``, with its reason."""
        out = []
        for r in self.runs:
            for p in r.paired():
                if p.agrees(policy):
                    continue
                m, v = p.measured[policy], p.modeled.get(policy)
                why, category = reason(p, policy)
                out.append(Disagreement(policy, r.label, p.window.window.seq, m.kind, measured_text(m),
                                        modeled_text(v), why, category))
        return out


def measured_text(m: MeasuredVerdict) -> str:
    """A measured verdict in a few words."""
    if m.miss is not None:
        return f"{m.cls} on {m.miss.named.text()} at {m.miss.site.text()}"
    return f"{m.cls}" + (f" at {m.switch.text()}" if m.switch is not None else "")


def modeled_text(v: Verdict | None) -> str:
    """A model verdict in a few words (None: it stays)."""
    if v is None:
        return ExitClass.KVM_MM
    if v.fault is not None:
        return f"{v.cls} on {v.fault.region} attributed at {v.fault.where()}"
    return f"{v.cls}: {v.why}"


def reason(p: ExitPair, policy: str) -> tuple[str, str]:
    """Why the measured and modeled classes of ``p`` differ, as far as the two sides tell, and
    whose the difference is (:data:`TIMING`, :data:`STATE` or :data:`MODEL`)."""
    m, v = p.measured[policy], p.modeled.get(policy)
    if m.switch is not None and m.switch.function.startswith(IRQ_STUBS):
        return ("an interrupt arrived in the recorded exit before any miss (the traced exit had none there)", TIMING)
    if m.switch is not None and m.switch.function in CONTEXT_SWITCH:
        return ("the vCPU thread gave way (a context switch) in the recorded exit before any miss", TIMING)
    if m.miss is not None and m.miss.site.function.startswith(FAULT_IN) and m.miss.named.member == "(direct-map alias)":
        return ("the first touch of a guest page the VMM had never written: KVM's get_user_pages faulted it in and the "
                f"kernel cleared the new GFP_USER page through the direct map ({m.miss.site.function}); whether a page "
                "is new is not in the trace", STATE)
    if v is not None and v.cls is ExitClass.UNKNOWN:
        return f"the model does not know a function on the traced path ({v.why})", MODEL
    if m.miss is not None and (v is None or v.cls != m.cls):
        return (f"the record shows {m.miss.site.function} touching {m.miss.named.object}, which the model's path for "
                "this exit does not reach", MODEL)
    if v is not None and v.fault is not None:
        return (f"the model predicts {v.fault.function} touching {v.fault.region}; the record shows no access to it "
                "before the exit's end", MODEL)
    return "the classes differ (see both verdicts)", MODEL


__all__ = ["Disagreement", "DistinctMiss", "MODEL", "MeasuredResult", "STATE", "TIMING", "UNMODELED", "measured_text", "modeled_text", "reason"]
