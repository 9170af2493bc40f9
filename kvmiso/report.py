"""`kvmiso report`: the whole picture of a host in one command.

Each part runs on its own: a part that cannot run here (no tracefs, no kallsyms, not root) is
reported as skipped with the reason, and the report still gives the rest.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .guest import Machine
from .guest.suite import SuiteEntry, suite
from .kvm import GuestTimeout, Kvm
from .probe import fingerprint, probe

SUITE_TIMEOUT = 5.0
EXPECTED_TIMEOUT = 0.5  # for payloads built to spin: enough to prove the stop, no more


@dataclass
class Report:
    parts: dict[str, Any] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    started: float = field(default_factory=time.time)

    def part(self, name: str, fn: Callable[[], Any]) -> Any:
        """Run one part; an exception makes it 'skipped' with the reason, not a failed report."""
        try:
            self.parts[name] = fn()
        except Exception as e:  # noqa: BLE001 - every part failure is reported, by design
            self.skipped[name] = f"{type(e).__name__}: {e}"
            self.parts[name] = None
        return self.parts[name]

    def to_dict(self) -> dict[str, Any]:
        return {"kvmiso_report": 1, "date": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(self.started)),
                "elapsed_s": round(time.time() - self.started, 1), **self.parts, "skipped": self.skipped}


def run_entry(kvm: Kvm, entry: SuiteEntry) -> dict[str, Any]:
    timeout = EXPECTED_TIMEOUT if entry.expected == "timeout" else SUITE_TIMEOUT
    with Machine(entry.payload, mode=entry.mode, cpl=entry.cpl, kvm=kvm) as m:
        entry.setup(m)
        try:
            r = m.run(timeout=timeout, **entry.run_kwargs())
        except GuestTimeout as e:
            r = e.result
    kinds: dict[str, int] = {}
    for e in r.exits:
        kinds[e.name] = kinds.get(e.name, 0) + 1
    return {"label": entry.label, "outcome": r.outcome, "expected": entry.expected,
            "as_expected": r.outcome == entry.expected, "detail": r.detail, "runs": r.runs,
            "exits": kinds, "stats_delta": r.stats}


def run_suite(kvm: Kvm, vendor: str | None) -> list[dict[str, Any]]:
    return [run_entry(kvm, e) for e in suite(vendor)]


def build(out_dir: Path) -> Report:
    rep = Report()
    with Kvm() as kvm:
        host = rep.part("host", lambda: probe(kvm))
        if host:
            rep.parts["fingerprint"] = fingerprint(host)
        rep.part("suite", lambda: run_suite(kvm, host and host["vendor"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "report.json").write_text(json.dumps(rep.to_dict(), indent=2))
    return rep


def print_summary(rep: Report, out_dir: Path) -> None:
    host = rep.parts.get("host")
    if host:
        cpl0 = "native" if host["cpl0_native"] else "emulated"
        print(f"host     {host['cpu']}, Linux {host['kernel']}, {host['vendor']} (CPL0 guest code {cpl0})")
        print(f"         {host['vendor_notes']}")
    s = rep.parts.get("suite")
    if s:
        ok = sum(x["as_expected"] for x in s)
        print(f"\nguest suite: {ok}/{len(s)} payload runs ended as expected")
        totals: dict[str, int] = {}
        for x in s:
            for k, n in x["exits"].items():
                totals[k] = totals.get(k, 0) + n
            if not x["as_expected"]:
                print(f"  UNEXPECTED {x['label']}: {x['outcome']} (expected {x['expected']}): {x['detail']}")
        print("  userspace exits by kind: " + ", ".join(f"{k} {n}" for k, n in sorted(totals.items(), key=lambda kv: -kv[1])))
    for name, why in rep.skipped.items():
        print(f"\nskipped {name}: {why}")
    print(f"\nwrote {out_dir / 'report.json'}")


def suite_ok(rep: Report) -> bool:
    s = rep.parts.get("suite")
    return bool(s) and all(x["as_expected"] for x in s)
