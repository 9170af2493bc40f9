"""Output destinations checked before the work: a benchmark or a report that measured for
minutes must not find out at the end that it cannot write its result."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path


class OutputError(ValueError):
    """An output that cannot be written: one line naming the path and the errno (the CLI prints
    it and exits with status 2)."""


def writable(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path once it is known to take a write; a file created to find out is
    removed again. A character device (/dev/full) is written one newline, since only a write
    tells."""
    p = Path(path)
    existed = os.path.lexists(p)
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise OutputError(f"cannot write {what} to {path}: {e.strerror}") from None
    try:
        if stat.S_ISCHR(os.fstat(fd).st_mode):
            os.write(fd, b"\n")
    except OSError as e:
        raise OutputError(f"cannot write {what} to {path}: {e.strerror}") from None
    finally:
        os.close(fd)
        if not existed:
            p.unlink(missing_ok=True)
    return p


def writable_dir(path: str | os.PathLike, what: str) -> Path:
    """Directory ``path``, created if needed, once a file can be created in it."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise OutputError(f"cannot write {what} to {path}: {e.strerror}") from None
    return p
