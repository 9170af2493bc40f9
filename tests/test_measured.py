"""The measured verdict and the access model measured (`kvmiso record`, `kvmiso check --measured`),
fed by real records of kvm_amd on Debian's 6.1 (tests/fixtures/record/README says how each was
made), and one real boot that makes a record and checks it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from kvmiso.cli import main
from kvmiso.isolation import address_space, build_layout, load_access_model
from kvmiso.isolation.access import AccessModelError
from kvmiso.isolation.accessmeasure import AccessTable
from kvmiso.isolation.accessnames import AccessNamer
from kvmiso.isolation.measuredcompare import pair_kinds
from kvmiso.isolation.measuredexits import SpaceView, measured_verdict
from kvmiso.isolation.windowpath import Sites, WindowPath, irq_spans
from kvmiso.session.measuredcheck import measure_record
from kvmiso.observe.accesses.accessrecord import read_record, read_vcpu_file
from kvmiso.observe.kernel.btffields import field_at
from kvmiso.observe.kernel.evidence import read_evidence
from kvmiso.observe.kernel.kallsyms import parse_kallsyms
from kvmiso.observe.accesses.recordruns import read_runs
from test_boot import debian, kvmiso  # noqa: F401 - the session fixture, and the CLI runner

FIXTURES = Path(__file__).parent / "fixtures" / "record"
RECORD = FIXTURES / "portio-hlt"


@pytest.fixture(scope="module")
def record():
    """The portio/long + hlt/long record: (record, runs, each run's windows, fields.json)."""
    rec, runs = read_record(RECORD), read_runs(RECORD)
    return rec, runs, runs.plain_windows(rec), json.loads((RECORD / "fields.json").read_text())


@pytest.fixture(scope="module")
def portio(record):
    """portio/long's windows read as paths, its VM's layout and namer, and its evidence."""
    rec, runs, windows, fields = record
    run = runs.runs[0]
    ev = read_evidence(runs.path(run.evidence))
    layout = build_layout(ev)
    sites = Sites(rec.symbols)
    return [WindowPath.of(w, sites) for w in windows[run.index]], layout, AccessNamer(layout, rec.symbols, fields), ev


# --- the record's runs ---------------------------------------------------------------------------

def test_each_run_has_its_windows_between_its_marks(record):
    rec, runs, windows, _ = record
    assert [m.id for m in rec.marks] == [0, 1, 2, 3, 4]
    assert [m.pauses for m in rec.marks] == [False, True, False, True, False]  # paused while tracing
    assert [r.label for r in runs.runs] == ["portio/long", "hlt/long"]
    assert [len(windows[r.index]) for r in runs.runs] == [12, 6]
    # the traced runs' windows are there too, their accesses only counted
    assert all(w.dropped and not w.accesses for w in rec.paused())
    assert runs.runs[0].exits == runs.runs[0].traced_exits == ["IO"] * 7


def test_a_window_reads_as_the_exit_s_path(portio):
    paths, *_ = portio
    assert [p.kind for p in paths] == ["npf"] * 5 + ["io"] * 7
    for p in paths[:5]:  # handled in the kernel: the window runs to the next VMRUN
        assert p.window.reason == "vmrun" and p.vcpu_run_end == len(p.sites) and p.handler == "npf_interception"
    for p in paths[5:]:  # to the VMM: vcpu_run ends where kvm_put_guest_fpu first touches memory
        assert p.window.reason == "user" and p.sites[p.vcpu_run_end].function == "kvm_put_guest_fpu"
        assert p.in_exit() == list(range(p.vcpu_run_end))


def test_an_interrupt_inside_a_window_is_the_interrupt_s_from_its_delivery_to_iret():
    (w,), *_ = read_vcpu_file(FIXTURES / "interrupt" / "vcpu0.rec")
    path = WindowPath.of(w, Sites(parse_kallsyms((FIXTURES / "interrupt" / "kallsyms").read_text())))
    assert path.kind == "io" and path.irq_spans == ((192, 1559),)
    start, end = path.irq_spans[0]
    # the CPU's IDT and GDT reads through cpu_entry_area, reported with the interrupted instruction
    assert path.sites[start].function == "svm_handle_exit_irqoff"
    assert all(0xFFFF_FE00_0000_0000 <= a.addr < 0xFFFF_FE80_0000_0000 for a in w.accesses[start:start + 5])
    assert path.sites[end - 1].function == "native_irq_return_iret" and path.sites[end].function != "native_irq_return_iret"
    assert not set(range(start, end)) & set(path.in_exit())


def test_interrupt_spans_nest_and_an_unfinished_one_runs_to_the_end():
    fns = ["f", "asm_sysvec_apic_timer_interrupt", "error_entry", "asm_sysvec_apic_timer_interrupt", "h",
           "asm_common_interrupt", "g", "native_irq_return_iret", "h", "native_irq_return_iret", "f",
           "asm_sysvec_apic_timer_interrupt", "h"]
    assert irq_spans(fns) == [(1, 10), (11, 13)]


# --- naming what was touched ----------------------------------------------------------------------

def test_an_access_is_named_by_object_and_btf_member(portio, record):
    paths, layout, namer, ev = portio
    io = paths[5]
    run = ev.object("kvm_run_page")
    w = next(a for a, s in zip(io.accesses, io.sites) if s.function == "emulator_pio_in_out" and run.address <= a.addr < run.end)
    assert namer.name(w.addr, w.size).text() == "kvm_run_page+0x8 exit_reason"
    fields = record[3]["types"]
    vcpu = fields["struct vcpu_svm"]
    assert field_at(vcpu, vcpu["fields"][0][0]) == vcpu["fields"][0][2]
    canary = next(a for a, s in zip(io.accesses, io.sites) if namer.name(a.addr).object == "percpu_area"
                  and namer.name(a.addr).member == "fixed_percpu_data+0x28")
    assert canary.size == 8 and not canary.write  # the stack protector's canary
    npf = paths[0]
    page = next(a for a, s in zip(npf.accesses, npf.sites) if s.function == "direct_page_fault"
                and namer.name(a.addr).object == "struct_page")
    assert namer.name(page.addr, page.size).member == "private"  # page_private(): the root's shadow page


# --- the measured verdict -------------------------------------------------------------------------

def test_the_measured_verdict_is_the_faulting_instruction_in_the_rfc_s_line(portio):
    paths, layout, namer, ev = portio
    rfc = SpaceView(address_space(layout, "rfc-v1"))
    io = measured_verdict(paths[5], rfc, namer)
    run = ev.object("kvm_run_page").address
    assert io.cls == "fault" and io.kind == "io"
    assert io.miss.line(0) == (f"KVM isolation: page fault #0 (2) at emulator_pio_in_out+0x111/0x170 [kvm] on "
                               f"{run + 8:016x} (kvm_run_page+0x8 exit_reason)")
    npf = measured_verdict(paths[0], rfc, namer)
    assert (npf.cls, npf.miss.site.function, npf.miss.named.object, npf.miss.error_code) == \
        ("fault", "direct_page_fault", "struct_page", 0)
    asi = SpaceView(address_space(layout, "asi"))
    assert [measured_verdict(p, asi, namer).cls for p in paths[5:]] == ["kvm_mm"] * 7  # fast PIO reads no guest memory
    # the 2022 series is an allowlist, and nothing marks the VMCB non-sensitive: every exit's
    # first access to it, in svm_vcpu_run, is an asi_exit
    asi2022 = SpaceView(address_space(layout, "asi-2022"))
    firsts = {(v.cls, v.miss.site.function, v.miss.named.object) for v in (measured_verdict(p, asi2022, namer) for p in paths)}
    assert firsts == {("host_mm", "svm_vcpu_run", "vmcb")}


def test_measured_and_modeled_agree_and_each_disagreement_says_whose_it_is(record):
    rec, runs, _, _ = record
    res = measure_record(rec, runs)
    assert res.agreement("rfc-v1") == (18, 18) and res.unpaired() == (0, 0)
    assert res.agreement("asi") == (16, 18) and res.agreement("asi", ("timing", "state")) == (16, 16)
    (a, b) = res.disagreements("asi")
    # the first touch of a never-written guest page: cleared through the direct map, an asi_exit
    assert a.category == b.category == "state" and "clear_page_erms" in a.measured
    lines = [d.miss.line(i) for i, d in enumerate(res.misses("rfc-v1"))]
    assert lines[0].startswith("KVM isolation: page fault #0 (0) at direct_page_fault+0x4d/0xa80 [kvm] on ")
    assert [d.count for d in res.misses("rfc-v1")] == [10, 7, 1]


# --- the access model measured --------------------------------------------------------------------

def test_the_access_model_meets_its_targets_on_this_record(record):
    rec, runs, _, _ = record
    scores = measure_record(rec, runs).table.scores()
    assert scores.recall >= 0.99 and scores.precision >= 0.90
    assert scores.touched == scores.hits  # every (function, object) pair the record shows is predicted


def test_a_function_the_model_lacks_is_listed_and_costs_recall(record, portio):
    rec, runs, _, _ = record
    model = load_access_model()
    del model.functions["direct_page_fault"]
    table = AccessTable(model)
    paths, layout, namer, ev = portio
    for p in paths:
        table.add(p, namer, ev.vendor, ev.config, ev.kernel)
    row = next(r for r in table.rows() if r.function == "direct_page_fault")
    assert not row.known and "struct_page" in row.unpredicted and row.unplaced > 0
    assert table.scores().recall < 1.0


def test_a_measured_correction_replaces_the_entry_on_its_kernel_only():
    model = load_access_model()
    npf = model.lookup("npf_interception")
    assert "vm_struct" in npf.objects("kvm_amd", {}, True, "6.12.117-amd64")  # 6.12's sev_snp_guest()
    assert "vm_struct" not in npf.objects("kvm_amd", {}, True, "6.1.0-57-amd64")
    assert npf.measured_cite.startswith("kvmiso record of the guest suite")
    assert model.exit_path("kvm_amd", "npf", "6.1.0-57-amd64").kernel == "6.1"
    assert model.exit_path("kvm_amd", "npf", "6.12.117-amd64").kernel == ""


def test_a_bad_measured_table_names_its_line(tmp_path):
    base = (Path(load_access_model().source)).read_text()
    bad = tmp_path / "access.toml"
    bad.write_text(base + '\n[[measured]]\nname = "no_such_function"\nvendor = "kvm_amd"\nkernel = "6.1"\n'
                          'touches = []\ncite = "x"\n')
    with pytest.raises(AccessModelError, match=r"access.toml:\d+: \[\[measured\]\] no_such_function: no \[\[function\]\]"):
        load_access_model(bad)


# --- pairing ----------------------------------------------------------------------------------------

def test_windows_and_traced_exits_pair_by_order_and_kind():
    # an interrupt the traced run did not have, and a traced exit the record lacks
    assert pair_kinds(["npf", "io", "interrupt", "io"], ["npf", "io", "io", "hlt"]) == \
        [(0, 0), (1, 1), (2, None), (3, 2), (None, 3)]


# --- the command ------------------------------------------------------------------------------------

def test_check_measured_prints_the_verdicts_and_fails_below_a_target(capsys):
    assert main(["check", "--measured", str(RECORD), "--min-recall", "99", "--min-precision", "90",
                 "--min-agreement", "99"]) == 0
    out = capsys.readouterr().out
    assert "  KVM isolation: page fault #1 (2) at emulator_pio_in_out+0x111/0x170 [kvm] on " in out
    assert "rfc-v1: 18 exits measured: 0 stay isolated, 0 switch, 18 fault" in out
    assert "  ASI: asi_exit on page fault #0 (2) at clear_page_erms+0x7/0x10 on " in out  # the designed exit
    assert "disagreement asi portio/long window " in out and "(npf, state)" in out
    assert main(["check", "--measured", str(RECORD), "--min-precision", "99.5"]) == 1
    assert "kvmiso: below target: the access model's precision is " in capsys.readouterr().out
    assert main(["check", "--measured", str(RECORD), "--exits", "--table"]) == 0
    out = capsys.readouterr().out
    # each exit's verdicts side by side: the faulting instruction, and the frame the model attributes it to
    assert ("  portio/long window 11 (npf) rfc-v1: fault on struct_page+0x28 private at direct_page_fault+0x4d/0xa80 "
            "[kvm] | fault on struct_page attributed at direct_page_fault+0x9ac/0xa80") in out
    assert "  emulator_pio_in_out [kvm] io: hit ['kvm_run_page', 'vcpu_stack', 'vcpu_struct']" in out
    assert "rfc-v1 leaves unmapped ['kvm_run_page']" in out
    assert main(["check", "--measured", str(RECORD), "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["policies"]["rfc-v1"]["agreement"] == {"agree": 18, "paired": 18}
    assert {e["kind"] for e in doc["exits"]} == {"npf", "io", "hlt"}


def test_a_record_without_runs_is_still_listed_per_window(tmp_path, capsys):
    for f in ("vcpu0.rec", "kallsyms"):
        (tmp_path / f).write_bytes((RECORD / f).read_bytes())
    assert main(["check", "--measured", str(tmp_path)]) == 0
    assert ": io_interception; ended in user mode" in capsys.readouterr().out


# --- a real record ------------------------------------------------------------------------------------

def test_kvmiso_record_makes_a_record_that_check_measured_reads(debian, tmp_path):  # noqa: F811
    p = kvmiso("boot", "--record-accesses", str(tmp_path), "--",
               sys.executable, "-m", "kvmiso.cli", "record", str(tmp_path), "hlt/long")
    assert p.returncode == 0, p.stderr
    assert "hlt/long: halt (1 KVM_RUN calls); traced: halt; evidence: bpf+btf" in p.stdout
    rec, runs = read_record(tmp_path), read_runs(tmp_path)
    assert [m.id for m in rec.marks] == [0, 1, 2] and runs.vendor == "kvm_amd"
    assert [w.reason for w in runs.plain_windows(rec)[0]][-1] == "user"
    c = kvmiso("check", "--measured", str(tmp_path), "--min-recall", "99", "--min-agreement", "99")
    assert c.returncode == 0, c.stdout + c.stderr
    assert "  KVM isolation: page fault #0 (" in c.stdout  # the RFC's kvm_mm misses something on every exit
    assert "  ASI: asi_exit on page fault #0 (0) at svm_vcpu_run+" in c.stdout  # asi-2022: the VMCB
