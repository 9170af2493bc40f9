"""ASI's restricted address space as the 2022 RFC defines it (Junaid Shahid, Ofir Weisse, "[RFC
PATCH 00/47] Address Space Isolation for KVM", 2022-02-23, on 5.16): an allowlist. "By default,
all memory is considered sensitive unless specifically categorized otherwise" (the cover letter);
what a VM's restricted space maps is what the series marks non-sensitive:

* **globally** (every restricted space): the kernel's text, rodata and the static variables it
  annotates ``__asi_not_sensitive`` (patches 37, 41, 45), the per-CPU variables it annotates
  (40, 42), modules' text (38), cpu_entry_area and ESPFIX (45), and allocations made with
  ``__GFP_GLOBAL_NONSENSITIVE`` / ``SLAB_GLOBAL_NONSENSITIVE`` (10-12, 43, 44);
* **locally** (only this VM's process): ``__GFP_LOCAL_NONSENSITIVE`` / ``SLAB_LOCAL_NONSENSITIVE``
  allocations (17-24, 43, 44), the vCPU thread's stack (47) and the guest memory KVM maps for
  the guest (33).

6.x has no such annotations, so each object kvmiso reads is classified by the patch that marks
its allocation (:data:`NONSENSITIVE_2022`, with how the 5.16 object maps onto the 6.x one where
they differ); everything else is sensitive, and an access to it leaves the restricted space
(``asi_exit`` on the page fault, patch 35) rather than faulting. The series keeps sensitive,
global and local memory in different pages and ``asi_map`` splits huge pages (patch 07), so
mapping an object maps its own pages only: no neighbour comes along with a huge leaf.

>>> from kvmiso.session import machine_evidence
>>> evidence = machine_evidence(m)    # needs root: m's VM, read from the kernel through BPF
>>> from kvmiso.isolation import build_layout
>>> layout = build_layout(evidence)
>>> space = AnnotatedSpace.default(layout)
>>> space.mapped(layout.region("emulate_ctxt").start), space.sensitive(layout.region("pgd").start)
(True, True)
"""

from __future__ import annotations

from bisect import bisect_right
from dataclasses import dataclass

from ..observe.kernel.kobject import known_object
from .kerneltable import LiveKernelTable, ModeledKernelTable, kernel_table, leaf_extents, physical_bytes
from .layout import PAGE, Layout, Region
from .pagetable import canonical
from .regionset import Copy, IsolatedSpace, RegionSpec, merge_ranges

SERIES = "https://lore.kernel.org/all/20220223052223.1202152-1-junaids@google.com/"


@dataclass(frozen=True)
class Annotation:
    """Memory the 2022 series marks non-sensitive, named as kvmiso reads it on 6.x.

    ``scope``: ``global`` (mapped in every restricted space) or ``local`` (this VM's process
    only). ``marks``: the annotation as the patch writes it. ``port``: how the 5.16 object maps
    onto the 6.x one, where they differ. ``assumed``: set where the series maps only part of what
    the region holds and kvmiso cannot tell which part an access touches (it then takes the
    region as mapped, and says so). ``level``: ``PGD`` where the series clones the kernel's PGD
    entry, else ``PTE`` (``asi_map``, page by page)."""

    layout: str
    scope: str
    patch: str
    marks: str
    port: str = ""
    assumed: str = ""
    level: str = "PTE"
    vendors: tuple[str, ...] = ()

    def cite(self) -> str:
        """The row's citation: patch, annotation, and the 6.x port."""
        port = f"; on 6.x: {self.port}" if self.port else ""
        return f"2022 ASI RFC patch {self.patch}: {self.marks} ({self.scope}ly non-sensitive){port}"


NONSENSITIVE_2022 = [
    Annotation("text", "global", "45", "asi_global_init: MAP_SECTION(_stext, _etext)"),
    Annotation("kernel_data", "global", "37, 41, 45", "__start_rodata.._end_rodata, .data.once, __ex_table and the "
               "static variables marked __asi_not_sensitive(_readmostly)",
               assumed="the series maps rodata and the annotated variables, not the image's whole data: kvmiso "
                       "(no data symbols in kallsyms, no .data..asi_non_sensitive on 6.x) takes an access to the "
                       "kernel's data as one to them"),
    Annotation("kvm_module", "global", "38", "asi_load_module: core_layout text, rodata and ro_after_init"),
    Annotation("kvm_intel_module", "global", "38", "asi_load_module: core_layout text, rodata and ro_after_init"),
    Annotation("kvm_amd_module", "global", "38", "asi_load_module (the series enables the KVM class on VMX only)"),
    Annotation("kvm_pvm_module", "global", "38", "asi_load_module (kvm_pvm is not in the series: by analogy)"),
    Annotation("cpu_entry_area", "global", "45", "CLONE_INIT_PGD(CPU_ENTRY_AREA_BASE), as KPTI", level="PGD"),
    Annotation("espfix", "global", "45", "CLONE_INIT_PGD(ESPFIX_BASE_ADDR), as KPTI", level="PGD"),
    Annotation("percpu_area", "global", "40, 42, 45", "DEFINE_PER_CPU_ASI_NOT_SENSITIVE variables (current_task, "
               "__preempt_count, cpu_tlbstate, irq_stat, kvm_running_vcpu ...), fixed_percpu_data",
               assumed="the series maps the per-CPU variables it annotates, not the unit: kvmiso reads the unit and "
                       "takes an access to it as one to an annotated variable"),
    Annotation("irq_stack", "global", "45", "MAP_SECTION_PERCPU(&irq_stack_backing_store)",
               port="the stack runs on the backing store's vmap'ed alias (VMAP_STACK, as on 5.16): mapped, as "
                    "interrupts run restricted (cover letter)"),
    Annotation("vm_struct", "global", "43", "kvm_arch_alloc_vm: __vmalloc(vm_size, ... | __GFP_GLOBAL_NONSENSITIVE)"),
    Annotation("mmu_page_hash", "global", "43", "embedded in struct kvm_arch on 5.16, so with struct kvm",
               port="a separate kvcalloc (kvm_mmu_alloc_page_hash), mapped by intent"),
    Annotation("memslots", "local", "43", "kvm_alloc_memslots / kvm_dup_memslots: kvzalloc(... | "
               "__GFP_LOCAL_NONSENSITIVE)", port="the set is embedded in struct kvm (__memslots)"),
    Annotation("memslot:*", "local", "43", "inline in 5.16's struct kvm_memslots (kvm_alloc_memslots, "
               "__GFP_LOCAL_NONSENSITIVE)", port="each struct kvm_memory_slot is its own kzalloc since 5.17: "
               "mapped by intent"),
    Annotation("lpage_info:*", "local", "43", "kvm_alloc_memslot_metadata: kvcalloc(lpages, ... | "
               "__GFP_LOCAL_NONSENSITIVE)"),
    Annotation("bus:*", "local", "43", "kvm_io_bus_register_dev: kmalloc(... | __GFP_LOCAL_NONSENSITIVE); the empty "
               "buses kvm_create_vm allocates carry no annotation and stay sensitive"),
    Annotation("vcpu_struct", "global", "44", "kvm_vcpu cache SLAB_GLOBAL_NONSENSITIVE; the register state moved "
               "to kvm_vcpu_arch_private, SLAB_LOCAL_NONSENSITIVE", port="one struct, both parts: mapped whole"),
    Annotation("kvm_run_page", "local", "43", "kvm_vm_ioctl_create_vcpu: alloc_page(... | __GFP_LOCAL_NONSENSITIVE)"),
    Annotation("pio_data", "local", "43", "kvm_arch_vcpu_create: alloc_page(... | __GFP_LOCAL_NONSENSITIVE)"),
    Annotation("emulate_ctxt", "local", "43", "x86_emulator cache SLAB_LOCAL_NONSENSITIVE"),
    Annotation("cpuid_entries", "local", "43", "kvmalloc_array / vmemdup_user with __GFP_LOCAL_NONSENSITIVE"),
    Annotation("lapic", "local", "43", "kvm_create_lapic: kzalloc(... | __GFP_LOCAL_NONSENSITIVE)"),
    Annotation("lapic_regs", "local", "43", "kvm_create_lapic: get_zeroed_page(... | __GFP_LOCAL_NONSENSITIVE)"),
    Annotation("apic_map", "local", "43", "kvm_recalculate_apic_map: kvzalloc(... | __GFP_LOCAL_NONSENSITIVE)"),
    Annotation("msr_bitmap", "local", "43", "alloc_loaded_vmcs: kzalloc(PAGE_SIZE, ... | __GFP_LOCAL_NONSENSITIVE)",
               vendors=("kvm_intel",)),
    Annotation("mmu_root", "local", "43", "mmu_shadow_page_cache.gfp_asi = __GFP_LOCAL_NONSENSITIVE"),
    Annotation("srcu_sda", "global", "43", "init_srcu_struct_fields: alloc_percpu_gfp(... | __GFP_GLOBAL_NONSENSITIVE)"),
    Annotation("irq_srcu_sda", "global", "43", "init_srcu_struct_fields: alloc_percpu_gfp(... | "
               "__GFP_GLOBAL_NONSENSITIVE)"),
    Annotation("vcpu_task", "global", "43, 32", "task_struct cache SLAB_GLOBAL_NONSENSITIVE (its FPU state moved out "
               "by patch 32)"),
    Annotation("active_mm", "global", "43", "mm_struct cache SLAB_GLOBAL_NONSENSITIVE"),
    Annotation("vcpu_stack", "local", "47", "vcpu_run: asi_map_task_stack(current, kvm->asi)"),
    Annotation("guest_memory*", "local", "33", "asi_map_user of each guest page KVM maps (direct_page_fault, "
               "FNAME(page_fault), prefetch)", port="the pages the VMM's table maps stand for the pages KVM mapped"),
]

# What kvmiso reads that no patch of the series marks: sensitive, each with why (for the model's notes).
SENSITIVE_2022 = {
    "pgd": "pgd_alloc carries no annotation (the series changes no arch/x86/mm/pgtable.c)",
    "files_struct": "files_cache keeps its flags (patch 43 marks the fd array, not the struct)",
    "vcpu_file": "the filp cache carries no annotation",
    "anon_inode": "the inode cache carries no annotation",
    "guest_fpstate": "fpu_alloc_guest_fpstate's allocation carries no annotation (patch 32 keeps FPU state out of "
                     "mapped memory)",
    "rmap:*": "the memslot rmap arrays carry no annotation (patch 43 marks lpage_info only)",
    "struct_page": "no patch maps vmemmap (patch 45 clones the PGDs of cpu_entry_area and ESPFIX only; the 2025 "
                   "series adds vmemmap's)",
    "vmcs": "alloc_vmcs_cpu carries no annotation (VMREAD/VMWRITE need no mapping)",
    "vmcb": "the series enables the KVM class on VMX only", "msrpm": "the series enables the KVM class on VMX only",
    "vpic": "kvm_pic_init's kzalloc carries no annotation", "vioapic": "kvm_ioapic_init's kzalloc carries no annotation",
    "msr_filter": "no annotation", "irq_routing": "no annotation", "pvclock_page": "a kernel mapping of a guest page",
}


def _registered(r: Region) -> bool:
    """Not a bus, or one kvm_io_bus_register_dev made (the annotated allocation): the evidence
    describes a bus as ``struct kvm_io_bus + N ranges``; kvm_create_vm's has none (and so does a
    modeled one, placed at that size)."""
    return not r.name.startswith("bus:") or (" ranges" in r.description and "+ 0 ranges" not in r.description)


class AnnotatedSpace(IsolatedSpace):
    """The 2022 RFC's restricted address space of one VM: the pages of what the series marks
    non-sensitive (see the module docstring). ``regions`` has one row per mapped layout region,
    ``assumed`` what kvmiso takes as mapped without reading it, ``notes`` why the rest is not."""

    def __init__(self, kernel: LiveKernelTable | ModeledKernelTable, policy: str = "asi-2022") -> None:
        super().__init__(kernel, policy)
        self.assumed: list[str] = []
        self.notes = [f"{name}: sensitive, {why}" for name, why in SENSITIVE_2022.items() if self.layout.matching(name)]
        if self.layout.vendor != "kvm_intel":
            self.notes.insert(0, f"the series registers the KVM class on VMX only (patch 15: flush_sensitive_cpu_state); "
                                 f"on {self.layout.vendor or 'this vendor'} kvmiso applies it by analogy")
        for a in NONSENSITIVE_2022:
            if a.vendors and self.layout.vendor not in a.vendors:
                continue
            regions = [r for r in self.layout.matching(a.layout) if _registered(r)]
            if not regions and known_object(a.layout) and not a.layout.endswith("*"):
                self.missing.append(a.layout)
            if a.assumed and regions:
                self.assumed.append(f"{a.layout}: {a.assumed}")
            for r in regions:
                self._add(a, r)
        self.notes += [f"{r.name}: sensitive, kvm_create_vm's empty bus (no device registered)"
                       for r in self.layout.matching("bus:*") if not _registered(r)]
        self._spans = merge_ranges([(s, e) for c in self.copies for s, e in c.mapped])
        self._starts = [s for s, _ in self._spans]

    def _add(self, a: Annotation, r: Region) -> None:
        """Map region ``r``'s pages (its whole span at PGD level for a cloned entry)."""
        spec = RegionSpec(r.name, a.scope, a.level, a.cite(), r.name, assumed=a.assumed)
        for s, e in r.ranges:
            lo, hi = s & ~(PAGE - 1), (e + PAGE - 1) & ~(PAGE - 1)
            self.copies.append(Copy(r.name, lo, hi, a.level, [(lo, hi)]))
        self.regions.append(spec)

    @classmethod
    def default(cls, layout: Layout, policy: str = "asi-2022", ram: int = 1 << 30) -> "AnnotatedSpace":
        """The 2022 series' restricted space over the layout's kernel table."""
        return cls(kernel_table(layout, ram), policy)

    def sensitive(self, addr: int) -> bool:
        """Is ``addr`` outside everything the series marks non-sensitive?"""
        i = bisect_right(self._starts, addr) - 1
        return not (i >= 0 and addr < self._spans[i][1])

    def mapped(self, addr: int) -> bool:
        """Does the restricted space map ``addr`` (non-sensitive, and the kernel maps it)?"""
        return canonical(addr) and not self.sensitive(addr) and self.kernel.translate(addr) is not None

    def exposed(self, name: str) -> tuple[int, int]:
        """(bytes of the pages mapped for region ``name``, bytes of the objects themselves)."""
        spans = merge_ranges([(s, e) for c in self.copies if c.region == name for s, e in c.mapped])
        return sum(e - s for s, e in spans), sum(r.size for r in self.layout.matching(name))

    def mapped_bytes(self) -> int:
        """Bytes of address space the restricted space maps (what the kernel maps of its pages)."""
        return sum(n for s, e in self._spans for _, _, n in leaf_extents(self.kernel, s, e))

    def physical_bytes(self) -> int:
        """Distinct physical bytes behind those pages; spans under table pages the evidence did
        not read are left out and listed in ``unread``."""
        self.unread: list[tuple[int, int]] = []
        return physical_bytes(self.kernel, self._spans, self.unread)


__all__ = ["AnnotatedSpace", "Annotation", "NONSENSITIVE_2022", "SENSITIVE_2022"]
