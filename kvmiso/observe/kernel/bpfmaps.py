"""The kernel objects kvmiso's BPF watcher (:mod:`..tracing.bpfwatch`) hangs its programs
(:mod:`.bpfprog`) on: maps, made and updated through bpf(2), a task-storage map with the
little BTF the kernel requires of one, and the perf events of tracepoints. Every one is a file
descriptor of the caller's: closing it is all it takes to free it.
"""

from __future__ import annotations

import ctypes
import os
import struct

from ...kvm._libc import libc as _libc
from .bpf import BPF_MAP_CREATE, BpfUnavailable, _bpf

# bpf(2) (include/uapi/linux/bpf.h)
BPF_MAP_UPDATE_ELEM, BPF_MAP_DELETE_ELEM, BPF_BTF_LOAD = 2, 3, 18
MAP_HASH, MAP_ARRAY, MAP_PERCPU_ARRAY, MAP_STACK_TRACE, MAP_RINGBUF, MAP_TASK_STORAGE = 1, 2, 6, 7, 27, 29
BPF_F_NO_PREALLOC = 1
BTF_MAGIC, BTF_KIND_INT, BTF_KIND_ARRAY, BTF_INT_SIGNED = 0xEB9F, 1, 3, 1

_NR_PERF_EVENT_OPEN = 298
PERF_TYPE_TRACEPOINT, PERF_SAMPLE_RAW, PERF_FLAG_FD_CLOEXEC = 2, 1 << 10, 8
PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF = 0x2400, 0x40042408
_ATTR_SIZE = 136  # PERF_ATTR_SIZE_VER8
_libc.syscall.restype = ctypes.c_long


def map_create(kind: int, key: int, value: int, entries: int, name: str, flags: int = 0,
               btf: tuple[int, int, int] = (0, 0, 0)) -> int:
    """A new map's fd; ``btf``: the BTF object's fd and the key's and value's type ids in it."""
    attr = struct.pack("<IIIIIII16sIIII", kind, key, value, entries, flags, 0, 0, name.encode(), 0, *btf)
    try:
        fd, _ = _bpf(BPF_MAP_CREATE, attr)
    except OSError as e:
        raise BpfUnavailable(f"bpf(BPF_MAP_CREATE) of {name} failed: {e.strerror}") from None
    return fd


def task_storage_map(value: int, name: str) -> int:
    """A map of ``value`` bytes per task (BPF_MAP_TYPE_TASK_STORAGE: a program finds the current
    task's in a few loads, where a hash map hashes a key). The kernel requires BTF of its key (an
    int) and value: described here as ``int[value / 4]``, loaded, and closed once the map holds it."""
    assert value % 4 == 0
    strings = b"\0int\0"
    types = (struct.pack("<III", 1, BTF_KIND_INT << 24, 4) + struct.pack("<I", BTF_INT_SIGNED << 24 | 32)
             + struct.pack("<III", 0, BTF_KIND_ARRAY << 24, 0) + struct.pack("<III", 1, 1, value // 4))
    blob = struct.pack("<HBBIIIII", BTF_MAGIC, 1, 0, 24, 0, len(types), len(types), len(strings)) + types + strings
    buf = ctypes.create_string_buffer(blob, len(blob))
    try:
        btf, _ = _bpf(BPF_BTF_LOAD, struct.pack("<QQIII", ctypes.addressof(buf), 0, len(blob), 0, 0))
    except OSError as e:
        raise BpfUnavailable(f"bpf(BPF_BTF_LOAD) for {name} failed: {e.strerror}") from None
    try:
        return map_create(MAP_TASK_STORAGE, 4, value, 0, name, BPF_F_NO_PREALLOC, (btf, 1, 2))
    finally:
        os.close(btf)


def map_call(cmd: int, fd: int, key: ctypes.Array | ctypes._SimpleCData, value: ctypes.Array | None = None,
             flags: int = 0) -> None:
    """bpf(``cmd``) on map ``fd`` with a key and a value (or none), as the element commands take them."""
    _bpf(cmd, struct.pack("<IIQQQ", fd, 0, ctypes.addressof(key), ctypes.addressof(value) if value is not None else 0,
                          flags))


def perf_tracepoint(event_id: int) -> int:
    """A perf event on tracepoint ``event_id`` (all threads, CPU 0: a BPF program on it runs on
    every CPU; the event itself never samples, the program returns 0)."""
    attr = bytearray(_ATTR_SIZE)
    struct.pack_into("<IIQQQ", attr, 0, PERF_TYPE_TRACEPOINT, _ATTR_SIZE, event_id, 1, PERF_SAMPLE_RAW)
    struct.pack_into("<I", attr, 48, 1)  # wakeup_events
    buf = ctypes.create_string_buffer(bytes(attr), _ATTR_SIZE)
    fd = _libc.syscall(ctypes.c_long(_NR_PERF_EVENT_OPEN), buf, ctypes.c_long(-1), ctypes.c_long(0),
                       ctypes.c_long(-1), ctypes.c_long(PERF_FLAG_FD_CLOEXEC))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, f"perf_event_open of tracepoint {event_id}: {os.strerror(e)}")
    return fd


def ioctl(fd: int, request: int, arg: int) -> None:
    """ioctl(2) on a perf event; OSError on failure."""
    if _libc.ioctl(fd, request, arg) < 0:  # the shared handle's argtypes: int, unsigned long, void *
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


__all__ = ["BPF_BTF_LOAD", "BPF_F_NO_PREALLOC", "BPF_MAP_DELETE_ELEM", "BPF_MAP_UPDATE_ELEM", "MAP_ARRAY", "MAP_HASH", "MAP_PERCPU_ARRAY", "MAP_RINGBUF",
           "MAP_STACK_TRACE", "MAP_TASK_STORAGE", "PERF_EVENT_IOC_ENABLE", "PERF_EVENT_IOC_SET_BPF", "ioctl", "map_call", "map_create",
           "perf_tracepoint", "task_storage_map"]
