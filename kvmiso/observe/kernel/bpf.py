"""Reading kernel memory through bpf(2): the real objects of a VM, where /proc/kcore is absent.

Two tiny programs of type BPF_PROG_TYPE_RAW_TRACEPOINT are loaded and never attached: each read
is one ``BPF_PROG_TEST_RUN``, which runs the program once, synchronously, in the calling thread
(``current`` is the caller), and the program copies what it read into an array map. So nothing
is ever attached to the kernel, nothing outlives kvmiso's file descriptors (SIGKILL included),
and the only kernel features needed are the ones every 5.10+ kernel with BPF has:
``bpf_probe_read_kernel``, ``bpf_get_current_task`` and ``bpf_per_cpu_ptr`` (per-CPU addresses
from a BTF variable id). This works on 6.18 kernels without kprobes or ftrace and on Debian's
6.1 alike. Root (CAP_BPF + CAP_PERFMON) is required; the environment variable
``KVMISO_HIDE_BPF=1`` makes kvmiso behave as if BPF were absent, to test that path.

Why not bpftrace or libbpf: a subprocess would hold attached probes that a killed kvmiso leaves
behind, and both need a toolchain or a package per kernel; two programs of 26 instructions,
assembled here, need neither.

>>> with KernelMemory() as mem:
...     task = mem.current_task()
...     mem.read(task, 16).hex()
'...'
"""

from __future__ import annotations

import ctypes
import errno
import os
import struct
from dataclasses import dataclass

from ...kvm._libc import libc as _libc

_NR_BPF = 321  # x86-64
_libc.syscall.restype = ctypes.c_long

# bpf(2) commands, program and map types (include/uapi/linux/bpf.h)
BPF_MAP_CREATE, BPF_MAP_LOOKUP_ELEM, BPF_PROG_LOAD, BPF_PROG_TEST_RUN, BPF_OBJ_GET_INFO_BY_FD = 0, 1, 5, 10, 15
BPF_MAP_TYPE_ARRAY = 2
BPF_PROG_TYPE_RAW_TRACEPOINT = 17
BPF_PSEUDO_MAP_FD, BPF_PSEUDO_BTF_ID = 1, 3
# helper ids
_MAP_LOOKUP_ELEM, _GET_CURRENT_TASK, _PROBE_READ_KERNEL, _PER_CPU_PTR = 1, 35, 113, 153

CHUNK = 4096  # bytes one test run reads
_HEADER = 16  # map value: current task, return code, then the bytes read
HIDE_ENV = "KVMISO_HIDE_BPF"


class BpfUnavailable(RuntimeError):
    """BPF cannot read kernel memory here; the message says why (not root, no BPF, hidden)."""


class KernelReadError(OSError):
    """bpf_probe_read_kernel refused an address (not mapped, or a user address)."""

    def __init__(self, address: int, size: int, err: int) -> None:
        super().__init__(err, f"cannot read {size} bytes of kernel memory at {address:#x}: {os.strerror(err)}")
        self.address = address


def _bpf(cmd: int, attr: bytes) -> tuple[int, bytes]:
    buf = ctypes.create_string_buffer(attr, 128)
    r = _libc.syscall(_NR_BPF, cmd, buf, 128)
    if r < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return r, buf.raw


# --- a very small eBPF assembler (Documentation/bpf/standardization/instruction-set.rst) -------

def _insn(op: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", op, (src << 4) | dst, off, imm)


def _ld_imm64(dst: int, imm: int, src: int = 0) -> bytes:
    return _insn(0x18, dst, src, 0, imm & 0xFFFFFFFF) + _insn(0, 0, 0, 0, imm >> 32)


def _mov(dst: int, src: int) -> bytes:
    return _insn(0xBF, dst, src)


def _mov_imm(dst: int, imm: int) -> bytes:
    return _insn(0xB7, dst, 0, 0, imm)


def _add_imm(dst: int, imm: int) -> bytes:
    return _insn(0x07, dst, 0, 0, imm)


def _ldx64(dst: int, src: int, off: int) -> bytes:
    return _insn(0x79, dst, src, off)


def _stx64(dst: int, src: int, off: int) -> bytes:
    return _insn(0x7B, dst, src, off)


def _call(helper: int) -> bytes:
    return _insn(0x85, 0, 0, 0, helper)


_EXIT = _insn(0x95)


def _value_pointer(map_fd: int) -> bytes:
    """r7 = &map[0] (r6 keeps the context); returns 1 if the lookup fails."""
    return b"".join([
        _mov(6, 1),
        _insn(0x62, 10, 0, -4, 0),  # *(u32 *)(r10 - 4) = 0: the key
        _ld_imm64(1, map_fd, BPF_PSEUDO_MAP_FD),
        _mov(2, 10), _add_imm(2, -4),
        _call(_MAP_LOOKUP_ELEM),
        _insn(0x55, 0, 0, 2, 0),  # if r0 != 0 goto +2
        _mov_imm(0, 1), _EXIT,
        _mov(7, 0),
    ])


def _reader_program(map_fd: int) -> bytes:
    """ctx[0] = address, ctx[1] = length (<= CHUNK): map[0] = (current, rc, bytes)."""
    return b"".join([
        _value_pointer(map_fd),
        _call(_GET_CURRENT_TASK), _stx64(7, 0, 0),
        _ldx64(2, 6, 8),
        _insn(0x25, 2, 0, 2, CHUNK),  # if r2 > CHUNK goto +2 (the verifier needs the bound)
        _mov(1, 7), _insn(0x05, 0, 0, 2, 0),  # r1 = value; goto +2
        _mov_imm(0, 2), _EXIT,
        _add_imm(1, _HEADER),
        _ldx64(3, 6, 0),
        _call(_PROBE_READ_KERNEL),
        _stx64(7, 0, 8),
        _mov_imm(0, 0), _EXIT,
    ])


def _per_cpu_program(map_fd: int, var_btf_id: int) -> bytes:
    """ctx[0] = cpu: map[0] = bpf_per_cpu_ptr(&var, cpu) (0 for a CPU that does not exist)."""
    return b"".join([
        _value_pointer(map_fd),
        _ld_imm64(1, var_btf_id, BPF_PSEUDO_BTF_ID),
        _ldx64(2, 6, 0),
        _call(_PER_CPU_PTR),
        _stx64(7, 0, 0),
        _mov_imm(0, 0), _EXIT,
    ])


def load_program(code: bytes, prog_type: int, name: str) -> int:
    """The fd of eBPF program ``code`` of ``prog_type``, loaded (GPL: bpf_probe_read_kernel and
    the stack helpers are GPL-only); BpfUnavailable with the verifier's last line if refused."""
    insns = ctypes.create_string_buffer(code, len(code))
    lic = ctypes.create_string_buffer(b"GPL")
    log = ctypes.create_string_buffer(16384)
    attr = struct.pack("<IIQQIIQII16s", prog_type, len(code) // 8, ctypes.addressof(insns),
                       ctypes.addressof(lic), 1, len(log), ctypes.addressof(log), 0, 0, name.encode())
    try:
        fd, _ = _bpf(BPF_PROG_LOAD, attr)
    except OSError as e:
        verifier = log.value.decode(errors="replace").strip().splitlines()
        raise BpfUnavailable(f"the kernel refused kvmiso's BPF program {name}: {e.strerror}"
                             + (f" ({verifier[-1]})" if verifier else "")) from None
    return fd


@dataclass(frozen=True)
class PerCpuVar:
    """A per-CPU variable as vmlinux BTF names it: its VAR type id and its offset in
    ``.data..percpu`` (the section is linked at 0 on x86-64 SMP, so the offset is its address)."""

    name: str
    btf_id: int
    offset: int


class KernelMemory:
    """Kernel memory read through two unattached BPF programs (a context manager).

    :raises BpfUnavailable: not root, BPF disabled, or ``KVMISO_HIDE_BPF=1``.
    """

    def __init__(self) -> None:
        if os.environ.get(HIDE_ENV) == "1":
            raise BpfUnavailable(f"BPF hidden by {HIDE_ENV}=1")
        if os.geteuid() != 0:
            raise BpfUnavailable("reading kernel objects through BPF needs root (CAP_BPF and CAP_PERFMON)")
        self._fds: list[int] = []
        self._value = ctypes.create_string_buffer(_HEADER + CHUNK)
        self._key = ctypes.c_uint32(0)
        self._per_cpu: dict[str, int] = {}
        try:
            self._map = self._create_map()
            self._reader = self._load(_reader_program(self._map), "kvmiso_read")
        except BaseException:
            self.close()
            raise

    def _create_map(self) -> int:
        try:
            fd, _ = _bpf(BPF_MAP_CREATE, struct.pack("<IIIII", BPF_MAP_TYPE_ARRAY, 4, _HEADER + CHUNK, 1, 0))
        except OSError as e:
            raise BpfUnavailable(f"bpf(BPF_MAP_CREATE) failed: {e.strerror} (is CONFIG_BPF_SYSCALL set?)") from None
        self._fds.append(fd)
        return fd

    def _load(self, code: bytes, name: str) -> int:
        fd = load_program(code, BPF_PROG_TYPE_RAW_TRACEPOINT, name)
        self._fds.append(fd)
        return fd

    def close(self) -> None:
        """Close the programs and the map (nothing else is held)."""
        while self._fds:  # each fd off the list before its close: an interrupt never leaves one to close twice
            os.close(self._fds.pop())

    def __enter__(self) -> "KernelMemory":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _run(self, prog: int, *args: int) -> bytes:
        ctx = (ctypes.c_uint64 * len(args))(*args)
        # BPF_PROG_TEST_RUN: prog_fd, retval, data_size_in/out, data_in/out, repeat, duration,
        # ctx_size_in/out, ctx_in/out, flags, cpu (raw_tp takes only ctx_in)
        _bpf(BPF_PROG_TEST_RUN, struct.pack("<IIIIQQIIIIQQII", prog, 0, 0, 0, 0, 0, 0, 0, ctypes.sizeof(ctx), 0,
                                            ctypes.addressof(ctx), 0, 0, 0))
        _bpf(BPF_MAP_LOOKUP_ELEM, struct.pack("<IIQQQ", self._map, 0, ctypes.addressof(self._key),
                                              ctypes.addressof(self._value), 0))
        return self._value.raw

    def current_task(self) -> int:
        """``current``: the calling thread's ``struct task_struct *``."""
        return struct.unpack_from("<Q", self._run(self._reader, 0, 0))[0]

    def read(self, address: int, size: int) -> bytes:
        """``size`` bytes of kernel memory at ``address`` (bpf_probe_read_kernel).

        :raises KernelReadError: where the kernel refuses the address.
        """
        out = bytearray()
        while len(out) < size:
            n = min(CHUNK, size - len(out))
            raw = self._run(self._reader, address + len(out), n)
            rc = struct.unpack_from("<q", raw, 8)[0]
            if rc < 0:
                raise KernelReadError(address + len(out), n, -rc if -rc in errno.errorcode else errno.EFAULT)
            out += raw[_HEADER:_HEADER + n]
        return bytes(out)

    def u64(self, address: int) -> int:
        """The 64-bit little-endian word at ``address``."""
        return struct.unpack("<Q", self.read(address, 8))[0]

    def string(self, address: int, limit: int = 64) -> str:
        """The NUL-terminated string at ``address`` (at most ``limit`` bytes)."""
        return self.read(address, limit).split(b"\0", 1)[0].decode(errors="replace")

    def per_cpu_address(self, var: PerCpuVar, cpu: int) -> int:
        """``per_cpu_ptr(&var, cpu)`` as the kernel computes it (0 for a CPU that does not exist)."""
        prog = self._per_cpu.get(var.name)
        if prog is None:
            prog = self._per_cpu[var.name] = self._load(_per_cpu_program(self._map, var.btf_id), "kvmiso_percpu")
        return struct.unpack_from("<Q", self._run(prog, cpu))[0]


__all__ = ["BpfUnavailable", "CHUNK", "HIDE_ENV", "KernelMemory", "KernelReadError", "PerCpuVar", "load_program"]
