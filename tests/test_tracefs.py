"""tracefs: format files and ring-buffer pages parsed from recorded samples and from records
built with the kernel's own kvm_exit format (Intel and AMD), then the private instance on
the live tracefs: created, filtered, removed on every way out, stale ones cleaned."""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmiso.observe.tracing.exitlog import TraceEvent
from kvmiso.observe.tracing.ringbuffer import (MISSED_EVENTS, MISSED_STORED, TS_SHIFT, TYPE_PADDING, TYPE_TIME_EXTEND, PageHeader, decode_buffers, parse_page)
from kvmiso.observe.tracing.traceformat import EventFormat, FormatError
from kvmiso.observe.tracing.tracefs import TraceInstance, TracefsUnavailable
from kvmiso.observe.tracing.tracefsmount import tracefs_root

FIXTURES = Path(__file__).parent / "fixtures" / "trace"
HOST = FIXTURES / "host"


# --- building records and pages the way the kernel writes them --------------------------------

def encode_record(fmt: EventFormat, pid: int = 1234, **values) -> bytes:
    """A record of ``fmt`` with ``values`` at the offsets its format file gives."""
    size = max(f.offset + f.size for f in fmt.fields)
    rec = bytearray((size + 3) & ~3)
    for f in fmt.fields:
        v = {"common_type": fmt.id, "common_pid": pid, **values}.get(f.name, 0)
        rec[f.offset : f.offset + f.size] = (v & ((1 << (8 * f.size)) - 1)).to_bytes(f.size, "little")
    return bytes(rec)


def build_page(records: list[tuple[int, bytes]], base_ts: int = 0, header: PageHeader = PageHeader(),
               page_size: int = 4096, missed: int | None = None, discard_after: int | None = None) -> bytes:
    """A ring-buffer page as kernel/trace/ring_buffer.c lays it out: 27-bit time deltas,
    TIME_EXTEND beyond them, type_len 0 plus a length word past 112 bytes, a discarded event
    (padding with a delta) after record ``discard_after``, and the missed-events flags."""
    out = bytearray()
    ts = base_ts
    for i, (t, rec) in enumerate(records):
        delta = t - ts
        if delta >= 1 << TS_SHIFT:
            out += struct.pack("<II", TYPE_TIME_EXTEND | ((delta & ((1 << TS_SHIFT) - 1)) << 5), delta >> TS_SHIFT)
            delta = 0
        if len(rec) <= 28 * 4:
            out += struct.pack("<I", (len(rec) // 4) | (delta << 5)) + rec
        else:
            out += struct.pack("<II", delta << 5, len(rec) + 4) + rec
        ts = t
        if i == discard_after:
            # rb_event_discard(): array[0] is the length after the header word, itself included
            out += struct.pack("<II", TYPE_PADDING | (1 << 5), 4 + 12) + b"\xee" * 12
    page = bytearray(page_size)
    struct.pack_into("<Q", page, header.timestamp_offset, base_ts)
    commit = len(out)
    if missed is not None:
        commit |= MISSED_EVENTS | MISSED_STORED
        out += struct.pack("<Q", missed)
    page[header.commit_offset : header.commit_offset + header.commit_size] = commit.to_bytes(header.commit_size, "little")
    page[header.data_offset : header.data_offset + len(out)] = out
    return bytes(page)


def load_format(path: Path) -> EventFormat:
    system = path.name.split(".")[0]
    return EventFormat.parse(path.read_text(), system)


# --- the sample recorded on this host ---------------------------------------------------------

def host_sample(pids=None) -> list[TraceEvent]:
    meta = json.loads((HOST / "meta.json").read_text())
    formats = {f.id: f for f in (load_format(p) for p in HOST.glob("*.format"))}
    raw = {int(p.stem[3:]): p.read_bytes() for p in HOST.glob("cpu*.raw")}
    header = PageHeader.parse((HOST / "header_page").read_text())
    d = decode_buffers(raw, header, meta["page_size"], formats, set(meta["pids"]) if pids is None else pids)
    assert d.unknown == 0 and d.missed == 0
    return d.events


def test_host_sample_has_every_payloads_events():
    events = host_sample()
    by = lambda name: [e for e in events if e.name == name]  # noqa: E731
    pio = [(e.fields["port"], e.fields["size"], e.fields["val"]) for e in by("kvm_pio") if e.fields["rw"] == 1]
    assert (0x3000, 1, 0xA5) in pio and (0x3002, 2, 0xBEEF) in pio
    assert [(e.fields["function"], e.fields["index"]) for e in by("kvm_cpuid")] == [(0, 0), (1, 0)]
    writes = [e for e in by("kvm_mmio") if e.symbols.get("type") == "write"]
    assert [(e.fields["gpa"], e.fields["len"], e.fields["val"]) for e in writes] == [(0xD0000000, 4, 0x12345678)]
    reasons = {e.symbols["reason"] for e in by("kvm_userspace_exit")}
    assert reasons == {"KVM_EXIT_IO", "KVM_EXIT_MMIO"}
    insn = by("kvm_emulate_insn")
    assert insn and all(e.symbols["flags"] == "prot64" for e in insn)
    assert [e.ts_ns for e in events] == sorted(e.ts_ns for e in events)


def test_host_sample_other_threads_are_filtered_and_counted():
    meta = json.loads((HOST / "meta.json").read_text())
    formats = {f.id: f for f in (load_format(p) for p in HOST.glob("*.format"))}
    raw = {int(p.stem[3:]): p.read_bytes() for p in HOST.glob("cpu*.raw")}
    d = decode_buffers(raw, PageHeader.parse((HOST / "header_page").read_text()), meta["page_size"], formats, {1})
    assert d.events == [] and d.foreign == len(host_sample())


def test_every_host_format_parses():
    for p in [*HOST.glob("*.format"), *FIXTURES.glob("*.format")]:
        fmt = load_format(p)
        assert fmt.fields[0].name == "common_type" and fmt.id > 0
        assert fmt.print_fmt and fmt.args, p.name


# --- kvm_exit on Intel and AMD, from the kernel's own format ----------------------------------

INTEL = [(30, "IO_INSTRUCTION"), (10, "CPUID"), (48, "EPT_VIOLATION"), (12, "HLT"), (31, "MSR_READ"),
         (0x80000021, "INVALID_STATE FAILED_VMENTRY")]
AMD = [(0x7B, "io"), (0x72, "cpuid"), (0x400, "npf"), (0x78, "hlt"), (0x7C, "msr"), (0x40 + 14, "PF excp")]


@pytest.mark.parametrize("fixture", ["kvm.kvm_exit.format", "kvm.kvm_exit.v4.format"])
@pytest.mark.parametrize("isa,table", [(1, INTEL), (2, AMD)], ids=["intel", "amd"])
def test_kvm_exit_reasons_named_from_the_format(fixture, isa, table):
    fmt = load_format(FIXTURES / fixture)
    if "v4" in fixture:
        table = [(r, n) for r, n in table if r < 0x80000000 and n not in ("MSR_READ", "msr")][:4]
    recs = [(1000 + 10 * i, encode_record(fmt, exit_reason=r, isa=isa, guest_rip=0xFFFF0 + i, info1=i, vcpu_id=0))
            for i, (r, _) in enumerate(table)]
    page = build_page(recs, base_ts=1000)
    d = decode_buffers({3: page}, PageHeader(), 4096, {fmt.id: fmt}, {1234})
    assert [e.kind for e in d.events] == [n for _, n in table]
    assert [(e.ts_ns, e.cpu, e.fields["guest_rip"], e.fields["info1"]) for e in d.events] == [
        (1000 + 10 * i, 3, 0xFFFF0 + i, i) for i in range(len(table))]


def test_kvm_exit_print_symbolic_u64_variant():
    # later kernels widen the SVM exit code: __print_symbolic_u64 / __print_flags_u64
    text = (FIXTURES / "kvm.kvm_exit.format").read_text()
    text = text.replace("__print_symbolic(REC->exit_reason,", "__print_symbolic_u64(REC->exit_reason,")
    text = text.replace("__print_flags(", "__print_flags_u64(")
    fmt = EventFormat.parse(text, "kvm")
    _, sym = fmt.decode(encode_record(fmt, exit_reason=0x400, isa=2))
    assert sym == {"exit_reason": "npf"}
    _, sym = fmt.decode(encode_record(fmt, exit_reason=0x80000021, isa=1))
    assert sym == {"exit_reason": "INVALID_STATE FAILED_VMENTRY"}


def test_unknown_reason_keeps_the_number():
    fmt = load_format(FIXTURES / "kvm.kvm_exit.format")
    fields, sym = fmt.decode(encode_record(fmt, exit_reason=999, isa=1))
    ev = TraceEvent(0, "kvm", "kvm_exit", 0, 1, fields, sym)
    assert sym == {} and ev.kind == "exit_reason 0x3e7"


# --- ring-buffer page encoding ----------------------------------------------------------------

def test_page_time_extend_long_records_discarded_events_and_missed_count():
    fmt = load_format(FIXTURES / "kvm.kvm_exit.format")  # 72 bytes: a short record
    t0 = 5 << 40
    recs = [(t0 + 1, encode_record(fmt, exit_reason=30, isa=1)),
            # a time extend, then a record over 112 bytes (type_len 0 and a length word)
            (t0 + 3 * (1 << TS_SHIFT) + 7, encode_record(fmt, exit_reason=10, isa=1) + bytes(64)),
            (t0 + 3 * (1 << TS_SHIFT) + 9, encode_record(fmt, exit_reason=12, isa=1))]
    page = build_page(recs, base_ts=t0, missed=17, discard_after=0)
    parsed = parse_page(page, PageHeader(), cpu=1)
    assert parsed.missed == 17
    assert [e.ts for e in parsed.events] == [t for t, _ in recs]
    assert [fmt.decode(e.data)[1]["exit_reason"] for e in parsed.events] == ["IO_INSTRUCTION", "CPUID", "HLT"]
    assert len(parsed.events[1].data) == 136


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1 << 40), st.binary(min_size=8, max_size=160)), max_size=20),
       st.integers(0, 1 << 60))
def test_pages_the_kernel_writes_parse_back(items, base):
    # any mix of deltas (27-bit or extended) and record sizes (type_len 1..28 or 0 + length)
    recs, t = [], base
    for delta, data in items:
        t += delta
        recs.append((t, data + b"\0" * (-len(data) % 4)))
    parsed = parse_page(build_page(recs, base_ts=base), PageHeader(), cpu=2)
    assert [(e.ts, e.data, e.cpu) for e in parsed.events] == [(t, d, 2) for t, d in recs]
    assert parsed.missed == 0


def test_header_page_and_bad_input():
    assert PageHeader.parse((HOST / "header_page").read_text()) == PageHeader()
    with pytest.raises(FormatError):
        PageHeader.parse("nothing here")
    with pytest.raises(FormatError):
        EventFormat.parse("print fmt: \"x\"", "kvm")
    with pytest.raises(FormatError):
        parse_page(b"\0" * 8, PageHeader())
    fmt = load_format(FIXTURES / "kvm.kvm_exit.format")
    with pytest.raises(FormatError, match="kvm:kvm_exit record of 12 bytes"):
        fmt.decode(encode_record(fmt)[:12])


# --- the live instance ------------------------------------------------------------------------

@pytest.fixture
def tracefs(tracing):
    return tracefs_root()  # where root and the kernel allow tracing, finding it must work


def _instances(root: Path) -> set[str]:
    return set(os.listdir(root / "instances"))


def test_instance_created_filtered_and_removed(tracefs):
    with TraceInstance(["kvm:kvm_pio", "kvm_userspace_exit"]) as t:
        assert t.path.name == f"kvmiso-{os.getpid()}" and t.path.is_dir()
        assert (t.path / "trace_clock").read_text().split("[")[1].startswith("mono]")
        assert set(map(int, (t.path / "set_event_pid").read_text().split())) == t.pids
        assert t.enabled == ["kvm:kvm_pio", "kvm:kvm_userspace_exit"] and t.missing == []
        path = t.path
    assert not path.exists()


def test_added_pids_keep_what_the_kernel_added_to_the_filter(tracefs):
    # event-fork adds a traced thread's new children to set_event_pid; adding ids later (a
    # watched process's threads, listed again once the filter is in place) must keep them
    with TraceInstance(["kvm:kvm_pio"], pids=[os.getpid()]) as t:
        top = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1  # ids the filter takes
        kernel_added, listed = top, top - 1
        fd = os.open(t.path / "set_event_pid", os.O_WRONLY)  # no O_TRUNC: as event-fork adds
        os.write(fd, str(kernel_added).encode())
        os.close(fd)
        t.add_pids([os.getpid(), listed])
        assert set(map(int, (t.path / "set_event_pid").read_text().split())) == {os.getpid(), kernel_added, listed}
        assert t.pids == {os.getpid(), listed}


def test_instance_removed_after_an_exception(tracefs):
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(RuntimeError):
        with TraceInstance(["kvm:kvm_pio"]) as t:
            path = t.path
            raise RuntimeError("boom")
    assert not path.exists()
    assert signal.getsignal(signal.SIGTERM) == before  # the SIGTERM handler is restored


def test_missing_events_are_named_and_the_rest_enabled(tracefs):
    with TraceInstance(["kvm:kvm_pio", "kvm:kvm_nonesuch", "nosys:thing", "kvm_cpuid"]) as t:
        assert t.enabled == ["kvm:kvm_pio", "kvm:kvm_cpuid"]
        assert t.missing == ["kvm:kvm_nonesuch", "nosys:thing"]
        assert "not on this kernel: kvm:kvm_nonesuch, nosys:thing" in t.describe()
    with pytest.raises(TracefsUnavailable, match="none of the requested events exist"):
        TraceInstance(["kvm:kvm_nonesuch"]).open()
    assert not [n for n in _instances(tracefs) if n.startswith(f"kvmiso-{os.getpid()}")]


def test_all_kvm_and_kvmmmu_events_this_kernel_has(tracefs):
    on_kernel = {f"{s}:{e}" for s in ("kvm", "kvmmmu") for e in os.listdir(tracefs / "events" / s)
                 if (tracefs / "events" / s / e / "format").exists()}
    with TraceInstance() as t:
        assert set(t.enabled) == on_kernel and t.missing == []


def _dead_pid() -> int:
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stale_instance_of_a_dead_process_is_removed(tracefs):
    # Any kvmiso on this host removes stale instances as it opens one, so another one running
    # now may take ours first (it is then gone, but not in our list): plant it again, a few times.
    alive = tracefs / "instances" / f"kvmiso-{os.getppid()}-77"  # a live pid: never touched
    os.mkdir(alive)
    stale = None
    try:
        for _ in range(5):
            stale = tracefs / "instances" / f"kvmiso-{_dead_pid()}"
            os.mkdir(stale)
            with TraceInstance(["kvm:kvm_pio"]) as t:
                ours = t.path.name
                assert not stale.exists()
                assert alive.exists() and alive.name not in t.stale_removed
                if stale.name not in t.stale_removed:
                    continue  # another kvmiso removed it first
                assert f"removed stale instance {stale.name} left by a dead process" in t.describe()
            assert not (tracefs / "instances" / ours).exists()  # its own instance goes at close
            break
        else:
            pytest.fail("5 planted stale instances were all removed by another process first")
    finally:
        for p in (stale, alive):
            if p is not None and p.exists():
                os.rmdir(p)


def test_not_root_is_a_clear_error(tracefs):
    os.seteuid(65534)
    try:
        with pytest.raises(TracefsUnavailable, match="needs root"):
            TraceInstance().open()
    finally:
        os.seteuid(0)


def test_unmounted_tracefs_is_mounted_or_named(tracefs, tmp_path):
    with pytest.raises(TracefsUnavailable, match="not mounted"):
        tracefs_root(tmp_path, mount=False)
    with pytest.raises(TracefsUnavailable, match="does not exist"):
        tracefs_root(tmp_path / "nonexistent")
    assert tracefs_root(tmp_path) == tmp_path  # mounted here, as it would be at /sys/kernel/tracing
    try:
        assert (tmp_path / "instances").is_dir()
    finally:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        assert libc.umount2(str(tmp_path).encode(), 0) == 0, os.strerror(ctypes.get_errno())


_SIGTERM_CHILD = """
import sys
import time
from kvmiso.guest import Machine
from kvmiso.observe.tracing.capture import Capture
from kvmiso.session import capture_run
with Capture(["kvm:kvm_emulate_insn"]) as cap, Machine("spin", mode="long") as m:
    print(cap.tracer.path, flush=True)
    capture_run(cap, m, timeout=60)
"""


def test_sigterm_while_capturing_removes_the_instance(kvm, tracefs):
    p = subprocess.Popen([sys.executable, "-c", _SIGTERM_CHILD], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, cwd=Path(__file__).parent.parent)
    try:
        path = Path(p.stdout.readline().strip())
        assert path.name.startswith("kvmiso-") and path.exists()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == 128 + signal.SIGTERM, p.stderr.read()
    assert not path.exists()
    assert "Traceback" not in p.stderr.read()



@pytest.mark.parametrize("sig,status", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["ctrl-c", "sigterm"])
def test_kvmiso_trace_interrupted_removes_the_instance(kvm, tracefs, sig, status):
    p = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "trace", "spin", "--timeout", "60"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent)
    path = tracefs / "instances" / f"kvmiso-{p.pid}"
    try:
        for _ in range(3000):  # until the child has its instance (bounded; no timing asserted)
            if path.exists() or p.poll() is not None:
                break
            time.sleep(0.01)
        assert path.exists(), p.stderr.read() if p.poll() is not None else "no instance appeared"
        p.send_signal(sig)
        rc = p.wait(timeout=60)
    finally:
        if p.poll() is None:
            p.kill()
    assert rc == status
    assert not path.exists()
    assert "Traceback" not in p.stderr.read()


def _in_new_pid_namespace(*args: str, **kw) -> subprocess.Popen:
    if subprocess.run(["unshare", "-p", "-f", "--mount-proc", "true"]).returncode != 0:
        pytest.skip("needs unshare(1) and CAP_SYS_ADMIN for a new PID namespace")
    return subprocess.Popen(["unshare", "-p", "-f", "--mount-proc", sys.executable, "-m", "kvmiso.cli", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=Path(__file__).parent.parent,
                            **kw)


def test_trace_inside_a_pid_namespace_filters_on_the_kernels_thread_ids(kvm, tracefs, tmp_path):
    """Inside `unshare -p`, gettid() is 1 but set_event_pid and common_pid use the kernel's id:
    kvmiso finds it (a trace_marker record of its own) and traces as it does outside."""
    from kvmiso.observe.tracing.exitlog import read_jsonl

    p = _in_new_pid_namespace("trace", "hello", "--json", str(tmp_path / "ns.jsonl"))
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    log = read_jsonl(tmp_path / "ns.jsonl")
    assert log.tracing and "not traced" not in err and log.host["pid"] == 1  # pid 1 in its namespace
    events = [e for _, e in log.events()]
    assert any(e.name == "kvm_pio" for e in events) and len({e.pid for e in events}) == 1
    assert events[0].pid != 1  # the kernel's id of that thread, not the namespace's


def test_two_pid_namespaces_tracing_at_once_get_their_own_instances(kvm, tracefs, tmp_path):
    """Both are pid 1 in their namespaces: the instance names must still differ (the second
    failed with EBUSY on kvmiso-1)."""
    import psutil
    from ready import READY_SPIN, wait_until_counted

    a = _in_new_pid_namespace("trace", READY_SPIN, "--timeout", "600", "--json", str(tmp_path / "a.jsonl"))
    inner: list[psutil.Process] = []
    try:
        for _ in range(3000):  # the namespace's pid 1 is unshare's child (bounded; nothing timed)
            inner = psutil.Process(a.pid).children()
            if inner or a.poll() is not None:
                break
            time.sleep(0.01)
        wait_until_counted(inner[0].pid, proc=a)  # a's guest spins, a's instance tracing it
        b = _in_new_pid_namespace("trace", "hello")
        out, err = b.communicate(timeout=300)
        assert b.returncode == 0 and "traced hello" in out, err
        assert a.poll() is None, "the two traces did not overlap"
        inner[0].send_signal(signal.SIGINT)  # unshare passes no signal on: the traced process gets it
        a_out, a_err = a.communicate(timeout=300)
    finally:
        for proc in inner:
            if proc.is_running():
                proc.kill()
        a.kill()
        a.wait()
    assert a.returncode == 128 + signal.SIGINT, a_err
    assert not [n for n in os.listdir(tracefs / "instances") if n.startswith("kvmiso-ns")]
