"""The BPF watcher (kvmiso.observe.tracing.bpfwatch) on the real device, against the tracefs path it
stands in for: the same events with the same fields from the same run, each with the call chain
the tracefs ``stacktrace`` trigger gives it, lost records counted, and nothing left in the
kernel once it is closed or its process is killed."""

import ctypes
import os
import shutil
import signal
import struct
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from kvmiso.cli import main
from kvmiso.guest import Machine
from kvmiso.observe.kernel.bpf import BPF_MAP_LOOKUP_ELEM, BPF_OBJ_GET_INFO_BY_FD, HIDE_ENV, _bpf
from kvmiso.observe.kernel.bpfmaps import BPF_MAP_UPDATE_ELEM, map_call
from kvmiso.observe.kernel.bpfprog import CACHE_ENTRY
from kvmiso.observe.kernel.kallsyms import read_kallsyms
from kvmiso.observe.tracing.bpfwatch import STACK_BUCKETS, BpfTracer
from kvmiso.observe.tracing.exitlog import read_jsonl
from kvmiso.observe.tracing.tracefs import TraceInstance
from kvmiso.observe.tracing.tracefsmount import TracefsUnavailable

EVENTS = ["kvm"]  # every kvm event: the programs of all of them load and attach
EXITS = 3000
OBSERVER = ("trace_event_raw_event_", "__traceiter_", "perf_trace_")  # access.toml's observer prefixes
QEMU = shutil.which("qemu-system-x86_64")
GUEST = Path(__file__).parent / "guests" / "multiboot.S"
BPF_MAP_GET_NEXT_KEY, BPF_PROG_GET_FD_BY_ID, BPF_MAP_GET_FD_BY_ID = 4, 13, 14


def _both(bpf_kwargs=None, exits=EXITS, between=None, end=None):
    """One guest run of kvmiso's own bench_out payload (a port OUT per KVM_RUN) traced by both
    watchers at once: (BPF events, tracefs events, the BpfTracer, the TraceInstance). With
    ``between``, the run is two of ``exits`` each, and ``between(tracer)`` runs between them;
    ``end(tracer)`` runs before the tracer closes."""
    with TraceInstance(EVENTS, stacks=True, buffer_kb=16384, follow_forks=True) as t:
        me = t.kernel_tid()
        t.set_pids([me])
        with BpfTracer(EVENTS, pids=[me], follow_forks=True, **(bpf_kwargs or {})) as b:
            t.start()
            b.start()
            with Machine("bench_out", mode="long") as m:
                runs = m.run(max_exits=exits, record=False).runs
                if between is not None:
                    between(b)
                    runs += m.run(max_exits=exits, record=False).runs
            b.stop()
            t.stop()
            if end is not None:
                end(b)
            assert runs == exits * (2 if between is not None else 1)
            return b.decode(b.read_raw()), t.read(), b, t


def _outs(events):
    return [e for e in events if e.name == "kvm_pio" and e.fields["rw"] == 1]


@pytest.mark.parametrize("kwargs", [{}, {"walk_every_chain": True}, {"stack_buckets": 1}],
                         ids=["path-cache", "every-chain", "chains-inline"])
def test_bpf_sees_what_tracefs_sees(kvm, tracing, kwargs):
    """Event for event: name, thread, fields; and the chain is tracefs's below its top frame
    (tracefs's trigger starts in the tracepoint's probe, trace_event_raw_event_*, BPF one frame
    down: both the tracing's own frames, which the check skips). By default most chains are
    inferred from their path, not walked, and still every one is the walked chain tracefs gives;
    with a stack map of one bucket, chains that collide are copied into their records, and are
    the same."""
    be, te, b, t = _both(kwargs)
    assert b.lost == 0 and t.lost == 0
    assert len(_outs(be)) == len(_outs(te)) == EXITS  # one kvm_pio OUT per KVM_RUN
    assert [(e.name, e.pid, e.fields) for e in be] == [(e.name, e.pid, e.fields) for e in te]
    assert all(e.stack for e in be) and all(e.stack for e in te)
    assert [e.stack for e in be] == [e.stack[1:] for e in te]
    symbols = read_kallsyms()
    if symbols is not None:  # kallsyms readable: the dropped frame is the probe's
        tops = {symbols.resolve(e.stack[0])[0] for e in te}
        assert all(top.startswith("trace_event_raw_event_") for top in tops), tops
    assert b.chain_mismatches == 0
    if kwargs.get("stack_buckets") == 1:
        assert b.inline_chains > 0 and b.chains <= 1 and b.inferred == 0  # a chain inline is walked
    else:
        assert b.inline_chains == 0 and 0 < b.chains < 64  # the few distinct chains, kept once
    if not kwargs:  # a walk per new path, its first repeats, and 1 in VERIFY_EVERY after
        assert b.inferred > len(be) * 3 // 4, (b.inferred, len(be))
    else:
        assert b.inferred == 0


def _cache(b: BpfTracer) -> dict[int, tuple[int, int]]:
    """The path cache: key -> (chain id, times seen)."""
    fd, entries = b._maps["cache"], {}
    key, following = ctypes.c_uint64(0xFFFFFFFFFFFFFFFF), ctypes.c_uint64()
    while True:
        try:
            map_call(BPF_MAP_GET_NEXT_KEY, fd, key, following)
        except OSError:
            return entries
        value = ctypes.create_string_buffer(CACHE_ENTRY.size)
        map_call(BPF_MAP_LOOKUP_ELEM, fd, following, value)
        entries[following.value] = CACHE_ENTRY.unpack(value.raw)
        key.value = following.value


def test_a_path_whose_walk_disagrees_takes_the_walked_chain(kvm, tracing):
    """Between two runs every path key is given a chain id no walk can return (the stack map's
    ids are its buckets, all below STACK_BUCKETS): the next walk of each key met again (seen
    once: verified at once) disagrees, is counted, and gives the key the chain it walked, so
    every event's chain is still tracefs's. A key that two call paths share on this host
    disagrees again later and may end on the other path's chain: each such key costs a
    disagreement more, so the keys not back on their own chain are at most the surplus."""
    poisoned: dict[int, int] = {}
    before: list[int] = []
    after: dict[int, tuple[int, int]] = {}

    def poison(b: BpfTracer) -> None:
        before.append(b.chain_mismatches)
        for key, (chain, _) in _cache(b).items():
            map_call(BPF_MAP_UPDATE_ELEM, b._maps["cache"], ctypes.c_uint64(key),
                     ctypes.create_string_buffer(CACHE_ENTRY.pack(STACK_BUCKETS, 1)))
            poisoned[key] = chain

    be, te, b, _ = _both(exits=500, between=poison, end=lambda b: after.update(_cache(b)))
    assert [e.stack for e in be] == [e.stack[1:] for e in te]
    caught = [k for k in poisoned if after[k] != (STACK_BUCKETS, 1)]  # met again after the poisoning
    assert caught and all(after[k][0] != STACK_BUCKETS for k in caught)  # none kept the planted id
    disagreed = b.chain_mismatches - before[0]
    assert disagreed >= len(caught)  # each counted
    elsewhere = [k for k in caught if after[k][0] != poisoned[k]]
    assert len(elsewhere) <= disagreed - len(caught), (elsewhere, disagreed, len(caught))


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
        from kvmiso.observe.tracing.bpfwatch import STACK_BUCKETS, BpfTracer
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


@pytest.mark.parametrize("argv, why", [
    (["trace", "portio", "--tracer", "bpf"], "--tracer is for --pid or -- COMMAND"),
    (["trace", "--pid", "1", "--tracer", "ftrace"], "invalid choice: 'ftrace'"),
    (["trace", "--pid", "1", "--tracer", "tracefs", "--every-chain"], "--every-chain is for the bpf tracer"),
    (["check", "portio", "--every-chain"], "--every-chain is for the bpf tracer of --pid or -- COMMAND"),
])
def test_bad_tracer_is_one_line_status_2(argv, why, capsys):
    try:
        status = main(argv)
    except SystemExit as e:  # argparse's refusal of a choice
        status = e.code
    assert status == 2
    err = capsys.readouterr().err
    assert why in err and len(err.strip().splitlines()) == 1


def _image(tmp_path, count):
    obj, elf = tmp_path / "mb.o", tmp_path / f"mb{count}.elf"
    subprocess.run(["as", "--32", f"--defsym=COUNT={count}", "-o", str(obj), str(GUEST)], check=True)
    subprocess.run(["ld", "-m", "elf_i386", "-Ttext=0x100000", "-o", str(elf), str(obj)], check=True)
    return elf


def _qemu(elf, debugcon):
    return [QEMU, "-enable-kvm", "-nodefaults", "-display", "none", "-m", "64", "-kernel", str(elf),
            "-debugcon", f"file:{debugcon}", "-device", "isa-debug-exit,iobase=0xf4"]


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
def test_trace_a_command_through_bpf_and_tracefs(kvm, tmp_path, capsys):
    """`trace -- QEMU` through each tracer: the header says which ran; both logs hold one
    port-0xe9 OUT per debugcon byte, with the same chain below the tracing's own frames; the
    check reads the BPF log as it reads tracefs's."""
    count, logs = 37, {}
    for tracer in ("bpf", "tracefs"):
        con, log, ev = tmp_path / f"{tracer}.con", tmp_path / f"{tracer}.jsonl", tmp_path / f"{tracer}.ev.json"
        rc = main(["trace", "--tracer", tracer, "--json", str(log), "--evidence", str(ev), "--",
                   *_qemu(_image(tmp_path, count), con)])
        out = capsys.readouterr().out
        assert rc == 1 and f"in-kernel kvm events through {tracer} " in out, out
        assert con.read_bytes().count(b"K") == count
        got = logs[tracer] = read_jsonl(log)
        assert got.host["tracer"] == tracer and got.lost_events == 0
        outs = [e for _, e in got.events() if e.name == "kvm_pio" and e.fields["port"] == 0xE9 and e.fields["rw"] == 1]
        assert len(outs) == count and all(e.stack for _, e in got.events())
        assert main(["check", "--policy", "asi", str(log), "--evidence", str(ev)]) == 0
        assert "exits checked" in capsys.readouterr().out

    symbols = read_kallsyms()
    if symbols is None:
        pytest.skip("kallsyms is hidden: the chains' tracing frames cannot be named")

    def chains(log):
        """The OUTs' chains below the tracing's own frames: the tracepoint's iterator is on the
        stack only while it has several probes (anybody's), so two runs may differ in it."""
        def below(stack):
            names = [symbols.resolve(a)[0] for a in stack]
            return stack[next(i for i, n in enumerate(names) if not n.startswith(OBSERVER)):]
        return {below(e.stack) for _, e in log.events() if e.name == "kvm_pio" and e.fields["rw"] == 1
                and e.fields["port"] == 0xE9}

    assert chains(logs["bpf"]) == chains(logs["tracefs"]) and len(chains(logs["bpf"])) == 1


@pytest.mark.skipif(QEMU is None, reason="qemu-system-x86_64 is not installed (Debian: qemu-system-x86)")
def test_without_bpf_the_trace_runs_through_tracefs_and_says_so(kvm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv(HIDE_ENV, "1")
    con = tmp_path / "con"
    assert main(["trace", "--tracer", "bpf", "--", *_qemu(_image(tmp_path, 5), con)]) == 1
    cap = capsys.readouterr()
    notes = [line for line in cap.err.splitlines() if "BPF" in line]
    assert len(notes) == 1 and "tracing through tracefs" in notes[0], cap.err
    assert "in-kernel kvm events through tracefs " in cap.out
