"""The ioctl layer: nothing above this package touches a KVM file descriptor or ioctl number."""

from ._fd import close_all
from .errors import KvmError, KvmUnavailable, VcpuBusy, VcpuClosed
from .cpuid import CpuidEntry
from .system import Kvm
from .vcpu import Translation, Vcpu
from .vm import MemorySlot, Vm

__all__ = ["CpuidEntry", "Kvm", "KvmError", "KvmUnavailable", "MemorySlot",
           "Translation", "Vcpu", "VcpuBusy", "VcpuClosed", "Vm", "close_all"]
