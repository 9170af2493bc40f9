"""Where kvmiso's output goes: destinations checked before the work (a benchmark or a report
that measured for minutes must not find out at the end that it cannot write its result), a
standard output whose failure is told apart from the work's, and guest text made safe for a
terminal."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path
from typing import Any


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


class StdoutError(Exception):
    """Standard output cannot be written (/dev/full, a full disk): the message is the errno's."""


class CheckedStdout:
    """sys.stdout, with a failed write or flush raised as StdoutError, so that main() tells it
    from a failure of the work itself. A closed pipe stays BrokenPipeError (a quiet end)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        """The stream's write; a failure other than a closed pipe as StdoutError."""
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(e.strerror) from None

    def flush(self) -> None:
        """The stream's flush; a failure other than a closed pipe as StdoutError."""
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise
        except OSError as e:
            raise StdoutError(e.strerror) from None

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def printable(data: bytes) -> str:
    """Guest console bytes as text that cannot drive the terminal: UTF-8 where it is valid, every
    other byte and every control character (ESC, BEL, CR, ...) escaped as ``\\xNN``. JSON output
    keeps the console as the guest wrote it (see :meth:`kvmiso.guest.RunResult.to_dict`)."""
    text = data.decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() or c == "\t" else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)
