"""Running a Machine under capture: the run loop handed a capture window's ``on_exit``, a
timeout or a signal kept as a result, and the exit log of the run with it
(:mod:`kvmiso.observe.tracing.capture` stamps and traces; this module runs the guest).

>>> with Machine("cpuid", mode="long", kvm=kvm) as cpuid:   # needs root: tracefs
...     result, log = capture(cpuid)
>>> [(e.fields["function"], e.fields["index"]) for _, e in log.events() if e.name == "kvm_cpuid"]
[(0, 0), (1, 0)]
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterable, NamedTuple

from ..guest import GuestTimeout, Machine, Outcome, RunResult
from ..host import Host
from ..interrupt import Interrupted
from ..observe.kernel.evidence import Evidence, collect_evidence
from ..observe.tracing.capture import Capture
from ..observe.tracing.exitlog import ExitLog


class RunCapture(NamedTuple):
    """A run under capture: its result and its exit log (also what an interrupted capture
    carries as ``Interrupted.partial``, the log marked ``incomplete``)."""

    result: RunResult
    log: ExitLog


def capture_run(cap: Capture, machine: Machine, timeout: float = 5.0, payload: str = "", vcpu: int = 0,
                **run_kwargs: Any) -> RunCapture:
    """``machine.run(timeout, vcpu=vcpu, **run_kwargs)`` under ``cap``: its result and the exit
    log of this run (also added to ``cap.log``). A timeout is a result with outcome
    ``Outcome.TIMEOUT``, never a GuestTimeout. Ctrl-C or SIGTERM raises
    :class:`kvmiso.interrupt.Interrupted` whose ``partial`` is the :class:`RunCapture` so far."""
    with machine.vcpus[vcpu].stats() as stats:
        window = cap.window(stats, vcpu, payload, run_kwargs.pop("on_exit", None))
        interrupted: Interrupted | None = None
        try:
            result = machine.run(timeout, vcpu=vcpu, on_exit=window.on_exit, **run_kwargs)
        except GuestTimeout as e:
            result = e.result
        except Interrupted as e:  # Ctrl-C/SIGTERM: keep what was seen, then re-raise
            if e.partial is None:  # it came before the run began: nothing was seen
                raise
            interrupted, result = e, e.partial
        finally:
            window.stop()
        cut_short = result.outcome in (Outcome.TIMEOUT, Outcome.INTERRUPTED)  # an IntrExit: on_exit never saw it
        why = f"interrupted by {interrupted.signal.name}" if interrupted is not None else ""
        log = window.close(cut_short, Host.read().exitlog_host(os.getpid()), why)
    if interrupted is not None:  # the partial capture, marked incomplete, for the caller to keep
        raise Interrupted.of(interrupted, RunCapture(result, log)) from None
    return RunCapture(result, log)


def capture(machine: Machine, timeout: float = 5.0, trace: bool | Iterable[str] = True, payload: str = "",
            **run_kwargs: Any) -> RunCapture:
    """Run ``machine`` once under capture (a :class:`Capture` of one run).

    ``run_kwargs`` go to Machine.run (``on_io``, ``on_msr``, ``on_exit``, ``vcpu``, ...).
    Never raises GuestTimeout: a timeout is ``result.outcome == Outcome.TIMEOUT`` plus the log.
    """
    with Capture(trace) as cap:
        return capture_run(cap, machine, timeout=timeout, payload=payload, **run_kwargs)


@dataclass
class CapturedRun:
    """One guest run: its result, its exit log (events with call chains) and the evidence of
    its VM, read while the VM lived."""

    label: str
    result: RunResult
    log: ExitLog
    evidence: Evidence


def capture_checked(machine: Machine, cap: Capture, label: str, timeout: float = 5.0, **run_kwargs: Any) -> CapturedRun:
    """Run ``machine`` under ``cap``, then read its VM's evidence (in this thread: the vCPU task)."""
    result, log = capture_run(cap, machine, timeout=timeout, payload=label, **run_kwargs)
    return CapturedRun(label, result, log, machine_evidence(machine, log))


def machine_evidence(machine: Machine, log: ExitLog | None = None) -> Evidence:
    """The evidence of ``machine``'s VM, with the functions of ``log``'s call chains."""
    code = {a for _, e in log.events() for a in e.stack} if log is not None else set()
    return collect_evidence(machine.vm, machine.vendor or "", code)
