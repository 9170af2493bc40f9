"""The guest -> host call convention (see guests/lib/kvmiso.inc): console text on port 0xE9,
calls on port 0xEA with their arguments in rdi, rsi, rdx, rcx (32 bits wide outside long mode)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..kvm.abi import kvm_regs

PORT_CONSOLE = 0xE9
PORT_UCALL = 0xEA
UCALL_DONE, UCALL_FAIL, UCALL_REPORT, UCALL_EXCEPTION = 1, 2, 3, 4

EXCEPTION_NAMES = {
    0: "#DE", 1: "#DB", 2: "NMI", 3: "#BP", 4: "#OF", 5: "#BR", 6: "#UD", 7: "#NM", 8: "#DF",
    10: "#TS", 11: "#NP", 12: "#SS", 13: "#GP", 14: "#PF", 16: "#MF", 17: "#AC", 18: "#MC",
    19: "#XM", 20: "#VE", 21: "#CP",
}


@dataclass(frozen=True)
class Done:
    """UCALL_DONE: the payload succeeded."""


@dataclass(frozen=True)
class Fail:
    """UCALL_FAIL: the payload failed with ``code`` (rdi)."""

    code: int


@dataclass(frozen=True)
class Report:
    """UCALL_REPORT: a value for the host, ``tag`` (rdi) and ``value`` (rsi)."""

    tag: int
    value: int


@dataclass(frozen=True)
class GuestException:
    """An exception the guest took and crt0 reported: vector, error code, RIP and CR2; in real
    mode ``rip`` is the IP, ``cs`` the code segment it is an offset in, and there is neither an
    error code nor a CR2 (both 0)."""

    vector: int
    error_code: int
    rip: int
    cr2: int
    cs: int | None = None  # real mode only

    @property
    def name(self) -> str:
        """The exception's mnemonic (``#GP``), or ``vector N``."""
        return EXCEPTION_NAMES.get(self.vector, f"vector {self.vector}")

    def __str__(self) -> str:
        if self.cs is not None:
            return f"{self.name} at cs:ip {self.cs:04x}:{self.rip:04x}"
        text = f"{self.name} (error code {self.error_code:#x}) at rip {self.rip:#x}"
        return text + (f", cr2 {self.cr2:#x}" if self.vector == 14 else "")


class MalformedUcall(ValueError):
    """A write to the ucall port that is not a known call."""


Ucall = Done | Fail | Report | GuestException


def decode_ucall(number: int, regs: kvm_regs, bits: int) -> Ucall:
    """Decode call ``number`` (the byte written to PORT_UCALL) from the vCPU's registers."""
    mask = (1 << max(bits, 32)) - 1  # real-mode guests use 32-bit registers too
    rdi, rsi, rdx, rcx = regs.rdi & mask, regs.rsi & mask, regs.rdx & mask, regs.rcx & mask
    if number == UCALL_DONE:
        return Done()
    if number == UCALL_FAIL:
        return Fail(rdi)
    if number == UCALL_REPORT:
        return Report(rdi, rsi)
    if number == UCALL_EXCEPTION:
        if bits == 16:  # crt0_16.S sends the faulting cs where CR2 would be
            return GuestException(rdi, rsi, rdx, 0, cs=rcx)
        return GuestException(rdi, rsi, rdx, rcx)
    raise MalformedUcall(f"unknown ucall number {number} on port {PORT_UCALL:#x}")
