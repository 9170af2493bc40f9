"""kvmiso: drive Linux KVM through raw ioctls, see every exit, model kvm_mm, measure KVM_RUN.

>>> from kvmiso import Machine
>>> with Machine("hello", mode="long") as m:
...     print(m.run(timeout=5).console_text, end="")
Hello from a kvmiso guest!
"""

from .guest import GuestAssertionError, GuestError, GuestTimeout, Machine, Outcome, RunResult, Source, Sync, build
from .kvm import Kvm, KvmError, KvmUnavailable, Vcpu, Vm

__all__ = ["GuestAssertionError", "GuestError", "GuestTimeout", "Kvm", "KvmError", "KvmUnavailable", "Machine",
           "Outcome", "RunResult", "Source", "Sync", "Vcpu", "Vm", "build"]
