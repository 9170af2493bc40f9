"""The ``print fmt`` of a tracefs event format: the C expressions after the format string,
parsed and evaluated against a record, so that ``__print_symbolic`` and ``__print_flags`` give the
names of field values (``exit_reason=0x1e(IO_INSTRUCTION)``)."""

from __future__ import annotations

import re
from typing import Any


class PrintFmtError(ValueError):
    """A print fmt this parser cannot read (the event's field values are still decoded)."""

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
            raise PrintFmtError(f"unexpected character in print fmt at {text[pos:pos + 20]!r}")
        kind = m.lastgroup
        out.append((kind, m.group(kind)))
        pos = m.end()
    return out


class PrintExpr:
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
            raise PrintFmtError(f"expected {value!r} in print fmt, found {tok[1]!r}")
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
        raise PrintFmtError(f"unexpected {tok!r} in print fmt")


def parse_print_args(print_fmt: str) -> list[PrintExpr]:
    """The expressions after the quoted format string of a ``print fmt:`` line."""
    toks = _tokenize(print_fmt)
    p = _Parser(toks)
    if p.peek()[0] != "str":
        raise PrintFmtError("print fmt does not start with a string")
    p.primary()
    if p.peek()[0] == "eof":
        return []
    p.take(",")
    args = p.args()
    if p.peek()[0] != "eof":
        raise PrintFmtError(f"trailing {p.peek()[1]!r} in print fmt")
    return [PrintExpr(a) for a in args]


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


def fields_read(node: Any) -> tuple[str, ...]:
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


__all__ = ["PrintExpr", "PrintFmtError", "fields_read", "parse_print_args"]
