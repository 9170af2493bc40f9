"""The unified exit log: one record per KVM_RUN call with the userspace exit it returned, the
in-kernel trace events that happened inside it (in order), and the vCPU stats delta.

Serialised as JSON lines: a header line, then one line per record; ``read_jsonl(write_jsonl(x))``
gives back ``x`` exactly.

>>> log.records[0].exit["exit"], [e.name for e in log.records[0].events]
('IO', ['kvm_emulate_insn', 'kvm_pio', 'kvm_userspace_exit'])
"""

from __future__ import annotations

import json
import textwrap
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

FORMAT_VERSION = 1


@dataclass(frozen=True)
class TraceEvent:
    """One tracefs record. ``ts_ns`` is on CLOCK_MONOTONIC (the instance uses trace_clock mono)."""

    ts_ns: int
    system: str  # "kvm" or "kvmmmu"
    name: str  # "kvm_pio", "kvm_exit", ...
    cpu: int
    pid: int
    fields: dict[str, Any] = field(default_factory=dict)
    symbols: dict[str, str] = field(default_factory=dict)  # field -> name from the format's symbol tables
    stack: tuple[int, ...] = ()  # kernel return addresses when the event fired, innermost first

    @property
    def kind(self) -> str:
        """What kind of exit this event marks: the exit reason's name for ``kvm_exit``
        (``IO_INSTRUCTION`` on Intel, ``io`` on AMD), the event name otherwise."""
        if self.name == "kvm_exit":
            return self.symbols.get("exit_reason") or f"exit_reason {self.fields.get('exit_reason', -1):#x}"
        return self.name


@dataclass
class RunRecord:
    """One KVM_RUN call: when it returned, what it returned, what happened inside it."""

    run: int  # index of this KVM_RUN in the capture, from 0
    vcpu: int
    start_ns: int  # CLOCK_MONOTONIC just before the ioctl (approximately: when capture's on_exit hook
    #                handed the previous exit back, so Machine's handling of it counts in this run)
    end_ns: int  # CLOCK_MONOTONIC when the exit reached userspace
    exit: dict[str, Any]  # Exit.to_dict() of the userspace exit
    payload: str = ""
    events: list[TraceEvent] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)  # nonzero vCPU stats deltas over this run

    @property
    def wall_ns(self) -> int:
        """The KVM_RUN's duration as userspace timed it."""
        return self.end_ns - self.start_ns


@dataclass
class ExitLog:
    """Records of one or more captured runs plus what the capture could and could not see."""

    records: list[RunRecord] = field(default_factory=list)
    host: dict[str, Any] = field(default_factory=dict)  # kernel, vendor, cpu: where it was taken
    tracing: bool = False  # were in-kernel events captured?
    tracing_reason: str = ""  # why not, or which events were missing
    events_enabled: list[str] = field(default_factory=list)  # "kvm:kvm_pio", ...
    lost_events: int = 0  # records the kernel dropped (buffer full): counted, never hidden
    incomplete: str = ""  # why the capture ended early (e.g. "interrupted by SIGTERM"), or ""

    def events(self) -> Iterator[tuple[RunRecord, TraceEvent]]:
        """Every (record, event) pair, in order."""
        for r in self.records:
            for e in r.events:
                yield r, e

    def extend(self, other: "ExitLog") -> None:
        """Append ``other``'s records (renumbered) and what its capture could not see."""
        base = len(self.records)
        for r in other.records:
            r.run += base
            self.records.append(r)
        self.lost_events += other.lost_events
        self.incomplete = self.incomplete or other.incomplete
        self.tracing = self.tracing or other.tracing
        for name in other.events_enabled:
            if name not in self.events_enabled:
                self.events_enabled.append(name)
        if other.tracing_reason and other.tracing_reason not in self.tracing_reason:
            self.tracing_reason = "; ".join(x for x in (self.tracing_reason, other.tracing_reason) if x)
        self.host = self.host or other.host

    def header(self) -> dict[str, Any]:
        """The first JSON line: format version, host and what was traced."""
        return {"kvmiso_exitlog": FORMAT_VERSION, "host": self.host, "tracing": self.tracing,
                "tracing_reason": self.tracing_reason, "events_enabled": self.events_enabled,
                "lost_events": self.lost_events, "incomplete": self.incomplete, "records": len(self.records)}

    def write_jsonl(self, path: str | Path) -> None:
        """Write the log as JSON lines."""
        with open(path, "w") as f:
            for line in self.iter_jsonl():
                f.write(line + "\n")

    def iter_jsonl(self) -> Iterator[str]:
        """The log's JSON lines."""
        yield json.dumps(self.header())
        for r in self.records:
            yield json.dumps(asdict(r))


class ExitLogError(ValueError):
    """A file that is not a kvmiso exit log, or one of another format version."""


def read_jsonl(path: str | Path) -> ExitLog:
    """An exit log from a JSON-lines file."""
    with open(path) as f:
        return parse_jsonl(f, str(path))


def parse_jsonl(lines: Iterable[str], source: str = "<exit log>") -> ExitLog:
    """An exit log from JSON lines; ExitLogError names ``source`` and the line."""
    it = iter(lines)
    try:
        head = json.loads(next(it))
    except (StopIteration, json.JSONDecodeError) as e:
        raise ExitLogError(f"{source}:1: not a kvmiso exit log ({e})") from None
    if not isinstance(head, dict) or "kvmiso_exitlog" not in head:
        raise ExitLogError(f"{source}:1: not a kvmiso exit log (no kvmiso_exitlog header)")
    if head["kvmiso_exitlog"] != FORMAT_VERSION:
        raise ExitLogError(f"{source}:1: exit log format {head['kvmiso_exitlog']}, this kvmiso reads {FORMAT_VERSION}")
    log = ExitLog(host=head.get("host", {}), tracing=head.get("tracing", False),
                  tracing_reason=head.get("tracing_reason", ""), events_enabled=head.get("events_enabled", []),
                  lost_events=head.get("lost_events", 0), incomplete=head.get("incomplete", ""))
    for n, line in enumerate(it, start=2):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            d["events"] = [TraceEvent(**{**e, "stack": tuple(e.get("stack", ()))}) for e in d.get("events", [])]
            log.records.append(RunRecord(**d))
        except (json.JSONDecodeError, TypeError) as e:
            raise ExitLogError(f"{source}:{n}: malformed record ({e})") from None
    return log


# --- the perf-kvm-stat view ------------------------------------------------------------------

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


def summarize(log: ExitLog) -> ExitSummary:
    """Count and time every exit kind in ``log`` (see :data:`ExitSummary.time_rule`)."""
    kernel: dict[str, KindStat] = {}
    user: dict[str, KindStat] = {}
    by_exits = any(e.name == "kvm_exit" for _, e in log.events())
    for r in log.records:
        u = user.setdefault(f"KVM_EXIT_{r.exit.get('exit', '?')}", KindStat(f"KVM_EXIT_{r.exit.get('exit', '?')}"))
        u.add(r.wall_ns)
        evs = r.events
        if by_exits:
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
        else:
            for i, e in enumerate(evs):
                if e.name in BOUNDARY_EVENTS:
                    continue
                # the last event of a run whose end was not recorded (lost) has no time
                kernel.setdefault(e.kind, KindStat(e.kind)).add(evs[i + 1].ts_ns - e.ts_ns if i + 1 < len(evs) else None)
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
