"""The base of every handle that owns a file descriptor, and how fds and mappings are owned.

A Ctrl-C may come between any two bytecodes (where Python runs its handler), also inside a
close or a finalizer. So nothing kvmiso owns is ever held in a plain Python int: between
``fd = os.open(...)`` and storing it, a Ctrl-C would lose it; between ``os.close(self.fd)`` and
``self.fd = -1``, it would leave a number that a second close closes after the kernel gave it to
the next file anyone opened. Each fd and mapping lives in a C cell instead, which kvm/_vcpu.c
fills (:func:`open_into`, :func:`ioctl_into`, :func:`map_into`) and empties (:func:`release_fd`,
:func:`release_mapping`) in one call each, and which releases what it still holds when it is
freed: a close cut short is finished by the next one, or by the garbage collector.
:func:`close_all` goes on releasing after an exception.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, TypeVar

from ._compiled import ffi, lib
from ._libc import ioctl_name
from .errors import KvmError

_T = TypeVar("_T", bound="FdOwner")


def fd_cell(fd: int = -1) -> Any:
    """A C ``int *`` owning ``fd`` (-1: none yet), which closes it when the cell is freed."""
    return ffi.gc(ffi.new("int *", fd), lib.kvmiso_close)


def open_into(cell: Any, path: str, flags: int) -> None:
    """open(2) into ``cell``; OSError (FileNotFoundError, ...) as os.open raises it."""
    r = lib.kvmiso_open(os.fsencode(path), flags, cell)
    if r < 0:
        raise OSError(-r, os.strerror(-r), path)


def ioctl_into(cell: Any, fd: int, request: int, arg: int = 0) -> None:
    """An ioctl that makes an fd (KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_GET_STATS_FD), into ``cell``;
    KvmError naming the request."""
    r = lib.kvmiso_ioctl_fd(fd, request, arg, cell)
    if r < 0:
        raise KvmError(ioctl_name(request), -r)


def eventfd_into(cell: Any, flags: int) -> None:
    """eventfd(2) (counting from 0) into ``cell``."""
    raise_if_failed(lib.kvmiso_eventfd(flags, cell), "eventfd")


def release_fd(cell: Any) -> None:
    """Close the fd in ``cell`` and set the cell to -1, in one step (nothing if it is -1)."""
    raise_if_failed(lib.kvmiso_close(cell), "close")


def mapping_cell(size: int) -> Any:
    """A C ``struct kvmiso_mapping *`` for ``size`` bytes (none mapped yet), which unmaps them
    when the cell is freed."""
    return ffi.gc(ffi.new("struct kvmiso_mapping *", {"size": size}), lib.kvmiso_unmap)


def map_into(cell: Any, prot: int, flags: int, fd: int = -1) -> int:
    """mmap(2) of the cell's size into ``cell``; returns the address."""
    raise_if_failed(lib.kvmiso_map(cell, prot, flags, fd), f"mmap of {cell.size} bytes")
    return int(ffi.cast("uintptr_t", cell.addr))


def release_mapping(cell: Any) -> None:
    """Unmap the mapping in ``cell`` and empty the cell, in one step (nothing if it is empty)."""
    raise_if_failed(lib.kvmiso_unmap(cell), "munmap")


def raise_if_failed(result: int, call: str) -> None:
    """OSError for a -errno ``result`` of ``call`` in kvm/_vcpu.c."""
    if result < 0:
        raise OSError(-result, f"{call} failed: {os.strerror(-result)}")


def close_all(*closers: Callable[[], None]) -> None:
    """Call every closer, the later ones even when an earlier one raised (a Ctrl-C included:
    it must not leave the rest held), then raise the first exception."""
    first: BaseException | None = None
    for close in closers:
        try:
            close()
        except BaseException as e:  # raised below, once everything is released
            first = first or e
    if first is not None:
        raise first


_NO_FD = fd_cell()  # the cell of a handle that never got an fd (its __init__ failed first)


class FdOwner:
    """A handle owning ``fd`` (-1 once closed): a context manager that closes it on the way out,
    and, as a file does, one the garbage collector closes with a ResourceWarning when the program
    forgot to. ``close()`` is idempotent, and finishes a close a Ctrl-C cut short."""

    _fd: Any = _NO_FD  # the fd's cell (fd_cell)
    _closed = False  # close() was called: the finalizer's warning cannot go by the fd, which a
    # cell freed in the same garbage collection may have closed already
    _warn_unclosed = True

    @property
    def fd(self) -> int:
        """The file descriptor, -1 once closed."""
        return self._fd[0]

    def close(self) -> None:
        """Close the fd and release what else the handle owns (idempotent; it also finishes a
        close that a Ctrl-C cut short)."""
        self._closed = True
        self._release()

    def _release(self) -> None:
        release_fd(self._fd)

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd}>"

    def __del__(self) -> None:
        if self._fd is _NO_FD:
            return  # its __init__ failed before it owned anything
        if not self._closed and self._warn_unclosed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
        self.close()  # also what an interrupted close left (the cells release the rest when freed)
