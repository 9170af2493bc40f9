"""The host kernel address space as kvm_mm sees it: named regions, each saying where its
address comes from (``source``) and whether it is a fact or a placement (``modeled``).

* **objects** of the VM (the vCPU and VM structs, kvm_run, pio_data, emulate_ctxt, cpuid_entries,
  buses, memslots, the vCPU task, its stack and mm, per-CPU areas, IRQ stacks, srcu data ...) at the
  real addresses :mod:`kvmiso.observe.kernel.evidence` read from the running kernel, with their real
  sizes; where that evidence is missing (no BPF, not root) the same objects are placed at modeled
  addresses inside the area their allocator uses, and every one says ``modeled``;
* **sections** of the kernel image and the KVM modules, from /proc/kallsyms;
* the x86-64 **memory map** of Documentation/arch/x86/x86_64/mm.rst, with the direct map's and
  vmemmap's bases read from the running kernel where the evidence has them (both are randomized
  with CONFIG_RANDOMIZE_MEMORY; the documented defaults are marked as such).

>>> from kvmiso.session import machine_evidence
>>> evidence = machine_evidence(m)    # needs root: m's VM, read from the kernel through BPF
>>> lay = build_layout(evidence)
>>> lay.region("pio_data").source
'bpf: vcpu->arch.pio_data'
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..observe.kernel.evidence import Evidence
from ..observe.kernel.kobject import KernelObject

PAGE = 4096
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
KERNEL_IMAGE_SIZE = 1 << 30  # with CONFIG_RANDOMIZE_BASE (arch/x86/include/asm/page_64_types.h)
DEFAULT_STEXT = 0xFFFF_FFFF_8100_0000  # __START_KERNEL with CONFIG_PHYSICAL_START=0x1000000
MM_RST = "mm.rst (4-level)"


@dataclass(frozen=True)
class Region:
    """A named part of the kernel (or vCPU task's) address space: one or more [start, end)
    ranges (one each for per-CPU or per-vCPU objects, in index order)."""

    name: str
    ranges: tuple[tuple[int, int], ...]
    kind: str  # "map" (mm.rst area), "section" (kernel image), "object" (a kernel allocation), "user"
    source: str  # where the address comes from
    description: str = ""
    modeled: bool = False  # True: the address is kvmiso's placement, not read from the machine
    per: str = ""  # "cpu" or "vcpu": one range each, in index order
    allocator: str = ""

    @property
    def start(self) -> int:
        """The first byte of the first range."""
        return self.ranges[0][0]

    @property
    def size(self) -> int:
        """Bytes over all ranges."""
        return sum(e - s for s, e in self.ranges)

    def contains(self, addr: int) -> bool:
        """Is ``addr`` in one of the ranges?"""
        return any(s <= addr < e for s, e in self.ranges)

    def address(self, index: int = 0) -> int:
        """The start of the range for vCPU/CPU ``index`` (wrapping: one range serves all)."""
        return self.ranges[index % len(self.ranges)][0]


# Documentation/arch/x86/x86_64/mm.rst: (name, start, end exclusive, description).
_MAP_4LEVEL = [
    ("user", 0x0000_0000_0000_0000, 0x0000_8000_0000_0000, "user-space virtual memory"),
    ("ldt_remap", 0xFFFF_8800_0000_0000, 0xFFFF_8880_0000_0000, "LDT remap for PTI"),
    ("direct_map", 0xFFFF_8880_0000_0000, 0xFFFF_C880_0000_0000, "direct mapping of all physical memory (page_offset_base)"),
    ("vmalloc", 0xFFFF_C900_0000_0000, 0xFFFF_E900_0000_0000, "vmalloc/ioremap space (vmalloc_base)"),
    ("vmemmap", 0xFFFF_EA00_0000_0000, 0xFFFF_EB00_0000_0000, "virtual memory map, struct page array (vmemmap_base)"),
    ("cpu_entry_area", 0xFFFF_FE00_0000_0000, 0xFFFF_FE80_0000_0000, "cpu_entry_area mapping"),
    ("espfix", 0xFFFF_FF00_0000_0000, 0xFFFF_FF80_0000_0000, "%esp fixup stacks (ESPFIX)"),
    ("efi", 0xFFFF_FFEF_0000_0000, 0xFFFF_FFFF_0000_0000, "EFI region mapping space"),
]
_MAP_5LEVEL = [
    ("user", 0x0000_0000_0000_0000, 0x0100_0000_0000_0000, "user-space virtual memory"),
    ("ldt_remap", 0xFF10_0000_0000_0000, 0xFF11_0000_0000_0000, "LDT remap for PTI"),
    ("direct_map", 0xFF11_0000_0000_0000, 0xFF91_0000_0000_0000, "direct mapping of all physical memory (page_offset_base)"),
    ("vmalloc", 0xFFA0_0000_0000_0000, 0xFFD2_0000_0000_0000, "vmalloc/ioremap space (vmalloc_base)"),
    ("vmemmap", 0xFFD4_0000_0000_0000, 0xFFD6_0000_0000_0000, "virtual memory map, struct page array (vmemmap_base)"),
    ("cpu_entry_area", 0xFFFF_FE00_0000_0000, 0xFFFF_FE80_0000_0000, "cpu_entry_area mapping"),
    ("espfix", 0xFFFF_FF00_0000_0000, 0xFFFF_FF80_0000_0000, "%esp fixup stacks (ESPFIX)"),
    ("efi", 0xFFFF_FFEF_0000_0000, 0xFFFF_FFFF_0000_0000, "EFI region mapping space"),
]
MODULES_END = 0xFFFF_FFFF_FF00_0000
FIXMAP = (0xFFFF_FFFF_FF40_0000, 0xFFFF_FFFF_FF60_0000)  # FIXADDR_START varies with the config: modeled
VSYSCALL = (0xFFFF_FFFF_FF60_0000, 0xFFFF_FFFF_FF60_1000)


# Objects placed where the evidence has none: (name, allocator area, bytes, one per "vm" | "vcpu"
# | "cpu", vendors (empty: all), what it is). The sizes are this project's measurements on a 6.18
# kvm_pvm host (BTF), used only to size the placement.
MODELED_OBJECTS: list[tuple[str, str, int, str, tuple[str, ...], str]] = [
    ("percpu_area", "direct_map", 1 << 20, "cpu", (), "the per-CPU unit of each CPU (embedded first chunk)"),
    ("irq_stack", "vmalloc", 4 * PAGE, "cpu", (), "per-CPU IRQ stack (IRQ_STACK_SIZE, vmap'ed)"),
    ("vm_struct", "direct_map", PAGE, "vm", (), "struct kvm inside struct kvm_vmx / kvm_svm / kvm_pvm"),
    ("srcu_sda", "vmalloc", 384, "cpu", (), "kvm->srcu.sda, the per-CPU srcu_data of the VM (alloc_percpu)"),
    ("vcpu_struct", "direct_map", 13 * PAGE, "vcpu", (), "struct vcpu_vmx / vcpu_svm / vcpu_pvm (kmem_cache kvm_vcpu)"),
    ("vmcs", "direct_map", PAGE, "vcpu", ("kvm_intel",), "vmx->vmcs01.vmcs"),
    ("msr_bitmap", "direct_map", PAGE, "vcpu", ("kvm_intel",), "vmx->vmcs01.msr_bitmap"),
    ("vmcb", "direct_map", PAGE, "vcpu", ("kvm_amd",), "svm->vmcb01.ptr"),
    ("msrpm", "direct_map", 2 * PAGE, "vcpu", ("kvm_amd",), "svm->msrpm, the MSR permission map"),
    ("pio_data", "direct_map", PAGE, "vcpu", (), "vcpu->arch.pio_data"),
    ("kvm_run_page", "direct_map", PAGE, "vcpu", (), "vcpu->run: the kernel page behind the kvm_run mapping"),
    ("emulate_ctxt", "direct_map", 2672, "vcpu", (), "vcpu->arch.emulate_ctxt (kmem_cache x86_emulator)"),
    ("cpuid_entries", "direct_map", 2240, "vcpu", (), "vcpu->arch.cpuid_entries"),
    ("mmu_root", "direct_map", PAGE, "vcpu", (), "the shadow/TDP root table"),
    ("vcpu_task", "direct_map", 3264, "vcpu", (), "the vCPU thread's task_struct"),
    ("vcpu_stack", "vmalloc", 4 * PAGE, "vcpu", (), "the vCPU thread's kernel stack (THREAD_SIZE, vmap'ed)"),
    ("active_mm", "direct_map", 1472, "vm", (), "the vCPU task's active_mm (struct mm_struct)"),
    ("pgd", "direct_map", PAGE, "vm", (), "active_mm->pgd"),
    ("memslots", "direct_map", 1072, "vm", (), "kvm->memslots[0] (inside struct kvm on 6.x)"),
    ("memslot:0", "direct_map", 280, "vm", (), "the struct kvm_memory_slot of slot 0"),
    ("bus:MMIO", "direct_map", 24, "vm", (), "kvm->buses[KVM_MMIO_BUS]"),
    ("bus:PIO", "direct_map", 24, "vm", (), "kvm->buses[KVM_PIO_BUS]"),
]
_GUARD = PAGE  # one unmapped page between modeled objects, so that copying one never maps another
# Placed on 2 MiB of their own: the RFC copies the per-CPU first chunk at PMD level (patch 19), and
# a real first chunk is a memblock allocation that no slab or page-allocator object shares.
_OWN_PMD = frozenset({"percpu_area"})
_PMD = 2 << 20


@dataclass
class Layout:
    """The regions of the host address space, and the evidence they were built from."""

    levels: int  # 4 or 5
    regions: dict[str, Region]
    evidence: Evidence
    vendor: str
    cpus: int
    vcpus: int
    notes: list[str] = field(default_factory=list)

    @property
    def real(self) -> bool:
        """True when the objects and the kernel table are the running kernel's."""
        return self.evidence.real

    @property
    def source(self) -> str:
        """Where the objects' addresses come from."""
        return self.evidence.source if self.real else f"modeled ({self.evidence.source or 'no evidence'})"

    def region(self, name: str) -> Region:
        """The region named ``name`` (KeyError naming the ones there are)."""
        try:
            return self.regions[name]
        except KeyError:
            raise KeyError(f"no region {name!r} in the layout; it has: {', '.join(self.regions)}") from None

    def matching(self, pattern: str) -> list[Region]:
        """Regions named ``pattern``, or, for ``bus:*``, every region with that prefix."""
        if pattern.endswith("*"):
            return [r for n, r in self.regions.items() if n.startswith(pattern[:-1])]
        return [self.regions[pattern]] if pattern in self.regions else []

    def find(self, addr: int) -> Region | None:
        """The most specific region holding ``addr`` (an object before its section or area)."""
        order = {"object": 0, "user": 0, "section": 1, "map": 2}
        hits = [r for r in self.regions.values() if r.contains(addr)]
        return min(hits, key=lambda r: (order[r.kind], r.size)) if hits else None

    @property
    def kernel_span(self) -> int:
        """Bytes of kernel-half virtual address space (what "share mapped" is a share of)."""
        return 1 << (56 if self.levels == 5 else 47)

    @property
    def modeled_objects(self) -> list[str]:
        """The objects whose address is kvmiso's placement, not the kernel's."""
        return sorted({r.name for r in self.regions.values() if r.kind in ("object", "user") and r.modeled})


def build_layout(evidence: Evidence, vcpus: int = 1, cpus: int = 1, la57: bool = False,
                 user: dict[str, list[tuple[int, int]]] | None = None) -> Layout:
    """The layout from ``evidence`` (pure: tests feed saved evidence).

    Without real objects in the evidence, the objects are placed at modeled addresses; ``user``
    then gives the VM's real userspace ranges (``kvm_run``, ``guest_memory``) when known.
    """
    levels = 5 if la57 else 4
    regions: dict[str, Region] = {}
    notes = list(evidence.notes)

    def add(r: Region) -> None:
        regions[r.name] = r

    base = {k: v for k, v in evidence.facts.items() if k in ("page_offset_base", "vmemmap_base")}
    for name, s, e, desc in (_MAP_5LEVEL if levels == 5 else _MAP_4LEVEL):
        if name == "direct_map" and "page_offset_base" in base:
            s, src = base["page_offset_base"][0], f"page_offset_base: {base['page_offset_base'][1]}"
            e = s + (e - _MAP_4LEVEL[2][1])
        elif name == "vmemmap" and "vmemmap_base" in base:
            s, src = base["vmemmap_base"][0], f"vmemmap_base: {base['vmemmap_base'][1]}"
            e = s + (1 << 40)
        else:
            src = MM_RST + ("; randomized, this is the documented default" if name in ("direct_map", "vmalloc", "vmemmap")
                           else "")
        add(Region(name, ((s, e),), "map", src, desc, modeled=name in ("direct_map", "vmalloc", "vmemmap")
                   and not src.startswith(("page_offset_base", "vmemmap_base"))))
    if levels == 5:
        notes.append("5-level paging: the regions are described, but kvmiso's page-table model is 4-level")
    add(Region("kernel_image", ((START_KERNEL_MAP, START_KERNEL_MAP + KERNEL_IMAGE_SIZE),), "map", MM_RST,
               "kernel text mapping (__START_KERNEL_map, KERNEL_IMAGE_SIZE)"))
    for name, (s, e, src) in evidence.sections.items():
        add(Region(name, ((s, e),), "section", src))
    if "text" in regions:  # the image's data follows its text; a modular KVM's data is in its modules
        text_end = (regions["text"].ranges[0][1] + PAGE - 1) & ~(PAGE - 1)
        spans = [(text_end, START_KERNEL_MAP + KERNEL_IMAGE_SIZE)]
        spans += [r.ranges[0] for n, r in regions.items() if n.endswith("_module") and n.startswith("kvm")]
        add(Region("kernel_data", tuple(spans), "section", "kallsyms: _etext .. the end of the kernel image, and "
                   "the KVM modules' spans (data symbols are not in kallsyms without CONFIG_KALLSYMS_ALL)",
                   "the kernel's and KVM's global data"))
    if "text" not in regions:
        add(Region("text", ((DEFAULT_STEXT, DEFAULT_STEXT + (32 << 20)),), "section",
                   "documented default (kallsyms shows no addresses)", "kernel text", modeled=True))
    if evidence.objects:
        _real_objects(add, evidence.objects)
        for name, why in evidence.absent.items():
            notes.append(f"absent on this VM: {name}: {why}")
    else:
        notes.append(f"no real objects ({evidence.source or 'no evidence'}): every object below is modeled")
        _modeled_objects(regions, add, evidence.vendor, cpus, vcpus)
        for name, ranges in (user or {}).items():
            add(Region(name, tuple(ranges), "user", "the kvmiso VM (this process's mappings)", per="vcpu" if name == "kvm_run" else ""))
    return Layout(levels, regions, evidence, evidence.vendor, cpus, vcpus, notes)


def _real_objects(add, objects: list[KernelObject]) -> None:
    by_name: dict[str, list[KernelObject]] = {}
    for o in objects:
        by_name.setdefault(o.name, []).append(o)
    for name, objs in by_name.items():
        objs.sort(key=lambda o: o.index)
        first = objs[0]
        kind = "user" if first.allocator == "user" else "object"
        add(Region(name, tuple((o.address, o.end) for o in objs), kind, first.source,
                   f"{first.ctype} ({first.size_source})", modeled=first.modeled, per=first.per,
                   allocator=first.allocator))


def _modeled_objects(regions: dict[str, Region], add, vendor: str, cpus: int, vcpus: int) -> None:
    """Place each object from the middle of RAM's direct map upwards or 1 GiB into vmalloc
    space, page-aligned, with a guard page between neighbours."""
    cursor = {"direct_map": regions["direct_map"].start + (1 << 30), "vmalloc": regions["vmalloc"].start + (1 << 30)}
    for name, area, size, per, vendors, desc in MODELED_OBJECTS:
        if vendors and vendor not in vendors:
            continue
        ranges = []
        own = name in _OWN_PMD  # contiguous units (as the embedded first chunk's), alone in their PMDs
        if own:
            cursor[area] = (cursor[area] + _PMD - 1) & ~(_PMD - 1)
        for _ in range({"vm": 1, "vcpu": vcpus, "cpu": cpus}[per]):
            start = cursor[area]
            ranges.append((start, start + size))
            cursor[area] = start + ((size + PAGE - 1) & ~(PAGE - 1)) + (0 if own else _GUARD)
        if own:
            cursor[area] = ((cursor[area] + _PMD - 1) & ~(_PMD - 1)) + _GUARD
        add(Region(name, tuple(ranges), "object", f"{area}, {size} bytes per {per}", desc, modeled=True,
                   per=per if per != "vm" else ""))
