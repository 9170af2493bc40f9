"""ASI's restricted address space as the 2024-2025 series defines it: a denylist, the kernel
table minus the memory it calls sensitive (GFP_USER: guest memory and other user pages, and their
direct-map aliases).

>>> from kvmiso.session import machine_evidence
>>> evidence = machine_evidence(m)    # needs root: m's VM, read from the kernel through BPF
>>> from kvmiso.isolation import build_layout
>>> layout = build_layout(evidence)
>>> asi = DenylistSpace.default(layout)
>>> asi.sensitive(layout.region("guest_memory:0").start)
True
"""

from __future__ import annotations

from .kerneltable import LiveKernelTable, ModeledKernelTable, kernel_table
from .layout import PAGE, Layout
from .pagetable import KERNEL_HALF, canonical
from .regionset import IsolatedSpace, merge_ranges


class DenylistSpace(IsolatedSpace):
    """The restricted address space of ASI: the kernel table minus sensitive memory.

    Sensitive: the user half (ASI's KVM class maps none: ``asi_maps_user_addr()`` is false);
    the direct-map alias of every GFP_USER page the evidence knows (guest memory's pages); and
    KVM's own kernel mappings of guest pages (the pvclock page).
    """

    def __init__(self, kernel: LiveKernelTable | ModeledKernelTable, policy: str = "asi") -> None:
        super().__init__(kernel, policy)
        self.denied: list[tuple[str, int, int]] = [("user half", 0, KERNEL_HALF)]
        dm = self.layout.regions["direct_map"].start
        for r in self.layout.regions.values():
            if r.allocator.startswith("guest memory"):
                self.denied += [(r.name, s, e) for s, e in r.ranges]  # a kernel mapping of a guest page
            if r.kind != "user":
                continue
            for s, e in r.ranges:
                for va in range(s & ~(PAGE - 1), min(e, s + (4 << 20)), PAGE):  # each page's direct-map alias
                    t = kernel.translate(va)
                    if t is not None:
                        alias = dm + (t.phys & ~(PAGE - 1))
                        self.denied.append((f"{r.name} (direct-map alias)", alias, alias + PAGE))

    @classmethod
    def default(cls, layout: Layout, policy: str = "asi", ram: int = 1 << 30) -> "DenylistSpace":
        """ASI's restricted space over the layout's kernel table."""
        return cls(kernel_table(layout, ram), policy)

    def sensitive(self, addr: int) -> bool:
        """Is ``addr`` memory the policy calls sensitive?"""
        return any(s <= addr < e for _, s, e in self.denied)

    def mapped(self, addr: int) -> bool:
        """Does the restricted space map ``addr`` (the kernel does, and it is not sensitive)?"""
        return canonical(addr) and not self.sensitive(addr) and self.kernel.translate(addr) is not None

    def mapped_bytes(self) -> int:
        """The kernel half as the kernel maps it, less the sensitive pages' aliases."""
        aliases = merge_ranges([(s, e) for _, s, e in self.denied if s >= KERNEL_HALF])
        return self.kernel.mapped_bytes() - sum(e - s for s, e in aliases)

    def physical_bytes(self) -> int | None:
        """The kernel half's distinct physical bytes, less the frames behind the sensitive
        pages' kernel mappings (None where the evidence did not count the kernel half's)."""
        kernel = self.kernel.physical_bytes()
        if kernel is None:
            return None
        frames = set()
        for _, s, e in self.denied:
            for va in range(s, e, PAGE) if s >= KERNEL_HALF else ():
                t = self.kernel.translate(va)
                if t is not None:
                    frames.add(t.phys & ~(PAGE - 1))
        return kernel - PAGE * len(frames)


__all__ = ["DenylistSpace"]
