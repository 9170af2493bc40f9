"""Machine: one call from "this payload, this mode" to a runnable VM, and a run loop that
serves the ucall convention, answers I/O and MMIO reads, and never hangs.

>>> with Machine("hello", mode="long") as m:
...     result = m.run(timeout=5)
>>> result.outcome, result.console
('done', 'Hello from a kvmiso guest!\\n')
"""

from __future__ import annotations

import dataclasses
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from ..kvm import GuestTimeout, Kvm, vendor_module
from ..kvm.exits import (DebugExit, Exit, FailEntryExit, HltExit, InternalErrorExit, IntrExit,
                         IoExit, MmioExit, RdmsrExit, ShutdownExit, SystemEventExit, WrmsrExit)
from . import modes
from .build import BITS, Image, build, payload_modes, payload_path
from .ucall import (PORT_CONSOLE, PORT_UCALL, Done, Fail, GuestException, MalformedUcall, Report,
                    decode_ucall)

DEFAULT_MEMORY = 2 << 20
VCPU_STACK = 0x8000  # each vCPU: a kernel and a user stack of half this size
MAX_CONSOLE = 64 << 10  # console bytes kept per run; the rest is counted, not stored

# Instructions worth naming when a guest is stopped inside KVM_RUN.
_KNOWN_INSNS = {
    b"\x0f\x01\xc1": "VMCALL", b"\x0f\x01\xd9": "VMMCALL", b"\xeb\xfe": "jmp . (a tight loop)",
    b"\xf4": "HLT", b"\xfa": "CLI",
}


@dataclass
class RunResult:
    """How a run ended (``outcome``), why (``detail``), and everything the guest produced."""

    outcome: str  # done fail exception halt shutdown internal-error fail-entry system-event
    #               malformed-ucall unhandled-exit exit-limit timeout interrupted
    detail: str
    vcpu: int = 0
    exits: list[Exit] = field(default_factory=list)
    console: str = ""
    console_dropped: int = 0
    reports: list[Report] = field(default_factory=list)
    fail_code: int | None = None
    exception: GuestException | None = None
    runs: int = 0
    elapsed: float = 0.0
    stats: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.outcome == "done"

    def report(self, tag: int) -> int:
        """The value of the last REPORT with ``tag``."""
        for r in reversed(self.reports):
            if r.tag == tag:
                return r.value
        raise KeyError(f"the guest sent no report with tag {tag}")

    def to_dict(self) -> dict[str, Any]:
        return {
            "outcome": self.outcome, "detail": self.detail, "vcpu": self.vcpu,
            "console": self.console, "console_dropped": self.console_dropped,
            "reports": [dataclasses.asdict(r) for r in self.reports], "fail_code": self.fail_code,
            "exception": dataclasses.asdict(self.exception) if self.exception else None,
            "runs": self.runs, "elapsed_s": self.elapsed, "stats_delta": self.stats,
            "exits": [e.to_dict() for e in self.exits],
        }


def detach(exit: Exit) -> Exit:
    """A copy of ``exit`` whose data no longer views the kvm_run page (safe to keep)."""
    if isinstance(exit, (IoExit, MmioExit)):
        return dataclasses.replace(exit, data=memoryview(bytes(exit.data)))
    return exit


class Machine:
    """A VM with memory, ``vcpus`` vCPUs and ``payload`` loaded for ``mode`` at ``cpl``.

    Owns everything it creates (the Kvm handle too unless one is passed in); a context manager.
    """

    def __init__(self, payload: str | Image, mode: str | None = None, cpl: int = 0,
                 memory: int = DEFAULT_MEMORY, vcpus: int = 1, kvm: Kvm | None = None) -> None:
        if isinstance(payload, Image):
            self.image = payload
        else:
            mode = mode or payload_modes(payload_path(payload))[0]
            self.image = build(payload, mode)
        self.mode = self.image.mode
        self.cpl = cpl
        self.bits = BITS[self.mode]
        if memory < 0x200000 or memory > modes.IDENTITY_MAP_GIB << 30:
            raise ValueError(f"guest memory must be between 2 MiB and {modes.IDENTITY_MAP_GIB} GiB, not {memory:#x}")
        self._own_kvm = kvm is None
        self.kvm = kvm or Kvm()
        self.vm = None
        self._stats: list = []
        try:
            self.vm = self.kvm.create_vm()
            self.vendor = vendor_module()
            if self.vendor == "kvm_intel":
                self.vm.set_tss_addr(0xFFFBD000)  # VMX real mode needs it, as QEMU places it
            self.vm.add_memory(0, memory)
            self.vm.write(self.image.load_address, self.image.code)
            cpuid = self.kvm.get_supported_cpuid()
            for i in range(vcpus):
                vcpu = self.vm.create_vcpu(i)
                vcpu.set_cpuid2(cpuid)
                top = memory - i * VCPU_STACK
                modes.setup(self.vm, vcpu, self.image, self.mode, cpl,
                            stack_top=top - VCPU_STACK // 2, kernel_stack_top=top)
                self._stats.append(vcpu.stats())
        except BaseException:
            self.close()
            raise

    @property
    def vcpu(self):
        return self.vm.vcpus[0]

    @property
    def vcpus(self) -> list:
        return self.vm.vcpus

    def close(self) -> None:
        for st in self._stats:
            st.close()
        self._stats.clear()
        if self.vm is not None:
            self.vm.close()
            self.vm = None
        if self._own_kvm:
            self.kvm.close()

    def __enter__(self) -> "Machine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # --- running ------------------------------------------------------------------------------

    def run(self, timeout: float = 5.0, vcpu: int = 0,
            on_io: Callable[[IoExit], None] | None = None,
            on_mmio: Callable[[MmioExit], None] | None = None,
            on_msr: Callable[[RdmsrExit | WrmsrExit], None] | None = None,
            on_exit: Callable[[Exit], bool | None] | None = None,
            max_exits: int | None = None, record: bool = True) -> RunResult:
        """Run vCPU ``vcpu`` until the guest reports DONE/FAIL, stops, or ``timeout`` passes.

        ``on_io``/``on_mmio`` see every I/O and MMIO exit outside the ucall ports and may
        ``reply()``; unanswered reads get all-ones. ``on_msr`` answers userspace MSR exits
        (unanswered ones inject #GP, as KVM does without the capability). ``on_exit`` sees every exit first and ends
        the run by returning True. Raises GuestTimeout (with ``.result``) past the deadline.
        """
        v = self.vm.vcpus[vcpu]
        stats = self._stats[vcpu]
        before = stats.snapshot()
        res = RunResult("running", "", vcpu=vcpu)
        console = bytearray()
        t0 = time.perf_counter()
        try:
            with v.deadline(timeout) as dl:
                while res.outcome == "running":
                    exit = v.run()
                    res.runs += 1
                    if isinstance(exit, IntrExit):
                        if dl.expired:
                            res.outcome, res.detail = "timeout", self._describe_stop(v, stats, before)
                        else:
                            res.outcome, res.detail = "interrupted", "KVM_RUN was interrupted by a kick"
                        break
                    if on_exit is not None and on_exit(exit):
                        res.outcome, res.detail = "stopped", f"on_exit ended the run at {exit.name}"
                    else:
                        self._handle(v, exit, res, console, on_io, on_mmio, on_msr)
                    if record:
                        res.exits.append(detach(exit))
                    if max_exits is not None and res.runs >= max_exits and res.outcome == "running":
                        res.outcome, res.detail = "exit-limit", f"stopped after {max_exits} exits"
        finally:
            res.elapsed = time.perf_counter() - t0
            res.console = console.decode("utf-8", "replace")
            res.stats = (stats.snapshot() - before).nonzero()
        if res.outcome == "timeout":
            err = GuestTimeout(timeout, res.detail, res.runs - 1)
            err.result = res
            raise err
        return res

    def run_all(self, timeout: float = 5.0, **kwargs) -> list[RunResult]:
        """Run every vCPU at once, one thread each; returns one result per vCPU, in order.

        A vCPU that times out gives a result with outcome ``timeout`` rather than raising.
        """
        from ..kvm.vcpu import install_kick_handler

        install_kick_handler()
        results: list[RunResult | None] = [None] * len(self.vcpus)
        errors: list[BaseException] = []

        def worker(i: int) -> None:
            try:
                results[i] = self.run(timeout, vcpu=i, **kwargs)
            except GuestTimeout as e:
                results[i] = e.result
            except BaseException as e:  # surfaced in the caller's thread below
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(i,), name=f"kvmiso-vcpu{i}") for i in range(len(self.vcpus))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        return results  # type: ignore[return-value]

    def _handle(self, vcpu, exit: Exit, res: RunResult, console: bytearray, on_io, on_mmio, on_msr) -> None:
        if isinstance(exit, IoExit):
            if exit.port == PORT_CONSOLE and not exit.is_in:
                room = MAX_CONSOLE - len(console)
                data = bytes(exit.data)
                console += data[:room]
                res.console_dropped += max(0, len(data) - room)
                return
            if exit.port == PORT_UCALL and not exit.is_in:
                try:
                    u = decode_ucall(exit.value & 0xFF, vcpu.get_regs(), self.bits)
                except MalformedUcall as e:
                    res.outcome, res.detail = "malformed-ucall", str(e)
                    return
                if isinstance(u, Report):
                    res.reports.append(u)
                elif isinstance(u, Done):
                    res.outcome, res.detail = "done", "the guest reported DONE"
                elif isinstance(u, Fail):
                    res.fail_code = u.code
                    res.outcome, res.detail = "fail", f"the guest reported FAIL with code {u.code}"
                elif isinstance(u, GuestException):
                    res.exception = u
                    res.outcome, res.detail = "exception", f"the guest took {u}"
                return
            if exit.is_in:
                exit.data[:] = b"\xff" * len(exit.data)  # the default answer; on_io may replace it
            if on_io is not None:
                on_io(exit)
            return
        if isinstance(exit, MmioExit):
            if not exit.is_write:
                exit.reply(b"\xff" * exit.length)
            if on_mmio is not None:
                on_mmio(exit)
            return
        if isinstance(exit, (RdmsrExit, WrmsrExit)):
            if on_msr is not None:
                on_msr(exit)
            else:
                exit.reply(error=True)
            return
        if isinstance(exit, DebugExit):
            return  # single-stepping: recorded, and the run goes on
        if isinstance(exit, HltExit):
            res.outcome, res.detail = "halt", "the guest executed HLT"
        elif isinstance(exit, ShutdownExit):
            regs = vcpu.get_regs()
            res.outcome, res.detail = "shutdown", f"the guest triple-faulted (KVM_EXIT_SHUTDOWN) near rip {regs.rip:#x}"
        elif isinstance(exit, InternalErrorExit):
            res.outcome, res.detail = "internal-error", (
                f"KVM_EXIT_INTERNAL_ERROR suberror {exit.suberror_name}, data "
                + " ".join(f"{d:#x}" for d in exit.data))
        elif isinstance(exit, FailEntryExit):
            res.outcome, res.detail = "fail-entry", (
                f"VM entry failed: hardware reason {exit.hardware_entry_failure_reason:#x} on cpu {exit.cpu}")
        elif isinstance(exit, SystemEventExit):
            res.outcome, res.detail = "system-event", f"system event {exit.type_name}"
        else:
            res.outcome, res.detail = "unhandled-exit", f"no handler for {exit!r}"

    def _describe_stop(self, vcpu, stats, before) -> str:
        """What a guest stopped by the timeout was doing: its RIP, the instruction there, and
        how many instructions KVM emulated meanwhile."""
        regs = vcpu.get_regs()
        rip = regs.rip
        if self.mode == "real":
            rip += vcpu.get_sregs().cs.base
        text = f"stopped at rip {rip:#x}"
        try:
            t = vcpu.translate(rip)
            insn = self.vm.read(t.physical_address, 3) if t.valid else b""
        except (ValueError, OSError):
            insn = b""
        name = next((n for b, n in _KNOWN_INSNS.items() if insn.startswith(b)), None)
        if insn:
            text += f" ({insn.hex(' ')}{': ' + name if name else ''})"
        delta = stats.snapshot() - before
        emulated = delta.get("insn_emulation", 0)
        if emulated:
            text += f"; KVM emulated {emulated} instructions without an exit to userspace"
        if name in ("VMCALL", "VMMCALL"):
            text += ("; the guest is in a hypercall that KVM keeps re-executing inside KVM_RUN"
                     + (" (on kvm_pvm a CPL0 hypercall never returns)" if self.vendor == "kvm_pvm" else ""))
        return text
