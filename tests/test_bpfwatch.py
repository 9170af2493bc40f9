"""The BPF watcher (kvmiso.observe.bpfwatch) on the real device, against the tracefs path it
stands in for: the same events with the same fields from the same run, each with the call chain
the tracefs ``stacktrace`` trigger gives it, lost records counted, and nothing left in the
kernel once it is closed or its process is killed."""

import ctypes
import os
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kvmiso.guest import Machine
from kvmiso.observe.bpf import _bpf
from kvmiso.observe.bpfwatch import BpfTracer
from kvmiso.observe.kallsyms import read_kallsyms
from kvmiso.observe.tracefs import TraceInstance
from kvmiso.observe.tracefsmount import TracefsUnavailable

EVENTS = ["kvm"]  # every kvm event: the programs of all of them load and attach
EXITS = 3000
OBSERVER = ("trace_event_raw_event_", "__traceiter_", "perf_trace_")  # access.toml's observer prefixes
BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID, BPF_OBJ_GET_INFO_BY_FD = 13, 14, 15


def _both(bpf_kwargs=None, exits=EXITS):
    """One guest run of kvmiso's own bench_out payload (a port OUT per KVM_RUN) traced by both
    watchers at once: (BPF events, tracefs events, the BpfTracer, the TraceInstance)."""
    with TraceInstance(EVENTS, stacks=True, buffer_kb=16384, follow_forks=True) as t:
        me = t.kernel_tid()
        t.set_pids([me])
        with BpfTracer(EVENTS, pids=[me], follow_forks=True, **(bpf_kwargs or {})) as b:
            t.start()
            b.start()
            with Machine("bench_out", mode="long") as m:
                result = m.run(max_exits=exits, record=False)
            b.stop()
            t.stop()
            assert result.runs == exits
            return b.decode(b.read_raw()), t.read(), b, t


def _outs(events):
    return [e for e in events if e.name == "kvm_pio" and e.fields["rw"] == 1]


@pytest.mark.parametrize("buckets", [None, 1], ids=["stack-map", "chains-inline"])
def test_bpf_sees_what_tracefs_sees(kvm, tracing, buckets):
    """Event for event: name, thread, fields; and the chain is tracefs's below its top frame
    (tracefs's trigger starts in the tracepoint's probe, trace_event_raw_event_*, BPF one frame
    down: both the tracing's own frames, which the check skips). With a stack
    map of one bucket, chains that collide are copied into their records, and are the same."""
    be, te, b, t = _both({"stack_buckets": buckets} if buckets else None)
    assert b.lost == 0 and t.lost == 0
    assert len(_outs(be)) == len(_outs(te)) == EXITS  # one kvm_pio OUT per KVM_RUN
    assert [(e.name, e.pid, e.fields) for e in be] == [(e.name, e.pid, e.fields) for e in te]
    assert all(e.stack for e in be) and all(e.stack for e in te)
    assert [e.stack for e in be] == [e.stack[1:] for e in te]
    symbols = read_kallsyms()
    if symbols is not None:  # kallsyms readable: the dropped frame is the probe's
        tops = {symbols.resolve(e.stack[0])[0] for e in te}
        assert all(top.startswith("trace_event_raw_event_") for top in tops), tops
    if buckets == 1:
        assert b.inline_chains > 0 and b.chains <= 1
    else:
        assert b.inline_chains == 0 and 0 < b.chains < 64  # the few distinct chains, kept once


def test_a_full_ring_counts_every_record_it_lost(kvm, tracing):
    """A ring buffer of one page, drained only at the end: what did not fit is counted, and the
    records kept plus the ones lost are exactly the events tracefs saw."""
    be, te, b, t = _both({"ring_bytes": 4096})
    assert t.lost == 0 and b.lost > 0
    assert len(be) + b.lost == len(te)


def _links() -> dict[int, str]:
    fds = {}
    for n in os.listdir("/proc/self/fd"):
        try:
            fds[int(n)] = os.readlink(f"/proc/self/fd/{n}")
        except OSError:
            pass
    return fds


def _bpf_ids(links: dict[int, str]) -> list[tuple[int, int]]:
    """(get-fd-by-id command, id) of every BPF program and map among ``links``."""
    ids = []
    for fd, link in links.items():
        cmd = {"anon_inode:bpf-prog": BPF_PROG_GET_FD_BY_ID, "anon_inode:bpf-map": BPF_MAP_GET_FD_BY_ID}.get(link)
        if cmd is None:
            continue
        info = ctypes.create_string_buffer(256)
        try:
            _bpf(BPF_OBJ_GET_INFO_BY_FD, struct.pack("<IIQ", fd, 256, ctypes.addressof(info)))
        except OSError:
            continue  # the listing's own fd, gone
        ids.append((cmd, struct.unpack_from("<I", info, 4)[0]))
    return ids


def _gone(ids: list[tuple[int, int]], wait_s: float = 120) -> list[tuple[int, int]]:
    """The ids still alive in the kernel once ``wait_s`` passed (the kernel frees a program
    after RCU grace periods, seconds on a loaded host)."""
    deadline = time.monotonic() + wait_s
    while True:
        alive = []
        for cmd, i in ids:
            try:
                fd, _ = _bpf(cmd, struct.pack("<IIII", i, 0, 0, 0))
            except OSError:
                continue
            os.close(fd)
            alive.append((cmd, i))
        if not alive or time.monotonic() > deadline:
            return alive
        time.sleep(0.2)


def test_closing_leaves_no_fd_and_no_program(kvm, tracing):
    before = _links()
    with BpfTracer(EVENTS, pids=[threading.get_native_id()], follow_forks=True) as b:
        b.start()
        with Machine("bench_out", mode="long") as m:
            m.run(max_exits=10, record=False)
        b.stop()
        ids = _bpf_ids(_links())
        assert len(b.decode(b.read_raw())) >= 10
    assert _links() == before
    assert len(ids) > len(b.enabled) and _gone(ids) == []
    with pytest.raises(TracefsUnavailable, match="none of the requested events"):
        BpfTracer(["kvm:no_such_event"], pids=[1]).open()
    assert _links() == before  # a failed open closed what it had opened


def test_a_killed_watcher_leaves_no_program(kvm, tracing):
    """SIGKILL, which no handler sees: the programs hang on this process's fds only."""
    code = textwrap.dedent(f"""
        import os, signal, sys, threading
        sys.path[:0] = {sys.path!r}
        from test_bpfwatch import _bpf_ids, _links
        from kvmiso.observe.bpfwatch import BpfTracer
        t = BpfTracer({EVENTS!r}, pids=[threading.get_native_id()], follow_forks=True)
        t.open()
        t.start()
        print(_bpf_ids(_links()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
        """)
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                       cwd=Path(__file__).parent)
    assert p.returncode == -signal.SIGKILL, p.stderr
    ids = [tuple(x) for x in eval(p.stdout)]
    assert ids and _gone(ids) == []
