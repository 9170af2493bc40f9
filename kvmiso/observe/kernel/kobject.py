"""The kernel objects kvmiso reads (address, size, source, allocator), the names they go by, and
typed pointer walks over kernel memory with the running kernel's BTF."""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from .bpf import KernelMemory
from .btf import Btf

PAGE = 4096

# Every object name read_vm_objects can produce (``bus:PIO``, ``memslot:0`` ... are families):
# what the access model and region files may name.
OBJECT_NAMES = frozenset({
    "vcpu_struct", "vm_struct", "kvm_run_page", "pio_data", "emulate_ctxt", "cpuid_entries", "lapic", "mmu_root",
    "memslots", "memslot:*", "rmap:*", "lpage_info:*", "guest_memory:*", "bus:*", "vcpu_task", "vcpu_stack",
    "active_mm", "pgd", "percpu_area", "irq_stack", "srcu_sda", "vmcs", "msr_bitmap", "vmcb", "msrpm",
    "vcpu_file", "anon_inode", "files_struct", "guest_fpstate", "msr_filter", "mmu_page_hash", "apic_map",
    "struct_page", "lapic_regs", "vpic", "vioapic", "irq_routing", "irq_srcu_sda", "pvclock_page",
})


def known_object(name: str) -> bool:
    """Is ``name`` an object (or family, ``bus:*``) kvmiso can read from the kernel?"""
    family = name.split(":", 1)[0] + ":*" if ":" in name else name
    return name in OBJECT_NAMES or family in OBJECT_NAMES


@dataclass(frozen=True)
class KernelObject:
    """One object a VM exit may touch, at its real address.

    ``source`` says how the address was read (``bpf: vcpu->arch.pio_data``), ``size_source``
    where its size comes from (``btf``, ``page``, ...), ``allocator`` how it was allocated
    (``slab x86_emulator``, ``page allocator``, ``vmalloc``, ``inside vm_struct``, ``user``).
    ``per`` is ``vcpu`` or ``cpu`` for one-per objects (``index`` says which), else ``""``.
    """

    name: str
    address: int
    size: int
    ctype: str
    source: str
    size_source: str = "btf"
    allocator: str = ""
    per: str = ""
    index: int = 0
    modeled: bool = False

    @property
    def end(self) -> int:
        """The first byte after the object."""
        return self.address + self.size


@dataclass
class VmObjects:
    """What was found, what could not be, and the derived facts (each with its source)."""

    objects: list[KernelObject] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)  # name -> why
    facts: dict[str, tuple[int, str]] = field(default_factory=dict)  # name -> (value, source)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (what, agreed, detail)
    per_cpu_offsets: list[int] = field(default_factory=list)
    threads: dict[int, int] = field(default_factory=dict)  # vcpu id -> thread id

    def object_named(self, name: str) -> KernelObject | None:
        """The first object named ``name``, or None."""
        return next((o for o in self.objects if o.name == name), None)


class KernelView:
    """Typed pointer walks: ``k.ptr(addr, "kvm_vcpu", "arch.pio_data")``."""

    def __init__(self, mem: KernelMemory, btf: Btf) -> None:
        self.mem, self.btf = mem, btf

    def off(self, struct_name: str, path: str) -> int:
        """The offset of ``path`` in ``struct struct_name``."""
        return self.btf.struct(struct_name).offset(path)

    def ptr(self, addr: int, struct_name: str, path: str) -> int:
        """The pointer (u64) at ``addr`` + the offset of ``path`` in ``struct struct_name``."""
        return self.mem.u64(addr + self.off(struct_name, path))

    def u32(self, addr: int, struct_name: str, path: str) -> int:
        """The u32 at ``addr`` + the offset of ``path`` in ``struct struct_name``."""
        return struct.unpack("<I", self.mem.read(addr + self.off(struct_name, path), 4))[0]

    def sizeof(self, name: str) -> int:
        """sizeof(struct ``name``)."""
        return self.btf.sizeof(name)


def possible_cpus(text: str) -> int:
    """The number of CPUs in a ``/sys/devices/system/cpu/possible`` list (``0-1``)."""
    n = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


__all__ = ["KernelObject", "KernelView", "OBJECT_NAMES", "PAGE", "VmObjects", "known_object", "possible_cpus"]
