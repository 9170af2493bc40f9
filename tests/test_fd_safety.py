"""A Ctrl-C anywhere inside a close (issue 26, item 1): kvmiso releases nothing twice, leaves
nothing held, and never closes an fd it no longer owns, such as one the program opened since."""

from __future__ import annotations

import gc
import os
import sys
import warnings
from pathlib import Path

import psutil

import kvmiso
from kvmiso.guest import Machine

PACKAGE = Path(kvmiso.__file__).parent
CLOSE_CODE = (str(PACKAGE / "kvm"), str(PACKAGE / "guest" / "machine.py"))
RAM = (2 << 20) + 0x5000  # guest RAM of a size nothing else maps, so its mappings can be counted
VICTIMS = 8  # files opened after the interrupted close: they take the numbers it freed


class InterruptAt:
    """A trace function that raises KeyboardInterrupt before the ``n``-th line of kvmiso's close
    code runs, where a Ctrl-C's handler could raise it (with ``n=None`` it only counts lines)."""

    def __init__(self, n: int | None) -> None:
        self.n = n
        self.lines = 0

    def __call__(self, frame, event, arg):
        return self.line if frame.f_code.co_filename.startswith(CLOSE_CODE) else None

    def line(self, frame, event, arg):
        if event == "line":
            if self.lines == self.n:
                raise KeyboardInterrupt
            self.lines += 1
        return self.line


def _held() -> tuple[int, int, int]:
    """fds, kvm_run mappings and guest RAM mappings of this process."""
    p = psutil.Process()
    maps = p.memory_maps(grouped=False)
    ram = sum(m.path in ("", "[anon]") and (lambda lo, hi: hi - lo)(*(int(x, 16) for x in m.addr.split("-"))) == RAM
              for m in maps)
    return p.num_fds(), sum(m.path.startswith("anon_inode:kvm-vcpu") for m in maps), ram


def _close_interrupted_at(n: int | None) -> int:
    """Close a run Machine with a Ctrl-C before line ``n`` of the close; then open files that
    take the numbers it freed, and let the garbage collector finish the half-closed Machine.
    Returns the number of lines the close ran (up to the interrupt)."""
    m = Machine("hello", mode="long", memory=RAM)
    assert m.run(timeout=30).ok
    tracer = InterruptAt(n)
    gc.collect()
    gc.disable()  # no other object's finalizer runs inside the traced close and takes the interrupt
    sys.settrace(tracer)
    try:
        m.close()
    except KeyboardInterrupt:
        pass  # where it came inside a finalizer the close ran, Python dropped it: as with a real Ctrl-C
    finally:
        sys.settrace(None)
        gc.enable()
    victims = [os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC) for _ in range(VICTIMS)]
    try:
        del m
        gc.collect()  # the Machine, its VM and vCPUs refer to each other: the cycle collector frees them
        null = os.stat("/dev/null").st_rdev
        reused = [v for v in victims if not _is_open(v) or os.fstat(v).st_rdev != null]
        assert not reused, f"interrupted at line {n}: the garbage collector closed fds {reused} opened since"
    finally:
        for v in victims:
            if _is_open(v):
                os.close(v)
    return tracer.lines


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_a_ctrl_c_at_any_line_of_a_close_releases_everything_once(kvm, monkeypatch):
    unraisable = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # what a finalizer raised
    _close_interrupted_at(None)  # warm up: the image is built, modules imported
    before = _held()
    lines = _close_interrupted_at(None)
    assert lines > 20  # the tracer sees the close code
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the half-closed Machine's, expected
        for n in range(lines):
            assert _close_interrupted_at(n) == n, f"line {n} of {lines} was not reached"
            assert _held() == before, f"interrupted at line {n} of {lines}: fds, kvm_run and RAM mappings held"
    # what a finalizer raised, other than the interrupt itself where it came inside one
    assert not [u.exc_value for u in unraisable if not isinstance(u.exc_value, KeyboardInterrupt)]
