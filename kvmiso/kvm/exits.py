"""One frozen dataclass per KVM_EXIT_* reason, and ``decode(vcpu page) -> Exit``.

The set is closed: a reason kvmiso does not know becomes ``UnknownExit(reason)``, never an
exception. I/O and MMIO data are views into the vCPU's kvm_run page, not copies, so they are
valid until the next KVM_RUN; ``reply()`` writes the answer to an IN or an MMIO read there.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar

from . import abi

_RUN_EXIT = abi.kvm_run.u.offset  # offset of the exit union in struct kvm_run


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
        """A JSON-ready dict: ``{"exit": "IO", ...fields}`` with views copied to hex strings."""
        out: dict[str, Any] = {"exit": self.name}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = bytes(v).hex() if isinstance(v, (memoryview, bytes)) else v
        return out


@dataclass(frozen=True, slots=True)
class IoExit(Exit):
    """KVM_EXIT_IO: ``count`` accesses of ``size`` bytes at ``port``; ``data`` views kvm_run."""

    reason: ClassVar[int] = abi.KVM_EXIT_IO
    port: int
    size: int
    count: int
    is_in: bool
    data: memoryview = field(repr=False, compare=False)

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
        d = Exit.to_dict(self)
        if self.is_in:
            d.pop("data")  # the kernel has not written an IN's data; it is the reply buffer
        return d


@dataclass(frozen=True, slots=True)
class MmioExit(Exit):
    """KVM_EXIT_MMIO: a guest access to guest-physical memory no slot backs."""

    reason: ClassVar[int] = abi.KVM_EXIT_MMIO
    address: int
    length: int
    is_write: bool
    data: memoryview = field(repr=False, compare=False)

    @property
    def value(self) -> int:
        return int.from_bytes(self.data[: self.length], "little")

    def reply(self, value: int | bytes) -> None:
        """Answer an MMIO read with ``length`` bytes (an int is encoded little-endian)."""
        if self.is_write:
            raise ValueError(f"MMIO {self.address:#x}: reply() is for reads; this is a write")
        if isinstance(value, int):
            value = value.to_bytes(self.length, "little")
        self.data[: self.length] = value

    def to_dict(self) -> dict[str, Any]:
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
    reason: ClassVar[int] = abi.KVM_EXIT_HLT


@dataclass(frozen=True, slots=True)
class IrqWindowOpenExit(Exit):
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
    reason: ClassVar[int] = abi.KVM_EXIT_TPR_ACCESS
    rip: int
    is_write: bool


@dataclass(frozen=True, slots=True)
class NmiExit(Exit):
    reason: ClassVar[int] = abi.KVM_EXIT_NMI


@dataclass(frozen=True, slots=True)
class InternalErrorExit(Exit):
    """KVM_EXIT_INTERNAL_ERROR: KVM itself gave up (e.g. the emulator met an instruction)."""

    reason: ClassVar[int] = abi.KVM_EXIT_INTERNAL_ERROR
    suberror: int
    data: tuple[int, ...]

    @property
    def suberror_name(self) -> str:
        return abi.KVM_INTERNAL_ERROR_NAMES.get(self.suberror, str(self.suberror))


@dataclass(frozen=True, slots=True)
class SystemEventExit(Exit):
    reason: ClassVar[int] = abi.KVM_EXIT_SYSTEM_EVENT
    type: int
    data: tuple[int, ...]

    @property
    def type_name(self) -> str:
        return abi.KVM_SYSTEM_EVENT_NAMES.get(self.type, str(self.type))


@dataclass(frozen=True, slots=True)
class _MsrExit(Exit):
    index: int
    msr_reason: int
    _error: memoryview = field(repr=False, compare=False)


@dataclass(frozen=True, slots=True)
class RdmsrExit(_MsrExit):
    """KVM_EXIT_X86_RDMSR (KVM_CAP_X86_USER_SPACE_MSR): userspace supplies the value."""

    reason: ClassVar[int] = abi.KVM_EXIT_X86_RDMSR

    def reply(self, value: int = 0, error: bool = False) -> None:
        """Give the guest ``value``, or inject #GP with ``error=True``."""
        self._error[0] = int(error)
        self._error[16:24] = value.to_bytes(8, "little")

    def to_dict(self) -> dict[str, Any]:
        return {"exit": self.name, "index": self.index, "msr_reason": self.msr_reason}


@dataclass(frozen=True, slots=True)
class WrmsrExit(_MsrExit):
    reason: ClassVar[int] = abi.KVM_EXIT_X86_WRMSR
    data: int = 0

    def reply(self, error: bool = False) -> None:
        self._error[0] = int(error)

    def to_dict(self) -> dict[str, Any]:
        return {"exit": self.name, "index": self.index, "msr_reason": self.msr_reason, "data": self.data}


@dataclass(frozen=True, slots=True)
class NotifyExit(Exit):
    reason: ClassVar[int] = abi.KVM_EXIT_NOTIFY
    flags: int


@dataclass(frozen=True, slots=True)
class UnknownExit(Exit):
    """Any reason without a class of its own: kept, named where known, never an error."""

    code: int

    @property
    def name(self) -> str:
        """The KVM_EXIT_* name of ``code`` where kvmiso knows it."""
        return exit_name(self.code)


_SIMPLE = {cls.reason: cls() for cls in (HltExit, IrqWindowOpenExit, ShutdownExit, IntrExit, NmiExit)}


# Constructors for the hot exits that set the slots directly: a frozen dataclass's __init__ goes
# through object.__setattr__ per field, which costs more than KVM_RUN's own ioctl overhead on
# the Vcpu.run() path. Positional arguments in field order (the unpacking fails loudly if the
# fields change), no checks.
_object_new = object.__new__
_io_port, _io_size, _io_count, _io_is_in, _io_data = (getattr(IoExit, f.name).__set__ for f in fields(IoExit))
_mmio_address, _mmio_length, _mmio_is_write, _mmio_data = (getattr(MmioExit, f.name).__set__ for f in fields(MmioExit))


def _new_io(port: int, size: int, count: int, is_in: bool, data: memoryview) -> IoExit:
    e = _object_new(IoExit)
    _io_port(e, port), _io_size(e, size), _io_count(e, count), _io_is_in(e, is_in), _io_data(e, data)
    return e


def _new_mmio(address: int, length: int, is_write: bool, data: memoryview) -> MmioExit:
    e = _object_new(MmioExit)
    _mmio_address(e, address), _mmio_length(e, length), _mmio_is_write(e, is_write), _mmio_data(e, data)
    return e
_u64 = struct.Struct("<Q").unpack_from
_u32x2 = struct.Struct("<II").unpack_from
_u64u32 = struct.Struct("<QI").unpack_from
_mmio = struct.Struct("<Q8xIB").unpack_from
_debug = struct.Struct("<I4xQQQ").unpack_from
_hypercall = struct.Struct("<Q6QQI").unpack_from
_msr = struct.Struct("<B7xIIQ").unpack_from
_u = _RUN_EXIT
_REASON = abi.kvm_run.exit_reason.offset
_reason_io = struct.Struct(f"<I{_RUN_EXIT - _REASON - 4}xBBHIQ").unpack_from
_EXIT_IO, _IO_IN = abi.KVM_EXIT_IO, abi.KVM_EXIT_IO_IN


def decode(page: memoryview) -> Exit:
    """Decode the exit in a kvm_run page (a writable byte memoryview of the vCPU mapping)."""
    # one unpack for the reason and the io member: port I/O is the hot path (see _new_io)
    reason, direction, size, port, count, off = _reason_io(page, _REASON)
    if reason == _EXIT_IO:
        return _new_io(port, size, count, direction == _IO_IN, page[off : off + size * count])
    if reason == abi.KVM_EXIT_MMIO:
        addr, length, is_write = _mmio(page, _u)
        return _new_mmio(addr, length, bool(is_write), page[_u + 8 : _u + 16])
    simple = _SIMPLE.get(reason)
    if simple is not None:
        return simple
    if reason == abi.KVM_EXIT_DEBUG:
        return DebugExit(*_debug(page, _u))
    if reason == abi.KVM_EXIT_UNKNOWN:
        return HwUnknownExit(_u64(page, _u)[0])
    if reason == abi.KVM_EXIT_EXCEPTION:
        return ExceptionExit(*_u32x2(page, _u))
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(*_u64u32(page, _u))
    if reason == abi.KVM_EXIT_HYPERCALL:
        v = _hypercall(page, _u)
        return HypercallExit(v[0], tuple(v[1:7]), v[8])
    if reason == abi.KVM_EXIT_TPR_ACCESS:
        rip, is_write = struct.unpack_from("<QI", page, _u)
        return TprAccessExit(rip, bool(is_write))
    if reason in (abi.KVM_EXIT_INTERNAL_ERROR, abi.KVM_EXIT_SYSTEM_EVENT):
        first, ndata = _u32x2(page, _u)
        data = struct.unpack_from(f"<{min(ndata, 16)}Q", page, _u + 8)
        cls = InternalErrorExit if reason == abi.KVM_EXIT_INTERNAL_ERROR else SystemEventExit
        return cls(first, data)
    if reason in (abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR):
        _, msr_reason, index, data = _msr(page, _u)
        err = page[_u : _u + 24]
        if reason == abi.KVM_EXIT_X86_RDMSR:
            return RdmsrExit(index, msr_reason, err)
        return WrmsrExit(index, msr_reason, err, data)
    if reason == abi.KVM_EXIT_NOTIFY:
        return NotifyExit(_u32x2(page, _u)[0])
    return UnknownExit(reason)
