"""The ioctl layer: nothing above this package touches a KVM file descriptor or ioctl number."""

from .errors import KvmError, KvmUnavailable
from .cpuid import CpuidEntry
from .system import Kvm
from .vcpu import Translation, Vcpu
from .vcpu_state import VcpuState
from .vm import MemorySlot, MsrFilterRange, Vm

__all__ = ["CpuidEntry", "Kvm", "KvmError", "KvmUnavailable", "MemorySlot", "MsrFilterRange",
           "Translation", "Vcpu", "VcpuState", "Vm"]
