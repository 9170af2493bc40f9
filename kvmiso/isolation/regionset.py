"""The rows of a mapping set (what an isolated space maps, at which level, and why), the RFC's
default set in the names of the objects kvmiso reads, and the errors the model raises.

>>> from kvmiso.session import machine_evidence
>>> evidence = machine_evidence(m)    # needs root: m's VM, read from the kernel through BPF
>>> from kvmiso.isolation import build_layout
>>> layout = build_layout(evidence)
>>> [s.name for s in default_specs(layout)][:3]
['kernel_image', 'percpu_area', 'cpu_entry_area']
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .kerneltable import LiveKernelTable, ModeledKernelTable
from .layout import Layout
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
    assumed: str = ""  # what kvmiso takes as mapped without reading it (printed as modeled)


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


class IsolatedSpace:
    """What every policy's isolated space has: the kernel table it is made from (``kernel``, a
    live or modeled one), its ``layout`` and ``policy``, its mapping-set rows (``regions``), the
    copies made for them, and the rows this layout lacks (``missing``)."""

    def __init__(self, kernel: LiveKernelTable | ModeledKernelTable, policy: str) -> None:
        if policy not in POLICIES:
            raise MapSetError(f"unknown policy {policy!r}; kvmiso knows {', '.join(POLICIES)}")
        self.kernel = kernel
        self.layout: Layout = kernel.layout
        self.policy: Policy = POLICIES[policy]
        self.regions: list[RegionSpec] = []
        self.copies: list[Copy] = []
        self.missing: list[str] = []


def level_of(level: str) -> int:
    """The table level (4 = PGD ... 1 = PTE) of a level name as the RFC's functions take it."""
    try:
        return LEVELS[level.upper()]
    except (KeyError, AttributeError):
        raise MapSetError(f"unknown level {level!r}; one of {', '.join(LEVELS)}") from None


def merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``ranges`` sorted, with overlapping and touching ones joined."""
    out: list[tuple[int, int]] = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


__all__ = ["Copy", "DEFAULT_SET", "IsolatedSpace", "LEVELS", "MapSetError", "RegionSpec", "SharedTableError", "default_specs", "level_of",
           "merge_ranges"]
