"""One event's kernel call chain walked through the access model against one isolated address
space: the functions in the policy's window, in order, each one's code page and the objects it
touches (at their real addresses) translated through the isolated table; the first switch or
miss is the event's verdict (see :mod:`.check` for how events make exits).
"""

from __future__ import annotations

from collections import Counter
from fnmatch import fnmatch
from dataclasses import dataclass

from ..observe.kernel.evidence import Frame
from ..observe.tracing.exitlog import TraceEvent
from .access import AccessModel, ExitPath, FunctionAccess, base_name
from .checkresult import ExitClass, Fault
from .exitcut import RUN_PATH
from .layout import PAGE, Region
from .mapset import DenylistSpace, KvmAddressSpace

# Access-model objects that live inside a region the layout names otherwise: kvm_pvm's static
# per-CPU variables are in each CPU's per-CPU unit.
ALIASES = {"pvm_percpu": "percpu_area"}
MAX_PAGES_CHECKED = 1024  # pages of one object checked (guest RAM: 2 MiB)


@dataclass(frozen=True)
class Verdict:
    """What one event (or one exit) comes to: its class (kvm_mm is None), the exit kind, why."""

    cls: ExitClass
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
        self.gone_user: set[str] = set()  # user regions taken as resident (see _first_unmapped)
        self.unresolved = 0
        self.resting: dict[str, str] = {}  # this exit's entries not read in source: function -> basis
        self.placed: dict[str, FunctionAccess] = {}  # functions access.toml does not name, as placed
        # return addresses in KVM_RUN's own frame of its calls to an exit handler (learn())
        self.handler_calls: set[int] = set()

    def learn(self, events: list[TraceEvent]) -> None:
        """Note where KVM_RUN calls its exit handlers (the frame above an exit-handler frame on
        any chain): an event whose chain passes that call without a handler frame ran inside the
        handler all the same. Handlers tail-call their work (svm_handle_exit ->
        svm_invoke_exit_handler -> io_interception -> kvm_emulate_instruction, 6.1 with
        retpolines: each a jmp), so the emulator's events show kvm_arch_vcpu_ioctl_run right
        above x86_emulate_instruction, at the handler call's return address."""
        handlers = self.access.exit_handlers
        for e in events:
            for outer, inner in zip(e.stack[1:], e.stack):  # innermost first: stack[k + 1] calls stack[k]
                fo, fi = self.code.get(outer), self.code.get(inner)
                if fo and fi and base_name(fo.function) == RUN_PATH and base_name(fi.function) in handlers:
                    self.handler_calls.add(outer)

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
        pages = range(s & ~(PAGE - 1), min(e, s + MAX_PAGES_CHECKED * PAGE), PAGE)
        for va in pages:
            if not self._is_mapped(va) and self._kernel_maps(va):
                return max(va, s)
        in_set = any(fnmatch(region.name, spec.layout or spec.name) for spec in self.space.regions)
        if region.kind == "user" and not in_set and not any(self._kernel_maps(va) for va in pages):
            # the VMM's mapping held no page when the evidence was read: the process had exited
            # (its mm torn down) before the last reading; its guest's pages were there when it ran
            self.gone_user.add(region.name)
            return s
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

    def place(self, e: TraceEvent, frames: list[Frame], isolated: bool = False) -> str:
        """Where the event ran: 'not_kvm_run', 'outside' the policy's window, 'checked' (under an
        exit handler), or 'reentry': the loop's work before the next VM entry (role
        ``entry-loop``), which runs isolated when the CPU is still ``isolated`` from the last exit."""
        names = [base_name(f.function) for f in frames]
        if RUN_PATH not in names:
            return "not_kvm_run"
        if e.name in self.policy.before_entry_events:
            return "outside"
        if self.access.exit_handlers.intersection(names) or self._tail_called(frames) is not None:
            return "checked"
        if isolated and self.access.entry_loop.intersection(names):
            return "reentry"
        return "outside"

    def event(self, e: TraceEvent, frames: list[Frame], vcpu: int, to_userspace: bool = False,
              last: bool = False, isolated: bool = False) -> tuple[str, Verdict | None]:
        """(:meth:`place`, the verdict when it is not kvm_mm), for the
        event ``e`` whose resolved chain is ``frames`` (:meth:`frames`). Going down the chain each
        function's accesses before the call it was seen making are checked (access.toml
        ``before``; all of them where it says nothing); for the ``last`` event of an exit, its
        accesses after that call too, on the way back up."""
        where = self.place(e, frames, isolated)
        if where not in ("checked", "reentry"):
            return where, None
        names = [base_name(f.function) for f in frames]
        opens = self.access.exit_handlers if where == "checked" else self.access.entry_loop
        start = next((i for i, n in enumerate(names) if n in opens), None)
        if start is None:
            start = self._tail_called(frames)
        kind = e.kind
        innermost, after_return = None, []
        for k in range(start, len(frames)):
            f, name = frames[k], names[k]
            fa = self.access.resolve([g.function for g in frames], k, self.layout.evidence.kernel)
            if fa is None:
                self.unknown[name] += 1
                return where, Verdict(ExitClass.UNKNOWN, kind, f"unknown function on the path: {name}")
            if fa.role == "observer":
                break  # the tracepoint's own machinery: kvmiso's instrument, not KVM's path
            self._rest(fa)
            why = self.policy.switch_at(name) or self._hidden_switch(names[k - 1], name)
            if why:
                return where, Verdict(ExitClass.HOST_MM, kind, f"{name}: {why}")
            touches = (self.access.implicit if k == start else ()) + self.objects(fa, to_userspace)
            callee = names[k + 1] if k + 1 < len(names) else ""
            early = fa.before.get(callee)
            if early is not None:
                after_return.append((f, fa, tuple(t for t in touches if t not in early)))
                touches = tuple(t for t in touches if t in early)
            miss = self._code_miss(f, frames) or self._object_miss(touches, vcpu, e.cpu, f, fa, frames)
            if miss is not None:
                return where, self._miss(kind, miss)
            innermost = fa
        return where, self._off_chain(e, frames, innermost, after_return if last else [], vcpu, to_userspace)

    def _off_chain(self, e: TraceEvent, frames: list[Frame], innermost: FunctionAccess | None,
                   after_return: list[tuple[Frame, FunctionAccess, tuple[str, ...]]], vcpu: int,
                   to_userspace: bool) -> Verdict | None:
        """Once every frame of ``e``'s chain stayed, what the chain does not show: the calls of
        its ``innermost`` function that returned before the event or come after it, then
        (``after_return``) each frame's accesses after the call it was making returned."""
        ev = self.layout.evidence
        returned = innermost.returned_before(e.name, ev.vendor, ev.kernel) if innermost is not None else ()
        v = self.unseen_calls(returned, e.kind, vcpu, e.cpu, to_userspace,
                              f"called by {innermost.name}, returned before its {e.name} event") if returned else None
        after = innermost.after.get(e.name, ()) if innermost is not None else ()
        if v is None:
            v = self.unseen_calls(after, e.kind, vcpu, e.cpu, to_userspace,
                                  f"called by {innermost.name} after its {e.name} event" if after else "")
        for f, fa, touches in reversed(after_return if v is None else []):
            miss = self._object_miss(touches, vcpu, e.cpu, f, fa, frames, after_call=True)
            if miss is not None:
                return self._miss(e.kind, miss)
        return v

    def _tail_called(self, frames: list[Frame]) -> int | None:
        """The index of the frame an exit handler tail-called into, where the chain passes a
        handler call of KVM_RUN (see :meth:`learn`) without a handler frame; else None."""
        for k, f in enumerate(frames[:-1]):
            if f.address in self.handler_calls and base_name(f.function) == RUN_PATH:
                return k + 1
        return None

    def _rest(self, fa: FunctionAccess) -> None:
        """Note that this exit's verdict rests on ``fa`` when it was not read in source."""
        if fa.basis != "source":
            self.resting[fa.name] = fa.basis
            if fa.line == 0:  # made for this chain: not an access.toml entry
                self.placed.setdefault(fa.name, fa)

    def _hidden_switch(self, caller: str, name: str) -> str | None:
        """The policy's switch at a function a tail call hid between ``caller`` and ``name``."""
        hidden = self.access.hidden_frame(caller, name)
        why = self.policy.switch_at(hidden) if hidden else None
        if why:
            self.resting[hidden] = "inference"
        return why and f"{hidden} (hidden by its tail call into {name} under {caller}: INFERENCE): {why}"

    def objects(self, fa: FunctionAccess, to_userspace: bool) -> tuple[str, ...]:
        """What ``fa`` touches on this kernel for an exit that does (not) go to userspace."""
        return fa.objects(self.layout.vendor, self.layout.evidence.config, to_userspace, self.layout.evidence.kernel)

    def _miss(self, kind: str, fault: Fault) -> Verdict:
        """A missing mapping: a fault under an allowlist, ASI's designed asi_exit under a denylist."""
        if self.policy.miss_is_switch:
            return Verdict(ExitClass.HOST_MM, kind, f"page fault on sensitive memory ({fault.region}) attributed at "
                                             f"{fault.where()}: asi_exit", fault)
        return Verdict(ExitClass.FAULT, kind, fault.region, fault)

    def source_path(self, path: ExitPath, vcpu: int, cpu: int, to_userspace: bool) -> Verdict | None:
        """The handler functions an exit runs after its kvm_exit, from source (see
        :class:`ExitPath`): their objects checked, after the observed frames."""
        return self.unseen_calls(path.functions, f"{path.vendor}:{path.reason}", vcpu, cpu, to_userspace,
                                 f"handler path from source ({path.cite})")

    def unseen_calls(self, functions: tuple[str, ...], kind: str, vcpu: int, cpu: int, to_userspace: bool,
                     origin: str) -> Verdict | None:
        """Functions no chain shows but the source says ran (``origin`` says how it is known),
        checked in order: the first switch or miss among their objects."""
        for name in functions:
            why = self.policy.switch_at(name)
            if why:
                return Verdict(ExitClass.HOST_MM, kind, f"{name} ({origin}): {why}")
            fa = self.access.functions[name]
            self._rest(fa)
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
                             on_chain=f is not None, basis=fa.basis)
        return None


def _stack(frames: list[Frame]) -> tuple[str, ...]:
    return tuple(f"{g.function}+{g.offset:#x}" for g in reversed(frames))


__all__ = ["Checker", "Verdict"]
