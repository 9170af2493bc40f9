"""One recorded window read as the path an exit took: each access's instruction symbolized, the
exit's kind (named as ``kvm_exit`` names it, so windows pair with traced exits), where
``vcpu_run`` ends, and the interrupts the kernel took inside the window.

* **Kind.** kvm_amd's exit handlers (svm.c's ``svm_exit_handlers[]``, Linux 6.1.192) are named
  after the handler that ran: the first of them that touches memory. An interrupt exit runs none
  of its own (``intr_interception`` is inlined and touches nothing): the interrupt it was for is
  then taken when KVM enables interrupts.
* **The end of vcpu_run.** ``kvm_arch_vcpu_ioctl_run`` calls ``kvm_put_guest_fpu`` right after
  ``vcpu_run`` returns (x86.c:11348-11351, 6.1.192): its first access ends the part of the exit
  every policy isolates (the RFC switches back at the end of vcpu_run).
* **Interrupts.** From an IDT entry stub (``asm_sysvec_*``, ``asm_common_interrupt``,
  ``asm_exc_*``) to the return from it (``native_irq_return_iret``), nested ones counted, and
  the CPU's reads of the IDT and GDT as it delivers one (QEMU reports them with the interrupted
  instruction): the kernel's work, not the exit's; the access model does not describe it, the
  RFC switches there.
* **Context switch.** The first access of ``__schedule``: from there on the window holds other
  tasks' accesses until the thread runs again.

>>> path = WindowPath.of(window, symbols)                          # doctest: +SKIP
>>> path.kind, path.vcpu_run_end, path.irq_spans                    # doctest: +SKIP
('io', 57, [])
"""

from __future__ import annotations

from dataclasses import dataclass

from ..observe.accesses.accessrecord import Access, Window
from ..observe.kernel.kallsyms import Symbols
from .access import base_name

# kvm_amd's handlers (svm.c svm_exit_handlers[], 6.1.192) -> the exit reason as the kvm_exit event
# prints it (arch/x86/include/uapi/asm/svm.h SVM_EXIT_REASONS). msr_interception is inlined into
# svm_invoke_exit_handler, so x86.c's kvm_emulate_rdmsr/wrmsr stand for it.
HANDLER_KIND = {
    "io_interception": "io", "npf_interception": "npf", "kvm_emulate_halt": "hlt", "kvm_emulate_cpuid": "cpuid",
    "kvm_emulate_rdmsr": "msr", "kvm_emulate_wrmsr": "msr", "kvm_emulate_hypercall": "hypercall",
    "vmmcall_interception": "hypercall", "handle_ud": "UD excp", "ud_interception": "UD excp",
    "db_interception": "DB excp", "bp_interception": "BP excp", "pf_interception": "PF excp",
    "gp_interception": "GP excp", "shutdown_interception": "shutdown", "cr_interception": "write_cr0",
    "invlpg_interception": "invlpg", "xsetbv_interception": "xsetbv", "kvm_emulate_xsetbv": "xsetbv",
    "rdpmc_interception": "rdpmc", "kvm_emulate_rdpmc": "rdpmc", "task_switch_interception": "task_switch",
    "iret_interception": "iret", "smi_interception": "smi", "nmi_interception": "nmi", "kvm_emulate_wbinvd": "wbinvd",
    "kvm_emulate_invd": "invd", "kvm_emulate_monitor": "monitor", "kvm_emulate_mwait": "mwait",
    "invpcid_interception": "invpcid", "pause_interception": "pause", "vmrun_interception": "vmrun",
}
IRQ_STUBS = ("asm_sysvec_", "asm_common_interrupt", "asm_exc_", "asm_spurious_interrupt")
IRQ_RETURN = "native_irq_return_iret"
# The CPU's own accesses when it delivers an interrupt (the IDT and GDT through their read-only
# cpu_entry_area aliases) are reported with the interrupted instruction: the span starts there.
CPU_ENTRY_AREA = (0xFFFF_FE00_0000_0000, 0xFFFF_FE80_0000_0000)  # mm.rst, 4-level: not randomized
VCPU_RUN_END = "kvm_put_guest_fpu"  # x86.c:11351 (6.1.192): the first call after vcpu_run returns
CONTEXT_SWITCH = "__schedule"


@dataclass(frozen=True)
class Site:
    """One instruction that accessed memory: its function (a compiler clone's base name kept in
    ``symbol``), offset and size, and its module ("" for the kernel image)."""

    pc: int
    function: str
    symbol: str
    offset: int
    size: int
    module: str

    def text(self) -> str:
        """``emulator_pio_in_out+0x7c/0x1d0 [kvm]``, as the kernel prints a function and offset."""
        at = f"{self.symbol}+{self.offset:#x}" + (f"/{self.size:#x}" if self.size else "")
        return at + (f" [{self.module}]" if self.module else "")


class Sites:
    """Instruction address -> :class:`Site`, cached (a window repeats a few thousand instructions)."""

    def __init__(self, symbols: Symbols) -> None:
        self.symbols = symbols
        self._sites: dict[int, Site] = {}

    def at(self, pc: int) -> Site:
        """The site of ``pc``."""
        s = self._sites.get(pc)
        if s is None:
            hit = self.symbols.resolve(pc)
            name, off = hit if hit else (f"{pc:#x}", 0)
            s = self._sites[pc] = Site(pc, base_name(name), name, off, self.symbols.code_size(name) if hit else 0,
                                       self.symbols.module_at(pc) or "")
        return s


@dataclass(frozen=True)
class WindowPath:
    """A window's accesses with their sites, its kind, where vcpu_run ends (an index into the
    accesses; their number when it does not end inside the window), the interrupts inside it
    as [start, end) index spans, and where a context switch begins (None: none)."""

    window: Window
    sites: tuple[Site, ...]
    kind: str
    handler: str
    vcpu_run_end: int
    irq_spans: tuple[tuple[int, int], ...]
    switched_at: int | None

    @classmethod
    def of(cls, window: Window, sites: Sites) -> "WindowPath":
        """Read ``window``'s path with ``sites`` (the guest's kallsyms of the same boot)."""
        path = tuple(sites.at(a.pc) for a in window.accesses)
        handler = next((s.function for s in path if s.function in HANDLER_KIND), "")
        spans = _with_delivery(irq_spans([s.function for s in path]), window.accesses)
        end = next((i for i, s in enumerate(path) if s.function == VCPU_RUN_END), len(path))
        switched = next((i for i, s in enumerate(path) if s.function == CONTEXT_SWITCH), None)
        kind = HANDLER_KIND[handler] if handler else ("interrupt" if spans else "unknown")
        return cls(window, path, kind, handler, end, tuple(spans), switched)

    @property
    def accesses(self) -> tuple[Access, ...]:
        """The window's accesses, in order."""
        return self.window.accesses

    def in_exit(self) -> list[int]:
        """Indexes of the accesses that belong to the exit's own handling: up to the end of
        vcpu_run, outside interrupts, before any context switch."""
        stop = min(self.vcpu_run_end, self.switched_at if self.switched_at is not None else len(self.sites))
        inside = bytearray(stop)
        for s, e in self.irq_spans:
            inside[s:min(e, stop)] = b"\x01" * max(0, min(e, stop) - s)
        return [i for i in range(stop) if not inside[i]]


def _with_delivery(spans: list[tuple[int, int]], accesses: tuple[Access, ...]) -> list[tuple[int, int]]:
    """Each span widened back over the CPU's delivery of the interrupt: the IDT gate and GDT read
    through cpu_entry_area, then the frame pushed, all reported with one instruction (the last
    that had an access of its own) just before the entry stub."""
    out = []
    for s, e in spans:
        k = s
        pc = accesses[s - 1].pc if s > 0 else None
        while k > 0 and accesses[k - 1].pc == pc and (accesses[k - 1].write or _in_cea(accesses[k - 1].addr)):
            k -= 1
        out.append((k if any(_in_cea(a.addr) for a in accesses[k:s]) else s, e))
    return out


def _in_cea(addr: int) -> bool:
    return CPU_ENTRY_AREA[0] <= addr < CPU_ENTRY_AREA[1]


def irq_spans(functions: list[str]) -> list[tuple[int, int]]:
    """[start, end) of each outermost interrupt in a sequence of functions (one per access)."""
    spans, depth, start = [], 0, 0
    prev = ""
    for i, f in enumerate(functions):
        entering = f.startswith(IRQ_STUBS) and not prev.startswith(IRQ_STUBS) and prev != "error_entry"
        if entering:
            if depth == 0:
                start = i
            depth += 1
        if depth and prev == IRQ_RETURN and f != IRQ_RETURN:
            depth -= 1
            if depth == 0:
                spans.append((start, i))
        prev = f
    if depth:
        spans.append((start, len(functions)))
    return spans


__all__ = ["HANDLER_KIND", "Site", "Sites", "VCPU_RUN_END", "WindowPath", "irq_spans"]
