"""Facts the kernel keeps but does not export, derived and cross-checked: each CPU's per-CPU
offset (``__per_cpu_offset[]`` is data, absent from kallsyms), how an object was allocated (slab
cache, page allocator, vmalloc, read from ``struct page``/``struct slab``), and the struct page of
a page."""

from __future__ import annotations

import struct
from dataclasses import replace

from .bpf import KernelReadError
from .btf import BtfError
from .kobject import PAGE, KernelObject, KernelView, VmObjects
from .livemm import LiveTables


def per_cpu_objects(k: KernelView, out: VmObjects, task: int, kvm: int, cpus: int) -> None:
    """__per_cpu_offset[] is data kallsyms does not show. Each CPU's runqueue is found through the
    task group (task->sched_task_group->cfs_rq[cpu]->rq); per_cpu(this_cpu_off, cpu), read next
    to it, is __per_cpu_offset[cpu]. Their difference less the runqueue's offset in
    .data..percpu (BTF) is __per_cpu_start: 0 where per-CPU data is zero-based (before 6.15),
    a kernel image address after; it must be the same for every CPU."""
    try:
        _rq_id, rq_off = k.btf.per_cpu_var("runqueues")
        _t_id, this_off = k.btf.per_cpu_var("this_cpu_off")
        tg = k.ptr(task, "task_struct", "sched_task_group")
        cfs = k.ptr(tg, "task_group", "cfs_rq")
    except (BtfError, KernelReadError) as e:
        out.absent["percpu_area"] = f"per-CPU offsets not derivable: {e}"
        return
    offsets, units = [], []
    for cpu in range(cpus):
        unit = k.ptr(k.mem.u64(cfs + 8 * cpu), "cfs_rq", "rq") - rq_off  # the CPU's copy of .data..percpu
        offsets.append(k.mem.u64(unit + this_off))
        units.append(unit)
    starts = {(u - o) % (1 << 64) for u, o in zip(units, offsets)}
    out.checks.append(("__per_cpu_start is the same for every CPU (unit - per_cpu(this_cpu_off, cpu))",
                       len(starts) == 1, ", ".join(f"{s:#x}" for s in sorted(starts))))
    out.per_cpu_offsets = offsets
    out.facts["__per_cpu_start"] = (min(starts), "bpf: runqueue unit - per_cpu(this_cpu_off, cpu)")
    size = min((b - a for a, b in zip(sorted(units), sorted(units)[1:])), default=0)
    for cpu, unit in enumerate(units):
        out.objects.append(KernelObject("percpu_area", unit, size or PAGE, "the per-CPU unit",
                                        "bpf: task_group->cfs_rq[cpu]->rq - runqueues' offset in .data..percpu (BTF)",
                                        "distance between consecutive CPUs' units" if size else "modeled: one page",
                                        "per-CPU first chunk", "cpu", cpu))
    try:
        _h, hard_off = k.btf.per_cpu_var("hardirq_stack_ptr")
        for cpu, unit in enumerate(units):
            top = k.mem.u64(unit + hard_off)
            if top:  # the pointer is to the stack's top word: IRQ_STACK_SIZE (16 KiB) below it, + 8
                base = (top + 8) - 4 * PAGE
                out.objects.append(KernelObject("irq_stack", base, 4 * PAGE, "char[IRQ_STACK_SIZE]",
                                                "bpf: per_cpu(hardirq_stack_ptr, cpu) + 8 - IRQ_STACK_SIZE",
                                                "modeled: IRQ_STACK_SIZE 16 KiB", "", "cpu", cpu))
    except BtfError as e:
        out.absent["irq_stack"] = str(e)
    size = k.sizeof("srcu_data")
    for name, path in (("srcu_sda", "srcu.sda"), ("irq_srcu_sda", "irq_srcu.sda")):
        sda = k.ptr(kvm, "kvm", path)
        for cpu, off in enumerate(offsets):
            out.objects.append(KernelObject(name, sda + off, size, "struct srcu_data",
                                            f"bpf: kvm->{path} + __per_cpu_offset[cpu]", "btf", "per-CPU allocation",
                                            "cpu", cpu))


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




__all__ = ["per_cpu_objects", "struct_pages", "with_allocator"]
