"""The compiled KVM_RUN loop (runloop.c, built by cffi at install) and its Python twin.

Both time the same thing the same way: CLOCK_MONOTONIC right before and right after each call,
so ``t_end - t_start`` is one round trip, and ``t_start[i + 1] - t_start[i]`` is one whole
iteration including the exit check and the answer. The Python twin goes through
:meth:`kvmiso.kvm.Vcpu.run` (with decoding), so the difference is the harness's own cost.

>>> from kvmiso import Machine
>>> with Machine("bench_out", kvm=kvm) as bm:
...     t = compiled_loop(bm.vcpu, 1000, expect="io", port=bm.image.symbols["PORT_BENCH"])
>>> t.n, len(t.latencies()), min(t.latencies()) > 0    # ns per round trip, one each
(1000, 1000, True)
"""

from __future__ import annotations

import array
import contextlib
import functools
import threading
import time
from dataclasses import dataclass
from typing import Any

from ..guest.deadline import deadline
from ..host import Host
from ..interrupt import Interrupted, kicked_by_interrupts
from ..kvm import Kvm, KvmError, Vcpu
from ..kvm.abi import capability_number
from ..kvm.exits import HltExit, IntrExit, IoExit, MmioExit, exit_name

EXPECT = {"io": IoExit, "mmio": MmioExit, "hlt": HltExit}  # what a KVM_RUN of the loop must end with


class LoopError(RuntimeError):
    """The loop stopped early: an ioctl error, an exit of another kind, or a timeout.

    ``timings`` holds what was measured before it stopped; ``reason`` the exit reason number
    for an unexpected exit."""

    def __init__(self, message: str, timings: "Timings", reason: int | None = None) -> None:
        super().__init__(message)
        self.timings = timings
        self.reason = reason


class NotBuilt(RuntimeError):
    """The compiled loop is missing: kvmiso was not installed with pip (which compiles it)."""


def _lib() -> tuple[Any, Any]:
    """The cffi module's ``ffi`` and ``lib``, or NotBuilt saying how to build them."""
    try:
        from ._runloop import ffi, lib
    except ImportError as e:
        raise NotBuilt(
            f"the compiled KVM_RUN loop (kvmiso.bench._runloop) is not built ({e}): install kvmiso "
            "with `pip install -e .`, which compiles kvmiso/bench/runloop.c and needs a C compiler"
        ) from None
    return ffi, lib


@dataclass
class Timings:
    """Per-iteration timestamps: CLOCK_MONOTONIC ns, and TSC values where the TSC is usable."""

    t_start: array.array
    t_end: array.array
    c_start: array.array | None = None
    c_end: array.array | None = None
    answered: int = 0

    @property
    def n(self) -> int:
        """Iterations timed."""
        return len(self.t_start)

    def latencies(self) -> list[int]:
        """ns per round trip: each call alone."""
        return [b - a for a, b in zip(self.t_start, self.t_end)]

    def periods(self) -> list[int]:
        """ns per whole iteration, start to next start (the loop's own work included)."""
        ts = self.t_start
        return [ts[i + 1] - ts[i] for i in range(len(ts) - 1)]

    def cycles(self) -> list[int] | None:
        """TSC ticks per round trip, where the TSC was read."""
        if self.c_start is None:
            return None
        return [b - a for a, b in zip(self.c_start, self.c_end)]

    def tsc_hz(self) -> float | None:
        """TSC ticks per second over the whole loop (a calibration, no MSR needed)."""
        if self.c_start is None or self.n < 2 or self.t_end[-1] == self.t_start[0]:
            return None
        return (self.c_end[-1] - self.c_start[0]) * 1e9 / (self.t_end[-1] - self.t_start[0])


def tsc_usable(host: Host | None = None) -> bool:
    """RDTSC is timed where the C loop has it and the TSC ticks at a constant, non-stop rate."""
    _, lib = _lib()
    flags = (host or _host()).cpu_flags
    return bool(lib.kvmiso_have_tsc()) and {"constant_tsc", "nonstop_tsc"} <= flags


@functools.lru_cache(maxsize=1)
def _host() -> Host:
    return Host.read()  # once: every loop asks whether the TSC is usable


def _run(n: int, op: int, *, vcpu: Vcpu | None = None, call: Any = None, name: str = "KVM_RUN",
         expect: str | None = None, port: int | None = None, reply: int = 0,
         zap: tuple[int, int] | None = None, timeout: float = 10.0, eintr_ok: bool = False) -> Timings:
    """``n`` iterations of ``op`` in C: KVM_RUN on ``vcpu`` (checking each exit), the ioctl
    ``call`` (a ``struct kvmiso_ioctl *`` from kvmiso.kvm, called ``name``), or a bare syscall."""
    ffi, lib = _lib()
    use_tsc = tsc_usable()
    bufs = [ffi.new("uint64_t[]", n) for _ in range(4 if use_tsc else 2)]
    loop = ffi.new("struct kvmiso_loop *", dict(
        op=op, call=call if call is not None else ffi.NULL, vcpu=vcpu.c_vcpu if vcpu is not None else ffi.NULL,
        expect_reason=EXPECT[expect].reason if expect else -1, expect_port=-1 if port is None else port,
        reply=reply, zap=ffi.cast("unsigned char *", zap[0]) if zap else ffi.NULL,
        zap_len=zap[1] if zap else 0, use_tsc=int(use_tsc), eintr_ok=int(eintr_ok)))
    res = ffi.new("struct kvmiso_result *")
    done = 0

    def timings() -> Timings:
        def arr(b: Any) -> array.array:
            a = array.array("Q")
            a.frombytes(ffi.buffer(b, 8 * done))
            return a
        return Timings(arr(bufs[0]), arr(bufs[1]), *(arr(b) for b in bufs[2:]), answered=answered)

    answered = base = 0
    dl_context = deadline(vcpu, timeout) if vcpu is not None else contextlib.nullcontext()
    # a Ctrl-C that lands between two KVM_RUNs of the C loop must still stop it (see interrupt)
    ident = threading.get_ident()
    kicked = kicked_by_interrupts(lambda: vcpu.kick(ident)) if vcpu is not None else contextlib.nullcontext()
    try:
        with dl_context as dl, kicked:
            while done < n:
                # a signal stops the C loop; it resumes where it stopped. base + res.done is
                # right even when a KeyboardInterrupt surfaces just after the call returns.
                base = done
                status = lib.kvmiso_loop(loop, n - base, bufs[0] + base, bufs[1] + base,
                                         *((bufs[2] + base, bufs[3] + base) if use_tsc else (ffi.NULL, ffi.NULL)), res)
                done = base + res.done
                answered += res.answered
                if status == lib.KVMISO_OK:
                    break
                if status == lib.KVMISO_INTERRUPTED:
                    # a kick (immediate_exit set) stops the loop, as it stops Vcpu.run(); any
                    # other signal only interrupted one KVM_RUN (a SIGINT surfaces right here)
                    if vcpu is not None and vcpu.immediate_exit:
                        if dl.expired:
                            raise LoopError(f"no exit within {timeout:g} s: the guest never left KVM_RUN", timings())
                        raise LoopError("stopped: the vCPU was kicked", timings())
                    continue
                if status == lib.KVMISO_ERRNO:
                    raise LoopError(str(KvmError(name, res.err)), timings())
                raise LoopError(f"unexpected exit {exit_name(res.reason)}", timings(), res.reason)
    except KeyboardInterrupt as e:
        done = base + res.done
        raise Interrupted.of(e, timings()) from None  # what was measured goes up with it
    return timings()


def compiled_loop(vcpu: Vcpu, n: int, expect: str, port: int | None = None, reply: int = 0,
                  zap: tuple[int, int] | None = None, timeout: float = 10.0) -> Timings:
    """KVM_RUN ``n`` times on ``vcpu`` in C; every exit must be ``expect`` (io, mmio, hlt), an
    IO exit on ``port``; INs and MMIO reads get ``reply``. ``zap`` (host address, length) is
    dropped with MADV_DONTNEED before each KVM_RUN. Raises LoopError if the guest does
    anything else or stays inside KVM_RUN past ``timeout`` seconds."""
    return _run(n, _lib()[1].KVMISO_OP_RUN, vcpu=vcpu, expect=expect, port=port, reply=reply,
                zap=zap, timeout=timeout)


def null_ioctl_loop(kvm: Kvm, n: int) -> Timings:
    """The ioctl floor: KVM_CHECK_EXTENSION(KVM_CAP_USER_MEMORY) on the system fd, in C."""
    return _run(n, _lib()[1].KVMISO_OP_IOCTL, call=kvm.check_extension_call("USER_MEMORY"),
                name="KVM_CHECK_EXTENSION")


def syscall_loop(n: int) -> Timings:
    """The syscall floor: getppid(2) through syscall(2), in C."""
    return _run(n, _lib()[1].KVMISO_OP_SYSCALL)


def immediate_exit_loop(vcpu: Vcpu, n: int) -> Timings:
    """The KVM_RUN floor: KVM_RUN with ``immediate_exit`` set returns EINTR before entering the
    guest (vcpu_load, the signal/immediate-exit check, vcpu_put), in C."""
    vcpu.immediate_exit = True
    try:
        return _run(n, _lib()[1].KVMISO_OP_RUN, vcpu=vcpu, eintr_ok=True)
    finally:
        vcpu.immediate_exit = False


def python_immediate_exit_loop(vcpu: Vcpu, n: int) -> Timings:
    """The same floor through ``Vcpu.run()``, which returns IntrExit for it."""
    t_start, t_end = array.array("Q", bytes(8 * n)), array.array("Q", bytes(8 * n))
    clock, run = time.monotonic_ns, vcpu.run
    vcpu.immediate_exit = True
    try:
        for i in range(n):
            t0 = clock()
            e = run()
            t_end[i] = clock()
            t_start[i] = t0
            if e.__class__ is not IntrExit:
                raise LoopError(f"unexpected exit {e!r}", Timings(t_start[:i], t_end[:i]), e.reason)
    finally:
        vcpu.immediate_exit = False
    return Timings(t_start, t_end)


_PY_EXPECT = {"io": IoExit, "mmio": MmioExit, "hlt": HltExit}


def python_loop(vcpu: Vcpu, n: int, expect: str, port: int | None = None, reply: int = 0,
                timeout: float = 10.0) -> Timings:
    """The same loop through the Python API: ``Vcpu.run()`` (KVM_RUN and decoding) per
    iteration, the check and the answer done on the decoded Exit."""
    cls = _PY_EXPECT[expect]
    t_start, t_end = array.array("Q", bytes(8 * n)), array.array("Q", bytes(8 * n))
    clock, run = time.monotonic_ns, vcpu.run
    answered = i = 0
    try:
        ident = threading.get_ident()
        with deadline(vcpu, timeout) as dl, kicked_by_interrupts(lambda: vcpu.kick(ident)):
            for i in range(n):
                t0 = clock()
                e = run()
                t1 = clock()
                if e.__class__ is not cls or (port is not None and e.port != port):
                    if isinstance(e, IntrExit) and dl.expired:
                        raise LoopError(f"no exit within {timeout:g} s: the guest never left KVM_RUN",
                                        Timings(t_start[:i], t_end[:i]))
                    raise LoopError(f"unexpected exit {e!r}", Timings(t_start[:i], t_end[:i]), e.reason)
                if cls is IoExit and e.is_in or cls is MmioExit and not e.is_write:
                    e.reply(reply)
                    answered += 1
                t_start[i], t_end[i] = t0, t1
            i = n
    except KeyboardInterrupt as e:
        raise Interrupted.of(e, Timings(t_start[:i], t_end[:i], answered=answered)) from None
    return Timings(t_start, t_end, answered=answered)


def python_null_ioctl_loop(kvm: Kvm, n: int) -> Timings:
    """The ioctl floor through the Python API: ``Kvm.check_extension`` per iteration, given the
    capability's number (looked up once, as the compiled loop's ioctl holds it)."""
    t_start, t_end = array.array("Q", bytes(8 * n)), array.array("Q", bytes(8 * n))
    clock, check = time.monotonic_ns, kvm.check_extension
    cap = capability_number("USER_MEMORY")
    for i in range(n):
        t0 = clock()
        check(cap)
        t_end[i] = clock()
        t_start[i] = t0
    return Timings(t_start, t_end)
