"""The check grounded in the running kernel: verdicts by real address on the call chains that
really ran; saved evidence from this host for the pure tests, the real device for the rest."""

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

import pytest

from kvmiso.cli import main
from kvmiso.guest import Machine, Outcome
from kvmiso.isolation import (CheckError, address_space, build_layout, check, load_access_model, load_regions,
                              result_text)
from kvmiso.isolation.access import AccessModelError, base_name, opcode
from kvmiso.isolation.accessfile import ACCESS_TOML
from kvmiso.isolation.check import ANCESTORS_ONLY
from kvmiso.isolation.exitcut import RUN_PATH
from kvmiso.observe.tracing.capture import Capture
from kvmiso.observe.kernel.evidence import collect_evidence, read_evidence
from kvmiso.observe.tracing.exitlog import read_jsonl
from kvmiso.observe.kernel.kobject import KernelObject

FIX = Path(__file__).parent / "fixtures" / "evidence"
ACCESS = load_access_model()


def _saved(name):
    return read_jsonl(FIX / f"{name}.jsonl"), read_evidence(FIX / f"{name}.evidence.json")


def _moved(ev, name, address):
    objs = [dataclasses.replace(o, address=address) if o.name == name else o for o in ev.objects]
    return dataclasses.replace(ev, objects=objs)


def _leaf(space, addr):
    last = space.kernel.walk(addr)[-1]
    span = {1: 1 << 12, 2: 1 << 21, 3: 1 << 30}[last.level]
    return addr & ~(span - 1), span


def test_verdicts_follow_the_real_addresses():
    """Moving one object within its own leaf changes nothing; moving it into a leaf the RFC's
    set copies (here the vCPU struct's) removes its faults: the check looks at addresses, not names."""
    log, ev = _saved("portio")
    base = check(address_space(build_layout(ev, cpus=2)), log, ACCESS)
    faulted = {f.region for f in base.faults}
    assert "emulate_ctxt" in faulted
    ctxt = ev.object("emulate_ctxt")
    space = address_space(build_layout(ev, cpus=2))
    start, span = _leaf(space, ctxt.address)
    inside = start + (ctxt.address - start + 0x1000) % (span - 0x1000)
    same = check(address_space(build_layout(_moved(ev, "emulate_ctxt", inside), cpus=2)), log, ACCESS)
    assert same.classes == base.classes and {f.region for f in same.faults} == faulted
    vcpu = ev.object("vcpu_struct")
    vstart, vspan = _leaf(space, vcpu.address)
    elsewhere = vstart + (vcpu.address - vstart + vcpu.size + 0x2000) % (vspan - 0x2000)
    assert space.kernel.translate(elsewhere) is not None  # mapped in the kernel, in the vCPU's leaf
    moved = check(address_space(build_layout(_moved(ev, "emulate_ctxt", elsewhere), cpus=2)), log, ACCESS)
    assert "emulate_ctxt" not in {f.region for f in moved.faults}
    assert moved.fault_lines() != base.fault_lines()  # the exits now fault further on, on what is still unmapped


def test_fault_lines_carry_the_real_function_offset_and_address():
    log, ev = _saved("portio")
    res = check(address_space(build_layout(ev, cpus=2)), log, ACCESS)
    assert res.faults and res.fault_lines()[0].startswith("kvm_mm miss #0 on ")
    chains = {ev.code[a].function for _, e in log.events() for a in e.stack if a in ev.code}
    for f in res.faults:
        assert f.function in {n.split(".")[0] for n in chains}  # a function that really ran
        assert f.offset > 0 and f.size > f.offset  # the return address seen on the chain
        assert build_layout(ev, cpus=2).find(f.address).name == f.region and not f.source.startswith("modeled")
        assert f.stack and f.stack[-1].startswith("entry_SYSCALL_64")


def test_a_miss_is_attributed_where_the_source_touches_the_object_first():
    """emulate_ctxt is first written by init_emulate_ctxt, which x86_decode_emulated_instruction
    calls: x86_emulate_instruction only reads the pointer before the decode (6.12.118). The SPTE
    walk of kvm_mmu_page_fault runs on reserved-bit faults only, which no chain tells apart."""
    log, ev = _saved("portio")
    (f,) = check(address_space(build_layout(ev, cpus=2)), log, ACCESS).faults
    assert (f.function, f.region, f.first_access) == ("x86_decode_emulated_instruction", "emulate_ctxt",
                                                      "init_emulate_ctxt")
    assert f.line(0) == (f"kvm_mm miss #0 on {f.address:016x} (emulate_ctxt) attributed at "
                         f"x86_decode_emulated_instruction+{f.offset:#x}/{f.size:#x}, first access in "
                         f"init_emulate_ctxt: {f.count} exits")
    log, ev = _saved("hello-cpl3")
    for space in (address_space(build_layout(ev, cpus=2)), load_regions("modern", build_layout(ev, cpus=2))):
        assert "kvm_mmu_page_fault" not in {f.function for f in check(space, log, ACCESS).faults}


def test_both_policies_as_their_patches_define_them():
    """The RFC's allowlist faults on what it does not copy; ASI maps all but sensitive memory
    and leaves (asi_exit) on guest memory reached through the VMM's mapping."""
    log, ev = _saved("portio")
    lay = build_layout(ev, cpus=2)
    rfc = check(address_space(lay, "rfc-v1"), log, ACCESS)
    asi = check(address_space(lay, "asi"), log, ACCESS)
    old = check(address_space(lay, "asi-2022"), log, ACCESS)
    assert rfc.classes["fault"] > 0 and asi.classes["fault"] == 0
    assert any("asi_exit" in r and "guest_memory" in r for r in asi.reasons)
    assert old.classes["host_mm"] < asi.classes["host_mm"]  # guest memory is locally non-sensitive in 2022
    assert rfc.exits == asi.exits == old.exits and rfc.classes["outside"] > 0  # the window is the same
    modern = check(load_regions("modern", lay), log, ACCESS)
    assert modern.classes["fault"] < rfc.classes["fault"]


def test_the_exit_that_goes_to_userspace_writes_kvm_run(tmp_path):
    """Every portio KVM_RUN ends with a port write for userspace (emulator_pio_in_out fills
    vcpu->run): with kvm_run moved where the isolated space does not map it, those exits fault
    on it, although the last events of each KVM_RUN (kvm_put_guest_fpu on the way out) are
    outside the window."""
    log, ev = _saved("portio")
    modern = Path(__file__).parents[1] / "kvmiso" / "isolation" / "sets" / "modern.toml"
    without_run = tmp_path / "without-kvm-run.toml"
    without_run.write_text(modern.read_text().replace('name = "kvm_run_page"', 'name = "pio_data"'))
    assert check(load_regions(without_run, build_layout(ev, cpus=2)), log, ACCESS).classes["kvm_mm"] == 24
    unmapped = ev.object("files_struct").address & ~0xFFF  # a leaf neither set copies
    space = load_regions(without_run, build_layout(_moved(ev, "kvm_run_page", unmapped), cpus=2))
    assert not space.mapped(unmapped) and space.kernel.translate(unmapped) is not None
    res = check(space, log, ACCESS)
    to_userspace = sum(1 for r in log.records if r.exit.name == "IO")
    assert to_userspace > 0 and {f.region: f.count for f in res.faults} == {"kvm_run_page": to_userspace}


@pytest.mark.parametrize("insn, long_mode, op", [
    ("ec", False, "ec"), ("66ef", True, "ef"), ("f36c", False, "6c"), ("480f32", True, "0f32"),
    ("480f32", False, "48"),  # outside 64-bit mode 0x48 is DEC, not REX
    ("0fa2", True, "0fa2"), ("", True, ""),
])
def test_the_opcode_of_an_emulated_instruction(insn, long_mode, op):
    assert opcode(bytes.fromhex(insn), long_mode) == op


def test_what_the_capture_left_out_is_checked_where_counted_and_said_where_not():
    """A watch of another VMM leaves out the per-instruction events: counted ones are exits
    checked along the instruction fetch (guest memory through the VMM's mapping, which ASI
    leaves), uncounted ones make every count a lower bound; every result says what it saw."""
    log, ev = _saved("portio")
    lay = build_layout(ev, cpus=2)
    base = check(address_space(lay, "asi"), log, ACCESS)
    assert base.unseen == [ANCESTORS_ONLY]
    log.untraced = {"kvm:kvm_emulate_insn": 1000, "kvmmmu:*": None}
    res = check(address_space(lay, "asi"), log, ACCESS)
    assert res.exits == base.exits + 1000 and res.by_kind["host_mm"]["untraced:kvm:kvm_emulate_insn"] == 1000
    assert any("guest_memory" in why for why in res.reasons)
    assert [u.split(":")[0] for u in res.unseen[1:]] == ["kvm", "kvmmmu"]
    assert "lower bounds" in res.unseen[2] and "1000 counted" in res.unseen[1]
    old = check(address_space(lay, "asi-2022"), log, ACCESS)  # guest memory stays mapped in 2022
    assert old.classes["kvm_mm"] == base.exits + 1000


def test_the_loops_work_before_the_next_entry_continues_the_last_exit(tmp_path):
    """After an exit handled in the isolated space, vcpu_enter_guest's work before the next VM
    entry runs there too (the RFC enters kvm_mm just before VM entry, and nothing leaves it until
    a designed switch): here kvm_inject_exception delivering the guest's #UD. Made to touch an
    object the space does not map, it faults, charged to the exit it follows."""
    log, ev = _saved("fault_ud2-cpl3")
    lay = build_layout(ev, cpus=2)
    f = tmp_path / "access.toml"
    f.write_text(ACCESS_TOML.read_text().replace('name = "kvm_inject_exception"\ntouches = ["vcpu_struct"]',
                                                 'name = "kvm_inject_exception"\ntouches = ["vcpu_struct", "guest_fpstate"]'))
    space = load_regions("modern", lay)
    assert not space.mapped(ev.object("guest_fpstate").address)
    base, res = check(space, log, ACCESS), check(space, log, load_access_model(f))
    (inject,) = [x for x in res.faults if x.function == "kvm_inject_exception"]
    assert (inject.region, inject.count) == ("guest_fpstate", 1)
    assert res.classes["kvm_mm"] == base.classes["kvm_mm"] - 1 and res.exits == base.exits


def test_verdicts_that_rest_on_inferred_entries_say_so():
    """kvm_pvm's exit handlers are named from call chains only (basis = "inference"): every exit
    of a kvm_pvm log rests on them, and the text, the JSON and each fault line found in such a
    function say INFERENCE."""
    log, ev = _saved("exceptions-cpl3")
    res = check(address_space(build_layout(ev, cpus=2)), log, ACCESS)
    assert res.exits > 0 and sum(res.resting_exits["inference"].values()) == res.exits
    assert res.resting["inference"]["__pvm_handle_exit"] == res.exits
    assert not res.resting_exits["derived"] and not res.placed  # every function here is in access.toml
    assert f"INFERENCE: {res.exits} of {res.exits} exits rest on access entries INFERRED" in result_text(res)
    out = res.to_dict()
    assert sum(out["inference"]["exits"].values()) == res.exits and "pvm_guest_read" in out["inference"]["functions"]
    inferred = [f for f in res.faults if f.function == "pvm_guest_read"]
    assert inferred and inferred[0].basis == "inference" and inferred[0].line(0).endswith("[access: INFERENCE]")
    assert {f["basis"] for f in out["faults"]} == {"source", "inference"}


def _push_events(log, ev):
    """The events of a pushed exception frame: kvm_write_guest_virt_helper right under pvm_push_frame."""
    for r in log.records:
        for e in r.events:
            names = [ev.code[a].function for a in reversed(e.stack) if a in ev.code]
            if "pvm_push_frame" in names and names[names.index("pvm_push_frame") + 1] == "kvm_write_guest_virt_helper":
                yield r, e


def test_a_pushed_exception_frame_is_a_guest_memory_write_behind_the_rfcs_switch():
    """kvm_pvm delivers a guest exception by writing its frame to the guest stack through
    kvm_write_guest_virt_system, whose tail call leaves no frame: under the RFC the write runs
    after that function's switch point (said to be inferred); under ASI it is a write to guest
    memory through the VMM's mapping, which leaves the restricted space."""
    from kvmiso.isolation.check import Checker

    log, ev = _saved("exceptions-cpl3")
    pushes = list(_push_events(log, ev))
    assert len(pushes) >= 15  # 3 exceptions: SS, RSP, RFLAGS, CS, RIP (and #GP's error code)
    lay = build_layout(ev, cpus=2)
    rfc, asi = Checker(address_space(lay, "rfc-v1"), ACCESS), Checker(address_space(lay, "asi"), ACCESS)
    for r, e in pushes:
        where, v = rfc.event(e, rfc.frames(e), r.vcpu)
        assert where == "checked" and v.cls == "host_mm", v
        assert v.why.startswith("kvm_write_guest_virt_helper: kvm_write_guest_virt_system (hidden by its tail call")
        assert "INFERENCE" in v.why and "RFC patch 07" in v.why
        where, v = asi.event(e, asi.frames(e), r.vcpu)
        assert v.cls == "host_mm" and v.fault.region == "guest_memory:0" and v.fault.function == "kvm_write_guest_virt_helper"


def test_lost_evidence_fails_unless_allowed():
    log, ev = _saved("portio")
    r = next(r for r in log.records if r.events)
    r.events[0] = dataclasses.replace(r.events[0], stack=())
    res = check(address_space(build_layout(ev, cpus=2), "asi"), log, ACCESS)
    assert res.missing_chains >= 1 and res.failed() and not res.failed(allow_lost=True)
    log.lost_events = 5
    assert check(address_space(build_layout(ev, cpus=2), "asi"), log, ACCESS).lost >= 6


def test_logs_from_another_kernel_are_refused():
    log, ev = _saved("portio")
    log.host = {**log.host, "kernel": "4.19.0-old"}
    with pytest.raises(CheckError, match=r"^x.jsonl:1: exit log recorded on kernel 4.19.0-old"):
        check(address_space(build_layout(ev, cpus=2)), log, ACCESS, source="x.jsonl")


@pytest.mark.parametrize("body, line, why", [
    ('[[function]]\nname = "f"\ntouches = ["x"]\n', 1, "cites the source"),
    ('[[function]]\nname = "f"\ncite = "a"\n\n[[function]]\nname = "f"\ncite = "b"\n', 2, "described twice"),
    ('[[function]]\nname = "f"\nrole = "boss"\ncite = "a"\n', 2, "unknown role"),
    ('[[function]]\nname = "f"\ncite = "a"\nwhy = 1\n', 2, "unknown key 'why'"),
    ('[[function]]\nname = "f"\ncite = "a"\nafter = { kvm_pio = ["g"] }\n', 2, "g, called after kvm_pio, has no"),
])
def test_bad_access_models_name_the_line(tmp_path, body, line, why):
    f = tmp_path / "a.toml"
    f.write_text(body)
    with pytest.raises(AccessModelError) as e:
        load_access_model(f)
    assert why in str(e.value) and f"{f}:" in str(e.value)


def test_every_function_on_the_suites_chains_is_known(kvm):
    """The guest suite on this host: every frame of every call chain (not only the frames a check
    walks before an exit's first miss) is a function access.toml names; and where this kernel
    delivers a guest's exceptions through the emulator's functions (kvm_pvm's: kallsyms names them,
    and CPL0 code measured as emulated here), they are among them (the suite takes #UD, #DE and
    #GP at CPL0 and CPL3)."""
    from kvmiso.guest.probe import PROBE_INSNS, emulated_instructions, hypercall_returns
    from kvmiso.guest.suite import suite
    from kvmiso.observe.kernel.kallsyms import read_kallsyms
    from kvmiso.session import capture_checked, check_run

    unknown, seen, chains = Counter(), set(), 0
    with Capture() as cap:
        for entry in suite(hypercall_returns(kvm)):
            if entry.expected is Outcome.TIMEOUT:
                continue
            with Machine(entry.payload, mode=entry.mode, cpl=entry.cpl, kvm=kvm) as m:
                entry.setup(m)
                run = capture_checked(m, cap, entry.label, **entry.run_kwargs())
            assert run.result.outcome is entry.expected, (entry.label, run.result.detail)
            res = check_run(run, "asi", access=ACCESS)
            assert res.lost_events == 0 and res.missing_chains == 0, entry.label
            assert not res.unknown_functions and not res.placed, (entry.label, res.unknown_functions, res.placed)
            for _, e in run.log.events():
                names = [base_name(f.function) if (f := run.evidence.code.get(a)) else f"{a:#x}" for a in e.stack]
                if RUN_PATH not in names:
                    continue  # not inside KVM_RUN (a munmap's MMU notifier): the check does not walk it
                chains += 1
                seen.update(names)
                unknown.update(n for n in names if ACCESS.lookup(n) is None)
    assert chains > 100 and not unknown, unknown
    symbols = read_kallsyms()
    delivery = {n for n in ("pvm_deliver_pending_event", "pvm_guest_read", "pvm_push_frame", "pvm_load_seg",
                            "pvm_tss_stack_lm", "pvm_em_iretq") if symbols is not None and n in symbols}
    if delivery and emulated_instructions(kvm, "long", 0) >= PROBE_INSNS:  # CPL0 exceptions: the emulator's
        assert delivery | {"kvm_write_guest_virt_helper"} <= seen, delivery - seen


def test_every_function_on_the_chains_of_a_cpl0_hypercall_is_known(kvm):
    """The suite leaves the hypercall out where it never returns (kvm_pvm re-executes it inside
    one KVM_RUN); its chains, captured for half a second, are in access.toml too."""
    from kvmiso.session import capture_checked

    with Capture() as cap, Machine("hypercall", mode="long", kvm=kvm) as m:
        run = capture_checked(m, cap, "hypercall", timeout=0.5)
    names = {run.evidence.code[a].function if a in run.evidence.code else f"{a:#x}" for _, e in run.log.events()
             for a in e.stack}
    assert names and {base_name(n) for n in names if ACCESS.lookup(n) is None} == set()


def _bpf_fds():
    out = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            if "bpf" in os.readlink(f"/proc/self/fd/{fd}"):
                out.append(fd)
        except OSError:
            pass
    return out


def test_real_facts_agree_with_independent_sources(kvm):
    """BPF's vcpu->run is the page kvmiso mmapped (pagemap), kvm->mm is current->mm, the
    direct map's base derived from the page table finds that page, and nothing stays open."""
    before = _bpf_fds()
    with Machine("hello", mode="long", kvm=kvm) as m:
        m.run(timeout=5)
        ev = collect_evidence(m.vm, m.vendor)
    assert _bpf_fds() == before  # the BPF programs and map went with their fds
    assert ev.real and ev.source.startswith("bpf+btf")
    agreed = {what for what, ok, _ in ev.checks if ok}
    assert not ev.failed_checks()
    assert "kvm->mm == current->mm" in agreed
    assert any(w.startswith("vcpu->run (bpf) == page_offset_base + PFN") for w in agreed)
    for name in ("vcpu_struct", "vm_struct", "kvm_run_page", "pio_data", "emulate_ctxt", "cpuid_entries",
                 "bus:PIO", "vcpu_task", "vcpu_stack", "pgd"):
        o = ev.object(name)
        assert isinstance(o, KernelObject) and o.address > 1 << 47 and o.size > 0 and o.source.startswith("bpf"), name


def test_without_bpf_everything_is_modeled_and_require_real_fails(kvm, monkeypatch, capsys):
    monkeypatch.setenv("KVMISO_HIDE_BPF", "1")
    with Machine("portio", mode="long", kvm=kvm) as m:
        m.run(timeout=5)
        ev = collect_evidence(m.vm, m.vendor)
    assert not ev.real and "KVMISO_HIDE_BPF" in ev.source
    rc = main(["check", "portio", "--allow-lost"])
    out = capsys.readouterr().out
    assert rc == (1 if "kvm_mm miss #" in out else 0), out  # status 1 exactly when it misses
    assert "modeled: modeled" not in out  # said once per address
    assert "modeled: kernel page table" in out and "modeled: object address: vcpu_struct" in out
    assert main(["check", "portio", "--require-real"]) == 1
    err = capsys.readouterr().err
    assert "--require-real" in err and "KVMISO_HIDE_BPF" in err
    assert main(["model", "--require-real"]) == 1


def test_cli_json_keys_and_saved_evidence(kvm, tmp_path, capsys):
    log, ev = tmp_path / "p.jsonl", tmp_path / "p.evidence.json"
    assert main(["trace", "portio", "--json", str(log), "--evidence", str(ev)]) == 0
    capsys.readouterr()
    assert main(["check", str(log), "--evidence", str(ev), "--json"]) == 1  # the RFC's set faults here
    out = json.loads(capsys.readouterr().out)[0]
    assert {"exits", "policy", "unknown_functions", "faults"} <= set(out) and out["exits"] > 0
    assert {"function", "offset", "address", "region", "source"} <= set(out["faults"][0])
    assert main(["model", "--json", "--evidence", str(ev)]) == 0
    model = json.loads(capsys.readouterr().out)
    row = model["regions"][0]
    assert {"name", "start", "size", "source", "leaf_level", "exposed_bytes"} <= set(row)
    names = {o["name"] for o in model["objects"]}
    assert {"vcpu_struct", "vm_struct", "kvm_run_page", "pio_data", "emulate_ctxt", "cpuid_entries", "vcpu_task",
            "vcpu_stack", "pgd", "bus:PIO"} <= names
    assert main(["check", str(log)]) == 2  # an exit log needs its evidence
    assert "--evidence" in capsys.readouterr().err


@pytest.mark.parametrize("argv, why", [
    (["model", "--regions", "nosuch"], "no region file 'nosuch'"),
    (["check", "portio", "--regions", "/tmp"], "is a directory"),
    (["model", "--policy", "pti"], "unknown policy 'pti'"),
    (["model", "--drop", "nosuch"], "cannot drop 'nosuch'"),
])
def test_cli_bad_model_arguments_are_status_2_in_one_line(kvm, argv, why, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert why in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_measure_switches_of_a_looping_guest(kvm):
    """A guest that exits to userspace forever: the model sees exactly max_exits KVM_RUNs, each
    entering and leaving the isolated space at least once."""
    from kvmiso.session import measure_switches

    rfc = measure_switches(kvm, "bench_out", max_exits=16)
    asi = measure_switches(kvm, "bench_out", policy="asi", max_exits=16)
    assert rfc.runs == asi.runs == 16 and rfc.switches_per_run >= 2 and asi.switches_per_run >= 2
    assert not rfc.unknown_functions and not asi.unknown_functions


@pytest.mark.parametrize("name", ["portio", "hello-cpl3"])
def test_exits_are_cut_by_the_handlers_own_frames(name):
    """kvm_pvm has no kvm_exit: one call of the exit handler is one exit. At CPL0 every emulated
    instruction is one; at CPL3 the #GP trap, the fetch of the faulting instruction and its
    emulation are one, and each guest page fault is one. So every exit in the window holds one
    kvm_emulate_insn, or is one page fault (one walk started by the fault handler), which may
    emulate the faulting instruction (a write to a shadowed page table, MMIO)."""
    from kvmiso.isolation.chainwalk import Checker
    from kvmiso.isolation.exitcut import cut_exits

    log, ev = _saved(name)
    checker = Checker(address_space(build_layout(ev, cpus=2)), ACCESS)
    windows = 0
    for r in log.records:
        chains = [checker.frames(e) for e in r.events]
        for group in cut_exits(False, r.events, chains):
            names = {f.function.split(".")[0] for i in group for f in chains[i]}
            if "pvm_handle_exit" not in names:
                continue
            windows += 1
            emulated = sum(r.events[i].name == "kvm_emulate_insn" for i in group)
            faults = sum(r.events[i].name == "kvm_mmu_pagetable_walk" and "paging64_page_fault" in
                         {f.function for f in chains[i]} for i in group)
            assert (emulated, faults) in ((1, 0), (0, 1), (1, 1)), (r.run, group)
            assert RUN_PATH in names
    openers = sum(1 for _, e in log.events() if e.name == "kvm_emulate_insn" or (
        e.name == "kvm_mmu_pagetable_walk" and "paging64_page_fault" in {ev.code[a].function for a in e.stack}))
    assert 0 < windows <= openers


def test_kvm_amd_exits_and_their_handler_paths_from_source():
    """Captured inside `kvmiso boot` (Debian 6.1, kvm_amd under TCG): kvm_exit opens each exit,
    and the handler path the exit takes after it (no tracepoint shows it) is checked from source."""
    log, ev = _saved("portio-kvm_amd")
    assert ev.vendor == "kvm_amd" and ev.real and not ev.failed_checks()
    assert ev.object("vmcb") is not None and ev.object("msrpm").size == 8192
    lay = build_layout(ev, cpus=1)
    rfc = check(address_space(lay, "rfc-v1"), log, ACCESS)
    asi = check(address_space(lay, "asi"), log, ACCESS)
    exits = sum(1 for _, e in log.events() if e.name == "kvm_exit")
    assert rfc.exits == asi.exits == exits == asi.source_paths > 0  # one exit per entry/kvm_exit
    assert not rfc.unknown_functions and not asi.unknown_functions
    assert asi.classes["kvm_mm"] == exits  # fast PIO on SVM reads no guest memory: nothing leaves
    assert rfc.classes["fault"] > 0
    assert any("from source" in f.source for f in rfc.faults)  # found on a handler's path, said so
