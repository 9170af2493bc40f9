"""compare as pure logic (ratios, the significance test), result-file errors, and the CLI."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from kvmiso.bench import samples as stats
from kvmiso.bench.compare import Row, compare, format_compare
from kvmiso.bench.results import SCHEMA, SCHEMA_VERSION, ResultFileError, load


def result_file(rows, **host):
    return {"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": "2026-01-01T00:00:00+00:00",
            "complete": True, "host": {"cpu": "X", "kernel": "6.1", "vendor": "kvm_pvm", **host}, "settings": {},
            "results": [{"kind": k, "path": p, "cpl": c, "summary": {"p50": means[0]}, "runs": [{"mean": m} for m in means]}
                        for k, p, c, means in rows], "skipped": []}


def test_ratio_and_verdict():
    assert Row("out", "c", 0, 1000.0, 1230.0).verdict() == "1.23x slower"
    assert Row("out", "c", 0, 1000.0, 800.0).verdict() == "1.25x faster"
    assert Row("out", "c", 0, 1000.0, 1001.0).verdict() == "same"
    assert Row("out", "c", 0, None, 5.0).verdict() == "only in B"
    assert Row("out", "c", 0, 5.0, None).verdict() == "only in A"


def test_compare_flags_a_real_difference_and_not_noise():
    a = result_file([("out", "c", 0, [7000, 7010, 6990, 7005]), ("in", "c", 0, [7000, 7400, 6600, 7100])])
    b = result_file([("out", "c", 0, [9000, 9010, 8990, 9020]), ("in", "c", 0, [7100, 6700, 7500, 7000]),
                     ("hlt", "c", 0, [8000, 8100])])
    rows = {(r.kind, r.path, r.cpl): r for r in compare(a, b)}
    assert rows["out", "c", 0].significant and rows["out", "c", 0].verdict() == "1.29x slower"
    assert not rows["in", "c", 0].significant
    assert rows["hlt", "c", 0].verdict() == "only in B"
    text = format_compare(list(rows.values()), a, b)
    assert "1.29x slower" in text and "yes (t=" in text and "within the noise" in text


def test_compare_names_host_differences_and_incomplete_files():
    a = result_file([("out", "c", 0, [1, 2])])
    b = result_file([("out", "c", 0, [1, 2])], kernel="6.9")
    b["complete"], b["incomplete_reason"] = False, "interrupted by SIGINT during out at CPL0"
    text = format_compare(compare(a, b), a, b)
    assert "kernel: 6.1 vs 6.9" in text and "B is incomplete: interrupted" in text


@given(st.lists(st.floats(min_value=1, max_value=1e6), min_size=2, max_size=20))
def test_a_sample_is_never_significantly_different_from_itself(v):
    sig, t = stats.significant(v, list(v))
    assert not sig and t == 0


@given(st.lists(st.floats(min_value=1000, max_value=1100), min_size=3, max_size=20),
       st.floats(min_value=10_000, max_value=1e6))
def test_a_shift_far_beyond_the_spread_is_significant(v, shift):
    sig, t = stats.significant(v, [x + shift for x in v])
    assert sig and t < 0


def test_significance_needs_two_runs_a_side():
    assert stats.significant([1.0], [100.0, 101.0]) == (False, 0.0)
    assert stats.t95(1) == 12.706 and stats.t95(35) == 2.042 and stats.t95(1000) == 1.96


@pytest.mark.parametrize("content, message", [
    ("{not json", "corrupt JSON"),
    ("[1, 2]", "not a kvmiso bench result"),
    (json.dumps({"schema": "pyperf"}), "not a kvmiso bench result"),
    (json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION + 1}), f"schema version {SCHEMA_VERSION + 1}"),
    (json.dumps({"schema": SCHEMA, "schema_version": SCHEMA_VERSION, "results": [{"kind": "out"}]}), "corrupt"),
])
def test_bad_result_files_are_refused_with_the_reason(tmp_path, content, message):
    f = tmp_path / "bad.json"
    f.write_text(content)
    with pytest.raises(ResultFileError, match=message):
        load(f)


def test_cli_compare(tmp_path):
    a, b, bad = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "bad.json"
    a.write_text(json.dumps(result_file([("out", "c", 0, [7000, 7010, 6990])])))
    b.write_text(json.dumps(result_file([("out", "c", 0, [7700, 7710, 7690])])))
    bad.write_text(json.dumps({"schema": SCHEMA, "schema_version": 0}))
    p = subprocess.run([sys.executable, "-m", "kvmiso.cli", "compare", str(a), str(b)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert "1.10x slower" in p.stdout
    for args in ((str(a), str(bad)), (str(a), str(tmp_path / "missing.json"))):
        p = subprocess.run([sys.executable, "-m", "kvmiso.cli", "compare", *args], capture_output=True, text=True)
        assert p.returncode == 2 and p.stderr.startswith("kvmiso: ")


def test_compare_leaves_out_a_run_off_its_siblings():
    """A file may hold a run a neighbour disturbed: it counts in neither the ratio nor the test."""
    def row(p50s):
        return {"kind": "out", "path": "c", "cpl": 0, "summary": {"p50": 0, "stable_p50": stats.stable_p50(p50s)},
                "runs": [{"p50": p, "mean": p} for p in p50s]}

    a = {"results": [row([7000, 7010, 6990, 7005])]}
    b = {"results": [row([7000, 7010, 6990, 12000])]}
    (r,) = compare(a, b)
    assert r.verdict() == "same" and not r.significant
