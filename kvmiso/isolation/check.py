"""check(kvm_mm, exit log): would each exit stay in the isolated address space?

Every exit is one of four classes:

``kvm_mm``   handled inside the isolated space;
``host_mm``  switches to the full kernel address space as designed (the handler entry says why);
``fault``    touches a region kvm_mm does not map (or runs code it does not map) before any
             designed switch: printed in the RFC's line format;
``unknown``  an event or exit with no handler entry: a finding, never dropped.

An *exit* is what one return from the guest costs: on VMX/SVM hosts each ``kvm_exit`` event
opens one, on kvm_pvm (no hardware exits) each ``kvm_emulate_insn`` (one emulated CPL0
instruction); the events before the first of them belong to the KVM_RUN's entry, and the
userspace exit that ends the KVM_RUN closes the last one. Without trace events a KVM_RUN is
one exit: its userspace exit.

Checking groups identical KVM_RUNs (same exit, events, vCPU) and classifies each group once,
so a long log costs one dictionary update per record.

>>> res = check(KvmAddressSpace.default(host_layout(m.vm)), log)   # portio on kvm_pvm
>>> res.classes
{'kvm_mm': 0, 'host_mm': 0, 'fault': 24, 'unknown': 0, 'outside': 15}
>>> res.fault_lines()[0]
'KVM isolation: page fault #0 (24) at pvm_emulate_one+0x0 on ffff8880400a8000 (emulate_ctxt)'

The line is the RFC's (patch 24, ``kvm_log_page_fault``) with two differences: the RFC's
parenthesised number is the error code and its #N counts distinct faulting RIPs; here #N
counts distinct (function, address) pairs and the parenthesis is how many exits hit it. The
offset is 0: the model knows the function on the path, not the faulting instruction.
"""

from __future__ import annotations

import dataclasses
import platform
import tomllib
from collections import Counter
from operator import attrgetter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..observe.exitlog import ExitLog, RunRecord
from .layout import Layout, known_region_names
from .mapset import POLICIES, KvmAddressSpace, line_of

HANDLERS = Path(__file__).with_name("handlers.toml")
CLASSES = ("kvm_mm", "host_mm", "fault", "unknown")
KVM_ISA_VMX, KVM_ISA_SVM = 1, 2  # the kvm_exit event's isa field (arch/x86/kvm/trace.h)

# The CR3 switch cost used when none is given: an assumption, always printed with its source.
DEFAULT_SWITCH_COST_NS = 250.0
DEFAULT_SWITCH_COST_SOURCE = ("assumed 250 ns: a CR3 write with PCID (no TLB flush) plus the RFC's bookkeeping; "
                              "not measured on this host (pass --switch-cost)")


class CheckError(ValueError):
    """Bad handler table or an exit log the model cannot check; names the file and line."""


@dataclass(frozen=True)
class Step:
    fn: str
    touches: tuple[str, ...]


@dataclass(frozen=True)
class Handler:
    """One handlers.toml entry."""

    kinds: tuple[str, ...]
    vendor: str | None
    path: tuple[Step, ...]
    inlined: tuple[str, ...]
    leaves: frozenset[str]
    leave_at_start: bool
    outside: frozenset[str]
    reason: str
    cite: str
    line: int


@dataclass
class HandlerTable:
    """handlers.toml, indexed by (kind, vendor); ``*`` kinds match by prefix."""

    handlers: list[Handler]
    defaults: tuple[str, ...]
    vendor_defaults: dict[str, tuple[str, ...]]
    source: str

    def __post_init__(self) -> None:
        self._exact: dict[tuple[str, str | None], Handler] = {}
        self._prefix: list[tuple[str, str | None, Handler]] = []
        for h in self.handlers:
            for k in h.kinds:
                if k.endswith("*"):
                    self._prefix.append((k[:-1], h.vendor, h))
                else:
                    self._exact[(k, h.vendor)] = h

    def lookup(self, kind: str, vendor: str) -> Handler | None:
        h = self._exact.get((kind, vendor)) or self._exact.get((kind, None))
        if h:
            return h
        for prefix, v, h in self._prefix:
            if kind.startswith(prefix) and v in (None, vendor):
                return h
        return None

    def stale(self, layout: Layout) -> tuple[list[str], list[str]]:
        """(stale, inlined): path functions the running kernel lacks, for this vendor's
        entries; ``inlined`` lists absent names the entry marks as possibly inlined."""
        if layout.symbols is None:
            return [], []
        stale, inlined = [], []
        for h in self.handlers:
            if h.vendor not in (None, layout.vendor):
                continue
            for s in h.path:
                if s.fn not in layout.symbols:
                    stale.append(f"{self.source}:{h.line}: {h.kinds[0]}: {s.fn} is not in this kernel's kallsyms")
            for fn in h.inlined:
                if fn not in layout.symbols:
                    inlined.append(f"{h.kinds[0]}: {fn}")
        return stale, sorted(set(inlined))


def load_handlers(path: str | Path = HANDLERS, regions: set[str] | None = None) -> HandlerTable:
    """Parse and validate handlers.toml; ``regions``: the names a ``touches`` may use."""
    path = Path(path)
    text = path.read_text()
    try:
        doc = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise CheckError(f"{path}: not valid TOML: {e}") from None
    lines = [n for n, l in enumerate(text.splitlines(), 1) if l.strip() == "[[exit]]"]

    def fail(msg: str, line: int | None) -> CheckError:
        return CheckError(f"{path}:{line}: {msg}" if line else f"{path}: {msg}")

    def names(v: Any, what: str, line: int | None) -> tuple[str, ...]:
        if not isinstance(v, list) or not all(isinstance(x, str) for x in v):
            raise fail(f"{what} must be a list of strings", line)
        if regions is not None and what.endswith("touches"):
            for r in v:
                if r not in regions:
                    raise fail(f"{what}: unknown region {r!r}", line_of(text, f'"{r}"') or line)
        return tuple(v)

    d = doc.get("defaults", {})
    defaults = names(d.get("touches", []), "defaults.touches", line_of(text, "[defaults]"))
    vendor_defaults = {k: names(v.get("touches", []), f"defaults.{k}.touches", line_of(text, f"[defaults.{k}]"))
                       for k, v in d.items() if isinstance(v, dict)}
    handlers = []
    seen: dict[tuple[str, str | None], int] = {}
    for i, e in enumerate(doc.get("exit", [])):
        line = lines[i] if i < len(lines) else None
        kinds = tuple(e.get("kinds", [])) + ((e["kind"],) if "kind" in e else ())
        if not kinds:
            raise fail("an [[exit]] needs kind or kinds", line)
        for k in kinds:
            if k.split(":", 1)[0] not in ("trace", "exit", "vmx", "svm"):
                raise fail(f"kind {k!r}: must start with trace:, exit:, vmx: or svm:", line)
        path_ = []
        for s in e.get("path", []):
            if not isinstance(s, dict) or not isinstance(s.get("fn"), str):
                raise fail("each path step needs fn", line)
            path_.append(Step(s["fn"], names(s.get("touches", []), f"{kinds[0]}: {s['fn']} touches", line)))
        if not path_:
            raise fail(f"{kinds[0]}: an empty path", line)
        if e.get("leave_at", "start") not in ("start", "end"):
            raise fail(f"{kinds[0]}: leave_at must be start or end, not {e['leave_at']!r}", line)
        pol = set(e.get("leaves", [])) | set(e.get("outside", []))
        for p in pol:
            if p not in POLICIES:
                raise fail(f"{kinds[0]}: unknown policy {p!r} (one of {', '.join(POLICIES)})", line)
        for k in kinds:
            if (k, e.get("vendor")) in seen:
                raise fail(f"{k} (vendor {e.get('vendor') or 'any'}) is already described at line {seen[(k, e.get('vendor'))]}",
                           line)
            seen[(k, e.get("vendor"))] = line or 0
        handlers.append(Handler(kinds, e.get("vendor"), tuple(path_), tuple(e.get("inlined", [])),
                                frozenset(e.get("leaves", [])), e.get("leave_at", "start") == "start",
                                frozenset(e.get("outside", [])),
                                e.get("reason", ""), e.get("cite", ""), line or 0))
    return HandlerTable(handlers, defaults, vendor_defaults, str(path))


@dataclass
class Fault:
    """One distinct missing mapping: where (function), on what (address, region)."""

    function: str
    offset: int
    address: int
    region: str
    count: int = 0
    kinds: set[str] = field(default_factory=set)


@dataclass
class CheckResult:
    """Totals over the log; see :func:`check`."""

    policy: str
    vendor: str
    exits: int = 0
    runs: int = 0
    classes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(CLASSES + ("outside",), 0))
    by_kind: dict[str, Counter] = field(default_factory=dict)  # class -> Counter of exit kinds
    reasons: Counter = field(default_factory=Counter)  # "kind: reason" of host_mm switches
    faults: list[Fault] = field(default_factory=list)
    unknown: Counter = field(default_factory=Counter)
    switches: int = 0
    switch_hist: Counter = field(default_factory=Counter)  # switches per KVM_RUN -> runs
    wall_ns: int = 0
    switch_cost_ns: float = DEFAULT_SWITCH_COST_NS
    switch_cost_source: str = DEFAULT_SWITCH_COST_SOURCE
    stale: list[str] = field(default_factory=list)
    inlined: list[str] = field(default_factory=list)
    tracing: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def switches_per_run(self) -> float:
        return self.switches / self.runs if self.runs else 0.0

    @property
    def overhead_ns(self) -> float:
        return self.switches * self.switch_cost_ns

    @property
    def overhead_share(self) -> float:
        """Estimated isolation cost as a share of the measured KVM_RUN round trips."""
        return self.overhead_ns / self.wall_ns if self.wall_ns else 0.0

    def add(self, other: "CheckResult") -> None:
        """Fold ``other`` (the same policy, another VM's log) into this result. Faults merge by
        function and region: their addresses differ between VMs only in the user half."""
        self.exits += other.exits
        self.runs += other.runs
        self.switches += other.switches
        self.wall_ns += other.wall_ns
        for c, n in other.classes.items():
            self.classes[c] = self.classes.get(c, 0) + n
        for c, k in other.by_kind.items():
            self.by_kind.setdefault(c, Counter()).update(k)
        self.reasons.update(other.reasons)
        self.unknown.update(other.unknown)
        self.switch_hist.update(other.switch_hist)
        mine = {(f.function, f.region): f for f in self.faults}
        for f in other.faults:
            if (f.function, f.region) in mine:
                mine[(f.function, f.region)].count += f.count
                mine[(f.function, f.region)].kinds |= f.kinds
            else:
                self.faults.append(dataclasses.replace(f, kinds=set(f.kinds)))
                mine[(f.function, f.region)] = self.faults[-1]
        for attr in ("stale", "inlined", "notes"):
            have = getattr(self, attr)
            have.extend(x for x in getattr(other, attr) if x not in have)
        self.tracing = self.tracing or other.tracing

    def fault_lines(self) -> list[str]:
        """The RFC's report line for each distinct fault, in order of first occurrence."""
        return [f"KVM isolation: page fault #{i} ({f.count}) at {f.function}+{f.offset:#x} on {f.address:016x} ({f.region})"
                for i, f in enumerate(self.faults)]

    def to_dict(self) -> dict[str, Any]:
        return {
            "policy": self.policy, "vendor": self.vendor, "runs": self.runs, "exits": self.exits,
            "classes": self.classes, "by_kind": {c: dict(k) for c, k in self.by_kind.items()},
            "host_mm_reasons": dict(self.reasons), "faults": [
                {"line": l, "function": f.function, "address": f.address, "region": f.region, "count": f.count,
                 "kinds": sorted(f.kinds)} for l, f in zip(self.fault_lines(), self.faults)],
            "unknown": dict(self.unknown), "switches": self.switches, "switches_per_run": self.switches_per_run,
            "switches_per_run_histogram": {str(k): v for k, v in sorted(self.switch_hist.items())},
            "wall_ns": self.wall_ns, "switch_cost_ns": self.switch_cost_ns,
            "switch_cost_source": self.switch_cost_source, "overhead_ns": self.overhead_ns,
            "overhead_share": self.overhead_share, "stale_entries": self.stale, "inlined_absent": self.inlined,
            "tracing": self.tracing, "notes": self.notes,
        }


def event_kind(name: str, fields: dict[str, Any]) -> str:
    """The handlers.toml kind of a trace event (kvm_exit: its vmx:/svm: reason)."""
    if name == "kvm_exit":
        isa, reason = fields.get("isa"), fields.get("exit_reason")
        if isa == KVM_ISA_VMX and reason is not None:
            return f"vmx:{reason & 0xFFFF}"
        if isa == KVM_ISA_SVM and reason is not None:
            return f"svm:{reason:#x}"
    return f"trace:{name}"


class Checker:
    """Classifies KVM_RUN signatures against one address space and handler table."""

    def __init__(self, kas: KvmAddressSpace, table: HandlerTable) -> None:
        self.kas = kas
        self.table = table
        self.layout = kas.layout
        self.policy = kas.policy.name
        self.vendor = self.layout.vendor
        self.base = table.defaults + table.vendor_defaults.get(self.vendor, ())
        self._fault_index: dict[tuple[str, int, str], int] = {}
        self._mapped: dict[int, bool] = {}

    def _is_mapped(self, addr: int) -> bool:
        m = self._mapped.get(addr)
        if m is None:
            m = self._mapped[addr] = self.kas.mapped(addr)
        return m

    def _addr(self, region: str, vcpu: int, cpu: int) -> int | None:
        r = self.layout.regions.get(region)
        if r is None:
            return None
        i = {"cpu": cpu, "vcpu": vcpu}.get(r.per, 0)
        return r.ranges[i % len(r.ranges)][0]

    def _first_miss(self, h: Handler, vcpu: int, cpu: int) -> tuple[str, int, str] | None:
        """(function, address, region) of the first unmapped access on ``h``'s path."""
        syms = self.layout.symbols
        for n, step in enumerate(h.path):
            if syms is not None:
                code = syms.get(step.fn)
                if code is not None and not self._is_mapped(code):
                    return step.fn, code, self.kas.region_of(code)
            for region in (self.base + step.touches) if n == 0 else step.touches:
                addr = self._addr(region, vcpu, cpu)
                if addr is not None and not self._is_mapped(addr):
                    return step.fn, addr, region
        return None

    def classify(self, exit_name: str, events: tuple[tuple[str, str], ...], vcpu: int, cpu: int,
                 starters: frozenset[str]) -> tuple[list[tuple[str, str, str]], int, list[tuple[tuple[str, int, str], str]], list[str], int]:
        """One KVM_RUN: ([(class, kind, reason)] per exit, switches, [(fault key, kind)],
        [unknown kinds], events outside the isolated section)."""
        groups: list[list[tuple[str, str]]] = [[]]
        for name, kind in events:
            if name in starters and groups[-1]:
                groups.append([])
            groups[-1].append((name, kind))
        groups[-1].append(("", f"exit:{exit_name}"))
        exits, faults, unknown = [], [], []
        outside = 0
        switches = 1  # entering kvm_mm for this KVM_RUN (rfc-v1: vcpu_run; asi: VM-enter)
        for g, group in enumerate(groups):
            entry = g == 0 and len(groups) > 1 and group[0][0] not in starters
            in_kvm = not (entry and self.policy == "asi")  # ASI enters just before VM-enter
            left = False
            cls, kind0, why = "kvm_mm", group[0][1], ""
            for name, kind in group:
                h = self.table.lookup(kind, self.vendor)
                if h is None:
                    unknown.append(kind)
                    if cls == "kvm_mm":
                        cls, kind0, why = "unknown", kind, "no handler entry"
                    continue
                if self.policy in h.outside:
                    outside += 1  # on host_mm by design: nothing to check, no switch
                    continue
                if not in_kvm:
                    continue  # already switched: host_mm maps everything
                leaves = self.policy in h.leaves
                miss = None if leaves and h.leave_at_start else self._first_miss(h, vcpu, cpu)
                if miss is not None:
                    faults.append((miss, kind))
                    if cls in ("kvm_mm", "unknown"):
                        cls, kind0, why = "fault", kind, miss[2]
                elif leaves:
                    if cls == "kvm_mm":  # an unknown event keeps the exit unknown: never hidden
                        cls, kind0, why = "host_mm", kind, h.reason
                else:
                    continue
                in_kvm, left = False, True
                switches += 1  # to host_mm (the RFC's fault handler switches and retries)
            if left and g < len(groups) - 1:
                switches += 1  # back into kvm_mm before the next VM-enter
            if not entry:
                exits.append((cls, kind0, why))
        return exits, switches, faults, unknown, outside


def check(kas: KvmAddressSpace, log: ExitLog, table: HandlerTable | None = None,
          switch_cost_ns: float | None = None, switch_cost_source: str = "", source: str = "<exit log>",
          same_kernel: bool = True) -> CheckResult:
    """Classify every exit of ``log`` against ``kas``; see the module docstring.

    ``same_kernel``: refuse a log recorded on another kernel or vendor than the layout's
    (its function addresses and exit kinds would not match the model).
    """
    layout = kas.layout
    if same_kernel:
        _check_host(log, layout, source)
    table = table or load_handlers(regions=known_region_names())
    checker = Checker(kas, table)
    res = CheckResult(kas.policy.name, layout.vendor, tracing=log.tracing)
    if switch_cost_ns is not None:
        res.switch_cost_ns = switch_cost_ns
        res.switch_cost_source = switch_cost_source or "given"
    res.stale, res.inlined = table.stale(layout)
    if not log.tracing:
        res.notes.append(f"no trace events ({log.tracing_reason or 'tracing off'}): each KVM_RUN is checked by its "
                         f"userspace exit only")
    if log.lost_events:
        res.notes.append(f"{log.lost_events} trace events were lost: some exits are missing from the check")

    # The hot loop: one signature per record, counted by Counter's C loop; the key is a
    # C-level tuple(map()) of event names, and only KVM_RUNs with kvm_exit events need the
    # fields (their reason picks the handler).
    name_of = attrgetter("name")

    def signature(r: RunRecord) -> tuple:
        evs = r.events
        names = tuple(map(name_of, evs))
        reasons = tuple(_kind(e) for e in evs if e.name == "kvm_exit") if "kvm_exit" in names else ()
        return r.exit.get("exit", "?"), names, reasons, r.vcpu, evs[0].cpu if evs else 0

    records = log.records
    signatures = Counter(map(signature, records))
    wall = sum(map(attrgetter("end_ns"), records)) - sum(map(attrgetter("start_ns"), records))
    # VMX/SVM hosts: kvm_exit opens each exit; kvm_pvm has none, each emulated instruction does
    has_exit_events = any(reasons for _, _, reasons, _, _ in signatures)
    starters = frozenset({"kvm_exit"} if has_exit_events else {"kvm_emulate_insn"})
    res.runs = len(log.records)
    res.wall_ns = wall
    for (exit_name, names, reasons, vcpu, cpu), n in signatures.items():
        it = iter(reasons)
        events = tuple((name, next(it) if name == "kvm_exit" else f"trace:{name}") for name in names)
        exits, switches, faults, unknown, outside = checker.classify(exit_name, events, vcpu, cpu, starters)
        for cls, kind, why in exits:
            res.classes[cls] += n
            res.by_kind.setdefault(cls, Counter())[kind] += n
            if cls == "host_mm":
                res.reasons[f"{kind}: {why}"] += n
        res.exits += len(exits) * n
        res.classes["outside"] += outside * n
        res.switches += switches * n
        res.switch_hist[switches] += n
        for miss, kind in faults:
            i = checker._fault_index.get(miss)
            if i is None:
                i = checker._fault_index[miss] = len(res.faults)
                fn, addr, region = miss
                res.faults.append(Fault(fn, 0, addr, region))
            res.faults[i].count += n
            res.faults[i].kinds.add(kind)
        for k in unknown:
            res.unknown[k] += n
    return res


def _kind(e) -> str:
    return f"trace:{e.name}" if e.name != "kvm_exit" else event_kind(e.name, e.fields)


def _check_host(log: ExitLog, layout: Layout, source: str) -> None:
    kernel = log.host.get("kernel")
    vendor = log.host.get("vendor")
    here = platform.release()
    if kernel and kernel != here:
        raise CheckError(f"{source}:1: exit log recorded on kernel {kernel}, this model is of the running kernel "
                         f"{here}: its functions and exit kinds would not match (capture the log here)")
    if vendor and vendor != layout.vendor:
        raise CheckError(f"{source}:1: exit log recorded with vendor module {vendor}, the model is for {layout.vendor}")


def _size(n: int) -> str:
    for unit, shift in (("TiB", 40), ("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.4g} {unit}"
    return f"{n} B"


def model_text(kas: KvmAddressSpace) -> str:
    """``kvmiso model``: the mapping set, one region a line, then what it adds up to."""
    s = kas.summary()
    out = [f"kvm_mm mapping set for {s['vendor']} ({s['levels']}-level paging; layout from {s['layout_source']})",
           f"policy {s['policy']}: enter at {s['policy_enter']}; leave on {s['policy_leave']} ({s['policy_cite']})", "",
           f"{'region':<18} {'group':<9} {'level':<5} {'start':<18} {'size':>10} {'copied':>10} {'pages':>7}  "
           f"source / cite"]
    for r in s["regions"]:
        out.append(f"{r['name']:<18} {r['group']:<9} {r['level']:<5} {r['start']:#018x} {_size(r['size']):>10} "
                   f"{_size(r['copied_bytes']):>10} {r['pages_4k']:>7}  {'modeled' if r['modeled'] else r['source']}; "
                   f"{r['cite']}")
    out += ["", f"kvm_mm maps {_size(s['kvm_mapped_bytes'])} ({s['kvm_pages_4k']} 4 KiB pages) of the "
                f"{_size(s['kernel_mapped_bytes'])} ({s['kernel_pages_4k']} pages) the kernel table maps: "
                f"{100 * s['share_of_kernel_mapped']:.3f}%, {100 * s['share_of_kernel_half']:.2e}% of the kernel half"]
    out += [f"note: {n}" for n in s["notes"]]
    return "\n".join(out)


def result_text(res: CheckResult, title: str = "") -> str:
    """``kvmiso check``: classes, faults in the RFC's format, unknowns, switches and cost."""
    c = res.classes
    out = [f"{title}{res.runs} KVM_RUN calls, {res.exits} exits, policy {res.policy}: "
           f"{c['kvm_mm']} stay in kvm_mm, {c['host_mm']} switch to host_mm, {c['fault']} fault, "
           f"{c['unknown']} unknown ({c['outside']} events outside the isolated section)"]
    for reason, n in res.reasons.most_common():
        out.append(f"  host_mm x{n}: {reason}")
    out += ["  " + line for line in res.fault_lines()]
    for kind, n in res.unknown.most_common():
        out.append(f"  unknown x{n}: {kind} has no entry in handlers.toml")
    out.append(f"  switches: {res.switches} ({res.switches_per_run:.2f} per KVM_RUN); estimated overhead "
               f"{res.overhead_ns / 1e3:.1f} µs = {100 * res.overhead_share:.2f}% of {res.wall_ns / 1e3:.1f} µs measured "
               f"in KVM_RUN round trips, at {res.switch_cost_ns:g} ns per switch ({res.switch_cost_source})")
    out += [f"  stale: {s}" for s in res.stale]
    out += [f"  note: {n}" for n in res.notes]
    return "\n".join(out)


def measure_switches(kvm, payload, cpl: int = 0, regions: str | None = None, policy: str | None = None,
                     max_exits: int = 32, timeout: float = 5.0) -> CheckResult:
    """Run ``payload`` (a name, path or built Image) for at most ``max_exits`` KVM_RUNs under
    capture and check every exit against kvm_mm (the RFC's set, or ``regions``: a TOML path or a
    shipped set's name). ``result.switches_per_run`` is then what the model says isolation adds
    to one round trip of that guest.
    """
    from ..guest import Machine
    from ..observe.capture import capture
    from .layout import host_layout
    from .mapset import KvmAddressSpace, load_regions

    with Machine(payload, cpl=cpl, kvm=kvm) as m:
        layout = host_layout(m.vm)
        kas = load_regions(regions, layout, policy) if regions else KvmAddressSpace.default(layout, policy or "rfc-v1")
        _, log = capture(m, timeout=timeout, payload=m.image.name, max_exits=max_exits)
    return check(kas, log, source=m.image.name)
