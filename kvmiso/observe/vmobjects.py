"""The real kernel objects of a VM, found by following the kernel's own pointers from the task
that runs its vCPUs (``task->files->fdt->fd[vcpu_fd]->private_data`` is the ``struct kvm_vcpu``)
and measured with the running kernel's BTF. Each object says how its address was found, where its
size comes from, and how it was allocated (slab cache, page allocator, vmalloc, per-CPU, inside
another object), read from ``struct page``/``struct slab`` where the kernel lets BPF read them.

This is what :mod:`kvmiso.isolation` checks against: real addresses, not a 2019 catalogue.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, replace

from .bpf import KernelMemory, KernelReadError
from .btf import ENUM, Btf, BtfError
from .livemm import LiveTables

PAGE = 4096

# The vendor module's container of struct kvm_vcpu / struct kvm, and its per-vCPU pages:
# (object name, member path in the vendor vCPU struct, what it is). A member this kernel lacks
# is reported absent, never guessed.
VENDOR_STRUCTS = {"kvm_intel": ("vcpu_vmx", "kvm_vmx"), "kvm_amd": ("vcpu_svm", "kvm_svm"),
                  "kvm_pvm": ("vcpu_pvm", "kvm_pvm")}
VENDOR_PAGES = {
    "kvm_intel": [("vmcs", "vmcs01.vmcs", "vmx->vmcs01.vmcs, the VMCS"),
                  ("msr_bitmap", "vmcs01.msr_bitmap", "vmx->vmcs01.msr_bitmap")],
    "kvm_amd": [("vmcb", "vmcb01.ptr", "svm->vmcb01.ptr, the VMCB"),
                ("msrpm", "msrpm", "svm->msrpm, the MSR permission map")],
    "kvm_pvm": [],
}


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
        return next((o for o in self.objects if o.name == name), None)


class _Kernel:
    """Typed pointer walks: ``k.ptr(addr, "kvm_vcpu", "arch.pio_data")``."""

    def __init__(self, mem: KernelMemory, btf: Btf) -> None:
        self.mem, self.btf = mem, btf

    def off(self, struct_name: str, path: str) -> int:
        return self.btf.struct(struct_name).offset(path)

    def ptr(self, addr: int, struct_name: str, path: str) -> int:
        return self.mem.u64(addr + self.off(struct_name, path))

    def u32(self, addr: int, struct_name: str, path: str) -> int:
        return struct.unpack("<I", self.mem.read(addr + self.off(struct_name, path), 4))[0]

    def sizeof(self, name: str) -> int:
        return self.btf.sizeof(name)


def possible_cpus(text: str) -> int:
    """The number of CPUs in a ``/sys/devices/system/cpu/possible`` list (``0-1``)."""
    n = 0
    for part in text.strip().split(","):
        lo, _, hi = part.partition("-")
        n += int(hi or lo) - int(lo) + 1
    return n


@dataclass(frozen=True)
class VmHandle:
    """A VM as the kernel holds it, found through vCPU fds open in this process (kvmiso's own,
    or another process's, duplicated with pidfd_getfd): its ``struct kvm_vcpu`` pointers, ``struct
    kvm``, the VMM's mm and page table, and the task of the thread that runs vCPU 0."""

    vcpus: dict[int, int]  # vcpu id -> struct kvm_vcpu *
    fds: dict[int, int]  # vcpu id -> fd in this process
    files: dict[int, int]  # vcpu id -> struct file * of its fd
    kvm: int
    mm: int  # kvm->mm: the VMM's address space
    pgd: int  # kvm->mm->pgd
    tasks: dict[int, tuple[int, str]]  # vcpu id -> (its thread's task_struct (vcpu->pid), how it was found)
    threads: dict[int, int]  # vcpu id -> its thread's id (task->pid), as tracing sees it
    checks: tuple[tuple[str, bool, str], ...] = ()


def find_vm(mem: KernelMemory, btf: Btf, vcpu_fds: dict[int, int]) -> VmHandle:
    """The VM behind ``vcpu_fds`` (``{vcpu id: fd}``), open in the calling process."""
    k = _Kernel(mem, btf)
    current = mem.current_task()
    fdt = k.ptr(k.ptr(current, "task_struct", "files"), "files_struct", "fdt")
    fd_array = k.ptr(fdt, "fdtable", "fd")
    vcpus, files, checks = {}, {}, []
    for vid, fd in sorted(vcpu_fds.items()):
        files[vid] = mem.u64(fd_array + 8 * fd)
        vcpu = k.ptr(files[vid], "file", "private_data")
        got = k.u32(vcpu, "kvm_vcpu", "vcpu_id")
        checks.append((f"vcpu {vid}: fd {fd} is that vCPU (kvm_vcpu.vcpu_id)", got == vid, f"vcpu_id {got}"))
        vcpus[vid] = vcpu
    kvm = k.ptr(vcpus[min(vcpus)], "kvm_vcpu", "kvm")
    mm = k.ptr(kvm, "kvm", "mm")
    tasks = {}
    for vid, vcpu in vcpus.items():
        task = _pid_task(k, k.ptr(vcpu, "kvm_vcpu", "pid"))
        tasks[vid] = (task, "bpf: vcpu->pid (the thread that ran it last)") if task else (
            current, "bpf: current (the vCPU has not run yet)")
        task_mm = k.ptr(tasks[vid][0], "task_struct", "mm")
        checks.append((f"kvm->mm == vCPU {vid}'s thread's mm", task_mm == mm, f"{mm:#x} vs {task_mm:#x}"))
    if any(t == current for t, _ in tasks.values()):
        checks.append(("kvm->mm == current->mm", k.ptr(current, "task_struct", "mm") == mm, f"{mm:#x}"))
    tids = {vid: k.u32(t, "task_struct", "pid") for vid, (t, _) in tasks.items()}
    return VmHandle(vcpus, dict(vcpu_fds), files, kvm, mm, k.ptr(mm, "mm_struct", "pgd"), tasks, tids, tuple(checks))


def _pid_task(k: _Kernel, pid: int) -> int:
    """pid_task(pid, PIDTYPE_PID): the task a ``struct pid *`` names, or 0."""
    if not pid:
        return 0
    first = k.mem.u64(pid + k.off("pid", "tasks[0]"))
    return first - k.off("task_struct", "pid_links[0]") if first else 0


def read_vm_objects(mem: KernelMemory, btf: Btf, vm: VmHandle, vendor: str, tables: LiveTables,
                    cpus: int) -> VmObjects:
    """The objects of ``vm`` (see :func:`find_vm`); ``tables``: the live table of ``vm.pgd``."""
    k = _Kernel(mem, btf)
    out = VmObjects(checks=list(vm.checks), threads=dict(vm.threads))
    vcpu_struct, vm_struct = VENDOR_STRUCTS.get(vendor, ("", ""))
    if not btf.has_struct(vcpu_struct):
        raise BtfError(f"this kernel's BTF has no struct {vcpu_struct or '(vendor ' + vendor + ')'}")
    in_vcpu = k.off(vcpu_struct, "vcpu")
    for vid, vcpu in vm.vcpus.items():
        _vcpu_objects(k, out, vcpu, vid, vm.fds[vid], vcpu_struct, in_vcpu, vendor, tables.page_offset_base)
        out.objects.append(KernelObject("vcpu_file", vm.files[vid], k.sizeof("file"), "struct file",
                                        f"bpf: the struct file of vCPU {vid}'s fd", "btf", "", "vcpu", vid))
    inode = k.ptr(vm.files[min(vm.files)], "file", "f_inode")
    out.objects.append(KernelObject("anon_inode", inode, k.sizeof("inode"), "struct inode",
                                    "bpf: file->f_inode of a vCPU fd (the anon inode all KVM fds share)"))
    in_vm = k.off(vm_struct, "kvm")
    out.objects.append(KernelObject("vm_struct", vm.kvm - in_vm, k.sizeof(vm_struct), f"struct {vm_struct}",
                                    f"bpf: vcpu->kvm, container_of(struct {vm_struct}, kvm)"))
    _vm_objects(k, out, vm.kvm)
    for vid, (task, how) in sorted(vm.tasks.items()):
        _task_objects(k, out, vid, task, how, tables)
    _per_cpu_objects(k, out, vm.tasks[min(vm.tasks)][0], vm.kvm, cpus)
    _struct_pages(k, out, tables)
    out.objects = [o if o.allocator else _with_allocator(k, tables, out, o) for o in out.objects]
    return out


def _struct_pages(k: _Kernel, out: VmObjects, tables: LiveTables) -> None:
    """The struct page of each shadow root (the MMU reads it for every shadow page lookup)."""
    vmemmap = out.facts.get("vmemmap_base")
    for root in [o for o in out.objects if o.name == "mmu_root"]:
        phys = tables.translate(root.address)
        if vmemmap is not None and phys is not None:
            size = k.sizeof("page")
            out.objects.append(KernelObject("struct_page", vmemmap[0] + (phys >> 12) * size, size, "struct page",
                                            "vmemmap_base + PFN(mmu_root) * sizeof(struct page)", "btf",
                                            "vmemmap", "vcpu", root.index))


def _vcpu_objects(k: _Kernel, out: VmObjects, vcpu: int, vid: int, fd: int, vcpu_struct: str, in_vcpu: int,
                  vendor: str, direct_map: int) -> None:
    def add(name: str, addr: int, size: int, ctype: str, how: str, size_source: str = "btf", allocator: str = "") -> None:
        if addr:
            out.objects.append(KernelObject(name, addr, size, ctype, f"bpf: {how}", size_source, allocator, "vcpu", vid))
        else:
            out.absent[f"{name}[{vid}]"] = f"{how} is NULL on this VM"

    add("vcpu_struct", vcpu - in_vcpu, k.sizeof(vcpu_struct), f"struct {vcpu_struct}",
        f"current->files->fdt->fd[{fd}]->private_data, container_of(struct {vcpu_struct}, vcpu)")
    add("kvm_run_page", k.ptr(vcpu, "kvm_vcpu", "run"), PAGE, "struct kvm_run", "vcpu->run", "page")
    add("pio_data", k.ptr(vcpu, "kvm_vcpu", "arch.pio_data"), PAGE, "void", "vcpu->arch.pio_data", "page")
    add("emulate_ctxt", k.ptr(vcpu, "kvm_vcpu", "arch.emulate_ctxt"), k.sizeof("x86_emulate_ctxt"),
        "struct x86_emulate_ctxt", "vcpu->arch.emulate_ctxt")
    nent = k.u32(vcpu, "kvm_vcpu", "arch.cpuid_nent")
    add("cpuid_entries", k.ptr(vcpu, "kvm_vcpu", "arch.cpuid_entries"), nent * k.sizeof("kvm_cpuid_entry2"),
        f"struct kvm_cpuid_entry2[{nent}]", "vcpu->arch.cpuid_entries",
        f"btf: arch.cpuid_nent ({nent}) * sizeof(struct kvm_cpuid_entry2)")
    apic = k.ptr(vcpu, "kvm_vcpu", "arch.apic")
    add("lapic", apic, k.sizeof("kvm_lapic"), "struct kvm_lapic", "vcpu->arch.apic")
    if apic:
        add("lapic_regs", k.ptr(apic, "kvm_lapic", "regs"), PAGE, "u8[4096]", "vcpu->arch.apic->regs", "page")
    pv = k.ptr(vcpu, "kvm_vcpu", "arch.pv_time.khva")
    if pv:  # a kernel mapping of a guest page: guest memory, whatever the allocator says
        add("pvclock_page", pv & ~(PAGE - 1), PAGE, "struct pvclock_vcpu_time_info page",
            "vcpu->arch.pv_time.khva (gfn_to_pfn_cache)", "page", "guest memory (kernel mapping)")
    fps = k.ptr(vcpu, "kvm_vcpu", "arch.guest_fpu.fpstate")
    add("guest_fpstate", fps, k.u32(fps, "fpstate", "size") + k.off("fpstate", "regs") if fps else 0,
        "struct fpstate", "vcpu->arch.guest_fpu.fpstate", "btf: offsetof(regs) + fpstate->size")
    root = k.ptr(k.ptr(vcpu, "kvm_vcpu", "arch.mmu"), "kvm_mmu", "root.hpa")
    if root and root != (1 << 64) - 1:  # INVALID_PAGE is all ones
        add("mmu_root", direct_map + root, PAGE, "u64[512]",
            "page_offset_base + vcpu->arch.mmu->root.hpa (the shadow/TDP root table)", "page")
    for name, path, _what in VENDOR_PAGES.get(vendor, []):
        try:
            addr = k.ptr(vcpu - in_vcpu, vcpu_struct, path)
        except BtfError as e:
            out.absent[f"{name}[{vid}]"] = str(e)
            continue
        add(name, addr, PAGE, "page", f"{vcpu_struct}->{path}", "page")


def _vm_objects(k: _Kernel, out: VmObjects, kvm: int) -> None:
    buses = [n for n, _v in k.btf.find(ENUM, "kvm_bus").enumerators if n != "KVM_NR_BUSES"]
    for i, enumerator in enumerate(buses):
        bus = k.ptr(kvm, "kvm", f"buses[{i}]")
        label = enumerator.removeprefix("KVM_").removesuffix("_BUS")
        if not bus:
            out.absent[f"bus:{label}"] = f"kvm->buses[{i}] is NULL"
            continue
        n = k.u32(bus, "kvm_io_bus", "dev_count")
        out.objects.append(KernelObject(f"bus:{label}", bus, k.sizeof("kvm_io_bus") + n * k.sizeof("kvm_io_range"),
                                        f"struct kvm_io_bus + {n} ranges", f"bpf: kvm->buses[{i}]",
                                        "btf: sizeof(struct kvm_io_bus) + dev_count * sizeof(struct kvm_io_range)"))
    for name, path, size, ctype in (
            ("msr_filter", "arch.msr_filter", k.sizeof("kvm_x86_msr_filter"), "struct kvm_x86_msr_filter"),
            ("mmu_page_hash", "arch.mmu_page_hash", 8 * 4096, "struct hlist_head[KVM_NUM_MMU_PAGES]"),
            ("apic_map", "arch.apic_map", k.sizeof("kvm_apic_map"), "struct kvm_apic_map"),
            ("vpic", "arch.vpic", k.sizeof("kvm_pic"), "struct kvm_pic"),
            ("vioapic", "arch.vioapic", k.sizeof("kvm_ioapic"), "struct kvm_ioapic"),
            ("irq_routing", "irq_routing", k.sizeof("kvm_irq_routing_table"), "struct kvm_irq_routing_table")):
        addr = k.ptr(kvm, "kvm", path)
        if addr:
            out.objects.append(KernelObject(name, addr, size, ctype, f"bpf: kvm->{path}",
                                            "btf" if name != "mmu_page_hash" else "modeled: 1 << KVM_MMU_HASH_SHIFT (12) heads"))
        else:
            out.absent[name] = f"kvm->{path} is NULL on this VM"
    slots = k.ptr(kvm, "kvm", "memslots[0]")
    inside = 0 <= slots - kvm < k.sizeof("kvm")
    out.objects.append(KernelObject("memslots", slots, k.sizeof("kvm_memslots"), "struct kvm_memslots",
                                    "bpf: kvm->memslots[0]", "btf",
                                    "inside vm_struct (kvm->__memslots)" if inside else ""))
    # the kvm_memory_slots: an rb-tree by gfn, nodes embedded at gfn_node[node_idx]
    idx = k.u32(slots, "kvm_memslots", "node_idx")
    node_off = k.off("kvm_memory_slot", f"gfn_node[{idx}]")
    node = k.mem.u64(slots + k.off("kvm_memslots", "gfn_tree"))
    stack, seen = [node] if node else [], 0
    while stack and seen < 512:
        n = stack.pop()
        slot = n - node_off
        seen += 1
        sid = k.u32(slot, "kvm_memory_slot", "id")
        out.objects.append(KernelObject(f"memslot:{sid}", slot, k.sizeof("kvm_memory_slot"), "struct kvm_memory_slot",
                                        "bpf: rb-tree kvm->memslots[0]->gfn_tree"))
        rmap = k.ptr(slot, "kvm_memory_slot", "arch.rmap[0]")
        if rmap:
            npages = k.mem.u64(slot + k.off("kvm_memory_slot", "npages"))
            out.objects.append(KernelObject(f"rmap:{sid}", rmap, 8 * npages, "struct kvm_rmap_head[]",
                                            f"bpf: memslot {sid} arch.rmap[0]", "btf: npages * 8"))
        lpage = k.ptr(slot, "kvm_memory_slot", "arch.lpage_info[0]")
        if lpage:
            out.objects.append(KernelObject(f"lpage_info:{sid}", lpage, 4 * ((k.mem.u64(slot + k.off("kvm_memory_slot",
                                            "npages")) >> 9) + 2), "struct kvm_lpage_info[]",
                                            f"bpf: memslot {sid} arch.lpage_info[0] (2 MiB level)",
                                            "btf: (npages / 512 + 2) * sizeof(struct kvm_lpage_info)"))
        hva = k.mem.u64(slot + k.off("kvm_memory_slot", "userspace_addr"))
        npages = k.mem.u64(slot + k.off("kvm_memory_slot", "npages"))
        out.objects.append(KernelObject(f"guest_memory:{sid}", hva, npages * PAGE, "guest RAM",
                                        f"bpf: memslot {sid} userspace_addr", "btf: npages * 4096", "user"))
        for child in ("rb_left", "rb_right"):
            c = k.ptr(n, "rb_node", child)
            if c:
                stack.append(c)


def _task_objects(k: _Kernel, out: VmObjects, vid: int, task: int, how: str, tables: LiveTables) -> None:
    """The vCPU thread's task, stack (and, once, its mm and page table)."""
    def add(name: str, addr: int, size: int, ctype: str, source: str, size_source: str = "btf", allocator: str = "",
            per: str = "vcpu") -> None:
        out.objects.append(KernelObject(name, addr, size, ctype, source, size_source, allocator, per, vid if per else 0))

    add("vcpu_task", task, k.sizeof("task_struct"), "struct task_struct", how)
    if out.object_named("files_struct") is None:
        add("files_struct", k.ptr(task, "task_struct", "files"), k.sizeof("files_struct"), "struct files_struct",
            "bpf: (vCPU thread)->files", per="")
    stack = k.ptr(task, "task_struct", "stack")
    area = k.ptr(task, "task_struct", "stack_vm_area")
    pages = k.u32(area, "vm_struct", "nr_pages") if area else 0
    add("vcpu_stack", stack, pages * PAGE if pages else 4 * PAGE, "unsigned long[THREAD_SIZE / 8]",
        "bpf: (vCPU thread)->stack", "btf: stack_vm_area->nr_pages" if pages else "modeled: 16 KiB",
        "vmalloc" if area else "")
    if out.object_named("active_mm") is None:
        mm = k.ptr(task, "task_struct", "active_mm")
        add("active_mm", mm, k.sizeof("mm_struct"), "struct mm_struct", "bpf: (vCPU thread)->active_mm", per="")
        add("pgd", k.ptr(mm, "mm_struct", "pgd"), PAGE, "pgd_t[512]", "bpf: (vCPU thread)->active_mm->pgd", "page",
            per="")
    if area and "vmemmap_base" not in out.facts:  # the struct page of the stack's first page, against its PFN
        page0 = k.ptr(area, "vm_struct", "pages")
        first = k.mem.u64(page0)
        phys = tables.translate(stack)
        if phys is not None:
            base = first - (phys >> 12) * k.sizeof("page")
            out.facts["vmemmap_base"] = (base, "bpf: task->stack_vm_area->pages[0] - PFN(task->stack) * "
                                               "sizeof(struct page), PFN from the live page table")
            if pages > 1:
                second = k.mem.u64(page0 + 8)
                phys1 = tables.translate(stack + PAGE)
                agree = phys1 is not None and second == base + (phys1 >> 12) * k.sizeof("page")
                out.checks.append(("vmemmap_base agrees for the stack's second page", agree, f"{second:#x}"))


def _per_cpu_objects(k: _Kernel, out: VmObjects, task: int, kvm: int, cpus: int) -> None:
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


def _with_allocator(k: _Kernel, tables: LiveTables, out: VmObjects, o: KernelObject) -> KernelObject:
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


def _is_slab(k: _Kernel, page: int) -> bool:
    """PageSlab(): the page type PGTY_slab in its top byte (6.12+), else the PG_slab flag."""
    pgty = k.btf.enum_value("PGTY_slab")
    if pgty is not None:
        return struct.unpack("<I", k.mem.read(page + k.off("page", "page_type"), 4))[0] >> 24 == pgty
    bit = k.btf.enum_value("PG_slab")
    return bit is not None and bool(k.mem.u64(page + k.off("page", "flags")) >> bit & 1)


__all__ = ["KernelObject", "OBJECT_NAMES", "VmHandle", "VmObjects", "find_vm", "known_object", "possible_cpus",
           "read_vm_objects"]
