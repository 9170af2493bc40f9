"""x86 names tests use: CPU features by their Linux ``X86_FEATURE_*`` names (one table: leaf,
subleaf, register, bit, as the SDM and the APM give them and selftests' processor.h spells them),
and the bits of CR0, CR4 and EFER as flags.

>>> cpu_has(kvm.get_supported_cpuid(), "LM")
True
>>> CR4.PAE | CR4.OSFXSR
<CR4.PAE|OSFXSR: 544>
>>> CR0(0x80000011)
<CR0.PE|ET|PG: 2147483665>

Data and lookups only; :meth:`kvmiso.kvm.Kvm.cpu_has` asks KVM_GET_SUPPORTED_CPUID.
"""

from __future__ import annotations

import enum
from typing import Iterable, NamedTuple

from . import abi
from .cpuid import CpuidEntry


class Feature(NamedTuple):
    """Where CPUID reports a feature: leaf ``function``, subleaf ``index``, register, bit."""

    function: int
    index: int
    reg: str
    bit: int


def _leaf(function: int, index: int, reg: str, bits: str) -> dict[str, Feature]:
    return {name: Feature(function, index, reg, int(bit)) for name, bit in (w.split(":") for w in bits.split())}


X86_FEATURES: dict[str, Feature] = {
    **_leaf(0x1, 0, "ecx", "XMM3:0 PCLMULQDQ:1 MWAIT:3 VMX:5 SMX:6 SSSE3:9 FMA:12 CX16:13 PDCM:15 PCID:17 "
            "XMM4_1:19 XMM4_2:20 X2APIC:21 MOVBE:22 POPCNT:23 TSC_DEADLINE_TIMER:24 AES:25 XSAVE:26 "
            "OSXSAVE:27 AVX:28 F16C:29 RDRAND:30 HYPERVISOR:31"),
    **_leaf(0x1, 0, "edx", "FPU:0 VME:1 DE:2 PSE:3 TSC:4 MSR:5 PAE:6 MCE:7 CX8:8 APIC:9 SEP:11 MTRR:12 PGE:13 "
            "MCA:14 CMOV:15 PAT:16 PSE36:17 CLFLUSH:19 MMX:23 FXSR:24 XMM:25 XMM2:26 HT:28"),
    **_leaf(0x7, 0, "ebx", "FSGSBASE:0 TSC_ADJUST:1 SGX:2 BMI1:3 HLE:4 AVX2:5 SMEP:7 BMI2:8 ERMS:9 INVPCID:10 "
            "RTM:11 MPX:14 AVX512F:16 RDSEED:18 ADX:19 SMAP:20 CLFLUSHOPT:23 CLWB:24 SHA_NI:29"),
    **_leaf(0x7, 0, "ecx", "UMIP:2 PKU:3 OSPKE:4 WAITPKG:5 SHSTK:7 LA57:16 RDPID:22 SGX_LC:30 PKS:31"),
    **_leaf(0x7, 0, "edx", "IBT:20 AMX_TILE:24 SPEC_CTRL:26 FLUSH_L1D:28 ARCH_CAPABILITIES:29"),
    **_leaf(0xD, 1, "eax", "XSAVEOPT:0 XSAVEC:1 XGETBV1:2 XSAVES:3 XFD:4"),
    **_leaf(0x80000001, 0, "ecx", "LAHF_LM:0 SVM:2 ABM:5"),
    **_leaf(0x80000001, 0, "edx", "SYSCALL:11 NX:20 FXSR_OPT:25 GBPAGES:26 RDTSCP:27 LM:29"),
    **_leaf(0x80000007, 0, "edx", "INVTSC:8"),
    **_leaf(0x8000000A, 0, "edx", "NPT:0 LBRV:1 NRIPS:3"),
    **_leaf(0x80000021, 0, "eax", "AUTOIBRS:8"),
    **_leaf(0x40000001, 0, "eax", "KVM_CLOCKSOURCE:0 KVM_NOP_IO_DELAY:1 KVM_CLOCKSOURCE2:3 KVM_ASYNC_PF:4 "
            "KVM_STEAL_TIME:5 KVM_PV_EOI:6 KVM_PV_UNHALT:7 KVM_PV_TLB_FLUSH:9 KVM_PV_SEND_IPI:11"),
}


def feature(name: str) -> Feature:
    """The table's entry for ``name``, with or without ``X86_FEATURE_``, any case; KeyError
    naming the known ones otherwise."""
    key = name.upper().removeprefix("X86_FEATURE_")
    try:
        return X86_FEATURES[key]
    except KeyError:
        raise KeyError(f"no X86_FEATURE_{key} in kvmiso's table; it knows {', '.join(sorted(X86_FEATURES))}") from None


def cpuid_entry(entries: Iterable[CpuidEntry], function: int, index: int = 0) -> CpuidEntry | None:
    """The entry for leaf ``function`` and subleaf ``index`` (the subleaf counts only where the
    entry's KVM_CPUID_FLAG_SIGNIFCANT_INDEX says it does), or None."""
    for e in entries:
        if e.function == function and (e.index == index or not e.flags & abi.KVM_CPUID_FLAG_SIGNIFCANT_INDEX):
            return e
    return None


def cpu_has(entries: Iterable[CpuidEntry], name: str) -> bool:
    """Whether CPUID ``entries`` (supported, or a vCPU's) offer feature ``name`` ("XSAVE")."""
    f = feature(name)
    e = cpuid_entry(entries, f.function, f.index)
    return e is not None and bool(getattr(e, f.reg) >> f.bit & 1)


def _bits(bits: str) -> dict[str, int]:
    return {name: 1 << int(bit) for name, bit in (w.split(":") for w in bits.split())}


CR0 = enum.IntFlag("CR0", _bits("PE:0 MP:1 EM:2 TS:3 ET:4 NE:5 WP:16 AM:18 NW:29 CD:30 PG:31"))
CR0.__doc__ = "CR0's bits (``kvm_sregs.cr0``)."
CR4 = enum.IntFlag("CR4", _bits("VME:0 PVI:1 TSD:2 DE:3 PSE:4 PAE:5 MCE:6 PGE:7 PCE:8 OSFXSR:9 OSXMMEXCPT:10 "
                                "UMIP:11 LA57:12 VMXE:13 SMXE:14 FSGSBASE:16 PCIDE:17 OSXSAVE:18 SMEP:20 SMAP:21 "
                                "PKE:22 CET:23"))
CR4.__doc__ = "CR4's bits (``kvm_sregs.cr4``)."
EFER = enum.IntFlag("EFER", _bits("SCE:0 LME:8 LMA:10 NX:11 SVME:12 LMSLE:13 FFXSR:14 AUTOIBRS:21"))
EFER.__doc__ = "The IA32_EFER MSR's bits (``kvm_sregs.efer``)."
