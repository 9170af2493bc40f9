"""check(address space, exit log, access model): would each exit stay in the isolated address
space? Verdicts by address, on the paths that really ran.

For every KVM_RUN of the log, the events inside it are cut into exits (``kvm_exit`` opens one on
VMX/SVM hosts; on kvm_pvm, which has none, each emulated instruction (``kvm_emulate_insn``) and
each run of native-trap events does). Each event's kernel call chain is checked if it lies in the
policy's isolated window (:mod:`.policy`): from the first window frame inward, every function
must be known to the access model, its code page must be mapped, and every object it touches
(at its real address, from the evidence) must translate through the isolated table. The first
miss is the exit's verdict:

``kvm_mm``   handled inside the isolated space;
``host_mm``  reached a designed switch (an RFC patch 07 site, an interrupt, a context switch, or
             under ASI a page fault on sensitive memory: asi_exit);
``fault``    under an allowlist, an access kvm_mm does not map before any designed switch,
             printed in the RFC's line with the real function+offset and address;
``unknown``  a function on the path the access model does not know: a finding, never dropped.

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
from dataclasses import dataclass
from operator import attrgetter

from ..kvm.exits import IntrExit
from ..observe.evidence import Frame
from ..observe.exitlog import ExitLog, RunRecord, TraceEvent
from .access import AccessModel, ExitPath, FunctionAccess, base_name, opcode
from .checkresult import CheckResult, Fault
from .exitcut import RUN_PATH, cut_exits
from .layout import PAGE, Region
from .mapset import DenylistSpace, KvmAddressSpace

# Access-model objects that live inside a region the layout names otherwise: kvm_pvm's static
# per-CPU variables are in each CPU's per-CPU unit.
ALIASES = {"pvm_percpu": "percpu_area"}
MAX_PAGES_CHECKED = 1024  # pages of one object checked (guest RAM: 2 MiB)
ANCESTORS_ONLY = ("call chains show the ancestors of traced events only: a function that returned before the "
                  "next traced event is checked only where access.toml names it (after, [[emulated]], "
                  "[[exit_path]]); what no entry names was not checked")


class CheckError(ValueError):
    """An exit log the model cannot check (another kernel, another vendor); names the source."""


@dataclass(frozen=True)
class _Verdict:
    cls: str
    kind: str
    why: str = ""
    fault: Fault | None = None  # the miss behind a fault (or, under ASI, behind its asi_exit); count 0


class Checker:
    """Classifies the events of KVM_RUNs against one address space and access model."""

    def __init__(self, space: KvmAddressSpace | DenylistSpace, access: AccessModel) -> None:
        self.space = space
        self.access = access
        self.policy = space.policy
        self.layout = space.layout
        self.code = self.layout.evidence.code
        self._mapped: dict[int, bool] = {}
        self._in_kernel: dict[int, bool] = {}
        self.unknown: Counter = Counter()
        self.unplaced: Counter = Counter()
        self.unresolved = 0

    def _is_mapped(self, addr: int) -> bool:
        m = self._mapped.get(addr)
        if m is None:
            m = self._mapped[addr] = self.space.mapped(addr)
        return m

    def _first_unmapped(self, region: Region, index: int) -> int | None:
        """The first page of the object (for vCPU/CPU ``index``) that the kernel maps and the
        isolated space does not (a page the kernel does not map either is no isolation fault:
        a guest page never touched, a hole in a section)."""
        s, e = region.ranges[index % len(region.ranges)]
        for va in range(s & ~(PAGE - 1), min(e, s + MAX_PAGES_CHECKED * PAGE), PAGE):
            if not self._is_mapped(va) and self._kernel_maps(va):
                return max(va, s)
        return None

    def _kernel_maps(self, addr: int) -> bool:
        m = self._in_kernel.get(addr)
        if m is None:
            try:
                m = self._in_kernel[addr] = self.space.kernel.translate(addr) is not None
            except (ValueError, KeyError):  # a table page the evidence did not read
                m = self._in_kernel[addr] = False
        return m

    def frames(self, e: TraceEvent) -> list[Frame]:
        """The event's chain, outermost first, resolved (unresolvable addresses counted)."""
        out = []
        for a in reversed(e.stack):
            f = self.code.get(a)
            if f is None:
                self.unresolved += 1
                f = Frame(a, f"{a:#x}", 0)
            out.append(f)
        return out

    def place(self, e: TraceEvent, frames: list[Frame]) -> str:
        """Where the event ran: 'not_kvm_run', 'outside' the policy's window, or 'checked'."""
        names = [base_name(f.function) for f in frames]
        if RUN_PATH not in names:
            return "not_kvm_run"
        if e.name in self.policy.before_entry_events or not self.access.exit_handlers.intersection(names):
            return "outside"
        return "checked"

    def event(self, e: TraceEvent, frames: list[Frame], vcpu: int, to_userspace: bool = False,
              last: bool = False) -> tuple[str, _Verdict | None]:
        """('not_kvm_run' | 'outside' | 'checked', the verdict when it is not kvm_mm), for the
        event ``e`` whose resolved chain is ``frames`` (:meth:`frames`). Going down the chain each
        function's accesses before the call it was seen making are checked (access.toml
        ``before``; all of them where it says nothing); for the ``last`` event of an exit, its
        accesses after that call too, on the way back up."""
        where = self.place(e, frames)
        if where != "checked":
            return where, None
        names = [base_name(f.function) for f in frames]
        start = next(i for i, n in enumerate(names) if n in self.access.exit_handlers)
        kind = e.kind
        innermost, after_return = None, []
        for k in range(start, len(frames)):
            f, name = frames[k], names[k]
            fa = self.access.lookup(f.function)
            if fa is None:
                self.unknown[name] += 1
                return "checked", _Verdict("unknown", kind, f"unknown function on the path: {name}")
            if fa.role == "observer":
                break  # the tracepoint's own machinery: kvmiso's instrument, not KVM's path
            why = self.policy.switch_at(name)
            if why:
                return "checked", _Verdict("host_mm", kind, f"{name}: {why}")
            touches = (self.access.implicit if k == start else ()) + self.objects(fa, to_userspace)
            callee = names[k + 1] if k + 1 < len(names) else ""
            early = fa.before.get(callee)
            if early is not None:
                after_return.append((f, fa, tuple(t for t in touches if t not in early)))
                touches = tuple(t for t in touches if t in early)
            miss = self._code_miss(f, frames) or self._object_miss(touches, vcpu, e.cpu, f, fa, frames)
            if miss is not None:
                return "checked", self._miss(kind, miss)
            innermost = fa
        after = innermost.after.get(e.name, ()) if innermost is not None else ()
        v = self.unseen_calls(after, kind, vcpu, e.cpu, to_userspace,
                              f"called by {innermost.name} after its {e.name} event" if after else "")
        for f, fa, touches in reversed(after_return if last and v is None else []):
            miss = self._object_miss(touches, vcpu, e.cpu, f, fa, frames, after_call=True)
            if miss is not None:
                return "checked", self._miss(kind, miss)
        return "checked", v

    def objects(self, fa: FunctionAccess, to_userspace: bool) -> tuple[str, ...]:
        """What ``fa`` touches on this kernel for an exit that does (not) go to userspace."""
        return fa.objects(self.layout.vendor, self.layout.evidence.config, to_userspace)

    def _miss(self, kind: str, fault: Fault) -> _Verdict:
        """A missing mapping: a fault under an allowlist, ASI's designed asi_exit under a denylist."""
        if self.policy.miss_is_switch:
            return _Verdict("host_mm", kind, f"page fault on sensitive memory ({fault.region}) attributed at "
                                             f"{fault.where()}: asi_exit", fault)
        return _Verdict("fault", kind, fault.region, fault)

    def source_path(self, path: ExitPath, vcpu: int, cpu: int, to_userspace: bool) -> _Verdict | None:
        """The handler functions an exit runs after its kvm_exit, from source (see
        :class:`ExitPath`): their objects checked, after the observed frames."""
        return self.unseen_calls(path.functions, f"{path.vendor}:{path.reason}", vcpu, cpu, to_userspace,
                                 f"handler path from source ({path.cite})")

    def unseen_calls(self, functions: tuple[str, ...], kind: str, vcpu: int, cpu: int, to_userspace: bool,
                     origin: str) -> _Verdict | None:
        """Functions no chain shows but the source says ran (``origin`` says how it is known),
        checked in order: the first switch or miss among their objects."""
        for name in functions:
            why = self.policy.switch_at(name)
            if why:
                return _Verdict("host_mm", kind, f"{name} ({origin}): {why}")
            fa = self.access.functions[name]
            miss = self._object_miss(self.objects(fa, to_userspace), vcpu, cpu, None, fa, (), origin=origin)
            if miss is not None:
                return self._miss(kind, miss)
        return None

    def _code_miss(self, f: Frame, frames: list[Frame]) -> Fault | None:
        if f.function.startswith("0x") or self._is_mapped(f.address):
            return None  # unresolved (counted, its code cannot be placed), or mapped
        return Fault(base_name(f.function), f.offset, f.size, f.address, "kernel text", "the call chain",
                     stack=_stack(frames))

    def _object_miss(self, touches: tuple[str, ...], vcpu: int, cpu: int, f: Frame | None, fa: FunctionAccess,
                     frames: list[Frame] | tuple, after_call: bool = False, origin: str = "") -> Fault | None:
        """The first object of ``touches`` with a page the isolated space does not map, as a
        Fault attributed at frame ``f`` of function ``fa`` (None: a function no chain shows)."""
        for name in touches:
            name = ALIASES.get(name, name)
            regions = self.layout.matching(name)
            if not regions and ":" not in name:
                regions = self.layout.matching(name + ":*")
            if not regions:
                self.unplaced[name] += 1
                continue
            for r in regions:
                index = cpu if r.per == "cpu" else vcpu if r.per == "vcpu" else 0
                addr = self._first_unmapped(r, index)
                if addr is None:
                    continue
                source = ("modeled: " if r.modeled else "") + r.source + (f"; not on the chain: {origin}" if origin else "")
                return Fault(fa.name, f.offset if f else 0, f.size if f else 0, addr, r.name, source,
                             stack=_stack(frames) if f else (f"{fa.name} ({origin})",),
                             first_access=fa.first.get(name, ""), after_call=after_call,
                             on_chain=f is not None)
        return None


def _stack(frames: list[Frame]) -> tuple[str, ...]:
    return tuple(f"{g.function}+{g.offset:#x}" for g in reversed(frames))


def check(space: KvmAddressSpace | DenylistSpace, log: ExitLog, access: AccessModel,
          switch_cost_ns: float | None = None, switch_cost_source: str = "", source: str = "<exit log>",
          same_kernel: bool = True) -> CheckResult:
    """Classify every exit of ``log`` under ``space``'s policy; see the module docstring."""
    if same_kernel:
        _check_host(log, space.layout.evidence, source)
    res = _new_result(space, log, switch_cost_ns, switch_cost_source)
    checker = Checker(space, access)
    runs = _distinct_runs(log)
    has_exit_events = any(e.name == "kvm_exit" for r, _ in runs for e in r.events)
    for r, n in runs:
        switches = _classify_run(checker, r, has_exit_events, res, n)
        res.switches += switches * n
        res.switch_hist[switches] += n
    _charge_untraced(checker, log, res)
    res.unknown_functions = checker.unknown
    res.unplaced = checker.unplaced
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
    if not layout.real:
        res.modeled.insert(0, "kernel page table (modeled: no live table in the evidence)")
    if not log.tracing:
        res.notes.append(f"no trace events ({log.tracing_reason or 'tracing off'}): no exit has a call chain")
    res.lost_events = log.lost_events
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
    evs = r.events
    res.missing_chains += n * sum(1 for e in evs if not e.stack)
    chains = [checker.frames(e) for e in evs]
    exits = cut_exits(has_exit_events, evs, chains)
    # The exit that goes to userspace (when the KVM_RUN returned with one) is the last that ran
    # in the window: events after it (kvm_put_guest_fpu on the way out) are outside it.
    in_window = [x for x, group in enumerate(exits) if any(checker.place(evs[i], chains[i]) == "checked" for i in group)]
    last = in_window[-1] if in_window else -1
    to_user_exit = last if not isinstance(r.exit, IntrExit) else -1
    switches, left = 1, False  # entering the isolated space before the first VM entry
    for x, group in enumerate(exits):
        verdict, checked, opener = _exit_verdict(checker, r, group, chains, x == to_user_exit, res, n)
        if not checked:
            continue
        cls = _tally(res, verdict, opener.kind, n)
        if cls in ("host_mm", "fault"):
            switches += 1 + (1 if x < last else 0)  # out, and back in before the next entry
            left = x == last
    return switches + (0 if left else 1)  # the end of vcpu_run: back to the full space for userspace


def _exit_verdict(checker: Checker, r: RunRecord, group: list[int], chains: list[list[Frame]], to_user: bool,
                  res: CheckResult, n: int) -> tuple[_Verdict | None, bool, TraceEvent]:
    """One exit's verdict (None: it stays), whether any of its events was in the window, and the
    event that opened it. After the observed frames, the paths no event shows are checked: the
    handler after a kvm_exit, the execution of a decoded instruction."""
    evs = r.events
    verdict, checked = None, False
    window = [i for i in group if checker.place(evs[i], chains[i]) == "checked"]
    for i in group:
        where, v = checker.event(evs[i], chains[i], r.vcpu, to_user, last=bool(window) and i == window[-1])
        if where != "checked":
            res.classes[where] += n
            continue
        checked = True
        if v is not None:
            verdict = v
            break  # the rest of this exit runs on the full address space
    opener = next((evs[i] for i in group if evs[i].name == "kvm_exit"), evs[group[0]])
    if verdict is None and checked and opener.name == "kvm_exit":
        path = checker.access.exit_paths.get((checker.layout.vendor, opener.symbols.get("exit_reason", "")))
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
    return verdict, checked, opener


def _tally(res: CheckResult, verdict: _Verdict | None, kind: str, n: int) -> str:
    """Count ``n`` exits of ``kind`` with ``verdict`` into ``res``; their class."""
    cls = verdict.cls if verdict else "kvm_mm"
    kind = verdict.kind if verdict else kind
    res.exits += n
    res.classes[cls] += n
    res.by_kind.setdefault(cls, Counter())[kind] += n
    if cls == "host_mm":
        res.reasons[verdict.why] += n
    if cls == "fault":
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
            _tally(res, verdict, f"untraced:{event}", count)


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


__all__ = ["CheckError", "Checker", "check"]
