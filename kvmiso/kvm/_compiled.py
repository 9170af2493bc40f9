"""kvmiso.kvm._vcpu (kvm/_vcpu.c, compiled at install), or an ImportError saying how to build it."""

from __future__ import annotations

try:
    from ._vcpu import ffi, lib
except ImportError as e:  # a source tree nobody installed: say how to build it
    raise ImportError(f"kvmiso's compiled vCPU module (kvmiso.kvm._vcpu) is not built ({e}): install kvmiso "
                      "with `pip install -e .`, which compiles kvmiso/kvm/_vcpu.c and needs a C compiler") from None

__all__ = ["ffi", "lib"]
