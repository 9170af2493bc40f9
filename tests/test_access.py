"""The access model on every kernel: a function access.toml does not name is placed by the kernel
that ran it (DERIVED from its BTF prototype, or INFERENCE from its neighbours where that BTF has
no FUNC record), and says so; a frame nothing places stays a finding. Pure tests on chains and
BTF FUNC records saved from this host; one test on the running kernel's own BTF."""

import dataclasses
import json
import platform
from pathlib import Path

from kvmiso.guest import Machine
from kvmiso.isolation import address_space, build_layout, check, load_access_model, result_text
from kvmiso.isolation.access import base_name, running_prototypes
from kvmiso.isolation.accessfile import ACCESS_TOML
from kvmiso.observe.kernel.btf import Param
from kvmiso.observe.tracing.capture import Capture
from kvmiso.observe.kernel.evidence import read_evidence
from kvmiso.observe.tracing.exitlog import read_jsonl

FIX = Path(__file__).parent / "fixtures" / "evidence"


def _saved(name):
    return read_jsonl(FIX / f"{name}.jsonl"), read_evidence(FIX / f"{name}.evidence.json")


def _without(tmp_path, *names):
    """access.toml with the entries of ``names`` renamed away (as on a kernel it was not written for)."""
    text = ACCESS_TOML.read_text()
    for name in names:
        assert text.count(f'name = "{name}"\n') == 1, name
        text = text.replace(f'name = "{name}"\n', f'name = "{name}_not_this_kernel"\n')
    f = tmp_path / "access.toml"
    f.write_text(text)
    return load_access_model(f)


def _saved_prototypes(kernel):
    """The BTF FUNC records of 6.18.44-fc-v1300 for the functions on exceptions-cpl3's chains,
    read there with Btf.func (null where that BTF has none)."""
    doc = json.loads((FIX / "exceptions-cpl3.btf-funcs.json").read_text())
    if kernel != doc["kernel"]:
        return None
    funcs = {n: None if ps is None else tuple(Param(p, 0, t, s) for p, t, s in ps) for n, ps in doc["functions"].items()}
    return funcs.get


def test_a_function_the_table_does_not_name_gets_its_objects_from_its_btf_prototype(tmp_path):
    """pvm_push_frame's entry removed: its kernel's FUNC record (struct kvm_vcpu *vcpu, u64 *rsp,
    ...) names the vCPU, and every place that shows the verdict says DERIVED."""
    log, ev = _saved("exceptions-cpl3")
    model = _without(tmp_path, "pvm_push_frame")
    model.prototypes_for = _saved_prototypes
    res = check(address_space(build_layout(ev, cpus=2), "asi-2022"), log, model)
    assert not res.unknown_functions and not res.failed()
    how = res.placed["pvm_push_frame"]
    assert how["basis"] == "derived" and how["objects"] == ["vcpu_struct"]
    assert how["cite"].startswith("BTF FUNC pvm_push_frame(struct kvm_vcpu *vcpu, u64 *rsp, u64 val")
    assert res.resting["derived"]["pvm_push_frame"] == res.resting_exits["derived"]["kvm_mm"] > 0
    text = result_text(res)
    assert "DERIVED: " in text and "pvm_push_frame: DERIVED objects vcpu_struct: BTF FUNC" in text
    out = res.to_dict()
    assert out["derived"]["functions"] == {"pvm_push_frame": res.resting["derived"]["pvm_push_frame"]}
    assert out["placed_functions"]["pvm_push_frame"]["basis"] == "derived"


def test_where_btf_has_no_func_record_the_neighbours_place_it_as_inference(tmp_path):
    """pvm_em_iretq (an .isra clone: no FUNC record on this build) and, on a kernel whose BTF has
    none at all, pvm_emulate_insn_scrubbed: the objects their caller hands down, INFERENCE."""
    log, ev = _saved("exceptions-cpl3")
    model = _without(tmp_path, "pvm_em_iretq")
    model.prototypes_for = _saved_prototypes
    res = check(address_space(build_layout(ev, cpus=2), "asi-2022"), log, model)
    how = res.placed["pvm_em_iretq"]
    assert how["basis"] == "inference" and "placed by its neighbours on the chain, pvm_emulate_one above" in how["cite"]
    assert how["objects"] == ["vcpu_struct"] and not res.unknown_functions
    log, ev = _saved("portio")  # recorded on 6.18.44-fc-v857: this host's BTF is not that kernel's
    model = _without(tmp_path, "pvm_emulate_insn_scrubbed")
    res = check(address_space(build_layout(ev, cpus=2)), log, model)
    how = res.placed["pvm_emulate_insn_scrubbed"]
    assert how["basis"] == "inference" and how["objects"] == ["vcpu_struct"]  # __pvm_handle_exit's, also x86_emulate_instruction's
    assert "and x86_emulate_instruction below it" in how["cite"] and not res.unknown_functions
    assert res.resting["inference"]["pvm_emulate_insn_scrubbed"] > 0
    assert "pvm_emulate_insn_scrubbed: INFERENCE objects vcpu_struct" in result_text(res)


def test_a_frame_nothing_places_is_still_a_finding():
    """An address no symbol explains, inside the window, has neither a prototype nor a name."""
    log, ev = _saved("portio")
    r = next(r for r in log.records if any(ev.code.get(a) and ev.code[a].function.startswith("pvm_emulate_insn")
                                           for e in r.events for a in e.stack))
    i = next(i for i, e in enumerate(r.events) if any(ev.code.get(a) and ev.code[a].function.startswith(
        "pvm_emulate_insn") for a in e.stack))
    stack = tuple(0xFFFFFFFFC0DE0000 if ev.code.get(a) and ev.code[a].function.startswith("pvm_emulate_insn") else a
                  for a in r.events[i].stack)
    r.events[i] = dataclasses.replace(r.events[i], stack=stack)
    res = check(address_space(build_layout(ev, cpus=2)), log, load_access_model())
    assert res.unknown_functions == {"0xffffffffc0de0000": 1} and res.classes["unknown"] == 1 and res.failed()


def test_another_kernels_chains_are_not_read_with_this_kernels_btf():
    assert running_prototypes("4.19.0-not-this-kernel") is None and running_prototypes("") is None


def test_on_the_running_kernel_a_removed_entry_is_derived_or_inferred_by_what_its_btf_has(kvm, tmp_path):
    """The real thing: a guest's chains on this host, the model missing entries of functions
    those chains show; each is DERIVED from this kernel's FUNC record of it, or INFERENCE where
    this kernel's BTF has none."""
    from kvmiso.session import capture_checked, check_run

    with Machine("exceptions", mode="long", kvm=kvm) as m, Capture() as cap:
        run = capture_checked(m, cap, "exceptions")
    full = load_access_model()
    kernel = run.evidence.kernel
    assert kernel == platform.release()
    protos = running_prototypes(kernel)
    referenced = {fn for p in full.exit_paths.values() for fn in p.functions}
    referenced |= {fn for p in [*full.emulated.values(), *full.untraced.values()] for fn in p.functions}
    referenced |= {fn for f in full.functions.values() for fns in f.after.values() for fn in fns}
    shown = {base_name(f.function) for f in run.evidence.code.values()}
    candidates = sorted(n for n in shown if n in full.functions and n not in referenced and not full.functions[n].role)
    with_func = [n for n in candidates if protos is not None and protos(n) is not None]
    without = [n for n in candidates if protos is None or protos(n) is None]
    removed = ([n for n in ("pvm_push_frame", *with_func) if n in with_func][:1] + without[:1])
    assert removed and (protos is None or with_func)  # this host's BTF has FUNC records: one is derived
    model = _without(tmp_path, *removed)
    assert not check_run(run, "asi-2022", access=model).unknown_functions
    chains = [[run.evidence.code[a].function if a in run.evidence.code else f"{a:#x}" for a in reversed(e.stack)]
              for _, e in run.log.events()]
    for name in removed:
        chain = next(c for c in chains if name in map(base_name, c))
        fa = model.resolve(chain, [base_name(f) for f in chain].index(name), kernel)
        if name in with_func:
            want = tuple(dict.fromkeys(model.derive_types[p.pointee] for p in protos(name) if p.pointee in model.derive_types))
            assert fa.basis == "derived" and fa.touches == want and fa.cite.startswith(f"BTF FUNC {name}("), fa
        else:
            assert fa.basis == "inference" and "placed by its neighbours" in fa.cite, fa
