"""The running kernel's BTF (``/sys/kernel/btf/vmlinux`` and each module's split BTF): struct
sizes and member offsets from the kernel itself, never from a header of another kernel (the
libbpf CO-RE habit). Pure parsing of bytes (Documentation/bpf/btf.rst), so a saved blob parses
the same way.

>>> btf = Btf.running()
>>> btf.struct("kvm_vcpu").offset("arch.pio_data")
...
>>> btf.sizeof("vcpu_pvm")
51472
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path

BTF_DIR = Path("/sys/kernel/btf")
_MAGIC = 0xEB9F

# kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}  # bytes after btf_type, fixed
_PER_MEMBER = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}


class BtfError(LookupError):
    """A BTF blob that does not parse, or a type/member the kernel does not have."""


@dataclass(frozen=True)
class Member:
    name: str
    type: int
    bit_offset: int


@dataclass
class Type:
    """One BTF type: ``size`` for sized kinds, ``ref`` for pointers, qualifiers, arrays
    (element type), vars; ``members`` for structs and unions; ``nelems`` for arrays."""

    id: int
    kind: int
    name: str
    size: int = 0
    ref: int = 0
    members: tuple[Member, ...] = ()
    nelems: int = 0
    entries: tuple[tuple[int, int, int], ...] = ()  # DATASEC: (var type id, offset, size)
    enumerators: tuple[tuple[str, int], ...] = ()  # ENUM, ENUM64


class Btf:
    """Types of vmlinux plus any module's split BTF (type ids continue after the base's)."""

    def __init__(self, types: dict[int, Type], source: str, strings: bytes = b"",
                 enumerators: dict[str, int] | None = None) -> None:
        self.types = types
        self.source = source
        self._strings = strings
        self.enumerators = enumerators or {}
        self._by_name: dict[tuple[int, str], int] = {}
        for t in types.values():
            if t.name:
                self._by_name.setdefault((t.kind, t.name), t.id)

    @classmethod
    def parse(cls, blob: bytes, source: str = "<btf>", base: "Btf | None" = None) -> "Btf":
        """Parse a BTF blob; ``base`` for a module's split BTF."""
        if len(blob) < 24:
            raise BtfError(f"{source}: {len(blob)} bytes is too short for BTF")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", blob)
        if magic != _MAGIC:
            raise BtfError(f"{source}: not BTF (magic {magic:#x})")
        tdata = blob[hdr_len + type_off: hdr_len + type_off + type_len]
        strs = blob[hdr_len + str_off: hdr_len + str_off + str_len]
        base_strs = base._strings if base else b""
        all_strs = base_strs + strs

        def name(off: int) -> str:
            end = all_strs.find(b"\0", off)
            return all_strs[off:end].decode(errors="replace") if off else ""

        types: dict[int, Type] = dict(base.types) if base else {}
        enumerators: dict[str, int] = dict(base.enumerators) if base else {}
        tid = (max(base.types) + 1) if base and base.types else 1
        pos = 0
        while pos < len(tdata):
            name_off, info, size_or_type = struct.unpack_from("<III", tdata, pos)
            pos += 12
            vlen, kind, kflag = info & 0xFFFF, (info >> 24) & 0x1F, info >> 31
            t = Type(tid, kind, name(name_off))
            if kind in (INT, STRUCT, UNION, ENUM, DATASEC, FLOAT, ENUM64):
                t.size = size_or_type
            else:
                t.ref = size_or_type
            if kind == ARRAY:
                t.ref, _index, t.nelems = struct.unpack_from("<III", tdata, pos)
            elif kind in (STRUCT, UNION):
                ms = []
                for i in range(vlen):
                    m_name, m_type, m_off = struct.unpack_from("<III", tdata, pos + 12 * i)
                    ms.append(Member(name(m_name), m_type, m_off & 0xFFFFFF if kflag else m_off))
                t.members = tuple(ms)
            elif kind == DATASEC:
                t.entries = tuple(struct.unpack_from("<III", tdata, pos + 12 * i) for i in range(vlen))
            elif kind in (ENUM, ENUM64):
                step = _PER_MEMBER[kind]
                values = []
                for i in range(vlen):
                    e_name, lo = struct.unpack_from("<II", tdata, pos + step * i)
                    hi = struct.unpack_from("<I", tdata, pos + step * i + 8)[0] if kind == ENUM64 else 0
                    values.append((name(e_name), (hi << 32) | lo))
                    enumerators.setdefault(values[-1][0], values[-1][1])
                t.enumerators = tuple(values)
            pos += _EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen
            types[tid] = t
            tid += 1
        return cls(types, source, all_strs, enumerators)

    @classmethod
    def running(cls, modules: tuple[str, ...] = (), root: Path = BTF_DIR) -> "Btf":
        """vmlinux BTF, plus the split BTF of ``modules`` that are loaded (kvm, kvm_amd, ...)."""
        path = root / "vmlinux"
        try:
            btf = cls.parse(path.read_bytes(), str(path))
        except OSError as e:
            raise BtfError(f"{path}: {e.strerror} (a kernel built without CONFIG_DEBUG_INFO_BTF?)") from None
        for mod in modules:
            mpath = root / mod
            if mpath.exists():
                btf = cls.parse(mpath.read_bytes(), f"{btf.source}+{mod}", base=btf)
        return btf

    # --- lookups ---------------------------------------------------------------------------

    def find(self, kind: int, name: str) -> Type:
        tid = self._by_name.get((kind, name))
        if tid is None:
            raise BtfError(f"{self.source}: no {_KIND_NAMES.get(kind, kind)} {name!r} in this kernel's BTF")
        return self.types[tid]

    def has_struct(self, name: str) -> bool:
        return (STRUCT, name) in self._by_name

    def resolve(self, tid: int) -> Type:
        """Follow typedefs and qualifiers to the real type."""
        if tid == 0:
            return Type(0, 0, "void")
        t = self.types[tid]
        while t.kind in _QUALIFIERS:
            t = self.types[t.ref]
        return t

    def sizeof(self, tid_or_name: int | str) -> int:
        """sizeof() of a type id or a struct name."""
        t = self.find(STRUCT, tid_or_name) if isinstance(tid_or_name, str) else self.resolve(tid_or_name)
        if t.kind == ARRAY:
            return t.nelems * self.sizeof(t.ref)
        if t.kind == PTR:
            return 8
        return t.size

    def struct(self, name: str) -> "StructView":
        return StructView(self, self.find(STRUCT, name))

    def per_cpu_var(self, name: str) -> tuple[int, int]:
        """(VAR type id, offset in .data..percpu) of a per-CPU variable."""
        var = self.find(VAR, name)
        for t in self.types.values():
            if t.kind == DATASEC and t.name == ".data..percpu":
                for vid, off, _size in t.entries:
                    if vid == var.id:
                        return var.id, off
        raise BtfError(f"{name} is not a per-CPU variable in this kernel's BTF")

    def enum_value(self, name: str) -> int | None:
        """The value of an enumerator by name (``PGTY_slab``), or None where no enum has it."""
        return self.enumerators.get(name)


_KIND_NAMES = {STRUCT: "struct", UNION: "union", VAR: "variable", TYPEDEF: "typedef", ENUM: "enum"}


class StructView:
    """Member offsets of one struct, by dotted path: ``arch.pio_data``, ``buses[2]``."""

    def __init__(self, btf: Btf, t: Type) -> None:
        self.btf = btf
        self.type = t
        self.name = t.name
        self.size = t.size

    def member(self, path: str) -> tuple[int, int]:
        """(byte offset, type id) of ``path`` inside this struct."""
        t, off = self.type, 0
        for part in path.split("."):
            m = re.fullmatch(r"(\w+)(?:\[(\d+)\])?", part)
            if not m:
                raise BtfError(f"bad member path {path!r}")
            found = _find_member(self.btf, t, m.group(1))
            if found is None:
                raise BtfError(f"struct {self.name} has no member {path!r} in this kernel")
            bit, tid = found
            off += bit // 8
            if m.group(2) is not None:
                arr = self.btf.resolve(tid)
                if arr.kind != ARRAY:
                    raise BtfError(f"{self.name}.{path}: {m.group(1)} is not an array")
                off += int(m.group(2)) * self.btf.sizeof(arr.ref)
                tid = arr.ref
            t = self.btf.resolve(tid)
        return off, tid

    def offset(self, path: str) -> int:
        return self.member(path)[0]


def _find_member(btf: Btf, t: Type, name: str) -> tuple[int, int] | None:
    """(bit offset, type id) of member ``name``, looking through anonymous structs/unions."""
    for m in t.members:
        if m.name == name:
            return m.bit_offset, m.type
    for m in t.members:
        if not m.name:
            inner = btf.resolve(m.type)
            if inner.kind in (STRUCT, UNION):
                hit = _find_member(btf, inner, name)
                if hit is not None:
                    return m.bit_offset + hit[0], hit[1]
    return None



__all__ = ["BTF_DIR", "Btf", "BtfError", "Member", "StructView", "Type"]
