"""Exit decoding, against pages the kernel's own header lays out: a C program compiled against
<linux/kvm.h> fills a struct kvm_run per exit kind by field name, and the decoder must read back
what it wrote (a page packed with the decoder's own formats could not catch a wrong one)."""

from __future__ import annotations

import ctypes
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import given, strategies as st

from kvmiso.kvm import abi
from kvmiso.kvm.exitdecode import decode
from kvmiso.kvm.exits import (DebugExit, ExceptionExit, FailEntryExit, HltExit, HwUnknownExit, HypercallExit,
                              InternalErrorExit, IoExit, MemoryFaultExit, MmioExit, NotifyExit, RdmsrExit,
                              SystemEventExit, TprAccessExit, UnknownExit, WrmsrExit, detach)

HEADER = Path("/usr/include/linux/kvm.h")
PAGE = 8192  # struct kvm_run, then the PIO data page at 4096 as KVM places it

# Each case: C statements filling `struct kvm_run *r` (zeroed) and the page bytes `p`.
CASES = {
    "io_out": "r->exit_reason = KVM_EXIT_IO; r->io.direction = KVM_EXIT_IO_OUT; r->io.size = 2;"
              " r->io.port = 0x3f8; r->io.count = 3; r->io.data_offset = 4096; memcpy(p + 4096, \"abcdef\", 6);",
    "io_in": "r->exit_reason = KVM_EXIT_IO; r->io.direction = KVM_EXIT_IO_IN; r->io.size = 4;"
             " r->io.port = 0x80; r->io.count = 2; r->io.data_offset = 4096;",
    "mmio_write": "r->exit_reason = KVM_EXIT_MMIO; r->mmio.phys_addr = 0xfee00000ull; r->mmio.len = 4;"
                  " r->mmio.is_write = 1; memcpy(r->mmio.data, \"\\x78\\x56\\x34\\x12\", 4);",
    "mmio_read": "r->exit_reason = KVM_EXIT_MMIO; r->mmio.phys_addr = 0xd0000008ull; r->mmio.len = 2;",
    "hw": "r->exit_reason = KVM_EXIT_UNKNOWN; r->hw.hardware_exit_reason = 0x1122334455ull;",
    "exception": "r->exit_reason = KVM_EXIT_EXCEPTION; r->ex.exception = 14; r->ex.error_code = 0x11;",
    "fail_entry": "r->exit_reason = KVM_EXIT_FAIL_ENTRY; r->fail_entry.hardware_entry_failure_reason = 0x80000021ull;"
                  " r->fail_entry.cpu = 7;",
    "debug": "r->exit_reason = KVM_EXIT_DEBUG; r->debug.arch.exception = 1; r->debug.arch.pc = 0x8005;"
             " r->debug.arch.dr6 = 0x4000; r->debug.arch.dr7 = 0x400;",
    "hypercall": "r->exit_reason = KVM_EXIT_HYPERCALL; r->hypercall.nr = 12; for (int i = 0; i < 6; i++)"
                 " r->hypercall.args[i] = i + 1; r->hypercall.ret = 99; r->hypercall.longmode = 1;",
    "tpr": "r->exit_reason = KVM_EXIT_TPR_ACCESS; r->tpr_access.rip = 0xfff0; r->tpr_access.is_write = 1;",
    "internal": "r->exit_reason = KVM_EXIT_INTERNAL_ERROR; r->internal.suberror = 1; r->internal.ndata = 3;"
                " r->internal.data[0] = 7; r->internal.data[1] = 8; r->internal.data[2] = 9; r->internal.data[3] = 10;",
    "system_event": "r->exit_reason = KVM_EXIT_SYSTEM_EVENT; r->system_event.type = 2; r->system_event.ndata = 1;"
                    " r->system_event.data[0] = 0x55;",
    "rdmsr": "r->exit_reason = KVM_EXIT_X86_RDMSR; r->msr.reason = 2; r->msr.index = 0x474f4f00;",
    "wrmsr": "r->exit_reason = KVM_EXIT_X86_WRMSR; r->msr.reason = 4; r->msr.index = 0x10; r->msr.data = 0xcafe;",
    "notify": "r->exit_reason = KVM_EXIT_NOTIFY; r->notify.flags = 1;",
    "hlt": "r->exit_reason = KVM_EXIT_HLT;",
    # the installed header may predate memory_fault (Linux 6.8): its three u64, flags, gpa and
    # size in that order (include/uapi/linux/kvm.h), go at the start of the exit union
    "memory_fault": "r->exit_reason = 39; { unsigned long long mf[3] = {8, 0x1234000, 0x1000};"
                    " memcpy(&r->hw, mf, sizeof(mf)); }",
}
# Where reply() must write, by C member name.
OFFSETS = {"mmio.data": "offsetof(struct kvm_run, mmio.data)", "msr.error": "offsetof(struct kvm_run, msr.error)",
           "msr.data": "offsetof(struct kvm_run, msr.data)"}


@pytest.fixture(scope="module")
def pages(tmp_path_factory) -> tuple[dict[str, memoryview], dict[str, int]]:
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler (cc/gcc) to lay out pages with <linux/kvm.h>")
    if not HEADER.exists():
        pytest.skip(f"{HEADER} is not installed (linux-libc-dev)")
    body = "".join(f"    memset(p, 0, sizeof(p)); {{ {stmts} }} fwrite(p, 1, sizeof(p), stdout);\n"
                   for stmts in CASES.values())
    body += "".join(f'    fprintf(stderr, "%zu\\n", {expr});\n' for expr in OFFSETS.values())
    src = ("#include <stddef.h>\n#include <stdio.h>\n#include <string.h>\n#include <linux/kvm.h>\n"
           f"static unsigned char p[{PAGE}] __attribute__((aligned(8)));\n"
           "int main(void) {\n    struct kvm_run *r = (struct kvm_run *)p;\n" + body + "    return 0;\n}\n")
    d = tmp_path_factory.mktemp("exits")
    (d / "pages.c").write_text(src)
    subprocess.run([cc, "-o", str(d / "pages"), str(d / "pages.c")], check=True, capture_output=True)
    out = subprocess.run([str(d / "pages")], check=True, capture_output=True)
    assert len(out.stdout) == PAGE * len(CASES)
    views = {name: memoryview(bytearray(out.stdout[i * PAGE:(i + 1) * PAGE])) for i, name in enumerate(CASES)}
    return views, dict(zip(OFFSETS, map(int, out.stderr.split())))


def test_io_out_data_is_a_view_at_data_offset(pages):
    p = pages[0]["io_out"]
    e = decode(p)
    assert e == IoExit(0x3F8, 2, 3, False, memoryview(b""))
    assert bytes(e.data) == b"abcdef" and e.value == 0x6261
    p[4096] = ord("z")
    assert bytes(e.data[:1]) == b"z"  # a view, not a copy
    with pytest.raises(ValueError, match="reply\\(\\) is for IN"):
        e.reply(1)


def test_io_in_reply_writes_the_page(pages):
    p = pages[0]["io_in"]
    e = decode(p)
    assert e == IoExit(0x80, 4, 2, True, memoryview(b""))
    e.reply(0x11223344)
    assert bytes(p[4096:4104]) == bytes.fromhex("4433221144332211")
    with pytest.raises(ValueError, match="must be 8 bytes"):
        e.reply(b"\0")
    assert "data" not in e.to_dict()


def test_mmio_write_value_and_read_reply(pages):
    views, off = pages
    w = decode(views["mmio_write"])
    assert w == MmioExit(0xFEE00000, 4, True, memoryview(b"")) and w.value == 0x12345678
    p = views["mmio_read"]
    r = decode(p)
    assert r == MmioExit(0xD0000008, 2, False, memoryview(b""))
    r.reply(0xBEEF)
    assert bytes(p[off["mmio.data"]:off["mmio.data"] + 2]) == b"\xef\xbe"


def test_every_fixed_layout_reason(pages):
    views = pages[0]
    assert decode(views["hw"]) == HwUnknownExit(0x1122334455)
    assert decode(views["exception"]) == ExceptionExit(14, 0x11)
    assert decode(views["fail_entry"]) == FailEntryExit(0x80000021, 7)
    assert decode(views["debug"]) == DebugExit(1, 0x8005, 0x4000, 0x400)
    assert decode(views["hypercall"]) == HypercallExit(12, (1, 2, 3, 4, 5, 6), 1)
    assert decode(views["tpr"]) == TprAccessExit(0xFFF0, True)
    e = decode(views["internal"])
    assert e == InternalErrorExit(1, (7, 8, 9)) and e.suberror_name == "EMULATION"  # ndata bounds the data
    e = decode(views["system_event"])
    assert e == SystemEventExit(2, (0x55,)) and e.type_name == "RESET"
    assert decode(views["notify"]) == NotifyExit(1)
    assert decode(views["hlt"]) == HltExit()


def test_a_memory_fault_decodes_to_its_range_and_flags(pages):
    # what kvm-ioctls returns for a KVM_RUN that failed with EFAULT and left this exit
    e = decode(pages[0]["memory_fault"])
    assert e == MemoryFaultExit(gpa=0x1234000, size=0x1000, flags=abi.KVM_MEMORY_EXIT_FLAG_PRIVATE)
    assert e.to_dict() == {"exit": "MEMORY_FAULT", "gpa": 0x1234000, "size": 0x1000, "flags": 8}


def test_msr_exits_and_replies(pages):
    views, off = pages
    p = views["rdmsr"]
    e = decode(p)
    assert isinstance(e, RdmsrExit) and e.index == 0x474F4F00 and e.msr_reason == 2
    e.reply(0x1122334455667788)
    assert struct.unpack_from("<Q", p, off["msr.data"])[0] == 0x1122334455667788 and p[off["msr.error"]] == 0
    p = views["wrmsr"]
    e = decode(p)
    assert isinstance(e, WrmsrExit) and (e.index, e.msr_reason, e.data) == (0x10, 4, 0xCAFE)
    e.reply(error=True)
    assert p[off["msr.error"]] == 1


def page(reason: int) -> memoryview:
    buf = bytearray(ctypes.sizeof(abi.kvm_run) + 4096)
    abi.kvm_run.from_buffer(buf).exit_reason = reason
    return memoryview(buf)


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


def test_a_detached_exit_no_longer_views_the_page(pages):
    views = pages[0]
    for name in ("io_out", "mmio_write", "rdmsr"):
        p = views[name]
        saved = bytes(p)
        e = decode(p)
        kept = detach(e)
        assert kept == e
        if isinstance(e, (IoExit, MmioExit)):
            data = bytes(e.data)
            p[:] = bytes(len(p))  # the next KVM_RUN rewrites the page
            assert bytes(kept.data) == data != bytes(e.data)
        else:
            kept.reply(0x1234)
            assert bytes(p) == saved  # the copy's reply area is its own
        p[:] = saved
