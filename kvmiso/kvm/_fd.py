"""The base of every handle that owns a file descriptor."""

from __future__ import annotations

import warnings
from typing import TypeVar

_T = TypeVar("_T", bound="FdOwner")


class FdOwner:
    """A handle owning ``fd`` (-1 once closed): a context manager that closes it on the way out,
    and, as a file does, one the garbage collector closes with a ResourceWarning when the program
    forgot to."""

    fd: int = -1

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
        if self.fd >= 0:
            warnings.warn(f"unclosed {self!r}", ResourceWarning, source=self)
            self.close()
