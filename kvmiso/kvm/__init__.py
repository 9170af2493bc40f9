"""The ioctl layer: nothing above this package touches a KVM file descriptor or ioctl number."""

from ._fd import close_all
from .errors import KickSignalBlocked, KvmError, KvmUnavailable, VcpuBusy, VcpuClosed, VmDead
from .kick import KICK_SIGNAL
from .cpuid import CpuidEntry
from .system import Kvm
from .vcpu import Translation, Vcpu
from .vcpu_state import VcpuState
from .vm import MemorySlot, MsrFilterRange, Vm

__all__ = ["CpuidEntry", "KICK_SIGNAL", "KickSignalBlocked", "Kvm", "KvmError", "KvmUnavailable", "MemorySlot",
           "MsrFilterRange", "Translation", "Vcpu", "VcpuBusy", "VcpuClosed", "VcpuState", "Vm", "VmDead", "close_all"]
