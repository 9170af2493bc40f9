"""How a guest run ended: :class:`RunResult`, what :meth:`kvmiso.guest.Machine.run` returns."""

from __future__ import annotations

import base64
import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from ..kvm.exits import Exit
from .ucall import GuestAssertion, GuestException, Report, Sync


class Outcome(enum.StrEnum):
    """Every way a run can end. Each is its own string (``Outcome.DONE == "done"``), so JSON and
    text show the value and a JSON reader compares with plain strings."""

    DONE = "done"  # the DONE ucall
    FAIL = "fail"  # the FAIL ucall with a code, or a failed GUEST_ASSERT* (RunResult.assertion)
    EXCEPTION = "exception"  # the guest's exception handler reported a vector
    HALT = "halt"  # KVM_EXIT_HLT
    SHUTDOWN = "shutdown"  # KVM_EXIT_SHUTDOWN: a triple fault
    INTERNAL_ERROR = "internal-error"  # KVM_EXIT_INTERNAL_ERROR
    FAIL_ENTRY = "fail-entry"  # KVM_EXIT_FAIL_ENTRY
    SYSTEM_EVENT = "system-event"  # KVM_EXIT_SYSTEM_EVENT
    MALFORMED_UCALL = "malformed-ucall"  # a write to the ucall port that breaks the convention
    UNHANDLED_EXIT = "unhandled-exit"  # an exit Machine has no handler for
    EXIT_LIMIT = "exit-limit"  # max_exits reached
    STOPPED = "stopped"  # on_exit returned True
    TIMEOUT = "timeout"  # the deadline passed
    INTERRUPTED = "interrupted"  # a kick, SIGINT or SIGTERM ended KVM_RUN
    SYNC = "sync"  # a GUEST_SYNC, in a run asked to stop there; the next run resumes the guest


class GuestError(RuntimeError):
    """A guest run that did not end in DONE, raised by :meth:`RunResult.raise_for_guest`; the
    message is the run's detail and ``result`` the run."""

    def __init__(self, message: str, result: RunResult) -> None:
        super().__init__(message)
        self.result = result

    def __reduce__(self) -> tuple:
        return (type(self), (str(self), self.result))


class GuestAssertionError(GuestError, AssertionError):
    """A failed GUEST_ASSERT* or GUEST_FAIL: an AssertionError, as pytest shows a failed assert,
    whose message names the guest's file and line, the values and where the guest was."""


@dataclass
class RunResult:
    """How a run ended (``outcome``; None only while the run is under way), why (``detail``), and
    everything the guest produced. ``console`` holds the bytes the guest wrote to PORT_CONSOLE, exactly;
    :attr:`console_text` is them as text."""

    outcome: Outcome | None
    detail: str
    vcpu: int = 0
    exits: list[Exit] = field(default_factory=list)
    console: bytes = b""
    console_dropped: int = 0
    exits_dropped: int = 0
    reports: list[Report] = field(default_factory=list)
    fail_code: int | None = None
    exception: GuestException | None = None
    assertion: GuestAssertion | None = None  # the failed GUEST_ASSERT* or GUEST_FAIL
    syncs: list[Sync] = field(default_factory=list)  # every GUEST_SYNC of the run, in order
    sync: Sync | None = None  # the one the run stopped at (outcome SYNC)
    runs: int = 0
    elapsed: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def console_text(self) -> str:
        """The console as UTF-8 text, each byte that is not valid UTF-8 replaced by U+FFFD."""
        return self.console.decode("utf-8", "replace")

    @property
    def ok(self) -> bool:
        """The guest reported DONE."""
        return self.outcome is Outcome.DONE

    def raise_for_guest(self) -> RunResult:
        """This result if the guest reported DONE; otherwise raise :class:`GuestAssertionError`
        for a failed GUEST_ASSERT* (the message as pytest prints it) or :class:`GuestError` with
        the detail, for every other end (an exception, FAIL, a triple fault, a sync, ...).

        >>> m.run().raise_for_guest().console_text      # hello reported DONE
        'Hello from a kvmiso guest!\\n'
        >>> from kvmiso import Machine, Source
        >>> with Machine(Source.asm('''
        ...         .include "kvmiso.inc"
        ...         .globl main
        ... main:   mov $0xab, %eax
        ...         GUEST_ASSERT_EQ %eax, $0xaa
        ...         ret
        ... '''), "long", kvm=kvm) as bad:
        ...     bad.run().raise_for_guest()
        Traceback (most recent call last):
        ...
        kvmiso.guest.result.GuestAssertionError: ...: GUEST_ASSERT_EQ(%eax, $0xaa) failed: expected 0xaa, got 0xab (main+0x...)
        """
        __tracebackhide__ = True  # pytest's traceback ends at the test's line, not in here
        if self.outcome is Outcome.DONE:
            return self
        if self.assertion is not None:
            raise GuestAssertionError(self.detail, self)
        raise GuestError(f"{self.outcome}: {self.detail}", self)

    def report(self, tag: int) -> int:
        """The value of the last REPORT with ``tag``."""
        for r in reversed(self.reports):
            if r.tag == tag:
                return r.value
        raise KeyError(f"the guest sent no report with tag {tag}")

    def to_dict(self) -> dict[str, Any]:
        """The result as JSON-ready values (exits through :meth:`Exit.to_dict`). The console is
        lossless: ``console`` is :attr:`console_text`, exact when the guest wrote valid UTF-8;
        otherwise ``console_base64`` carries the exact bytes (None when ``console`` is exact)."""
        try:
            self.console.decode("utf-8")
            exact = None
        except UnicodeDecodeError:
            exact = base64.b64encode(self.console).decode("ascii")
        return {
            "outcome": self.outcome, "detail": self.detail, "vcpu": self.vcpu,
            "console": self.console_text, "console_base64": exact, "console_dropped": self.console_dropped,
            "exits_dropped": self.exits_dropped,
            "reports": [dataclasses.asdict(r) for r in self.reports], "fail_code": self.fail_code,
            "exception": dataclasses.asdict(self.exception) if self.exception else None,
            "assertion": dataclasses.asdict(self.assertion) if self.assertion else None,
            "syncs": [dataclasses.asdict(s) for s in self.syncs],
            "runs": self.runs, "elapsed_s": self.elapsed, "stats_delta": self.stats,
            "exits": [e.to_dict() for e in self.exits],
        }
