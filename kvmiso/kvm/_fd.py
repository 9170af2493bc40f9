"""The base of every handle that owns a file descriptor, and the way each releases what it owns.

A Ctrl-C may interrupt a close anywhere (its handler runs between two bytecodes), and a close
cut short is finished later by a second one or by the garbage collector. So a handle never
closes a number it has not marked closed in the same step: between ``os.close(self.fd)`` and
``self.fd = -1`` the kernel may give the number to the next file anyone opens, and the second
close would close that file. The fd lives in a C cell that kvm/_vcpu.c closes and empties in
one call (:func:`release_fd`), and :func:`close_all` goes on releasing after an interrupt.
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Callable, TypeVar

from ._compiled import ffi, lib

_T = TypeVar("_T", bound="FdOwner")


def fd_cell(fd: int) -> Any:
    """A C ``int *`` holding ``fd``, for :func:`release_fd` to close."""
    return ffi.new("int *", fd)


def release_fd(cell: Any) -> None:
    """Close the fd in ``cell`` and set the cell to -1, in one step (nothing if it is -1)."""
    raise_if_failed(lib.kvmiso_close(cell), "close")


def mapping_cell(addr: int, size: int) -> Any:
    """A C ``struct kvmiso_mapping *`` holding a mapping, for :func:`release_mapping` to unmap."""
    return ffi.new("struct kvmiso_mapping *", {"addr": ffi.cast("void *", addr), "size": size})


def release_mapping(cell: Any) -> None:
    """Unmap the mapping in ``cell`` and empty the cell, in one step (nothing if it is empty)."""
    raise_if_failed(lib.kvmiso_unmap(cell), "munmap")


def raise_if_failed(result: int, call: str) -> None:
    """OSError for a -errno ``result`` of kvm/_vcpu.c's releasing ``call``."""
    if result < 0:
        raise OSError(-result, f"{call} failed while releasing a KVM handle: {os.strerror(-result)}")


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


_NO_FD = fd_cell(-1)  # the cell of a handle that never got an fd (its __init__ failed first)


class FdOwner:
    """A handle owning ``fd`` (-1 once closed): a context manager that closes it on the way out,
    and, as a file does, one the garbage collector closes with a ResourceWarning when the program
    forgot to. ``close()`` is idempotent, and finishes a close a Ctrl-C cut short."""

    _fd: Any = _NO_FD  # the fd's C cell (fd_cell)
    _warn_unclosed = True

    @property
    def fd(self) -> int:
        """The file descriptor, -1 once closed."""
        return self._fd[0]

    def close(self) -> None:
        """Close the fd (idempotent); each handle says what else it releases."""
        raise NotImplementedError

    def __enter__(self: _T) -> _T:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} fd={self.fd}>"

    def __del__(self) -> None:
        if self._fd is _NO_FD:
            return  # its __init__ failed before it owned anything
        if self.fd >= 0 and self._warn_unclosed:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
        self.close()  # also what an interrupted close left, the fd already closed
