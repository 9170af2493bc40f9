"""The real kernel objects of a VM, found by following the kernel's own pointers from the task
that runs its vCPUs (``task->files->fdt->fd[vcpu_fd]->private_data`` is the ``struct kvm_vcpu``)
and measured with the running kernel's BTF. Each object says how its address was found, where its
size comes from, and how it was allocated (slab cache, page allocator, vmalloc, per-CPU, inside
another object), read from ``struct page``/``struct slab`` where the kernel lets BPF read them.

This is what :mod:`kvmiso.isolation` checks against: real addresses, not a 2019 catalogue.
"""

from __future__ import annotations

from dataclasses import dataclass

from .bpf import KernelMemory
from .btf import ARRAY, ENUM, Btf, BtfError
from .kallsyms import Symbols
from .kernelfacts import per_cpu_objects, struct_pages, with_allocator
from .kobject import PAGE, KernelObject, KernelView, VmObjects
from .livemm import LiveTables

# The vendor module's container of struct kvm_vcpu / struct kvm, and its per-vCPU pages:
# (object name, member path in the vendor vCPU struct, what it is). A member this kernel lacks
# is reported absent, never guessed.
VENDOR_STRUCTS = {"kvm_intel": ("vcpu_vmx", "kvm_vmx"), "kvm_amd": ("vcpu_svm", "kvm_svm"),
                  "kvm_pvm": ("vcpu_pvm", "kvm_pvm")}
VENDOR_PAGES = {  # (name, member path, bytes, where the size comes from)
    "kvm_intel": [("vmcs", "vmcs01.vmcs", PAGE, "page: vmcs_config.size <= 4 KiB (vmx.c alloc_vmcs_cpu)"),
                  ("msr_bitmap", "vmcs01.msr_bitmap", PAGE, "page (vmx.c alloc_loaded_vmcs)")],
    "kvm_amd": [("vmcb", "vmcb01.ptr", PAGE, "page (svm.c svm_vcpu_create)"),
                ("msrpm", "msrpm", 2 * PAGE, "MSRPM_SIZE, 8 KiB (svm.h)")],
    "kvm_pvm": [],
}


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
    threads: dict[int, int]  # vcpu id -> the id of the thread that ran it (vcpu->pid), as tracing sees it
    checks: tuple[tuple[str, bool, str], ...] = ()


def find_vm(mem: KernelMemory, btf: Btf, vcpu_fds: dict[int, int]) -> VmHandle:
    """The VM behind ``vcpu_fds`` (``{vcpu id: fd}``), open in the calling process."""
    k = KernelView(mem, btf)
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
    own = k.ptr(current, "task_struct", "mm") == mm  # kvmiso's own VM (or a copy of another's fds)
    tasks, tids = {}, {}
    for vid, vcpu in vcpus.items():
        pid = k.ptr(vcpu, "kvm_vcpu", "pid")
        if pid:  # vcpu->pid holds a reference: the thread's id outlives the thread
            tids[vid] = k.u32(pid, "pid", "numbers[0].nr")
        task = _pid_task(k, pid)
        # an exiting thread keeps its task a while after exit_mm() cleared task->mm: it is gone
        task_mm = k.ptr(task, "task_struct", "mm") if task else 0
        if task_mm:
            tasks[vid] = (task, "bpf: vcpu->pid (the thread that ran it last)")
            checks.append((f"kvm->mm == vCPU {vid}'s thread's mm", task_mm == mm, f"{mm:#x} vs {task_mm:#x}"))
        elif own:  # not run yet: the thread that will run it is this one
            tasks[vid] = (current, "bpf: current (the vCPU has not run yet)")
            tids.setdefault(vid, k.u32(current, "task_struct", "pid"))
    if own:
        checks.append(("kvm->mm == current->mm", True, f"{mm:#x}"))
    return VmHandle(vcpus, dict(vcpu_fds), files, kvm, mm, k.ptr(mm, "mm_struct", "pgd"), tasks, tids, tuple(checks))


def _pid_task(k: KernelView, pid: int) -> int:
    """pid_task(pid, PIDTYPE_PID): the task a ``struct pid *`` names, or 0."""
    if not pid:
        return 0
    first = k.mem.u64(pid + k.off("pid", "tasks[0]"))
    return first - k.off("task_struct", "pid_links[0]") if first else 0


def read_vm_objects(mem: KernelMemory, btf: Btf, vm: VmHandle, vendor: str, tables: LiveTables,
                    cpus: int, symbols: Symbols | None = None) -> VmObjects:
    """The objects of ``vm`` (see :func:`find_vm`); ``tables``: the live table of ``vm.pgd``."""
    k = KernelView(mem, btf)
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
    for vid in vm.vcpus:
        if vid in vm.tasks:
            _task_objects(k, out, vid, *vm.tasks[vid], tables)
        else:
            out.absent[f"vcpu_task[{vid}]"] = (f"thread {vm.threads[vid]} (vcpu->pid) has exited" if vid in vm.threads
                                               else "vcpu->pid is NULL: another process's vCPU that has not run yet")
    first = vm.tasks[min(vm.tasks)][0] if vm.tasks else k.mem.current_task()
    per_cpu_objects(k, out, first, vm.kvm, cpus, symbols)
    struct_pages(k, out, tables)
    out.objects = [o if o.allocator else with_allocator(k, tables, out, o) for o in out.objects]
    return out


def _vcpu_objects(k: KernelView, out: VmObjects, vcpu: int, vid: int, fd: int, vcpu_struct: str, in_vcpu: int,
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
    for name, path, size, size_source in VENDOR_PAGES.get(vendor, []):
        try:
            addr = k.ptr(vcpu - in_vcpu, vcpu_struct, path)
        except BtfError as e:
            out.absent[f"{name}[{vid}]"] = str(e)
            continue
        add(name, addr, size, "page", f"{vcpu_struct}->{path}", f"modeled: {size_source}")


def _vm_objects(k: KernelView, out: VmObjects, kvm: int) -> None:
    """The objects struct kvm points to: its I/O buses, its x86 tables, its memslots."""
    _buses(k, out, kvm)
    _arch_tables(k, out, kvm)
    _memslots(k, out, kvm)


def _buses(k: KernelView, out: VmObjects, kvm: int) -> None:
    """Each kvm->buses[] entry with its ranges (enum kvm_bus names them)."""
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


def _arch_tables(k: KernelView, out: VmObjects, kvm: int) -> None:
    """The tables struct kvm points to (MSR filter, MMU page hash, APIC map, PIC, IOAPIC, IRQ
    routing); one a kernel embeds in struct kvm is part of struct kvm's own object."""
    for name, path, size, ctype in (
            ("msr_filter", "arch.msr_filter", k.sizeof("kvm_x86_msr_filter"), "struct kvm_x86_msr_filter"),
            ("mmu_page_hash", "arch.mmu_page_hash", 8 * 4096, "struct hlist_head[KVM_NUM_MMU_PAGES]"),
            ("apic_map", "arch.apic_map", k.sizeof("kvm_apic_map"), "struct kvm_apic_map"),
            ("vpic", "arch.vpic", k.sizeof("kvm_pic"), "struct kvm_pic"),
            ("vioapic", "arch.vioapic", k.sizeof("kvm_ioapic"), "struct kvm_ioapic"),
            ("irq_routing", "irq_routing", k.sizeof("kvm_irq_routing_table"), "struct kvm_irq_routing_table")):
        off, tid = k.btf.struct("kvm").member(path)
        if k.btf.resolve(tid).kind == ARRAY:  # embedded in struct kvm (mmu_page_hash before 6.x)
            continue
        addr = k.mem.u64(kvm + off)
        if addr:
            out.objects.append(KernelObject(name, addr, size, ctype, f"bpf: kvm->{path}",
                                            "btf" if name != "mmu_page_hash" else "modeled: 1 << KVM_MMU_HASH_SHIFT (12) heads"))
        else:
            out.absent[name] = f"kvm->{path} is NULL on this VM"


def _memslots(k: KernelView, out: VmObjects, kvm: int) -> None:
    """kvm->memslots[0], then each memory slot of its rb-tree by gfn (nodes embedded at
    gfn_node[node_idx]) with what the slot points to."""
    slots = k.ptr(kvm, "kvm", "memslots[0]")
    inside = 0 <= slots - kvm < k.sizeof("kvm")
    out.objects.append(KernelObject("memslots", slots, k.sizeof("kvm_memslots"), "struct kvm_memslots",
                                    "bpf: kvm->memslots[0]", "btf",
                                    "inside vm_struct (kvm->__memslots)" if inside else ""))
    idx = k.u32(slots, "kvm_memslots", "node_idx")
    node_off = k.off("kvm_memory_slot", f"gfn_node[{idx}]")
    node = k.mem.u64(slots + k.off("kvm_memslots", "gfn_tree"))
    stack, seen = [node] if node else [], 0
    while stack and seen < 512:
        n = stack.pop()
        seen += 1
        _memslot(k, out, n - node_off)
        for child in ("rb_left", "rb_right"):
            c = k.ptr(n, "rb_node", child)
            if c:
                stack.append(c)


def _memslot(k: KernelView, out: VmObjects, slot: int) -> None:
    """One struct kvm_memory_slot, its reverse map and large-page info, and the guest RAM it maps."""
    sid = k.u32(slot, "kvm_memory_slot", "id")
    npages = k.mem.u64(slot + k.off("kvm_memory_slot", "npages"))
    out.objects.append(KernelObject(f"memslot:{sid}", slot, k.sizeof("kvm_memory_slot"), "struct kvm_memory_slot",
                                    "bpf: rb-tree kvm->memslots[0]->gfn_tree"))
    rmap = k.ptr(slot, "kvm_memory_slot", "arch.rmap[0]")
    if rmap:
        out.objects.append(KernelObject(f"rmap:{sid}", rmap, 8 * npages, "struct kvm_rmap_head[]",
                                        f"bpf: memslot {sid} arch.rmap[0]", "btf: npages * 8"))
    lpage = k.ptr(slot, "kvm_memory_slot", "arch.lpage_info[0]")
    if lpage:
        out.objects.append(KernelObject(f"lpage_info:{sid}", lpage, 4 * ((npages >> 9) + 2), "struct kvm_lpage_info[]",
                                        f"bpf: memslot {sid} arch.lpage_info[0] (2 MiB level)",
                                        "btf: (npages / 512 + 2) * sizeof(struct kvm_lpage_info)"))
    hva = k.mem.u64(slot + k.off("kvm_memory_slot", "userspace_addr"))
    out.objects.append(KernelObject(f"guest_memory:{sid}", hva, npages * PAGE, "guest RAM",
                                    f"bpf: memslot {sid} userspace_addr", "btf: npages * 4096", "user"))


def _task_objects(k: KernelView, out: VmObjects, vid: int, task: int, how: str, tables: LiveTables) -> None:
    """The vCPU thread's task, stack (and, once, its mm and page table)."""
    def add(name: str, addr: int, size: int, ctype: str, source: str, size_source: str = "btf", allocator: str = "",
            per: str = "vcpu") -> None:
        out.objects.append(KernelObject(name, addr, size, ctype, source, size_source, allocator, per, vid if per else 0))

    def exiting(name: str, path: str) -> int:
        """task->path, or 0 noted absent: a thread exiting while it is read (exit_files(), the last
        context switch) loses them one by one."""
        addr = k.ptr(task, "task_struct", path)
        if not addr:
            out.absent.setdefault(name, f"(vCPU {vid}'s thread)->{path} is NULL: the thread is exiting")
        return addr

    add("vcpu_task", task, k.sizeof("task_struct"), "struct task_struct", how)
    if out.object_named("files_struct") is None and (files := exiting("files_struct", "files")):
        add("files_struct", files, k.sizeof("files_struct"), "struct files_struct", "bpf: (vCPU thread)->files", per="")
    stack = exiting(f"vcpu_stack[{vid}]", "stack")
    area = k.ptr(task, "task_struct", "stack_vm_area") if stack else 0
    pages = k.u32(area, "vm_struct", "nr_pages") if area else 0
    if stack:
        add("vcpu_stack", stack, pages * PAGE if pages else 4 * PAGE, "unsigned long[THREAD_SIZE / 8]",
            "bpf: (vCPU thread)->stack", "btf: stack_vm_area->nr_pages" if pages else "modeled: 16 KiB",
            "vmalloc" if area else "")
    if out.object_named("active_mm") is None and (mm := exiting("active_mm", "active_mm")):
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


__all__ = ["VENDOR_PAGES", "VENDOR_STRUCTS", "VmHandle", "find_vm", "read_vm_objects"]
