"""The exit log data model: JSON lines round trip (hypothesis), merging logs, bad files, and
the perf-kvm-stat summary on both time rules (kvm_exit -> kvm_entry, and event -> next event)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmiso.kvm.exits import (HltExit, HypercallExit, IntrExit, IoExit, MmioExit, ObservedExit, RdmsrExit,
                              SystemEventExit, UnknownExit, WrmsrExit, exit_from_dict)
from kvmiso.observe.tracing.exitlog import ExitLog, ExitLogError, RunRecord, TraceEvent, parse_jsonl, read_jsonl
from kvmiso.observe.tracing.exitstat import format_event, summarize_exits

OUT = IoExit(0x3000, 1, 1, False, memoryview(b"\xa5"))
json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.text(max_size=12))
names = st.text("abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=16)
events = st.builds(TraceEvent, ts_ns=st.integers(0, 2**63), system=st.sampled_from(["kvm", "kvmmmu"]), name=names,
                   cpu=st.integers(0, 255), pid=st.integers(1, 2**22),
                   fields=st.dictionaries(names, json_scalar, max_size=5),
                   symbols=st.dictionaries(names, st.text(max_size=12), max_size=2))
u64 = st.integers(0, 2**64 - 1)
view = st.binary(max_size=8).map(memoryview)
reply_area = st.binary(min_size=16, max_size=16).map(lambda b: memoryview(bytearray(b)))
exits = st.one_of(
    st.builds(IoExit, port=st.integers(0, 0xFFFF), size=st.sampled_from([1, 2, 4]), count=st.integers(1, 64),
              is_in=st.booleans(), _view=view),
    st.builds(MmioExit, address=u64, length=st.sampled_from([1, 2, 4, 8]), is_write=st.booleans(), _view=view),
    st.just(HltExit()), st.just(IntrExit()),
    st.builds(HypercallExit, nr=u64, args=st.tuples(*[u64] * 6), longmode=st.integers(0, 1)),
    st.builds(SystemEventExit, type=st.integers(0, 10), data=st.lists(u64, max_size=16).map(tuple)),
    st.builds(RdmsrExit, index=st.integers(0, 2**32 - 1), msr_reason=st.integers(0, 4),
              _error=reply_area),
    st.builds(WrmsrExit, index=st.integers(0, 2**32 - 1), msr_reason=st.integers(0, 4),
              _error=reply_area, data=u64),
    st.builds(UnknownExit, code=st.integers(31, 1000)), st.builds(ObservedExit, code=st.integers(0, 40)))
records = st.builds(RunRecord, run=st.integers(0, 1000), vcpu=st.integers(0, 7), start_ns=st.integers(0, 2**62),
                    end_ns=st.integers(0, 2**62),
                    exit=exits,
                    payload=st.text(max_size=10), events=st.lists(events, max_size=4),
                    stats=st.dictionaries(names, st.one_of(st.integers(0, 2**64 - 1),
                                                           st.lists(st.integers(0, 2**32), max_size=4)), max_size=4))
logs = st.builds(ExitLog, records=st.lists(records, max_size=5),
                 host=st.dictionaries(st.sampled_from(["kernel", "vendor", "cpu"]), st.text(max_size=10)),
                 tracing=st.booleans(), tracing_reason=st.text(max_size=30),
                 events_enabled=st.lists(st.text(max_size=20), max_size=3), lost_events=st.integers(0, 2**40))


@settings(max_examples=60, deadline=None)
@given(logs)
def test_json_lines_round_trip_is_exact(log):
    assert parse_jsonl(list(log.iter_jsonl())) == log


@settings(max_examples=200, deadline=None)
@given(exits)
def test_an_exit_reads_back_as_it_was_written(exit):
    """The reader gives the same class and fields; the data an OUT or MMIO write carried comes
    back byte for byte (an IN's or MMIO read's was never written, so none is kept)."""
    back = exit_from_dict(json.loads(json.dumps(exit.to_dict())))
    assert type(back) is type(exit) and back == exit and back.name == exit.name
    assert back.to_dict() == exit.to_dict()


def test_file_round_trip_and_old_files_without_symbols(tmp_path):
    e = TraceEvent(5, "kvm", "kvm_exit", 0, 9, {"exit_reason": 30, "isa": 1}, {"exit_reason": "IO_INSTRUCTION"})
    log = ExitLog([RunRecord(0, 0, 1, 10, IoExit(0x3000, 1, 1, False, memoryview(b"\xa5")), events=[e])], tracing=True)
    log.write_jsonl(tmp_path / "l.jsonl")
    assert read_jsonl(tmp_path / "l.jsonl") == log
    lines = list(log.iter_jsonl())
    rec = json.loads(lines[1])
    del rec["events"][0]["symbols"]  # written before TraceEvent had symbols
    old = parse_jsonl([lines[0], json.dumps(rec)])
    assert old.records[0].events[0].symbols == {} and old.records[0].events[0].kind == "exit_reason 0x1e"


def test_bad_files_name_the_line():
    with pytest.raises(ExitLogError, match="not a kvmiso exit log"):
        parse_jsonl(['{"something": 1}'])
    with pytest.raises(ExitLogError, match="format 99"):
        parse_jsonl(['{"kvmiso_exitlog": 99}'])
    with pytest.raises(ExitLogError, match="<exit log>:2: malformed record"):
        parse_jsonl(['{"kvmiso_exitlog": 1}', '{"run": 0}'])


def test_extend_renumbers_and_merges_what_was_seen():
    a = ExitLog([RunRecord(0, 0, 0, 1, OUT)], tracing=False, tracing_reason="needs root",
                events_enabled=[], lost_events=2)
    b = ExitLog([RunRecord(0, 0, 2, 3, HltExit()), RunRecord(1, 0, 4, 5, OUT)], tracing=True,
                events_enabled=["kvm:kvm_pio"], lost_events=3)
    a.extend(b)
    assert [r.run for r in a.records] == [0, 1, 2]
    assert [r.run for r in b.records] == [0, 1]  # copies went in: b is as it was
    assert a.lost_events == 5 and a.tracing and a.events_enabled == ["kvm:kvm_pio"]


def _ev(ts, name, **fields):
    symbols = {k[:-4]: fields.pop(k) for k in list(fields) if k.endswith("_sym")}
    return TraceEvent(ts, "kvm", name, 0, 1, fields, symbols)


def test_summary_on_vmx_svm_hosts_times_exit_to_entry():
    # two KVM_RUNs on an Intel host: CPUID handled in the kernel, then an IO exit to userspace
    run0 = [_ev(100, "kvm_entry"), _ev(150, "kvm_exit", exit_reason=10, exit_reason_sym="CPUID"),
            _ev(160, "kvm_cpuid"), _ev(180, "kvm_entry"),
            _ev(300, "kvm_exit", exit_reason=30, exit_reason_sym="IO_INSTRUCTION"), _ev(310, "kvm_pio"),
            _ev(400, "kvm_userspace_exit", reason=2, errno=0)]
    run1 = [_ev(1000, "kvm_entry"), _ev(1100, "kvm_exit", exit_reason=10, exit_reason_sym="CPUID"),
            _ev(1190, "kvm_entry"), _ev(1200, "kvm_exit", exit_reason=30, exit_reason_sym="IO_INSTRUCTION")]
    log = ExitLog([RunRecord(0, 0, 90, 450, OUT, events=run0),
                   RunRecord(1, 0, 990, 1500, IntrExit(), events=run1)], tracing=True)
    s = summarize_exits(log)
    assert s.method == "kvm_exit"
    got = {k.kind: (k.count, k.timed, k.total_ns, k.min_ns, k.max_ns, k.share) for k in s.kernel}
    assert got == {"CPUID": (2, 2, 30 + 90, 30, 90, 0.5),
                   "IO_INSTRUCTION": (2, 1, 100, 100, 100, 0.5),  # the second's end was not recorded
                   "kvm_cpuid": (1, 0, 0, 0, 0, None), "kvm_pio": (1, 0, 0, 0, 0, None)}
    assert [(k.kind, k.count, k.total_ns) for k in s.userspace] == [("KVM_EXIT_INTR", 1, 510), ("KVM_EXIT_IO", 1, 360)]
    assert "kvm_exit to the next kvm_entry" in " ".join(s.table().split())


def test_summary_on_pvm_times_event_to_next_event():
    run0 = [_ev(100, "kvm_fpu"), _ev(110, "kvm_emulate_insn"), _ev(130, "kvm_pio"),
            _ev(135, "kvm_userspace_exit", errno=0)]
    run1 = [_ev(200, "kvm_emulate_insn"), _ev(260, "kvm_userspace_exit", errno=-4),  # EINTR, retried
            _ev(300, "kvm_emulate_insn"), _ev(301, "kvm_emulate_insn")]  # then lost: no end
    log = ExitLog([RunRecord(0, 0, 90, 140, OUT, events=run0),
                   RunRecord(1, 0, 190, 400, IntrExit(), events=run1)], tracing=True, lost_events=7)
    s = summarize_exits(log)
    got = {k.kind: (k.count, k.timed, k.total_ns) for k in s.kernel}
    assert got == {"kvm_fpu": (1, 1, 10), "kvm_emulate_insn": (4, 3, 20 + 60 + 1), "kvm_pio": (1, 1, 5)}
    assert [k.kind for k in s.kernel] == ["kvm_emulate_insn", "kvm_fpu", "kvm_pio"]  # by count, then name
    text = s.table()
    assert "LOST: the kernel dropped 7 trace records" in " ".join(text.split())
    lines = text.splitlines()
    rows = [line for line in lines if line.startswith("  ")]
    assert len(rows) == 5 and all(len(r) == len(lines[0]) for r in rows)  # one aligned table


def test_format_event_names_symbols():
    e = _ev(1500, "kvm_exit", exit_reason=30, exit_reason_sym="IO_INSTRUCTION", isa=1)
    assert format_event(e, 1000).split() == ["+0.500", "µs", "cpu0", "kvm_exit", "exit_reason=0x1e(IO_INSTRUCTION)",
                                             "isa=1"]
