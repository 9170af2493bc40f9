"""The benchmark kinds: which guest, which exit, where each can run (imported by the CLI at
start-up, so it stays free of everything heavier than dataclasses)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Kind:
    """One benchmark: its guest, the exit every KVM_RUN must end with, where it can run."""

    name: str
    what: str
    guest: str | None = None
    exit: str = "io"  # io | mmio | hlt: what each KVM_RUN of the guest ends with
    insns: int | None = None  # guest instructions per iteration
    in_kernel: bool = False  # handled inside KVM: timed by the guest per batch
    cpl3: str | None = None  # None: legal at CPL3; else why not
    reply: int = 0  # the host's answer to an IN or an MMIO read
    kvm_runs_per_iteration: float = 1.0  # for the isolation estimate
    host_mm_exits: float = 0.0  # exits per iteration handled on host_mm, then back into the guest


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("out", "port OUT to userspace", "bench_out", "io", 2),
    Kind("in", "port IN answered by the host", "bench_in", "io", 2, reply=0x5A),
    Kind("mmio_write", "MMIO write to userspace", "bench_mmio_write", "mmio", 2),
    Kind("mmio_read", "MMIO read answered by the host", "bench_mmio_read", "mmio", 2, reply=0x5A5A5A5A),
    Kind("hlt", "HLT to userspace (no irqchip)", "bench_hlt", "hlt", 2,
         cpl3="HLT is privileged: #GP at CPL3"),
    Kind("cpuid", "CPUID inside KVM", "bench_cpuid", "io", 4, in_kernel=True),
    Kind("rdmsr", "RDMSR inside KVM", "bench_rdmsr", "io", 3, in_kernel=True,
         cpl3="RDMSR is privileged: #GP at CPL3"),
    Kind("page_fault", "first touch of a page the host dropped (MADV_DONTNEED)", "bench_page_fault", "io", 4,
         in_kernel=True, host_mm_exits=1.0),
    Kind("hypercall", "KVM_HC_VAPIC_POLL_IRQ hypercall inside KVM", "bench_hypercall", "io", 4,
         in_kernel=True, cpl3="KVM refuses hypercalls from CPL3 (-KVM_EPERM): that would time the refusal"),
    Kind("vm_create", "VM creation to first exit (Python API)", "bench_out"),
    Kind("parallel", "port OUT on 1 and 2 vCPUs in parallel threads", "bench_out", "io", 2),
)}
DEFAULT_KINDS = tuple(KINDS)
