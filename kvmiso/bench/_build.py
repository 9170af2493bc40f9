"""cffi build glue for the compiled KVM_RUN loop (runloop.c and runloop.h -> kvmiso.bench._runloop).

setup.py names ``ffibuilder`` in ``cffi_modules``, so ``pip install`` compiles the loop. It
includes kvm/_build.py's FFI: the loop is handed kvmiso.kvm's own ``struct kvmiso_vcpu``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
KVM_DIR = HERE.parent / "kvm"


def _kvm_build():
    """kvm/_build.py, loaded by path: importing the package would need what is being built."""
    spec = importlib.util.spec_from_file_location("kvmiso_kvm_build", KVM_DIR / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


ffibuilder = FFI()
ffibuilder.include(_kvm_build().ffibuilder)
ffibuilder.cdef((HERE / "runloop.h").read_text())
ffibuilder.set_source("kvmiso.bench._runloop", '#include "runloop.c"', include_dirs=[str(HERE), str(KVM_DIR)],
                      depends=[str(HERE / "runloop.c"), str(HERE / "runloop.h"), str(KVM_DIR / "_vcpu.h")],
                      extra_compile_args=["-O2", "-std=gnu11"])

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parents[1]), verbose=True)
