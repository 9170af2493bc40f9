"""A capture session: every KVM_RUN of a run as a :class:`RunRecord` with its userspace exit, the
in-kernel trace events that happened inside it and its vCPU stats delta. What runs the guest is
the caller's (:func:`kvmiso.session.capture_run` runs a Machine under one): this module only
stamps the exits it is handed and reads the trace.

Boundaries come from the run loop's ``on_exit`` hook (:meth:`CaptureWindow.on_exit`):
CLOCK_MONOTONIC when an exit reaches kvmiso (``end_ns``) and when the hook hands the exit back
(``start_ns`` of the next KVM_RUN; the run loop handles the exit after the hook, so that handling
is inside the next run's ``wall_ns``). Trace events are assigned to runs by the
``kvm_userspace_exit`` event that ends each successful KVM_RUN in the vCPU thread; without it
(not traced, or records lost), by timestamp. Where tracing cannot work the log still holds exits
and stats, and says why.

>>> from kvmiso import Machine
>>> from kvmiso.session import capture_run
>>> with Capture() as cap, Machine("cpuid", mode="long", kvm=kvm) as cpuid:   # needs root: tracefs
...     result, log = capture_run(cap, cpuid)
>>> [(e.fields["function"], e.fields["index"]) for _, e in log.events() if e.name == "kvm_cpuid"]
[(0, 0), (1, 0)]
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

from ...kvm.exits import Exit, IntrExit, detach
from .exitlog import ExitLog, RunRecord, TraceEvent
from .traceformat import FormatError
from .tracefs import DEFAULT_BUFFER_KB, TraceInstance, TracefsUnavailable

if TYPE_CHECKING:
    from ...kvm.stats import Stats


class Capture:
    """A capture session: one trace instance shared by several runs, whose logs add up in
    ``log``. ``trace``: True for every kvm/kvmmmu event this kernel has, False for none, or
    event names (see :class:`TraceInstance`).

    >>> from kvmiso import Machine
    >>> from kvmiso.session import capture_run
    >>> with Capture() as cap:                       # needs root: tracefs
    ...     for p in ("portio", "cpuid"):
    ...         with Machine(p, kvm=kvm) as pm:
    ...             result = capture_run(cap, pm, payload=p)
    >>> len(cap.log.records)                         # KVM_RUN calls: portio's 7, cpuid's 6
    13
    """

    def __init__(self, trace: bool | Iterable[str] = True, buffer_kb: int = DEFAULT_BUFFER_KB,
                 stacks: bool = True) -> None:
        self.log = ExitLog()
        self.tracer: TraceInstance | None = None
        self._trace = trace
        self._stacks = stacks
        self._buffer_kb = buffer_kb
        self.reason = "" if trace else "tracing not requested"  # why not traced, or what was

    def __enter__(self) -> "Capture":
        if self._trace:
            events = None if self._trace is True else list(self._trace)  # type: ignore[arg-type]
            try:
                self.tracer = TraceInstance(events, buffer_kb=self._buffer_kb, stacks=self._stacks)
                self.tracer.open()
                self.reason = self.tracer.describe()
            except (TracefsUnavailable, OSError) as e:
                self.tracer = None
                self.reason = str(e) if isinstance(e, TracefsUnavailable) else f"tracefs failed: {e}"
        self.log.tracing = self.tracer is not None
        self.log.tracing_reason = self.reason
        self.log.events_enabled = list(self.tracer.enabled) if self.tracer else []
        return self

    def __exit__(self, *exc: object) -> None:
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None

    def window(self, stats: Stats, vcpu: int = 0, payload: str = "",
               on_exit: Callable[[Exit], bool | None] | None = None) -> CaptureWindow:
        """Begin capturing the KVM_RUN calls the calling thread (the vCPU thread) makes on vCPU
        ``vcpu``, whose binary stats are ``stats``: hand the run loop the window's
        :meth:`~CaptureWindow.on_exit` (which calls ``on_exit`` too), then take
        :meth:`~CaptureWindow.close`'s log."""
        return CaptureWindow(self, stats, vcpu, payload, on_exit)


class CaptureWindow:
    """The KVM_RUN calls of one run under a :class:`Capture`: each exit stamped as it reaches
    userspace, the trace started now and stopped by :meth:`stop` (or :meth:`close`)."""

    def __init__(self, cap: Capture, stats: Stats, vcpu: int, payload: str,
                 user_hook: Callable[[Exit], bool | None] | None) -> None:
        self.cap, self.stats, self.vcpu, self.payload, self.user_hook = cap, stats, vcpu, payload, user_hook
        tracer = cap.tracer
        tid = tracer.kernel_tid() if tracer is not None else threading.get_native_id()
        if tracer is not None and tid not in tracer.pids:
            tracer.set_pids(tracer.pids | {tid})  # the vCPU thread is whoever runs the guest
        self.starts: list[int] = []
        self.ends: list[int] = []
        self.raws: list[bytes] = []
        self.exits: list[Exit] = []
        self.lost_before = tracer.lost if tracer else 0
        self.base = stats.read_raw()
        if tracer:
            tracer.start()
        self.starts.append(time.monotonic_ns())

    def on_exit(self, exit: Exit) -> bool | None:
        """The run loop's hook: stamp ``exit`` (detached now: its data views change with the
        next run), then ask the caller's hook whether to stop."""
        self.ends.append(time.monotonic_ns())
        self.raws.append(self.stats.read_raw())
        self.exits.append(detach(exit))
        stop = self.user_hook(exit) if self.user_hook is not None else None
        self.starts.append(time.monotonic_ns())
        return stop

    def stop(self) -> None:
        """Stop the trace (the run is over, however it ended)."""
        if self.cap.tracer:
            self.cap.tracer.stop()

    def close(self, cut_short: bool, host: dict[str, Any], incomplete: str = "") -> ExitLog:
        """The exit log of the run, also added to the session's ``log``. ``cut_short``: it ended
        inside a KVM_RUN (a timeout or a signal: an exit ``on_exit`` never saw); ``incomplete``:
        why the run ended early, if it did."""
        self.stop()
        if cut_short:
            self.ends.append(time.monotonic_ns())
            self.raws.append(self.stats.read_raw())
            self.exits.append(IntrExit())
        else:
            self.starts.pop()  # the start of a KVM_RUN that never happened
        records = [RunRecord(run=i, vcpu=self.vcpu, start_ns=s, end_ns=e, exit=x, payload=self.payload, stats=d)
                   for i, (s, e, x, d) in enumerate(zip(self.starts, self.ends, self.exits, self._deltas()))]
        log = ExitLog(records=records, host=host, tracing=self.cap.tracer is not None,
                      tracing_reason=self.cap.reason, events_enabled=list(self.cap.log.events_enabled),
                      incomplete=incomplete)
        self._read_trace(log)
        self.cap.log.extend(log)
        return log

    def _deltas(self) -> list[dict[str, Any]]:
        """The nonzero stats changes over each KVM_RUN, histograms as lists (JSON-exact)."""
        out = []
        for before, after in zip([self.base, *self.raws], self.raws):
            d = self.stats.delta(before, after)
            out.append({k: list(v) if isinstance(v, tuple) else v for k, v in d.items()})
        return out

    def _read_trace(self, log: ExitLog) -> None:
        """The trace's events into ``log``'s records, with what was lost and how they were placed."""
        tracer = self.cap.tracer
        if tracer is None:
            return
        try:
            note = assign_events(log.records, tracer.read(), lost=tracer.lost - self.lost_before,
                                 ends_traced="kvm:kvm_userspace_exit" in tracer.enabled)
        except FormatError as e:  # the run still counts: exits and stats without events
            log.tracing, note = False, f"the trace pages could not be parsed ({e}): in-kernel events left out"
        log.lost_events = tracer.lost - self.lost_before
        log.tracing_reason = "; ".join(x for x in (self.cap.reason, note) if x)


def assign_events(records: list[RunRecord], events: list[TraceEvent], lost: int = 0,
                  ends_traced: bool = False) -> str:
    """Put each event into the KVM_RUN it happened in; return a note on how, when it matters.
    ``ends_traced``: kvm_userspace_exit was enabled (so its absence means lost records, not an
    event left out); ``lost``: records the kernel could not keep.

    Each successful KVM_RUN ends with kvm_userspace_exit (errno 0) in the vCPU thread;
    interrupted ones (errno -EINTR) are retried inside Vcpu.run and belong to the same record.
    Events before the first KVM_RUN or after the last one are left out and counted.
    """
    if not records:
        return f"{len(events)} trace events outside any KVM_RUN" if events else ""
    first, last = records[0].start_ns, records[-1].end_ns
    inside = [e for e in events if first <= e.ts_ns <= last]
    outside = len(events) - len(inside)
    ends = [i for i, e in enumerate(inside) if e.name == "kvm_userspace_exit" and e.fields.get("errno", 0) == 0]
    completed = len(records) - (1 if isinstance(records[-1].exit, IntrExit) else 0)
    note = ""
    if len(ends) == completed:
        lo = 0
        for r, hi in zip(records, ends + [len(inside) - 1]):
            r.events = inside[lo : hi + 1]
            lo = hi + 1
        if completed == len(records):  # nothing can follow the last successful KVM_RUN
            outside += len(inside) - lo
    else:
        if any(e.name == "kvm_userspace_exit" for e in events) or ends:
            note = (f"{len(ends)} kvm_userspace_exit events for {completed} KVM_RUN calls: "
                    "events assigned to KVM_RUN calls by timestamp")
        elif ends_traced:
            note = (f"no kvm_userspace_exit record arrived ({lost} trace records lost): "
                    "events assigned to KVM_RUN calls by timestamp")
        else:
            note = "kvm_userspace_exit not traced: events assigned to KVM_RUN calls by timestamp"
        end_times = [r.end_ns for r in records]
        for e in inside:
            records[min(bisect.bisect_left(end_times, e.ts_ns), len(records) - 1)].events.append(e)
    if outside:
        note = "; ".join(x for x in (note, f"{outside} trace events outside any KVM_RUN left out") if x)
    return note
