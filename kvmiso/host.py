"""What this machine is, read from /sys and /proc and nothing else: no ioctl, no guest.

The facts a result is worthless without (which KVM vendor module, which CPU and mitigations,
which kernel) in one frozen :class:`Host`. Facts that need KVM itself (the API version, whether
CPL0 guest code runs natively) are measured by :mod:`kvmiso.guest.probe`, which adds them.

>>> h = Host.read()
>>> h.vendor                    # kvm_pvm on this project's host, kvm_amd in CI's lane
'kvm_...'
>>> h.vendor in VENDOR_MODULES
True
"""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass, field
from pathlib import Path

SYS_MODULE = Path("/sys/module")
VENDOR_MODULES = ("kvm_intel", "kvm_amd", "kvm_pvm")
VULNERABILITIES = Path("/sys/devices/system/cpu/vulnerabilities")
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def vendor_module(sys_module: Path = SYS_MODULE) -> str | None:
    """The KVM vendor module this kernel runs (kvm_intel, kvm_amd or kvm_pvm), from the
    ``/sys/module/<name>`` directory built-in and loadable modules both have; None without one."""
    for name in VENDOR_MODULES:
        if (sys_module / name).is_dir():
            return name
    return None


def cpu_model() -> str:
    """The first ``model name`` in /proc/cpuinfo (``platform.processor()`` where there is none)."""
    for line in _read("/proc/cpuinfo").splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def governor(cpu: int | None) -> str:
    """The cpufreq scaling governor of ``cpu`` (default CPU 0), or why it cannot be read."""
    text = _read(f"/sys/devices/system/cpu/cpu{cpu or 0}/cpufreq/scaling_governor")
    return text.strip() or "not readable (no cpufreq in this kernel or VM)"


def mitigations(vulnerabilities: dict[str, str]) -> dict[str, str]:
    """Of ``vulnerabilities`` (/sys/devices/system/cpu/vulnerabilities, as :class:`Host` reads
    them), those this CPU has, with how the kernel mitigates each."""
    return {k: v for k, v in vulnerabilities.items() if v != "Not affected"}


@dataclass(frozen=True)
class Host:
    """The host as /sys and /proc describe it."""

    vendor: str | None  # the KVM vendor module: kvm_intel | kvm_amd | kvm_pvm
    cpu: str  # /proc/cpuinfo model name
    cpus: int  # os.cpu_count()
    kernel: str  # uname -r
    vulnerabilities: dict[str, str] = field(default_factory=dict)  # /sys/.../cpu/vulnerabilities
    cpu_flags: frozenset[str] = frozenset()  # /proc/cpuinfo flags of the first CPU
    transparent_hugepage: str | None = None  # /sys/kernel/mm/transparent_hugepage/enabled
    python: str = ""

    @classmethod
    def read(cls) -> "Host":
        """Read every fact now; an unreadable one is empty, never an error."""
        try:
            vulns = {p.name: p.read_text().strip() for p in sorted(VULNERABILITIES.iterdir())}
        except OSError:
            vulns = {}
        flags: frozenset[str] = frozenset()
        for line in _read("/proc/cpuinfo").splitlines():
            if line.startswith("flags"):
                flags = frozenset(line.split(":", 1)[1].split())
                break
        return cls(vendor=vendor_module(), cpu=cpu_model(), cpus=os.cpu_count() or 1,
                   kernel=platform.release(), vulnerabilities=vulns, cpu_flags=flags,
                   transparent_hugepage=_read(THP).strip() or None, python=platform.python_version())

    @property
    def under_hypervisor(self) -> bool:
        """The CPU says it is virtual (cpuinfo ``hypervisor``): every KVM round trip on this host
        also pays an outer hypervisor (nested virtualization)."""
        return "hypervisor" in self.cpu_flags

    @property
    def mitigations(self) -> dict[str, str]:
        """The vulnerabilities this CPU has and how the kernel mitigates each."""
        return mitigations(self.vulnerabilities)

    def exitlog_host(self, pid: int) -> dict[str, str | int | None]:
        """Where an exit log was taken, as its header records it: kernel, vendor module, CPU and
        the pid of the kvmiso that captured it."""
        return {"kernel": self.kernel, "vendor": self.vendor, "cpu": self.cpu, "pid": pid}


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
