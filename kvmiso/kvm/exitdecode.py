"""``decode(vcpu page) -> Exit``: the exit in a vCPU's ``struct kvm_run``, as an :mod:`.exits` class.

The formats come from :mod:`.abi_run` (``unpacker``/``member``), so they are ``abi``'s layout
of ``struct kvm_run``, checked against the kernel header by test_abi.py. I/O and MMIO data are
views into the page, valid until the next KVM_RUN.
"""

from __future__ import annotations

import struct
from dataclasses import fields

from . import abi
from .abi_run import member, unpacker
from .exits import (DATALESS, MSR_REPLY_AREA, DebugExit, ExceptionExit, Exit, FailEntryExit, HwUnknownExit,
                    HypercallExit, InternalErrorExit, IoExit, MemoryFaultExit, MmioExit, NotifyExit, RdmsrExit,
                    SystemEventExit, TprAccessExit, UnknownExit, WrmsrExit)
from .runpage import DETACHED, RunPage


# Constructors for the hot exits that set the slots directly: a frozen dataclass's __init__ goes
# through object.__setattr__ per field, which costs more than KVM_RUN's own ioctl overhead on
# the Vcpu.run() path. Positional arguments in field order (the unpacking fails loudly if the
# fields change), no checks.
_object_new = object.__new__
_io_port, _io_size, _io_count, _io_is_in, _io_view, _io_page = (getattr(IoExit, f.name).__set__
                                                                  for f in fields(IoExit))
_mmio_address, _mmio_length, _mmio_is_write, _mmio_view, _mmio_page = (getattr(MmioExit, f.name).__set__
                                                                       for f in fields(MmioExit))


def _new_io(port: int, size: int, count: int, is_in: bool, view: memoryview, page: RunPage) -> IoExit:
    e = _object_new(IoExit)
    _io_port(e, port), _io_size(e, size), _io_count(e, count), _io_is_in(e, is_in), _io_view(e, view)
    _io_page(e, page)
    return e


def _new_mmio(address: int, length: int, is_write: bool, view: memoryview, page: RunPage) -> MmioExit:
    e = _object_new(MmioExit)
    _mmio_address(e, address), _mmio_length(e, length), _mmio_is_write(e, is_write), _mmio_view(e, view)
    _mmio_page(e, page)
    return e


# one unpack for the reason and the io member: port I/O is the hot path (see _new_io)
_reason_io = unpacker("exit_reason", "u.io.direction", "u.io.size", "u.io.port", "u.io.count", "u.io.data_offset")
_mmio = unpacker("u.mmio.phys_addr", "u.mmio.len", "u.mmio.is_write")
_MMIO_DATA, _ = member("u.mmio.data")
_debug = unpacker("u.debug.exception", "u.debug.pc", "u.debug.dr6", "u.debug.dr7")
_hw = unpacker("u.hw.hardware_exit_reason")
_ex = unpacker("u.ex.exception", "u.ex.error_code")
_fail_entry = unpacker("u.fail_entry.hardware_entry_failure_reason", "u.fail_entry.cpu")
_hypercall = unpacker("u.hypercall.nr", "u.hypercall.args", "u.hypercall.longmode")
_tpr = unpacker("u.tpr_access.rip", "u.tpr_access.is_write")
_internal = unpacker("u.internal.suberror", "u.internal.ndata")
_INTERNAL_DATA, _ = member("u.internal.data")
_system_event = unpacker("u.system_event.type", "u.system_event.ndata")
_SYSTEM_EVENT_DATA, _ = member("u.system_event.data")
_msr = unpacker("u.msr.reason", "u.msr.index", "u.msr.data")
_notify = unpacker("u.notify.flags")
_memory_fault = unpacker("u.memory_fault.flags", "u.memory_fault.gpa", "u.memory_fault.size")
_EXIT_IO, _IO_IN = abi.KVM_EXIT_IO, abi.KVM_EXIT_IO_IN


def _u64s(page: memoryview, off: int, n: int) -> tuple[int, ...]:
    return struct.unpack_from(f"<{min(n, 16)}Q", page, off)  # data[16] in both unions


def decode(page: memoryview, mapped: RunPage = DETACHED) -> Exit:
    """Decode the exit in a kvm_run page (a writable byte memoryview of the vCPU mapping); the
    exits that view the page check ``mapped`` (the vCPU's) before each use."""
    reason, direction, size, port, count, off = _reason_io(page)
    if reason == _EXIT_IO:
        return _new_io(port, size, count, direction == _IO_IN, page[off : off + size * count], mapped)
    if reason == abi.KVM_EXIT_MMIO:
        addr, length, is_write = _mmio(page)
        return _new_mmio(addr, length, bool(is_write), page[_MMIO_DATA : _MMIO_DATA + 8], mapped)
    simple = DATALESS.get(reason)
    if simple is not None:
        return simple
    return _decode_with_data(reason, page, mapped)


def _decode_with_data(reason: int, page: memoryview, mapped: RunPage) -> Exit:
    """Every other exit: the ones with a member of the union to read, off the hot path."""
    if reason == abi.KVM_EXIT_DEBUG:
        return DebugExit(*_debug(page))
    if reason == abi.KVM_EXIT_UNKNOWN:
        return HwUnknownExit(*_hw(page))
    if reason == abi.KVM_EXIT_EXCEPTION:
        return ExceptionExit(*_ex(page))
    if reason == abi.KVM_EXIT_FAIL_ENTRY:
        return FailEntryExit(*_fail_entry(page))
    if reason == abi.KVM_EXIT_HYPERCALL:
        v = _hypercall(page)
        return HypercallExit(v[0], tuple(v[1:7]), v[7])
    if reason == abi.KVM_EXIT_TPR_ACCESS:
        rip, is_write = _tpr(page)
        return TprAccessExit(rip, bool(is_write))
    if reason == abi.KVM_EXIT_INTERNAL_ERROR:
        suberror, ndata = _internal(page)
        return InternalErrorExit(suberror, _u64s(page, _INTERNAL_DATA, ndata))
    if reason == abi.KVM_EXIT_SYSTEM_EVENT:
        typ, ndata = _system_event(page)
        return SystemEventExit(typ, _u64s(page, _SYSTEM_EVENT_DATA, ndata))
    if reason in (abi.KVM_EXIT_X86_RDMSR, abi.KVM_EXIT_X86_WRMSR):
        return _msr_exit(reason, page, mapped)
    if reason == abi.KVM_EXIT_NOTIFY:
        return NotifyExit(*_notify(page))
    if reason == abi.KVM_EXIT_MEMORY_FAULT:
        flags, gpa, size = _memory_fault(page)
        return MemoryFaultExit(gpa, size, flags)
    return UnknownExit(reason)


def _msr_exit(reason: int, page: memoryview, mapped: RunPage) -> RdmsrExit | WrmsrExit:
    msr_reason, index, data = _msr(page)
    err = page[MSR_REPLY_AREA]
    if reason == abi.KVM_EXIT_X86_RDMSR:
        return RdmsrExit(index, msr_reason, err, mapped)
    return WrmsrExit(index, msr_reason, err, mapped, data)
