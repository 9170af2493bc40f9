"""``kvmiso conformance`` as a user runs it: the results of a set of ports it runs (one of each
kind: a pass, a deviation decided by a measured fact, a skip, a failure, a deviation that went
away), and the tables it prints, for one host and for several side by side."""

from __future__ import annotations

import json
import subprocess
import sys

PORTS = '''
import pytest


@pytest.mark.kvm_deviation(lambda kvm: kvm.api_version == 12, "every KVM here", raises=AssertionError)
def test_deviates(kvm):
    assert kvm.api_version != 12


@pytest.mark.kvm_deviation(lambda kvm: True, "gone since")
def test_deviation_gone(kvm):
    pass


def test_passes(kvm):
    assert kvm.check_extension("USER_MEMORY")


@pytest.mark.kvm_cap(1 << 20)
def test_skips(kvm):
    pass


def test_fails(kvm):
    assert kvm.api_version == 11
'''


def kvmiso(*args):
    return subprocess.run([sys.executable, "-m", "kvmiso.cli", *args], capture_output=True, text=True, timeout=300)


def test_each_test_s_result_and_reason(kvm, tmp_path):
    (tmp_path / "test_ports.py").write_text(PORTS)
    p = kvmiso("conformance", str(tmp_path), "--json")
    assert p.returncode == 1, p.stderr  # a test failed
    run = json.loads(p.stdout)
    got = {r["test"]: (r["result"], r["reason"]) for r in run["results"]}
    assert got["ports::test_deviates"] == ("deviation", "<lambda>: every KVM here")
    assert got["ports::test_deviation_gone"][0] == "fail" and "the deviation is gone" in got["ports::test_deviation_gone"][1]
    assert got["ports::test_passes"] == ("pass", "")
    assert got["ports::test_skips"][0] == "skip" and "is not available on this host" in got["ports::test_skips"][1]
    assert got["ports::test_fails"][0] == "fail" and "assert 12 == 11" in got["ports::test_fails"][1]
    assert "test_ports.py" in p.stderr  # pytest's own progress goes to stderr


def test_no_ports_is_bad_input(tmp_path):
    p = kvmiso("conformance", str(tmp_path / "none"))
    assert p.returncode == 2 and "no selftest ports at" in p.stderr


def test_the_tables_of_one_host_and_of_several(tmp_path):
    pvm = {"vendor": "kvm_pvm", "kernel": "6.18", "results": [
        {"test": "a::t1", "result": "pass", "reason": ""}, {"test": "a::t2", "result": "deviation", "reason": "f: why"}]}
    amd = {"vendor": "kvm_amd", "kernel": "6.1", "results": [
        {"test": "a::t1", "result": "pass", "reason": ""}, {"test": "a::t2", "result": "pass", "reason": ""}]}
    (tmp_path / "pvm.json").write_text(json.dumps(pvm))
    (tmp_path / "amd.json").write_text(json.dumps(amd))
    one = kvmiso("conformance", "--merge", str(tmp_path / "pvm.json"))
    assert one.returncode == 0 and one.stdout.splitlines() == [
        "kvm_pvm, Linux 6.18: 1 pass, 1 deviation, 0 skip, 0 fail",
        "test   result     reason",
        "a::t1  pass",
        "a::t2  deviation  f: why"]
    both = kvmiso("conformance", "--merge", str(tmp_path / "pvm.json"), str(tmp_path / "amd.json"))
    assert both.returncode == 0 and both.stdout.splitlines() == [
        "test   kvm_pvm, Linux 6.18  kvm_amd, Linux 6.1",
        "a::t1  pass                 pass",
        "a::t2  deviation            pass",
        "", "kvm_pvm, Linux 6.18:", "  a::t2: deviation: f: why"]
    (tmp_path / "bad.json").write_text("[]")
    assert "not a kvmiso conformance --json file" in kvmiso("conformance", "--merge", str(tmp_path / "bad.json")).stderr
