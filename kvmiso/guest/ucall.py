"""The guest -> host call convention (see guests/lib/kvmiso.inc): console text on port 0xE9,
calls on port 0xEA with their arguments in rdi, rsi, rdx, rcx, r8, r9 (32 bits wide outside long
mode, where r8 and r9 do not exist). GUEST_ASSERT, GUEST_SYNC and GUEST_PRINTF pass a site record
in rdi (:mod:`.sites`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from .sites import SITE_FAIL, Reader, Site, describe_assertion, format_printf, read_site

if TYPE_CHECKING:
    from ..kvm.abi import kvm_regs

PORT_CONSOLE = 0xE9
PORT_UCALL = 0xEA
PORT_UCALL_OUT = bytes((0xE6, PORT_UCALL))  # out %al, $PORT_UCALL: the instruction of kvmiso.inc's UCALL
UCALL_DONE, UCALL_FAIL, UCALL_REPORT, UCALL_EXCEPTION = 1, 2, 3, 4
UCALL_ASSERT, UCALL_SYNC, UCALL_PRINTF = 5, 6, 7

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


@dataclass(frozen=True)
class GuestAssertion:
    """A failed GUEST_ASSERT* (or a GUEST_FAIL): where it is written, the values it compared (got,
    expected) or GUEST_FAIL's arguments, its formatted message (GUEST_FAIL's), and the guest's
    RIP right after the call."""

    site: Site
    values: tuple[int, ...]
    rip: int
    text: str = ""

    def describe(self, symbol: str | None = None) -> str:
        """The one line a test prints: ``x.S:12: GUEST_ASSERT_EQ(%eax, $0xaa) failed: expected
        0xaa, got 0xab (main+0x5c)``, with ``symbol`` (the RIP as label+offset) when known."""
        return describe_assertion(self.site, self.values, self.text, symbol)


@dataclass(frozen=True)
class Sync:
    """A GUEST_SYNC: its ``value``, the ``args`` after it and where it is written. The guest waits
    at it until the host runs the vCPU again."""

    value: int
    args: tuple[int, ...]
    site: Site

    def __str__(self) -> str:
        return f"GUEST_SYNC({self.site.text}) at {self.site}, value {self.value:#x}"


@dataclass(frozen=True)
class Printf:
    """A GUEST_PRINTF, formatted by the host: ``text`` goes to the run's console."""

    site: Site
    text: str


class MalformedUcall(ValueError):
    """A write to the ucall port that is not a known call."""


Ucall = Done | Fail | Report | GuestException | GuestAssertion | Sync | Printf


def decode_ucall(number: int, regs: kvm_regs, bits: int, read: Reader | None = None) -> Ucall:
    """Decode call ``number`` (the byte written to PORT_UCALL) from the vCPU's registers; ``read``
    reads guest memory for the calls that pass a site (without it their sites are unknown)."""
    mask = (1 << max(bits, 32)) - 1  # real-mode guests use 32-bit registers too
    rdi, rsi, rdx, rcx = regs.rdi & mask, regs.rsi & mask, regs.rdx & mask, regs.rcx & mask
    if number in (UCALL_ASSERT, UCALL_SYNC, UCALL_PRINTF):
        site = read_site(read, rdi) if read else Site(rdi)
        values = (rsi, rdx, rcx, regs.r8, regs.r9) if bits == 64 else (rsi, rdx, rcx)
        if number == UCALL_SYNC:
            return Sync(rsi, values[1:max(site.nargs, 1)], site)
        values = values[:site.nargs]
        text = format_printf(site.text, values, read) if number == UCALL_PRINTF or site.kind == SITE_FAIL else ""
        if number == UCALL_PRINTF:
            return Printf(site, text)
        return GuestAssertion(site, values, regs.rip, text)
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
