"""`kvmiso report` end to end on the real device: every part present or skipped with a reason."""

from __future__ import annotations

import json
import os

import pytest

from kvmiso import report


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
    if data["isolation"]:
        rfc, modern = data["isolation"]["rfc"], data["isolation"]["modern"]
        assert rfc["exits"] == modern["exits"] > 0
        assert modern["classes"]["fault"] == 0 and modern["classes"]["unknown"] == 0
        assert rfc["classes"]["fault"] > 0  # the 2019 set misses vcpu->run on every kernel
        assert all(f["line"].startswith("KVM isolation: page fault #") for f in rfc["faults"])


def test_check_results_fold(kvm):
    from kvmiso.guest import Machine
    from kvmiso.isolation import KvmAddressSpace, check, host_layout, load_handlers
    from kvmiso.observe.capture import capture

    table = load_handlers()
    results = []
    for p in ("portio", "cpuid"):
        with Machine(p, kvm=kvm) as m:
            _, log = capture(m, payload=p)
            results.append(check(KvmAddressSpace.default(host_layout(m.vm)), log, table))
    a, b = results
    exits, runs, faults = a.exits + b.exits, a.runs + b.runs, a.classes["fault"] + b.classes["fault"]
    fault_hits = sum(f.count for f in a.faults) + sum(f.count for f in b.faults)
    a.add(b)
    assert (a.exits, a.runs, a.classes["fault"]) == (exits, runs, faults)
    assert sum(f.count for f in a.faults) == fault_hits
    assert len({(f.function, f.region) for f in a.faults}) == len(a.faults)  # merged, not repeated
