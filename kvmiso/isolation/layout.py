"""The host kernel address space of the running machine, as kvm_mm sees it.

Three kinds of regions, each saying where its address comes from (``source``):

* the x86-64 memory map of Documentation/arch/x86/x86_64/mm.rst (4- or 5-level, chosen by the
  CPU's la57 flag: a 4-level kernel never enables it on a CPU without it);
* kernel image sections from /proc/kallsyms (``_stext``..``_etext``, entry text, rodata, data,
  init), where the running kernel exports the symbols, derived from neighbours where it
  does not (a kernel without CONFIG_KALLSYMS_ALL exports few data symbols);
* the objects userspace cannot see (struct kvm, the vCPU structs, VMCS/VMCB/PVM state, memslots,
  buses, the vCPU task and its stack, per-CPU areas), placed at modeled addresses inside the
  area their allocator uses and marked ``modeled``; and the userspace side (kvm_run pages, guest
  memory) at the real addresses of a VM kvmiso created.

Without readable kallsyms (addresses all zero: not root, or kptr_restrict) the image sections
fall back to the documented defaults (``_stext`` at 0xffffffff81000000, no KASLR) and
``Layout.source`` says so.

>>> lay = host_layout()
>>> lay.region("text").source
'kallsyms: _stext.._etext'
>>> lay.describe(lay.symbols.address("kvm_fast_pio"))
'kvm_fast_pio+0x0 (text)'
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..observe.kallsyms import KALLSYMS, Symbols, parse_kallsyms

PAGE = 4096
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map
DEFAULT_STEXT = 0xFFFF_FFFF_8100_0000  # __START_KERNEL with CONFIG_PHYSICAL_START=0x1000000


@dataclass(frozen=True)
class Region:
    """A named part of the kernel (or vCPU task's) address space: one or more [start, end)
    ranges (several for per-CPU or per-vCPU objects)."""

    name: str
    ranges: tuple[tuple[int, int], ...]
    kind: str  # "map" (mm.rst area), "section" (kernel image), "object" (a kernel allocation), "user"
    source: str  # where the address comes from
    description: str = ""
    modeled: bool = False  # True: the address is kvmiso's placement, not read from the machine
    per: str = ""  # "cpu" or "vcpu": one range each, in index order

    @property
    def start(self) -> int:
        return self.ranges[0][0]

    @property
    def size(self) -> int:
        return sum(e - s for s, e in self.ranges)

    def contains(self, addr: int) -> bool:
        return any(s <= addr < e for s, e in self.ranges)


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

# The kernel objects KVM uses whose addresses userspace cannot see: (name, allocator area,
# pages each, one per "vm" | "vcpu" | "cpu", vendors (empty: all), what it is).
# Sizes are the allocations' page footprints on a 6.x x86-64 build.
OBJECTS: list[tuple[str, str, int, str, tuple[str, ...], str]] = [
    ("percpu_areas", "direct_map", 64, "cpu", (), "the per-CPU area of each CPU (pcpu embedded first chunk)"),
    ("irq_stacks", "vmalloc", 4, "cpu", (), "per-CPU IRQ stack (IRQ_STACK_SIZE, vmap'ed with guard pages)"),
    ("l1d_flush_pages", "direct_map", 16, "vm", ("kvm_intel",), "vmx_l1d_flush_pages (order-4 allocation)"),
    ("vm_struct", "vmalloc", 10, "vm", (), "struct kvm inside struct kvm_vmx / kvm_svm / kvm_pvm (kvm_arch_alloc_vm: __vmalloc)"),
    ("srcu_sda", "direct_map", 1, "cpu", (), "kvm->srcu.sda, the per-CPU srcu_data of the VM (alloc_percpu)"),
    ("vcpu_struct", "direct_map", 4, "vcpu", (), "struct vcpu_vmx / vcpu_svm / vcpu_pvm (kmem_cache kvm_vcpu)"),
    ("pml_page", "direct_map", 1, "vcpu", ("kvm_intel",), "vmx->pml_pg, the page-modification log"),
    ("guest_msrs", "direct_map", 1, "vcpu", ("kvm_intel",), "vmx->guest_uret_msrs (guest_msrs in 2019)"),
    ("vmcs", "direct_map", 1, "vcpu", ("kvm_intel",), "vmx->vmcs01.vmcs"),
    ("msr_bitmap", "direct_map", 1, "vcpu", ("kvm_intel",), "vmx->vmcs01.msr_bitmap"),
    ("vmcb", "direct_map", 1, "vcpu", ("kvm_amd",), "svm->vmcb01.ptr"),
    ("msrpm", "direct_map", 2, "vcpu", ("kvm_amd",), "svm->msrpm, the MSR permission map"),
    ("iopm", "direct_map", 3, "vm", ("kvm_amd",), "iopm_base, the I/O permission map (global)"),
    ("pvm_switch_state", "direct_map", 1, "cpu", ("kvm_pvm",), "PVM's per-CPU host switcher state (tss_extra, host CR3/RSP)"),
    ("pvcs", "direct_map", 1, "vcpu", ("kvm_pvm",), "the PVM vCPU shared page (struct pvm_vcpu_struct)"),
    ("pio_data", "direct_map", 1, "vcpu", (), "vcpu->arch.pio_data"),
    ("lapic", "direct_map", 2, "vcpu", (), "struct kvm_lapic and its regs page"),
    ("vcpu_task", "direct_map", 3, "vcpu", (), "the vCPU thread's task_struct"),
    ("vcpu_stack", "vmalloc", 4, "vcpu", (), "the vCPU thread's kernel stack (THREAD_SIZE, vmap'ed)"),
    ("active_mm", "direct_map", 1, "vm", (), "the vCPU task's active_mm (struct mm_struct)"),
    ("active_mm_pgd", "direct_map", 2, "vm", (), "active_mm->pgd (two pages with PTI)"),
    ("memslots", "direct_map", 2, "vm", (), "kvm->memslots[] (struct kvm_memslots, kvzalloc)"),
    ("buses", "direct_map", 1, "vm", (), "kvm->buses[]: each struct kvm_io_bus with its ranges (MMIO, PIO, FAST_MMIO)"),
    # Not in the RFC's set: allocations that were embedded in the 2019 structs, or that the
    # RFC left to host_mm. Handlers that touch them fault under the default set.
    ("kvm_run_page", "direct_map", 1, "vcpu", (), "vcpu->run: the kernel page behind the kvm_run mapping"),
    ("cpuid_entries", "direct_map", 1, "vcpu", (), "vcpu->arch.cpuid_entries (kvmalloc'ed since 5.11; embedded in 2019)"),
    ("emulate_ctxt", "direct_map", 2, "vcpu", (), "vcpu->arch.emulate_ctxt (kmem_cache x86_emulator since 5.8; embedded in 2019)"),
    ("irqchip", "direct_map", 2, "vm", (), "kvm->arch.vpic and vioapic, the in-kernel PIC and IOAPIC"),
    ("mmu_pages", "direct_map", 8, "vm", (), "shadow/TDP page tables and their struct kvm_mmu_page (hold host PFNs)"),
]
_GUARD = PAGE  # one unmapped page between modeled objects, as vmalloc leaves between areas


@dataclass
class Layout:
    """The regions of the host address space plus the symbols they were read from."""

    levels: int  # 4 or 5
    regions: dict[str, Region]
    symbols: Symbols | None
    source: str  # "/proc/kallsyms" or why the documented default layout was used
    vendor: str
    cpus: int
    vcpus: int
    ram: int  # bytes of RAM the direct map covers (MemTotal)
    notes: list[str] = field(default_factory=list)

    def region(self, name: str) -> Region:
        try:
            return self.regions[name]
        except KeyError:
            raise KeyError(f"no region {name!r} in the layout; it has: {', '.join(self.regions)}") from None

    def find(self, addr: int) -> Region | None:
        """The most specific region holding ``addr`` (an object or section before its area)."""
        order = {"object": 0, "user": 0, "section": 1, "map": 2}
        hits = [r for r in self.regions.values() if r.contains(addr)]
        return min(hits, key=lambda r: (order[r.kind], r.size)) if hits else None

    def describe(self, addr: int) -> str:
        """``function+0xoff (region)`` for code, ``region+0xoff`` otherwise."""
        r = self.find(addr)
        where = r.name if r else "unmapped hole"
        if self.symbols and r and r.name in ("text", "entry_text"):
            fn = self.symbols.resolve(addr)
            if fn:
                return f"{fn[0]}+{fn[1]:#x} ({where})"
        return f"{where}+{addr - r.start:#x}" if r else where

    @property
    def kernel_span(self) -> int:
        """Bytes of kernel-half virtual address space (what "share mapped" is a share of)."""
        return 1 << (56 if self.levels == 5 else 47)


def _la57(cpuinfo: str) -> bool:
    for line in cpuinfo.splitlines():
        if line.startswith("flags"):
            return "la57" in line.split()
    return False


def _possible_cpus(text: str) -> int:
    n = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


def build_layout(kallsyms: str | None, cpuinfo: str = "", cpus: int = 1, vendor: str = "kvm_pvm",
                 vcpus: int = 1, vm=None, ram: int = 1 << 30) -> Layout:
    """The layout from the text of /proc/kallsyms and /proc/cpuinfo (pure: tests feed fixtures).

    ``vm`` (a :class:`kvmiso.kvm.Vm`) supplies the real userspace addresses; ``ram`` bounds
    where modeled direct-map objects may go.
    """
    syms = parse_kallsyms(kallsyms) if kallsyms else None
    levels = 5 if _la57(cpuinfo) else 4
    notes: list[str] = []
    regions: dict[str, Region] = {}

    def add(name: str, ranges, kind: str, source: str, desc: str = "", modeled: bool = False, per: str = "") -> None:
        regions[name] = Region(name, tuple(ranges), kind, source, desc, modeled, per)

    doc = f"mm.rst ({levels}-level)"
    for name, s, e, desc in (_MAP_5LEVEL if levels == 5 else _MAP_4LEVEL):
        add(name, [(s, e)], "map", doc, desc)
    if levels == 5:
        notes.append("5-level paging: the regions are described, but kvmiso's page-table model is 4-level")

    # KERNEL_IMAGE_SIZE is 1 GiB with KASLR configured, 512 MiB without; modules start right
    # after it, so a module symbol below 0xffffffffc0000000 means 512 MiB.
    image_size = 1 << 30
    if syms and syms.module_low is not None and syms.module_low < START_KERNEL_MAP + (1 << 30):
        image_size = 512 << 20
    add("kernel_image", [(START_KERNEL_MAP, START_KERNEL_MAP + image_size)], "map", doc,
        f"kernel text mapping (__START_KERNEL_map, KERNEL_IMAGE_SIZE {image_size >> 20} MiB)")
    add("modules", [(START_KERNEL_MAP + image_size, MODULES_END)], "map", doc, "module mapping space")
    add("fixmap", [FIXMAP], "map", doc + "; FIXADDR_START modeled", "kernel-internal fixmap range", modeled=True)
    add("vsyscall", [VSYSCALL], "map", doc, "legacy vsyscall ABI")

    if syms:
        _image_sections(syms, add, notes)
        for mod in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm"):
            span = syms.module_span(mod)
            if span:
                add(f"{mod}_module", [span], "section", f"kallsyms: [{mod}] symbols", f"the {mod} module's core layout")
        if "kvm_module" not in regions and "kvm_vcpu_ioctl" in syms:
            notes.append("KVM is built into the kernel: its functions are in kernel text (the kernel_image region)")
        source = KALLSYMS
    else:
        add("text", [(DEFAULT_STEXT, DEFAULT_STEXT + (32 << 20))], "section", "documented default",
            "kernel text (_stext at __START_KERNEL, 32 MiB assumed)", modeled=True)
        source = "documented default layout: /proc/kallsyms shows no addresses"
        notes.append("/proc/kallsyms shows no addresses (not root, or kptr_restrict): the image sections are "
                     "the documented defaults and handler function names cannot be checked")
    _objects(regions, add, vendor, cpus, vcpus, ram)
    _userspace(add, vm, vcpus)
    return Layout(levels, regions, syms, source, vendor, cpus, vcpus, ram, notes)


def _page_up(a: int) -> int:
    return (a + PAGE - 1) & ~(PAGE - 1)


def _image_sections(syms: Symbols, add, notes: list[str]) -> None:
    """Sections from the symbols the kernel exports; an end it does not export is taken from
    the section that follows it in arch/x86/kernel/vmlinux.lds.S (and the source says so)."""

    def span(name: str, start: list[str], end: list[str], desc: str) -> None:
        s = next(((n, syms.get(n)) for n in start if syms.get(n) is not None), None)
        e = next(((n, syms.get(n)) for n in end if syms.get(n) is not None), None)
        if s and e and s[1] < e[1]:
            exact = s[0] == start[0] and e[0] == end[0]
            add(name, [(s[1], e[1])], "section", f"kallsyms: {s[0]}..{e[0]}" + ("" if exact else " (derived)"), desc)

    span("text", ["_stext"], ["_etext"], "kernel text")
    span("entry_text", ["__entry_text_start"], ["__entry_text_end"], "entry text (syscall/interrupt entry, PVM switcher)")
    # INIT_TASK_DATA opens .data, so __start_init_stack is _sdata when _sdata is not exported
    span("rodata", ["__start_rodata"], ["__end_rodata", "_sdata", "__start_init_stack"], "read-only data")
    span("data", ["_sdata", "__start_init_stack"], ["_edata", "__init_begin"], "data (.data and what follows up to init)")
    # the per-CPU template: only kernels with CONFIG_KALLSYMS_ALL export it. On x86-64 SMP it
    # is linked at 0 (its symbols are offsets), and the per-CPU offsets (__per_cpu_offset[])
    # are data, never visible here: the areas stay modeled, sized from the template if known
    pcpu = syms.get("__per_cpu_start"), syms.get("__per_cpu_end")
    if None not in pcpu and pcpu[0] < pcpu[1]:
        if pcpu[0] >= START_KERNEL_MAP:
            add("percpu_section", [pcpu], "section", "kallsyms: __per_cpu_start..__per_cpu_end",
                "the per-CPU section (.data..percpu template)")
        else:
            notes.append(f"the per-CPU section is zero-based ({pcpu[1] - pcpu[0]:#x} bytes of offsets): per-CPU "
                         f"data lives at __per_cpu_offset[cpu] + offset, which kallsyms does not show")
    top = syms.image_high or DEFAULT_STEXT
    init = syms.get("__init_begin")
    if init:
        end = syms.get("__init_end") or _page_up(top + 1)
        add("init", [(init, end)], "section",
            "kallsyms: __init_begin..__init_end" if syms.get("__init_end") else "kallsyms: __init_begin..last image symbol (derived)",
            "init text and data, the per-CPU template (.data..percpu)")
    bss = syms.get("__bss_start")
    if bss and syms.get("__bss_stop"):
        add("bss", [(bss, syms.address("__bss_stop"))], "section", "kallsyms: __bss_start..__bss_stop", "bss")
    else:
        start = (_page_up(top + 1) + (2 << 20) - 1) & ~((2 << 20) - 1)
        add("bss", [(start, start + (4 << 20))], "section", "modeled: after init, 4 MiB",
            "bss (__bss_start not exported)", modeled=True)


def _objects(regions: dict[str, Region], add, vendor: str, cpus: int, vcpus: int, ram: int) -> None:
    """Place each object of OBJECTS for this vendor: direct-map objects from the middle of
    RAM's direct map upwards, vmalloc objects from 1 GiB into vmalloc space; a guard page
    between neighbours so that copying one never maps another."""
    cursor = {"direct_map": regions["direct_map"].start + min(ram // 2, 1 << 30),
              "vmalloc": regions["vmalloc"].start + (1 << 30)}
    for name, area, pages, per, vendors, desc in OBJECTS:
        if vendors and vendor not in vendors:
            continue
        count = {"vm": 1, "vcpu": vcpus, "cpu": cpus}[per]
        ranges = []
        for _ in range(count):
            start = cursor[area]
            ranges.append((start, start + pages * PAGE))
            cursor[area] = start + pages * PAGE + _GUARD
        add(name, ranges, "object", f"modeled: {area}, {pages} page(s) per {per}", desc, modeled=True,
            per=per if per != "vm" else "")


def _userspace(add, vm, vcpus: int) -> None:
    if vm is not None:
        runs = [(v._run_addr, v._run_addr + v._run_size) for v in vm.vcpus]
        mem = sorted((s.host_addr, s.host_addr + s.size) for s in vm.slots.values())
        add("kvm_run", runs, "user", "the kvmiso VM: Vcpu mmap of the vCPU fd", "the kvm_run page(s) of each vCPU",
            per="vcpu")
        add("guest_memory", mem, "user", "the kvmiso VM: MemorySlot.host_addr", "guest memory, as the VMM mapped it")
        return
    base = 0x7F00_0000_0000
    add("kvm_run", [(base + i * 0x10000, base + i * 0x10000 + 3 * PAGE) for i in range(vcpus)], "user",
        "modeled: no VM given", "the kvm_run page(s) of each vCPU", modeled=True, per="vcpu")
    add("guest_memory", [(0x7E00_0000_0000, 0x7E00_0000_0000 + (2 << 20))], "user", "modeled: no VM given",
        "guest memory, as the VMM mapped it", modeled=True)


def host_layout(vm=None, vendor: str | None = None, vcpus: int | None = None,
                kallsyms: str | os.PathLike = KALLSYMS) -> Layout:
    """The layout of the running machine (and of ``vm``'s userspace side, when given)."""
    from ..kvm import vendor_module

    try:
        text = Path(kallsyms).read_text()
    except OSError:
        text = None
    cpuinfo = _read("/proc/cpuinfo")
    cpus = _possible_cpus(_read("/sys/devices/system/cpu/possible") or "0")
    ram = 1 << 30
    for line in _read("/proc/meminfo").splitlines():
        if line.startswith("MemTotal:"):
            ram = int(line.split()[1]) * 1024
    vendor = vendor or vendor_module() or "kvm_pvm"
    if vcpus is None:
        vcpus = len(vm.vcpus) if vm is not None and vm.vcpus else 1
    return build_layout(text, cpuinfo, cpus, vendor, vcpus, vm, ram)


def _read(path: str) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""


def known_region_names() -> set[str]:
    """Every region name a layout can have, on any vendor (what handlers.toml may name)."""
    names = {n for n, *_ in _MAP_4LEVEL} | {o[0] for o in OBJECTS}
    names |= {"kernel_image", "modules", "fixmap", "vsyscall", "text", "entry_text", "rodata", "data", "init", "bss",
              "percpu_section",
              "kvm_run", "guest_memory"}
    return names | {f"{m}_module" for m in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm")}
