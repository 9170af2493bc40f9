"""The access model against an access record, function by function: which of the functions that
touched memory while KVM handled an exit does access.toml know? A function it does not know is
a finding, as on an observed call chain; here the record shows every function that touched
memory, including those no call chain shows (leaf helpers, inlined callers' callees).

This is the first, function-level step of measuring the model: whether each known function's
``touches`` are the objects it really touched needs the addresses of the VM's objects in the
same boot, which the record does not carry yet.

>>> coverage = model_coverage(summaries, load_access_model())       # doctest: +SKIP
>>> coverage.known, coverage.measured                                 # doctest: +SKIP
(41, 173)
"""

from __future__ import annotations

from dataclasses import dataclass

from ..observe.accesses.accesssummary import WindowSummary
from .access import AccessModel

KVM_MODULES = ("kvm", "kvm_amd", "kvm_intel", "kvm_pvm")


@dataclass(frozen=True)
class Coverage:
    """Functions measured in one window (or a whole record) and those access.toml knows, per
    place: ``kvm`` (KVM's modules) and ``kernel`` (the image and other modules)."""

    measured: int
    known: int
    kvm_measured: int
    kvm_known: int
    unknown_kvm: tuple[str, ...]  # KVM's own functions the model lacks, in path order
    unknown_kernel: tuple[str, ...]

    def text(self) -> str:
        """One line: the counts, then KVM's functions the model does not know."""
        line = (f"access.toml knows {self.known} of {self.measured} functions that touched memory "
                f"(KVM's modules: {self.kvm_known} of {self.kvm_measured})")
        return line + (f"; not in it from KVM: {', '.join(self.unknown_kvm)}" if self.unknown_kvm else "")


def window_coverage(summary: WindowSummary, model: AccessModel) -> Coverage:
    """One window's functions against ``model``."""
    return _coverage([(f.function, f.module) for f in summary.functions], model)


def model_coverage(summaries: list[WindowSummary], model: AccessModel) -> Coverage:
    """Every distinct function of every window against ``model``."""
    seen: dict[tuple[str, str], None] = {}
    for s in summaries:
        seen.update(((f.function, f.module), None) for f in s.functions)
    return _coverage(list(seen), model)


def _coverage(functions: list[tuple[str, str]], model: AccessModel) -> Coverage:
    kvm = [f for f, m in functions if m in KVM_MODULES]
    other = [f for f, m in functions if m not in KVM_MODULES]
    unknown_kvm = tuple(f for f in kvm if model.lookup(f) is None)
    unknown_kernel = tuple(f for f in other if model.lookup(f) is None)
    return Coverage(len(functions), len(functions) - len(unknown_kvm) - len(unknown_kernel),
                    len(kvm), len(kvm) - len(unknown_kvm), unknown_kvm, unknown_kernel)


__all__ = ["Coverage", "KVM_MODULES", "model_coverage", "window_coverage"]
