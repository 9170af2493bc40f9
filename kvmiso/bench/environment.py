"""Where a benchmark runs: the CPU it is pinned to, and the host fingerprint every result
file records (the probe's facts, :class:`kvmiso.host.Host`'s, and the timing-relevant ones).
"""

from __future__ import annotations

import sys
from typing import Any

from ..host import Host, governor
from ..kvm import Kvm
from . import runloop


def pin(cpu: int | None = None) -> dict[str, Any]:
    """Pin this thread (and the threads it starts) to ``cpu`` (default: the last CPU we may use).

    A CPU that cannot be pinned is a warning on stderr and a fact in the result, not an error.
    """
    import psutil

    proc = psutil.Process()
    try:
        allowed = proc.cpu_affinity()
    except (psutil.Error, OSError) as e:
        return {"pinned": False, "cpu": None, "reason": f"cannot read the CPU affinity: {e}"}
    target = allowed[-1] if cpu is None else cpu
    try:
        proc.cpu_affinity([target])
    except (psutil.Error, OSError, ValueError) as e:
        print(f"kvmiso: warning: cannot pin to CPU {target}: {e}; timing unpinned", file=sys.stderr)
        return {"pinned": False, "cpu": None, "requested": target, "allowed": allowed, "reason": str(e)}
    return {"pinned": True, "cpu": target, "allowed": allowed}


def unpin(pinning: dict[str, Any]) -> None:
    """Give back the affinity ``pin`` replaced."""
    if pinning.get("pinned"):
        import psutil

        psutil.Process().cpu_affinity(pinning["allowed"])


def host_facts(kvm: Kvm, pinning: dict[str, Any]) -> dict[str, Any]:
    """The host fingerprint every result file records (kvmiso.guest.probe's, plus timing facts)."""
    from ..guest.probe import fingerprint, probe

    info = probe(kvm)
    fp = fingerprint(info)
    fp["cpl0"] = "native" if info["cpl0_native"] else "emulated"
    fp["cpl3"] = "native" if info["cpl3_native"] else "emulated"
    fp["pinning"] = pinning
    host = Host.read()
    fp["governor"] = governor(pinning.get("cpu"))
    fp["tsc"] = {"usable": runloop.tsc_usable(host)}
    # a host that is itself a guest (nested virtualization) pays an outer hypervisor on top
    fp["under_hypervisor"] = host.under_hypervisor
    if host.transparent_hugepage:
        fp["transparent_hugepage"] = host.transparent_hugepage
    fp["python"] = host.python
    fp["kvmiso"] = _version()
    return fp


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("kvmiso")
    except PackageNotFoundError:
        return "not installed"
