"""Machine: one call from "this payload, this mode" to a runnable VM, and a run loop that
serves the ucall convention, answers I/O and MMIO reads, and never hangs.

>>> with Machine("hello", mode="long") as m:
...     result = m.run(timeout=5)
>>> result.outcome, result.console
(<Outcome.DONE: 'done'>, b'Hello from a kvmiso guest!\\n')
"""

from __future__ import annotations

import ctypes
import threading
import time
import warnings
from typing import Any, Callable, Iterator

from ..host import vendor_module
from ..interrupt import Interrupted, kicked_by_interrupts
from ..kvm import Kvm, Vcpu, Vm, abi, close_all
from ..kvm.stats import Stats
from ..kvm.exits import DebugExit, Exit, IntrExit, IoExit, MmioExit, RdmsrExit, WrmsrExit, detach
from . import modes
from .build import BITS, Image, Source, build, default_mode
from .deadline import GuestTimeout, deadline
from .result import GuestError, Outcome, RunResult
from .sites import guest_reader
from .snapshot import RESET_MSRS, VcpuState
from .stopped import describe_stop, run_ended
from .threads import run_in_threads
from .ucall import (PORT_CONSOLE, PORT_UCALL, PORT_UCALL_OUT, Done, Fail, GuestAssertion, GuestException, MalformedUcall, Printf,
                    Report, Sync, decode_ucall)

DEFAULT_MEMORY = 2 << 20
VCPU_STACK = 0x8000  # each vCPU: a kernel and a user stack of half this size
MAX_CONSOLE = 64 << 10  # console bytes kept per run; the rest is counted, not stored
MAX_EXITS = 64 << 10  # exits recorded per run (~0.4 KiB each); the rest are counted, not stored


class Machine:
    """A VM with memory, ``vcpus`` vCPUs and ``payload`` loaded for ``mode`` at ``cpl``.

    ``payload`` is a name from guests/, a path, a :class:`~kvmiso.guest.build.Source` or an
    Image. What must exist before the vCPUs do is made by ``irqchip=True`` (KVM_CREATE_IRQCHIP:
    an in-kernel local APIC, where HLT waits for an interrupt instead of exiting) and by
    ``setup_vm(vm)``, called with the VM, its memory and the image in place.
    Owns everything it creates (the Kvm handle too unless one is passed in); a context manager.
    """

    def __init__(self, payload: str | Image | Source, mode: str | None = None, cpl: int = 0,
                 memory: int = DEFAULT_MEMORY, vcpus: int = 1, kvm: Kvm | None = None,
                 irqchip: bool = False, setup_vm: Callable[[Vm], None] | None = None) -> None:
        if isinstance(payload, Image):
            self.image = payload
        else:
            self.image = build(payload, mode or default_mode(payload))
        self.mode = self.image.mode
        self.cpl = cpl
        self.bits = BITS[self.mode]
        if memory < 0x200000 or memory > modes.IDENTITY_MAP_GIB << 30:
            raise ValueError(f"guest memory must be between 2 MiB and {modes.IDENTITY_MAP_GIB} GiB, not {memory:#x}")
        self.memory = memory
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm = None
        self._stats: list = []
        self._pristine: list[VcpuState] = []
        self._boots: list[modes.Boot] = []  # what each vCPU's setup loaded, for reset() to load again
        self.console = bytearray()  # the last MAX_CONSOLE bytes of every run's console (a test's failure shows it)
        try:
            self.vm = self.kvm.create_vm()
            self.vendor = vendor_module()
            if self.vendor == "kvm_intel":
                self.vm.set_tss_addr(0xFFFBD000)  # VMX real mode needs it, as QEMU places it
            self.vm.add_memory(0, memory)
            self.vm.write(self.image.load_address, self.image.code)
            if irqchip:
                self.vm.create_irqchip()
            if setup_vm is not None:
                setup_vm(self.vm)
            cpuid = self.kvm.get_supported_cpuid()
            saved = set(self.kvm.get_msr_index_list())
            reset_msrs = [i for i in RESET_MSRS if i in saved]
            for i in range(vcpus):
                vcpu = self.vm.create_vcpu(i)
                vcpu.set_cpuid2(cpuid)
                self._pristine.append(VcpuState.save(vcpu, reset_msrs))
                self._boots.append(self._setup(vcpu))
                self._stats.append(vcpu.stats())
        except BaseException:
            self.close()
            raise

    def _setup(self, vcpu: Vcpu, sregs: abi.kvm_sregs | None = None) -> modes.Boot:
        top = self.memory - vcpu.id * VCPU_STACK
        return modes.setup(self.vm, vcpu, self.image, self.mode, self.cpl,
                           stack_top=top - VCPU_STACK // 2, kernel_stack_top=top, sregs=sregs)

    def reset(self, image: Image | None = None) -> None:
        """Start over on the same VM: RAM zeroed, ``image`` (default: the current one) loaded,
        every vCPU as before its first run. Far cheaper than a new Machine (a fuzzer's thousands):

        >>> m.reset(build("portio", m.mode)); m.run().reports     # another payload, same VM
        [Report(tag=1, value=255), Report(tag=2, value=65535)]
        """
        if image is not None:
            if image.mode != self.mode:
                raise ValueError(f"this machine runs {self.mode} mode; image {image.name} is for {image.mode}")
            self._boots.clear()  # first: a reset that fails below must not leave the old image's boot state
            self.image = image
        for vcpu in self.vcpus:  # before RAM and registers change under the instruction
            vcpu.complete_pending(_default_answer)
        ram = self.vm.slots[0]
        ctypes.memset(ram.host_addr, 0, ram.size)
        self.vm.write(self.image.load_address, self.image.code)
        for i, (vcpu, state) in enumerate(zip(self.vcpus, self._pristine)):
            sregs = state.restore(vcpu)
            if i < len(self._boots):  # the same image: what setup built for it last time
                self._boots[i].load(self.vm, vcpu)
            else:
                self._boots.append(self._setup(vcpu, sregs))

    @property
    def vcpu(self) -> Vcpu:
        """vCPU 0."""
        return self.vm.vcpus[0]

    @property
    def vcpus(self) -> list[Vcpu]:
        """Every vCPU, in id order."""
        return self.vm.vcpus

    def close(self) -> None:
        """Close the stats fds, the VM (vCPUs, memory) and the Kvm handle if this Machine opened
        it (idempotent). A Ctrl-C meanwhile goes up once all of it is released."""
        closers = [st.close for st in self._stats]
        if self.vm is not None:
            closers.append(self.vm.close)
        if self._own_kvm:
            closers.append(self.kvm.close)
        close_all(*closers)
        self._stats.clear()
        self.vm = None  # last: until here the finalizer finishes what a Ctrl-C cut short

    def __enter__(self) -> "Machine":
        return self

    def __repr__(self) -> str:
        return f"<Machine {self.image.name} {self.mode} CPL{self.cpl}{' closed' if self.vm is None else ''}>"

    def __del__(self) -> None:
        # as an unclosed file does: warn; the fds, the mappings and KVM's thread go with the cells
        # that hold them (kvm._fd.FdOwner), which the finalizer must not touch: they may be freed
        if getattr(self, "vm", None) is not None:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)

    def __exit__(self, *exc) -> None:
        self.close()

    # --- running ------------------------------------------------------------------------------

    def run(self, timeout: float = 5.0, vcpu: int = 0,
            on_io: Callable[[IoExit], None] | None = None,
            on_mmio: Callable[[MmioExit], None] | None = None,
            on_msr: Callable[[RdmsrExit | WrmsrExit], None] | None = None,
            on_exit: Callable[[Exit], bool | None] | None = None,
            max_exits: int | None = None, record: bool = True, stop_at_sync: bool = False) -> RunResult:
        """Run vCPU ``vcpu`` until the guest reports DONE/FAIL, stops, or ``timeout`` passes.

        A GUEST_SYNC is recorded in ``result.syncs``; with ``stop_at_sync`` it ends the run (outcome
        ``sync``; the next run resumes the guest). A failed GUEST_ASSERT is outcome ``fail`` with
        ``result.assertion``, raised as an AssertionError by ``result.raise_for_guest()``.

        ``on_io``/``on_mmio`` see every I/O and MMIO exit outside the ucall ports and may
        ``reply()``; unanswered reads get all-ones. ``on_msr`` answers userspace MSR exits
        (unanswered ones inject #GP, as KVM does without the capability). ``on_exit`` sees every exit first and ends
        the run by returning True. Raises GuestTimeout (with ``.result``) past the deadline;
        Ctrl-C or SIGTERM raises :class:`kvmiso.interrupt.Interrupted` whose ``partial`` is this
        RunResult (outcome ``interrupted``, what the guest was doing in the detail). The vCPU is
        this thread's for the run: another thread's run of it raises :class:`kvmiso.kvm.VcpuBusy`.
        """
        v = self.vm.vcpus[vcpu]
        stats = self._stats[vcpu]
        before = stats.read_raw()
        res = RunResult(None, "", vcpu=vcpu)
        console = bytearray()
        t0 = time.perf_counter()
        ident = threading.get_ident()
        try:
            with v.held(), deadline(v, timeout) as dl, kicked_by_interrupts(lambda: v.kick(ident)):
                while res.outcome is None:
                    res.runs += 1  # before the call: an interrupted KVM_RUN counts too
                    exit = v.run()
                    if isinstance(exit, IntrExit):
                        res.outcome, res.detail = self._kicked(v, stats, before, res, dl.expired)
                        break
                    if on_exit is not None and on_exit(exit):
                        res.outcome, res.detail = Outcome.STOPPED, f"on_exit ended the run at {exit.name}"
                    else:
                        self._handle(v, exit, res, console, on_io, on_mmio, on_msr, stop_at_sync)
                    if record:
                        _record(res, exit)
                    if max_exits is not None and res.runs >= max_exits and res.outcome is None:
                        res.outcome, res.detail = Outcome.EXIT_LIMIT, f"stopped after {max_exits} exits"
        except KeyboardInterrupt as e:
            raise self._interrupted(e, v, stats, before, res) from None
        finally:
            self._end_run(res, console, stats, before, t0)
        if res.outcome is Outcome.TIMEOUT:
            raise GuestTimeout(timeout, res.detail, res.runs - 1, result=res)
        return res

    def _kicked(self, vcpu: Vcpu, stats: Stats, before: bytes, res: RunResult, expired: bool) -> tuple[Outcome, str]:
        """The outcome of a KVM_RUN a kick ended: the deadline's (where the guest was) or another's."""
        if expired:
            return Outcome.TIMEOUT, self._describe_stop(vcpu, stats, before, res.runs - 1, res.console_dropped)
        return Outcome.INTERRUPTED, "KVM_RUN was interrupted by a kick"

    def _interrupted(self, e: KeyboardInterrupt, vcpu: Vcpu, stats: Stats, before: bytes,
                     res: RunResult) -> Interrupted:
        """SIGINT or SIGTERM during a run: the Interrupted to raise, whose partial result (what
        the guest was doing, in its detail) the caller reports as incomplete."""
        stop = Interrupted.of(e, res)
        if res.outcome is None:
            res.outcome, res.detail = Outcome.INTERRUPTED, f"{stop.signal.name} arrived before the guest finished; " + (
                self._describe_stop(vcpu, stats, before, max(0, res.runs - 1), res.console_dropped))
        return stop

    def _end_run(self, res: RunResult, console: bytearray, stats: Stats, before: bytes, t0: float) -> None:
        """What every run keeps however it ended: its time, console output and statistics."""
        res.elapsed = time.perf_counter() - t0
        res.console = bytes(console)
        if console:
            self.console[:] = (self.console + console)[-MAX_CONSOLE:]
        res.stats = stats.delta(before, stats.read_raw())

    def run_all(self, timeout: float = 5.0, **kwargs: Any) -> list[RunResult]:
        """Run every vCPU at once, one thread each; returns one result per vCPU, in order.

        A vCPU that times out gives a result with outcome ``timeout`` rather than raising.
        Ctrl-C or SIGTERM stops every vCPU and raises Interrupted with these results as
        ``partial``.
        """
        results: list[RunResult | None] = [None] * len(self.vcpus)

        def work(i: int) -> None:
            try:
                results[i] = self.run(timeout, vcpu=i, **kwargs)
            except GuestTimeout as e:
                results[i] = e.result

        try:
            errors = [e for e in run_in_threads(work, self.vcpus, "kvmiso-vcpu") if e is not None]
        except KeyboardInterrupt as e:  # every vCPU's result, the kicked ones included
            raise Interrupted.of(e, results) from None
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]

    def run_until_sync(self, timeout: float = 5.0, vcpu: int = 0, **kwargs: Any) -> Sync:
        """Run until the guest's next GUEST_SYNC and return it; the guest waits there while the
        host acts, and the next run (this, :meth:`run`, :meth:`syncs`) resumes it. A guest that
        ends instead raises: GuestAssertionError for a failed GUEST_ASSERT, GuestError otherwise
        (DONE included: a sync was expected), GuestTimeout past ``timeout``."""
        __tracebackhide__ = True  # a guest's failure shows at the test's line
        res = self.run(timeout, vcpu=vcpu, stop_at_sync=True, **kwargs)
        if res.outcome is Outcome.SYNC:
            return res.sync  # type: ignore[return-value]
        res.raise_for_guest()
        raise GuestError(f"the guest finished without a GUEST_SYNC: {res.detail}", res)

    def syncs(self, timeout: float = 5.0, vcpu: int = 0, **kwargs: Any) -> Iterator[Sync]:
        """Each GUEST_SYNC in turn until the guest reports DONE, as selftests' ucall loop: the
        loop's body is the host's turn, the next iteration resumes the guest. A guest that fails
        raises as :meth:`run_until_sync` does; ``timeout`` is each stretch's."""
        __tracebackhide__ = True
        while True:
            res = self.run(timeout, vcpu=vcpu, stop_at_sync=True, **kwargs)
            if res.outcome is not Outcome.SYNC:
                res.raise_for_guest()
                return
            yield res.sync  # type: ignore[misc]

    def _handle(self, vcpu, exit: Exit, res: RunResult, console: bytearray, on_io, on_mmio, on_msr,
                stop_at_sync: bool = False) -> None:
        if isinstance(exit, IoExit):
            self._handle_io(vcpu, exit, res, console, on_io, stop_at_sync)
        elif isinstance(exit, MmioExit):
            _default_answer(exit)  # on_mmio may replace it
            if on_mmio is not None:
                on_mmio(exit)
        elif isinstance(exit, (RdmsrExit, WrmsrExit)):
            if on_msr is not None:
                on_msr(exit)
            else:
                _default_answer(exit)
        elif not isinstance(exit, DebugExit):  # single-stepping: recorded, and the run goes on
            res.outcome, res.detail = run_ended(self.vm, vcpu, self.mode, exit, self._symbol)

    def _handle_io(self, vcpu, exit: IoExit, res: RunResult, console: bytearray, on_io, stop_at_sync: bool) -> None:
        if exit.port == PORT_CONSOLE and not exit.is_in:
            _add_console(res, console, bytes(exit.data))
        elif exit.port == PORT_UCALL and not exit.is_in:
            if exit.size != 1 or exit.count != 1:
                res.outcome, res.detail = Outcome.MALFORMED_UCALL, (
                    f"a ucall is one 1-byte OUT to port {PORT_UCALL:#x}; the guest wrote "
                    f"{exit.count} x {exit.size} bytes ({bytes(exit.data[:16]).hex(' ')})")
                return
            try:
                u = decode_ucall(exit.value, vcpu.get_regs(), self.bits, guest_reader(self.vm, vcpu))
            except MalformedUcall as e:
                res.outcome, res.detail = Outcome.MALFORMED_UCALL, str(e)
                return
            self._serve_ucall(vcpu, u, res, console, stop_at_sync)
        else:
            _default_answer(exit)  # on_io may replace it
            if on_io is not None:
                on_io(exit)

    def _serve_ucall(self, vcpu, u: object, res: RunResult, console: bytearray, stop_at_sync: bool) -> None:
        if isinstance(u, Report):
            res.reports.append(u)
        elif isinstance(u, Done):
            res.outcome, res.detail = Outcome.DONE, "the guest reported DONE"
        elif isinstance(u, Fail):
            res.fail_code = u.code
            res.outcome, res.detail = Outcome.FAIL, f"the guest reported FAIL with code {u.code}"
        elif isinstance(u, GuestException):
            res.exception = u
            ip = u.rip + (u.cs << 4 if u.cs is not None else 0)  # real mode: cs:ip
            res.outcome, res.detail = Outcome.EXCEPTION, f"the guest took {u}{self._symbol(ip)}"
        elif isinstance(u, GuestAssertion):
            res.assertion = u
            res.outcome, res.detail = Outcome.FAIL, u.describe(self.image.symbolize(self._ucall_site(vcpu, u.rip)))
        elif isinstance(u, Sync):
            if len(res.syncs) < MAX_EXITS:
                res.syncs.append(u)
            if stop_at_sync:
                res.sync = u
                res.outcome, res.detail = Outcome.SYNC, f"the guest stopped at {u}"
        elif isinstance(u, Printf):
            _add_console(res, console, u.text.encode())

    def _describe_stop(self, vcpu, stats, before, exits: int, console_dropped: int) -> str:
        """:func:`describe_stop` for this run: the instructions KVM emulated since ``before``,
        and the console bytes dropped."""
        text = describe_stop(self.vm, vcpu, self.mode, exits,
                             emulated=stats.delta(before, stats.read_raw()).get("insn_emulation", 0),
                             symbolize=self.image.symbolize)
        if console_dropped:
            text += f"; console output capped at {MAX_CONSOLE} bytes, {console_dropped} more dropped"
        return text

    def _symbol(self, linear: int) -> str:  # " (main+0x5c)" inside the image, else ""
        return f" ({name})" if (name := self.image.symbolize(linear)) else ""

    def _linear(self, vcpu: Vcpu, rip: int) -> int:
        return rip + (vcpu.get_sregs().cs.base if self.mode == "real" else 0)  # real mode: an offset in cs

    def _ucall_site(self, vcpu: Vcpu, rip: int) -> int:
        """The linear address of the ``out %al, $PORT_UCALL`` that made a call, whichever side of
        it KVM left RIP: on it where the exit's completion skips it on the next KVM_RUN (6.1's
        kvm_fast_pio_out), past it where KVM skipped it before the exit (kvm_pvm, 6.18)."""
        at = self._linear(vcpu, rip)
        read = guest_reader(self.vm, vcpu)
        for site in (at, at - len(PORT_UCALL_OUT)):
            try:
                if read(site, len(PORT_UCALL_OUT)) == PORT_UCALL_OUT:
                    return site
            except ValueError:  # not mapped: no OUT there
                pass
        return at


def _add_console(res: RunResult, console: bytearray, data: bytes) -> None:
    """The guest's text to the console, up to MAX_CONSOLE bytes; the rest is counted."""
    room = MAX_CONSOLE - len(console)
    console += data[:room]
    res.console_dropped += max(0, len(data) - room)


def _record(res: RunResult, exit: Exit) -> None:
    """Keep ``exit`` in the result: the first MAX_EXITS of a run, the rest only counted."""
    if len(res.exits) < MAX_EXITS:
        res.exits.append(detach(exit))
    else:
        res.exits_dropped += 1


def _default_answer(exit: Exit) -> None:
    """What the guest gets when no callback answers: all-ones for an IN or MMIO read, #GP for
    an MSR access that exited to userspace (as KVM gives without the capability)."""
    if isinstance(exit, IoExit):
        if exit.is_in:
            exit.data[:] = b"\xff" * len(exit.data)
    elif isinstance(exit, MmioExit):
        if not exit.is_write:
            exit.reply(b"\xff" * exit.length)
    elif isinstance(exit, (RdmsrExit, WrmsrExit)):
        exit.reply(error=True)
