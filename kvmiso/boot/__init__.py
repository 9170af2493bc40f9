"""`kvmiso boot`: a kernel in QEMU with the host's filesystem, running one command there.

For a real kvm_amd on any machine (QEMU's TCG offers SVM) and for kernels under development:

>>> status = boot(["kvmiso", "probe", "--json"], kernel=debian_kernel())   # doctest: +SKIP
"""

from .booterror import BootError
from .kernel import Kernel, debian_kernel, user_kernel
from .run import BootResult, boot

__all__ = ["BootError", "BootResult", "Kernel", "boot", "debian_kernel", "user_kernel"]
