"""`kvmiso report` end to end on the real device: every part present or skipped with a reason."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

import pytest
from ready import interrupt_when

from kvmiso.session import hostreport as report


def test_report_writes_every_part(kvm, tmp_path, vendor):
    if os.geteuid() != 0:
        pytest.skip("every part of the report needs root (tracefs, kallsyms addresses)")
    rep = report.build(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["host"]["vendor"] == vendor and data["fingerprint"]["vendor"] == vendor
    assert report.suite_ok(rep), [x for x in data["suite"] if not x["as_expected"]]
    assert (tmp_path / "exitlog.jsonl").exists() and (tmp_path / "bench.json").exists()
    # as root with /dev/kvm and tracefs every part runs; only the optional plot may be missing
    assert set(data["skipped"]) <= {"plot"}, data["skipped"]
    if "plot" in data["skipped"]:
        assert "matplotlib is not installed" in data["skipped"]["plot"]
    assert data["trace"]["tracing"] and data["trace"]["events"] > 0
    assert data["bench"]["results"]
    iso = data["isolation"]
    rfc, modern, asi = iso["rfc-v1"], iso["rfc-v1+modern"], iso["asi"]
    assert rfc["exits"] == modern["exits"] == asi["exits"] > 0
    assert iso["evidence"]["source"].startswith("bpf+btf")
    assert [c for c in iso["evidence"]["checks"] if not c["agreed"]] == []
    for r in (rfc, modern, asi):
        assert r["unknown_functions"] == [] and r["missing_chains"] == 0 and r["lost_events"] == 0
    assert modern["classes"]["fault"] < rfc["classes"]["fault"]  # the 6.x allocations the RFC's set lacks
    assert asi["classes"]["fault"] == 0  # a denylist: what it does not map is a designed switch
    assert all(f["line"].startswith("kvm_mm miss #") and not f["source"].startswith("modeled")
               for f in rfc["faults"])


def test_check_results_fold(kvm):
    from kvmiso.guest import Machine
    from kvmiso.observe.tracing.capture import Capture
    from kvmiso.session import capture_checked, check_run

    results = []
    with Capture() as cap:
        for p in ("portio", "hello"):
            with Machine(p, mode="long", cpl=3, kvm=kvm) as m:
                results.append(check_run(capture_checked(m, cap, p)))
    a, b = results
    exits, runs, faults = a.exits + b.exits, a.runs + b.runs, a.classes["fault"] + b.classes["fault"]
    fault_hits = sum(f.count for f in a.faults) + sum(f.count for f in b.faults)
    a.add(b)
    assert (a.exits, a.runs, a.classes["fault"]) == (exits, runs, faults)
    assert sum(f.count for f in a.faults) == fault_hits
    assert len({(f.function, f.region) for f in a.faults}) == len(a.faults)  # merged, not repeated


@pytest.mark.slow
@pytest.mark.parametrize("sig,stage,done", [
    (signal.SIGINT, "probing the host", []),
    (signal.SIGTERM, "running the guest suite", ["host", "fingerprint"]),
    (signal.SIGTERM, "checking every exit against kvm_mm", ["host", "fingerprint", "suite", "trace"]),
    (signal.SIGINT, "a short benchmark", ["host", "fingerprint", "suite", "trace", "isolation"]),
], ids=["probe", "suite", "isolation", "bench"])
def test_interrupted_report_writes_what_was_done(kvm, tmp_path, sig, stage, done):
    out = tmp_path / "rep"
    p = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "report", "--out", str(out)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def stage_started() -> None:  # each stage is announced on stderr as it starts
        for line in p.stderr:
            if line.strip() == f"kvmiso report: {stage}":
                return

    stdout, stderr = interrupt_when(p, sig, stage_started)
    name = signal.Signals(sig).name
    assert p.returncode == 128 + sig, stderr
    assert stderr.strip().splitlines()[-1] == f"kvmiso: interrupted by {name}" and "Traceback" not in stderr
    assert "INCOMPLETE: interrupted by" in stdout
    data = json.loads((out / "report.json").read_text())
    assert data["complete"] is False and data["incomplete_reason"] == f"interrupted by {name} while {stage}"
    for part in done:
        assert data[part] is not None, part


def test_only_a_declared_unavailable_part_is_skipped_anything_else_is_a_bug():
    rep = report.Report()

    def no_matplotlib():
        raise report.Unavailable("matplotlib is not installed")

    def buggy():
        raise KeyError("fingerprint")

    assert rep.part("plot", no_matplotlib) is None and rep.skipped == {"plot": "matplotlib is not installed"}
    with pytest.raises(KeyError):
        rep.part("host", buggy)
    assert "host" not in rep.skipped


def test_a_bug_stops_the_report_and_says_so_in_report_json(kvm, tmp_path, monkeypatch):
    def isolation_bug(runs, rep):
        raise ZeroDivisionError("a bug in the check")

    monkeypatch.setattr(report, "isolation_part", isolation_bug)
    with pytest.raises(ZeroDivisionError):
        report.build(tmp_path)
    data = json.loads((tmp_path / "report.json").read_text())
    assert data["complete"] is False and data["error"] == "ZeroDivisionError: a bug in the check"
    assert data["incomplete_reason"] == "stopped by an error while checking every exit against kvm_mm"
    assert "isolation" not in data["skipped"] and data["suite"]
