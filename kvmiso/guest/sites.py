"""The host side of GUEST_ASSERT, GUEST_SYNC and GUEST_PRINTF: the site record a guest macro leaves
in its image (guests/lib/kvmiso.inc, kvmiso.h), read from guest memory, and put into words.

A site is 24 bytes wherever the guest runs (its images are ELF64 in every mode)::

    u32 line; u8 kind; u8 nargs; u16 zero; u64 file; u64 text   (file, text: NUL-terminated strings)

The guest is not trusted: a pointer that leads nowhere gives ``?`` where its text would be, and
nothing here raises for what a guest wrote.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Sequence

if TYPE_CHECKING:
    from ..kvm import Vcpu, Vm

SITE = struct.Struct("<IBBHQQ")
MAX_FILE, MAX_TEXT, MAX_STRING = 256, 1024, 4096  # bytes read for a file name, a text, a %s
SITE_ASSERT, SITE_EQ, SITE_NE, SITE_LT, SITE_LE, SITE_GT, SITE_GE, SITE_FAIL, SITE_SYNC, SITE_PRINTF = range(10)
MACROS = ("GUEST_ASSERT", "GUEST_ASSERT_EQ", "GUEST_ASSERT_NE", "GUEST_ASSERT_LT", "GUEST_ASSERT_LE",
          "GUEST_ASSERT_GT", "GUEST_ASSERT_GE", "GUEST_FAIL", "GUEST_SYNC", "GUEST_PRINTF")
# what a failed comparison says of its two values, got (a) and expected (b)
_BROKEN = {
    SITE_EQ: "expected {b:#x}, got {a:#x}",
    SITE_NE: "both are {a:#x}",
    SITE_LT: "{a:#x} is not below {b:#x}",
    SITE_LE: "{a:#x} is above {b:#x}",
    SITE_GT: "{a:#x} is not above {b:#x}",
    SITE_GE: "{a:#x} is below {b:#x}",
}

Reader = Callable[[int, int], bytes]  # (guest linear address, length) -> bytes; raises where unreadable


@dataclass(frozen=True)
class Site:
    """Where a GUEST_* macro is written (``file``, ``line``; line 0 where it is not known), which
    one (``kind``), how many values it passes (``nargs``) and its ``text``: the operands it
    compares, a printf format or a sync's value, as written. ``address`` is the record's."""

    address: int
    file: str = "?"
    line: int = 0
    kind: int = SITE_ASSERT
    nargs: int = 0
    text: str = ""

    @property
    def macro(self) -> str:
        """The macro's name (``GUEST_ASSERT_EQ``)."""
        return MACROS[self.kind] if self.kind < len(MACROS) else f"site kind {self.kind}"

    def __str__(self) -> str:
        return f"{self.file}:{self.line}" if self.line else "an unknown line"


def read_site(read: Reader, address: int) -> Site:
    """The site record at ``address``; fields that cannot be read are ``?`` and 0."""
    try:
        line, kind, nargs, _, file_at, text_at = SITE.unpack(read(address, SITE.size))
    except (OSError, ValueError, struct.error):
        return Site(address)
    return Site(address, read_string(read, file_at, MAX_FILE), line, kind, min(nargs, 5),
                read_string(read, text_at, MAX_TEXT))


def read_string(read: Reader, address: int, limit: int = MAX_STRING) -> str:
    """The NUL-terminated string at ``address`` (at most ``limit`` bytes, never across a page
    that cannot be read), ``?`` when not one byte of it can be."""
    out = bytearray()
    while len(out) < limit:
        at = address + len(out)
        try:
            chunk = read(at, min(limit - len(out), 0x1000 - (at & 0xFFF)))
        except (OSError, ValueError):
            break
        end = chunk.find(b"\0")
        out += chunk if end < 0 else chunk[:end]
        if end >= 0:
            return out.decode("utf-8", "replace")
    return out.decode("utf-8", "replace") if out else "?"


def guest_reader(vm: Vm, vcpu: Vcpu) -> Reader:
    """Read guest memory at linear addresses as ``vcpu`` sees them now (KVM_TRANSLATE per page)."""

    def read(address: int, length: int) -> bytes:
        out = bytearray()
        while len(out) < length:
            at = address + len(out)
            t = vcpu.translate(at)
            if not t.valid:
                raise ValueError(f"{at:#x} is not mapped by the guest's page tables")
            n = min(length - len(out), 0x1000 - (at & 0xFFF))
            out += vm.read(t.physical_address, n)
        return bytes(out)

    return read


def describe_assertion(site: Site, values: Sequence[int], text: str = "", symbol: str | None = None) -> str:
    """A failed GUEST_ASSERT* or GUEST_FAIL in one line, as pytest would print a failed assert:

    >>> describe_assertion(Site(0x8400, "x.S", 12, SITE_EQ, 2, "%eax, $0xaa"), (0xab, 0xaa), symbol="main+0x5c")
    'x.S:12: GUEST_ASSERT_EQ(%eax, $0xaa) failed: expected 0xaa, got 0xab (main+0x5c)'

    ``text`` is GUEST_FAIL's formatted message; ``symbol`` where the guest was (label+offset)."""
    where = f" ({symbol})" if symbol else ""
    at = f"{site}: " if site.line else ""  # a .s file's macros know no line
    if site.kind == SITE_FAIL:
        return f"{at}GUEST_FAIL: {text}{where}"
    head = f"{at}{site.macro}({site.text}) failed"
    if site.kind in _BROKEN and len(values) >= 2:
        return f"{head}: {_BROKEN[site.kind].format(a=values[0], b=values[1])}{where}"
    return head + where


# a C printf conversion: flags, width, precision, length, conversion
_SPEC = re.compile(r"%([-+ #0]*)(\*|\d+)?(?:\.(\*|\d*))?(hh|h|ll|l|z|j|t|q)?([diouxXcsp%])")
_LENGTH_BITS = {"hh": 8, "h": 16, None: 32, "l": 64, "ll": 64, "z": 64, "j": 64, "t": 64, "q": 64}


def format_printf(fmt: str, args: Sequence[int], read: Reader | None = None) -> str:
    """``fmt`` formatted as C's printf would with ``args`` (register values): ``%d %i %u %x %X
    %o %c %s %p %%`` with flags, width, precision and length (``%hhx``, ``%lu``); ``%s`` reads
    the string from guest memory through ``read``. A conversion with no argument left stays as
    written; text that is no conversion is kept as it is."""
    out: list[str] = []
    pending = list(args)
    pos = 0
    for m in _SPEC.finditer(fmt):
        out.append(fmt[pos:m.start()])
        pos = m.end()
        flags, width, prec, length, conv = m.groups()
        if conv == "%":
            out.append("%")
            continue
        if "*" in (width, prec) or not pending:  # a * takes an argument: rare, and kept as written
            out.append(m.group(0))
            continue
        bits = _LENGTH_BITS[length] if conv != "p" else 64
        value = pending.pop(0) & ((1 << bits) - 1)
        spec = "%" + flags + (width or "") + (f".{prec}" if prec is not None else "")
        if conv in "di":
            signed = value - (1 << bits) if value >> (bits - 1) else value
            out.append((spec + "d") % signed)
        elif conv == "u":
            out.append((spec + "d") % value)
        elif conv == "c":
            out.append((spec + "c") % chr(value & 0xFF))
        elif conv == "s":
            out.append((spec + "s") % (read_string(read, value) if read else "?"))
        elif conv == "p":
            out.append((spec.replace("#", "") + "s") % f"{value:#x}")
        elif "#" in flags and (value == 0 or conv == "o"):  # C: "%#x" of 0 is "0", "%#o" of 8 is "010"
            out.append(_c_alternate((spec.replace("#", "") + conv) % value, value, conv))
        else:
            out.append((spec + conv) % value)
    out.append(fmt[pos:])
    return "".join(out)


def _c_alternate(plain: str, value: int, conv: str) -> str:
    """C's ``#`` flag on ``plain`` (the conversion without it): nothing for a 0, a leading 0 for
    octal (Python's ``#`` would write ``0o``), taken from the padding so the width holds."""
    if value == 0 or conv != "o":
        return plain
    at = plain.find(format(value, "o"))
    if at > 0 and plain[at - 1] == "0":  # zero-padded already
        return plain
    plain = plain[:at] + "0" + plain[at:]
    if plain.startswith(" "):
        return plain[1:]
    return plain[:-1] if plain.endswith(" ") else plain
