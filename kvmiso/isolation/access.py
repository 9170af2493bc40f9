"""The access model: for each kernel function that runs while KVM handles an exit, the VM objects
it dereferences, its role, and the source line that says so (``access.toml``).

The check walks each exit's *observed* call chains through this table. Compiler clones share
their function's entry (``__pvm_handle_exit.isra.0`` is ``__pvm_handle_exit``); the tracepoint
machinery (``trace_event_raw_event_*``, role ``observer``) is matched by prefix and not checked
(it is kvmiso's own instrument, not KVM's path). The functions with role ``exit-handler`` open
every policy's isolated window.

Each entry has a **basis**: ``source`` (read in the kernel source it cites) or ``inference``
(named from call chains; its accesses inferred, the note says how). A function the table does
not name is placed by the kernel that ran it (:meth:`AccessModel.resolve`): its BTF prototype's
pointer parameters name its objects (basis ``derived``, through the ``[derive]`` table), or, where
that kernel's BTF has no FUNC record for it, its neighbours on the chain do (``inference``). A
frame that cannot be placed at all (an address no symbol explains, no known caller) stays a
finding ("unknown function on the path"), never skipped.

>>> from kvmiso.isolation import load_access_model
>>> model = load_access_model()
>>> model.lookup("em_out.cold").touches
('emulate_ctxt', 'kernel_data')
>>> model.resolve(["pvm_handle_exit", "pvm_push_frame_renamed"], 1, "6.18.44-fc-v1300").basis
'inference'
"""

from __future__ import annotations

import platform
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..observe.kernel.btf import BTF_DIR, Btf, BtfError, Param
from .accessseries import in_series, on_series

ROLES = ("", "run-loop", "entry-loop", "exit-handler", "switch-rfc", "observer", "host-mm")
BASES = ("source", "inference", "derived")  # how an entry's accesses are known; see the module docstring
# A kernel's function prototypes: name -> its BTF parameters, or None where its BTF has no FUNC record.
Prototypes = Callable[[str], "tuple[Param, ...] | None"]
USERSPACE = "@userspace"
_CLONE = re.compile(r"\.(?:isra|constprop|part|cold|llvm)\.?\d*.*$")


class AccessModelError(ValueError):
    """A bad access.toml; the message names the file and line."""


@dataclass(frozen=True)
class FunctionAccess:
    """One function: the objects it touches (names of :mod:`.layout` regions), its role in a
    KVM_RUN, and where in the kernel source this was read."""

    name: str
    touches: tuple[str, ...]
    role: str
    cite: str
    note: str = ""
    line: int = 0
    when: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (vendor module or CONFIG_ option, objects)
    # event -> callees this function makes after that tracepoint fired in its own code: they
    # return before any later event, so no chain shows them (emulator_pio_in_out after kvm_pio)
    after: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    # callee -> the objects this function touches before it calls that callee (the rest after
    # it returns); a function seen calling a callee not named here is checked whole, going down
    before: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    # object -> the callee (no frame on a chain: it returned) whose code touches it first
    first: dict[str, str] = field(default_factory=dict, compare=False)
    basis: str = "source"  # one of BASES
    hidden_callers: tuple[tuple[str, str], ...] = ()  # (caller on the chain, the tail-calling function between)
    # "vendor@kernel series" (kvm_amd@6.1) -> what an access record of that kernel showed this
    # function's own instructions touch (a [[measured]] table): it replaces touches and when there
    # (inlining differs between builds; the measurement wins), measured_cite naming the record
    measured: dict[str, tuple[str, ...]] = field(default_factory=dict, compare=False)
    measured_cite: str = field(default="", compare=False)
    # "vendor@kernel series" -> event -> callees this function called, and that returned, before
    # that event fired in its own code (a [[measured]] table's returned): no chain shows them
    returned: dict[str, dict[str, tuple[str, ...]]] = field(default_factory=dict, compare=False)

    @property
    def label(self) -> str:
        """``INFERENCE`` or ``DERIVED`` where the accesses were not read in source, else ""."""
        return "" if self.basis == "source" else self.basis.upper()

    def objects(self, vendor: str, config: dict[str, str], to_userspace: bool, kernel: str = "") -> tuple[str, ...]:
        """What this function touches on ``vendor`` with kernel ``config`` (``CONFIG_KVM*``; where
        the kernel exports no config every option counts as set) and release ``kernel``, for an
        exit that does (or does not) go on to userspace."""
        def holds(cond: str) -> bool:
            if cond.startswith("CONFIG_"):
                return config.get(cond, "n" if config else "y") in ("y", "m")
            return cond == vendor

        seen = self.measured_on(vendor, kernel)
        every = seen if seen is not None else self.touches + tuple(t for cond, ts in self.when if holds(cond) for t in ts)
        return tuple(t.removesuffix(USERSPACE) for t in every if to_userspace or not t.endswith(USERSPACE))

    def returned_before(self, event: str, vendor: str, kernel: str) -> tuple[str, ...]:
        """The callees that returned before ``event`` fired in this function, on ``vendor``'s
        ``kernel`` where a record measured them (else none)."""
        return (on_series(self.returned, vendor, kernel) or {}).get(event, ())

    def measured_on(self, vendor: str, kernel: str) -> tuple[str, ...] | None:
        """The measured objects for ``vendor`` on release ``kernel`` (6.1.0-57-amd64 is of the
        6.1 series), or None where no record of that kernel was measured."""
        return on_series(self.measured, vendor, kernel)


@dataclass(frozen=True)
class ExitPath:
    """The handler functions an exit of ``reason`` on ``vendor`` runs after its kvm_exit, from
    source (they fire no tracepoint, so no chain shows them); ``kernel``: for that kernel series
    only (a measured path), "" for any."""

    vendor: str
    reason: str
    functions: tuple[str, ...]
    cite: str
    kernel: str = ""


@dataclass(frozen=True)
class EmulatedPath:
    """The functions the emulator runs to execute an instruction after its decode, by opcode,
    from emulate.c's opcode table (no event fires on the way: see access.toml's section)."""

    opcodes: tuple[str, ...]
    functions: tuple[str, ...]
    cite: str


@dataclass(frozen=True)
class UntracedPath:
    """The functions behind each firing of an event a capture left out (see access.toml)."""

    event: str
    functions: tuple[str, ...]
    cite: str


@dataclass
class AccessModel:
    """access.toml: functions by name, prefixes for families, and the accesses every function
    of the isolated window makes (the stack, ``current``, the per-CPU area)."""

    functions: dict[str, FunctionAccess]
    prefixes: list[FunctionAccess]
    implicit: tuple[str, ...]
    implicit_cite: str
    source: str
    exit_paths: dict[tuple[str, str, str], ExitPath] = field(default_factory=dict)  # (vendor, reason, series)
    emulated: dict[str, EmulatedPath] = field(default_factory=dict)  # opcode (hex) -> its path
    untraced: dict[str, UntracedPath] = field(default_factory=dict)  # "kvm:kvm_emulate_insn" -> its path
    derive_types: dict[str, str] = field(default_factory=dict)  # struct name -> object ([derive] types)
    derive_cite: str = ""
    # which kernel's prototypes: (kernel release) -> Prototypes, or None where none can be read
    prototypes_for: Callable[[str], Prototypes | None] = field(default_factory=lambda: running_prototypes)
    _derived: dict[tuple[str, str], FunctionAccess | None] = field(default_factory=dict, repr=False)

    def exit_path(self, vendor: str, reason: str, kernel: str = "") -> ExitPath | None:
        """The handler path of an exit of ``reason`` on ``vendor``: the one measured on
        ``kernel``'s series where there is one, else the one from source."""
        for (v, r, series), path in self.exit_paths.items():
            if (v, r) == (vendor, reason) and series and in_series(kernel, series):
                return path
        return self.exit_paths.get((vendor, reason, ""))

    def emulated_path(self, insn: bytes, long_mode: bool) -> EmulatedPath | None:
        """The path that executes the instruction ``insn`` (kvm_emulate_insn's bytes), or None."""
        return self.emulated.get(opcode(insn, long_mode))

    def lookup(self, function: str) -> FunctionAccess | None:
        """The entry for ``function`` (a compiler clone's base name, or a prefix family), or None."""
        hit = self.functions.get(function) or self.functions.get(_CLONE.sub("", function))
        if hit is not None:
            return hit
        for p in self.prefixes:
            if function.startswith(p.name):
                return p
        return None

    def resolve(self, chain: Sequence[str], i: int, kernel: str) -> FunctionAccess | None:
        """The entry for ``chain[i]`` (a call chain's function names, outermost first) on the
        kernel release ``kernel``: the table's; else DERIVED from that kernel's BTF prototype;
        else INFERENCE from its nearest placed neighbours (the objects both its caller and its
        callee touch: what the caller hands down through it); else None, a finding."""
        hit = self.lookup(chain[i]) or self.derive(chain[i], kernel)
        if hit is not None or chain[i].startswith("0x"):
            return hit
        caller = next((fa for j in range(i - 1, -1, -1) if (fa := self._known(chain[j], kernel))), None)
        if caller is None:
            return None
        callee = None
        for name in chain[i + 1:]:
            fa = self._known(name, kernel)
            if fa is not None:
                callee = None if fa.role == "observer" else fa
                break
        touches = tuple(t for t in caller.touches if callee is None or t in callee.touches)
        below = f" and {callee.name} below it: the objects both touch" if callee else ": what it touches"
        return FunctionAccess(base_name(chain[i]), touches, "", f"not in access.toml and no BTF FUNC record for it on "
                              f"kernel {kernel or '(unknown)'}: placed by its neighbours on the chain, {caller.name} "
                              f"above{below}", "INFERENCE: its objects are what its caller hands down", basis="inference")

    def _known(self, function: str, kernel: str) -> FunctionAccess | None:
        return None if function.startswith("0x") else self.lookup(function) or self.derive(function, kernel)

    def derive(self, function: str, kernel: str) -> FunctionAccess | None:
        """A DERIVED entry for ``function`` from the BTF prototype ``kernel`` has for it (each
        pointer parameter to a struct of the ``[derive]`` table names an object), or None where
        that kernel's BTF has no FUNC record for it (or is not the running kernel's)."""
        name = base_name(function)
        key = (name, kernel)
        if key not in self._derived:
            protos = self.prototypes_for(kernel)
            params = protos(name) if protos is not None else None
            self._derived[key] = None if params is None else self._from_prototype(name, params, kernel)
        return self._derived[key]

    def _from_prototype(self, name: str, params: tuple[Param, ...], kernel: str) -> FunctionAccess:
        touches = tuple(dict.fromkeys(self.derive_types[p.pointee] for p in params if p.pointee in self.derive_types))
        proto = ", ".join(p.ctype + ("" if p.ctype.endswith("*") else " ") + p.name for p in params)
        return FunctionAccess(name, touches, "", f"BTF FUNC {name}({proto}) of the running kernel {kernel}",
                              "DERIVED: not in access.toml; its objects are the structs its parameters point at "
                              "(access.toml [derive])", basis="derived")

    def hidden_frame(self, caller: str, function: str) -> str | None:
        """The function a tail call hid between ``caller`` and ``function`` on a chain, where
        the table says so (``hidden_caller``), else None."""
        fa = self.lookup(function)
        return dict(fa.hidden_callers).get(base_name(caller)) if fa is not None else None

    @property
    def exit_handlers(self) -> frozenset[str]:
        """Functions that run only after a VM exit: where the isolated window is seen to begin."""
        return frozenset(f.name for f in self.functions.values() if f.role == "exit-handler")

    @property
    def entry_loop(self) -> frozenset[str]:
        """Functions vcpu_enter_guest calls before the next VM entry: after an exit handled in
        the isolated space they run there too (the window spans the loop's iterations)."""
        return frozenset(f.name for f in self.functions.values() if f.role == "entry-loop")

    def objects(self) -> set[str]:
        """Every object name the model uses."""
        every = [*self.functions.values(), *self.prefixes]
        return ({t.removesuffix(USERSPACE) for f in every for t in f.touches}
                | {t for f in every for _, ts in f.when for t in ts}
                | {t.removesuffix(USERSPACE) for f in every for ts in f.measured.values() for t in ts} | set(self.implicit))


_LEGACY_PREFIXES = frozenset(b"\x66\x67\xf2\xf3\x2e\x36\x3e\x26\x64\x65\xf0")


def opcode(insn: bytes, long_mode: bool) -> str:
    """The opcode of an x86 instruction, in hex: its first byte after the legacy prefixes (and
    REX, in 64-bit mode), two bytes for the 0f escape (``"e6"``, ``"0f32"``)."""
    i = 0
    while i < len(insn) and insn[i] in _LEGACY_PREFIXES:
        i += 1
    if long_mode and i < len(insn) and 0x40 <= insn[i] <= 0x4F:
        i += 1
    return insn[i:i + 2].hex() if insn[i:i + 1] == b"\x0f" else insn[i:i + 1].hex()


def base_name(function: str) -> str:
    """The function a compiler clone belongs to: ``pvm_emulate_one.isra.0`` -> ``pvm_emulate_one``."""
    return _CLONE.sub("", function)


def running_prototypes(kernel: str) -> Prototypes | None:
    """The function prototypes of the running kernel's BTF (vmlinux and the KVM modules' split
    BTF), if ``kernel`` is the running kernel's release and it exports BTF; else None."""
    if not kernel or kernel != platform.release():
        return None
    try:
        btf = Btf.running(tuple(sorted(p.name for p in BTF_DIR.glob("kvm*"))))
    except BtfError:
        return None

    def prototype(name: str) -> tuple[Param, ...] | None:
        try:
            return btf.func(name)
        except BtfError:
            return None
    return prototype


__all__ = ["USERSPACE", "AccessModel", "AccessModelError", "BASES", "EmulatedPath", "ExitPath", "FunctionAccess",
           "Prototypes", "ROLES", "UntracedPath", "base_name", "in_series", "opcode", "running_prototypes"]
