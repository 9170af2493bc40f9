"""kvm events of another process through BPF: one small tracepoint program per kvm event writes a
compact record (event id, thread, CPU, CLOCK_MONOTONIC time, call-chain id, the tracepoint's own
record) into a BPF ring buffer, and each distinct kernel call chain is kept once, in a
``BPF_MAP_TYPE_STACK_TRACE`` map, which every record names by id.

Why (docs/tracing.md, "Two tracers"): the tracefs ``stacktrace`` trigger walks every chain, after
every event, copies it whole into the ring buffer, and kvmiso decodes every copy; a VMM that exits
70,000 times a second repeats the same few chains millions of times. Here a chain is walked
(``bpf_get_stackid``) only where the event's path key is new, on its first repeats and one in 256
after, and otherwise taken from the key and marked inferred (:func:`.bpfprog.event_program`); a
walk that disagrees is counted and its key re-verified from then (``--every-chain`` walks all);
and 4 bytes go to the ring buffer instead of 8 per frame. Whether a thread is traced is asked of
the traced set once per thread (again when the set changes) and kept in its task storage. The
kernel here has no kprobes and no fentry; tracepoint programs (``BPF_PROG_TYPE_TRACEPOINT`` on a
perf event of the tracepoint) attach, and their context is the very record the event's
``format`` file describes (its common fields excepted), so :class:`.traceformat.EventFormat`
decodes it as it decodes tracefs pages.

The programs hang on their tracepoints from :meth:`BpfTracer.open` on and test a flag that
:meth:`~BpfTracer.start` and :meth:`~BpfTracer.stop` set, as tracefs's ``tracing_on``: detaching
a tracepoint's last perf user waits for RCU grace periods (about half a second each on this
host), so it is done once, at close, for all of them side by side.

Nothing is left behind: the programs hang on perf events and the maps on file descriptors of
this process only (no pinning, no bpffs, no tracefs instance), so closing them, or the process
dying by any signal, SIGKILL included, detaches everything.

What it counts rather than hides: records the ring buffer had no room for and events whose
program the kernel skipped (``lost``), chains that did not fit the stack map (two chains in one
hash bucket), which are then copied whole into their record (``inline_chains``), so no event is
ever without its chain, chains inferred (``inferred``) and walks that disagreed with their key
(``chain_mismatches``).

>>> import threading
>>> with BpfTracer(["kvm:kvm_pio", "kvm:kvm_userspace_exit"], pids=[threading.get_native_id()]) as t:  # needs root
...     t.start(); result = m.run(); t.stop()
...     events = t.decode(t.read_raw())
>>> sorted({e.name for e in events}), all(e.stack for e in events)
(['kvm_pio', 'kvm_userspace_exit'], True)
"""

from __future__ import annotations

import ctypes
import mmap
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterable

from ... import interrupt
from ..kernel.bpf import (BPF_MAP_LOOKUP_ELEM, BPF_OBJ_GET_INFO_BY_FD, BPF_PROG_TEST_RUN, HIDE_ENV, BpfUnavailable, _bpf,
                          load_program)
from ..kernel.bpfmaps import (BPF_MAP_DELETE_ELEM, BPF_MAP_UPDATE_ELEM, MAP_ARRAY, MAP_HASH, MAP_PERCPU_ARRAY,
                               MAP_RINGBUF, MAP_STACK_TRACE, PERF_EVENT_IOC_ENABLE, PERF_EVENT_IOC_SET_BPF, ioctl,
                               map_call, map_create, perf_tracepoint, task_storage_map)
from ..kernel.bpfprog import (CACHE_ENTRY, COUNTERS, HEADER, INFERRED, INLINE, INLINED, LOST, MAX_DEPTH, MISMATCHED,
                               PROG_RAW_TRACEPOINT, PROG_TRACEPOINT, RB_BUSY, RB_DISCARD, RB_HDR, SWITCH, THREAD_STATE,
                               EventMaps, _payload, event_program, exit_program, fork_program, tid_program)
from .exitlog import TraceEvent
from .traceformat import EventFormat, FormatError
from .tracefs import choose_events
from .tracefsmount import TRACEFS, tracefs_root

STACK_BUCKETS = 16384  # distinct chains kept; a chain hashed onto a taken bucket is copied inline
CACHE_KEYS = 16384  # path keys remembered (bpfprog.event_program); a key past them is walked every time
RING_BYTES = 32 << 20  # a power of two: ~600,000 records of 56 bytes between two drains
DYNAMIC_EXTRA = 128  # bytes copied past a record's fixed part when it has __data_loc fields
# struct bpf_prog_info (include/uapi/linux/bpf.h): its size as kvmiso asks for it, and where
# recursion_misses is (since 5.12; a kernel that fills less leaves it 0)
PROG_INFO_BYTES, RECURSION_MISSES = 232, 208
CLOSERS = 96  # threads detaching perf events at close, one per event (see BpfTracer.close)


def _possible_cpus() -> int:
    from ..kernel.kobject import possible_cpus

    return possible_cpus(Path("/sys/devices/system/cpu/possible").read_text())


class BpfTracer:
    """The kvm events of ``pids`` (thread ids, and the threads and children they create from now
    on) through BPF, as :class:`.tracefs.TraceInstance` offers them: ``open``/``start``/``stop``/
    ``close``, ``read_raw`` (drained bytes) and ``decode`` (TraceEvents with their call chains),
    ``lost``, ``enabled``, ``missing``, ``describe``.

    ``events``: ``"kvm:kvm_pio"``, ``"kvm_pio"`` or a whole system (``"kvm"``), as tracefs takes
    them. Raises :class:`BpfUnavailable` (not root, BPF hidden or refused) or
    :class:`.tracefsmount.TracefsUnavailable` (the events' ids and formats come from tracefs).
    """

    def __init__(self, events: Iterable[str], pids: Iterable[int] = (), ring_bytes: int = RING_BYTES,
                 root: Path = TRACEFS, stack_buckets: int = STACK_BUCKETS, follow_forks: bool = False,
                 walk_every_chain: bool = False) -> None:
        self._requested = list(events)
        self.pids = set(pids)
        self.follow_forks = follow_forks
        self.ring_bytes = ring_bytes
        self.stack_buckets = stack_buckets
        self.walk_every_chain = walk_every_chain
        self._root_hint = root
        self.formats: dict[int, EventFormat] = {}
        self.enabled: list[str] = []
        self.missing: list[str] = []
        self._payload: dict[int, int] = {}
        self._fds: list[int] = []
        self._perf: list[int] = []  # perf events the programs hang on (closed first, in parallel)
        self._progs: dict[int, int] = {}
        self._maps: dict[str, int] = {}
        self._cons: mmap.mmap | None = None
        self._prod: mmap.mmap | None = None
        self._chains: dict[int, tuple[int, ...]] = {}
        self._kernel_tid: int | None = None
        self._recording = 0  # the switch the programs test (SWITCH): recording,
        self._generation = 0  # and the traced set's generation, bumped as it changes
        self._counted: dict[int, int] = {}  # the counters as close() last read them
        self._skipped = 0  # and the programs' skipped events
        self.records = 0  # decoded so far
        self.inferred = 0  # of them, records whose chain was their path key's, not walked
        self.foreign = self.unknown = self.orphan_stacks = 0  # as TraceInstance counts them

    # --- setting up and tearing down ------------------------------------------------------

    def __enter__(self) -> "BpfTracer":
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def open(self) -> None:
        """Create the maps, load and attach the programs (records wait for :meth:`start`)."""
        if os.environ.get(HIDE_ENV) == "1":
            raise BpfUnavailable(f"BPF hidden by {HIDE_ENV}=1")
        if os.geteuid() != 0:
            raise BpfUnavailable("tracing through BPF needs root (CAP_BPF and CAP_PERFMON)")
        root = tracefs_root(self._root_hint)
        try:
            self._setup(root)
        except OSError as e:  # perf_event_open or a map refused: this host's BPF cannot watch
            self.close()
            raise BpfUnavailable(f"{e.strerror or e}") from None
        except BaseException:
            self.close()
            raise

    def _fd(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    def _setup(self, root: Path) -> None:
        m = self._maps
        m["tids"] = self._fd(map_create(MAP_HASH, 4, 4, 16384, "kvmiso_tids"))
        m["threads"] = self._fd(task_storage_map(THREAD_STATE.size, "kvmiso_threads"))
        m["stacks"] = self._fd(map_create(MAP_STACK_TRACE, 4, 8 * MAX_DEPTH, self.stack_buckets, "kvmiso_chains"))
        m["ring"] = self._fd(map_create(MAP_RINGBUF, 0, 0, self.ring_bytes, "kvmiso_events"))
        m["counters"] = self._fd(map_create(MAP_PERCPU_ARRAY, 4, 8, COUNTERS, "kvmiso_counts"))
        m["on"] = self._fd(map_create(MAP_ARRAY, 4, SWITCH.size, 1, "kvmiso_on"))
        if not self.walk_every_chain:
            m["cache"] = self._fd(map_create(MAP_HASH, 8, CACHE_ENTRY.size, CACHE_KEYS, "kvmiso_paths"))
        maps = EventMaps(m["tids"], m["threads"], m["stacks"], m["ring"], m["counters"], m["on"], m.get("cache"))
        page = mmap.PAGESIZE
        self._cons = mmap.mmap(m["ring"], page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
        self._prod = mmap.mmap(m["ring"], page + 2 * self.ring_bytes, mmap.MAP_SHARED, mmap.PROT_READ, offset=page)
        self.add_pids(self.pids)
        sched = root / "events" / "sched"
        if self.follow_forks:
            self._trace_forks(sched)
        for fmt in self._choose(root):
            static = max(f.offset + f.size for f in fmt.fields)
            extra = DYNAMIC_EXTRA if any(f.dynamic for f in fmt.fields) else 0
            reason = next((f.offset for f in fmt.fields if f.name == "exit_reason" and fmt.name == "kvm_exit"), None)
            code = event_program(fmt.id, static, extra, maps, reason, ends_run=fmt.name == "kvm_userspace_exit")
            self._progs[fmt.id] = self._fd(load_program(code, PROG_TRACEPOINT, f"kvmiso_{fmt.name}"[:15]))
            self._attach(fmt.id, self._progs[fmt.id])  # records wait for start(): the "on" flag
            self._payload[fmt.id] = _payload(static, extra)
            self.formats[fmt.id] = fmt
            self.enabled.append(fmt.full_name)

    def _trace_forks(self, sched: Path) -> None:
        """The threads and children of traced threads are traced from birth, and leave the set
        when they exit (tracefs's ``event-fork``)."""
        tids = self._maps["tids"]
        fork = EventFormat.parse((sched / "sched_process_fork" / "format").read_text(), "sched")
        child = next(f for f in fork.fields if f.name == "child_pid")
        prog = self._fd(load_program(fork_program(tids, child.offset), PROG_TRACEPOINT, "kvmiso_fork"))
        self._attach(fork.id, prog)
        exit_ = EventFormat.parse((sched / "sched_process_exit" / "format").read_text(), "sched")
        prog = self._fd(load_program(exit_program(tids), PROG_TRACEPOINT, "kvmiso_exit"))
        self._attach(exit_.id, prog)

    def _choose(self, root: Path) -> list[EventFormat]:
        """The formats of the requested events this kernel has (the others in ``missing``)."""
        chosen, missing = choose_events(root / "events", self._requested)
        self.missing += missing
        return [EventFormat.parse((root / "events" / s / e / "format").read_text(), s) for s, e in dict.fromkeys(chosen)]

    def _attach(self, event_id: int, prog: int) -> None:
        fd = perf_tracepoint(event_id)
        self._perf.append(fd)
        ioctl(fd, PERF_EVENT_IOC_SET_BPF, prog)
        ioctl(fd, PERF_EVENT_IOC_ENABLE, 0)

    def close(self) -> None:
        """Detach and free everything (idempotent): closing the fds is all it takes. The perf
        events go first and in parallel: the last perf user of a tracepoint waits for RCU grace
        periods as it unregisters (perf_trace_event_unreg), about 0.5 s each on this host, 45 s
        for the 90 kvm events one after the other; 5.1 s 16 at a time, 3.6 s all at once (tracefs's
        instance: 3.4 s)."""
        if "counters" in self._maps and self._fds:
            self._counted = {i: self._counter(i) for i in (LOST, INLINED, MISMATCHED)}
            self._skipped = self.skipped()
        self._progs = {}  # their fds close below: skipped() answers from the reading above
        with interrupt.deferred():  # Ctrl-C or SIGTERM meanwhile: once every fd is closed
            self._maps.clear()
            for mm in (self._cons, self._prod):
                if mm is not None:
                    mm.close()
            self._cons = self._prod = None
            perf, self._perf = self._perf, []
            if len(perf) > 1:
                with ThreadPoolExecutor(min(CLOSERS, len(perf)), thread_name_prefix="kvmiso-detach") as pool:
                    list(pool.map(os.close, perf))
            elif perf:
                os.close(perf[0])
            fds, self._fds = self._fds, []
            for fd in reversed(fds):
                os.close(fd)

    # --- recording ------------------------------------------------------------------------

    def _switch(self) -> None:
        value = ctypes.create_string_buffer(SWITCH.pack(self._recording, self._generation), SWITCH.size)
        map_call(BPF_MAP_UPDATE_ELEM, self._maps["on"], ctypes.c_uint32(0), value)

    def start(self) -> None:
        """Records begin (the programs hang on their tracepoints from :meth:`open`: this only
        sets the flag they test, as tracefs's tracing_on)."""
        self._recording = 1
        self._switch()

    def stop(self) -> None:
        """Records end (at once: a flag, where detaching would take seconds, see :meth:`close`)."""
        self._recording = 0
        self._switch()

    def kernel_tid(self) -> int:
        """The calling thread's id as the kernel (and so every record) knows it, read through a
        test run of a program in this thread: gettid() inside a PID namespace is another number."""
        if self._kernel_tid is None:
            out = self._fd(map_create(MAP_ARRAY, 4, 8, 1, "kvmiso_tid"))
            prog = self._fd(load_program(tid_program(out), PROG_RAW_TRACEPOINT, "kvmiso_tid"))
            ctx = (ctypes.c_uint64 * 1)()
            _bpf(BPF_PROG_TEST_RUN, struct.pack("<IIIIQQIIIIQQII", prog, 0, 0, 0, 0, 0, 0, 0, ctypes.sizeof(ctx), 0,
                                                ctypes.addressof(ctx), 0, 0, 0))
            key, value = ctypes.c_uint32(0), ctypes.c_uint64(0)
            map_call(BPF_MAP_LOOKUP_ELEM, out, key, value)  # type: ignore[arg-type]
            self._kernel_tid = value.value & 0xFFFFFFFF
        return self._kernel_tid

    def add_pids(self, pids: Iterable[int]) -> None:
        """Trace these threads too (the kernel's set keeps the threads forks added)."""
        try:
            for t in pids:
                map_call(BPF_MAP_UPDATE_ELEM, self._maps["tids"], ctypes.c_uint32(t), ctypes.c_uint32(1))  # type: ignore[arg-type]
                self.pids.add(t)
        finally:
            self._generation += 1  # every thread asks the set again (its answer is kept till then)
            self._switch()

    def set_pids(self, pids: Iterable[int]) -> None:
        """Trace these threads (replacing the ones given before)."""
        pids = set(pids)
        for t in self.pids - pids:
            try:
                map_call(BPF_MAP_DELETE_ELEM, self._maps["tids"], ctypes.c_uint32(t))
            except OSError:
                pass  # gone already (it exited)
        self.pids = set()
        self.add_pids(pids)

    def read_raw(self) -> dict[int, bytes]:
        """Drain the ring buffer: the committed records as they are, in the order they were
        reserved (one buffer for every CPU: the key is 0)."""
        cons, prod = self._cons, self._prod
        assert cons is not None and prod is not None
        page, mask = mmap.PAGESIZE, self.ring_bytes - 1
        start = pos = struct.unpack_from("<Q", cons, 0)[0]
        end = struct.unpack_from("<Q", prod, 0)[0]
        unpack = struct.Struct("<I").unpack_from
        while pos < end:
            length = unpack(prod, page + (pos & mask))[0]
            if length & RB_BUSY:  # reserved, not yet committed: it and all after it wait
                break
            pos += (((length & ~RB_DISCARD) + RB_HDR) + 7) & ~7
        # headers first, then the bytes: a record whose header said committed has its data written
        data = prod[page + (start & mask): page + (start & mask) + (pos - start)]
        # one 8-byte store: struct.pack_into writes byte by byte, and the kernel, reading the
        # position half-written, refused about one record in a million as if the ring were full
        cons[0:8] = pos.to_bytes(8, "little")
        return {0: data}

    def decode(self, raw: dict[int, bytes]) -> list[TraceEvent]:
        """TraceEvents from drained ring-buffer bytes, in time order, each with its chain."""
        out: list[TraceEvent] = []
        for data in raw.values():
            out += self._decode(data)
        out.sort(key=lambda e: e.ts_ns)
        return out

    def _decode(self, data: bytes) -> list[TraceEvent]:
        out, pos, n = [], 0, len(data)
        common = struct.Struct("<HBBi")
        while pos + RB_HDR <= n:
            length = struct.unpack_from("<I", data, pos)[0]
            body = pos + RB_HDR
            pos += (((length & ~RB_DISCARD) + RB_HDR) + 7) & ~7
            if length & RB_DISCARD:
                continue
            event_id, flags, tid, ts, chain, cpu = HEADER.unpack_from(data, body)
            fmt = self.formats.get(event_id)
            if fmt is None:
                self.unknown += 1
                continue
            payload = self._payload[event_id]
            rec_at = body + HEADER.size
            record = common.pack(event_id, 0, 0, tid) + data[rec_at: rec_at + payload]
            self.inferred += bool(flags & INFERRED)
            if flags & INLINE:
                stack = struct.unpack_from(f"<{max(chain, 0) // 8}Q", data, rec_at + payload)
            else:
                stack = self._chain(chain)
            try:
                fields, symbols = fmt.decode(record)
            except FormatError:
                self.unknown += 1
                continue
            out.append(TraceEvent(ts, fmt.system, fmt.name, cpu, tid, fields, symbols, stack))
        self.records += len(out)
        return out

    def _chain(self, chain_id: int) -> tuple[int, ...]:
        got = self._chains.get(chain_id)
        if got is None:
            value = (ctypes.c_uint64 * MAX_DEPTH)()
            try:
                map_call(BPF_MAP_LOOKUP_ELEM, self._maps["stacks"], ctypes.c_uint32(chain_id), value)  # type: ignore[arg-type]
                got = tuple(a for a in value if a)  # the map zero-fills past the chain
            except OSError:
                got = ()
            self._chains[chain_id] = got
        return got

    def _counter(self, index: int) -> int:
        if "counters" not in self._maps:
            return self._counted.get(index, 0)
        values = (ctypes.c_uint64 * _possible_cpus())()  # a per-CPU map's value: one per possible CPU
        map_call(BPF_MAP_LOOKUP_ELEM, self._maps["counters"], ctypes.c_uint32(index), values)  # type: ignore[arg-type]
        return sum(values)

    @property
    def lost(self) -> int:
        """Events lost whole, chain and all: records the ring buffer had no room for, and events
        whose program the kernel skipped (:meth:`skipped`)."""
        return self._counter(LOST) + self.skipped()

    def skipped(self) -> int:
        """Events whose program did not run: a tracepoint that fires while a BPF program runs on
        its CPU (in an interrupt, say) skips its own (trace_call_bpf's bpf_prog_active), and
        counts it in the program's ``recursion_misses``."""
        if not self._progs:
            return self._skipped
        infos = [ctypes.create_string_buffer(PROG_INFO_BYTES) for _ in self._progs]
        for fd, info in zip(self._progs.values(), infos):
            _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, PROG_INFO_BYTES, ctypes.addressof(info)))
        return sum(struct.unpack_from("<Q", info, RECURSION_MISSES)[0] for info in infos)

    @property
    def inline_chains(self) -> int:
        """Events whose chain the stack map could not keep (a full hash bucket): copied inline."""
        return self._counter(INLINED)

    @property
    def chain_mismatches(self) -> int:
        """Walks that found another chain than their path key had (the key takes the walked
        chain; records inferred on it, before or since, may carry another path's chain)."""
        return self._counter(MISMATCHED)

    @property
    def chains(self) -> int:
        """Distinct call chains read back from the stack map so far."""
        return len(self._chains)

    def describe(self) -> str:
        """What could not be traced, in one line ('' when nothing)."""
        return f"not on this kernel: {', '.join(self.missing)}" if self.missing else ""


__all__ = ["BpfTracer", "MAX_DEPTH", "event_program"]
