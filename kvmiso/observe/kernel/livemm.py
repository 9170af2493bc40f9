"""The live kernel page table of a task, read through BPF: the frames on the path to every
address that matters, kept as they are (4 KiB table pages by physical address), so that the
model can rebuild the kernel table from the kernel's own entries (huge leaves stay huge).

The direct map's base (``page_offset_base``, randomized with CONFIG_RANDOMIZE_MEMORY and not in
kallsyms without CONFIG_KALLSYMS_ALL) is derived from the table itself: the PGD page is a
direct-map address P, so exactly one 1 GiB-aligned base B makes the walk of P end at physical
P - B. No other source is needed; where /proc/self/pagemap shows PFNs, callers cross-check it.

This module decodes only what it must to follow the tables (present, PS, the address bits);
interpreting leaves is the model's job (:mod:`kvmiso.isolation.pagetable`).
"""

from __future__ import annotations

import re
import struct
from pathlib import Path

from .bpf import KernelMemory, KernelReadError

PAGE = 4096
_P, _PS = 1, 1 << 7
_ADDR = 0x000F_FFFF_FFFF_F000
_SHIFT = {4: 39, 3: 30, 2: 21, 1: 12}
GIB = 1 << 30
KERNEL_HALF = 0xFFFF_8000_0000_0000


class LiveTableError(RuntimeError):
    """The live page table could not be followed (the message says where)."""


def _index(va: int, level: int) -> int:
    return (va >> _SHIFT[level]) & 511


def max_physical_address(iomem: Path = Path("/proc/iomem")) -> int:
    """The end of the highest System RAM range (root sees real addresses), or 1 TiB."""
    top = 0
    try:
        for line in iomem.read_text().splitlines():
            m = re.match(r"\s*([0-9a-f]+)-([0-9a-f]+) : System RAM", line)
            if m:
                top = max(top, int(m.group(2), 16) + 1)
    except OSError:
        pass
    return top or 1 << 40


class LiveTables:
    """The page table rooted at the direct-map address ``pgd`` (``mm->pgd``), read as it is.

    ``frames`` holds every table page read, by physical address; ``walk(va)`` follows ``va`` to
    its leaf and returns ``(level, entry)`` (level 1 = 4 KiB PTE, 2 = 2 MiB, 3 = 1 GiB), or
    ``(level, 0)`` where an entry is not present.
    """

    def __init__(self, mem: KernelMemory, pgd: int, page_offset_base: int | None = None) -> None:
        self.mem = mem
        self.pgd = pgd
        self.frames: dict[int, bytes] = {}
        self._tables: dict[int, tuple[int, ...]] = {}
        self.page_offset_base = page_offset_base if page_offset_base is not None else self._derive_base()
        self.root = pgd - self.page_offset_base

    def _derive_base(self) -> int:
        """The one 1 GiB-aligned base B for which the walk of the PGD page ends at pgd - B."""
        top = max_physical_address()
        pgd_entry = self.mem.u64(self.pgd + 8 * _index(self.pgd, 4))
        if not pgd_entry & _P:
            raise LiveTableError(f"the PGD page {self.pgd:#x} does not map itself: not a direct-map address")
        for k in range((top + GIB - 1) // GIB + 1):
            base = (self.pgd & ~(GIB - 1)) - k * GIB
            phys = self._translate_with(base, pgd_entry, self.pgd)
            if phys == self.pgd - base:
                return base
        raise LiveTableError(f"no direct-map base makes the walk of the PGD page {self.pgd:#x} consistent")

    def _translate_with(self, base: int, entry: int, va: int) -> int | None:
        for level in (3, 2, 1):
            try:
                entry = self.mem.u64(base + (entry & _ADDR) + 8 * _index(va, level))
            except KernelReadError:
                return None
            if not entry & _P:
                return None
            if level == 1 or entry & _PS:
                span = 1 << _SHIFT[level]
                return (entry & _ADDR & ~(span - 1)) + (va & (span - 1))
        return None

    def frame(self, phys: int) -> bytes:
        """The table page at physical ``phys`` (read once)."""
        page = self.frames.get(phys)
        if page is None:
            page = self.frames[phys] = self.mem.read(self.page_offset_base + phys, PAGE)
        return page

    def entry(self, table: int, index: int) -> int:
        """Entry ``index`` of the table page at physical ``table``."""
        return self.table(table)[index]

    def walk(self, va: int) -> tuple[int, int]:
        """(level, entry) of the leaf mapping ``va``; entry 0 where nothing maps it."""
        table = self.root
        for level in (4, 3, 2, 1):
            e = self.entry(table, _index(va, level))
            if not e & _P:
                return level, 0
            if level == 1 or (level < 4 and e & _PS):
                return level, e
            table = e & _ADDR
        raise AssertionError("unreachable")

    def translate(self, va: int) -> int | None:
        """The physical address of ``va`` in this table, or None."""
        level, e = self.walk(va)
        if not e:
            return None
        span = 1 << _SHIFT[level]
        return (e & _ADDR & ~(span - 1)) + (va & (span - 1))

    def table(self, phys: int) -> tuple[int, ...]:
        """The 512 entries of the table page at physical ``phys``."""
        cached = self._tables.get(phys)
        if cached is None:
            cached = self._tables[phys] = struct.unpack("<512Q", self.frame(phys))
        return cached

    def read_subtree(self, start: int, end: int) -> None:
        """Read every table page under [start, end) (the whole kernel table of that span), so
        that a copy at any level and the bytes it maps can be counted from the frames."""
        self._visit(self.root, 4, start, end, 0, None)

    def mapped_bytes(self, start: int = KERNEL_HALF, end: int = 1 << 64,
                     physical: list[tuple[int, int]] | None = None) -> dict[int, int]:
        """Bytes the table maps in [start, end), by leaf level: the whole kernel half by default.
        Each leaf's physical span goes to ``physical`` when given (:func:`distinct_bytes` counts
        them: ESPFIX maps one page 65,536 times). The table pages this reads are counted, not
        kept (unless kept already)."""
        keep, keep_tables = dict(self.frames), dict(self._tables)
        out = {1: 0, 2: 0, 3: 0}
        try:
            self._visit(self.root, 4, start, end, 0, out, physical)
        finally:
            self.frames, self._tables = keep, keep_tables
        return out

    def _visit(self, table: int, level: int, start: int, end: int, prefix: int, census: dict[int, int] | None,
               physical: list[tuple[int, int]] | None = None) -> None:
        shift = _SHIFT[level]
        span = 1 << shift
        entries = self.table(table)
        for i, e in enumerate(entries):
            if not e & _P:
                continue
            lo = prefix | (i << shift)
            va = lo | (0xFFFF_0000_0000_0000 if lo & (1 << 47) else 0)
            if va + span <= start or va >= end:
                continue
            if level == 1 or (level < 4 and e & _PS):
                if census is not None:
                    census[level] += span
                if physical is not None:
                    pa = e & _ADDR & ~(span - 1)
                    physical.append((pa, pa + span))
            else:
                self._visit(e & _ADDR, level - 1, start, end, lo, census, physical)
        if census is not None and len(self.frames) > 4096:  # a census keeps memory bounded
            self.frames.clear()
            self._tables.clear()


def distinct_bytes(spans: list[tuple[int, int]]) -> int:
    """Bytes in the union of [start, end) ``spans``: a page mapped at many addresses counts once."""
    total, reach = 0, -1
    for s, e in sorted(spans):
        if e <= reach:
            continue
        total += e - max(s, reach)
        reach = e
    return total


__all__ = ["LiveTableError", "LiveTables", "distinct_bytes", "max_physical_address"]
