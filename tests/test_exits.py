"""Exit decoding from kvm_run bytes (pure logic: the page is built here, as the kernel lays it out)."""

from __future__ import annotations

import ctypes
import struct

import pytest
from hypothesis import given, strategies as st

from kvmiso.kvm import abi
from kvmiso.kvm.exits import (DebugExit, FailEntryExit, HltExit, HypercallExit, InternalErrorExit,
                              IoExit, RdmsrExit, ShutdownExit, UnknownExit, WrmsrExit, decode)

U = abi.kvm_run.u.offset


def page(reason: int) -> memoryview:
    buf = bytearray(ctypes.sizeof(abi.kvm_run) + 4096)
    struct.pack_into("<I", buf, 8, reason)
    return memoryview(buf)


def test_io_out_data_is_a_view_at_data_offset():
    p = page(abi.KVM_EXIT_IO)
    struct.pack_into("<BBHIQ", p, U, abi.KVM_EXIT_IO_OUT, 2, 0x3F8, 3, 4096)
    p[4096:4102] = b"abcdef"
    e = decode(p)
    assert e == IoExit(port=0x3F8, size=2, count=3, is_in=False, data=memoryview(b""))
    assert bytes(e.data) == b"abcdef" and e.value == 0x6261
    p[4096] = ord("z")
    assert bytes(e.data[:1]) == b"z"  # a view, not a copy
    with pytest.raises(ValueError, match="reply\\(\\) is for IN"):
        e.reply(1)


def test_io_in_reply_writes_the_page():
    p = page(abi.KVM_EXIT_IO)
    struct.pack_into("<BBHIQ", p, U, abi.KVM_EXIT_IO_IN, 4, 0x80, 2, 4096)
    e = decode(p)
    e.reply(0x11223344)
    assert bytes(p[4096:4104]) == bytes.fromhex("4433221144332211")
    with pytest.raises(ValueError, match="must be 8 bytes"):
        e.reply(b"\0")
    assert "data" not in e.to_dict()


def test_mmio_read_reply_and_write_value():
    p = page(abi.KVM_EXIT_MMIO)
    struct.pack_into("<Q8sIB", p, U, 0xFEE00000, b"\x78\x56\x34\x12", 4, 1)
    w = decode(p)
    assert (w.address, w.length, w.is_write, w.value) == (0xFEE00000, 4, True, 0x12345678)
    struct.pack_into("<Q8sIB", p, U, 0xD0000008, bytes(8), 2, 0)
    r = decode(p)
    r.reply(0xBEEF)
    assert bytes(p[U + 8 : U + 10]) == b"\xef\xbe"


def test_every_fixed_layout_reason():
    p = page(abi.KVM_EXIT_FAIL_ENTRY)
    struct.pack_into("<QI", p, U, 0x80000021, 1)
    assert decode(p) == FailEntryExit(0x80000021, 1)
    p = page(abi.KVM_EXIT_DEBUG)
    struct.pack_into("<IIQQQ", p, U, 1, 0, 0x8005, 0x4000, 0x400)
    assert decode(p) == DebugExit(1, 0x8005, 0x4000, 0x400)
    p = page(abi.KVM_EXIT_HYPERCALL)
    struct.pack_into("<Q6QQI", p, U, 12, 1, 2, 3, 4, 5, 6, 0, 1)
    assert decode(p) == HypercallExit(12, (1, 2, 3, 4, 5, 6), 1)
    p = page(abi.KVM_EXIT_INTERNAL_ERROR)
    struct.pack_into("<II3Q", p, U, 1, 3, 7, 8, 9)
    e = decode(p)
    assert e == InternalErrorExit(1, (7, 8, 9)) and e.suberror_name == "EMULATION"
    p = page(abi.KVM_EXIT_SYSTEM_EVENT)
    struct.pack_into("<IIQ", p, U, 2, 1, 0)
    assert decode(p).type_name == "RESET"
    assert decode(page(abi.KVM_EXIT_HLT)) == HltExit()
    assert decode(page(abi.KVM_EXIT_SHUTDOWN)) == ShutdownExit()


def test_msr_exits_and_replies():
    p = page(abi.KVM_EXIT_X86_RDMSR)
    struct.pack_into("<B7xIIQ", p, U, 0, 2, 0x474F4F00, 0)
    e = decode(p)
    assert isinstance(e, RdmsrExit) and e.index == 0x474F4F00 and e.msr_reason == 2
    e.reply(0x1122334455667788)
    assert struct.unpack_from("<Q", p, U + 16)[0] == 0x1122334455667788 and p[U] == 0
    p = page(abi.KVM_EXIT_X86_WRMSR)
    struct.pack_into("<B7xIIQ", p, U, 0, 2, 0x10, 0xCAFE)
    e = decode(p)
    assert isinstance(e, WrmsrExit) and e.data == 0xCAFE
    e.reply(error=True)
    assert p[U] == 1


@given(st.integers(min_value=0, max_value=2**32 - 1))
def test_any_reason_decodes_without_raising(reason):
    e = decode(page(reason))
    assert e.to_dict()["exit"] == e.name
    if isinstance(e, UnknownExit):
        assert e.code == reason
    else:
        assert type(e).reason == reason


def test_unknown_reason_keeps_its_number_and_name():
    assert decode(page(9999)) == UnknownExit(9999)
    assert decode(page(abi.KVM_EXIT_XEN)).name == "XEN"
