"""The ``perf kvm stat report`` view of an exit log: exit kinds in the kernel (``kvm_exit``
reasons on Intel and AMD, every event where there is no kvm_exit) and userspace round trips, with
counts and times, and one event formatted for people.
"""

from __future__ import annotations

import textwrap
from dataclasses import dataclass

from .exitlog import ExitLog, TraceEvent

# Events that mark a KVM_RUN's boundaries rather than an exit of their own.
BOUNDARY_EVENTS = ("kvm_userspace_exit", "kvm_entry")

_TIME_BY_EVENTS = (
    "time: no kvm_exit/kvm_entry on this host, so an event's time runs from its timestamp to the "
    "next traced event of the same KVM_RUN, or to the KVM_RUN's kvm_userspace_exit (each interval "
    "charged to the event that opens it; where the guest runs natively between two events, e.g. "
    "at CPL3, that guest time is in the interval too)")
_TIME_BY_EXITS = (
    "time: from kvm_exit to the next kvm_entry of the same vCPU, as perf kvm stat, or to "
    "kvm_userspace_exit for the exit that returns to userspace; other events are counted and "
    "their time is inside their exit's")
_TIME_USERSPACE = ("userspace round trips: the KVM_RUN ioctl timed from userspace with "
                   "CLOCK_MONOTONIC (it includes kvmiso's handling of the previous exit)")


@dataclass
class KindStat:
    """Count and times (ns) of one exit kind; ``share`` of all exits of its group."""

    kind: str
    count: int = 0
    timed: int = 0
    total_ns: int = 0
    min_ns: int = 0
    max_ns: int = 0
    share: float | None = None

    def add(self, ns: int | None = None) -> None:
        """Count one exit, with its time where known."""
        self.count += 1
        if ns is None:
            return
        ns = max(ns, 0)
        self.min_ns = ns if not self.timed else min(self.min_ns, ns)
        self.max_ns = max(self.max_ns, ns)
        self.timed += 1
        self.total_ns += ns

    @property
    def avg_ns(self) -> float:
        """Mean time of the timed ones."""
        return self.total_ns / self.timed if self.timed else 0.0


@dataclass
class ExitSummary:
    """``perf kvm stat report`` for an exit log: in-kernel exit kinds and userspace round trips."""

    method: str  # "kvm_exit" (exit -> entry, Intel/AMD) or "events" (event -> next event)
    kernel: list[KindStat]
    userspace: list[KindStat]
    runs: int
    lost_events: int
    tracing: bool

    @property
    def time_rule(self) -> str:
        """How time inside the kernel is computed on this host."""
        return _TIME_BY_EXITS if self.method == "kvm_exit" else _TIME_BY_EVENTS

    def table(self) -> str:
        """One aligned table, each group sorted by count, with the rules as its footer."""
        head = ("kind", "count", "share", "total µs", "avg µs", "min µs", "max µs")
        rows: list[tuple[str, ...]] = []

        def row(k: KindStat) -> tuple[str, ...]:
            t = (f"{k.total_ns / 1e3:.2f}", f"{k.avg_ns / 1e3:.2f}", f"{k.min_ns / 1e3:.2f}",
                 f"{k.max_ns / 1e3:.2f}") if k.timed else ("-",) * 4
            return (f"  {k.kind}", str(k.count), f"{k.share:.2%}" if k.share is not None else "-", *t)

        title = "in-kernel exits (kvm_exit reasons)" if self.method == "kvm_exit" else "in-kernel events"
        rows.append((title if self.tracing else "in-kernel events: not traced",) + ("",) * 6)
        rows += [row(k) for k in self.kernel]
        rows.append((f"userspace round trips ({self.runs} KVM_RUN calls)",) + ("",) * 6)
        rows += [row(k) for k in self.userspace]
        widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]

        def fmt(r: tuple[str, ...]) -> str:
            if all(not c for c in r[1:]):
                return r[0]
            return "  ".join(c.ljust(widths[0]) if i == 0 else c.rjust(widths[i]) for i, c in enumerate(r)).rstrip()

        notes = ([self.time_rule] if self.tracing else []) + [_TIME_USERSPACE]
        if self.lost_events:
            notes.append(f"LOST: the kernel dropped {self.lost_events} trace records (buffer full); "
                         "the counts above are short by that many")
        return "\n".join([fmt(head), *(fmt(r) for r in rows), ""] + [textwrap.fill(n, 100) for n in notes])


def summarize_exits(log: ExitLog) -> ExitSummary:
    """Count and time every exit kind in ``log`` (see :data:`ExitSummary.time_rule`)."""
    kernel: dict[str, KindStat] = {}
    user: dict[str, KindStat] = {}
    by_exits = any(e.name == "kvm_exit" for _, e in log.events())
    for r in log.records:
        kind = f"KVM_EXIT_{r.exit.name}"
        u = user.setdefault(kind, KindStat(kind))
        u.add(r.wall_ns)
        (_time_exits if by_exits else _time_events)(r.events, kernel)
    # the share is of exits: kvm_exit reasons where they exist, else every in-kernel event
    exit_kinds = {e.kind for _, e in log.events() if e.name == "kvm_exit"} if by_exits else set(kernel)
    exits = sum(kernel[k].count for k in exit_kinds)
    for k in kernel.values():
        k.share = k.count / exits if k.kind in exit_kinds else None
    for k in user.values():
        k.share = k.count / len(log.records)
    order = lambda k: (-k.count, k.kind)  # noqa: E731
    return ExitSummary("kvm_exit" if by_exits else "events", sorted(kernel.values(), key=order),
                       sorted(user.values(), key=order), len(log.records), log.lost_events, log.tracing)


def _time_exits(evs: list[TraceEvent], kernel: dict[str, KindStat]) -> None:
    """One KVM_RUN's events where ``kvm_exit`` fires: each exit reason counted and timed from
    its ``kvm_exit`` to the next boundary (``kvm_entry``, ``kvm_userspace_exit``)."""
    open_exit: tuple[KindStat, int] | None = None
    for e in evs:
        if e.name == "kvm_exit":
            if open_exit:  # two exits without an entry between them: records were lost
                open_exit[0].count += 1
            open_exit = (kernel.setdefault(e.kind, KindStat(e.kind)), e.ts_ns)
        elif e.name in BOUNDARY_EVENTS:
            if open_exit:
                open_exit[0].add(e.ts_ns - open_exit[1])
                open_exit = None
        else:
            kernel.setdefault(e.kind, KindStat(e.kind)).add()
    if open_exit:  # its kvm_entry or kvm_userspace_exit was not recorded: count, no time
        open_exit[0].count += 1


def _time_events(evs: list[TraceEvent], kernel: dict[str, KindStat]) -> None:
    """One KVM_RUN's events where no hardware exit fires: each event counted and timed to the next."""
    for i, e in enumerate(evs):
        if e.name in BOUNDARY_EVENTS:
            continue
        # the last event of a run whose end was not recorded (lost) has no time
        kernel.setdefault(e.kind, KindStat(e.kind)).add(evs[i + 1].ts_ns - e.ts_ns if i + 1 < len(evs) else None)


def format_event(e: TraceEvent, t0_ns: int) -> str:
    """One event for people: ``+1.234 µs  kvm_pio  rw=1 port=0x3000 ... val=0xa5``, with the
    symbolic names the format gives (``exit_reason=0x1e(IO_INSTRUCTION)``)."""
    parts = []
    for k, v in e.fields.items():
        text = f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) and abs(v) > 9 else str(v)
        if k in e.symbols:
            text += f"({e.symbols[k]})"
        parts.append(f"{k}={text}")
    return f"{(e.ts_ns - t0_ns) / 1e3:+10.3f} µs  cpu{e.cpu}  {e.name:<24} {' '.join(parts)}"


__all__ = ["BOUNDARY_EVENTS", "ExitSummary", "KindStat", "format_event", "summarize_exits"]
