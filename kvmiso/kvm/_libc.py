"""ioctl(2) through ctypes, never the fcntl module, and the package's one handle on the C library
(``libc``), for the other modules' calls into it. The calls that make or release an fd or a
mapping kvmiso owns are kvm/_vcpu.c's (see kvm/_fd.py)."""

from __future__ import annotations

import ctypes
import ctypes.util
from typing import Callable

from . import abi
from .errors import KvmError

# The package's one handle on the C library: every module that calls libc through ctypes imports
# this one (use_errno, so ctypes.get_errno() reads the errno its calls left).
libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
libc.ioctl.restype = ctypes.c_int
libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)

raw_ioctl = libc.ioctl
get_errno = ctypes.get_errno


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
