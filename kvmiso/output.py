"""Where kvmiso's output goes: destinations checked before the work (a benchmark or a report
that measured for minutes must not find out at the end that it cannot write its result), files
written whole or not at all (:func:`write_whole`, the one way kvmiso writes an output file), a
standard output whose failure is told apart from the work's, and guest text made safe for a
terminal."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from pathlib import Path
from typing import Any, Callable

from .exitstatus import CliError


class OutputError(CliError):
    """An output that cannot be written: one line naming the path and the errno (the CLI prints
    it and exits with status 2)."""


def _refused(path: str | os.PathLike, what: str, why: str) -> OutputError:
    return OutputError(f"cannot write {what} to {path}: {why}")


def _in_place(path: Path, what: str) -> bool:
    """Whether ``path`` is written in place (a character device or a FIFO, such as /dev/null or a
    pipe: there is no file to replace) rather than replaced whole (a regular file, or a new
    name). A directory, another kind of file and a symbolic link to anything but a device are
    refused: a link planted in an output folder must not send a root's write elsewhere."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return False
    except OSError as e:
        raise _refused(path, what, e.strerror) from None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except OSError:
            st = None
        if st is None or not (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode)):
            raise _refused(path, what, "it is a symbolic link, which kvmiso does not write through")
    if stat.S_ISDIR(st.st_mode):
        raise _refused(path, what, "it is a directory")
    if stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode):
        return True
    if not stat.S_ISREG(st.st_mode):
        raise _refused(path, what, "it is not a regular file")
    return False


def _new_file(path: Path, what: str) -> str:
    """A new, empty file beside ``path`` (the name an output is written under, then renamed)."""
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    except OSError as e:
        raise _refused(path, what, f"{e.strerror} (an output is written to a new file in {path.parent or '.'} "
                       "and renamed into place)") from None
    os.close(fd)
    return name


def writable(path: str | os.PathLike, what: str) -> Path:
    """``path`` as a Path once it is known to take the write :func:`write_whole` will do: a new
    file can be made beside it (so not /proc/version), or it is a device, which is opened and,
    being a character device (/dev/full), written one newline, since only a write tells."""
    p = Path(path)
    if not _in_place(p, what):
        os.unlink(_new_file(p, what))
        return p
    try:
        fd = os.open(p, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        raise _refused(path, what, e.strerror) from None
    try:
        if stat.S_ISCHR(os.fstat(fd).st_mode):
            os.write(fd, b"\n")
    except OSError as e:
        raise _refused(path, what, e.strerror) from None
    finally:
        os.close(fd)
    return p


def write_whole(path: str | os.PathLike, what: str, write: Callable[[Path], None]) -> None:
    """Write an output with ``write(name)``, whole or not at all: to a new file beside ``path``,
    flushed to disk, then renamed over it, so a reader never sees half of it and a full disk
    leaves the old file (or none). A device is written in place. A failure removes the new file
    and is an OutputError naming ``path``.

    >>> write_whole("greeting.txt", "the greeting", lambda p: p.write_text("hello\\n"))
    >>> open("greeting.txt").read()
    'hello\\n'
    """
    p = Path(path)
    if _in_place(p, what):
        try:
            write(p)
        except OSError as e:
            raise _refused(path, what, e.strerror) from None
        return
    name = _new_file(p, what)
    try:
        write(Path(name))
        with open(name, "rb") as f:
            os.fsync(f.fileno())  # the data on disk before the name points at it
        os.chmod(name, 0o666 & ~_umask())  # a new file's mode, not mkstemp's 0600
        os.rename(name, p)
    except BaseException as e:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)
        if isinstance(e, OSError):
            raise _refused(path, what, e.strerror) from None
        raise


def _umask() -> int:
    """This process's umask (read without changing it, where /proc tells)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1], 8) for line in f if line.startswith("Umask:"))
    except (OSError, StopIteration):
        return 0o022


def writable_dir(path: str | os.PathLike, what: str, names: tuple[str, ...] = ()) -> Path:
    """Directory ``path``, created if needed, once a file can be created in it and each of
    ``names`` in it can take an output (:func:`writable`)."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise _refused(path, what, e.strerror) from None
    for name in names:
        writable(p / name, what)
    return p


class StdoutError(Exception):
    """Standard output cannot be written (/dev/full, a full disk): the message is the errno's."""


class CheckedStdout:
    """sys.stdout, with a failed write or flush raised as StdoutError, so that main() tells it
    from a failure of the work itself; its ``buffer`` (the bytes a command passes through, as
    ``kvmiso boot`` does) is checked alike. A closed pipe stays BrokenPipeError (a quiet end)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    @property
    def buffer(self) -> "CheckedStdout":
        """The stream's binary buffer, checked the same way."""
        return CheckedStdout(self._stream.buffer)

    def write(self, data: str | bytes) -> int:
        """The stream's write; a failure other than a closed pipe as StdoutError."""
        try:
            return self._stream.write(data)
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
