"""One frozen dataclass per KVM_EXIT_* reason (:mod:`.exitdecode` reads them from kvm_run).

The set is closed: a reason kvmiso does not know becomes ``UnknownExit(reason)``, never an
exception. I/O and MMIO data are views into the vCPU's kvm_run page, not copies, so they are
valid until the next KVM_RUN; ``reply()`` writes the answer to an IN or an MMIO read there.
Once the vCPU is closed they raise :class:`VcpuClosed` (:class:`RunPage`, checked at each use).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Any, ClassVar

from . import abi
from .abi_run import member
from .runpage import DETACHED, RunPage, ViewsKvmRun


def exit_name(reason: int) -> str:
    """The KVM_EXIT_* name of ``reason`` without the prefix (``IO``), ``REASON_<n>`` if unknown."""
    return abi.KVM_EXIT_REASONS.get(reason, f"REASON_{reason}")


@dataclass(frozen=True, slots=True)
class Exit:
    """Base of every decoded exit; ``reason`` is the KVM_EXIT_* number."""

    reason: ClassVar[int] = -1

    @property
    def name(self) -> str:
        """The KVM_EXIT_* name without the prefix, e.g. ``IO``."""
        return exit_name(self.reason)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict: ``{"exit": "IO", ...fields}`` (each class adds what it views in
        kvm_run, copied to a hex string)."""
        out: dict[str, Any] = {"exit": self.name}
        for f in fields(self):
            if not f.name.startswith("_"):  # not the views into the page, nor the page
                out[f.name] = getattr(self, f.name)
        return out


@dataclass(frozen=True, slots=True)
class IoExit(ViewsKvmRun, Exit):
    """KVM_EXIT_IO: ``count`` accesses of ``size`` bytes at ``port``; ``data`` (``size * count``
    bytes) views kvm_run."""

    reason: ClassVar[int] = abi.KVM_EXIT_IO
    port: int
    size: int
    count: int
    is_in: bool
    _view: memoryview = field(repr=False, compare=False)
    _page: RunPage = field(default=DETACHED, repr=False, compare=False)

    @property
    def value(self) -> int:
        """The first OUT value as a little-endian integer."""
        return int.from_bytes(self.data[: self.size], "little")

    def reply(self, value: int | bytes) -> None:
        """Answer an IN: an int fills every element, bytes fill the buffer in order."""
        if not self.is_in:
            raise ValueError(f"port {self.port:#x}: reply() is for IN exits; this is an OUT")
        if isinstance(value, int):
            value = value.to_bytes(self.size, "little") * self.count
        if len(value) != self.size * self.count:
            raise ValueError(f"IN reply must be {self.size * self.count} bytes, got {len(value)}")
        self.data[:] = value

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Exit.to_dict`, with ``data`` for an OUT (an IN's is the reply buffer, which
        the kernel has not written)."""
        d = Exit.to_dict(self)
        if not self.is_in:
            d["data"] = bytes(self.data).hex()
        return d


@dataclass(frozen=True, slots=True)
class MmioExit(ViewsKvmRun, Exit):
    """KVM_EXIT_MMIO: a guest access to guest-physical memory no slot backs; ``data`` views
    kvm_run's 8-byte ``mmio.data`` (a write's first ``length`` bytes)."""

    reason: ClassVar[int] = abi.KVM_EXIT_MMIO
    address: int
    length: int
    is_write: bool
    _view: memoryview = field(repr=False, compare=False)
    _page: RunPage = field(default=DETACHED, repr=False, compare=False)

    @property
    def value(self) -> int:
        """A write's value as a little-endian integer."""
        return int.from_bytes(self.data[: self.length], "little")

    def reply(self, value: int | bytes) -> None:
        """Answer an MMIO read with ``length`` bytes (an int is encoded little-endian)."""
        if self.is_write:
            raise ValueError(f"MMIO {self.address:#x}: reply() is for reads; this is a write")
        if isinstance(value, int):
            value = value.to_bytes(self.length, "little")
        self.data[: self.length] = value

    def to_dict(self) -> dict[str, Any]:
        """As :meth:`Exit.to_dict`; ``data`` holds a write's ``length`` bytes, None for a read."""
        d = Exit.to_dict(self)
        d["data"] = bytes(self.data[: self.length]).hex() if self.is_write else None
        return d


@dataclass(frozen=True, slots=True)
class HwUnknownExit(Exit):
    """KVM_EXIT_UNKNOWN: the vendor module met a hardware exit reason it cannot handle."""

    reason: ClassVar[int] = abi.KVM_EXIT_UNKNOWN
    hardware_exit_reason: int


@dataclass(frozen=True, slots=True)
class ExceptionExit(Exit):
    """KVM_EXIT_EXCEPTION: an exception KVM hands to userspace (``exception`` vector, ``error_code``)."""

    reason: ClassVar[int] = abi.KVM_EXIT_EXCEPTION
    exception: int
    error_code: int


@dataclass(frozen=True, slots=True)
class HypercallExit(Exit):
    """KVM_EXIT_HYPERCALL (needs KVM_CAP_EXIT_HYPERCALL for the call number ``nr``)."""

    reason: ClassVar[int] = abi.KVM_EXIT_HYPERCALL
    nr: int
    args: tuple[int, ...]
    longmode: int


@dataclass(frozen=True, slots=True)
class DebugExit(Exit):
    """KVM_EXIT_DEBUG: a single step (#DB, DR6.BS) or breakpoint at ``pc``."""

    reason: ClassVar[int] = abi.KVM_EXIT_DEBUG
    exception: int
    pc: int
    dr6: int
    dr7: int


@dataclass(frozen=True, slots=True)
class HltExit(Exit):
    """KVM_EXIT_HLT: the guest executed HLT and KVM has no in-kernel local APIC to wait on."""

    reason: ClassVar[int] = abi.KVM_EXIT_HLT


@dataclass(frozen=True, slots=True)
class IrqWindowOpenExit(Exit):
    """KVM_EXIT_IRQ_WINDOW_OPEN: the guest can take an interrupt (request_interrupt_window)."""

    reason: ClassVar[int] = abi.KVM_EXIT_IRQ_WINDOW_OPEN


@dataclass(frozen=True, slots=True)
class ShutdownExit(Exit):
    """KVM_EXIT_SHUTDOWN: the guest triple-faulted (or otherwise shut the CPU down)."""

    reason: ClassVar[int] = abi.KVM_EXIT_SHUTDOWN


@dataclass(frozen=True, slots=True)
class FailEntryExit(Exit):
    """KVM_EXIT_FAIL_ENTRY: VM entry failed; the reason is the vendor's (VMX/SVM) code."""

    reason: ClassVar[int] = abi.KVM_EXIT_FAIL_ENTRY
    hardware_entry_failure_reason: int
    cpu: int


@dataclass(frozen=True, slots=True)
class IntrExit(Exit):
    """KVM_EXIT_INTR: KVM_RUN returned for a signal or ``immediate_exit``."""

    reason: ClassVar[int] = abi.KVM_EXIT_INTR


@dataclass(frozen=True, slots=True)
class TprAccessExit(Exit):
    """KVM_EXIT_TPR_ACCESS: the guest read or wrote the TPR at ``rip`` (KVM_TPR_ACCESS_REPORTING)."""

    reason: ClassVar[int] = abi.KVM_EXIT_TPR_ACCESS
    rip: int
    is_write: bool


@dataclass(frozen=True, slots=True)
class NmiExit(Exit):
    """KVM_EXIT_NMI: an NMI arrived while the vCPU ran."""

    reason: ClassVar[int] = abi.KVM_EXIT_NMI


@dataclass(frozen=True, slots=True)
class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: KVM itself gave up (e.g. the emulator met an instruction)."""

    reason: ClassVar[int] = abi.KVM_EXIT_INTERNAL_ERROR
    suberror: int
    data: tuple[int, ...]

    @property
    def suberror_name(self) -> str:
        """KVM_INTERNAL_ERROR_* name of the suberror (``EMULATION``), or its number."""
        return abi.KVM_INTERNAL_ERROR_NAMES.get(self.suberror, str(self.suberror))

    def __repr__(self) -> str:
        # the suberror by name: a bare number sends the reader to <linux/kvm.h>
        name = abi.KVM_INTERNAL_ERROR_NAMES.get(self.suberror)
        data = ", ".join(f"{d:#x}" for d in self.data)
        return f"InternalErrorExit(suberror={self.suberror}{f' {name}' if name else ''}, data=({data}))"


@dataclass(frozen=True, slots=True)
class SystemEventExit(Exit):
    """KVM_EXIT_SYSTEM_EVENT: shutdown, reset, crash, ... (``type``) with its data words."""

    reason: ClassVar[int] = abi.KVM_EXIT_SYSTEM_EVENT
    type: int
    data: tuple[int, ...]

    @property
    def type_name(self) -> str:
        """KVM_SYSTEM_EVENT_* name of the event (``RESET``), or its number."""
        return abi.KVM_SYSTEM_EVENT_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True, slots=True)
class _MsrExit(Exit):
    index: int
    msr_reason: int
    _error: memoryview = field(repr=False, compare=False)
    _page: RunPage = field(default=DETACHED, repr=False, compare=False)

    def _reply_area(self) -> memoryview:
        """kvm_run's msr.error through msr.data, where reply() writes."""
        self._page.check()
        return self._error


@dataclass(frozen=True, slots=True)
class RdmsrExit(_MsrExit):
    """KVM_EXIT_X86_RDMSR (KVM_CAP_X86_USER_SPACE_MSR): userspace supplies the value."""

    reason: ClassVar[int] = abi.KVM_EXIT_X86_RDMSR

    def reply(self, value: int = 0, error: bool = False) -> None:
        """Give the guest ``value``, or inject #GP with ``error=True``."""
        area = self._reply_area()
        area[0] = int(error)
        area[_MSR_REPLY : _MSR_REPLY + 8] = value.to_bytes(8, "little")

    def to_dict(self) -> dict[str, Any]:
        """The exit, index and why (KVM_MSR_EXIT_REASON_*) as JSON-ready values."""
        return {"exit": self.name, "index": self.index, "msr_reason": self.msr_reason}


@dataclass(frozen=True, slots=True)
class WrmsrExit(_MsrExit):
    """KVM_EXIT_X86_WRMSR (KVM_CAP_X86_USER_SPACE_MSR): the guest wrote ``data`` to MSR ``index``."""

    reason: ClassVar[int] = abi.KVM_EXIT_X86_WRMSR
    data: int = 0

    def reply(self, error: bool = False) -> None:
        """Let the write happen, or inject #GP with ``error=True``."""
        self._reply_area()[0] = int(error)

    def to_dict(self) -> dict[str, Any]:
        """The exit, index, why (KVM_MSR_EXIT_REASON_*) and the value written, JSON-ready."""
        return {"exit": self.name, "index": self.index, "msr_reason": self.msr_reason, "data": self.data}


@dataclass(frozen=True, slots=True)
class NotifyExit(Exit):
    """KVM_EXIT_NOTIFY: a notify VM exit (the guest stayed too long in a non-interruptible window)."""

    reason: ClassVar[int] = abi.KVM_EXIT_NOTIFY
    flags: int


@dataclass(frozen=True, slots=True)
class MemoryFaultExit(Exit):
    """KVM_EXIT_MEMORY_FAULT: KVM_RUN failed with EFAULT on guest-physical ``[gpa, gpa + size)``,
    which KVM could not resolve (``flags``: KVM_MEMORY_EXIT_FLAG_PRIVATE for private memory)."""

    reason: ClassVar[int] = abi.KVM_EXIT_MEMORY_FAULT
    gpa: int
    size: int
    flags: int


@dataclass(frozen=True, slots=True)
class UnknownExit(Exit):
    """Any reason without a class of its own: kept, named where known, never an error."""

    code: int

    @property
    def name(self) -> str:
        """The KVM_EXIT_* name of ``code`` where kvmiso knows it."""
        return exit_name(self.code)


@dataclass(frozen=True, slots=True)
class ObservedExit(Exit):
    """An exit known by its reason alone: another process's KVM_RUN seen through the
    ``kvm_userspace_exit`` tracepoint, whose other kvm_run fields only that process could read."""

    code: int

    @property
    def name(self) -> str:
        """The KVM_EXIT_* name of ``code`` where kvmiso knows it."""
        return exit_name(self.code)

    def to_dict(self) -> dict[str, Any]:
        """The exit's name and code, marked ``observed`` (no kvm_run fields were seen)."""
        return {"exit": self.name, "code": self.code, "observed": True}


def detach(exit: Exit) -> Exit:
    """A copy of ``exit`` that no longer views the kvm_run page (safe to keep past the next
    KVM_RUN and the vCPU's close): I/O and MMIO data and the MSR reply area are copied out."""
    if isinstance(exit, (IoExit, MmioExit)):
        return replace(exit, _view=memoryview(bytes(exit.data)), _page=DETACHED)
    if isinstance(exit, _MsrExit):
        return replace(exit, _error=memoryview(bytearray(exit._reply_area())), _page=DETACHED)
    return exit


# --- what an exit's reply writes, and the exits with no data ---------------------------------

# struct kvm_run's msr.error through msr.data: what an MSR exit's reply() writes
MSR_REPLY_AREA = slice(member("u.msr.error")[0], member("u.msr.data")[0] + 8)
_MSR_REPLY = MSR_REPLY_AREA.stop - 8 - MSR_REPLY_AREA.start  # where RDMSR's answer goes, from msr.error

# The exits that carry no data: one shared instance each.
DATALESS: dict[int, Exit] = {cls.reason: cls() for cls in (HltExit, IrqWindowOpenExit, ShutdownExit, IntrExit, NmiExit)}


# --- the exit log's reader --------------------------------------------------------------------

# every class decode() gives, by reason
EXIT_CLASSES: dict[int, type[Exit]] = {cls.reason: cls for cls in (
    IoExit, MmioExit, HwUnknownExit, ExceptionExit, HypercallExit, DebugExit, HltExit, IrqWindowOpenExit,
    ShutdownExit, FailEntryExit, IntrExit, TprAccessExit, NmiExit, InternalErrorExit, SystemEventExit,
    RdmsrExit, WrmsrExit, NotifyExit, MemoryFaultExit)}
_REASON_OF_NAME = {name: nr for nr, name in abi.KVM_EXIT_REASONS.items()}


def exit_from_dict(d: dict[str, Any]) -> Exit:
    """The exit :meth:`Exit.to_dict` wrote, detached. Data the dict does not hold is empty (an
    IN's or an MMIO read's: the kernel had not written it when the exit was recorded); an MSR
    exit's reply area is a fresh buffer. KeyError/TypeError/ValueError where ``d`` is not one."""
    if d.get("observed"):
        return ObservedExit(d["code"])
    code = d["code"] if "code" in d else _REASON_OF_NAME.get(d["exit"])
    if code is None:
        raise ValueError(f"no KVM exit is named {d['exit']!r}")
    cls = EXIT_CLASSES.get(code)
    if cls is None:
        return UnknownExit(code)
    if code in DATALESS:
        return DATALESS[code]
    kwargs: dict[str, Any] = {}
    for f in fields(cls):
        if f.name == "_error":
            kwargs[f.name] = memoryview(bytearray(MSR_REPLY_AREA.stop - MSR_REPLY_AREA.start))
        elif f.name == "_view":
            kwargs[f.name] = memoryview(bytes.fromhex(d.get("data") or ""))
        elif f.name in d:
            kwargs[f.name] = tuple(d[f.name]) if isinstance(d[f.name], list) else d[f.name]
    return cls(**kwargs)
