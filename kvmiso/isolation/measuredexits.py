"""The measured verdict of each exit: its recorded accesses, in order, against one policy's
isolated address space. Unlike the model's (:mod:`.check`), which walks call chains through the
access model, this one needs neither: every access is there with the instruction that made it.

From the instruction after VMRUN (the RFC enters kvm_mm before VM entry, ASI restricts the
space in ``svm_vcpu_enter_exit`` and stays after the exit) to the end of ``vcpu_run``
(:mod:`.windowpath`), the first of these decides:

``host_mm``  an access by a function where the policy switches to the full address space
             (RFC patch 07's sites, an interrupt's entry under the RFC, a context switch), or
             under ASI the first access to sensitive memory (``asi_exit``, by design);
``fault``    under the RFC's allowlist, the first instruction whose code page or data kvm_mm
             does not map: the faulting instruction itself, printed as patch 24 prints it
             (``KVM isolation: page fault #N (error code) at function+off/size [module] on
             address``), the object and member added;
``kvm_mm``   none: the exit was handled in the isolated space.

>>> v = measured_verdict(path, space, namer)                         # doctest: +SKIP
>>> v.line(0)                                                         # doctest: +SKIP
'KVM isolation: page fault #0 (2) at emulator_pio_in_out+0x7c/0x1d0 [kvm] on ffff8f525f2bd000 (kvm_run_page exit_reason)'
"""

from __future__ import annotations

from dataclasses import dataclass

from .accessnames import AccessNamer, Named
from .checkresult import ExitClass
from .layout import PAGE
from .mapset import AnnotatedSpace, DenylistSpace, KvmAddressSpace
from .windowpath import IRQ_STUBS, Site, WindowPath

# The page-fault error code the CPU would push (Intel SDM vol. 3 4.7): not present, from
# kernel mode; bit 1 a write, bit 4 an instruction fetch.
PF_WRITE, PF_FETCH = 0x2, 0x10


@dataclass(frozen=True)
class Miss:
    """The first access the isolated space does not map: the instruction that made it, the
    address, what lies there, and the page-fault error code it would raise."""

    index: int  # into the window's accesses
    site: Site
    address: int
    named: Named
    error_code: int

    def line(self, n: int, asi_exit: bool = False) -> str:
        """The RFC's patch-24 line for this miss, numbered ``n``, the object and member added;
        ``asi_exit``: under ASI the same page fault is the designed exit, and says so."""
        head = "ASI: asi_exit on page fault" if asi_exit else "KVM isolation: page fault"
        return (f"{head} #{n} ({self.error_code}) at {self.site.text()} on {self.address:016x} "
                f"({self.named.text()})")


@dataclass(frozen=True)
class MeasuredVerdict:
    """One exit under one policy: its class (``kvm_mm``, ``host_mm``, ``fault``), its kind, why
    (the switch, or the object missed), the miss (a fault; ASI's asi_exit) and the switch's site."""

    cls: ExitClass
    kind: str
    why: str = ""
    miss: Miss | None = None
    switch: Site | None = None


class SpaceView:
    """What one policy's isolated space maps, per page, for recorded accesses: the kernel
    mapped each of them (the access happened), so under a denylist only sensitivity counts."""

    def __init__(self, space: KvmAddressSpace | DenylistSpace | AnnotatedSpace) -> None:
        self.space = space
        self.policy = space.policy
        self.denylist = isinstance(space, DenylistSpace)
        self._pages: dict[int, bool] = {}

    def maps(self, addr: int) -> bool:
        """Does the isolated space map the page of ``addr``?"""
        page = addr & ~(PAGE - 1)
        hit = self._pages.get(page)
        if hit is None:
            if self.denylist:
                hit = not self.space.sensitive(addr)
            else:
                try:
                    hit = self.space.mapped(addr)
                except (KeyError, ValueError):  # a kernel table page the evidence did not read
                    hit = False
            self._pages[page] = hit
        return hit

    def switch_at(self, function: str) -> str | None:
        """Why the policy leaves the isolated space at ``function``, or None."""
        why = self.policy.switch_at(function)
        if why is None and self.policy.irq_switches and function.startswith(IRQ_STUBS):
            why = "interrupt entry switches to the kernel address space"
        return why


def measured_verdict(path: WindowPath, view: SpaceView, namer: AccessNamer) -> MeasuredVerdict:
    """The verdict of one window under the policy of ``view`` (see the module docstring)."""
    accesses = path.accesses
    code_checked: dict[int, bool] = {}
    for i in range(path.vcpu_run_end):
        site = path.sites[i]
        why = view.switch_at(site.function)
        if why:
            return MeasuredVerdict(ExitClass.HOST_MM, path.kind, f"{site.function}: {why}", switch=site)
        a = accesses[i]
        if not view.denylist:  # code is never sensitive; kvm_mm maps only some of it
            ok = code_checked.get(a.pc)
            if ok is None:
                ok = code_checked[a.pc] = view.maps(a.pc)
            if not ok:
                return _missed(path, view, namer, i, a.pc, PF_FETCH)
        if not view.maps(a.addr):
            return _missed(path, view, namer, i, a.addr, PF_WRITE if a.write else 0)
    return MeasuredVerdict(ExitClass.KVM_MM, path.kind)


def _missed(path: WindowPath, view: SpaceView, namer: AccessNamer, i: int, addr: int, code: int) -> MeasuredVerdict:
    fetch = code & PF_FETCH
    named = Named("kernel text", "", 0, "the instruction's own page") if fetch else \
        namer.name(addr, path.accesses[i].size)
    miss = Miss(i, path.sites[i], addr, named, code)
    if view.policy.miss_is_switch:  # ASI: the page fault on sensitive memory is the designed exit
        return MeasuredVerdict(ExitClass.HOST_MM, path.kind, f"page fault on sensitive memory ({named.object}) at "
                                                     f"{miss.site.text()}: asi_exit", miss)
    return MeasuredVerdict(ExitClass.FAULT, path.kind, named.object, miss)


__all__ = ["Miss", "MeasuredVerdict", "PF_FETCH", "PF_WRITE", "SpaceView", "measured_verdict"]
