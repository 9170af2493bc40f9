"""check(address space, exit log, access model): would each exit stay in the isolated address
space? Verdicts by address, on the paths that really ran.

For every KVM_RUN of the log, the events inside it are cut into exits (``kvm_exit`` opens one on
VMX/SVM hosts; on kvm_pvm, which has none, each emulated instruction (``kvm_emulate_insn``) and
each run of native-trap events does). Each event's kernel call chain is checked if it lies in the
policy's isolated window (:mod:`.policy`): from the first window frame inward, every function
must be placed by the access model (its access.toml entry, else DERIVED from the kernel's BTF
prototype, else INFERENCE from its neighbours: :meth:`.AccessModel.resolve`), its code page must
be mapped, and every object it touches (at its real address, from the evidence) must translate
through the isolated table. The first miss is the exit's verdict; a verdict that rests on an
entry not read in source says INFERENCE or DERIVED (``CheckResult.resting``):

``kvm_mm``   handled inside the isolated space;
``host_mm``  reached a designed switch (an RFC patch 07 site, an interrupt, a context switch, or
             under ASI a page fault on sensitive memory: asi_exit);
``fault``    under an allowlist, an access kvm_mm does not map before any designed switch,
             printed in the RFC's line with the real function+offset and address;
``unknown``  a frame on the path nothing places (an address no symbol explains): a finding,
             never dropped.

Events outside the window (the ioctl path, ``complete_userspace_io``, ``kvm_mmu_load`` before
entry) run on the full address space by design: counted as ``outside``, not checked. Events not
on the KVM_RUN path at all (a munmap's MMU notifier between two runs) are counted apart.

A miss is not printed as the RFC's patch-24 line (``KVM isolation: page fault #N (error code) at
<faulting instruction> on <address>``): a call chain shows return addresses, not the faulting
instruction, and no error code. It is ``kvm_mm miss #N on <address> (<object>) attributed at
<function>+<offset>``: the frame whose function (or a callee that returned before the event,
access.toml ``first``) touches the object, at the call it was making; #N numbers distinct
(function, object) misses and the count is of exits.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from operator import attrgetter

from ..kvm.exits import IntrExit
from ..observe.kernel.evidence import Frame
from ..observe.tracing.exitlog import ExitLog, RunRecord, TraceEvent
from .access import AccessModel, base_name, opcode
from .chainwalk import Checker, Verdict
from .checkresult import CheckResult, ExitClass
from .exitcut import cut_exits
from .mapset import DenylistSpace, KvmAddressSpace
from .render import chain_inference_note

ANCESTORS_ONLY = ("call chains show the ancestors of traced events only: a function that returned before the "
                  "next traced event is checked only where access.toml names it (after, [[emulated]], "
                  "[[exit_path]]); what no entry names was not checked")


class CheckError(ValueError):
    """An exit log the model cannot check (another kernel, another vendor); names the source."""


def check(space: KvmAddressSpace | DenylistSpace, log: ExitLog, access: AccessModel,
          switch_cost_ns: float | None = None, switch_cost_source: str = "", source: str = "<exit log>",
          same_kernel: bool = True) -> CheckResult:
    """Classify every exit of ``log`` under ``space``'s policy; see the module docstring."""
    if same_kernel:
        _check_host(log, space.layout.evidence, source)
    res = _new_result(space, log, switch_cost_ns, switch_cost_source)
    checker = Checker(space, access)
    checker.learn([e for _, e in log.events()])
    runs = _distinct_runs(log)
    has_exit_events = any(e.name == "kvm_exit" for r, _ in runs for e in r.events)
    for r, n in runs:
        switches = _classify_run(checker, r, has_exit_events, res, n)
        res.switches += switches * n
        res.switch_hist[switches] += n
    _charge_untraced(checker, log, res)
    res.unknown_functions = checker.unknown
    res.placed = {n: {"basis": fa.basis, "objects": list(fa.touches), "cite": fa.cite} for n, fa in checker.placed.items()}
    res.unplaced = checker.unplaced
    res.modeled += [f"{name}: no page mapped when the evidence was read (the VMM had exited); taken as resident "
                    "while its guest ran" for name in sorted(checker.gone_user)]
    res.unresolved_frames = checker.unresolved
    if res.unresolved_frames:
        res.notes.append(f"{res.unresolved_frames} return addresses no kallsyms symbol explains")
    return res


def _new_result(space: KvmAddressSpace | DenylistSpace, log: ExitLog, switch_cost_ns: float | None,
                switch_cost_source: str) -> CheckResult:
    """An empty result that says what the verdicts rest on: modeled facts, what was not seen."""
    layout = space.layout
    res = CheckResult(space.policy.name, layout.vendor, layout.source, tracing=log.tracing)
    if switch_cost_ns is not None:
        res.switch_cost_ns, res.switch_cost_source = switch_cost_ns, switch_cost_source or "given"
    res.modeled = [f"object address: {n}" for n in layout.modeled_objects]
    res.modeled += [f"isolated space: {a}" for a in getattr(space, "assumed", ())]  # what a policy takes as mapped
    if not layout.real:
        res.modeled.insert(0, "kernel page table (modeled: no live table in the evidence)")
    if not log.tracing:
        res.notes.append(f"no trace events ({log.tracing_reason or 'tracing off'}): no exit has a call chain")
    res.lost_events = log.lost_events
    if log.host.get("chains_inferred"):
        res.notes.append(chain_inference_note(log.host))
    res.runs = len(log.records)
    res.wall_ns = sum(r.end_ns for r in log.records) - sum(r.start_ns for r in log.records)
    res.unseen = [ANCESTORS_ONLY]
    return res


def _distinct_runs(log: ExitLog) -> list[tuple[RunRecord, int]]:
    """One record of each distinct KVM_RUN (same exit, vCPU, events and chains) with its count:
    identical runs are classified once."""
    event_key = attrgetter("name", "cpu", "stack")
    distinct: dict[tuple, list] = {}
    for r in log.records:
        sig = (r.exit.name, r.vcpu, tuple(map(event_key, r.events)))
        distinct.setdefault(sig, [r, 0])[1] += 1
    return [(r, n) for r, n in distinct.values()]


def _classify_run(checker: Checker, r: RunRecord, has_exit_events: bool, res: CheckResult, n: int) -> int:
    """Classify the exits of one KVM_RUN (seen ``n`` times) into ``res``; the address-space
    switches it makes."""
    verdicts, last = _run_verdicts(checker, r, has_exit_events, res, n)
    switches, left = 1, False  # entering the isolated space before the first VM entry
    for x, verdict, opener, resting in verdicts:
        cls = _tally(res, verdict, opener.kind, n)
        res.rest(cls, resting, n)
        if cls.leaves:
            switches += 1 + (1 if x < last else 0)  # out, and back in before the next entry
            left = x == last
    return switches + (0 if left else 1)  # the end of vcpu_run: back to the full space for userspace


def _run_verdicts(checker: Checker, r: RunRecord, has_exit_events: bool, res: CheckResult,
                  n: int) -> tuple[list[list], int]:
    """The checked exits of one KVM_RUN in order, each [exit index, verdict (None: it stays),
    the event that opened it, the entries not read in source it rests on], and the index of the
    last exit in the window."""
    evs = r.events
    res.missing_chains += n * sum(1 for e in evs if not e.stack)
    chains = [checker.frames(e) for e in evs]
    exits = _split_reentry(checker, evs, chains, cut_exits(has_exit_events, evs, chains))
    # The exit that goes to userspace (when the KVM_RUN returned with one) is the last that ran
    # in the window: events after it (kvm_put_guest_fpu on the way out) are outside it.
    in_window = [x for x, group in enumerate(exits) if any(checker.place(evs[i], chains[i]) == "checked" for i in group)]
    last = in_window[-1] if in_window else -1
    to_user_exit = last if not isinstance(r.exit, IntrExit) else -1
    isolated = False  # after an exit handled in the isolated space, until a switch or the next entry
    verdicts: list[list] = []  # [group index, verdict, opener, entries it rests on] of each exit
    for x, group in enumerate(exits):
        checker.resting = {}
        verdict, where, opener = _exit_verdict(checker, r, group, chains, x == to_user_exit, res, n, isolated)
        if where == "reentry":  # the last exit's iteration goes on: its verdict, if it still stayed
            if verdicts and verdicts[-1][1] is None:
                verdicts[-1][1] = verdict
                verdicts[-1][3].update(checker.resting)
        elif where == "checked":
            verdicts.append([x, verdict, opener, checker.resting])
        if where != "outside":
            isolated = verdicts[-1][1] is None
    return verdicts, last


def exit_verdicts(space: KvmAddressSpace | DenylistSpace, log: ExitLog,
                  access: AccessModel) -> list[tuple[int, str, Verdict | None]]:
    """Every checked exit of ``log`` in order, unfolded (check() classifies identical KVM_RUNs
    once): (the KVM_RUN's index in the log, the exit's kind, its verdict; None: it stays)."""
    checker = Checker(space, access)
    checker.learn([e for _, e in log.events()])
    has_exit_events = any(e.name == "kvm_exit" for r in log.records for e in r.events)
    scratch = _new_result(space, log, None, "")
    out = []
    for k, r in enumerate(log.records):
        verdicts, _ = _run_verdicts(checker, r, has_exit_events, scratch, 1)
        out += [(k, opener.kind, v) for _, v, opener, _ in verdicts]
    return out


def _split_reentry(checker: Checker, evs: list[TraceEvent], chains: list[list[Frame]],
                   exits: list[list[int]]) -> list[list[int]]:
    """Exits with the loop's work before the next VM entry (kvm_inject_exception, ...) split off
    their head: the cut joins that work to the exit it precedes, but it continues the last one."""
    out = []
    for group in exits:
        k = next((j for j, i in enumerate(group) if checker.place(evs[i], chains[i]) == "checked"), len(group))
        head = group[:k]
        if 0 < k < len(group) and any(checker.place(evs[i], chains[i], True) == "reentry" for i in head):
            out += [head, group[k:]]
        else:
            out.append(group)
    return out


def _exit_verdict(checker: Checker, r: RunRecord, group: list[int], chains: list[list[Frame]], to_user: bool,
                  res: CheckResult, n: int, isolated: bool) -> tuple[Verdict | None, str, TraceEvent]:
    """One exit's verdict (None: it stays), where it ran ('checked' when any event was in the
    window, 'reentry' for the loop's work before the next entry, else 'outside'), and the event
    that opened it. After the observed frames, the paths no event shows are checked: the
    handler after a kvm_exit, the execution of a decoded instruction."""
    evs = r.events
    verdict, where = None, "outside"
    window = [i for i in group if checker.place(evs[i], chains[i]) == "checked"]
    for i in group:
        at, v = checker.event(evs[i], chains[i], r.vcpu, to_user, last=bool(window) and i == window[-1],
                              isolated=isolated)
        if at not in ("checked", "reentry"):
            res.classes[at] += n
            continue
        where = "checked" if "checked" in (at, where) else at
        if v is not None:
            verdict = v
            break  # the rest of this exit runs on the full address space
    checked = where == "checked"
    opener = next((evs[i] for i in group if evs[i].name == "kvm_exit"), evs[group[0]])
    if verdict is None and checked and opener.name == "kvm_exit":
        path = checker.access.exit_path(checker.layout.vendor, opener.symbols.get("exit_reason", ""),
                                        checker.layout.evidence.kernel)
        if path is not None:
            res.source_paths += n
            verdict = checker.source_path(path, r.vcpu, opener.cpu, to_user)
    if verdict is None and checked:
        decoded = unseen_execution(evs, group, chains)
        path = checker.access.emulated_path(*decoded) if decoded else None
        if path is not None:
            res.emulated_paths += n
            verdict = checker.unseen_calls(path.functions, f"emulated:{opcode(*decoded)}", r.vcpu, opener.cpu,
                                           to_user, f"executes the decoded instruction, from source ({path.cite})")
    return verdict, where, opener


def _tally(res: CheckResult, verdict: Verdict | None, kind: str, n: int) -> ExitClass:
    """Count ``n`` exits of ``kind`` with ``verdict`` into ``res``; their class."""
    cls = verdict.cls if verdict else ExitClass.KVM_MM
    kind = verdict.kind if verdict else kind
    res.exits += n
    res.classes[cls] += n
    res.by_kind.setdefault(cls, Counter())[kind] += n
    if cls is ExitClass.HOST_MM:
        res.reasons[verdict.why] += n
    if cls is ExitClass.FAULT:
        f = verdict.fault
        fault = next((x for x in res.faults if (x.function, x.region) == (f.function, f.region)), None)
        if fault is None:
            fault = dataclasses.replace(f, kinds=set())
            res.faults.append(fault)
        fault.count += n
        fault.kinds.add(kind)
    return cls


def _charge_untraced(checker: Checker, log: ExitLog, res: CheckResult) -> None:
    """The events the capture left out: each counted one is an exit checked along its path from
    source (on vCPU 0's objects); an uncounted kind makes every verdict a lower bound."""
    for event, count in log.untraced.items():
        path = checker.access.untraced.get(event)
        if count is None or path is None:
            res.unseen.append(f"{event}: not traced and not counted; the exits behind it were not checked, so the "
                              "counts above are lower bounds")
            continue
        res.unseen.append(f"{event}: not traced; {count} counted, each checked along its path from source")
        if count:
            verdict = checker.unseen_calls(path.functions, f"untraced:{event}", 0, 0, False,
                                           f"behind each untraced {event}, from source ({path.cite})")
            if _tally(res, verdict, f"untraced:{event}", count).leaves:
                res.switches += 2 * count  # out, and back in before the next entry


def unseen_execution(evs: list[TraceEvent], group: list[int], chains: list[list[Frame]]) -> tuple[bytes, bool] | None:
    """The instruction (bytes, 64-bit mode) an exit's kvm_emulate_insn decoded when no later event
    of the exit shows its execution (x86_emulate_insn on the chain), else None."""
    for k, i in enumerate(group):
        e = evs[i]
        if e.name != "kvm_emulate_insn" or e.fields.get("failed"):
            continue
        if any("x86_emulate_insn" in {base_name(f.function) for f in chains[j]} for j in group[k + 1:]):
            return None
        insn = bytes.fromhex(str(e.fields.get("insn", "")))[:int(e.fields.get("len", 15))]
        return insn, "prot64" in str(e.symbols.get("flags", ""))
    return None


def _check_host(log: ExitLog, evidence, source: str) -> None:
    kernel = log.host.get("kernel")
    vendor = log.host.get("vendor")
    if kernel and evidence.kernel and kernel != evidence.kernel:
        raise CheckError(f"{source}:1: exit log recorded on kernel {kernel}, the evidence is of kernel "
                         f"{evidence.kernel}: its functions and addresses would not match")
    if vendor and evidence.vendor and vendor != evidence.vendor:
        raise CheckError(f"{source}:1: exit log recorded with vendor module {vendor}, the evidence is of "
                         f"{evidence.vendor}")


__all__ = ["CheckError", "check", "exit_verdicts"]
