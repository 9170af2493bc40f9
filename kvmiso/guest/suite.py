"""The guest suite: every shipped payload in every mode it declares, with the host side each one
needs (answers to its INs, MMIO reads and MSR exits). `kvmiso report` and `kvmiso check` run it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from ..kvm import abi
from ..kvm.exits import IoExit, MmioExit, RdmsrExit, WrmsrExit
from .build import payload_modes, payload_path
from .machine import Machine
from .result import Outcome

# Payloads whose purpose is a run that does not end in DONE.
EXPECTED_OUTCOME = {"hlt": Outcome.HALT, "spin": Outcome.TIMEOUT, "triplefault": Outcome.SHUTDOWN}
# Not in the suite: probe.S is kvmiso probe's own measurement; spin only proves the timeout.
SUITE_PAYLOADS = ("hello", "portio", "stringio", "mmio", "unbacked", "hlt", "cpuid", "msr",
                  "hypercall", "triplefault", "singlestep", "exceptions")


def answer_io(e: IoExit) -> None:
    """The suite's port device: 0x3010 streams b"kvmiso!!", other INs read a size-tagged value."""
    if e.is_in:
        e.reply((b"kvmiso!!" * 512)[: e.size * e.count] if e.port == 0x3010 else (0x5A if e.size == 1 else 0x1234))


def answer_mmio(e: MmioExit) -> None:
    """The suite's MMIO device: every read answers 0xFEEDF00D, cut to the read's length."""
    if not e.is_write:
        e.reply(0xFEEDF00D & ((1 << (8 * e.length)) - 1))


def answer_msr(e: RdmsrExit | WrmsrExit) -> None:
    """The suite's userspace MSRs: RDMSR reads 0x77, WRMSR is accepted."""
    e.reply(0x77) if isinstance(e, RdmsrExit) else e.reply()


def _user_msr(m: Machine) -> None:
    m.vm.enable_cap("X86_USER_SPACE_MSR", abi.KVM_MSR_EXIT_REASON_UNKNOWN)


def _single_step(m: Machine) -> None:
    m.vcpu.set_guest_debug(single_step=True)


SETUP: dict[str, Callable[[Machine], None]] = {"msr": _user_msr, "singlestep": _single_step}


@dataclass(frozen=True)
class SuiteEntry:
    """One suite run: a payload, its mode and CPL, and the outcome it is built to reach here."""

    payload: str
    mode: str
    cpl: int = 0
    expected: Outcome = Outcome.DONE  # the outcome this payload is built to reach on this host

    @property
    def label(self) -> str:
        """``payload/mode`` (``/cpl3`` added at CPL3), as report.json names the run."""
        return f"{self.payload}/{self.mode}" + ("/cpl3" if self.cpl else "")

    def run_kwargs(self) -> dict:
        """Machine.run's keyword arguments: the suite's I/O, MMIO and MSR answers."""
        return {"on_io": answer_io, "on_mmio": answer_mmio, "on_msr": answer_msr}

    def setup(self, m: Machine) -> None:
        """What the payload needs of the VM before it runs (userspace MSRs, single-step)."""
        if self.payload in SETUP:
            SETUP[self.payload](m)


def suite(hypercall_returns: bool, cpl3: bool = True) -> list[SuiteEntry]:
    """Every suite payload in each declared mode, plus long mode at CPL3 where it is legal.
    ``hypercall_returns``: what the probe measured (:func:`kvmiso.guest.probe.hypercall_returns`);
    where a CPL0 hypercall never returns, the hypercall payload is expected to time out."""
    entries = []
    for name in SUITE_PAYLOADS:
        expected = EXPECTED_OUTCOME.get(name, Outcome.DONE)
        if name == "hypercall" and not hypercall_returns:
            expected = Outcome.TIMEOUT
        for mode in payload_modes(payload_path(name)):
            entries.append(SuiteEntry(name, mode, 0, expected))
        if cpl3 and name in ("hello", "portio", "stringio", "cpuid", "mmio", "unbacked", "exceptions"):
            entries.append(SuiteEntry(name, "long", 3))
    return entries
