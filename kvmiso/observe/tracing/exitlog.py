"""The unified exit log: one record per KVM_RUN call with the userspace exit it returned, the
in-kernel trace events that happened inside it (in order), and the vCPU stats delta.

Serialised as JSON lines: a header line, then one line per record; ``read_jsonl(write_jsonl(x))``
gives back ``x`` exactly.

>>> from kvmiso import Machine
>>> from kvmiso.observe.tracing.capture import Capture
>>> from kvmiso.session import capture_run
>>> with Capture() as cap, Machine("portio", "long", kvm=kvm) as pm:    # needs root: tracefs
...     result = capture_run(cap, pm, payload="portio")
>>> log = cap.log
>>> log.records[0].exit                    # portio's first OUT, with what KVM did inside the KVM_RUN
IoExit(port=12288, size=1, count=1, is_in=False)
>>> names = [e.name for e in log.records[0].events]
>>> "kvm_pio" in names, names[-1]
(True, 'kvm_userspace_exit')

Records hold the exit as the typed, detached :class:`kvmiso.kvm.exits.Exit` that ``Vcpu.run()``
returned; JSON exists only here, in the writer and the reader.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Iterable, Iterator

from ...kvm.exits import Exit, exit_from_dict

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
    exit: Exit  # the userspace exit, detached from the kvm_run page
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
    # events that fired but were left out on purpose (too many to trace), with how many fired
    # where a counter says (kvm_emulate_insn: the vCPUs' insn_emulation stat), else None
    untraced: dict[str, int | None] = field(default_factory=dict)
    lost_events: int = 0  # records the kernel dropped (buffer full): counted, never hidden
    incomplete: str = ""  # why the capture ended early (e.g. "interrupted by SIGTERM"), or ""

    def events(self) -> Iterator[tuple[RunRecord, TraceEvent]]:
        """Every (record, event) pair, in order."""
        for r in self.records:
            for e in r.events:
                yield r, e

    def extend(self, other: "ExitLog") -> None:
        """Append copies of ``other``'s records (numbered on from this log's) and what its capture
        could not see; ``other`` is left as it was."""
        base = len(self.records)
        self.records.extend(replace(r, run=r.run + base) for r in other.records)
        self.lost_events += other.lost_events
        self.incomplete = self.incomplete or other.incomplete
        self.tracing = self.tracing or other.tracing
        for name in other.events_enabled:
            if name not in self.events_enabled:
                self.events_enabled.append(name)
        for name, n in other.untraced.items():
            mine = self.untraced.get(name, 0)
            self.untraced[name] = None if n is None or mine is None else mine + n
        if other.tracing_reason and other.tracing_reason not in self.tracing_reason:
            self.tracing_reason = "; ".join(x for x in (self.tracing_reason, other.tracing_reason) if x)
        self.host = self.host or other.host

    def header(self) -> dict[str, Any]:
        """The first JSON line: format version, host and what was traced."""
        return {"kvmiso_exitlog": FORMAT_VERSION, "host": self.host, "tracing": self.tracing,
                "tracing_reason": self.tracing_reason, "events_enabled": self.events_enabled,
                "untraced": self.untraced, "lost_events": self.lost_events, "incomplete": self.incomplete, "records": len(self.records)}

    def write_jsonl(self, path: str | Path) -> None:
        """Write the log as JSON lines."""
        with open(path, "w") as f:
            for line in self.iter_jsonl():
                f.write(line + "\n")

    def iter_jsonl(self) -> Iterator[str]:
        """The log's JSON lines."""
        yield json.dumps(self.header())
        for r in self.records:
            d = {f.name: getattr(r, f.name) for f in fields(r)}
            d["exit"] = r.exit.to_dict()
            d["events"] = [asdict(e) for e in r.events]
            yield json.dumps(d)


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
                  untraced=head.get("untraced", {}), lost_events=head.get("lost_events", 0), incomplete=head.get("incomplete", ""))
    for n, line in enumerate(it, start=2):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            d["exit"] = exit_from_dict(d["exit"])
            d["events"] = [TraceEvent(**{**e, "stack": tuple(e.get("stack", ()))}) for e in d.get("events", [])]
            log.records.append(RunRecord(**d))
        except (json.JSONDecodeError, TypeError, KeyError, ValueError) as e:
            raise ExitLogError(f"{source}:{n}: malformed record ({e})") from None
    return log
