"""Running a Machine under capture: every KVM_RUN as a :class:`RunRecord` with its userspace
exit, the in-kernel trace events that happened inside it and its vCPU stats delta.

Boundaries come from Machine.run's ``on_exit`` hook: CLOCK_MONOTONIC when an exit reaches
kvmiso (``end_ns``) and when the hook hands the exit back (``start_ns`` of the next KVM_RUN;
Machine.run handles the exit after the hook, so that handling is inside the next run's
``wall_ns``). Trace events are assigned to runs by the ``kvm_userspace_exit`` event that ends
each successful KVM_RUN in the vCPU thread; without it (not traced, or records lost), by
timestamp. Where tracing cannot work the log still holds exits and stats, and says why.

>>> with Machine("cpuid", mode="long") as m:
...     result, log = capture(m)
>>> [(e.fields["function"], e.fields["index"]) for _, e in log.events() if e.name == "kvm_cpuid"]
[(0, 0), (1, 0)]
"""

from __future__ import annotations

import bisect
import dataclasses
import os
import platform
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable

from ...guest.deadline import GuestTimeout
from ...guest.result import Outcome
from ...interrupt import Interrupted
from ...kvm.exits import Exit, IntrExit, detach
from .exitlog import ExitLog, RunRecord, TraceEvent
from .traceformat import FormatError
from .tracefs import DEFAULT_BUFFER_KB, TraceInstance, TracefsUnavailable

if TYPE_CHECKING:
    from ...guest import Machine, RunResult


class Capture:
    """A capture session: one trace instance shared by several runs, whose logs add up in
    ``log``. ``trace``: True for every kvm/kvmmmu event this kernel has, False for none, or
    event names (see :class:`TraceInstance`).

    >>> with Capture() as cap:
    ...     for p in ("portio", "cpuid"):
    ...         with Machine(p) as m:
    ...             cap.run(m, payload=p)
    >>> len(cap.log.records)
    9
    """

    def __init__(self, trace: bool | Iterable[str] = True, buffer_kb: int = DEFAULT_BUFFER_KB,
                 stacks: bool = True) -> None:
        self.log = ExitLog()
        self.tracer: TraceInstance | None = None
        self._trace = trace
        self._stacks = stacks
        self._buffer_kb = buffer_kb
        self._reason = "" if trace else "tracing not requested"

    def __enter__(self) -> "Capture":
        if self._trace:
            events = None if self._trace is True else list(self._trace)  # type: ignore[arg-type]
            try:
                self.tracer = TraceInstance(events, buffer_kb=self._buffer_kb, stacks=self._stacks)
                self.tracer.open()
                self._reason = self.tracer.describe()
            except (TracefsUnavailable, OSError) as e:
                self.tracer = None
                self._reason = str(e) if isinstance(e, TracefsUnavailable) else f"tracefs failed: {e}"
        self.log.tracing = self.tracer is not None
        self.log.tracing_reason = self._reason
        self.log.events_enabled = list(self.tracer.enabled) if self.tracer else []
        return self

    def __exit__(self, *exc) -> None:
        if self.tracer is not None:
            self.tracer.close()
            self.tracer = None

    def run(self, machine: "Machine", timeout: float = 5.0, payload: str = "", vcpu: int = 0,
            **run_kwargs: Any) -> tuple["RunResult", ExitLog]:
        """``machine.run(timeout, vcpu=vcpu, **run_kwargs)`` under capture; returns its result
        and the exit log of this run (also added to ``self.log``). A timeout is a result with
        outcome ``Outcome.TIMEOUT``, never a GuestTimeout. Ctrl-C or SIGTERM raises
        :class:`kvmiso.interrupt.Interrupted` whose ``partial`` is ``(result, log)``, the log
        marked ``incomplete``."""
        tracer = self.tracer
        tid = tracer.kernel_tid() if tracer is not None else threading.get_native_id()
        if tracer is not None and tid not in tracer.pids:
            tracer.set_pids(tracer.pids | {tid})  # the vCPU thread is whoever calls run()
        user_hook = run_kwargs.pop("on_exit", None)
        starts: list[int] = []
        ends: list[int] = []
        raws: list[bytes] = []
        exits: list[Exit] = []
        with machine.vcpus[vcpu].stats() as stats:

            def on_exit(exit) -> bool | None:
                ends.append(time.monotonic_ns())
                raws.append(stats.read_raw())
                exits.append(detach(exit))  # now: IO/MMIO data views change with the next run
                stop = user_hook(exit) if user_hook is not None else None
                starts.append(time.monotonic_ns())
                return stop

            lost_before = tracer.lost if tracer else 0
            base = stats.read_raw()
            if tracer:
                tracer.start()
            starts.append(time.monotonic_ns())
            interrupted: Interrupted | None = None
            try:
                result = machine.run(timeout, vcpu=vcpu, on_exit=on_exit, **run_kwargs)
            except GuestTimeout as e:
                result = e.result
            except Interrupted as e:  # Ctrl-C/SIGTERM: keep what was seen, then re-raise
                if e.partial is None:  # it came before the run began: nothing was seen
                    raise
                interrupted, result = e, e.partial
            finally:
                if tracer:
                    tracer.stop()
            if result.outcome in (Outcome.TIMEOUT, Outcome.INTERRUPTED):  # an IntrExit: on_exit never saw it
                ends.append(time.monotonic_ns())
                raws.append(stats.read_raw())
                exits.append(IntrExit())
            else:
                starts.pop()  # the start of a KVM_RUN that never happened
            deltas = [_delta(stats, before, after) for before, after in zip([base, *raws], raws)]
        records = [RunRecord(run=i, vcpu=vcpu, start_ns=s, end_ns=e, exit=x, payload=payload, stats=d)
                   for i, (s, e, x, d) in enumerate(zip(starts, ends, exits, deltas))]
        log = ExitLog(records=records, host=_host(machine), tracing=tracer is not None,
                      tracing_reason=self._reason, events_enabled=list(self.log.events_enabled))
        if tracer is not None:
            try:
                note = assign_events(records, tracer.read(), lost=tracer.lost - lost_before,
                                     ends_traced="kvm:kvm_userspace_exit" in tracer.enabled)
            except FormatError as e:  # the run still counts: exits and stats without events
                log.tracing, note = False, f"the trace pages could not be parsed ({e}): in-kernel events left out"
            log.lost_events = tracer.lost - lost_before
            log.tracing_reason = "; ".join(x for x in (self._reason, note) if x)
        if interrupted is not None:
            log.incomplete = f"interrupted by {interrupted.signal.name}"
        self.log.extend(ExitLog(records=[dataclasses.replace(r) for r in records], host=log.host,
                                tracing=log.tracing, tracing_reason=log.tracing_reason,
                                events_enabled=log.events_enabled, lost_events=log.lost_events,
                                incomplete=log.incomplete))
        if interrupted is not None:  # the partial capture, marked incomplete, for the caller to keep
            raise Interrupted.of(interrupted, (result, log)) from None
        return result, log


def capture(machine: "Machine", timeout: float = 5.0, trace: bool | Iterable[str] = True, payload: str = "",
            **run_kwargs: Any) -> tuple["RunResult", ExitLog]:
    """Run ``machine`` once under capture (a :class:`Capture` of one run).

    ``run_kwargs`` go to Machine.run (``on_io``, ``on_msr``, ``on_exit``, ``vcpu``, ...).
    Never raises GuestTimeout: a timeout is ``result.outcome == Outcome.TIMEOUT`` plus the log.
    """
    with Capture(trace) as cap:
        return cap.run(machine, timeout=timeout, payload=payload, **run_kwargs)


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


def _delta(stats, before: bytes, after: bytes) -> dict[str, Any]:
    """The nonzero stats changes between two raw reads, histograms as lists (JSON-exact)."""
    d = stats.delta(before, after)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _host(machine: "Machine") -> dict[str, Any]:
    from ...host import cpu_model

    return {"kernel": platform.release(), "vendor": machine.vendor, "cpu": cpu_model(), "pid": os.getpid()}
