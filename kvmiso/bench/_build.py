"""cffi build glue for the compiled KVM_RUN loop (runloop.c -> kvmiso.bench._runloop).

setup.py names ``ffibuilder`` in ``cffi_modules``, so ``pip install`` compiles the loop; a host
without a C compiler gets an error that names the compiler it looked for.
"""

from __future__ import annotations

import os
import shlex
import shutil
import sysconfig
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent

CDEF = """
struct kvmiso_layout {
    uint32_t exit_reason, immediate_exit;
    uint32_t io_direction, io_size, io_port, io_count, io_data_offset;
    uint32_t mmio_data, mmio_len, mmio_is_write;
    uint32_t exit_io, exit_mmio, io_in;
};
struct kvmiso_loop {
    int op;
    int fd;
    unsigned long request;
    unsigned long arg;
    unsigned char *run;
    int32_t expect_reason;
    int32_t expect_port;
    uint64_t reply;
    unsigned char *zap;
    size_t zap_len;
    int use_tsc;
    int eintr_ok;
};
struct kvmiso_result {
    uint64_t done;
    int status;
    int err;
    uint32_t reason;
    uint64_t answered;
};
int kvmiso_loop(const struct kvmiso_loop *l, const struct kvmiso_layout *lay, uint64_t n,
                uint64_t *t_start, uint64_t *t_end, uint64_t *c_start, uint64_t *c_end,
                struct kvmiso_result *res);
int kvmiso_have_tsc(void);
"""


def compiler() -> str:
    """The C compiler Python's build tools will run (``$CC``, else the one Python was built with)."""
    return os.environ.get("CC") or sysconfig.get_config_var("CC") or "cc"


def check_compiler() -> None:
    cc = shlex.split(compiler())[0]
    if shutil.which(cc) is None:
        raise SystemExit(
            f"kvmiso: building the compiled KVM_RUN loop (kvmiso/bench/runloop.c) needs a C compiler, "
            f"and {cc!r} was not found on PATH: install one (apt-get install gcc) or set CC"
        )


ffibuilder = FFI()
ffibuilder.cdef(CDEF)
ffibuilder.set_source("kvmiso.bench._runloop", (HERE / "runloop.c").read_text(),
                      extra_compile_args=["-O2", "-std=gnu11"])
check_compiler()

if __name__ == "__main__":
    ffibuilder.compile(tmpdir=str(HERE.parents[1]), verbose=True)
