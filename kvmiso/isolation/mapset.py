"""The KVM address space (kvm_mm) built from a layout the way the 2019 RFC builds it.

A *kernel table* models the host's page table (init_mm): the kernel image in 2 MiB pages, the
direct map of RAM (1 GiB pages where the CPU has them, split to 4 KiB pages around the modeled
objects), the modeled vmalloc objects, cpu_entry_area and ESPFIX pages. The KVM table starts
as an empty PGD; ``copy()`` fills it the RFC's way (``kvm_copy_pgd_range`` and friends, patch
13): at the chosen level the kernel's entries are copied into tables KVM owns, so everything
below that level is *shared* with the kernel table. KVM never writes a shared table page:
every write goes through one gate that refuses it.

>>> kas = KvmAddressSpace.default(host_layout())
>>> [r.name for r in kas.regions][:3]
['kernel_image', 'percpu_areas', 'cpu_entry_area']
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .layout import PAGE, Layout, Region
from .pagetable import (ADDR_MASK, G, LEVEL_NAMES, LEVEL_SPAN, NX, P, PS, RW, SIZE_1G, SIZE_2M, SIZE_4K, US,
                        ByteStore, MappedRange, PageTable, PageTableError, canonical, check_canonical_range,
                        level_index, sign_extend)

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
class Policy:
    """When the CPU runs on kvm_mm, and what sends it back to host_mm."""

    name: str
    enter: str
    leave: str
    cite: str


POLICIES = {
    "rfc-v1": Policy("rfc-v1", "vcpu_run() entry (kvm_isolation_enter)",
                     "kvm_may_access_sensitive_data(): guest page faults, vCPU sched-out (kvm_arch_vcpu_put), "
                     "kvm_write_guest_virt_system, IRQ handler prologues, return to userspace",
                     "KVM address space isolation RFC v1 (May 2019), patch 07"),
    "asi": Policy("asi", "just before VM-enter (vmx_vcpu_enter_exit / svm_vcpu_enter_exit)",
                  "page faults on memory the restricted space does not map (asi_exit), the return to "
                  "userspace, context switch; IRQ entry stays in the restricted space",
                  "Address Space Isolation series (2022-2024), KVM enter/exit points"),
}


@dataclass(frozen=True)
class RegionSpec:
    """One region of the mapping set: which layout region, copied at which level, and why."""

    name: str
    group: str  # core, vendor, vm, vcpu, task, percpu, memslots, buses, user-added
    level: str  # PGD, P4D, PUD, PMD, PTE
    cite: str
    layout: str = ""  # the layout region it copies (default: the same name)


# The RFC's set (DESIGN.md table). Vendor regions exist only for their vendor in the layout.
DEFAULT_SET = [
    RegionSpec("kernel_image", "core", "PMD", "RFC patch 19: kernel text, __START_KERNEL_map + KERNEL_IMAGE_SIZE at PMD level"),
    RegionSpec("percpu_areas", "percpu", "PTE", "RFC patch 19: the whole per-CPU area"),
    RegionSpec("cpu_entry_area", "core", "P4D", "RFC patch 19: cpu_entry_area at P4D level"),
    RegionSpec("espfix", "core", "P4D", "RFC patch 19: ESPFIX at P4D level"),
    RegionSpec("irq_stacks", "percpu", "PTE", "RFC patch 19: per-CPU IRQ stacks"),
    RegionSpec("kvm_module", "core", "PTE", "RFC patch 19: the kvm module's core layout"),
    RegionSpec("kvm_intel_module", "vendor", "PTE", "RFC patch 20: the kvm_intel module"),
    RegionSpec("kvm_amd_module", "vendor", "PTE", "by analogy with RFC patch 20 (the RFC covers VMX only)"),
    RegionSpec("kvm_pvm_module", "vendor", "PTE", "by analogy with RFC patch 20 (the RFC covers VMX only)"),
    RegionSpec("l1d_flush_pages", "vendor", "PTE", "RFC patch 20: vmx_l1d_flush_pages"),
    RegionSpec("iopm", "vendor", "PTE", "by analogy with RFC patch 20 (SVM's global I/O permission map)"),
    RegionSpec("pvm_switch_state", "vendor", "PTE", "by analogy with RFC patch 20 (PVM's per-CPU switcher state)"),
    RegionSpec("vm_struct", "vm", "PTE", "RFC patch 21: struct kvm_vmx"),
    RegionSpec("srcu_sda", "vm", "PTE", "RFC patch 21: the per-CPU kvm->srcu.sda"),
    RegionSpec("vcpu_struct", "vcpu", "PTE", "RFC patch 22: struct vcpu_vmx"),
    RegionSpec("pml_page", "vcpu", "PTE", "RFC patch 22: the PML page"),
    RegionSpec("guest_msrs", "vcpu", "PTE", "RFC patch 22: guest_msrs"),
    RegionSpec("vmcs", "vcpu", "PTE", "RFC patch 22: vmcs01.vmcs"),
    RegionSpec("msr_bitmap", "vcpu", "PTE", "RFC patch 22: vmcs01.msr_bitmap"),
    RegionSpec("vmcb", "vcpu", "PTE", "by analogy with RFC patch 22 (SVM's VMCB)"),
    RegionSpec("msrpm", "vcpu", "PTE", "by analogy with RFC patch 22 (SVM's MSR permission map)"),
    RegionSpec("pvcs", "vcpu", "PTE", "by analogy with RFC patch 22 (PVM's shared vCPU page)"),
    RegionSpec("pio_data", "vcpu", "PTE", "RFC patch 22: vcpu.arch.pio_data"),
    RegionSpec("lapic", "vcpu", "PTE", "RFC patch 22: struct kvm_lapic"),
    RegionSpec("vcpu_task", "task", "PTE", "RFC patch 23: the vCPU task_struct"),
    RegionSpec("vcpu_stack", "task", "PTE", "RFC patch 23: the vCPU task stack (THREAD_SIZE)"),
    RegionSpec("active_mm", "task", "PTE", "RFC patch 23: the task's active_mm"),
    RegionSpec("active_mm_pgd", "task", "PTE", "RFC patch 23: active_mm->pgd"),
    RegionSpec("memslots", "memslots", "PTE", "RFC patch 26: kvm->memslots[] (re-mapped when memslots change)"),
    RegionSpec("buses", "buses", "PTE", "RFC patch 27: kvm->buses[] with each kvm_io_bus"),
]


@dataclass
class Copy:
    """One copy into the KVM table: the range asked for, the range actually mapped (wider when
    the kernel maps it with a bigger page than the level), the level, and the region."""

    region: str
    start: int
    end: int
    level: str
    mapped: list[tuple[int, int]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


class KernelTable(PageTable):
    """The vCPU task's page table (current->mm) modeled from a layout: the kernel half every
    mm shares with init_mm, and the user mappings KVM uses (kvm_run, guest memory)."""

    def __init__(self, layout: Layout, gbpages: bool = True, store: ByteStore | None = None) -> None:
        super().__init__(store or ByteStore(64 << 20), gbpages=gbpages)
        self.layout = layout
        if layout.levels != 4:
            raise MapSetError("the running kernel uses 5-level paging; kvmiso's page-table model is 4-level")
        self._phys = 1 << 40  # backing for modeled vmalloc/cea pages: any frame, never RAM
        reg = layout.regions
        img = reg["kernel_image"]
        sections = [r for r in reg.values() if r.kind == "section" and img.contains(r.start)]
        lo = min(r.start for r in sections) & ~(SIZE_2M - 1)
        hi = max(r.ranges[-1][1] for r in sections)
        hi = (hi + SIZE_2M - 1) & ~(SIZE_2M - 1)
        text_end = reg["text"].ranges[0][1]
        for va in range(lo, hi, SIZE_2M):
            flags = P | G | (0 if va < text_end else RW | NX)
            self.map(va, va - img.start, SIZE_2M, page_size=SIZE_2M, flags=flags)
        self._map_direct(layout)
        # The RFC copies from current->mm: the vCPU task's user half is there too (4 KiB pages:
        # the VMM's mappings need not be 2 MiB aligned)
        for r in reg.values():
            if r.kind == "user" and r.name != "user":
                for s, e in r.ranges:
                    self.map(s, self._frames(e - s), e - s, flags=P | RW | NX | US)
        for r in reg.values():
            if r.kind == "object" and not reg["direct_map"].contains(r.start):
                for s, e in r.ranges:
                    self.map(s, self._frames(e - s), e - s, flags=P | RW | NX | G)
        cea = reg["cpu_entry_area"].start
        self.map(cea, self._frames(PAGE), PAGE, flags=P | NX | G)  # the read-only IDT (CPU_ENTRY_AREA_RO_IDT)
        for cpu in range(layout.cpus):
            base = cea + PAGE + cpu * CEA_PER_CPU
            self.map(base, self._frames(CEA_PER_CPU), CEA_PER_CPU, flags=P | RW | NX | G)
            esp = reg["espfix"].start + cpu * 0x10000
            self.map(esp, self._frames(PAGE), PAGE, flags=P | RW | NX | G)

    def _frames(self, size: int) -> int:
        pa, self._phys = self._phys, self._phys + size
        return pa

    def _map_direct(self, layout: Layout) -> None:
        """RAM in the biggest pages that do not cover a modeled object; 4 KiB pages around them."""
        dm = layout.regions["direct_map"].start
        ram = layout_ram(layout)
        small = {(s - dm) // SIZE_2M for r in layout.regions.values() if r.kind == "object"
                 for s0, e0 in r.ranges if layout.regions["direct_map"].contains(s0)
                 for s in range(s0, e0, SIZE_4K)}
        big = {c * SIZE_2M // SIZE_1G for c in small}
        flags = P | RW | NX | G
        pos = 0
        while pos < ram:
            if pos % SIZE_1G == 0 and pos + SIZE_1G <= ram and self.gbpages and pos // SIZE_1G not in big:
                self.map(dm + pos, pos, SIZE_1G, page_size=SIZE_1G, flags=flags)
                pos += SIZE_1G
            elif pos % SIZE_2M == 0 and pos + SIZE_2M <= ram and pos // SIZE_2M not in small:
                self.map(dm + pos, pos, SIZE_2M, page_size=SIZE_2M, flags=flags)
                pos += SIZE_2M
            else:
                step = SIZE_2M - pos % SIZE_2M
                self.map(dm + pos, pos, step, flags=flags)
                pos += step


CEA_PER_CPU = 0x3B000  # sizeof(struct cpu_entry_area) on a 6.x x86-64 build, rounded to pages: modeled


def layout_ram(layout: Layout) -> int:
    """RAM the direct map covers: the machine's, and at least every modeled direct-map object."""
    dm = layout.regions["direct_map"]
    top = max((e for r in layout.regions.values() if r.kind == "object" for s, e in r.ranges if dm.contains(s)),
              default=dm.start)
    return max(layout.ram & ~(SIZE_2M - 1), ((top - dm.start) + SIZE_1G) & ~(SIZE_1G - 1))


class KvmAddressSpace:
    """kvm_mm: a PGD of its own whose entries copy the kernel table's at a chosen level.

    ``regions`` are the mapping-set regions in effect; ``copies`` every copy made.
    """

    def __init__(self, kernel: KernelTable, policy: str = "rfc-v1") -> None:
        if policy not in POLICIES:
            raise MapSetError(f"unknown policy {policy!r}; kvmiso knows {', '.join(POLICIES)}")
        self.kernel = kernel
        self.layout = kernel.layout
        self.policy = POLICIES[policy]
        self._kernel_frames = set(kernel.table_frames())
        self.table = PageTable(kernel.store, gbpages=kernel.gbpages)
        self.owned = {self.table.root}  # table frames KVM allocated: the only ones it may write
        self.regions: list[RegionSpec] = []
        self.copies: list[Copy] = []

    # --- building -----------------------------------------------------------------------------

    @classmethod
    def default(cls, layout: Layout, policy: str = "rfc-v1", drop: tuple[str, ...] = (),
                gbpages: bool = True) -> "KvmAddressSpace":
        """The RFC's mapping set for the layout's vendor, minus ``drop``."""
        kas = cls(KernelTable(layout, gbpages=gbpages), policy)
        specs = default_specs(layout)
        names = {s.name for s in specs}
        for d in drop:
            if d not in names:
                raise MapSetError(f"cannot drop {d!r}: not in the default set ({', '.join(sorted(names))})")
        for spec in specs:
            if spec.name not in drop:
                kas.add_region(spec)
        return kas

    def add_region(self, spec: RegionSpec, region: Region | None = None) -> None:
        """Copy every range of a layout region (or ``region``) at the spec's level."""
        region = region or self.layout.region(spec.layout or spec.name)
        for s, e in region.ranges:
            self.copy(s, e, spec.level, spec.name)
        self.regions.append(spec)

    def drop_region(self, name: str) -> None:
        """Clear every copy made for region ``name``."""
        spec = self.spec(name)
        for c in [c for c in self.copies if c.region == name]:
            self.clear(c.start, c.end, c.level)
            self.copies.remove(c)
        self.regions.remove(spec)

    def spec(self, name: str) -> RegionSpec:
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

    def ranges(self) -> list[MappedRange]:
        return self.table.ranges()

    def mapped(self, addr: int) -> bool:
        return canonical(addr) and self.table.translate(addr) is not None

    def region_of(self, addr: int) -> str:
        """The mapping-set region whose copy maps ``addr``; else the default region that would,
        else the layout region holding it."""
        for c in self.copies:
            if any(s <= addr < e for s, e in c.mapped):
                return c.region
        for spec in default_specs(self.layout):  # the default region that would map it
            if self.layout.region(spec.layout or spec.name).contains(addr):
                return spec.name
        r = self.layout.find(addr)
        return r.name if r else "unmapped hole"

    def summary(self) -> dict:
        """Regions, levels, sizes, the span each copy covers and the 4 KiB pages actually mapped
        in it; how much of the kernel's mapped space kvm_mm maps."""
        leaves = self.table.ranges()
        kvm = sum(r.size for r in leaves)
        kern = sum(r.size for r in self.kernel.ranges())
        rows = []
        for spec in self.regions:
            region = self.layout.region(spec.layout or spec.name)
            spans = [(s, e) for c in self.copies if c.region == spec.name for s, e in c.mapped]
            present = sum(max(0, min(e, r.end) - max(s, r.start)) for s, e in spans for r in leaves)
            rows.append({"name": spec.name, "group": spec.group, "level": spec.level, "cite": spec.cite,
                         "start": region.start, "size": region.size, "ranges": len(region.ranges),
                         "copied_bytes": sum(e - s for s, e in spans), "pages_4k": present // SIZE_4K,
                         "modeled": region.modeled, "source": region.source})
        return {"policy": self.policy.name, "policy_enter": self.policy.enter, "policy_leave": self.policy.leave,
                "policy_cite": self.policy.cite, "vendor": self.layout.vendor, "layout_source": self.layout.source,
                "levels": self.layout.levels, "regions": rows, "kvm_mapped_bytes": kvm, "kvm_pages_4k": kvm // SIZE_4K,
                "kernel_mapped_bytes": kern, "kernel_pages_4k": kern // SIZE_4K,
                "share_of_kernel_mapped": kvm / kern if kern else 0.0,
                "share_of_kernel_half": kvm / self.layout.kernel_span, "notes": self.layout.notes}


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


def default_specs(layout: Layout) -> list[RegionSpec]:
    """The default set's regions that exist in this layout (vendor objects, loaded modules)."""
    return [s for s in DEFAULT_SET if (s.layout or s.name) in layout.regions]


# --- user region files ---------------------------------------------------------------------------

SETS_DIR = Path(__file__).parent / "sets"


def shipped_sets() -> list[str]:
    """Region sets that ship with kvmiso, usable by name (``--regions modern``)."""
    return sorted(p.stem for p in SETS_DIR.glob("*.toml"))


def load_regions(path: str | Path, layout: Layout, policy: str | None = None,
                 drop: tuple[str, ...] = ()) -> KvmAddressSpace:
    """The default set changed by a TOML file (a path, or the name of a shipped set)::

        policy = "asi"                 # optional: rfc-v1 (default) or asi
        drop = ["buses", "memslots"]   # default regions to leave out

        [[region]]                     # extra regions: a layout region by name ...
        name = "vmemmap_slice"
        start = 0xffffea0000000000     # ... or an explicit range
        size = 0x200000
        level = "PMD"
        cite = "why it is needed"

    Every error names the file and line.
    """
    path = Path(path)
    if path.suffix != ".toml" and (SETS_DIR / f"{path}.toml").is_file():
        path = SETS_DIR / f"{path}.toml"
    text = path.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        m = re.search(r"\(at line (\d+), column \d+\)", str(e))
        raise MapSetError(f"not valid TOML: {e}", int(m.group(1)) if m else None, str(path)) from None

    def fail(msg: str, needle: str) -> MapSetError:
        return MapSetError(msg, line_of(text, needle), str(path))

    known = {"policy", "drop", "region"}
    for k in doc:
        if k not in known:
            raise fail(f"unknown key {k!r}; the file may set {', '.join(sorted(known))}", k)
    pol = policy or doc.get("policy", "rfc-v1")
    if pol not in POLICIES:
        raise fail(f"unknown policy {pol!r}; one of {', '.join(POLICIES)}", str(pol))
    names = {s.name for s in default_specs(layout)}
    dropped = list(drop) + list(doc.get("drop", []))
    for d in dropped:
        if d not in names:
            raise fail(f"cannot drop unknown region {d!r}; the default set has {', '.join(sorted(names))}", f'"{d}"')
    kas = KvmAddressSpace.default(layout, pol, tuple(dropped))
    taken = [(s, e, c.region) for c in kas.copies for s, e in [(c.start, c.end)]]
    for entry in doc.get("region", []):
        name = entry.get("name")
        if not isinstance(name, str) or not name:
            raise fail("a [[region]] needs a name", "[[region]]")
        needle = f'"{name}"'
        level = entry.get("level", "PTE")
        if level.upper() not in LEVELS:
            raise fail(f"region {name!r}: unknown level {level!r}; one of {', '.join(LEVELS)}", needle)
        if "start" in entry:
            start, size = entry["start"], entry.get("size", 0)
            if not isinstance(start, int) or not isinstance(size, int) or size <= 0:
                raise fail(f"region {name!r}: start and size must be integers, size > 0", needle)
            region = Region(name, ((start, start + size),), "user-added", str(path))
        elif name in layout.regions:
            region = layout.regions[name]
        else:
            raise fail(f"unknown region {name!r}: not in the layout ({', '.join(layout.regions)}) and no start/size",
                       needle)
        for s, e in region.ranges:
            if not canonical(s) or not canonical(e - 1) or (s >> 63) != ((e - 1) >> 63):
                raise fail(f"region {name!r}: [{s:#x}, {e:#x}) is not canonical", needle)
            span = LEVEL_SPAN[LEVELS[level.upper()]]
            if s % span or e % span:
                raise fail(f"region {name!r}: level {level} cannot hold [{s:#x}, {e:#x}) "
                           f"(both ends must be multiples of {span:#x})", needle)
            for ts, te, owner in taken:
                if s < te and ts < e:
                    raise fail(f"region {name!r}: [{s:#x}, {e:#x}) overlaps region {owner!r} [{ts:#x}, {te:#x})",
                               needle)
            taken.append((s, e, name))
        try:
            kas.add_region(RegionSpec(name, "user-added", level.upper(), entry.get("cite", str(path))), region)
        except (MapSetError, PageTableError) as e:
            raise fail(f"region {name!r}: {e}", needle) from None
    return kas


def line_of(text: str, needle: str) -> int | None:
    """The first line of ``text`` (from 1) that contains ``needle``: where a TOML error is."""
    for n, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return n
    return None
