"""Vcpu: a KVM vCPU fd, its kvm_run page, and ``run() -> Exit``.

KVM_RUN goes through kvmiso.kvm._vcpu (kvm/_vcpu.c), compiled at install like the bench loop;
so does the kick: the signal that stops a KVM_RUN, and the timer that sends it (:meth:`Vcpu.kick`,
:meth:`Vcpu.kick_after`).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import math
import os
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Sequence

from . import abi
from ._compiled import ffi, lib
from ._fd import FdOwner, fd_cell, raise_if_failed
from .cpuid import CpuidEntry, get_cpuid, set_cpuid
from .errors import KvmError, VcpuBusy
from .exitdecode import decode
from .kick import KICK_SIGNAL, check_kick_reaches, install_kick_handler
from .exits import DATALESS, Exit, IntrExit
from .runpage import RunPage
from .stats import Stats
from .vcpu_state import VcpuStateIoctls

if TYPE_CHECKING:  # a Vm makes its Vcpus: a runtime import would be a cycle
    from .vm import Vm

_MAX_NS = (1 << 63) - 1
_IMMEDIATE_EXIT = abi.kvm_run.immediate_exit.offset
_vcpu_run = lib.kvmiso_vcpu_run  # a global, not an attribute lookup, on the KVM_RUN hot path
_KEY_PACKED = min(lib.KVMISO_KEY_IO, lib.KVMISO_KEY_MMIO)  # keys from here up carry a whole exit
_SAME_EXIT = lib.KVMISO_SAME_EXIT
_BUSY = lib.KVMISO_RUN_BUSY  # another thread runs the vCPU
_MAX_KEYS = 4096  # different I/O and MMIO exits kept per vCPU
_INTR = DATALESS[IntrExit.reason]
# Exits whose instruction KVM completes at the next KVM_RUN, before it looks at immediate_exit
# (x86.c, kvm_arch_vcpu_ioctl_run: complete_userspace_io first), and how many KVM_RUNs
# complete_pending() allows: a rep string I/O re-enters the guest (where immediate_exit stops
# it) at least every 1024 iterations.
_COMPLETED_AT_NEXT_RUN = frozenset((abi.KVM_EXIT_IO, abi.KVM_EXIT_MMIO, abi.KVM_EXIT_HYPERCALL,
                                    abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR))
_MAX_COMPLETION_RUNS = 1024
_dataless = DATALESS.get  # bound once: a method lookup per exit costs an allocation


def _run_layout() -> dict[str, int]:
    """struct kvmiso_run_layout (kvm/_vcpu.h): what the compiled code reads in a kvm_run page."""
    u, run = abi.kvm_run.u.offset, abi.kvm_run
    io, mmio = u + abi.kvm_run_exit.io.offset, u + abi.kvm_run_exit.mmio.offset
    return dict(
        exit_reason=run.exit_reason.offset, immediate_exit=run.immediate_exit.offset,
        io_direction=io + abi.kvm_run_io.direction.offset, io_size=io + abi.kvm_run_io.size.offset,
        io_port=io + abi.kvm_run_io.port.offset, io_count=io + abi.kvm_run_io.count.offset,
        io_data_offset=io + abi.kvm_run_io.data_offset.offset,
        mmio_phys_addr=mmio + abi.kvm_run_mmio.phys_addr.offset, mmio_data=mmio + abi.kvm_run_mmio.data.offset,
        mmio_len=mmio + abi.kvm_run_mmio.len.offset, mmio_is_write=mmio + abi.kvm_run_mmio.is_write.offset,
        exit_io=abi.KVM_EXIT_IO, exit_mmio=abi.KVM_EXIT_MMIO, exit_intr=abi.KVM_EXIT_INTR, io_in=abi.KVM_EXIT_IO_IN,
    )


_RUN_LAYOUT = _run_layout()


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


class Vcpu(FdOwner, VcpuStateIoctls):
    """A vCPU. Created by :meth:`Vm.create_vcpu` and closed with its VM; a context manager too.
    Its state ioctls beyond registers and MSRs (debug registers, XSAVE, save/load of the whole)
    are :class:`~kvmiso.kvm.vcpu_state.VcpuStateIoctls`'.

    >>> exit = vcpu.run()                  # the hello payload's first console byte
    >>> exit
    IoExit(port=233, size=1, count=1, is_in=False)
    >>> bytes(exit.data)
    b'H'
    """

    _warn_unclosed = False  # its VM owns it: an unclosed VM's finalizer warns for both

    def __init__(self, vm: Vm, vcpu_id: int) -> None:
        """KVM_CREATE_VCPU ``vcpu_id`` in ``vm`` (:meth:`Vm.create_vcpu` is the way to one)."""
        self.vm = vm
        self.id = vcpu_id
        size = vm.kvm.vcpu_mmap_size
        # the C struct owns the vCPU fd and the kvm_run mapping: kvmiso_vcpu_release frees both,
        # at close() or when the struct is freed
        self._c = ffi.gc(ffi.new("struct kvmiso_vcpu *", {
            "run": {"fd": -1, "request": abi.KVM_RUN, "arg": 0}, "page_size": size, "lay": _RUN_LAYOUT}),
            lib.kvmiso_vcpu_release)
        vm.make_fd(abi.KVM_CREATE_VCPU, vcpu_id, ffi.addressof(self._c, "run", "fd"))
        install_kick_handler()  # before any kick or timer can send the signal
        raise_if_failed(lib.kvmiso_vcpu_map(self._c), "mmap of the kvm_run page")
        self._run_addr = int(ffi.cast("uintptr_t", self._c.page))
        self.kvm_run = abi.kvm_run.from_address(self._run_addr)
        self.page = memoryview((ctypes.c_char * size).from_address(self._run_addr)).cast("B")
        # what this vCPU's exits check before they touch the page (holding the C struct, it keeps
        # the page mapped for them until close() says it is gone)
        self._mapped = RunPage(f"vCPU {vcpu_id}", self._c)
        self._exits: dict[int, Exit] = {}  # packed exit key -> the exit (see run())
        self._last: Exit | None = None  # the exit of the last packed key
        self._fd = ffi.addressof(self._c, "run", "fd")  # last: close() may run from here on

    def _release(self) -> None:
        """Delete the kick timer, unmap kvm_run and close the vCPU fd."""
        self._mapped.mapped = False  # first: from here on no exit touches the page
        self._exits.clear()  # the cached exits view the page
        self._last = None
        self.page.release()
        self.__dict__.pop("kvm_run", None)  # a ctypes struct at the page's address
        # one C call, which waits for a kick() under way: none will find the page mapped after it
        raise_if_failed(lib.kvmiso_vcpu_release(self._c), "close")

    @property
    def page_address(self) -> int:
        """Where this process maps the vCPU's ``struct kvm_run`` (mmap of the vCPU fd at offset 0)."""
        return self._run_addr

    # --- running ------------------------------------------------------------------------------

    def run(self) -> Exit:
        """KVM_RUN once and decode the exit.

        A signal that interrupts KVM_RUN is retried, unless ``immediate_exit`` is set (a kick):
        then the result is ``IntrExit()``. Equal I/O and MMIO exits come back as the same frozen
        object: the compiled call packs every field the decoder reads into one key, and the exit
        built for a key serves it again (its data views the kvm_run page, as every exit's does).
        A KVM_RUN that fails with EFAULT and leaves KVM_EXIT_MEMORY_FAULT is ``MemoryFaultExit``.
        """
        c = self._c
        while True:
            key = _vcpu_run(c)
            if key == _SAME_EXIT:  # the commonest case: the exit the last packed key gave
                return self._last
            if key >= _KEY_PACKED:
                exit = self._exits.get(key) or self._decode(key)
                self._last = exit
                return exit
            if key >= 0:  # an exit reason: only dataless exits are the same object every time
                return _dataless(key) or decode(self.page, self._mapped)
            if key != -errno.EINTR:
                if key == _BUSY:
                    raise self._busy()
                if key == -errno.EFAULT and self.kvm_run.exit_reason == abi.KVM_EXIT_MEMORY_FAULT:
                    return decode(self.page, self._mapped)  # KVM's report of the fault, as kvm-ioctls returns it
                raise self.vm.diagnose(KvmError("KVM_RUN", -key, _run_errno_hint(-key)))
            if self.page[_IMMEDIATE_EXIT]:  # somebody asked this vCPU to stop
                return _INTR

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Keep this vCPU to the calling thread for the block: :meth:`run` from any other thread
        raises VcpuBusy meanwhile, as it does while one thread is inside :meth:`run`.
        ``Machine.run`` holds its vCPU for a whole run."""
        took = lib.kvmiso_vcpu_hold(self._c)
        if took < 0:
            raise self._busy()
        try:
            yield
        finally:
            if took:
                lib.kvmiso_vcpu_unhold(self._c)

    @property
    def runner(self) -> int | None:
        """The ident (``threading.get_ident()``) of the thread running or holding this vCPU."""
        return self._c.runner or None

    def _busy(self) -> VcpuBusy:
        ident = self.runner
        name = next((t.name for t in threading.enumerate() if t.ident == ident), "another thread")
        return VcpuBusy(f"vCPU {self.id} is already running in thread {name!r} (ident {ident}): one thread "
                        "at a time runs a vCPU (KVM would split its exits between them)")

    def _decode(self, key: int) -> Exit:
        """The exit of a packed key seen for the first time, kept for the next time (the cache
        starts again when a guest makes too many different ones)."""
        if len(self._exits) >= _MAX_KEYS:
            self._exits.clear()
        exit = self._exits[key] = decode(self.page, self._mapped)
        return exit

    @property
    def immediate_exit(self) -> bool:
        """kvm_run.immediate_exit: set, KVM_RUN returns EINTR before entering the guest."""
        return bool(self.kvm_run.immediate_exit)

    @immediate_exit.setter
    def immediate_exit(self, value: bool) -> None:
        self.kvm_run.immediate_exit = int(value)

    def complete_pending(self, answer: Callable[[Exit], None]) -> None:
        """Let KVM finish the instruction behind the last exit, if that exit leaves one (I/O,
        MMIO, MSR, hypercall), without running any further guest instruction: KVM_RUN with
        immediate_exit set until it returns EINTR, ``answer`` filling in each exit it returns
        meanwhile. Before the vCPU's registers or memory are replaced: KVM completes the
        instruction at the next KVM_RUN whatever they are then (a rep ins completed against new
        registers went on exiting to userspace, and immediate_exit was never read). Costs one
        KVM_RUN (~6 us on kvm_pvm) after such an exit, nothing after the others."""
        if self.kvm_run.exit_reason not in _COMPLETED_AT_NEXT_RUN:
            return  # the last KVM_RUN ended without one (or a KVM_RUN since completed it)
        self.kvm_run.immediate_exit = 1
        try:
            for _ in range(_MAX_COMPLETION_RUNS):
                exit = self.run()
                if isinstance(exit, IntrExit):
                    return
                answer(exit)
        finally:
            self.kvm_run.immediate_exit = 0
        raise KvmError("KVM_RUN", errno.EBUSY, f"vCPU {self.id} was still completing an instruction after "
                       f"{_MAX_COMPLETION_RUNS} KVM_RUNs with immediate_exit set")

    def kick(self, thread_ident: int) -> None:
        """Stop the KVM_RUN running on ``thread_ident``: set immediate_exit, then signal it
        (nothing once the vCPU is closed, or if the thread has ended). KickSignalBlocked if that
        thread blocks the kick signal."""
        thread = next((t for t in threading.enumerate() if t.ident == thread_ident), None)
        if thread is not None:  # a thread Python does not know of cannot be checked
            check_kick_reaches(thread)
        r = lib.kvmiso_vcpu_kick(self._c, thread_ident, KICK_SIGNAL)
        if r < 0 and r != -errno.ESRCH:
            raise OSError(-r, f"cannot kick vCPU {self.id}'s thread: {os.strerror(-r)}")

    def kick_after(self, seconds: float) -> None:
        """Kick this vCPU out of the calling thread's KVM_RUN once ``seconds`` have passed: a
        one-shot CLOCK_MONOTONIC timer (timer_create(2), SIGEV_THREAD_ID) that replaces an armed
        one. When it fires, ``immediate_exit`` is set and :meth:`run` returns ``IntrExit()``,
        whether KVM_RUN was under way or about to start. :attr:`timer_kicked` says it fired.
        KickSignalBlocked if the calling thread blocks the kick signal (see :mod:`.kick`)."""
        if not (math.isfinite(seconds) and seconds >= 0):
            raise ValueError(f"a kick needs a finite, non-negative number of seconds, not {seconds!r}")
        check_kick_reaches(threading.current_thread())
        r = lib.kvmiso_kick_after(self._c, KICK_SIGNAL, threading.get_native_id(), min(int(seconds * 1e9), _MAX_NS))
        if r < 0:
            raise OSError(-r, f"cannot arm vCPU {self.id}'s kick timer: {os.strerror(-r)}")

    def cancel_kick(self) -> None:
        """Disarm the timer :meth:`kick_after` armed (from the thread that armed it: a kick it sent
        has been handled when this returns)."""
        r = lib.kvmiso_kick_cancel(self._c)
        if r < 0:
            raise OSError(-r, f"cannot disarm vCPU {self.id}'s kick timer: {os.strerror(-r)}")

    @property
    def timer_kicked(self) -> bool:
        """Whether the timer armed by the last :meth:`kick_after` has fired."""
        return bool(self._c.timer_fired)

    @property
    def c_vcpu(self) -> Any:
        """This vCPU as compiled code sees it: a ``struct kvmiso_vcpu *`` (kvm/_vcpu.h) with the
        KVM_RUN ioctl, the kvm_run mapping and its layout. Valid until :meth:`close`."""
        return self._c

    # --- state --------------------------------------------------------------------------------

    def get_regs(self) -> abi.kvm_regs:
        """KVM_GET_REGS: the general-purpose registers, rip and rflags."""
        regs = abi.kvm_regs()
        self.ioctl(abi.KVM_GET_REGS, regs)
        return regs

    def set_regs(self, regs: abi.kvm_regs) -> None:
        """KVM_SET_REGS."""
        self.ioctl(abi.KVM_SET_REGS, regs)

    def get_sregs(self) -> abi.kvm_sregs:
        """KVM_GET_SREGS: segments, descriptor tables, control registers, EFER, APIC base."""
        sregs = abi.kvm_sregs()
        self.ioctl(abi.KVM_GET_SREGS, sregs)
        return sregs

    def set_sregs(self, sregs: abi.kvm_sregs) -> None:
        """KVM_SET_SREGS; KvmError saying the state is invalid where KVM says EINVAL."""
        self.ioctl(abi.KVM_SET_SREGS, sregs, lambda e: "the segment/control register state is invalid" if e == errno.EINVAL else "")

    def get_fpu(self) -> abi.kvm_fpu:
        """KVM_GET_FPU: x87 and SSE registers."""
        fpu = abi.kvm_fpu()
        self.ioctl(abi.KVM_GET_FPU, fpu)
        return fpu

    def set_fpu(self, fpu: abi.kvm_fpu) -> None:
        """KVM_SET_FPU."""
        self.ioctl(abi.KVM_SET_FPU, fpu)

    def get_msrs(self, indices: list[int]) -> dict[int, int]:
        """KVM_GET_MSRS; raises KvmError naming the first MSR KVM would not read."""
        buf = _msrs_buffer({i: 0 for i in indices})
        n = self.ioctl(abi.KVM_GET_MSRS, buf)
        if n != len(indices):
            raise KvmError("KVM_GET_MSRS", errno.EINVAL, f"MSR {indices[n]:#x} cannot be read")
        return {e.index: e.data for e in buf.entries}

    def set_msrs(self, values: dict[int, int]) -> None:
        """KVM_SET_MSRS; raises KvmError naming the first MSR KVM refused."""
        buf = _msrs_buffer(values)
        n = self.ioctl(abi.KVM_SET_MSRS, buf)
        if n != len(values):
            raise KvmError("KVM_SET_MSRS", errno.EINVAL, f"MSR {list(values)[n]:#x} was refused")

    def set_cpuid2(self, entries: list[CpuidEntry]) -> None:
        """KVM_SET_CPUID2: the CPUID leaves this vCPU's guest sees."""
        set_cpuid(self.ioctl, entries)

    def get_cpuid2(self) -> list[CpuidEntry]:
        """KVM_GET_CPUID2: the CPUID leaves this vCPU's guest sees."""
        return get_cpuid(self.ioctl, abi.KVM_GET_CPUID2)

    def get_vcpu_events(self) -> abi.kvm_vcpu_events:
        """KVM_GET_VCPU_EVENTS: pending or injected exceptions, interrupts, NMIs and SMIs."""
        ev = abi.kvm_vcpu_events()
        self.ioctl(abi.KVM_GET_VCPU_EVENTS, ev)
        return ev

    def set_vcpu_events(self, events: abi.kvm_vcpu_events) -> None:
        """KVM_SET_VCPU_EVENTS."""
        self.ioctl(abi.KVM_SET_VCPU_EVENTS, events)

    def translate(self, linear_address: int) -> Translation:
        """KVM_TRANSLATE: walk the guest's page tables for one guest-virtual address."""
        t = abi.kvm_translation(linear_address=linear_address)
        self.ioctl(abi.KVM_TRANSLATE, t)
        return Translation(t.linear_address, t.physical_address, bool(t.valid), bool(t.writeable), bool(t.usermode))

    def set_guest_debug(self, enable: bool = True, single_step: bool = False, debugreg: Sequence[int] = (), *,
                        sw_bp: bool = False, hw_bp: bool | None = None, block_irq: bool = False,
                        inject_db: bool = False, inject_bp: bool = False) -> None:
        """KVM_SET_GUEST_DEBUG (KVM_GUESTDBG_*): ``single_step`` gives one DebugExit per guest
        instruction; ``sw_bp`` a DebugExit (#BP) at each INT3; ``hw_bp`` (on when ``debugreg`` is
        given) the breakpoints of ``debugreg`` (DR0-DR3, then DR6 and DR7 at [6] and [7]);
        ``block_irq`` keeps interrupts from the guest while it single-steps; ``inject_db`` and
        ``inject_bp`` give the guest a #DB or #BP at the next KVM_RUN. ``enable=False`` stops it all.

        >>> vcpu.set_guest_debug(single_step=True)
        >>> vcpu.run()
        DebugExit(exception=1, pc=..., dr6=..., dr7=...)
        """
        bits = ((enable, abi.KVM_GUESTDBG_ENABLE), (single_step, abi.KVM_GUESTDBG_SINGLESTEP),
                (sw_bp, abi.KVM_GUESTDBG_USE_SW_BP), (bool(debugreg) if hw_bp is None else hw_bp, abi.KVM_GUESTDBG_USE_HW_BP),
                (block_irq, abi.KVM_GUESTDBG_BLOCKIRQ), (inject_db, abi.KVM_GUESTDBG_INJECT_DB),
                (inject_bp, abi.KVM_GUESTDBG_INJECT_BP))
        dbg = abi.kvm_guest_debug(control=sum(bit for on, bit in bits if on))
        dbg.arch.debugreg[:len(debugreg)] = list(debugreg)
        self.ioctl(abi.KVM_SET_GUEST_DEBUG, dbg)

    def get_stats_fd(self) -> int:
        """KVM_GET_STATS_FD for this vCPU; the caller closes it."""
        return self.ioctl(abi.KVM_GET_STATS_FD)

    def stats(self) -> Stats:
        """The vCPU's binary stats (KVM_GET_STATS_FD, parsed; a context manager)."""
        fd = fd_cell()
        self.vm.make_fd(abi.KVM_GET_STATS_FD, 0, fd, self.fd)
        return Stats(fd)


def _msrs_buffer(values: dict[int, int]) -> ctypes.Structure:
    buf = abi.with_entries(abi.kvm_msrs, abi.kvm_msr_entry, len(values))()
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
