"""How a guest run ended: :class:`RunResult`, what :meth:`kvmiso.guest.Machine.run` returns."""

from __future__ import annotations

import base64
import dataclasses
from dataclasses import dataclass, field
from typing import Any

from ..kvm.exits import Exit
from .ucall import GuestException, Report

# Every way a run can end: RunResult.outcome is always one of these.
OUTCOMES = ("done", "fail", "exception", "halt", "shutdown", "internal-error", "fail-entry",
            "system-event", "malformed-ucall", "unhandled-exit", "exit-limit", "stopped", "timeout",
            "interrupted")


@dataclass
class RunResult:
    """How a run ended (``outcome``, one of OUTCOMES), why (``detail``), and everything the guest
    produced. ``console`` holds the bytes the guest wrote to PORT_CONSOLE, exactly;
    :attr:`console_text` is them as text."""

    outcome: str
    detail: str
    vcpu: int = 0
    exits: list[Exit] = field(default_factory=list)
    console: bytes = b""
    console_dropped: int = 0
    exits_dropped: int = 0
    reports: list[Report] = field(default_factory=list)
    fail_code: int | None = None
    exception: GuestException | None = None
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
        return self.outcome == "done"

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
            "runs": self.runs, "elapsed_s": self.elapsed, "stats_delta": self.stats,
            "exits": [e.to_dict() for e in self.exits],
        }
