"""What this host is, for KVM purposes: the facts `kvmiso probe` prints and every result records."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..host import Host, mitigations
from ..kvm import CpuidEntry, Kvm
from .deadline import GuestTimeout
from .machine import Machine

PROBE_INSNS = 16  # plain instructions in guests/probe.S
TRACEFS = Path("/sys/kernel/tracing")

VENDOR_NOTES = {
    "kvm_intel": "VMX: CPL0 and CPL3 guest code run natively; kvm_exit carries the VMX exit reason.",
    "kvm_amd": "SVM: CPL0 and CPL3 guest code run natively; kvm_exit carries the SVM exit code.",
    "kvm_pvm": ("PVM: no hardware exits (kvm_exit never fires); CPL0 guest code runs under KVM's "
                "instruction emulator, so CPL0 round trips include emulation; CPL3 runs natively."),
}


def tracefs_state() -> dict[str, Any]:
    """Whether tracefs is mounted and how many kvm events it has; ``readable`` False (with the
    reason) where this user may not look (tracefs is root-only: 0700)."""
    events = TRACEFS / "events"
    state: dict[str, Any] = {"path": str(TRACEFS), "can_mount": os.geteuid() == 0, "readable": True}
    try:
        state["mounted"] = events.is_dir() or TRACEFS.is_mount()
        kvm = events / "kvm"
        state["kvm_events"] = len([p for p in kvm.iterdir() if p.is_dir()]) if kvm.is_dir() else 0
    except PermissionError as e:
        state.update(mounted=TRACEFS.is_mount(), kvm_events=None, readable=False,
                     reason=f"{e.filename}: {e.strerror} (tracefs is root-only)")
    return state


def kallsyms_state() -> dict[str, Any]:
    """Whether /proc/kallsyms is readable and shows real addresses (kptr_restrict, root)."""
    # hidden addresses are all zero; a real list may still start with absolute symbols at 0
    # (Linux 6.1 opens with "0000000000000000 A fixed_percpu_data")
    try:
        with open("/proc/kallsyms") as f:
            real = any(int(line.split(maxsplit=1)[0], 16) for line in f)
    except OSError as e:
        return {"readable": False, "real_addresses": False, "reason": e.strerror}
    return {"readable": True, "real_addresses": real,
            **({} if real else {"reason": "addresses are hidden (kptr_restrict, or not root)"})}


def emulated_instructions(kvm: Kvm, mode: str, cpl: int) -> int:
    """insn_emulation counted while the vCPU ran guests/probe.S once."""
    with Machine("probe", mode=mode, cpl=cpl, kvm=kvm) as m:
        r = m.run(timeout=5)
    return int(r.stats.get("insn_emulation", 0))


HYPERVISOR_LEAF = 0x40000000
CPUID_MARKER = (0x6F73696D, 0x6B72616D, 0x76766B2D)  # "miso" "mark" "-kvv": in no CPU's answer


def cpuid_intercepted(kvm: Kvm, cpl: int) -> bool | str:
    """Whether a guest's CPUID at ``cpl`` gets the CPUID KVM was given (KVM intercepts it) or
    the host CPU's own answer. Measured: the hypervisor leaf carries a marker in the CPUID this
    VM is given, and guests/probe_cpuid.S reports what it reads there. On kvm_pvm CPUID at CPL3
    runs natively (no exit), so it returns the host CPU's values. A guest that does not finish
    gives the reason instead of a verdict."""
    with Machine("probe_cpuid", mode="long", cpl=cpl, kvm=kvm) as m:
        entries = [e for e in m.vcpu.get_cpuid2() if e.function != HYPERVISOR_LEAF]
        b, c, d = CPUID_MARKER
        entries.append(CpuidEntry(HYPERVISOR_LEAF, 0, 0, HYPERVISOR_LEAF, b, c, d))
        m.vcpu.set_cpuid2(entries)
        m.reset()  # the mode setup again, after the CPUID it depends on (XCR0, CR4 bits)
        r = m.run(timeout=5)
    if not r.ok:
        return f"not measured: the probe guest ended with {r.outcome} ({r.detail})"
    return tuple(r.report(tag) for tag in range(3)) == CPUID_MARKER


HYPERCALL_DEADLINE = 1.0  # s: a hypercall that returns does so within microseconds, even under TCG


def hypercall_returns(kvm: Kvm) -> bool:
    """Whether a CPL0 hypercall (guests/hypercall.S) comes back to the guest. Measured: on some
    hosts KVM re-executes it inside one KVM_RUN for ever (kvm_pvm rewrites VMMCALL to VMCALL
    and emulates it again), and the guest never gets past it."""
    with Machine("hypercall", mode="long", kvm=kvm) as m:
        try:
            return m.run(timeout=HYPERCALL_DEADLINE).ok
        except GuestTimeout:
            return False


def probe(kvm: Kvm) -> dict[str, Any]:
    """Every fact ``kvmiso probe`` prints: measured by running guests where it can be."""
    host = Host.read()
    vendor = host.vendor
    cpl0 = emulated_instructions(kvm, "long", 0)
    cpl3 = emulated_instructions(kvm, "long", 3)
    caps = kvm.capabilities()
    return {
        "api_version": kvm.api_version,
        "vendor": vendor,
        "vendor_notes": VENDOR_NOTES.get(vendor or "", "unknown vendor module"),
        "cpl0_native": cpl0 < PROBE_INSNS,
        "cpl3_native": cpl3 < PROBE_INSNS,
        "emulated_instructions": {"probe_instructions": PROBE_INSNS, "cpl0": cpl0, "cpl3": cpl3},
        "cpuid_intercepted": {"cpl0": cpuid_intercepted(kvm, 0), "cpl3": cpuid_intercepted(kvm, 3)},
        "cpl0_hypercall_returns": hypercall_returns(kvm),
        "capabilities": {k: v for k, v in caps.items() if v},
        "capabilities_absent": sorted(k for k, v in caps.items() if not v),
        "vcpu_mmap_size": kvm.vcpu_mmap_size,
        "cpuid_leaves": len(kvm.get_supported_cpuid()),
        "msr_index_count": len(kvm.get_msr_index_list()),
        "cpu": host.cpu,
        "cpus": host.cpus,
        "kernel": host.kernel,
        "vulnerabilities": host.vulnerabilities,
        "tracefs": tracefs_state(),
        "kallsyms": kallsyms_state(),
    }


def fingerprint(info: dict[str, Any]) -> dict[str, Any]:
    """The short host identity recorded with every result file."""
    keys = ("cpu", "cpus", "kernel", "vendor", "cpl0_native", "cpuid_intercepted", "cpl0_hypercall_returns",
            "api_version")
    fp = {k: info[k] for k in keys}
    fp["mitigations"] = mitigations(info["vulnerabilities"])
    return fp
