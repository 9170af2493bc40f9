"""``kvmiso probe``: what this host's KVM is and can do, as aligned rows (or JSON)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """The parser of ``kvmiso probe``."""
    sp = subparsers.add_parser("probe", help="what this host's KVM is and can do")
    sp.add_argument("--json", action="store_true", help="print the facts as JSON")
    return sp


def run(args: argparse.Namespace) -> int:
    """``kvmiso probe``: the host's KVM facts as rows (or JSON)."""
    from ..kvm import Kvm
    from ..guest.probe import probe

    with Kvm() as kvm:
        info = probe(kvm)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    emu = info["emulated_instructions"]
    rows = [
        ("KVM API version", info["api_version"]),
        ("vendor module", info["vendor"] or "none found in /sys/module"),
        ("CPL0 guest code", "native" if info["cpl0_native"] else
         f"emulated ({emu['cpl0']} emulations for {emu['probe_instructions']}+ instructions)"),
        ("CPL3 guest code", "native" if info["cpl3_native"] else f"emulated ({emu['cpl3']} emulations)"),
        *((f"CPUID at CPL{cpl}", _cpuid_text(info["cpuid_intercepted"][f"cpl{cpl}"])) for cpl in (0, 3)),
        ("CPL0 hypercall", "returns to the guest" if info["cpl0_hypercall_returns"] else
         "never returns: KVM executes it again inside one KVM_RUN"),
        ("vCPU mmap size", info["vcpu_mmap_size"]),
        ("supported CPUID leaves", info["cpuid_leaves"]),
        ("MSR index list", f"{info['msr_index_count']} MSRs"),
        ("CPU", f"{info['cpu']} ({info['cpus']} CPUs)"),
        ("kernel", info["kernel"]),
        ("tracefs", _tracefs_text(info["tracefs"])),
        ("/proc/kallsyms", "real addresses" if info["kallsyms"]["real_addresses"] else
         f"not usable: {info['kallsyms'].get('reason', '')}"),
    ]
    _print_rows(rows)
    print(f"\n{info['vendor_notes']}")
    caps = info["capabilities"]
    print(f"\ncapabilities ({len(caps)} present, {len(info['capabilities_absent'])} absent of those kvmiso names):")
    _print_wrapped([f"{k}={v}" if v != 1 else k for k, v in caps.items()])
    print("\nCPU vulnerabilities:")
    _print_rows(list(info["vulnerabilities"].items()), indent=2)
    return 0


def _cpuid_text(intercepted: bool | str) -> str:
    if isinstance(intercepted, str):
        return intercepted  # why it could not be measured
    return "intercepted by KVM" if intercepted else "not intercepted: the guest reads the host CPU's own values"


def _tracefs_text(t: dict) -> str:
    if not t["readable"]:
        return f"{'mounted' if t['mounted'] else 'not mounted'} at {t['path']}, not readable: {t['reason']}"
    if t["mounted"]:
        return f"mounted at {t['path']} ({t['kvm_events']} kvm events)"
    return f"not mounted at {t['path']}" + ("; kvmiso mounts it when tracing (root)" if t["can_mount"] else "; needs root to mount")


def _print_rows(rows: list[tuple[str, Any]], indent: int = 0) -> None:
    width = max((len(k) for k, _ in rows), default=0)
    for k, v in rows:
        print(f"{' ' * indent}{k:<{width}}  {v}")


def _print_wrapped(items: list[str], width: int = 96) -> None:
    line = " "
    for it in items:
        if len(line) + len(it) + 1 > width:
            print(line)
            line = " "
        line += " " + it
    if line.strip():
        print(line)
