"""A private tracefs instance (``instances/kvmiso-<pid>``) recording the ``kvm`` and ``kvmmmu``
events of kvmiso's own threads, read as binary ring-buffer pages.

Why an instance: kvmiso must never disturb the global trace buffer or anybody else's tracing.
Why binary: ``per_cpu/cpuN/trace_pipe_raw`` gives every field at the offset its ``format`` file
names, so the same code reads ``kvm_exit`` on Intel and AMD and ``kvm_pio`` on kvm_pvm; the
text ``trace`` file would have to be parsed back from printf output.

The instance goes away on every way out: the end of the ``with`` block, an exception,
Ctrl-C, and SIGTERM (while the instance exists, a program without its own SIGTERM handler gets
``kvmiso.interrupt.Terminated``, see that module). An instance left behind by a killed kvmiso
(its pid is gone) is removed by the next one, which says so.

There is no text fallback: a page the parser cannot read raises FormatError, and capture
then reports the run without in-kernel events and says why.

>>> with TraceInstance(["kvm:kvm_pio", "kvm:kvm_userspace_exit"]) as t:    # needs root
...     t.start(); result = m.run(); t.stop()
...     events = t.read()
>>> [e.name for e in events][:2]
['kvm_pio', 'kvm_userspace_exit']
"""

from __future__ import annotations

import errno
import os
import re
import threading
import time
from pathlib import Path
from typing import Callable, Iterable

from ... import interrupt
from .exitlog import TraceEvent
from .ringbuffer import PageHeader, decode_buffers
from .traceformat import EventFormat, FormatError
from .tracefsmount import PREFIX, TRACEFS, TracefsUnavailable, pid_namespace, remove_stale, tracefs_root

SYSTEMS = ("kvm", "kvmmmu")
DEFAULT_BUFFER_KB = 4096  # per CPU: ~80,000 kvm events before the buffer is full


_lock = threading.Lock()
_live: set[str] = set()  # names of this process's instances


def _write(path: Path, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


def _add(path: Path, value: str) -> None:
    """Write without O_TRUNC (a pid list keeps what it has; tracefs files do not seek, so not
    Python's "a" mode, which seeks to the end)."""
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def choose_events(events_dir: Path, requested: Iterable[str] | None) -> tuple[list[tuple[str, str]], list[str]]:
    """The (system, event) pairs of ``requested`` (``None``: every kvm and kvmmmu event) that
    ``events_dir`` has, and the names it lacks. Raises :class:`TracefsUnavailable` when none."""
    available = {s: sorted(e for e in os.listdir(events_dir / s) if (events_dir / s / e / "format").exists())
                 for s in SYSTEMS if (events_dir / s).is_dir()}
    if not available:
        raise TracefsUnavailable("this kernel has no kvm trace events (events/kvm is missing: "
                                 "is KVM built with tracing?)")
    chosen: list[tuple[str, str]] = []
    missing: list[str] = []
    for req in requested if requested is not None else list(available):
        sys_, _, ev = req.rpartition(":") if ":" in req else ("", "", req)
        if not sys_ and ev in SYSTEMS:
            if ev in available:
                chosen += [(ev, e) for e in available[ev]]
            else:
                missing.append(ev)
            continue
        systems = [sys_] if sys_ else list(available)
        hit = [(s, ev) for s in systems if ev in available.get(s, [])]
        if hit:
            chosen += hit[:1]
        else:
            missing.append(req)
    if not chosen:
        raise TracefsUnavailable(f"none of the requested events exist on this kernel: {', '.join(missing)}")
    return chosen, missing


class TraceInstance:
    """A private tracefs instance with the chosen kvm/kvmmmu events enabled for ``pids``.

    ``events``: ``None`` for every event of the ``kvm`` and ``kvmmmu`` systems this kernel has,
    or names: ``"kvm"`` (a whole system), ``"kvm:kvm_pio"`` or ``"kvm_pio"``. Names this kernel
    lacks are listed in ``missing`` and the rest are enabled. ``pids`` are thread ids (the
    vCPU threads: kvm events fire in the vCPU thread's context); records of any other thread
    are filtered in the kernel (set_event_pid) and again here (``foreign`` counts those).
    With ``stacks``, each event carries the kernel call chain it fired in (the ``stacktrace``
    trigger puts a ``kernel_stack`` record after it in the same buffer); where the kernel has no
    triggers, ``missing`` says so and events come without chains.
    Raises :class:`TracefsUnavailable` when nothing can be traced.
    """

    def __init__(self, events: Iterable[str] | None = None, pids: Iterable[int] = (),
                 buffer_kb: int = DEFAULT_BUFFER_KB, root: Path = TRACEFS, stacks: bool = False,
                 follow_forks: bool = False) -> None:
        self._requested = list(events) if events is not None else None
        self.stacks = stacks  # a ``stacktrace`` trigger on every enabled event: its kernel call chain
        self.follow_forks = follow_forks  # threads and children the traced ones create are traced too
        self.stack_format: EventFormat | None = None
        self.orphan_stacks = 0
        self.pids = set(pids) or {os.getpid(), threading.get_native_id()}
        self.buffer_kb = buffer_kb
        self._root_hint = root
        self.path: Path | None = None
        self.formats: dict[int, EventFormat] = {}
        self.enabled: list[str] = []
        self.missing: list[str] = []
        self.stale_removed: list[str] = []
        self.foreign = 0  # records of other threads that got past the kernel's pid filter
        self.unknown = 0  # records of an event id without a format (not one we enabled)
        self._fds: dict[int, int] = {}
        self._root: Path | None = None
        self._kernel_tids: dict[int, int] = {}  # gettid() -> the kernel's id, in a PID namespace
        self._header = PageHeader()
        self._page_size = 4096
        self._missed_pages = 0
        self._lost_base = 0
        self._undo_sigterm: Callable[[dict], None] | None = None

    # --- setting up and tearing down ------------------------------------------------------

    def __enter__(self) -> "TraceInstance":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Create the instance and enable its events (removed again on any failure)."""
        if os.geteuid() != 0:
            raise TracefsUnavailable("tracing kvm events needs root (tracefs instances are root-only)")
        root = self._root = tracefs_root(self._root_hint)
        self.stale_removed = remove_stale(root)
        self._undo_sigterm = interrupt.sigterm_unwinds()
        try:
            # an instance that exists is one we know about, and so is every pipe open in it:
            # a signal between open(2) and the assignment would lose an fd that keeps the
            # instance busy (rmdir fails with EBUSY) for as long as the process lives
            with interrupt.deferred():
                self.path = self._make_instance(root)
                self._open_pipes(self.path)
            self._setup(root)
        except BaseException:
            self.close()
            raise

    def _make_instance(self, root: Path) -> Path:
        with _lock:
            ns = pid_namespace()  # pid 1 in every new namespace: the namespace makes it unique
            base = f"{PREFIX}{os.getpid()}" if ns is None else f"{PREFIX}ns{ns}-{os.getpid()}"
            name, n = base, 1
            while name in _live:  # several instances in one process at once
                n += 1
                name = f"{base}-{n}"
            path = root / "instances" / name
            try:
                try:
                    os.mkdir(path)
                except FileExistsError:
                    # left by an earlier process that had our pid and is gone: stale
                    os.rmdir(path)
                    os.mkdir(path)
                    self.stale_removed.append(name)
            except OSError as e:
                raise TracefsUnavailable(f"cannot create tracefs instance {path}: {e.strerror}") from None
            _live.add(name)
        return path

    def _open_pipes(self, p: Path) -> None:
        # First thing: an instance with open files cannot be removed by anybody else.
        cpus = sorted(int(d[3:]) for d in os.listdir(p / "per_cpu") if d.startswith("cpu"))
        for cpu in cpus:
            self._fds[cpu] = os.open(p / "per_cpu" / f"cpu{cpu}" / "trace_pipe_raw",
                                     os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)

    def _setup(self, root: Path) -> None:
        p = self.path
        assert p is not None
        self._header = PageHeader.parse((root / "events" / "header_page").read_text())
        try:
            self._page_size = int((p / "buffer_subbuf_size_kb").read_text()) * 1024
        except OSError:
            self._page_size = os.sysconf("SC_PAGE_SIZE")  # kernels before sub-buffer sizes
        _write(p / "tracing_on", "0")
        _write(p / "trace_clock", "mono")  # timestamps comparable with time.monotonic_ns()
        _write(p / "options" / "overwrite", "0")  # a full buffer drops new events, keeps the start
        _write(p / "buffer_size_kb", str(self.buffer_kb))
        if self.follow_forks:
            _write(p / "options" / "event-fork", "1")
        _write(p / "set_event_pid", " ".join(str(t) for t in sorted(self.pids)))
        self._enable(p)
        self._lost_base = self._lost_counters()

    def _enable(self, p: Path) -> None:
        events_dir = p / "events"
        chosen, missing = choose_events(events_dir, self._requested)
        self.missing += missing
        stack_fmt = events_dir / "ftrace" / "kernel_stack" / "format"
        if self.stacks and stack_fmt.exists():
            self.stack_format = EventFormat.parse(stack_fmt.read_text(), "ftrace")
        elif self.stacks:
            self.missing.append("call chains (no ftrace/kernel_stack format)")
        for s, e in dict.fromkeys(chosen):
            d = events_dir / s / e
            fmt = EventFormat.parse((d / "format").read_text(), s)
            if self.stack_format is not None:
                try:
                    _write(d / "trigger", "stacktrace")
                except OSError as err:
                    self.stack_format = None
                    self.missing.append(f"call chains (the stacktrace trigger was refused: {err.strerror})")
            _write(d / "enable", "1")
            self.formats[fmt.id] = fmt
            self.enabled.append(fmt.full_name)

    def close(self) -> None:
        """Close the pipes and remove the instance (idempotent); restore SIGTERM.

        Ctrl-C or SIGTERM arriving meanwhile take effect once the instance is gone."""
        with interrupt.deferred() as restore:
            while self._fds:  # each fd off the dict before its close: an error never leaves one to close twice
                os.close(self._fds.popitem()[1])
            if self.path is not None:
                for attempt in range(50):
                    try:
                        os.rmdir(self.path)
                        break
                    except FileNotFoundError:
                        break
                    except OSError as e:
                        # EBUSY while a just-closed pipe's reference drops; anything else is final
                        if e.errno != errno.EBUSY or attempt == 49:
                            raise
                        time.sleep(0.01)
                with _lock:
                    _live.discard(self.path.name)
                self.path = None
            if self._undo_sigterm is not None:
                self._undo_sigterm(restore)  # a SIGTERM held meanwhile goes to the program's own
                self._undo_sigterm = None

    # --- recording ------------------------------------------------------------------------

    def kernel_tid(self) -> int:
        """The calling thread's id as trace records and set_event_pid know it (the kernel's
        task->pid). In the initial PID namespace that is gettid(); in another one it is read
        back from a trace_marker write into this instance, which nobody else writes to."""
        native = threading.get_native_id()
        if pid_namespace() is None:
            return native
        if native not in self._kernel_tids:
            assert self.path is not None and self._root is not None
            fmt = EventFormat.parse((self._root / "events" / "ftrace" / "print" / "format").read_text(), "ftrace")
            _write(self.path / "tracing_on", "1")
            try:
                _write(self.path / "trace_marker", f"kvmiso thread {native}")
            finally:
                _write(self.path / "tracing_on", "0")
            d = decode_buffers(self.read_raw(), self._header, self._page_size, {fmt.id: fmt})
            marks = [e.pid for e in d.events if e.name == "print"]
            if not marks:
                raise TracefsUnavailable("inside a PID namespace, and the trace_marker record that would "
                                         "give this thread's kernel id did not arrive: cannot filter by thread")
            self._kernel_tids[native] = marks[-1]
        return self._kernel_tids[native]

    def set_pids(self, pids: Iterable[int]) -> None:
        """Trace these threads (replacing the set): e.g. a vCPU thread started later."""
        self.pids = set(pids)
        _write(self.path / "set_event_pid", " ".join(str(t) for t in sorted(self.pids)))

    def add_pids(self, pids: Iterable[int]) -> None:
        """Trace these threads too, keeping every id in the kernel's set: a write without
        O_TRUNC adds to the list (the kernel clears it only on O_TRUNC), so the ids event-fork
        added meanwhile stay, as a replacing write would not keep them."""
        new = set(pids) - self.pids
        if new:
            _add(self.path / "set_event_pid", " ".join(str(t) for t in sorted(new)))
            self.pids |= new

    def start(self) -> None:
        """Start recording (tracing_on)."""
        _write(self.path / "tracing_on", "1")

    def stop(self) -> None:
        """Stop recording."""
        _write(self.path / "tracing_on", "0")

    def read(self) -> list[TraceEvent]:
        """Drain every CPU's buffer: the records of our threads, in timestamp order."""
        return self.decode(self.read_raw())

    def decode(self, raw: dict[int, bytes]) -> list[TraceEvent]:
        """The records of our threads in pages from :meth:`read_raw` (several drains of one CPU
        may be joined: a drain loop that must keep up with the kernel decodes once, at the end)."""
        if self.follow_forks:  # the kernel adds threads as they are born and drops them as they exit
            self.pids |= {int(t) for t in (self.path / "set_event_pid").read_text().split()}
        # following forks, the kernel's filter is the only one: a thread born and gone between two
        # reads is in no list kvmiso could read, but its records are the process's
        d = decode_buffers(raw, self._header, self._page_size, self.formats,
                           None if self.follow_forks else self.pids, self.stack_format)
        self._missed_pages += d.missed
        self.foreign += d.foreign
        self.unknown += d.unknown
        self.orphan_stacks += d.orphan_stacks
        return d.events

    def read_raw(self) -> dict[int, bytes]:
        """Drain every CPU's buffer as it is: whole ring-buffer pages per CPU."""
        return {cpu: b"".join(self._read_pages(fd)) for cpu, fd in self._fds.items()}

    def _read_pages(self, fd: int) -> Iterable[bytes]:
        while True:
            try:
                chunk = os.read(fd, self._page_size * 16)
            except BlockingIOError:
                return
            if not chunk:
                return
            yield chunk

    def _lost_counters(self) -> int:
        """overrun + commit overrun + dropped events, summed over the CPUs' stats files."""
        total = 0
        for cpu in self._fds:
            text = (self.path / "per_cpu" / f"cpu{cpu}" / "stats").read_text()
            for key in ("overrun", "commit overrun", "dropped events"):
                m = re.search(rf"^{key}: (\d+)", text, re.M)
                total += int(m.group(1)) if m else 0
        return total

    @property
    def lost(self) -> int:
        """Records the kernel could not keep since the instance was set up (a full buffer)."""
        return max(self._lost_counters() - self._lost_base, self._missed_pages)

    def describe(self) -> str:
        """What this instance could not see or had to skip, in one line ('' when nothing)."""
        notes = []
        if self.missing:
            notes.append(f"not on this kernel: {', '.join(self.missing)}")
        if self.stale_removed:
            notes.append(f"removed stale instance{'s' if len(self.stale_removed) > 1 else ''} "
                         f"{', '.join(self.stale_removed)} left by a dead process")
        return "; ".join(notes)


__all__ = ["DEFAULT_BUFFER_KB", "FormatError", "TraceInstance", "TracefsUnavailable", "choose_events"]
