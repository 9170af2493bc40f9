"""Vcpu: a KVM vCPU fd, its kvm_run page, and ``run() -> Exit``."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import threading
import time
from dataclasses import dataclass
from typing import Iterator

from . import abi
from ._libc import get_errno, ioctl, mmap, munmap, run_ioctl
from .errors import KvmError
from .cpuid import CpuidEntry, get_cpuid, set_cpuid
from .exits import Exit, IntrExit, decode
from .stats import Stats

# The signal that kicks a vCPU thread out of KVM_RUN. A real-time signal, so it never collides
# with SIGINT/SIGTERM handling; its handler does nothing, the interrupted ioctl is the point.
KICK_SIGNAL = signal.SIGRTMIN
_KVM_RUN = abi.KVM_RUN  # a global, not an attribute lookup, on the KVM_RUN hot path


def install_kick_handler() -> None:
    """Install the no-op KICK_SIGNAL handler (main thread only; idempotent)."""
    if signal.getsignal(KICK_SIGNAL) in (signal.SIG_DFL, None, signal.SIG_IGN):
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError(
                "kvmiso needs a handler for its vCPU kick signal: create the first Machine or call "
                "kvmiso.kvm.vcpu.install_kick_handler() from the main thread"
            )
        signal.signal(KICK_SIGNAL, lambda signum, frame: None)


@dataclass(frozen=True)
class Translation:
    """KVM_TRANSLATE's answer for one guest-virtual address.

    On x86 only ``valid`` and ``physical_address`` carry information: the kernel always sets
    ``writeable=1`` and ``usermode=0`` (kvm_arch_vcpu_ioctl_translate), whatever the PTEs say.
    """

    linear_address: int
    physical_address: int
    valid: bool
    writeable: bool
    usermode: bool


class Vcpu:
    """A vCPU. Created by :meth:`Vm.create_vcpu`; closed with its VM.

    >>> exit = vcpu.run()
    >>> exit
    IoExit(port=233, size=1, count=13, is_in=False)
    """

    def __init__(self, vm, vcpu_id: int, fd: int) -> None:
        self.vm = vm
        self.id = vcpu_id
        self.fd = fd
        self._run_size = vm.kvm.vcpu_mmap_size
        try:
            self._run_addr = mmap(self._run_size, fd, shared=True)
        except BaseException:
            os.close(fd)
            raise
        self.kvm_run = abi.kvm_run.from_address(self._run_addr)
        self.page = memoryview((ctypes.c_char * self._run_size).from_address(self._run_addr)).cast("B")
        self._kick_lock = threading.Lock()
        self._watchdog: _Watchdog | None = None

    def close(self) -> None:
        if self.fd < 0:
            return
        if self._watchdog is not None:
            self._watchdog.stop()
            self._watchdog = None
        self.page.release()
        del self.kvm_run
        munmap(self._run_addr, self._run_size)
        os.close(self.fd)
        self.fd = -1

    @property
    def page_address(self) -> int:
        """Where this process maps the vCPU's ``struct kvm_run`` (mmap of the vCPU fd at offset 0)."""
        return self._run_addr

    # --- running ------------------------------------------------------------------------------

    def run(self) -> Exit:
        """KVM_RUN once and decode the exit.

        A signal that interrupts KVM_RUN is retried, unless ``immediate_exit`` is set (a kick):
        then the result is ``IntrExit()``.
        """
        fd, page = self.fd, self.page
        while True:
            if run_ioctl(fd, _KVM_RUN, None) == 0:
                return decode(page)
            err = get_errno()
            if err != errno.EINTR:
                raise KvmError("KVM_RUN", err, _run_errno_hint(err))
            if page[1]:  # immediate_exit: somebody asked this vCPU to stop
                return IntrExit()

    @property
    def immediate_exit(self) -> bool:
        return bool(self.kvm_run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.kvm_run.immediate_exit = int(value)

    def kick(self, thread_ident: int) -> None:
        """Stop the KVM_RUN running on ``thread_ident``: set immediate_exit, then signal it."""
        with self._kick_lock:
            if self.fd >= 0:
                self.kvm_run.immediate_exit = 1
                with contextlib.suppress(ProcessLookupError):
                    signal.pthread_kill(thread_ident, KICK_SIGNAL)

    @contextlib.contextmanager
    def deadline(self, seconds: float) -> Iterator["Deadline"]:
        """Kick this vCPU out of KVM_RUN once ``seconds`` have passed. ``run()`` then returns
        ``IntrExit()`` and ``Deadline.expired`` is true.

        One watchdog thread per vCPU serves every deadline and ends with the vCPU, so a run
        starts no thread (a fuzzer makes thousands of runs)."""
        install_kick_handler()
        dl = Deadline(seconds, time.monotonic() + seconds)
        if self._watchdog is None:
            self._watchdog = _Watchdog(self)
        self._watchdog.arm(dl, threading.get_ident())
        try:
            yield dl
        finally:
            self._watchdog.disarm()
            if self.fd >= 0:
                self.kvm_run.immediate_exit = 0

    # --- state --------------------------------------------------------------------------------

    def get_regs(self) -> abi.kvm_regs:
        regs = abi.kvm_regs()
        ioctl(self.fd, abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        ioctl(self.fd, abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        sregs = abi.kvm_sregs()
        ioctl(self.fd, abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        ioctl(self.fd, abi.KVM_SET_SREGS, sregs, lambda e: "the segment/control register state is invalid" if e == errno.EINVAL else "")

    def get_fpu(self) -> abi.kvm_fpu:
        fpu = abi.kvm_fpu()
        ioctl(self.fd, abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        ioctl(self.fd, abi.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS; raises KvmError naming the first MSR KVM would not read."""
        buf = _msrs_buffer({i: 0 for i in indices})
        n = ioctl(self.fd, abi.KVM_GET_MSRS, buf)
        if n != len(indices):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {indices[n]:#x} cannot be read")
        return {e.index: e.data for e in buf.entries}

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS; raises KvmError naming the first MSR KVM refused."""
        buf = _msrs_buffer(values)
        n = ioctl(self.fd, abi.KVM_SET_MSRS, buf)
        if n != len(values):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {list(values)[n]:#x} was refused")

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """KVM_SET_CPUID2: the CPUID leaves this vCPU's guest sees."""
        set_cpuid(self.fd, entries)

    def get_cpuid2(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID leaves this vCPU's guest sees."""
        return get_cpuid(self.fd, abi.KVM_GET_CPUID2)

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        ev = abi.kvm_vcpu_events()
        ioctl(self.fd, abi.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        ioctl(self.fd, abi.KVM_SET_VCPU_EVENTS, events)

    def translate(self, linear_address: int) -> Translation:
        """KVM_TRANSLATE: walk the guest's page tables for one guest-virtual address."""
        t = abi.kvm_translation(linear_address=linear_address)
        ioctl(self.fd, abi.KVM_TRANSLATE, t)
        return Translation(t.linear_address, t.physical_address, bool(t.valid), bool(t.writeable), bool(t.usermode))

    def set_guest_debug(self, enable: bool = True, single_step: bool = False,
                        debugreg: tuple[int, ...] = ()) -> None:
        """KVM_SET_GUEST_DEBUG; ``single_step`` gives one DebugExit per guest instruction."""
        dbg = abi.kvm_guest_debug()
        dbg.control = (abi.KVM_GUESTDBG_ENABLE if enable else 0) | (
            abi.KVM_GUESTDBG_SINGLESTEP if single_step else 0
        )
        if debugreg:
            dbg.control |= abi.KVM_GUESTDBG_USE_HW_BP
            for i, v in enumerate(debugreg):
                dbg.arch.debugreg[i] = v
        ioctl(self.fd, abi.KVM_SET_GUEST_DEBUG, dbg)

    def get_stats_fd(self) -> int:
        """KVM_GET_STATS_FD for this vCPU; the caller closes it."""
        return ioctl(self.fd, abi.KVM_GET_STATS_FD)

    def stats(self) -> Stats:
        """The vCPU's binary stats (KVM_GET_STATS_FD, parsed; a context manager)."""
        return Stats(self.get_stats_fd())


@dataclass
class Deadline:
    seconds: float
    at: float
    expired: bool = False


class _Watchdog:
    """The thread that kicks one vCPU out of KVM_RUN when its armed deadline passes."""

    def __init__(self, vcpu: Vcpu) -> None:
        self._vcpu = vcpu
        self._cond = threading.Condition()
        self._armed: tuple[Deadline, int] | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=f"kvmiso-watchdog-vcpu{vcpu.id}", daemon=True)
        # Started with SIGINT/SIGTERM blocked (a thread inherits the mask), so the kernel
        # delivers them to a thread that can act on them, never to this one.
        old = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        try:
            self._thread.start()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, old)

    def arm(self, deadline: Deadline, thread_ident: int) -> None:
        with self._cond:
            self._armed = (deadline, thread_ident)
            self._cond.notify()

    def disarm(self) -> None:
        """After this returns no kick is under way or will come (kicks happen under the lock)."""
        with self._cond:
            self._armed = None

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        self._thread.join()

    def _loop(self) -> None:
        with self._cond:
            while not self._stopping:
                if self._armed is None:
                    self._cond.wait()
                    continue
                deadline, ident = self._armed
                left = deadline.at - time.monotonic()
                if left > 0:
                    self._cond.wait(left)
                    continue
                deadline.expired = True
                self._vcpu.kick(ident)
                self._armed = None


def _msrs_buffer(values: dict[int, int]) -> ctypes.Structure:
    class _Msrs(ctypes.Structure):
        _fields_ = [("hdr", abi.kvm_msrs), ("entries", abi.kvm_msr_entry * len(values))]

    buf = _Msrs()
    buf.hdr.nmsrs = len(values)
    for e, (index, data) in zip(buf.entries, values.items()):
        e.index, e.data = index, data
    return buf


def _run_errno_hint(err: int) -> str:
    if err == errno.EFAULT:
        return "KVM could not access guest memory or the vCPU state"
    if err == errno.EINVAL:
        return "the vCPU state is invalid for entry"
    if err == errno.ENOEXEC:
        return "the vCPU cannot run: registers never set, or guest state invalid"
    return ""
