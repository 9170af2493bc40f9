"""Output files on a disk that fills, at paths that cannot take them, through links: each output
is written whole or not at all, and a failure is one line naming the file, status 2, with nothing
left behind. The disks are real tmpfs mounts of 64 KiB (root only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import kvmiso, one_line
from test_boot import debian  # noqa: F401 - the fixture: Debian's kernel, QEMU and busybox, or a skip

from kvmiso.observe.tracing.exitlog import read_jsonl


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs, mounted for the test."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k,mode=755", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def _fill(disk: Path) -> None:
    """Fill ``disk`` to the last byte: names can still be created, no data written."""
    fd = os.open(disk / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"\0" * 4096):
            pass
    except OSError:
        pass  # ENOSPC: full
    finally:
        os.close(fd)


def test_trace_on_a_disk_too_small_writes_no_log(kvm, small_disk):
    """Before: an ENOSPC traceback, status 1, and a truncated log that check refused."""
    log = small_disk / "hello.jsonl"
    p = kvmiso("trace", "hello", "--json", str(log))
    assert p.returncode == 2
    assert one_line(p) == f"kvmiso: cannot write the exit log to {log}: No space left on device"
    assert os.listdir(small_disk) == []  # no log, no temporary file


def test_trace_keeps_the_old_log_when_the_new_one_does_not_fit(kvm, small_disk):
    log = small_disk / "hello.jsonl"
    log.write_text("the old log\n")
    p = kvmiso("trace", "hello", "--json", str(log))
    assert p.returncode == 2 and "No space left on device" in one_line(p)
    assert log.read_text() == "the old log\n" and os.listdir(small_disk) == ["hello.jsonl"]


def test_trace_log_that_fits_is_whole(kvm, tmp_path):
    log = tmp_path / "portio.jsonl"
    p = kvmiso("trace", "portio", "--json", str(log))
    assert p.returncode == 0, p.stderr
    assert len(read_jsonl(log).records) == 7 and os.listdir(tmp_path) == ["portio.jsonl"]
    assert log.stat().st_mode & 0o777 == 0o666 & ~_umask()  # a new file's mode, not the temporary's 0600


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_bench_on_a_full_disk_writes_no_results(kvm, small_disk):
    """Before: an ENOSPC traceback after measuring, and a 0-byte bench.json."""
    _fill(small_disk)
    out = small_disk / "bench.json"
    p = kvmiso("bench", "--kinds", "out", "--samples", "20", "--runs", "1", "--no-python", "--json", str(out))
    assert p.returncode == 2
    assert one_line(p) == f"kvmiso: cannot write the results to {out}: No space left on device"
    assert os.listdir(small_disk) == ["filler"]


def test_bench_refuses_a_kernel_file_before_measuring(kvm):
    """Before: /proc/version passed the check (it opens for writing) and the write failed with
    EIO after the measurement. (A file of /sys would take the write: never tried here.)"""
    p = kvmiso("bench", "--kinds", "out", "--samples", "20", "--runs", "1", "--no-python", "--json", "/proc/version")
    assert p.returncode == 2 and p.stdout == ""  # refused before measuring
    assert one_line(p).startswith("kvmiso: cannot write the results to /proc/version: ")


def test_report_refuses_a_directory_where_a_file_goes_before_the_suite(kvm, tmp_path):
    """Before: IsADirectoryError after the whole suite had run."""
    (tmp_path / "bench.json").mkdir()
    p = kvmiso("report", "--out", str(tmp_path))
    assert p.returncode == 2
    assert one_line(p) == f"kvmiso: cannot write the report to {tmp_path / 'bench.json'}: it is a directory"
    assert p.stdout == "" and sorted(os.listdir(tmp_path)) == ["bench.json"]


@pytest.mark.parametrize("name", ["report.json", "exitlog.jsonl", "bench.json", "latency.png"])
def test_report_does_not_write_through_a_link_in_its_folder(kvm, tmp_path, name):
    """Before: a link planted in an existing --out was followed, as root, to what it names."""
    out, victim = tmp_path / "out", tmp_path / "victim"
    out.mkdir()
    victim.write_text("not kvmiso's\n")
    (out / name).symlink_to(victim)
    p = kvmiso("report", "--out", str(out))
    assert p.returncode == 2 and p.stdout == ""
    assert one_line(p) == (f"kvmiso: cannot write the report to {out / name}: it is a symbolic link, which kvmiso "
                           "does not write through")
    assert victim.read_text() == "not kvmiso's\n" and os.listdir(out) == [name]


@pytest.mark.slow
def test_report_on_a_disk_that_fills_writes_no_empty_report(kvm, small_disk):
    """Before: after the whole suite, an ENOSPC traceback and a 0-byte report.json."""
    out = small_disk / "rep"
    p = kvmiso("report", "--out", str(out), timeout=1800)
    assert p.returncode == 2 and "Traceback" not in p.stderr, p.stderr
    said = [line for line in p.stderr.splitlines() if not line.startswith("kvmiso report: ")]  # not progress
    # the first write that failed: the suite's exit log, megabytes
    assert said == [f"kvmiso: cannot write the exit log to {out / 'exitlog.jsonl'}: No space left on device"]
    left = os.listdir(out)
    assert set(left) <= {"report.json"}  # no exit log, no empty or partial file, no temporary one
    if left:
        assert json.loads((out / "report.json").read_text())["complete"] is False


def test_boot_whose_stdout_is_full_is_one_line(kvm, debian):
    """Before: the command's output, passed through stdout's binary buffer, raised an ENOSPC
    traceback past the check every other write to stdout goes through."""
    with open("/dev/full", "w") as full:
        p = subprocess.run([sys.executable, "-m", "kvmiso.cli", "boot", "--", "echo", "hi"], stdout=full,
                           stderr=subprocess.PIPE, text=True, timeout=600)
    assert "Traceback" not in p.stderr and p.returncode == 2, p.stderr
    assert p.stderr.splitlines()[-1] == "kvmiso: cannot write to standard output: No space left on device"
