"""kvm_mm built from the kernel table the way the 2019 RFC builds it, and ASI's denylist.

``KvmAddressSpace`` (allowlist, ``rfc-v1``): an empty PGD whose entries copy the kernel's at a
chosen level (``kvm_copy_pgd_range`` and friends, RFC patches 13-14). Everything below the copy
level is *shared* with the kernel table, and a huge kernel leaf is copied whole, so mapping one
object maps what the kernel's leaf holds beside it: the summary counts it. KVM never writes a
shared table page: every write goes through one gate that refuses it.

``DenylistSpace`` (``asi``): the kernel table as it is, minus the memory the policy calls
sensitive (GFP_USER: guest memory and other user pages, and their direct-map aliases).

>>> kas = KvmAddressSpace.default(build_layout(evidence))
>>> kas.mapped(layout.region("pio_data").start)
True
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .kerneltable import LiveKernelTable, ModeledKernelTable, kernel_table
from .layout import PAGE, Layout
from .pagetable import (ADDR_MASK, KERNEL_HALF, LEVEL_NAMES, LEVEL_SPAN, P, PS, PageTable, canonical, check_canonical_range,
                        level_index, sign_extend)
from .policy import POLICIES, Policy

# Level names as the RFC's functions take them; P4D is folded into the PGD with 4-level paging.
LEVELS = {"PGD": 4, "P4D": 4, "PUD": 3, "PMD": 2, "PTE": 1}


class MapSetError(ValueError):
    """A mapping-set change the model refuses; ``line`` names the TOML line when there is one."""

    def __init__(self, message: str, line: int | None = None, source: str = "") -> None:
        where = f"{source}:{line}: " if line else (f"{source}: " if source else "")
        super().__init__(where + message)
        self.line = line


class SharedTableError(MapSetError):
    """A KVM-side write would land in a page-table page the kernel table uses too."""


@dataclass(frozen=True)
class RegionSpec:
    """One region of the mapping set: which layout regions (a name, or ``bus:*`` for all with that
    prefix), copied at which level, and why."""

    name: str
    group: str  # core, vendor, vm, vcpu, task, percpu, memslots, buses, user-added
    level: str  # PGD, P4D, PUD, PMD, PTE
    cite: str
    layout: str = ""  # the layout region(s) it copies (default: the same name)
    vendors: tuple[str, ...] = ()  # only for these vendor modules (empty: all)
    # copy [first start, last end) of all the ranges as one: the RFC copies the per-CPU first
    # chunk as pcpu_base_addr + pcpu_unit_size * pcpu_nr_units, not unit by unit (kvmiso reads
    # one unit per possible CPU; units a group rounds up beyond them are left out)
    hull: bool = False


# The RFC's set (what its patches copy into kvm_mm), in the names of the objects kvmiso reads
# from the running kernel. Regions the layout lacks (another vendor's, a module built in, lapic
# without an in-kernel LAPIC) are left out and said so.
DEFAULT_SET = [
    RegionSpec("kernel_image", "core", "PMD", "RFC patch 19: kernel text, __START_KERNEL_map + KERNEL_IMAGE_SIZE at PMD level"),
    RegionSpec("percpu_area", "percpu", "PMD", "RFC patch 19: kvm_copy_mapping(pcpu_base_addr, pcpu_unit_size * "
               "pcpu_nr_units, PGT_LEVEL_PMD): every CPU's unit of the first chunk, at PMD level", hull=True),
    RegionSpec("cpu_entry_area", "core", "P4D", "RFC patch 19: cpu_entry_area at P4D level"),
    RegionSpec("espfix", "core", "P4D", "RFC patch 19: ESPFIX at P4D level"),
    RegionSpec("irq_stack", "percpu", "PTE", "RFC patch 19: per-CPU IRQ stacks"),
    RegionSpec("kvm_module", "core", "PTE", "RFC patch 19: the kvm module"),
    RegionSpec("kvm_intel_module", "vendor", "PTE", "RFC patch 20: the kvm_intel module"),
    RegionSpec("kvm_amd_module", "vendor", "PTE", "by analogy with RFC patch 20 (the RFC covers VMX only)"),
    RegionSpec("kvm_pvm_module", "vendor", "PTE", "by analogy with RFC patch 20 (the RFC covers VMX only)"),
    RegionSpec("vm_struct", "vm", "PTE", "RFC patch 21: struct kvm_vmx"),
    RegionSpec("srcu_sda", "vm", "PTE", "RFC patch 21: the per-CPU kvm->srcu.sda"),
    RegionSpec("vcpu_struct", "vcpu", "PTE", "RFC patch 22: struct vcpu_vmx"),
    RegionSpec("vmcs", "vcpu", "PTE", "RFC patch 22: vmcs01.vmcs", vendors=("kvm_intel",)),
    RegionSpec("msr_bitmap", "vcpu", "PTE", "RFC patch 22: vmcs01.msr_bitmap", vendors=("kvm_intel",)),
    RegionSpec("vmcb", "vcpu", "PTE", "by analogy with RFC patch 22 (SVM's VMCB)", vendors=("kvm_amd",)),
    RegionSpec("msrpm", "vcpu", "PTE", "by analogy with RFC patch 22 (SVM's MSR permission map)", vendors=("kvm_amd",)),
    RegionSpec("pio_data", "vcpu", "PTE", "RFC patch 22: vcpu.arch.pio_data"),
    RegionSpec("lapic", "vcpu", "PTE", "RFC patch 22: struct kvm_lapic"),
    RegionSpec("vcpu_task", "task", "PTE", "RFC patch 23: the vCPU task_struct"),
    RegionSpec("vcpu_stack", "task", "PTE", "RFC patch 23: the vCPU task stack (THREAD_SIZE)"),
    RegionSpec("active_mm", "task", "PTE", "RFC patch 23: the task's active_mm"),
    RegionSpec("pgd", "task", "PTE", "RFC patch 23: active_mm->pgd"),
    # RFC patch 26 copies sizeof(struct kvm_memslots) at kvm->memslots[i], and re-copies it when
    # the memslots change: in 2019 that struct held every kvm_memory_slot inline (memslots[
    # KVM_MEM_SLOTS_NUM]), so one copy mapped the lookup (generation, id_to_index, lru_slot) and the
    # slots. Since 5.17 the set is embedded in struct kvm (__memslots) and each slot is its own
    # kzalloc'd object in the set's trees: the intent is both, as two rows. rmap, lpage_info and
    # the dirty bitmap were separate allocations in 2019 too, and the RFC mapped none of them.
    RegionSpec("memslots", "memslots", "PTE", "RFC patch 26: kvm->memslots[] (struct kvm_memslots: inside struct kvm "
               "on 6.x, the active set of address space 0)"),
    RegionSpec("memslot", "memslots", "PTE", "RFC patch 26 by intent: every struct kvm_memory_slot (inline in 2019's "
               "struct kvm_memslots; separate objects in the set's gfn/hva trees since 5.17)", "memslot:*"),
    RegionSpec("buses", "buses", "PTE", "RFC patch 27: kvm->buses[], each struct kvm_io_bus", "bus:*"),
]


@dataclass
class Copy:
    """One copy into the KVM table: the range asked for, the ranges actually mapped (wider when
    the kernel maps it with a bigger page than the level), the level, and the region."""

    region: str
    start: int
    end: int
    level: str
    mapped: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


def default_specs(layout: Layout) -> list[RegionSpec]:
    """The default set's regions that exist in this layout (vendor objects, loaded modules)."""
    return [s for s in DEFAULT_SET if layout.matching(s.layout or s.name)]


class KvmAddressSpace:
    """kvm_mm: a PGD of its own whose entries copy the kernel table's at a chosen level.

    ``regions`` are the mapping-set regions in effect; ``copies`` every copy made.
    """

    def __init__(self, kernel: LiveKernelTable | ModeledKernelTable, policy: str = "rfc-v1") -> None:
        if policy not in POLICIES:
            raise MapSetError(f"unknown policy {policy!r}; kvmiso knows {', '.join(POLICIES)}")
        self.kernel = kernel
        self.layout = kernel.layout
        self.policy: Policy = POLICIES[policy]
        self._kernel_frames = kernel.captured if kernel.live else frozenset(kernel.table_frames())
        self.table = PageTable(kernel.store, gbpages=kernel.gbpages)
        self.owned = {self.table.root}  # table frames KVM allocated: the only ones it may write
        self.regions: list[RegionSpec] = []
        self.copies: list[Copy] = []
        self.missing: list[str] = []  # default regions this layout lacks, with why

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
        span = LEVEL_SPAN[_level(spec.level)]
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
        lvl = _level(level)
        span = LEVEL_SPAN[lvl]
        check_canonical_range(start, end)
        if start % span or end % span:
            raise MapSetError(f"level {level} cannot hold [{start:#x}, {end:#x}): both ends must be "
                              f"multiples of {span:#x}; use a lower level")
        c = Copy(region, start, end, level)
        va = start
        while va < end:
            va = self._copy_one(va, lvl, c)
        c.mapped = _merge(c.mapped)
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
        lvl = _level(level)
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
        return sum(e - s for s, e in _merge(spans)), objects

    def mapped_bytes(self) -> int:
        """Bytes kvm_mm maps."""
        return sum(r.size for r in self.table.ranges())


class DenylistSpace:
    """The restricted address space of ASI: the kernel table minus sensitive memory.

    Sensitive: the user half (ASI's KVM class maps none: ``asi_maps_user_addr()`` is false),
    except guest memory under asi-2022 (locally non-sensitive); the direct-map alias of every
    GFP_USER page the evidence knows (guest memory's pages); and KVM's own kernel mappings of
    guest pages (the pvclock page).
    """

    def __init__(self, kernel: LiveKernelTable | ModeledKernelTable, policy: str = "asi") -> None:
        self.kernel = kernel
        self.layout = kernel.layout
        self.policy = POLICIES[policy]
        self.regions: list[RegionSpec] = []
        self.copies: list[Copy] = []
        self.missing: list[str] = []
        self.kept = [(s, e) for r in self.layout.regions.values() if r.kind == "user" and self.policy.guest_memory_mapped
                     and r.name.startswith("guest_memory") for s, e in r.ranges]
        self.denied: list[tuple[str, int, int]] = [("user half", 0, KERNEL_HALF)]
        dm = self.layout.regions["direct_map"].start
        for r in self.layout.regions.values():
            if r.allocator.startswith("guest memory") and not self.policy.guest_memory_mapped:
                self.denied += [(r.name, s, e) for s, e in r.ranges]  # a kernel mapping of a guest page
            if r.kind != "user" or self.policy.guest_memory_mapped and r.name.startswith("guest_memory"):
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
        if any(s <= addr < e for s, e in self.kept):
            return False
        return any(s <= addr < e for _, s, e in self.denied)

    def mapped(self, addr: int) -> bool:
        """Does the restricted space map ``addr`` (the kernel does, and it is not sensitive)?"""
        return canonical(addr) and not self.sensitive(addr) and self.kernel.translate(addr) is not None

    def mapped_bytes(self) -> int:
        """The kernel half as the kernel maps it, less the sensitive pages' aliases."""
        aliases = _merge([(s, e) for _, s, e in self.denied if s >= KERNEL_HALF])
        return self.kernel.mapped_bytes() - sum(e - s for s, e in aliases)


def _level(level: str) -> int:
    try:
        return LEVELS[level.upper()]
    except (KeyError, AttributeError):
        raise MapSetError(f"unknown level {level!r}; one of {', '.join(LEVELS)}") from None


def _merge(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def address_space(layout: Layout, policy: str = "rfc-v1", drop: tuple[str, ...] = (),
                  ram: int = 1 << 30) -> KvmAddressSpace | DenylistSpace:
    """The isolated address space ``policy`` defines: the RFC's copies, or ASI's denylist."""
    p = POLICIES.get(policy)
    if p is None:
        raise MapSetError(f"unknown policy {policy!r}; kvmiso knows {', '.join(POLICIES)}")
    if p.mapping == "denylist":
        if drop:
            raise MapSetError(f"policy {policy} maps everything but sensitive memory: there is no region to drop")
        return DenylistSpace.default(layout, policy, ram)
    return KvmAddressSpace.default(layout, policy, drop, ram)


__all__ = ["Copy", "DEFAULT_SET", "DenylistSpace", "KvmAddressSpace", "LEVELS", "MapSetError", "RegionSpec",
           "SharedTableError", "address_space", "default_specs"]
