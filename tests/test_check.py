import json
import re
from collections import Counter
from pathlib import Path

import pytest

from kvmiso.cli import main
from kvmiso.guest import Machine
from kvmiso.isolation.check import CheckError, check, load_handlers
from kvmiso.isolation.layout import OBJECTS, build_layout, host_layout, known_region_names
from kvmiso.isolation.mapset import KvmAddressSpace, RegionSpec, default_specs, load_regions
from kvmiso.observe.exitlog import ExitLog, RunRecord, TraceEvent

FIXTURES = Path(__file__).parent / "fixtures" / "isolation"
KALLSYMS = (FIXTURES / "kallsyms.txt").read_text()
FLAGS = "flags\t\t: fpu pae nx pdpe1gb lm\n"
TABLE = load_handlers(regions=known_region_names())
FAULT_LINE = re.compile(r"KVM isolation: page fault #\d+ \(\d+\) at [\w.]+\+0x[0-9a-f]+ on [0-9a-f]{16} \(\w+\)")
EXTRA = [o[0] for o in OBJECTS if o[0] in ("kvm_run_page", "cpuid_entries", "emulate_ctxt", "irqchip", "mmu_pages")]


def _record(i, exit="IO", events=(), vcpu=0):
    evs = [TraceEvent(1000 * i + n, "kvm", name, 0, 1, fields) for n, (name, fields) in enumerate(events)]
    return RunRecord(i, vcpu, 1000 * i, 1000 * i + 500, {"exit": exit}, events=evs)


def _log(records):
    return ExitLog(records=records, tracing=True)


def _full(layout, policy="rfc-v1"):
    """The default set plus every other object and the userspace regions: nothing faults."""
    kas = KvmAddressSpace.default(layout, policy)
    for name in EXTRA + ["guest_memory", "kvm_run"]:
        kas.add_region(RegionSpec(name, "test", "PTE", "test"))
    return kas


def _kind_records(layout):
    """One KVM_RUN per handler kind that can occur on the layout's vendor: its event (or its
    userspace exit), so the log exercises every entry of the table."""
    records = []
    for h in TABLE.handlers:
        if h.vendor not in (None, layout.vendor):
            continue
        for kind in h.kinds:
            prefix, name = kind.split(":", 1)
            name = name.rstrip("*") + ("_x" if name.endswith("*") else "")
            if prefix == "trace":
                records.append(_record(len(records), events=[(name, {})]))
            elif prefix == "exit":
                records.append(_record(len(records), exit=name))
            else:
                code = int(name, 0)
                records.append(_record(len(records), events=[("kvm_exit", {"isa": 1 if prefix == "vmx" else 2,
                                                                           "exit_reason": code})]))
    return records


def _needs(layout, h, region):
    base = TABLE.defaults + TABLE.vendor_defaults.get(layout.vendor, ())
    if region in base or any(region in s.touches for s in h.path):
        return True
    code = layout.region(region) if region in layout.regions else None
    return code is not None and any(layout.symbols.get(s.fn) and code.contains(layout.symbols.get(s.fn))
                                    for s in h.path)


def _expected_faults(layout, records, region, policy="rfc-v1"):
    """Independently of check(): the kinds of the exits whose handlers need ``region`` while
    still in kvm_mm (each synthetic record is one exit: its event, then its userspace exit)."""
    out = Counter()
    for r in records:
        kinds = [f"vmx:{e.fields['exit_reason']}" if e.fields.get("isa") == 1 else
                 f"svm:{e.fields['exit_reason']:#x}" if e.fields.get("isa") == 2 else f"trace:{e.name}"
                 for e in r.events] + [f"exit:{r.exit['exit']}"]
        for kind in kinds:
            h = TABLE.lookup(kind, layout.vendor)
            if policy in h.outside:
                continue
            if policy in h.leaves and h.leave_at_start:
                break
            if _needs(layout, h, region):
                out[kind] += 1
                break
            if policy in h.leaves:
                break
    return out


@pytest.mark.parametrize("vendor, policy", [("kvm_pvm", "rfc-v1"), ("kvm_intel", "rfc-v1"), ("kvm_intel", "asi"),
                                            ("kvm_amd", "asi")])
def test_dropping_each_default_region_faults_exactly_its_exits(vendor, policy):
    layout = build_layout(KALLSYMS, FLAGS, cpus=2, vendor=vendor, ram=4 << 30)
    kas = _full(layout, policy)
    records = _kind_records(layout)
    log = _log(records)
    clean = check(kas, log, TABLE)
    assert clean.classes["fault"] == 0 and clean.classes["unknown"] == 0 and clean.exits == len(records)
    needed = 0
    for spec in default_specs(layout):
        kas.drop_region(spec.name)
        res = check(kas, log, TABLE)
        want = _expected_faults(layout, records, spec.name, policy)
        assert res.by_kind.get("fault", Counter()) == want, spec.name
        assert {f.region for f in res.faults} == ({spec.name} if want else set()), spec.name
        needed += bool(want)
        kas.add_region(spec)
        again = check(kas, log, TABLE)
        assert again.classes == clean.classes, f"adding {spec.name} back did not clear its faults"
    # every region of the set is needed by some exit, except those only host IRQ entry uses
    # (cpu_entry_area, ESPFIX, IRQ stacks): on kvm_pvm no handler takes host IRQs, and rfc-v1
    # switches to host_mm in the IRQ prologue; ASI runs it in the restricted space
    unused = 0 if policy == "asi" else 3
    assert needed == len(default_specs(layout)) - unused


def test_fault_lines_and_counts():
    layout = build_layout(KALLSYMS, FLAGS, cpus=1, vendor="kvm_pvm")
    kas = KvmAddressSpace.default(layout)
    log = _log([_record(i, events=[("kvm_cpuid", {})]) for i in range(3)] + [_record(3, events=[("kvm_pio", {})])])
    res = check(kas, log, TABLE)
    lines = res.fault_lines()
    cpuid = layout.region("cpuid_entries").start
    assert lines[0] == f"KVM isolation: page fault #0 (3) at kvm_emulate_cpuid+0x0 on {cpuid:016x} (cpuid_entries)"
    assert all(FAULT_LINE.fullmatch(l) for l in lines)
    assert res.classes["fault"] == 4 and res.runs == 4


def test_unknown_kinds_are_reported_never_dropped():
    layout = build_layout(KALLSYMS, FLAGS, vendor="kvm_pvm")
    kas = _full(layout)
    log = _log([_record(0, events=[("kvm_brand_new_event", {}), ("kvm_pio", {})]), _record(1, exit="BRAND_NEW")])
    res = check(kas, log, TABLE)
    assert res.unknown == Counter({"trace:kvm_brand_new_event": 1, "exit:BRAND_NEW": 1})
    assert res.classes["unknown"] == 2 and res.exits == 2


def test_switches_per_run_and_policies():
    layout = build_layout(KALLSYMS, FLAGS, vendor="kvm_intel")
    irq = [("kvm_exit", {"isa": 1, "exit_reason": 1}), ("kvm_exit", {"isa": 1, "exit_reason": 30})]
    log = _log([_record(0), _record(1, events=irq)])
    v1 = check(_full(layout), log, TABLE, switch_cost_ns=1000, switch_cost_source="test")
    # run 0: enter + return = 2; run 1: enter, IRQ out and back in, return = 4
    assert v1.switch_hist == Counter({2: 1, 4: 1}) and v1.switches == 6
    # exits: the IO run's return; the IRQ (rfc-v1 leaves in its prologue); the port I/O that
    # ends in the return to userspace
    assert v1.classes["host_mm"] == 3 and v1.classes["kvm_mm"] == 0 and v1.exits == 3
    assert v1.overhead_ns == 6000 and v1.wall_ns == 1000 and v1.switch_cost_source == "test"
    asi = check(_full(layout, "asi"), log, TABLE)
    assert asi.switch_hist == Counter({2: 2}) and asi.classes["kvm_mm"] == 1  # IRQ entry stays under ASI
    assert asi.policy == "asi" and v1.policy == "rfc-v1"


def test_logs_from_another_kernel_are_refused(tmp_path):
    layout = build_layout(KALLSYMS, FLAGS, vendor="kvm_pvm")
    log = _log([_record(0)])
    log.host = {"kernel": "4.19.0-old", "vendor": "kvm_pvm"}
    with pytest.raises(CheckError, match=r"^x.jsonl:1: exit log recorded on kernel 4.19.0-old"):
        check(KvmAddressSpace.default(layout), log, TABLE, source="x.jsonl")
    f = tmp_path / "old.jsonl"
    log.write_jsonl(f)
    assert main(["check", str(f)]) == 2


def test_cli_bad_regions_file_is_status_2(tmp_path, capsys):
    f = tmp_path / "r.toml"
    f.write_text('drop = ["buses"]\n[[region]]\nname = "x"\nstart = 0xffffffff81000000\nsize = 0x1000\n')
    assert main(["model", "--regions", str(f)]) == 2
    err = capsys.readouterr().err
    assert f"{f}:3: region 'x'" in err and "overlaps region 'kernel_image'" in err and "Traceback" not in err
    assert main(["model", "--drop", "nosuch"]) == 2


def test_cli_model(capsys):
    assert main(["model", "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    assert s["policy"] == "rfc-v1" and 0 < s["kvm_pages_4k"] < s["kernel_pages_4k"]
    assert "memslots" in [r["name"] for r in s["regions"]]
    assert main(["model", "--drop", "buses", "--policy", "asi"]) == 0
    out = capsys.readouterr().out
    assert "policy asi" in out and "\nbuses " not in out and "\nmemslots " in out


PAYLOADS = ["portio", "cpuid", "msr", "mmio", "hlt", "hello"]


def test_foundation_payloads_on_real_kvm(kvm, capsys):
    """Every exit of the foundation payloads has a handler entry; with the regions a 6.x kernel
    needs beyond the RFC's set (modern.toml) none faults, and the CLI says the same."""
    from kvmiso.observe.capture import capture

    totals = Counter()
    for p in PAYLOADS:
        with Machine(p, mode="long", kvm=kvm) as m:
            _, log = capture(m, timeout=5, payload=p)
            layout = host_layout(m.vm)
        default = check(KvmAddressSpace.default(layout), log, TABLE)
        modern = check(load_regions("modern", layout), log, TABLE)
        assert default.unknown == Counter() and modern.unknown == Counter(), p
        assert sum(default.classes[c] for c in ("kvm_mm", "host_mm", "fault", "unknown")) == default.exits
        assert modern.classes["fault"] == 0, (p, modern.fault_lines())
        assert modern.classes["host_mm"] >= 1 and default.switches >= 2 * default.runs
        totals.update({c: n for c, n in default.classes.items()})
    # the RFC's 2019 set lacks vcpu->run, which every userspace exit fills in: faults on any vendor
    assert totals["fault"] > 0
    assert main(["check", "portio", "--json", "--switch-cost", "300"]) == 1  # the RFC set faults
    rfc = json.loads(capsys.readouterr().out)
    assert rfc[0]["payload"] == "portio" and rfc[0]["classes"]["fault"] > 0
    assert rfc[0]["switch_cost_source"] == "given with --switch-cost"
    assert main(["check", "portio", "--regions", "modern", "--json"]) == 0
    modern = json.loads(capsys.readouterr().out)
    assert modern[0]["payload"] == "portio" and modern[0]["exits"] > 0
    assert modern[0]["classes"]["fault"] == 0 and modern[0]["classes"]["unknown"] == 0
    assert modern[0]["switch_cost_source"] != "given with --switch-cost"


def test_measure_switches_of_a_looping_guest(kvm):
    """A guest that exits to userspace forever: the model sees exactly max_exits KVM_RUNs, each
    entering and leaving kvm_mm at least once; the RFC set faults where `modern` does not."""
    from kvmiso.isolation.check import measure_switches

    modern = measure_switches(kvm, "bench_out", regions="modern", max_exits=16)
    assert modern.runs == 16 and modern.classes["fault"] == 0 and modern.classes["unknown"] == 0
    assert modern.switches_per_run >= 2
    rfc = measure_switches(kvm, "bench_out", max_exits=16)
    assert rfc.runs == 16 and rfc.classes["fault"] > 0 and rfc.switches_per_run > modern.switches_per_run
