"""kvm_mm built from the kernel table the way the 2019 RFC builds it, and the policy's isolated
space for any policy (:func:`address_space`).

``KvmAddressSpace`` (allowlist, ``rfc-v1``): an empty PGD whose entries copy the kernel's at a
chosen level (``kvm_copy_pgd_range`` and friends, RFC patches 13-14). Everything below the copy
level is *shared* with the kernel table, and a huge kernel leaf is copied whole, so mapping one
object maps what the kernel's leaf holds beside it: the summary counts it. KVM never writes a
shared table page: every write goes through one gate that refuses it.

``DenylistSpace`` (``asi``, :mod:`.denylist`): the kernel table as it is, minus the memory the
policy calls sensitive (GFP_USER: guest memory and other user pages, and their direct-map aliases).

``AnnotatedSpace`` (``asi-2022``, :mod:`.asi2022`): the pages of what the 2022 series marks
non-sensitive, each object classified by the patch that marks its allocation.

>>> from kvmiso.session import machine_evidence
>>> evidence = machine_evidence(m)    # needs root: m's VM, read from the kernel through BPF
>>> from kvmiso.isolation import build_layout
>>> layout = build_layout(evidence)
>>> kas = KvmAddressSpace.default(layout)
>>> kas.mapped(layout.region("pio_data").start)
True
"""

from __future__ import annotations

from .asi2022 import AnnotatedSpace
from .denylist import DenylistSpace
from .kerneltable import LiveKernelTable, ModeledKernelTable, kernel_table, physical_bytes
from .layout import Layout
from .pagetable import (ADDR_MASK, LEVEL_NAMES, LEVEL_SPAN, P, PS, PageTable, canonical, check_canonical_range,
                        level_index, sign_extend)
from .policy import POLICIES
from .regionset import (DEFAULT_SET, LEVELS, Copy, IsolatedSpace, MapSetError, RegionSpec, SharedTableError,
                        default_specs, level_of, merge_ranges)


class KvmAddressSpace(IsolatedSpace):
    """kvm_mm: a PGD of its own whose entries copy the kernel table's at a chosen level.

    ``regions`` are the mapping-set regions in effect; ``copies`` every copy made.
    """

    def __init__(self, kernel: LiveKernelTable | ModeledKernelTable, policy: str = "rfc-v1") -> None:
        super().__init__(kernel, policy)
        self._kernel_frames = kernel.captured if kernel.live else frozenset(kernel.table_frames())
        self.table = PageTable(kernel.store, gbpages=kernel.gbpages)
        self.owned = {self.table.root}  # table frames KVM allocated: the only ones it may write

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def default(cls, layout: Layout, policy: str = "rfc-v1", drop: tuple[str, ...] = (),
                ram: int = 1 << 30) -> "KvmAddressSpace":
        """The RFC's mapping set for the layout's vendor, minus ``drop``."""
        kas = cls(kernel_table(layout, ram), policy)
        specs = default_specs(layout)
        names = {s.name for s in specs}
        for d in drop:
            if d not in names:
                raise MapSetError(f"cannot drop {d!r}: not in the default set ({', '.join(sorted(names))})")
        for spec in DEFAULT_SET:
            mine = not spec.vendors or layout.vendor in spec.vendors
            if spec.name not in names and mine and not spec.name.endswith("_module") and spec.group != "vendor":
                kas.missing.append(spec.name)
        for spec in specs:
            if spec.name not in drop:
                kas.add_region(spec)
        return kas

    def add_region(self, spec: RegionSpec, ranges: list[tuple[int, int]] | None = None) -> None:
        """Copy every range of the spec's layout regions (or ``ranges``) at the spec's level,
        widened to the level's alignment (the RFC maps whole pages)."""
        if ranges is None:
            ranges = [r for reg in self.layout.matching(spec.layout or spec.name) for r in reg.ranges]
        if spec.hull and ranges:
            ranges = [(min(s for s, _ in ranges), max(e for _, e in ranges))]
        span = LEVEL_SPAN[level_of(spec.level)]
        for s, e in ranges:
            self.copy(s & ~(span - 1), (e + span - 1) & ~(span - 1), spec.level, spec.name)
        self.regions.append(spec)

    def drop_region(self, name: str) -> None:
        """Clear every copy made for region ``name``."""
        spec = self.spec(name)
        for c in [c for c in self.copies if c.region == name]:
            self.clear(c.start, c.end, c.level)
            self.copies.remove(c)
        self.regions.remove(spec)

    def spec(self, name: str) -> RegionSpec:
        """The mapping-set region named ``name``."""
        for s in self.regions:
            if s.name == name:
                return s
        raise MapSetError(f"no region {name!r} in the mapping set ({', '.join(s.name for s in self.regions)})")

    def copy(self, start: int, end: int, level: str, region: str = "") -> Copy:
        """Copy the kernel table's entries for [start, end) into the KVM table at ``level``.

        The range must be aligned to the level's span. Where the kernel maps part of it with a
        bigger page than the level, that whole page is copied (as kvm_copy_pmd_range copies a
        large PMD) and the copy's ``mapped`` says so. Entries already present are merged.
        """
        lvl = level_of(level)
        span = LEVEL_SPAN[lvl]
        check_canonical_range(start, end)
        if start % span or end % span:
            raise MapSetError(f"level {level} cannot hold [{start:#x}, {end:#x}): both ends must be "
                              f"multiples of {span:#x}; use a lower level")
        c = Copy(region, start, end, level)
        va = start
        while va < end:
            va = self._copy_one(va, lvl, c)
        c.mapped = merge_ranges(c.mapped)
        self.copies.append(c)
        return c

    def _copy_one(self, va: int, lvl: int, c: Copy) -> int:
        """Copy the kernel entry covering ``va`` at ``lvl`` (or the leaf above it); return the
        next address to copy."""
        ktable, kt_level = self.kernel.root, 4
        mine = self.table.root
        while True:
            i = level_index(va, kt_level)
            ke = self.kernel.read_entry(ktable, i)
            span = LEVEL_SPAN[kt_level]
            base = va & ~(span - 1)
            if not ke & P:
                return base + span  # the kernel maps nothing here: nothing to copy
            leaf = kt_level == 1 or (kt_level < 4 and ke & PS)
            if kt_level == lvl or leaf:
                if leaf and kt_level > lvl:
                    c.notes.append(f"{base:#x}: the kernel maps a {span >> 10} KiB page here; copied whole")
                cur = self.table.read_entry(mine, i)
                if cur & P and cur != ke:
                    # kvm_set_pXd() in the RFC: -EBUSY rather than overwrite a different entry
                    raise MapSetError(f"copy of {c.region or 'range'} at {LEVEL_NAMES[kt_level]} level would overwrite "
                                      f"the KVM entry {cur:#x} for {sign_extend(base):#x} (copied at a lower level); "
                                      f"clear that copy first")
                if not cur & P:
                    self._write(mine, i, ke)
                c.mapped.append((sign_extend(base), sign_extend(base) + span))
                return base + span
            cur = self.table.read_entry(mine, i)
            if cur & P and (cur & ADDR_MASK) not in self.owned:
                # already copied at a higher level: the kernel's tables below are shared; merged
                c.mapped.append((sign_extend(base), sign_extend(base) + span))
                c.notes.append(f"{sign_extend(base):#x}: already mapped by a {LEVEL_NAMES[kt_level]}-level copy; merged")
                return base + span
            if not cur & P:
                frame = self.kernel.store.alloc()
                self.owned.add(frame)
                self._write(mine, i, frame | (ke & ~ADDR_MASK & ~PS))
                cur = frame | P
            mine = cur & ADDR_MASK
            ktable = ke & ADDR_MASK
            kt_level -= 1

    def clear(self, start: int, end: int, level: str) -> None:
        """Clear the KVM table's entries for [start, end) at ``level``. Refused (SharedTableError)
        where those entries sit in a table page shared with the kernel."""
        lvl = level_of(level)
        span = LEVEL_SPAN[lvl]
        check_canonical_range(start, end)
        if start % span or end % span:
            raise MapSetError(f"level {level} cannot hold [{start:#x}, {end:#x}): not {span:#x}-aligned")
        for va in range(start, end, span):
            table = self.table.root
            for l in range(4, lvl, -1):
                e = self.table.read_entry(table, level_index(va, l))
                if not e & P:
                    table = None  # nothing mapped: nothing to clear
                    break
                if e & PS:
                    raise MapSetError(f"cannot clear [{start:#x}, {end:#x}) at {level}: {va:#x} is inside a "
                                      f"{LEVEL_SPAN[l] >> 20} MiB page copied at {LEVEL_NAMES[l]} level")
                table = e & ADDR_MASK
            if table is not None:
                self._write(table, level_index(va, lvl), 0)

    def _write(self, table: int, index: int, value: int) -> None:
        """The one place the KVM table is written: never into a page the kernel table uses."""
        if table not in self.owned or table in self._kernel_frames:
            raise SharedTableError(f"refused: entry {index} of table page {table:#x} is shared with the kernel "
                                   f"page table (a copy above PTE level shares the tables below it)")
        self.table.write_entry(table, index, value)

    # --- reading ------------------------------------------------------------------------------

    def mapped(self, addr: int) -> bool:
        """Does kvm_mm map ``addr``?"""
        return canonical(addr) and self.table.translate(addr) is not None

    def sensitive(self, addr: int) -> bool:
        """Allowlists call nothing sensitive: what they do not map, they simply do not map."""
        return False

    def exposed(self, name: str) -> tuple[int, int]:
        """(bytes the copies of region ``name`` make kvm_mm map, bytes of the objects themselves)."""
        spans = [(s, e) for c in self.copies if c.region == name for s, e in c.mapped]
        objects = sum(r.size for r in self.layout.matching(self.spec(name).layout or name))
        return sum(e - s for s, e in merge_ranges(spans)), objects

    def mapped_bytes(self) -> int:
        """Bytes of address space kvm_mm maps."""
        return sum(r.size for r in self.table.ranges())

    def physical_bytes(self) -> int:
        """Distinct physical bytes kvm_mm maps: its P4D copy of ESPFIX maps one page per CPU
        65,536 times, the kernel image is also in the direct map: each page counts once. Spans
        under table pages the evidence did not read are left out and listed in ``unread``."""
        self.unread: list[tuple[int, int]] = []
        return physical_bytes(self.table, unread=self.unread)


def address_space(layout: Layout, policy: str = "rfc-v1", drop: tuple[str, ...] = (),
                  ram: int = 1 << 30) -> KvmAddressSpace | DenylistSpace | AnnotatedSpace:
    """The isolated address space ``policy`` defines: the RFC's copies, the 2022 series'
    annotated allocations, or the 2024-2025 series' denylist."""
    p = POLICIES.get(policy)
    if p is None:
        raise MapSetError(f"unknown policy {policy!r}; kvmiso knows {', '.join(POLICIES)}")
    if p.builds != "kvm_mm":
        if drop:
            raise MapSetError(f"policy {policy} maps what its series marks, not a set of copies: there is no region "
                              f"to drop")
        return (AnnotatedSpace if p.builds == "annotations" else DenylistSpace).default(layout, policy, ram)
    return KvmAddressSpace.default(layout, policy, drop, ram)


__all__ = ["AnnotatedSpace", "Copy", "DEFAULT_SET", "DenylistSpace", "KvmAddressSpace", "LEVELS", "MapSetError",
           "RegionSpec", "SharedTableError", "address_space", "default_specs"]
