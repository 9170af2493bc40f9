"""The only place that calls ioctl(2) and mmap(2): through ctypes, never the fcntl module; and
the package's one handle on the C library (``libc``), for the other modules' calls into it."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap as _mmap
import os
from typing import Callable

from . import abi
from .errors import KvmError

# The package's one handle on the C library: every module that calls libc through ctypes imports
# this one (use_errno, so ctypes.get_errno() reads the errno its calls left).
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
libc.mmap.restype = ctypes.c_void_p
libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
libc.munmap.restype = ctypes.c_int
libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)

raw_ioctl = libc.ioctl
get_errno = ctypes.get_errno
MAP_FAILED = ctypes.c_void_p(-1).value


def ioctl_name(request: int) -> str:
    """The KVM_* name of an ioctl request number, for messages."""
    return abi.IOCTL_NAMES.get(request, f"ioctl {request:#x}")


def ioctl(fd: int, request: int, arg: int | ctypes._CData | None = None,
          explain: Callable[[int], str] | None = None) -> int:
    """ioctl(2) that raises KvmError naming the request; ``arg`` is an int or a ctypes object.

    ``explain(errno) -> str`` adds what the failure means for this call.
    """
    if arg is None:
        ptr = None
    elif isinstance(arg, int):
        ptr = arg
    else:
        _check_size(request, arg)
        ptr = ctypes.addressof(arg)
    ret = raw_ioctl(fd, request, ptr)
    if ret < 0:
        err = get_errno()
        raise KvmError(ioctl_name(request), err, explain(err) if explain else "")
    return ret


def _check_size(request: int, arg: ctypes._CData) -> None:
    """Refuse an argument of another size than ``request`` encodes, as kvm_util's kvm_do_ioctl
    does: the kernel copies that many bytes in or out. A struct with a flexible array
    (:func:`abi.with_entries`) is checked by its header."""
    size = abi.ioc_size(request)
    given = getattr(arg, "header_type", type(arg))
    if size and ctypes.sizeof(given) != size:
        raise TypeError(f"{ioctl_name(request)} takes a {size}-byte argument (the size its request number "
                        f"encodes), not a {ctypes.sizeof(given)}-byte {given.__name__}")


def mmap(length: int, fd: int = -1, shared: bool = False, prot: int = _mmap.PROT_READ | _mmap.PROT_WRITE) -> int:
    """mmap(2); an anonymous private mapping unless ``fd`` is given. Returns the address."""
    flags = _mmap.MAP_SHARED if shared else _mmap.MAP_PRIVATE
    if fd < 0:
        flags |= _mmap.MAP_ANONYMOUS
    addr = libc.mmap(None, length, prot, flags, fd, 0)
    if addr is None or addr == MAP_FAILED:
        err = get_errno()
        raise OSError(err, f"mmap of {length} bytes failed: {os.strerror(err)}")
    return addr


def munmap(addr: int, length: int) -> None:
    """munmap(2); OSError naming the range if the kernel refuses."""
    if libc.munmap(addr, length) != 0:
        err = get_errno()
        raise OSError(err, f"munmap({addr:#x}, {length}) failed: {os.strerror(err)}")
