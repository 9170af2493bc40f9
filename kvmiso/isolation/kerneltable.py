"""The kernel page table kvm_mm is copied from.

``LiveKernelTable``: the vCPU task's real table (``current->active_mm->pgd``), rebuilt from the
frames the evidence read: the kernel's own entries, so a huge leaf stays huge and a copy of one
object exposes exactly the neighbours the real table puts beside it.

``ModeledKernelTable``: where there is no evidence (no BPF): the kernel image in 2 MiB pages, the
direct map of RAM in 1 GiB pages split to 4 KiB around the modeled objects, vmalloc objects,
cpu_entry_area and ESPFIX pages. Every number it yields is modeled, and the layout says so.
"""

from __future__ import annotations

from typing import Iterator

from ..observe.kernel.livemm import distinct_bytes
from .layout import PAGE, Layout
from .framestore import ByteStore, FrameStore, PageTableError, SnapshotStore
from .pagetable import (ADDR_MASK, G, KERNEL_HALF, LEVEL_SHIFT, LEVEL_SPAN, NX, PS, P, RW, SIZE_1G, SIZE_2M, SIZE_4K, US,
                        PageTable, sign_extend)

CEA_PER_CPU = 0x3B000  # sizeof(struct cpu_entry_area), rounded to pages, on a 6.x x86-64 build: modeled


class LiveKernelTable(PageTable):
    """The page table the evidence captured (4-level), read-only."""

    live = True

    def __init__(self, layout: Layout) -> None:
        ev = layout.evidence
        super().__init__(SnapshotStore(ev.frames), root=ev.pgd_phys, gbpages=True)
        self.layout = layout
        self.captured = frozenset(ev.frames)

    def mapped_bytes(self) -> int:
        """Bytes the kernel half maps (counted over the whole live table by the collector)."""
        return sum(self.layout.evidence.kernel_mapped.values())

    def physical_bytes(self) -> int | None:
        """Distinct physical bytes behind the kernel half (counted by the collector), or None
        where the evidence predates that count."""
        return self.layout.evidence.kernel_mapped_physical or None


class ModeledKernelTable(PageTable):
    """A kernel table modeled from a layout of modeled objects (see the module docstring)."""

    live = False

    def __init__(self, layout: Layout, ram: int, gbpages: bool = True, store: FrameStore | None = None) -> None:
        super().__init__(store or ByteStore(64 << 20), gbpages=gbpages)
        self.layout = layout
        self._phys = 1 << 40  # backing for modeled vmalloc/cea pages: any frame, never RAM
        reg = layout.regions
        img = reg["kernel_image"]
        text = reg["text"]
        lo = text.start & ~(SIZE_2M - 1)
        hi = (text.ranges[-1][1] + (32 << 20) + SIZE_2M - 1) & ~(SIZE_2M - 1)  # text, then data: modeled
        for va in range(lo, hi, SIZE_2M):
            flags = P | G | (0 if va < text.ranges[-1][1] else RW | NX)
            self.map(va, va - img.start, SIZE_2M, page_size=SIZE_2M, flags=flags)
        self._map_direct(ram)
        for r in reg.values():
            if r.kind == "user":
                for s, e in r.ranges:
                    s, e = s & ~(PAGE - 1), (e + PAGE - 1) & ~(PAGE - 1)
                    self.map(s, self._frames(e - s), e - s, flags=P | RW | NX | US)
            elif r.kind == "object" and not reg["direct_map"].contains(r.start):
                for s, e in r.ranges:
                    s, e = s & ~(PAGE - 1), (e + PAGE - 1) & ~(PAGE - 1)
                    self.map(s, self._frames(e - s), e - s, flags=P | RW | NX | G)
        cea = reg["cpu_entry_area"].start
        self.map(cea, self._frames(PAGE), PAGE, flags=P | NX | G)  # the read-only IDT (CPU_ENTRY_AREA_RO_IDT)
        for cpu in range(layout.cpus):
            base = cea + PAGE + cpu * CEA_PER_CPU
            self.map(base, self._frames(CEA_PER_CPU), CEA_PER_CPU, flags=P | RW | NX | G)
            self.map(reg["espfix"].start + cpu * 0x10000, self._frames(PAGE), PAGE, flags=P | RW | NX | G)

    def _frames(self, size: int) -> int:
        pa, self._phys = self._phys, self._phys + size
        return pa

    def _map_direct(self, ram: int) -> None:
        """RAM in the biggest pages that do not cover a modeled object; 4 KiB pages around them."""
        dm = self.layout.regions["direct_map"]
        top = max((e for r in self.layout.regions.values() if r.kind == "object" for s, e in r.ranges
                   if dm.contains(s)), default=dm.start)
        ram = max(ram & ~(SIZE_2M - 1), ((top - dm.start) + SIZE_1G) & ~(SIZE_1G - 1))
        small = {(s - dm.start) // SIZE_2M for r in self.layout.regions.values() if r.kind == "object"
                 for s0, e0 in r.ranges if dm.contains(s0) for s in range(s0 & ~(PAGE - 1), e0, SIZE_4K)}
        big = {c * SIZE_2M // SIZE_1G for c in small}
        flags = P | RW | NX | G
        pos = 0
        while pos < ram:
            if pos % SIZE_1G == 0 and pos + SIZE_1G <= ram and self.gbpages and pos // SIZE_1G not in big:
                self.map(dm.start + pos, pos, SIZE_1G, page_size=SIZE_1G, flags=flags)
                pos += SIZE_1G
            elif pos % SIZE_2M == 0 and pos + SIZE_2M <= ram and pos // SIZE_2M not in small:
                self.map(dm.start + pos, pos, SIZE_2M, page_size=SIZE_2M, flags=flags)
                pos += SIZE_2M
            else:
                step = SIZE_2M - pos % SIZE_2M
                self.map(dm.start + pos, pos, step, flags=flags)
                pos += step

    def mapped_bytes(self) -> int:
        """Bytes the modeled table maps."""
        return sum(r.size for r in self.ranges())

    def physical_bytes(self) -> int:
        """Distinct physical bytes behind the modeled kernel half."""
        return physical_bytes(self)


def kernel_table(layout: Layout, ram: int = 1 << 30) -> LiveKernelTable | ModeledKernelTable:
    """The live table where the evidence has one, else the modeled one (``ram``: MemTotal)."""
    if layout.real:
        return LiveKernelTable(layout)
    return ModeledKernelTable(layout, ram)


def leaf_extents(table: PageTable, start: int = KERNEL_HALF, end: int = 1 << 64,
                 unread: list[tuple[int, int]] | None = None) -> Iterator[tuple[int, int, int]]:
    """(virtual, physical, bytes) of each leaf of ``table`` in [start, end), clipped to it, in
    address order. A span under a table page the evidence did not read goes to ``unread`` (when
    given) instead: what it maps is not known.

    >>> from kvmiso.isolation import build_layout
    >>> from kvmiso.session import machine_evidence
    >>> kernel = kernel_table(build_layout(machine_evidence(m)))    # needs root: the live table
    >>> espfix = 0xffffff0000000000                                   # ESPFIX's P4D (mm.rst)
    >>> virt, phys, size = next(leaf_extents(kernel, espfix, espfix + (1 << 39)))
    >>> espfix <= virt < espfix + (1 << 39), size           # the first of ESPFIX's 4 KiB pages
    (True, 4096)
    """
    yield from _extents(table, table.root, 4, 0, start, end, unread)


def _extents(table: PageTable, frame: int, level: int, base: int, start: int, end: int,
             unread: list[tuple[int, int]] | None) -> Iterator[tuple[int, int, int]]:
    span = LEVEL_SPAN[level]
    try:
        entries = table.read_table(frame)
    except PageTableError:
        if unread is not None:
            lo = sign_extend(base)
            unread.append((max(lo, start), min(lo + span * 512, end)))
        return
    for i, e in enumerate(entries):
        if not e & P or (level == 4 and e & PS):
            continue
        raw = base | i << LEVEL_SHIFT[level]
        va = sign_extend(raw)
        if va + span <= start or va >= end:
            continue
        if level == 1 or e & PS:
            if level == 3 and not table.gbpages:
                continue  # PS is reserved there: the walk faults, nothing is mapped
            lo, hi = max(va, start), min(va + span, end)
            yield lo, (e & ADDR_MASK & ~(span - 1)) + (lo - va), hi - lo
        else:
            yield from _extents(table, e & ADDR_MASK, level - 1, raw, start, end, unread)


def physical_bytes(table: PageTable, ranges: list[tuple[int, int]] | None = None,
                   unread: list[tuple[int, int]] | None = None) -> int:
    """Distinct physical bytes ``table`` maps in ``ranges`` (default: the kernel half): a page
    mapped at many virtual addresses (ESPFIX's, 65,536 times; the kernel image through its own
    mapping and the direct map) counts once."""
    spans = [(pa, pa + n) for s, e in (ranges or [(KERNEL_HALF, 1 << 64)])
             for _, pa, n in leaf_extents(table, s, e, unread)]
    return distinct_bytes(spans)


__all__ = ["LiveKernelTable", "ModeledKernelTable", "kernel_table", "leaf_extents", "physical_bytes"]
