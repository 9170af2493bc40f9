"""Facts the kernel keeps but does not export, derived and cross-checked: each CPU's per-CPU
offset (``__per_cpu_offset[]`` is data, absent from kallsyms), how an object was allocated (slab
cache, page allocator, vmalloc, read from ``struct page``/``struct slab``), and the struct page of
a page."""

from __future__ import annotations

import struct
from dataclasses import replace

from .bpf import KernelReadError
from .btf import BtfError
from .kallsyms import Symbols
from .kobject import PAGE, KernelObject, KernelView, VmObjects
from .livemm import LiveTables

_U64 = (1 << 64) - 1


def per_cpu_offsets(k: KernelView, task: int, cpus: int, symbols: Symbols | None,
                    out: VmObjects) -> tuple[list[int], int, str] | None:
    """(``__per_cpu_offset[cpu]`` for each CPU, ``__per_cpu_start``, how they were found).

    A kernel with CONFIG_KALLSYMS_ALL lists ``__per_cpu_offset``: it is read through BPF. Without
    it (this project's 6.18 host) each CPU's runqueue is found through the task group
    (task->sched_task_group->cfs_rq[cpu]->rq), less the runqueue's offset in .data..percpu (BTF),
    and per_cpu(this_cpu_off, cpu), read beside it, is the offset. Either way ``__per_cpu_start``
    (0 where per-CPU data is zero-based, before 6.15) must come out the same for every CPU."""
    if symbols is not None and symbols.get("__per_cpu_offset"):
        table = symbols.address("__per_cpu_offset")
        start = symbols.get("__per_cpu_start") or 0
        offsets = [k.mem.u64(table + 8 * cpu) for cpu in range(cpus)]
        try:
            this_off = k.btf.per_cpu_var("this_cpu_off")[1] + start
        except BtfError:
            this_off = symbols.get("this_cpu_off")
        if this_off is not None:
            got = [k.mem.u64((off + this_off) & _U64) for off in offsets]
            out.checks.append(("per_cpu(this_cpu_off, cpu) == __per_cpu_offset[cpu] for every CPU", got == offsets,
                               ", ".join(f"{g:#x}" for g in got)))
        return offsets, start, "kallsyms: __per_cpu_offset[], read through bpf"
    try:
        rq_off = k.btf.per_cpu_var("runqueues")[1]
        this_off = k.btf.per_cpu_var("this_cpu_off")[1]
        cfs = k.ptr(k.ptr(task, "task_struct", "sched_task_group"), "task_group", "cfs_rq")
    except (BtfError, KernelReadError) as e:
        out.absent["percpu_area"] = f"per-CPU offsets not derivable (no __per_cpu_offset in kallsyms): {e}"
        return None
    offsets, units = [], []
    for cpu in range(cpus):
        unit = k.ptr(k.mem.u64(cfs + 8 * cpu), "cfs_rq", "rq") - rq_off  # the CPU's copy of .data..percpu
        offsets.append(k.mem.u64(unit + this_off))
        units.append(unit)
    starts = {(u - o) % (1 << 64) for u, o in zip(units, offsets)}
    out.checks.append(("__per_cpu_start is the same for every CPU (unit - per_cpu(this_cpu_off, cpu))",
                       len(starts) == 1, ", ".join(f"{s:#x}" for s in sorted(starts))))
    return offsets, min(starts), "bpf: task_group->cfs_rq[cpu]->rq - runqueues' offset in .data..percpu (BTF)"


def per_cpu_objects(k: KernelView, out: VmObjects, task: int, kvm: int, cpus: int, symbols: Symbols | None) -> None:
    """Each CPU's per-CPU unit, IRQ stack and the VM's per-CPU SRCU data (see :func:`per_cpu_offsets`)."""
    found = per_cpu_offsets(k, task, cpus, symbols, out)
    if found is None:
        return
    offsets, start, how = found
    out.per_cpu_offsets = offsets
    out.facts["__per_cpu_start"] = (start, how)
    units = [(off + start) & _U64 for off in offsets]  # offsets wrap: unit = template + offset
    size = min((b - a for a, b in zip(sorted(units), sorted(units)[1:])), default=0)
    size_source = "distance between consecutive CPUs' units"
    if not size and symbols is not None and symbols.get("pcpu_unit_size"):
        size = int.from_bytes(k.mem.read(symbols.address("pcpu_unit_size"), 4), "little")
        size_source = "kallsyms: pcpu_unit_size, read through bpf"
    for cpu, unit in enumerate(units):
        out.objects.append(KernelObject("percpu_area", unit, size or PAGE, "the per-CPU unit", how,
                                        size_source if size else "modeled: one page",
                                        "per-CPU first chunk", "cpu", cpu))
    hard = _per_cpu_var(k, symbols, "hardirq_stack_ptr", start)
    for cpu, off in enumerate(offsets if hard is not None else []):
        top = k.mem.u64((off + hard) & _U64)
        if top:  # the pointer is to the stack's top word: IRQ_STACK_SIZE (16 KiB) below it, + 8
            out.objects.append(KernelObject("irq_stack", (top + 8) - 4 * PAGE, 4 * PAGE, "char[IRQ_STACK_SIZE]",
                                            "bpf: per_cpu(hardirq_stack_ptr, cpu) + 8 - IRQ_STACK_SIZE",
                                            "modeled: IRQ_STACK_SIZE 16 KiB", "", "cpu", cpu))
    if hard is None:
        out.absent["irq_stack"] = "hardirq_stack_ptr is neither in BTF's .data..percpu nor in kallsyms"
    size = k.sizeof("srcu_data")
    for name, path in (("srcu_sda", "srcu.sda"), ("irq_srcu_sda", "irq_srcu.sda")):
        sda = k.ptr(kvm, "kvm", path)
        for cpu, off in enumerate(offsets):
            out.objects.append(KernelObject(name, (sda + off) & _U64, size, "struct srcu_data",
                                            f"bpf: kvm->{path} + __per_cpu_offset[cpu]", "btf", "per-CPU allocation",
                                            "cpu", cpu))


def _per_cpu_var(k: KernelView, symbols: Symbols | None, name: str, start: int) -> int | None:
    """The address of per-CPU variable ``name`` in the template (add __per_cpu_offset[cpu])."""
    try:
        return start + k.btf.per_cpu_var(name)[1]
    except BtfError:
        return symbols.get(name) if symbols is not None else None


def with_allocator(k: KernelView, tables: LiveTables, out: VmObjects, o: KernelObject) -> KernelObject:
    """The object with its allocator read from the kernel: user half, direct map (slab cache
    name from struct slab, else the page allocator), or vmalloc."""
    if o.address < 1 << 47:
        return replace(o, allocator="user")
    phys = tables.translate(o.address)
    if phys is None:
        return replace(o, allocator="not mapped in the live table")
    if o.address - tables.page_offset_base != phys:
        return replace(o, allocator="vmalloc (not a direct-map address)")
    vmemmap = out.facts.get("vmemmap_base")
    if vmemmap is None:
        return replace(o, allocator="direct map (struct page not readable)")
    page = vmemmap[0] + (phys >> 12) * k.sizeof("page")
    try:
        head = k.mem.u64(page + k.off("page", "compound_head"))
        if head & 1:
            page = head - 1
        if _is_slab(k, page):
            cache = k.mem.u64(page + k.off("slab", "slab_cache"))
            name = k.mem.string(k.mem.u64(cache + k.off("kmem_cache", "name")))
            return replace(o, allocator=f"slab {name}")
    except (KernelReadError, BtfError):
        return replace(o, allocator="direct map (struct page not readable)")
    return replace(o, allocator="page allocator")


def _is_slab(k: KernelView, page: int) -> bool:
    """PageSlab(): the page type PGTY_slab in its top byte (6.12+), else the PG_slab flag."""
    pgty = k.btf.enum_value("PGTY_slab")
    if pgty is not None:
        return struct.unpack("<I", k.mem.read(page + k.off("page", "page_type"), 4))[0] >> 24 == pgty
    bit = k.btf.enum_value("PG_slab")
    return bit is not None and bool(k.mem.u64(page + k.off("page", "flags")) >> bit & 1)


def struct_pages(k: KernelView, out: VmObjects, tables: LiveTables) -> None:
    """The struct page of each shadow root (the MMU reads it for every shadow page lookup)."""
    vmemmap = out.facts.get("vmemmap_base")
    for root in [o for o in out.objects if o.name == "mmu_root"]:
        phys = tables.translate(root.address)
        if vmemmap is not None and phys is not None:
            size = k.sizeof("page")
            out.objects.append(KernelObject("struct_page", vmemmap[0] + (phys >> 12) * size, size, "struct page",
                                            "bpf: vmemmap_base + PFN(mmu_root) * sizeof(struct page)", "btf",
                                            "vmemmap", "vcpu", root.index))


__all__ = ["per_cpu_objects", "per_cpu_offsets", "struct_pages", "with_allocator"]
