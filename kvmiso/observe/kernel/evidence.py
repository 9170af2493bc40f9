"""Evidence: what the running kernel showed about one VM, with the source of every fact.

* the VM's real objects (:mod:`.vmobjects`: address, BTF size, allocator);
* the live page table of the vCPU task: every table page on the way to those objects, to the
  code of every function seen on a call chain, and the whole table under the kernel image,
  cpu_entry_area and ESPFIX (what the RFC copies at high levels); plus how many bytes the kernel
  half maps in 4 KiB, 2 MiB and 1 GiB leaves, and how many distinct physical bytes are behind them;
* the functions (kallsyms) of every return address the call chains hold;
* derived facts (``page_offset_base``, ``vmemmap_base``, the per-CPU offsets) and the cross-checks
  they passed or failed.

Where BPF cannot be used (not root, no BTF, ``KVMISO_HIDE_BPF=1``) the evidence says why and
holds no objects: the model then places modeled objects and says so on every line.

Serialised as one JSON document; ``read_evidence(write_evidence(e))`` gives ``e`` back.

>>> ev = collect_evidence(m.vm, m.vendor, set())     # needs root: BPF
>>> next(o for o in ev.objects if o.name == "pio_data").allocator
'page allocator'
"""

from __future__ import annotations

import dataclasses
import json
import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Protocol, Sequence

from .bpf import BpfUnavailable, KernelMemory, KernelReadError
from .btf import Btf, BtfError
from .kallsyms import Symbols, read_kallsyms
from .livemm import LiveTableError, LiveTables, distinct_bytes
from .kobject import KernelObject, KernelView, possible_cpus
from .vmobjects import find_vm, read_vm_objects

FORMAT_VERSION = 1
PAGE = 4096
# Spans whose whole kernel table is read: the RFC copies them at PMD level or above
# (Documentation/arch/x86/x86_64/mm.rst, 4-level; cpu_entry_area and ESPFIX are not randomized).
WHOLE_TABLE_SPANS = {
    "kernel_image": (0xFFFF_FFFF_8000_0000, 0xFFFF_FFFF_C000_0000),
    "modules": (0xFFFF_FFFF_C000_0000, 0xFFFF_FFFF_FF00_0000),  # every module's code: KVM's where it is one
    "cpu_entry_area": (0xFFFF_FE00_0000_0000, 0xFFFF_FE80_0000_0000),
    "espfix": (0xFFFF_FF00_0000_0000, 0xFFFF_FF80_0000_0000),
}
MAX_WALKED_PAGES = 1024  # per object: enough for every object kvmiso finds (guest RAM: 2 MiB)


@dataclass(frozen=True)
class Frame:
    """A return address of a call chain, resolved: ``function+offset/size``."""

    address: int
    function: str
    offset: int
    size: int = 0


@dataclass
class Evidence:
    """Facts about one VM on the running kernel (see the module docstring)."""

    kernel: str = ""
    vendor: str = ""
    source: str = ""  # "bpf+btf", or why not
    objects: list[KernelObject] = field(default_factory=list)
    absent: dict[str, str] = field(default_factory=dict)
    facts: dict[str, tuple[int, str]] = field(default_factory=dict)
    checks: list[tuple[str, bool, str]] = field(default_factory=list)
    per_cpu_offsets: list[int] = field(default_factory=list)
    threads: dict[int, int] = field(default_factory=dict)  # vcpu id -> the thread that ran it (vcpu->pid)
    pgd_phys: int = 0
    page_offset_base: int = 0
    frames: dict[int, bytes] = field(default_factory=dict)  # page-table pages by physical address
    kernel_mapped: dict[int, int] = field(default_factory=dict)  # leaf level -> bytes the kernel half maps
    kernel_mapped_physical: int = 0  # distinct physical bytes behind them (0: not counted, older evidence)
    frames_source: str = ""
    code: dict[int, Frame] = field(default_factory=dict)  # return address -> function
    sections: dict[str, tuple[int, int, str]] = field(default_factory=dict)  # name -> (start, end, source)
    config: dict[str, str] = field(default_factory=dict)  # CONFIG_KVM* of the running kernel (/proc/config.gz)
    notes: list[str] = field(default_factory=list)

    @property
    def real(self) -> bool:
        """True when the objects and the page table were read from the running kernel."""
        return bool(self.objects) and bool(self.frames)

    def object(self, name: str, index: int = 0) -> KernelObject | None:
        """The object ``name`` (for vCPU or CPU ``index``), or None."""
        for o in self.objects:
            if o.name == name and o.index == index:
                return o
        return None

    def failed_checks(self) -> list[str]:
        """The cross-checks that did not agree, one line each."""
        return [f"{what}: {detail}" for what, ok, detail in self.checks if not ok]


# --- collecting -------------------------------------------------------------------------------

class VcpuFd(Protocol):
    """A vCPU as the evidence reads it."""

    @property
    def id(self) -> int:
        """The vCPU's id (``vcpu->vcpu_id``)."""

    @property
    def fd(self) -> int:
        """An fd on the vCPU open in this process."""

    @property
    def page_address(self) -> int:
        """Where this process maps the vCPU's ``struct kvm_run`` (0: not mapped here)."""


class VcpuFds(Protocol):
    """What the evidence reads of a VM: its vCPUs. A :class:`kvmiso.kvm.Vm` is one, and so is
    :class:`kvmiso.observe.foreign.vms.ForeignVm` (copies of another process's vCPU fds)."""

    @property
    def vcpus(self) -> Sequence[VcpuFd]:
        """The VM's vCPUs."""


def collect_evidence(vm: VcpuFds, vendor: str, code_addresses: Iterable[int] = (), symbols: Symbols | None = None,
                     cpus: int | None = None) -> Evidence:
    """Evidence for ``vm`` (its vCPU fds open in this process), the functions of
    ``code_addresses`` (return addresses from call chains), and the kernel's sections."""
    ev = Evidence(kernel=platform.release(), vendor=vendor, config=kvm_config())
    symbols = symbols if symbols is not None else read_kallsyms()
    code_addresses = sorted(set(code_addresses))
    if symbols is None:
        ev.notes.append("/proc/kallsyms shows no addresses: call chains stay unresolved")
    else:
        ev.code = resolve_code(symbols, code_addresses)
        ev.sections = image_sections(symbols)
    try:
        mem = KernelMemory()
    except BpfUnavailable as e:
        ev.source = f"no BPF: {e}"
        return ev
    with mem:
        try:
            _read_kernel(ev, mem, vm, vendor, code_addresses, cpus)
        except (BtfError, KernelReadError, LiveTableError) as e:
            ev.source = f"BPF could not read this VM's objects: {e}"
            ev.objects, ev.frames = [], {}
    return ev


def vcpu_counters(vm: VcpuFds, stat: str = "insn_emulation") -> dict[int, int]:
    """Each vCPU's ``stat`` (a member of struct kvm_vcpu_stat), read through BPF from the
    struct kvm_vcpu behind each of ``vm``'s vCPU fds (as :func:`collect_evidence` takes them).
    For another process's vCPUs KVM_GET_STATS_FD cannot be asked: KVM refuses a vCPU ioctl from
    another mm (EIO). Empty where BPF, BTF or the vCPU cannot be read."""
    try:
        mem = KernelMemory()
    except BpfUnavailable:
        return {}
    with mem:
        try:
            btf = Btf.running(("kvm",) if (Path("/sys/kernel/btf") / "kvm").exists() else ())
            handle = find_vm(mem, btf, {v.id: v.fd for v in vm.vcpus})
            off = KernelView(mem, btf).off("kvm_vcpu", f"stat.{stat}")
            return {vid: mem.u64(vcpu + off) for vid, vcpu in handle.vcpus.items()}
        except (BtfError, KernelReadError, KeyError):
            return {}


# The parts of the kernel table that do not depend on the VM, per page-table root: the frames
# under WHOLE_TABLE_SPANS and the census of the kernel half. Read once per process (they cost
# about a second); the frames on the way to a VM's own objects are read afresh for every VM.
_STATIC: dict[int, tuple[int, dict[int, bytes], dict[int, int], int]] = {}


def _read_kernel(ev: Evidence, mem: KernelMemory, vm: VcpuFds, vendor: str, code: list[int], cpus: int | None) -> None:
    modules = tuple(m for m in ("kvm", vendor) if (Path("/sys/kernel/btf") / m).exists())
    btf = Btf.running(modules)
    handle = find_vm(mem, btf, {v.id: v.fd for v in vm.vcpus})
    static = _STATIC.get(handle.pgd)
    if static is None:
        tables = LiveTables(mem, handle.pgd)
        for start, end in WHOLE_TABLE_SPANS.values():
            tables.read_subtree(start, end)
        spans: list[tuple[int, int]] = []
        census = tables.mapped_bytes(physical=spans)
        static = _STATIC[handle.pgd] = (tables.page_offset_base, dict(tables.frames), census, distinct_bytes(spans))
    tables = LiveTables(mem, handle.pgd, static[0])
    ev.facts["page_offset_base"] = (tables.page_offset_base, "the live page table: the one 1 GiB-aligned base "
                                                            "that makes the walk of mm->pgd end at pgd - base")
    if cpus is None:
        cpus = possible_cpus(Path("/sys/devices/system/cpu/possible").read_text())
    found = read_vm_objects(mem, btf, handle, vendor, tables, cpus, read_kallsyms())
    ev.objects, ev.absent, ev.checks = found.objects, found.absent, found.checks
    ev.facts.update(found.facts)
    ev.per_cpu_offsets = found.per_cpu_offsets
    ev.threads = found.threads
    _cross_check_pagemap(ev, vm, tables)
    for o in ev.objects:
        for va in range(o.address & ~(PAGE - 1), min(o.end, o.address + MAX_WALKED_PAGES * PAGE), PAGE):
            tables.walk(va)
    for a in code:
        tables.walk(a)
    ev.kernel_mapped, ev.kernel_mapped_physical = dict(static[2]), static[3]
    ev.frames = {**static[1], **tables.frames}
    ev.pgd_phys, ev.page_offset_base = tables.root, tables.page_offset_base
    ev.frames_source = "bpf: kvm->mm->pgd (the VMM's page table), walked"
    ev.source = "bpf+btf" + (f" ({'+'.join(modules)} module BTF)" if modules else "")


def _cross_check_pagemap(ev: Evidence, vm: VcpuFds, tables: LiveTables) -> None:
    """vcpu->run (read by BPF) must be the direct-map alias of the page kvmiso mmapped from the
    vCPU fd; /proc/self/pagemap gives that page's PFN to root."""
    run = ev.object("kvm_run_page")
    vcpu = vm.vcpus[0] if vm.vcpus else None
    if run is None or vcpu is None or not vcpu.page_address:
        return  # no VM of ours, or its kvm_run page is not mapped here
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek((vcpu.page_address >> 12) * 8)
            entry = int.from_bytes(f.read(8), "little")
    except OSError as e:
        ev.notes.append(f"pagemap cross-check skipped: {e.strerror}")
        return
    pfn = entry & ((1 << 55) - 1)
    if not entry >> 63 or not pfn:
        ev.notes.append("pagemap cross-check skipped: the kvm_run page is not present or its PFN is hidden")
        return
    via_pagemap = tables.page_offset_base + (pfn << 12)
    ev.checks.append(("vcpu->run (bpf) == page_offset_base + PFN of the kvm_run mapping (/proc/self/pagemap)",
                      via_pagemap == run.address, f"{via_pagemap:#x} vs {run.address:#x}"))


def kvm_config(path: str = "/proc/config.gz") -> dict[str, str]:
    """The running kernel's ``CONFIG_KVM*`` options (empty where the config is not exported)."""
    import gzip

    try:
        with gzip.open(path, "rt") as f:
            return {k: v.strip() for k, _, v in (line.partition("=") for line in f)
                    if k.startswith("CONFIG_KVM") and v}
    except OSError:
        return {}


def resolve_code(symbols: Symbols, addresses: Iterable[int]) -> dict[int, Frame]:
    """Each return address as function+offset/size (size: to the next code symbol)."""
    out = {}
    for a in addresses:
        hit = symbols.resolve(a)
        if hit is not None:
            name, off = hit
            out[a] = Frame(a, name, off, symbols.code_size(name))
    return out


def image_sections(symbols: Symbols) -> dict[str, tuple[int, int, str]]:
    """Kernel text and the loaded KVM modules, from kallsyms."""
    out = {}
    s, e = symbols.get("_stext"), symbols.get("_etext")
    if s and e:
        out["text"] = (s, e, "kallsyms: _stext.._etext")
    for mod in ("kvm", "kvm_intel", "kvm_amd", "kvm_pvm"):
        span = symbols.module_span(mod)
        if span:
            out[f"{mod}_module"] = (span[0], span[1], f"kallsyms: [{mod}] symbols")
    return out


# --- JSON -------------------------------------------------------------------------------------

class EvidenceError(ValueError):
    """A file that is not kvmiso evidence, or of another format version."""


def evidence_to_dict(ev: Evidence) -> dict[str, Any]:
    """``ev`` as JSON-ready data (page tables as their present entries)."""
    d = dataclasses.asdict(ev)
    d["kvmiso_evidence"] = FORMAT_VERSION
    # page tables are sparse: keep each frame's present entries only, as {index: entry}
    d["frames"] = {f"{pa:#x}": {str(i): f"{v:#x}" for i, v in _entries(page) if v}
                   for pa, page in ev.frames.items()}
    d["code"] = {f"{a:#x}": [f.function, f.offset, f.size] for a, f in ev.code.items()}
    d["kernel_mapped"] = {str(k): v for k, v in ev.kernel_mapped.items()}
    return d


def evidence_from_dict(d: dict[str, Any], source: str = "<evidence>") -> Evidence:
    """Evidence from :func:`evidence_to_dict`'s data; EvidenceError names ``source``."""
    if not isinstance(d, dict) or d.get("kvmiso_evidence") != FORMAT_VERSION:
        raise EvidenceError(f"{source}: not kvmiso evidence of format {FORMAT_VERSION}")
    try:
        frames = {}
        for pa, entries in d["frames"].items():
            page = bytearray(PAGE)
            for i, v in entries.items():
                page[8 * int(i): 8 * int(i) + 8] = int(v, 16).to_bytes(8, "little")
            frames[int(pa, 16)] = bytes(page)
        return Evidence(
            kernel=d["kernel"], vendor=d["vendor"], source=d["source"],
            objects=[KernelObject(**o) for o in d["objects"]], absent=d["absent"],
            facts={k: (v[0], v[1]) for k, v in d["facts"].items()},
            checks=[(a, b, c) for a, b, c in d["checks"]], per_cpu_offsets=d["per_cpu_offsets"],
            threads={int(k): v for k, v in d.get("threads", {}).items()},
            pgd_phys=d["pgd_phys"], page_offset_base=d["page_offset_base"], frames=frames,
            kernel_mapped={int(k): v for k, v in d["kernel_mapped"].items()},
            kernel_mapped_physical=d.get("kernel_mapped_physical", 0), frames_source=d["frames_source"],
            code={int(a, 16): Frame(int(a, 16), f, o, s) for a, (f, o, s) in d["code"].items()},
            sections={k: (v[0], v[1], v[2]) for k, v in d["sections"].items()}, notes=d["notes"],
            config=d.get("config", {}))
    except (KeyError, TypeError, ValueError) as e:
        raise EvidenceError(f"{source}: malformed evidence ({type(e).__name__}: {e})") from None


def write_evidence(ev: Evidence, path: str | Path) -> None:
    """Save ``ev`` as JSON."""
    Path(path).write_text(json.dumps(evidence_to_dict(ev)))


def read_evidence(path: str | Path) -> Evidence:
    """Evidence saved by :func:`write_evidence`."""
    try:
        d = json.loads(Path(path).read_text())
    except json.JSONDecodeError as e:
        raise EvidenceError(f"{path}: not JSON ({e})") from None
    return evidence_from_dict(d, str(path))


def _entries(page: bytes) -> Iterable[tuple[int, int]]:
    for i in range(0, PAGE, 8):
        yield i // 8, int.from_bytes(page[i:i + 8], "little")


__all__ = ["Evidence", "EvidenceError", "Frame", "collect_evidence", "evidence_from_dict", "evidence_to_dict",
           "image_sections", "read_evidence", "resolve_code", "write_evidence"]
