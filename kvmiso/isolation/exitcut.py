"""Cutting a KVM_RUN's events into exits, from the kernel's own markers: ``kvm_exit`` where the
vendor module fires it, else (kvm_pvm) the exit handler's own frames on each event's call chain.
"""

from __future__ import annotations

from ..observe.kernel.evidence import Frame
from ..observe.tracing.exitlog import TraceEvent
from .access import base_name

RUN_PATH = "kvm_arch_vcpu_ioctl_run"  # an event below it happened inside KVM_RUN


def cut_exits(log_has_exit_events: bool, events: list[TraceEvent], chains: list[list[Frame]]) -> list[list[int]]:
    """Indexes of the events of each exit; events before the first opener belong to the first.

    With ``kvm_exit`` (VMX/SVM) each VM entry (``kvm_entry``, where the kernel fires it) opens
    one round trip: the entry, its ``kvm_exit`` and the handling after it are one exit. Without it (kvm_pvm), one call of the
    exit handler is one exit, told apart by the handler's own frames: the chain from KVM_RUN down
    to the emulator's entry (``x86_emulate_instruction``), or 4 frames deep (the handler's
    dispatch). Within one call, straight-line code only moves forward: where two events' frames
    first differ, a lower return address in the same function, or another function called from
    the same place, is the next exit. Two markers open one too: an event at or before the place
    where the current exit's instruction was decoded (``kvm_emulate_insn``) begins the next
    instruction, and the guest page-table walk a shadow page fault starts with (the walker
    called from ``paging*_page_fault``) begins the next page fault.
    """
    groups: list[list[int]] = [[]]
    opener = "kvm_entry" if any(e.name == "kvm_entry" for e in events) else "kvm_exit"
    prev: tuple[tuple[str, int], ...] = ()
    decoded: tuple[int, ...] | None = None  # where this exit's kvm_emulate_insn fired
    for i, e in enumerate(events):
        site = _dispatch(chains[i])
        if log_has_exit_events:
            opens = e.name == opener
        else:
            addrs = tuple(a for _, a in site)
            opens = bool(site) and (_next_call(site, prev) or _fault_walk(e, chains[i])
                                    or (decoded is not None and e.name != "kvm_emulate_insn"
                                        and addrs[:len(decoded)] <= decoded[:len(addrs)]))
        if opens and groups[-1]:
            groups.append([])
            decoded = None
        groups[-1].append(i)
        if e.name == "kvm_emulate_insn" and site:
            decoded = tuple(a for _, a in site)
        prev = site or prev
    return [g for g in groups if g]


def _next_call(site: tuple[tuple[str, int], ...], prev: tuple[tuple[str, int], ...]) -> bool:
    """Is ``site`` in another call of the handler than ``prev``? (see :func:`cut_exits`)"""
    if not prev:
        return True
    for (fn, addr), (pfn, paddr) in zip(site, prev):
        if (fn, addr) != (pfn, paddr):
            return fn != pfn or addr < paddr
    return False


def _fault_walk(e: TraceEvent, chain: list[Frame]) -> bool:
    """The start of a guest walk made by the shadow MMU's page-fault handler."""
    if e.name != "kvm_mmu_pagetable_walk":
        return False
    names = [base_name(f.function) for f in chain]
    return any(n.endswith("_page_fault") and n.startswith(("paging", "ept")) for n in names)


def _dispatch(chain: list[Frame]) -> tuple[tuple[str, int], ...]:
    names = [base_name(f.function) for f in chain]
    if RUN_PATH not in names:
        return ()
    k = names.index(RUN_PATH)
    end = names.index("x86_emulate_instruction") + 1 if "x86_emulate_instruction" in names[k:] else k + 4
    return tuple((f.function, f.address) for f in chain[k:end])


__all__ = ["RUN_PATH", "cut_exits"]
