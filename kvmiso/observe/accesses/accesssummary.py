"""An access record, symbolized with the guest's kallsyms of the same boot: per window, the
handler that ran, and each function with its reads and writes in the order it first touched
memory (the path the exit took). The start of the measured check (``kvmiso check --measured``).

Where the data lies is told coarsely: ``user`` (below the kernel's half: the VMM's memory),
``image`` (the kernel image, between its first and last symbol), ``module`` (a loaded module's
symbols' span) and ``other`` (the direct map, vmalloc and stacks, per-CPU areas: the layout
bases that tell those apart are not in the record).

>>> summaries = summarize(read_record("/tmp/rec"))                       # doctest: +SKIP
>>> summaries[2].handler, summaries[2].functions[0].function               # doctest: +SKIP
('npf_interception', '__svm_vcpu_run')
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Callable

from .accessrecord import KERNEL_MIN, AccessRecord, Window
from ..kernel.kallsyms import START_KERNEL_MAP, Symbols

# kvm_amd's exit handlers (svm.c's svm_exit_handlers[], Linux 6.1): its own *_interception
# functions and x86.c's kvm_emulate_* for CPUID, HLT, VMMCALL and the like; msr_interception is
# inlined into svm_invoke_exit_handler, so kvm_emulate_rdmsr/wrmsr stand for it. The first of
# them that touches memory names what the exit was; intr_interception, inlined, touches none
# of its own.
HANDLER = re.compile(r"\w+_interception|kvm_emulate_(cpuid|halt|hypercall|rdmsr|wrmsr|wbinvd|invd|monitor|mwait|"
                     r"xsetbv|rdpmc|as_nop|ap_reset_hold)|handle_ud|kvm_handle_invpcid")
REGIONS = ("user", "image", "module", "other")
REASON_TEXT = {"vmrun": "ended at the next VMRUN (handled in the kernel)",
               "user": "ended in user mode (to the VMM, or the thread gave way)",
               "end": "still open when QEMU ended"}


@dataclass(frozen=True)
class FunctionAccesses:
    """One function's accesses in one window: ``module`` is "" for the kernel image."""

    function: str
    module: str
    reads: int
    writes: int


@dataclass(frozen=True)
class WindowSummary:
    """One window, symbolized: its handler (None when no exit handler touched memory of its
    own: an interrupt exit), its functions in the order they first touched memory, and where
    the data lay."""

    window: Window
    handler: str | None
    functions: tuple[FunctionAccesses, ...]
    regions: dict[str, int] = field(default_factory=dict)

    @property
    def reads(self) -> int:
        """Loads kept in the window."""
        return sum(f.reads for f in self.functions)

    @property
    def writes(self) -> int:
        """Stores kept in the window."""
        return sum(f.writes for f in self.functions)


class _Where:
    """Address -> (function, module) and data address -> region, cached per address: a window
    repeats a few thousand instructions over and over."""

    def __init__(self, symbols: Symbols) -> None:
        self.symbols = symbols
        self.image_low = symbols.get("_text") or START_KERNEL_MAP
        self.image_high = symbols.image_high or START_KERNEL_MAP
        self._code: dict[int, tuple[str, str]] = {}

    def code(self, pc: int) -> tuple[str, str]:
        got = self._code.get(pc)
        if got is None:
            found = self.symbols.resolve(pc)
            got = self._code[pc] = (found[0] if found else f"{pc:#x}", self.symbols.module_at(pc) or "")
        return got

    def region(self, addr: int) -> str:
        if addr < KERNEL_MIN:
            return "user"
        if self.image_low <= addr <= self.image_high:
            return "image"
        if addr >= START_KERNEL_MAP and self.symbols.module_at(addr):
            return "module"
        return "other"


def summarize(record: AccessRecord) -> list[WindowSummary]:
    """Every window of ``record``, symbolized. ValueError when the record has no kallsyms: a
    record is symbolized with its own boot's symbols only (KASLR)."""
    if record.symbols is None:
        raise ValueError(f"{record.directory} has no kallsyms of the guest: the record cannot be symbolized "
                         "(kvmiso boot --record-accesses writes them when the command ends)")
    where = _Where(record.symbols)
    return [_summarize_window(w, where) for w in record.windows]


def _summarize_window(window: Window, where: _Where) -> WindowSummary:
    counts: dict[tuple[str, str], list[int]] = {}
    regions = dict.fromkeys(REGIONS, 0)
    region_of: dict[int, str] = {}
    for a in window.accesses:
        c = counts.setdefault(where.code(a.pc), [0, 0])
        c[a.flags & 1] += 1
        page = a.addr >> 12
        r = region_of.get(page)
        if r is None:
            r = region_of[page] = where.region(a.addr)
        regions[r] += 1
    functions = tuple(FunctionAccesses(f, m, r, w) for (f, m), (r, w) in counts.items())
    handler = next((f.function for f in functions if HANDLER.fullmatch(f.function)), None)
    return WindowSummary(window, handler, functions, regions)


def summary_text(record: AccessRecord, summaries: list[WindowSummary], top: int | None = None,
                 note: Callable[[WindowSummary], str] | None = None) -> str:
    """A person's view: per window its handler, totals, ``note`` (a line of the caller's:
    the access model's verdict) and functions (``top``: the busiest that many, still in path
    order; None: all)."""
    lines = [f"access record {record.directory}: {len(summaries)} windows on vCPU "
             f"{', '.join(map(str, record.vcpus())) or '-'} (source: tcg-plugin, QEMU plugin API {record.api}; "
             f"symbols: the guest's kallsyms of the same boot)"]
    for s in summaries:
        w = s.window
        cut = f"; {w.dropped:,} more dropped past the cap" if w.dropped else ""
        lines.append(f"vCPU {w.vcpu} window {w.seq}: {s.handler or 'no handler of its own (an interrupt exit?)'}; "
                     f"{REASON_TEXT[w.reason]}; {w.insns:,} instructions, {len(w.accesses):,} accesses "
                     f"({s.reads:,} reads, {s.writes:,} writes; "
                     + ", ".join(f"{s.regions[r]:,} {r}" for r in REGIONS if s.regions.get(r))
                     + f"; {w.filtered} of VMRUN/VMLOAD/VMSAVE filtered{cut})")
        if note is not None:
            lines.append(f"    {note(s)}")
        shown = s.functions
        if top is not None and len(shown) > top:
            keep = set(sorted(shown, key=lambda f: -(f.reads + f.writes))[:top])
            shown = tuple(f for f in shown if f in keep)
            lines.append(f"    ({len(s.functions) - top} functions with fewer accesses not shown)")
        lines.append(f"    {'reads':>6} {'writes':>6}  function")
        lines += [f"    {f.reads:>6} {f.writes:>6}  {f.function}{f' [{f.module}]' if f.module else ''}" for f in shown]
    return "\n".join(lines)


def summary_dict(record: AccessRecord, summaries: list[WindowSummary]) -> dict[str, Any]:
    """The same as JSON-ready data."""
    return {"directory": str(record.directory), "source": "tcg-plugin", "plugin_api": record.api, "cap": record.cap,
            "windows": [{"vcpu": s.window.vcpu, "seq": s.window.seq, "reason": s.window.reason,
                         "handler": s.handler, "instructions": s.window.insns, "accesses": len(s.window.accesses),
                         "reads": s.reads, "writes": s.writes, "dropped": s.window.dropped,
                         "filtered": s.window.filtered, "regions": s.regions,
                         "functions": [{"function": f.function, "module": f.module, "reads": f.reads,
                                        "writes": f.writes} for f in s.functions]}
                        for s in summaries]}


__all__ = ["FunctionAccesses", "WindowSummary", "summarize", "summary_dict", "summary_text"]
