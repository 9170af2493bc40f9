"""cffi build glue for kvmiso.kvm._vcpu (kvm/_vcpu.c with the shared header kvm/_vcpu.h).

setup.py names ``ffibuilder`` in ``cffi_modules``, so ``pip install`` compiles it; a host
without a C compiler gets an error that names the compiler it looked for. bench/_build.py
includes this FFI, so the compiled bench loop and Vcpu share one ``struct kvmiso_vcpu``.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sysconfig
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "_vcpu.h"
C_ONLY = "C only ---"  # marks the line in _vcpu.h below which cffi's cdef cannot read


def header_cdef() -> str:
    """The part of kvm/_vcpu.h that declares the shared structs (cffi's cdef cannot read the
    preprocessor lines and inline functions below it)."""
    text = HEADER.read_text()
    cut = text.index(C_ONLY)
    return text[: text.rindex("\n", 0, cut)]


def compiler() -> str:
    """The C compiler Python's build tools will run (``$CC``, else the one Python was built with)."""
    return os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"


def check_compiler() -> None:
    """Stop the build with one line naming the missing compiler."""
    cc = shlex.split(compiler())[0]
    if shutil.which(cc) is None:
        raise SystemExit(
            f"kvmiso: building its compiled parts (kvmiso/kvm/_vcpu.c, kvmiso/bench/runloop.c) needs a C "
            f"compiler, and {cc!r} was not found on PATH: install one (apt-get install gcc) or set CC"
        )


ffibuilder = FFI()
ffibuilder.cdef(header_cdef() + """
long long kvmiso_exit_key(const struct kvmiso_vcpu *v);
int kvmiso_vcpu_hold(struct kvmiso_vcpu *v);
void kvmiso_vcpu_unhold(struct kvmiso_vcpu *v);
long long kvmiso_vcpu_run(struct kvmiso_vcpu *v);
int kvmiso_vcpu_kick(struct kvmiso_vcpu *v, unsigned long thread, int signo);
int kvmiso_kick_install(int signo);
int kvmiso_kick_after(struct kvmiso_vcpu *v, int signo, int tid, int64_t ns);
int kvmiso_kick_cancel(struct kvmiso_vcpu *v);
int kvmiso_open(const char *path, int flags, int *into);
int kvmiso_ioctl_fd(int fd, unsigned long request, unsigned long arg, int *into);
int kvmiso_eventfd(int flags, int *into);
int kvmiso_map(struct kvmiso_mapping *m, int prot, int flags, int fd);
int kvmiso_vcpu_map(struct kvmiso_vcpu *v);
int kvmiso_close(int *fd);
int kvmiso_unmap(struct kvmiso_mapping *m);
int kvmiso_vcpu_release(struct kvmiso_vcpu *v);
""")
ffibuilder.set_source("kvmiso.kvm._vcpu", '#include "_vcpu.c"', include_dirs=[str(HERE)],
                      depends=[str(HERE / "_vcpu.c"), str(HEADER)], extra_compile_args=["-O2", "-std=gnu11"])
check_compiler()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parents[1]), verbose=True)
