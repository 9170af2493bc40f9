"""The access record (`kvmiso boot --record-accesses DIR`): the reader on files written here,
the QEMU versions it refuses, the plugin's build, and a real record of portio under kvm_amd.

The real record needs what test_boot.py's real boots need (qemu-system-x86, busybox-static,
Debian's kernel in the cache); a missing one skips unless KVMISO_REQUIRE_BOOT=1.
"""

from __future__ import annotations

import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from kvmiso.boot import BootError
from kvmiso.boot.record import build_plugin, check_qemu
from kvmiso.observe.accesses.accessrecord import ACCESS, KERNEL_MIN, Mark, RecordError, Window, read_record
from kvmiso.observe.accesses.recordmark import mark_code
from kvmiso.isolation import load_access_model
from kvmiso.isolation.measured import model_coverage, window_coverage
from kvmiso.observe.accesses.accesssummary import FunctionAccesses, WindowSummary, summarize, summary_text
from test_boot import debian, kvmiso  # noqa: F401 - the session fixture, and the CLI runner

KERNEL_PC = 0xFFFF_FFFF_C081_B20C


def _file(vcpu: int, windows: list[tuple[int, int, list[tuple[int, int, int, int]], int, int]], fmt: int = 1,
          order: list[int] | None = None) -> bytes:
    """A vcpuN.rec as the plugin writes it: windows of (reason, insns, accesses, dropped, filtered),
    in format 1 or 2 (``order``: each window's place among every vCPU's; a mark's ID is its insns)."""
    out = struct.pack("<8sHHIIIQ", b"KVMISOAR", fmt, 32, vcpu, 1000, 1, KERNEL_MIN)
    for seq, (reason, insns, accesses, dropped, filtered) in enumerate(windows):
        end = insns if reason == 4 else KERNEL_PC - 3
        out += struct.pack("<4sIQQQQIIII", b"WNDW", reason, seq, KERNEL_PC - 3, end, insns,
                           len(accesses), dropped, filtered, order[seq] if order else 0)
        out += b"".join(ACCESS.pack(*a) for a in accesses)
    return out


# --- the reader ------------------------------------------------------------------------------

def test_reader_gives_back_each_window_and_access_as_written(tmp_path):
    a = (KERNEL_PC, 0xFFFF_8C86_830E_0130, 8, 1)
    b = (KERNEL_PC + 7, 0x7F00_0000_1000, 4, 0)
    (tmp_path / "vcpu0.rec").write_bytes(_file(0, [(1, 100, [a, b], 0, 72), (2, 50, [b], 3, 48)]))
    (tmp_path / "vcpu1.rec").write_bytes(_file(1, [(3, 7, [], 0, 0)]))
    (tmp_path / "kallsyms").write_text(f"{KERNEL_PC - 0x9c:016x} t __svm_vcpu_run\t[kvm_amd]\n")
    rec = read_record(tmp_path)
    assert rec.vcpus() == [0, 1] and rec.cap == 1000 and rec.api == 1
    w0, w1, w2 = rec.windows
    assert (w0.vcpu, w0.seq, w0.reason, w0.insns, w0.filtered, w0.complete) == (0, 0, "vmrun", 100, 72, True)
    assert w0.accesses[0].write and not w0.accesses[1].write and w0.accesses[1].addr == 0x7F00_0000_1000
    assert (w1.reason, w1.dropped, w1.complete) == ("user", 3, False)
    assert (w2.vcpu, w2.reason, w2.accesses, w2.complete) == (1, "end", (), False)
    assert rec.symbols.resolve(a[0]) == ("__svm_vcpu_run", 0x9c)


def test_marks_are_read_apart_from_the_windows_in_the_order_of_every_vcpu(tmp_path):
    a = (KERNEL_PC, 0xFFFF_8C86_830E_0130, 8, 1)
    # vCPU 0: a window, mark 7, a window; vCPU 1: one window between the two of vCPU 0
    (tmp_path / "vcpu0.rec").write_bytes(_file(0, [(1, 10, [a], 0, 0), (4, 7, [], 0, 0), (2, 5, [a], 0, 0)], 2, [0, 1, 3]))
    (tmp_path / "vcpu1.rec").write_bytes(_file(1, [(1, 10, [a], 0, 0)], 2, [2]))
    rec = read_record(tmp_path)
    assert rec.format == 2 and rec.marks == (Mark(0, 7, 1),)
    assert [(w.vcpu, w.order, w.reason) for w in rec.windows] == [(0, 0, "vmrun"), (0, 3, "user"), (1, 2, "vmrun")]


def test_reader_names_what_is_wrong_with_a_file(tmp_path):
    with pytest.raises(RecordError, match="holds no access record"):
        read_record(tmp_path)
    good = _file(0, [(1, 10, [(KERNEL_PC, KERNEL_PC, 8, 0)] * 2, 0, 0)])
    (tmp_path / "vcpu0.rec").write_bytes(good[:-5])
    with pytest.raises(RecordError, match=r"vcpu0.rec: window 0 at byte 32 is cut short \(2 accesses announced\)"):
        read_record(tmp_path)
    (tmp_path / "vcpu0.rec").write_bytes(b"ELF" + good[3:])
    with pytest.raises(RecordError, match="not an access record"):
        read_record(tmp_path)
    (tmp_path / "vcpu0.rec").write_bytes(good + b"junk" * 20)
    with pytest.raises(RecordError, match="no window at byte"):
        read_record(tmp_path)


def test_summary_names_the_handler_and_each_function_in_path_order(tmp_path):
    svm_run, npf, fault, image_fn = KERNEL_PC - 0x9c, KERNEL_PC + 0x1000, 0xFFFF_FFFF_C070_0000, 0xFFFF_FFFF_A100_0000
    stack, user, data = 0xFFFF_D088_005B_BB60, 0x7F00_0000_1000, 0xFFFF_FFFF_A200_0040
    accesses = [(KERNEL_PC, stack, 8, 0), (npf + 4, stack, 8, 1), (fault + 9, user, 4, 0),
                (image_fn + 1, data, 8, 1), (KERNEL_PC + 2, stack, 8, 1)]
    (tmp_path / "vcpu0.rec").write_bytes(_file(0, [(1, 40, accesses, 0, 72)]))
    (tmp_path / "kallsyms").write_text("\n".join([
        f"{0xFFFF_FFFF_A000_0000:016x} T _text", f"{image_fn:016x} T copy_user_generic",
        f"{data:016x} D some_data", f"{0xFFFF_FFFF_A300_0000:016x} B _end",
        f"{fault:016x} t kvm_mmu_page_fault\t[kvm]", f"{svm_run:016x} t __svm_vcpu_run\t[kvm_amd]",
        f"{npf:016x} t npf_interception\t[kvm_amd]", ""]))
    rec = read_record(tmp_path)
    (s,) = summarize(rec)
    assert s.handler == "npf_interception" and (s.reads, s.writes) == (2, 3)
    assert [(f.function, f.module, f.reads, f.writes) for f in s.functions] == [
        ("__svm_vcpu_run", "kvm_amd", 1, 1), ("npf_interception", "kvm_amd", 0, 1),
        ("kvm_mmu_page_fault", "kvm", 1, 0), ("copy_user_generic", "", 0, 1)]
    assert s.regions == {"user": 1, "image": 1, "module": 0, "other": 3}
    text = summary_text(rec, [s])
    assert "vCPU 0 window 0: npf_interception; ended at the next VMRUN (handled in the kernel); 40 instructions, " \
           "5 accesses (2 reads, 3 writes; 1 user, 1 image, 3 other; 72 of VMRUN/VMLOAD/VMSAVE filtered)" in text
    (tmp_path / "kallsyms").unlink()
    with pytest.raises(ValueError, match="no kallsyms of the guest"):
        summarize(read_record(tmp_path))


def test_functions_the_access_model_does_not_know_are_named_in_path_order():
    model = load_access_model()
    fns = (FunctionAccesses("kvm_arch_vcpu_ioctl_run", "kvm", 3, 1), FunctionAccesses("kvmiso_no_such_b", "kvm_amd", 1, 0),
           FunctionAccesses("kvmiso_no_such_a", "kvm", 1, 0), FunctionAccesses("kvmiso_no_such_c", "", 2, 0))
    s = WindowSummary(Window(0, 0, "vmrun", KERNEL_PC - 3, KERNEL_PC - 3, 10, (), 0, 0), None, fns)
    c = window_coverage(s, model)
    assert (c.measured, c.known, c.kvm_measured, c.kvm_known) == (4, 1, 3, 1)
    assert c.unknown_kvm == ("kvmiso_no_such_b", "kvmiso_no_such_a") and c.unknown_kernel == ("kvmiso_no_such_c",)
    assert c.text() == ("access.toml knows 1 of 4 functions that touched memory (KVM's modules: 1 of 3); "
                        "not in it from KVM: kvmiso_no_such_b, kvmiso_no_such_a")
    assert model_coverage([s, s], model) == c  # each function once


# --- QEMU and the plugin -----------------------------------------------------------------------

def _bzimage(where: Path) -> Path:
    """A kernel file with a bzImage header: all kvmiso boot reads before it starts QEMU."""
    header = bytearray(0x1000)
    header[0x202:0x206] = b"HdrS"
    (where / "bzImage").write_bytes(header)
    return where / "bzImage"


def _fake_qemu(where: Path, version: str) -> Path:
    qemu = where / "qemu-system-x86_64"
    qemu.write_text(f"#!/bin/sh\necho 'QEMU emulator version {version} (Debian)'\n")
    qemu.chmod(0o755)
    return qemu


def test_another_qemu_is_refused_in_one_line_naming_the_supported_ones(tmp_path):
    assert check_qemu(str(_fake_qemu(tmp_path, "7.2.22"))) == "7.2.22"
    qemu = _fake_qemu(tmp_path, "8.2.2")
    with pytest.raises(BootError) as e:
        check_qemu(str(qemu))
    assert str(e.value) == f"--record-accesses supports QEMU 7.2 (TCG plugin API 1); {qemu} is QEMU 8.2.2"
    # through the command line: status 2 and that one line, before any kernel boots
    _bzimage(tmp_path)
    p = kvmiso("boot", "--kernel", str(tmp_path / "bzImage"), "--record-accesses", str(tmp_path / "rec"),
               "--", "true", env=dict(os.environ, PATH=f"{tmp_path}:{os.environ['PATH']}"))
    assert p.returncode == 2
    assert p.stderr.strip().splitlines()[-1] == f"kvmiso: {e.value}"


def test_a_record_folder_that_cannot_be_written_is_refused_before_the_boot(tmp_path):
    _bzimage(tmp_path)
    p = kvmiso("boot", "--kernel", str(tmp_path / "bzImage"), "--record-accesses", "/proc/kvmiso-record", "--", "true")
    assert p.returncode == 2
    assert p.stderr.strip() == "kvmiso: cannot write the access record to /proc/kvmiso-record: No such file or directory"


def test_the_plugin_builds_warning_free_and_exports_what_qemu_looks_for(tmp_path):
    so = build_plugin(cache=tmp_path)
    assert build_plugin(cache=tmp_path) == so  # cached by content
    exported = subprocess.run(["nm", "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
    assert {"qemu_plugin_install", "qemu_plugin_version"} <= {line.split()[-1] for line in exported.splitlines()}


# --- a real record -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def portio(debian, tmp_path_factory):  # noqa: F811 - test_boot's fixture
    """portio in long mode under kvm_amd, recorded: (the record, kvmiso run's output)."""
    d = tmp_path_factory.mktemp("record")
    p = kvmiso("boot", "--record-accesses", str(d), "--",
               sys.executable, "-m", "kvmiso.cli", "run", "portio", "--mode", "long")
    assert p.returncode == 0, p.stderr
    assert f"kvmiso: access record in {d}: " in p.stderr
    return read_record(d), p.stdout


def _functions(rec, window) -> set[str]:
    return {rec.symbols.resolve(a.pc)[0] for a in window.accesses}


def test_each_exit_of_portio_has_its_window_of_kernel_accesses(portio):
    rec, out = portio
    assert rec.vcpus() == [0] and rec.api >= 1 and rec.symbols is not None
    runs = int(re.search(r"\((\d+) KVM_RUN calls", out).group(1))
    assert all(w.complete for w in rec.windows[:-1])
    assert all(a.pc >= KERNEL_MIN for w in rec.windows for a in w.accesses)  # kernel code only
    io = [w for w in rec.windows if "io_interception" in _functions(rec, w)]
    npf = [w for w in rec.windows if "npf_interception" in _functions(rec, w)]
    # portio makes 7 port I/O exits, each to the VMM (no device in the kernel has its ports),
    # and nested page faults on its first touches of memory, each handled in the kernel
    assert len(io) == 7 and all(w.reason == "user" and w.end_pc < KERNEL_MIN for w in io)
    assert npf and all(w.reason == "vmrun" for w in npf)
    # every KVM_RUN returns to user mode once; a window may also end where the thread gave way
    assert sum(w.reason == "user" for w in rec.windows) >= runs == 7
    assert all(len(w.accesses) > 100 and w.insns > len(w.accesses) / 2 for w in io + npf)


def test_vmrun_vmload_and_vmsave_are_filtered(portio):
    rec, _ = portio
    # after each VMRUN returns, kvm_amd runs VMSAVE and VMLOAD: 24 accesses of QEMU's each
    assert all(w.filtered >= 48 for w in rec.windows)
    for w in rec.windows:
        assert not any(a.pc == w.vmrun_pc for a in w.accesses)
        # these functions touch no user memory: an address below the kernel's is a physical
        # address of the VMCB that QEMU's helpers reported (VMLOAD's once showed up here)
        near = [a for a in w.accesses if a.addr < KERNEL_MIN and rec.symbols.resolve(a.pc)[0]
                in ("__svm_vcpu_run", "svm_vcpu_enter_exit", "amd_clear_divider", "svm_vcpu_run")]
        assert near == []


def test_the_measured_summary_shows_each_exits_path(portio, tmp_path):
    rec, _ = portio
    summaries = summarize(rec)
    io = [s for s in summaries if s.handler == "io_interception"]
    assert len(io) == 7
    for s in io:
        path = [(f.function, f.module) for f in s.functions]
        # svm.c's handler, then x86.c's fast port I/O, then back to the VMM through KVM_RUN's return
        assert path.index(("io_interception", "kvm_amd")) < path.index(("kvm_fast_pio", "kvm"))
    npf = [s for s in summaries if s.handler == "npf_interception"]
    assert npf and all(("kvm_mmu_page_fault", "kvm") in [(f.function, f.module) for f in s.functions] for s in npf)
    p = kvmiso("check", "--measured", str(rec.directory))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count(": io_interception; ended in user mode") == 7
    assert p.stdout.count("    access.toml knows ") == len(summaries)
    assert p.stdout.splitlines()[-1].startswith("all windows: access.toml knows ")


def test_a_mark_is_two_nops_and_a_return_that_the_plugin_recognizes():
    code = mark_code(0x1234)
    # nopl 0x494d564b(%rax) ("KVMI"); nopl 0x1234(%rax); ret
    assert code == bytes.fromhex("0f1f804b564d49" "0f1f8034120000" "c3")
    plugin = (Path(__file__).parent.parent / "kvmiso/boot/record/accesses.c").read_text()
    assert "{0x0f, 0x1f, 0x80, 0x4b, 0x56, 0x4d, 0x49}" in plugin  # the same bytes on both sides
    with pytest.raises(ValueError):
        mark_code(1 << 32)
