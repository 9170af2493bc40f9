"""x86-64 4-level page tables in the hardware format, over a frame store.

A table is 512 little-endian 64-bit entries in one 4 KiB frame. Levels are numbered as the
kernel's walkers do, from the root: 4 = PGD (PML4), 3 = PUD (PDPT), 2 = PMD (PD), 1 = PTE (PT).
With 4-level paging the P4D level is folded into the PGD, as in Linux. A leaf is a PTE, or a
PMD/PUD entry with PS set (2 MiB / 1 GiB page).

>>> from kvmiso.isolation import ByteStore
>>> pt = PageTable(ByteStore(1 << 20))
>>> pt.map(0xffffffff81000000, 0x1000000, 2 << 20, page_size=SIZE_2M, flags=P | RW)
>>> hex(pt.translate(0xffffffff81000123).phys)
'0x1000123'
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Iterator

from .framestore import PAGE_SIZE, FrameStore, PageTableError
ENTRIES = 512

# Entry bits (Intel SDM vol. 3, 4.5; arch/x86/include/asm/pgtable_types.h).
P, RW, US, PWT, PCD, A, D, PS, G = (1 << b for b in (0, 1, 2, 3, 4, 5, 6, 7, 8))
NX = 1 << 63
ADDR_MASK = 0x000F_FFFF_FFFF_F000  # bits 51:12, MAXPHYADDR 52
FLAG_MASK = P | RW | US | PWT | PCD | A | D | G | NX  # what map() accepts; PS is the page size's job

SIZE_4K, SIZE_2M, SIZE_1G = 1 << 12, 1 << 21, 1 << 30
LEVEL_NAMES = {4: "PGD", 3: "PUD", 2: "PMD", 1: "PTE"}
LEVEL_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}
LEVEL_SPAN = {lvl: 1 << s for lvl, s in LEVEL_SHIFT.items()}  # bytes one entry covers
LEAF_LEVEL = {SIZE_4K: 1, SIZE_2M: 2, SIZE_1G: 3}
VA_BITS = 48
KERNEL_HALF = 0xFFFF_8000_0000_0000


def canonical(va: int) -> bool:
    """Is ``va`` a canonical 48-bit address (bits 63:47 all equal)?"""
    top = va >> (VA_BITS - 1)
    return 0 <= va < 1 << 64 and top in (0, (1 << (64 - VA_BITS + 1)) - 1)


def check_canonical_range(start: int, end: int) -> None:
    """Raise PageTableError unless [start, end) lies inside one canonical half."""
    if start >= end:
        raise PageTableError(f"empty range [{start:#x}, {end:#x})", start)
    if not canonical(start) or not canonical(end - 1) or (start < KERNEL_HALF) != (end - 1 < KERNEL_HALF):
        raise PageTableError(f"range [{start:#x}, {end:#x}) is not canonical", start)


def level_index(va: int, level: int) -> int:
    """The index of ``va``'s entry in a level-``level`` table."""
    return (va >> LEVEL_SHIFT[level]) & (ENTRIES - 1)


@dataclass(frozen=True)
class WalkStep:
    """One entry the walk read: its level, the table frame it is in, its index and value."""

    level: int
    table: int  # physical address of the table frame
    index: int
    pte: int

    @property
    def present(self) -> bool:
        """The entry's P bit."""
        return bool(self.pte & P)

    @property
    def leaf(self) -> bool:
        """A present PTE, or a present PMD/PUD entry with PS: it maps a page."""
        return self.present and (self.level == 1 or (self.level < 4 and bool(self.pte & PS)))


@dataclass(frozen=True)
class Translation:
    """Where a virtual address goes and with which effective rights (AND of RW/US, OR of NX)."""

    virt: int
    phys: int
    page_size: int
    writable: bool
    user: bool
    nx: bool


@dataclass(frozen=True)
class MappedRange:
    """A run of virtual addresses mapped contiguously with the same rights and page size."""

    start: int
    end: int
    phys: int
    page_size: int
    writable: bool
    user: bool
    nx: bool

    @property
    def size(self) -> int:
        """Bytes in the range."""
        return self.end - self.start


def sign_extend(va: int) -> int:
    """The canonical form of a 48-bit address (bit 47 copied into bits 63:48)."""
    return va | ~((1 << VA_BITS) - 1) & ((1 << 64) - 1) if va >> (VA_BITS - 1) & 1 else va


class PageTable:
    """A 4-level table rooted at ``root`` (a fresh frame from ``store`` unless given): what CR3
    points at. Every entry it writes is in the hardware format.

    ``gbpages`` is CPUID.80000001H:EDX[26] of the CPU that walks the table: without it PS in a
    PUD entry is a reserved bit, so the walk faults there (KVM's MMU does exactly this when the
    guest CPUID lacks it, as kvm_pvm's does) and map() refuses 1 GiB pages.
    """

    def __init__(self, store: FrameStore, root: int | None = None, gbpages: bool = True) -> None:
        self.store = store
        self.root = store.alloc() if root is None else root
        self.gbpages = gbpages

    # --- entries ------------------------------------------------------------------------------

    def read_entry(self, table: int, index: int) -> int:
        """Entry ``index`` of the table page at physical ``table``."""
        return struct.unpack("<Q", self.store.read(table + 8 * index, 8))[0]

    def write_entry(self, table: int, index: int, value: int) -> None:
        """Write entry ``index`` of the table page at physical ``table``."""
        self.store.write(table + 8 * index, struct.pack("<Q", value))

    def read_table(self, table: int) -> tuple[int, ...]:
        """All 512 entries of the table page at physical ``table``."""
        return struct.unpack(f"<{ENTRIES}Q", self.store.read(table, PAGE_SIZE))

    # --- walking ------------------------------------------------------------------------------

    def walk(self, va: int) -> list[WalkStep]:
        """The entries the MMU reads for ``va``, root first; stops at a non-present entry or a leaf.

        >>> from kvmiso.isolation import ByteStore
        >>> pt = PageTable(ByteStore(1 << 20))
        >>> pt.map(0xffffffff81000000, 0x1000000, 2 << 20, page_size=SIZE_2M, flags=P | RW)
        >>> [(s.level, hex(s.pte)) for s in pt.walk(0xffffffff81000000)]
        [(4, '0x1007'), (3, '0x2007'), (2, '0x1000083')]
        """
        if not canonical(va):
            raise PageTableError(f"{va:#x} is not canonical", va)
        steps = []
        table = self.root
        for level in (4, 3, 2, 1):
            i = level_index(va, level)
            step = WalkStep(level, table, i, self.read_entry(table, i))
            steps.append(step)
            if not step.present or step.leaf or step.pte & PS:
                break  # PS in a PGD entry is reserved: the walk faults there
            table = step.pte & ADDR_MASK
        return steps

    def translate(self, va: int) -> Translation | None:
        """The MMU's answer for ``va``, or None where it would raise #PF (not present)."""
        steps = self.walk(va)
        last = steps[-1]
        if not last.leaf or (last.level == 3 and not self.gbpages):
            return None
        size = LEVEL_SPAN[last.level]
        base = last.pte & ADDR_MASK & ~(size - 1)
        return Translation(va, base | (va & (size - 1)), size,
                           all(s.pte & RW for s in steps), all(s.pte & US for s in steps),
                           any(s.pte & NX for s in steps))

    # --- changing -----------------------------------------------------------------------------

    def map(self, va: int, pa: int, size: int, page_size: int = SIZE_4K, flags: int = P | RW) -> None:
        """Map [va, va + size) to [pa, pa + size) with ``page_size`` leaves and ``flags``.

        Upper-level entries get P|RW|US (rights are decided at the leaf, as Linux does);
        mapping over a present entry is refused rather than silently replaced.
        """
        if page_size not in LEAF_LEVEL:
            raise PageTableError(f"page size {page_size:#x} is not 4K, 2M or 1G", va)
        if page_size == SIZE_1G and not self.gbpages:
            raise PageTableError("1 GiB pages need CPUID pdpe1gb, which this table's CPU lacks", va)
        if flags & ~FLAG_MASK:
            raise PageTableError(f"flags {flags:#x} have bits outside {FLAG_MASK:#x}", va)
        if va % page_size or pa % page_size or size % page_size or size <= 0:
            raise PageTableError(
                f"map {va:#x} -> {pa:#x} size {size:#x}: each must be a positive multiple of {page_size:#x}", va)
        if pa + size > 1 << 52:
            raise PageTableError(f"physical {pa:#x}+{size:#x} is beyond MAXPHYADDR", va)
        check_canonical_range(va, va + size)
        leaf_level = LEAF_LEVEL[page_size]
        leaf = (flags | P) | (PS if leaf_level > 1 else 0)
        for off in range(0, size, page_size):  # check everything first: a refused map writes nothing
            self._check_free(va + off, leaf_level)
        for off in range(0, size, page_size):
            table = self._table_for(va + off, leaf_level, create=True)
            self.write_entry(table, level_index(va + off, leaf_level), (pa + off) | leaf)

    def _check_free(self, va: int, leaf_level: int) -> None:
        """Raise unless a leaf at ``leaf_level`` for ``va`` could be written: no present leaf
        there, and no huge page above it."""
        for step in self.walk(va):
            if step.level == leaf_level and step.present:
                raise PageTableError(f"{va:#x} is already mapped", va)
            if step.leaf:
                raise PageTableError(f"{va:#x} is inside a {LEVEL_SPAN[step.level] >> 20} MiB page", va)

    def unmap(self, va: int, size: int) -> None:
        """Clear every leaf in [va, va + size); a huge page must be unmapped whole."""
        check_canonical_range(va, va + size)
        pos, end = va, va + size
        while pos < end:
            steps = self.walk(pos)
            last = steps[-1]
            span = LEVEL_SPAN[last.level]
            start = pos & ~(span - 1)
            if last.leaf:
                if start < va or start + span > end:
                    raise PageTableError(
                        f"unmap [{va:#x}, {end:#x}) would split the {span >> 10} KiB page at {start:#x}", pos)
                self.write_entry(last.table, last.index, 0)
            pos = start + span

    def _table_for(self, va: int, level: int, create: bool) -> int:
        """The frame of the level-``level`` table covering ``va`` (allocating upper tables)."""
        table = self.root
        for lvl in range(4, level, -1):
            i = level_index(va, lvl)
            e = self.read_entry(table, i)
            if not e & P:
                if not create:
                    raise PageTableError(f"no level-{lvl - 1} table for {va:#x}", va)
                frame = self.store.alloc()
                self.write_entry(table, i, frame | P | RW | US)
                e = frame | P
            elif lvl > 1 and e & PS:
                raise PageTableError(f"{va:#x} is inside a {LEVEL_SPAN[lvl] >> 20} MiB page", va)
            table = e & ADDR_MASK
        return table

    # --- enumerating --------------------------------------------------------------------------

    def leaves(self) -> Iterator[MappedRange]:
        """Every leaf as a one-page MappedRange with its effective rights, in address order."""
        yield from self._leaves(self.root, 4, 0, RW | US)

    def _leaves(self, table: int, level: int, base: int, rights: int) -> Iterator[MappedRange]:
        for i, e in enumerate(self.read_table(table)):
            if not e & P:
                continue
            if level == 4 and e & PS:
                continue  # reserved: nothing is mapped through it
            raw = base | i << LEVEL_SHIFT[level]
            eff = rights & e & (RW | US) | (rights | e) & NX
            if level == 1 or e & PS:
                if level == 3 and not self.gbpages:
                    continue  # PS is reserved here: the walk faults, nothing is mapped
                size = LEVEL_SPAN[level]
                va = sign_extend(raw)
                yield MappedRange(va, va + size, e & ADDR_MASK & ~(size - 1), size,
                                  bool(eff & RW), bool(eff & US), bool(eff & NX))
            else:
                yield from self._leaves(e & ADDR_MASK, level - 1, raw, eff)

    def ranges(self) -> list[MappedRange]:
        """The mapped address space as merged ranges: adjacent leaves join when virtual and
        physical addresses continue and the rights and page size are equal."""
        out: list[MappedRange] = []
        for r in self.leaves():
            if out:
                prev = out[-1]
                if (prev.end == r.start and prev.phys + prev.size == r.phys and prev.page_size == r.page_size
                        and (prev.writable, prev.user, prev.nx) == (r.writable, r.user, r.nx)):
                    out[-1] = MappedRange(prev.start, r.end, prev.phys, prev.page_size, r.writable, r.user, r.nx)
                    continue
            out.append(r)
        return out

    def table_frames(self) -> list[int]:
        """Every table frame reachable from the root, root first."""
        frames, todo = [], [(self.root, 4)]
        while todo:
            table, level = todo.pop()
            frames.append(table)
            if level > 1:
                todo.extend((e & ADDR_MASK, level - 1) for e in self.read_table(table) if e & P and not e & PS)
        # (a PS entry is a leaf below the PGD and reserved in it: neither points at a table)
        return frames

    def dump(self) -> str:
        """Level by level, every present entry with its index, value and decoded bits."""
        lines: list[str] = []

        def visit(table: int, level: int, base: int, depth: int) -> None:
            for i, e in enumerate(self.read_table(table)):
                if not e & P:
                    continue
                va = sign_extend(base | i << LEVEL_SHIFT[level])
                leaf = level == 1 or e & PS
                bits = " ".join(n for n, b in (("RW", RW), ("US", US), ("PS", PS), ("G", G), ("NX", NX)) if e & b)
                what = f"-> {e & ADDR_MASK:#x}" + (f" ({LEVEL_SPAN[level] >> 10} KiB page)" if leaf else " (table)")
                lines.append(f"{'  ' * depth}{LEVEL_NAMES[level]}[{i:3d}] {va:#018x} {e:#018x} {bits} {what}")
                if not leaf:
                    visit(e & ADDR_MASK, level - 1, base | i << LEVEL_SHIFT[level], depth + 1)

        lines.append(f"CR3 {self.root:#x}")
        visit(self.root, 4, 0, 1)
        return "\n".join(lines)
