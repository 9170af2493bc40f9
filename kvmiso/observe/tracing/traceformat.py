"""tracefs event ``format`` files, read the way libtraceevent/trace-cmd read them: field offsets,
sizes, signedness, and the ``print fmt`` with its ``__print_symbolic`` tables
(:mod:`.printfmt`), and records decoded by them; the ring-buffer pages are :mod:`.ringbuffer`'s. Pure functions of bytes and text, so recorded
samples and records built from the kernel's own format strings are parsed by the same code.

>>> import struct
>>> from kvmiso.observe.tracing.tracefsmount import tracefs_root
>>> fmt = EventFormat.parse((tracefs_root() / "events/kvm/kvm_exit/format").read_text(), "kvm")  # needs root
>>> at = {f.name: f.offset for f in fmt.fields}
>>> record = bytearray(max(f.offset + f.size for f in fmt.fields))
>>> struct.pack_into("<I", record, at["exit_reason"], 30); struct.pack_into("<I", record, at["isa"], 1)  # VMX
>>> fields, symbols = fmt.decode(bytes(record))
>>> fields["exit_reason"], symbols["exit_reason"]
(30, 'IO_INSTRUCTION')
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

from .printfmt import PrintExpr, PrintFmtError, fields_read, parse_print_args

# --- event format files ----------------------------------------------------------------------

FIELD_RE = re.compile(r"field:\s*(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);(?:\s*signed:(?P<signed>-?\d+);)?")


class FormatError(ValueError):
    """A format file, header_page or ring-buffer page that cannot be parsed."""


@dataclass(frozen=True)
class Field:
    """One field of an event record, as its format file declares it."""

    name: str
    type: str  # the C type as declared: "unsigned int", "__u8", "__data_loc char[]"
    offset: int
    size: int
    signed: bool
    array: int | None = None  # element count of a fixed array (``__u8 insn[15]``)
    dynamic: bool = False  # ``__data_loc``/``__rel_loc``: the value is (length << 16 | offset) of the bytes

    def value(self, rec: bytes) -> Any:
        """This field of record ``rec`` (the bytes after the ring-buffer event header):
        an int, a str for char arrays and strings, a hex str for other arrays."""
        raw = rec[self.offset : self.offset + self.size]
        if self.dynamic:
            loc = int.from_bytes(raw[:4], "little")
            start, length = loc & 0xFFFF, loc >> 16
            if self.type.startswith("__rel_loc"):  # relative to the end of this field
                start += self.offset + self.size
            data = rec[start : start + length]
            return _cstr(data) if "char" in self.type else data.hex()
        if self.array is not None:
            return _cstr(raw) if "char" in self.type else raw.hex()
        if self.size in (1, 2, 4, 8):
            return int.from_bytes(raw, "little", signed=self.signed)
        return raw.hex()


def _cstr(data: bytes) -> str:
    return data.split(b"\0", 1)[0].decode("utf-8", "replace")


def _parse_field(decl: str, offset: int, size: int, signed: bool) -> Field:
    decl = decl.strip()
    dynamic = decl.startswith("__data_loc") or decl.startswith("__rel_loc")
    m = re.match(r"(?P<type>.*?)(?P<name>\w+)\s*(?:\[(?P<n>[^\]]*)\])?$", decl)
    if not m:
        raise FormatError(f"cannot read field declaration {decl!r}")
    type_ = m["type"].strip()
    array = None
    if m["n"] is not None and not dynamic:
        array = int(m["n"], 0) if m["n"] else 0
    if dynamic:
        type_ = decl[: m.start("name")].strip() + "[]"
    return Field(m["name"], type_, offset, size, signed, array, dynamic)


@dataclass
class EventFormat:
    """One event's ``format`` file: id, fields, and the print format's arguments as
    expressions, from which symbolic names of field values are taken."""

    system: str
    name: str
    id: int
    fields: list[Field]
    print_fmt: str = ""
    args: list[PrintExpr] = field(default_factory=list, repr=False)

    @classmethod
    def parse(cls, text: str, system: str) -> "EventFormat":
        """An event's ``format`` file text, parsed (``system``: its directory)."""
        name = re.search(r"^name:\s*(\S+)", text, re.M)
        ident = re.search(r"^ID:\s*(\d+)", text, re.M)
        if not name or not ident:
            raise FormatError("not an event format file (no name: or ID: line)")
        fields = [_parse_field(m["decl"], int(m["offset"]), int(m["size"]), m["signed"] not in (None, "0"))
                  for m in FIELD_RE.finditer(text)]
        pf = re.search(r"^print fmt:\s*(.*)$", text, re.M | re.S)
        print_fmt = pf.group(1).strip() if pf else ""
        try:
            args = parse_print_args(print_fmt) if print_fmt else []
        except PrintFmtError:
            args = []  # an exotic print fmt costs the symbolic names, never the field values
        return cls(system, name.group(1), int(ident.group(1)), fields, print_fmt, args)

    @property
    def full_name(self) -> str:
        """``system:name``."""
        return f"{self.system}:{self.name}"

    def __post_init__(self) -> None:
        # Plain integer fields, in offset order and not overlapping, are read with one
        # struct.unpack_from per record; the rest (arrays, strings) field by field.
        plain = sorted((f for f in self.fields if f.array is None and not f.dynamic and f.size in (1, 2, 4, 8)),
                       key=lambda f: f.offset)
        code, end = "<", 0
        self._plain: list[str] = []
        for f in plain:
            if f.offset < end:
                break
            letter = {1: "b", 2: "h", 4: "i", 8: "q"}[f.size]
            code += f"{f.offset - end}x" + (letter if f.signed else letter.upper())
            end = f.offset + f.size
            self._plain.append(f.name)
        self._struct = struct.Struct(code)
        self._common = sum(1 for n in self._plain if n.startswith("common_"))  # first: offsets 0-7
        self._rest = [f for f in self.fields if f.name not in self._plain and not f.name.startswith("common_")]
        self._pid = next((f for f in self.fields if f.name == "common_pid"), None)
        self._symbolic = [(a, fields_read(a.node)) for a in self.args if a.symbolic]
        self._memo: dict[tuple, dict[str, str]] = {}

    def decode(self, rec: bytes) -> tuple[dict[str, Any], dict[str, str]]:
        """Field values (common_* fields left out) and the symbolic names the print format gives
        them: ``({"exit_reason": 30, ...}, {"exit_reason": "IO_INSTRUCTION"})``."""
        n = self._common
        if len(rec) < self._struct.size:
            raise FormatError(f"a {self.full_name} record of {len(rec)} bytes, its format needs {self._struct.size}")
        values = dict(zip(self._plain[n:], self._struct.unpack_from(rec)[n:]))
        for f in self._rest:
            values[f.name] = f.value(rec)
        symbols: dict[str, str] = {}
        for arg, reads in self._symbolic:
            # the names depend only on the fields the expression reads: remember them
            key = (id(arg), *(values.get(r) for r in reads))
            named = self._memo.get(key)
            if named is None:
                named = {}
                try:
                    arg.eval(values, named)
                except (ArithmeticError, LookupError, TypeError, ValueError):
                    pass  # a value the expression cannot take; the raw value is still there
                if len(self._memo) < 4096:
                    self._memo[key] = named
            for k, v in named.items():
                symbols[k] = f"{symbols[k]} {v}" if k in symbols else v
        return values, symbols


def common_pid(rec: bytes, fmt: EventFormat) -> int:
    """The ``common_pid`` of a record: the thread the event fired in."""
    if fmt._pid is None:
        raise FormatError(f"{fmt.full_name} has no common_pid field")
    return fmt._pid.value(rec)


def kernel_stack(rec: bytes, fmt: EventFormat) -> tuple[int, ...]:
    """The return addresses of an ftrace ``kernel_stack`` record, innermost first.

    Its format file declares ``caller[8]``, but that is only the print width: ``size`` is the
    number of entries (kernel/trace/trace.c: ``entry->size = nr_entries``) and the record holds
    that many, from ``caller``'s offset."""
    by_name = {f.name: f for f in fmt.fields}
    try:
        count, caller = by_name["size"], by_name["caller"]
    except KeyError as e:
        raise FormatError(f"{fmt.full_name} has no {e.args[0]} field: not a kernel_stack format") from None
    n = count.value(rec)
    end = caller.offset + 8 * n
    if n < 0 or end > len(rec):
        raise FormatError(f"a kernel_stack record of {len(rec)} bytes cannot hold {n} return addresses")
    return struct.unpack_from(f"<{n}Q", rec, caller.offset)


def common_type(rec: bytes) -> int:
    """The event id of a record (``common_type``, the first u16 of every record)."""
    return struct.unpack_from("<H", rec, 0)[0]
