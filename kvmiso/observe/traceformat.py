"""The binary formats of tracefs, read the way libtraceevent/trace-cmd read them: each event's
``format`` file (field offsets, sizes, signedness, and the ``print fmt`` with its
``__print_symbolic`` tables), ``events/header_page``, and the ring-buffer pages that
``per_cpu/cpuN/trace_pipe_raw`` returns. Pure functions of bytes and text, so recorded
samples and records built from the kernel's own format strings are parsed by the same code.

>>> fmt = EventFormat.parse(open(".../events/kvm/kvm_exit/format").read(), "kvm")
>>> fields, symbols = fmt.decode(record)
>>> fields["exit_reason"], symbols["exit_reason"]
(30, 'IO_INSTRUCTION')
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator

# --- event format files ----------------------------------------------------------------------

_FIELD_RE = re.compile(r"field:\s*(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);(?:\s*signed:(?P<signed>-?\d+);)?")


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
    args: list["_Expr"] = field(default_factory=list, repr=False)

    @classmethod
    def parse(cls, text: str, system: str) -> "EventFormat":
        name = re.search(r"^name:\s*(\S+)", text, re.M)
        ident = re.search(r"^ID:\s*(\d+)", text, re.M)
        if not name or not ident:
            raise FormatError("not an event format file (no name: or ID: line)")
        fields = [_parse_field(m["decl"], int(m["offset"]), int(m["size"]), m["signed"] not in (None, "0"))
                  for m in _FIELD_RE.finditer(text)]
        pf = re.search(r"^print fmt:\s*(.*)$", text, re.M | re.S)
        print_fmt = pf.group(1).strip() if pf else ""
        try:
            args = _parse_print_args(print_fmt) if print_fmt else []
        except FormatError:
            args = []  # an exotic print fmt costs the symbolic names, never the field values
        return cls(system, name.group(1), int(ident.group(1)), fields, print_fmt, args)

    @property
    def full_name(self) -> str:
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
        self._symbolic = [(a, _fields_read(a.node)) for a in self.args if a.symbolic]
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


# --- print fmt expressions -------------------------------------------------------------------
#
# The arguments after the format string are C expressions over ``REC->field``. kvmiso needs
# their value only where they name a field's value: ``__print_symbolic(REC->f, {v, "name"}...)``
# and ``__print_flags``, possibly under a condition such as ``(REC->isa == 1) ? ... : ...``.
# So: a small recursive-descent parser for the C expression grammar, evaluated against a record.

_TOKEN_RE = re.compile(r"""
    \s*(?:
      (?P<str>"(?:[^"\\]|\\.)*")
    | (?P<num>0[xX][0-9a-fA-F]+|\d+)[uUlL]*
    | (?P<char>'(?:[^'\\]|\\.)')
    | (?P<id>[A-Za-z_]\w*)
    | (?P<op>->|<<|>>|<=|>=|==|!=|&&|\|\||[-+*/%&|^!~<>?:(),{}\[\].])
    )""", re.X)

_BINARY = [  # C precedence, loosest first
    ("||",), ("&&",), ("|",), ("^",), ("&",), ("==", "!="), ("<", ">", "<=", ">="), ("<<", ">>"),
    ("+", "-"), ("*", "/", "%"),
]
_U64 = (1 << 64) - 1
_TYPE_WORDS = {"unsigned", "signed", "int", "long", "short", "char", "bool", "u8", "u16", "u32", "u64",
               "s8", "s16", "s32", "s64", "__u8", "__u16", "__u32", "__u64", "__s8", "__s16", "__s32",
               "__s64", "size_t", "void", "const", "struct"}


def _tokenize(text: str) -> list[tuple[str, str]]:
    out, pos = [], 0
    while pos < len(text):
        m = _TOKEN_RE.match(text, pos)
        if not m or m.end() == pos:
            if not text[pos:].strip():
                break  # trailing whitespace
            raise FormatError(f"unexpected character in print fmt at {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class _Expr:
    """A parsed expression: a tree of tuples evaluated by :meth:`eval`."""

    def __init__(self, node: tuple) -> None:
        self.node = _fold(node)
        self.symbolic = _mentions(node, ("__print_symbolic", "__print_flags", "__print_symbolic_u64",
                                         "__print_flags_u64"))

    def eval(self, rec: dict[str, Any], symbols: dict[str, str]) -> Any:
        """The value for record fields ``rec``; names from symbol tables go into ``symbols``."""
        return _eval(self.node, rec, symbols)


def _mentions(node: Any, names: tuple[str, ...]) -> bool:
    if isinstance(node, tuple):
        if node and node[0] == "call" and node[1] in names:
            return True
        return any(_mentions(n, names) for n in node[1:])
    if isinstance(node, list):
        return any(_mentions(n, names) for n in node)
    return False


class _Parser:
    def __init__(self, tokens: list[tuple[str, str]]) -> None:
        self.toks = tokens
        self.i = 0

    def peek(self, k: int = 0) -> tuple[str, str]:
        return self.toks[self.i + k] if self.i + k < len(self.toks) else ("eof", "")

    def take(self, value: str | None = None) -> tuple[str, str]:
        tok = self.peek()
        if value is not None and tok[1] != value:
            raise FormatError(f"expected {value!r} in print fmt, found {tok[1]!r}")
        self.i += 1
        return tok

    def args(self) -> list[tuple]:
        out = [self.ternary()]
        while self.peek()[1] == ",":
            self.take()
            out.append(self.ternary())
        return out

    def ternary(self) -> tuple:
        cond = self.binary(0)
        if self.peek()[1] == "?":
            self.take()
            a = self.ternary()
            self.take(":")
            b = self.ternary()
            return ("?", cond, a, b)
        return cond

    def binary(self, level: int) -> tuple:
        if level == len(_BINARY):
            return self.unary()
        left = self.binary(level + 1)
        while self.peek()[0] == "op" and self.peek()[1] in _BINARY[level]:
            op = self.take()[1]
            left = ("bin", op, left, self.binary(level + 1))
        return left

    def unary(self) -> tuple:
        kind, tok = self.peek()
        if tok in ("!", "~", "-", "+"):
            self.take()
            return ("un", tok, self.unary())
        if tok == "(" and self._is_cast():
            self.take()
            words = []
            while self.peek()[1] != ")":
                words.append(self.take()[1])
            self.take(")")
            return ("cast", " ".join(words), self.unary())
        return self.postfix()

    def _is_cast(self) -> bool:
        k = 1
        while self.peek(k)[1] not in (")", ""):
            kind, tok = self.peek(k)
            if not (tok in _TYPE_WORDS or tok == "*" or (kind == "id" and tok.endswith("_t"))):
                return False
            k += 1
        return k > 1

    def postfix(self) -> tuple:
        node = self.primary()
        while self.peek()[1] in ("[", "->", "."):
            op = self.take()[1]
            if op == "[":
                node = ("index", node, self.ternary())
                self.take("]")
            else:
                node = ("member", node, self.take()[1])
        return node

    def primary(self) -> tuple:
        kind, tok = self.take()
        if kind == "num":
            return ("num", int(tok, 0) if not re.fullmatch(r"0\d+", tok) else int(tok, 8))
        if kind == "char":
            return ("num", ord(bytes(tok[1:-1], "utf-8").decode("unicode_escape")))
        if kind == "str":
            s = bytes(tok[1:-1], "utf-8").decode("unicode_escape")
            while self.peek()[0] == "str":  # "KVM_EXIT_" "IO": adjacent literals concatenate
                s += bytes(self.take()[1][1:-1], "utf-8").decode("unicode_escape")
            return ("str", s)
        if tok == "(":
            e = self.ternary()
            self.take(")")
            return e
        if tok == "{":
            items = [] if self.peek()[1] == "}" else self.args()
            if self.peek()[1] == ",":
                self.take()
            self.take("}")
            return ("list", items)
        if kind == "id":
            if tok == "REC":
                return ("rec",)
            if self.peek()[1] == "(":
                self.take()
                args = [] if self.peek()[1] == ")" else self.args()
                self.take(")")
                return ("call", tok, args)
            return ("id", tok)
        raise FormatError(f"unexpected {tok!r} in print fmt")


def _parse_print_args(print_fmt: str) -> list[_Expr]:
    """The expressions after the quoted format string of a ``print fmt:`` line."""
    toks = _tokenize(print_fmt)
    p = _Parser(toks)
    if p.peek()[0] != "str":
        raise FormatError("print fmt does not start with a string")
    p.primary()
    if p.peek()[0] == "eof":
        return []
    p.take(",")
    args = p.args()
    if p.peek()[0] != "eof":
        raise FormatError(f"trailing {p.peek()[1]!r} in print fmt")
    return [_Expr(a) for a in args]


def _fold(node: Any) -> Any:
    """Constant subexpressions evaluated once (the symbol tables' ``(1UL << 3)`` and the like)."""
    if isinstance(node, list):
        return [_fold(n) for n in node]
    if not isinstance(node, tuple) or node[0] in ("num", "str", "rec", "id"):
        return node
    node = tuple(_fold(n) if isinstance(n, (tuple, list)) else n for n in node)
    if node[0] in ("bin", "un", "cast", "?") and _field_of(node) is None:
        try:
            v = _eval(node, {}, {})
        except (ArithmeticError, LookupError, TypeError, ValueError):
            return node
        return ("str" if isinstance(v, str) else "num", v)
    return node


def _fields_read(node: Any) -> tuple[str, ...]:
    """Every ``REC->field`` an expression reads, in order, once."""
    out: list[str] = []

    def walk(n: Any) -> None:
        if isinstance(n, tuple):
            if n and n[0] == "member" and n[1] == ("rec",):
                if n[2] not in out:
                    out.append(n[2])
                return
            for c in n[1:]:
                walk(c)
        elif isinstance(n, list):
            for c in n:
                walk(c)

    walk(node)
    return tuple(out)


def _field_of(node: Any) -> str | None:
    """The first ``REC->field`` an expression reads: the field a symbol table names."""
    if isinstance(node, tuple):
        if node[0] == "member" and node[1] == ("rec",):
            return node[2]
        for n in node[1:]:
            f = _field_of(n) if isinstance(n, (tuple, list)) else None
            if f:
                return f
    elif isinstance(node, list):
        for n in node:
            f = _field_of(n)
            if f:
                return f
    return None


def _eval(node: tuple, rec: dict[str, Any], symbols: dict[str, str]) -> Any:
    kind = node[0]
    if kind in ("num", "str"):
        return node[1]
    if kind == "member":
        if node[1] != ("rec",):
            raise ValueError("only REC->field is readable")
        return rec[node[2]]
    if kind == "?":
        return _eval(node[2] if _eval(node[1], rec, symbols) else node[3], rec, symbols)
    if kind == "un":
        v = _eval(node[2], rec, symbols)
        return {"!": lambda: int(not v), "~": lambda: ~v & _U64, "-": lambda: -v, "+": lambda: v}[node[1]]()
    if kind == "cast":
        return _eval(node[2], rec, symbols)
    if kind == "bin":
        op = node[1]
        if op == "&&":
            return int(bool(_eval(node[2], rec, symbols)) and bool(_eval(node[3], rec, symbols)))
        if op == "||":
            return int(bool(_eval(node[2], rec, symbols)) or bool(_eval(node[3], rec, symbols)))
        a, b = _eval(node[2], rec, symbols), _eval(node[3], rec, symbols)
        return _BINOPS[op](a, b)
    if kind == "call":
        return _call(node, rec, symbols)
    if kind == "index":
        return _eval(node[1], rec, symbols)[_eval(node[2], rec, symbols)]
    raise ValueError(f"cannot evaluate {kind}")


_BINOPS = {
    "|": lambda a, b: a | b, "^": lambda a, b: a ^ b, "&": lambda a, b: a & b,
    "==": lambda a, b: int(a == b), "!=": lambda a, b: int(a != b), "<": lambda a, b: int(a < b),
    ">": lambda a, b: int(a > b), "<=": lambda a, b: int(a <= b), ">=": lambda a, b: int(a >= b),
    "<<": lambda a, b: (a << b) & _U64, ">>": lambda a, b: a >> b, "+": lambda a, b: a + b,
    "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: int(a / b), "%": lambda a, b: a % b,
}


def _call(node: tuple, rec: dict[str, Any], symbols: dict[str, str]) -> Any:
    name, args = node[1], node[2]
    if name in ("__print_symbolic", "__print_symbolic_u64"):
        # as trace_print_symbols_seq: the value and the table's values compared as unsigned long
        value = _eval(args[0], rec, symbols) & _U64
        for entry in args[1:]:
            if entry[0] == "list" and len(entry[1]) == 2 and _eval(entry[1][0], rec, symbols) & _U64 == value:
                text = _eval(entry[1][1], rec, symbols)
                _add_symbol(symbols, _field_of(args[0]), text)
                return text
        return f"0x{value:x}"
    if name in ("__print_flags", "__print_flags_u64"):
        value = _eval(args[0], rec, symbols) & _U64
        delim = _eval(args[1], rec, symbols)
        names = []
        for entry in args[2:]:
            if entry[0] != "list" or len(entry[1]) != 2:
                continue
            mask = _eval(entry[1][0], rec, symbols) & _U64
            if mask and value & mask == mask:
                names.append(_eval(entry[1][1], rec, symbols))
                value &= ~mask
        if names:
            _add_symbol(symbols, _field_of(args[0]), delim.join(names))
        return delim.join(names + ([f"0x{value:x}"] if value else []))
    raise ValueError(f"{name}() is not evaluated")  # __print_hex & co: no symbolic name in them


def _add_symbol(symbols: dict[str, str], name: str | None, text: str) -> None:
    if name and text:
        symbols[name] = f"{symbols[name]} {text}" if name in symbols else text


# --- header_page and ring-buffer pages -------------------------------------------------------

# The compressed event header (events/header_event): type_len:5, time_delta:27, array[].
TYPE_PADDING, TYPE_TIME_EXTEND, TYPE_TIME_STAMP = 29, 30, 31
TS_SHIFT = 27
# Flags in the top bits of the page's commit field (kernel/trace/ring_buffer.c).
MISSED_EVENTS, MISSED_STORED = 1 << 31, 1 << 30
_COMMIT_MASK = (1 << 30) - 1


@dataclass(frozen=True)
class PageHeader:
    """Where a ring-buffer page keeps its timestamp, commit word and data (``header_page``)."""

    timestamp_offset: int = 0
    timestamp_size: int = 8
    commit_offset: int = 8
    commit_size: int = 8
    data_offset: int = 16

    @classmethod
    def parse(cls, text: str) -> "PageHeader":
        got = {m["decl"].split()[-1]: (int(m["offset"]), int(m["size"])) for m in _FIELD_RE.finditer(text)}
        try:
            (ts_off, ts_size), (c_off, c_size), (d_off, _) = got["timestamp"], got["commit"], got["data"]
        except KeyError as e:
            raise FormatError(f"header_page has no {e.args[0]} field") from None
        return cls(ts_off, ts_size, c_off, c_size, d_off)


@dataclass(frozen=True)
class RawEvent:
    """One record from a ring-buffer page: absolute timestamp (ns on the trace clock), the CPU
    whose buffer held it, and the record bytes (common fields first)."""

    ts: int
    cpu: int
    data: bytes


@dataclass
class Page:
    """A parsed page: its records and the events the kernel reported lost before it
    (-1: lost, count unknown)."""

    events: list[RawEvent]
    missed: int = 0


def parse_page(page: bytes, header: PageHeader, cpu: int = 0) -> Page:
    """Every record in one ``trace_pipe_raw`` page, with absolute timestamps, in order."""
    if len(page) < header.data_offset:
        raise FormatError(f"a ring-buffer page of {len(page)} bytes is shorter than its header")
    ts = int.from_bytes(page[header.timestamp_offset : header.timestamp_offset + header.timestamp_size], "little")
    commit = int.from_bytes(page[header.commit_offset : header.commit_offset + header.commit_size], "little")
    size = commit & _COMMIT_MASK
    data = page[header.data_offset : header.data_offset + size]
    if len(data) < size:
        raise FormatError(f"page commit {size} runs past the page ({len(page)} bytes)")
    missed = 0
    if commit & MISSED_EVENTS:
        missed = -1
        if commit & MISSED_STORED:  # the count follows the data, as a long
            end = header.data_offset + size
            missed = int.from_bytes(page[end : end + header.commit_size], "little")
    events: list[RawEvent] = []
    pos = 0
    while pos + 4 <= size:
        word = int.from_bytes(data[pos : pos + 4], "little")
        type_len, delta = word & 0x1F, word >> 5
        pos += 4
        if type_len == TYPE_PADDING:
            if delta == 0:  # padding to the end of the page
                break
            # a discarded event (the kernel sets its delta to at least 1 to tell it from the end
            # of the page); like the kernel's reader, its delta does not move the clock
            pos += int.from_bytes(data[pos : pos + 4], "little")
        elif type_len == TYPE_TIME_EXTEND:
            ts += (int.from_bytes(data[pos : pos + 4], "little") << TS_SHIFT) + delta
            pos += 4
        elif type_len == TYPE_TIME_STAMP:
            absolute = (int.from_bytes(data[pos : pos + 4], "little") << TS_SHIFT) + delta
            # the kernel stores the low 59 bits; the top bits come from the page's time
            ts = absolute | (ts & ~((1 << 59) - 1))
            pos += 4
        else:
            if type_len == 0:
                length = int.from_bytes(data[pos : pos + 4], "little") - 4
                length = (length + 3) & ~3
                pos += 4
            else:
                length = type_len * 4
            ts += delta
            events.append(RawEvent(ts, cpu, bytes(data[pos : pos + length])))
            pos += length
    return Page(events, missed)


def iter_pages(raw: bytes, page_size: int) -> Iterator[bytes]:
    """Split what ``trace_pipe_raw`` returned into pages."""
    for off in range(0, len(raw) - page_size + 1, page_size):
        yield raw[off : off + page_size]
