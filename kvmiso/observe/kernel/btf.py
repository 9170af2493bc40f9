"""The running kernel's BTF (``/sys/kernel/btf/vmlinux`` and each module's split BTF): struct
sizes and member offsets from the kernel itself, never from a header of another kernel (the
libbpf CO-RE habit). Pure parsing of bytes (Documentation/bpf/btf.rst), so a saved blob parses
the same way.

A kernel's BTF has some 130,000 types: one pass records where each type is and indexes the
names kvmiso looks up (structs, unions, enums, variables); a type's members are decoded the
first time it is asked for.

>>> btf = Btf.running()
>>> btf.sizeof("list_head")
16
>>> [(p.name, p.ctype) for p in btf.func("msleep")]
[('msecs', 'unsigned int')]
>>> btf.struct("kvm_vcpu").offset("arch.pio_data") > 0    # this kernel's own layout
True

(On 6.18.44-fc-v1300 that offset is 2128 and ``struct vcpu_pvm`` is 51,488 bytes; on Debian's
6.1 under ``kvmiso boot`` the offset is 2088, and KVM's own functions, ``kvm_mmu_page_fault``
among them, are in the kvm module's split BTF.)
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

BTF_DIR = Path("/sys/kernel/btf")
_MAGIC = 0xEB9F

# kinds (include/uapi/linux/btf.h)
INT, PTR, ARRAY, STRUCT, UNION, ENUM, FWD, TYPEDEF, VOLATILE, CONST, RESTRICT = range(1, 12)
FUNC, FUNC_PROTO, VAR, DATASEC, FLOAT, DECL_TAG, TYPE_TAG, ENUM64 = range(12, 20)
_QUALIFIERS = (TYPEDEF, VOLATILE, CONST, RESTRICT, TYPE_TAG)
_SIZED = (INT, STRUCT, UNION, ENUM, DATASEC, FLOAT, ENUM64)
_INDEXED = (STRUCT, UNION, ENUM, ENUM64, VAR, DATASEC, FUNC)  # kinds looked up by name
_EXTRA = {INT: 4, ARRAY: 12, VAR: 4, DECL_TAG: 4}  # bytes after btf_type, fixed
_PER_MEMBER = {STRUCT: 12, UNION: 12, ENUM: 8, FUNC_PROTO: 8, DATASEC: 12, ENUM64: 12}
_HEADER = struct.Struct("<III")


class BtfError(LookupError):
    """A BTF blob that does not parse, or a type/member the kernel does not have."""


@dataclass(frozen=True)
class Member:
    """A struct or union member: name, type id, offset in bits."""

    name: str
    type: int
    bit_offset: int


@dataclass(frozen=True)
class Type:
    """One BTF type: ``size`` for sized kinds, ``ref`` for pointers, qualifiers, arrays
    (element type), vars, a FUNC (its FUNC_PROTO) and a FUNC_PROTO (its return type);
    ``members`` for structs and unions, and a FUNC_PROTO's parameters (bit offset 0);
    ``nelems`` for arrays; ``entries`` (var id, offset, size) for a DATASEC; ``enumerators``
    for enums; ``kflag`` for a FWD (1: a union)."""

    id: int
    kind: int
    name: str
    size: int = 0
    ref: int = 0
    members: tuple[Member, ...] = ()
    nelems: int = 0
    entries: tuple[tuple[int, int, int], ...] = ()
    enumerators: tuple[tuple[str, int], ...] = ()
    kflag: int = 0


@dataclass(frozen=True)
class Param:
    """A parameter of a kernel function (its BTF FUNC_PROTO): name, type key, the C type as
    text, and the struct or union a pointer parameter points at ("" for any other type)."""

    name: str
    type: int
    ctype: str
    pointee: str


_VOID = Type(0, 0, "void")


class _Blob:
    """One BTF blob's records: where each type is, decoded on demand.

    A module's split BTF numbers its types after vmlinux's, and every module does so on its own,
    so type ids of two modules overlap: each blob is a *space*, and a type's key is
    ``space << 32 | id`` for a module's own types and the plain id for vmlinux's."""

    def __init__(self, blob: bytes, source: str, first_id: int, base_strings: bytes, space: int = 0) -> None:
        self.space = space
        if len(blob) < 24:
            raise BtfError(f"{source}: {len(blob)} bytes is too short for BTF")
        magic, _ver, _flags, hdr_len, type_off, type_len, str_off, str_len = struct.unpack_from("<HBBIIIII", blob)
        if magic != _MAGIC:
            raise BtfError(f"{source}: not BTF (magic {magic:#x})")
        self.tdata = blob[hdr_len + type_off: hdr_len + type_off + type_len]
        self.strings = base_strings + blob[hdr_len + str_off: hdr_len + str_off + str_len]
        self.first_id = first_id
        self.pos: list[int] = []
        self.names: dict[tuple[int, str], int] = {}
        tdata, pos, unpack = self.tdata, 0, _HEADER.unpack_from
        while pos < len(tdata):
            name_off, info, _ = unpack(tdata, pos)
            kind, vlen = (info >> 24) & 0x1F, info & 0xFFFF
            if name_off and kind in _INDEXED:
                self.names.setdefault((kind, self.name(name_off)), self.key(first_id + len(self.pos)))
            self.pos.append(pos)
            pos += 12 + _EXTRA.get(kind, 0) + _PER_MEMBER.get(kind, 0) * vlen

    def key(self, tid: int) -> int:
        """The key of type id ``tid`` as this blob refers to it (vmlinux's ids are shared)."""
        return tid if tid < self.first_id or not self.space else self.space << 32 | tid

    def name(self, off: int) -> str:
        if not off:
            return ""
        return self.strings[off:self.strings.find(b"\0", off)].decode(errors="replace")

    def type(self, key: int) -> Type:
        tid = key & 0xFFFFFFFF
        pos = self.pos[tid - self.first_id]
        name_off, info, size_or_type = _HEADER.unpack_from(self.tdata, pos)
        kind, vlen, kflag = (info >> 24) & 0x1F, info & 0xFFFF, info >> 31
        body, name = pos + 12, self.name(name_off)
        size, ref = (size_or_type, 0) if kind in _SIZED else (0, self.key(size_or_type) if size_or_type else 0)
        if kind == ARRAY:
            ref, _index, nelems = struct.unpack_from("<III", self.tdata, body)
            return Type(key, kind, name, ref=self.key(ref), nelems=nelems)
        if kind == FUNC_PROTO:
            ps = (struct.unpack_from("<II", self.tdata, body + 8 * i) for i in range(vlen))
            return Type(key, kind, name, ref=ref, members=tuple(Member(self.name(n), self.key(t), 0) for n, t in ps))
        if kind in (STRUCT, UNION):
            ms = []
            for i in range(vlen):
                m_name, m_type, m_off = struct.unpack_from("<III", self.tdata, body + 12 * i)
                ms.append(Member(self.name(m_name), self.key(m_type), m_off & 0xFFFFFF if kflag else m_off))
            return Type(key, kind, name, size=size, members=tuple(ms))
        if kind == DATASEC:
            entries = tuple(struct.unpack_from("<III", self.tdata, body + 12 * i) for i in range(vlen))
            return Type(key, kind, name, size=size, entries=tuple((self.key(v), o, n) for v, o, n in entries))
        if kind in (ENUM, ENUM64):
            step, values = _PER_MEMBER[kind], []
            for i in range(vlen):
                e_name, lo = struct.unpack_from("<II", self.tdata, body + step * i)
                hi = struct.unpack_from("<I", self.tdata, body + step * i + 8)[0] if kind == ENUM64 else 0
                values.append((self.name(e_name), (hi << 32) | lo))
            return Type(key, kind, name, size=size, enumerators=tuple(values))
        return Type(key, kind, name, size=size, ref=ref, kflag=kflag)


class Btf:
    """Types of vmlinux plus any module's split BTF (type ids continue after the base's)."""

    def __init__(self, blobs: list[_Blob], source: str) -> None:
        self._blobs = blobs
        self.source = source
        self._cache: dict[int, Type] = {}

    @classmethod
    def parse(cls, blob: bytes, source: str = "<btf>", base: "Btf | None" = None) -> "Btf":
        """Parse a BTF blob; ``base`` for a module's split BTF."""
        if base is None:
            return cls([_Blob(blob, source, 1, b"")], source)
        vmlinux = base._blobs[0]  # every module's BTF is split against vmlinux alone
        split = _Blob(blob, source, vmlinux.first_id + len(vmlinux.pos), vmlinux.strings, space=len(base._blobs))
        return cls([*base._blobs, split], f"{base.source}+{source}")

    @classmethod
    def running(cls, modules: tuple[str, ...] = (), root: Path = BTF_DIR) -> "Btf":
        """vmlinux BTF, plus the split BTF of ``modules`` that are loaded (kvm, kvm_amd, ...).
        Parsed once per process: the running kernel's types cannot change."""
        return _running(tuple(modules), root)

    # --- lookups ---------------------------------------------------------------------------

    def type(self, key: int) -> Type:
        """The type with key ``key`` (see :class:`_Blob`; decoded on first use)."""
        if key == 0:
            return _VOID
        t = self._cache.get(key)
        if t is None:
            space, tid = key >> 32, key & 0xFFFFFFFF
            b = self._blobs[space] if space < len(self._blobs) else None
            if b is None or not b.first_id <= tid < b.first_id + len(b.pos):
                raise BtfError(f"{self.source}: no type id {tid} (space {space})")
            t = self._cache[key] = b.type(key)
        return t

    def find(self, kind: int, name: str) -> Type:
        """The type of ``kind`` named ``name`` (BtfError where the kernel has none)."""
        for b in reversed(self._blobs):
            tid = b.names.get((kind, name))
            if tid is not None:
                return self.type(tid)
        raise BtfError(f"{self.source}: no {_KIND_NAMES.get(kind, kind)} {name!r} in this kernel's BTF")

    def has_struct(self, name: str) -> bool:
        """Does the kernel have ``struct name``?"""
        return any((STRUCT, name) in b.names for b in self._blobs)

    def resolve(self, tid: int) -> Type:
        """Follow typedefs and qualifiers to the real type."""
        t = self.type(tid)
        while t.kind in _QUALIFIERS:
            t = self.type(t.ref)
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
        """Member offsets of ``struct name``."""
        return _struct_view(self, name)

    def per_cpu_var(self, name: str) -> tuple[int, int]:
        """(VAR type id, offset in .data..percpu) of a per-CPU variable."""
        var = self.find(VAR, name)
        sec = self.find(DATASEC, ".data..percpu")
        for vid, off, _size in sec.entries:
            if vid == var.id:
                return var.id, off
        raise BtfError(f"{name} is not a per-CPU variable in this kernel's BTF")

    def func(self, name: str) -> tuple[Param, ...]:
        """The parameters of kernel function ``name`` from its BTF FUNC record (BtfError where
        the kernel's BTF has none: a build without them, or a function the compiler left out).
        Where two static functions share the name, the first record's."""
        proto = self.type(self.find(FUNC, name).ref)
        return tuple(Param(m.name, m.type, self.type_text(m.type), self._pointee(m.type)) for m in proto.members)

    def type_text(self, tid: int) -> str:
        """The C spelling of a type: ``struct kvm_vcpu *``, ``gpa_t``, ``const char *``."""
        t = self.type(tid)
        if t.kind == PTR:
            inner = self.type_text(t.ref)
            return inner + ("*" if inner.endswith("*") else " *")
        if t.kind == CONST:
            return "const " + self.type_text(t.ref)
        if t.kind == VOLATILE:
            return "volatile " + self.type_text(t.ref)
        if t.kind in (RESTRICT, TYPE_TAG):
            return self.type_text(t.ref)
        if t.kind in (STRUCT, UNION, ENUM, ENUM64, FWD):
            tag = {STRUCT: "struct", UNION: "union", FWD: "union" if t.kflag else "struct"}.get(t.kind, "enum")
            return f"{tag} {t.name}"
        if t.kind == FUNC_PROTO:
            return "function"
        if t.kind == ARRAY:
            return self.type_text(t.ref) + f"[{t.nelems}]"
        return t.name or "void"

    def _pointee(self, tid: int) -> str:
        t = self.resolve(tid)
        if t.kind != PTR:
            return ""
        p = self.resolve(t.ref)
        return p.name if p.kind in (STRUCT, UNION, FWD) else ""

    def enum_value(self, name: str) -> int | None:
        """The value of an enumerator by name (``PGTY_slab``), or None where no enum has it."""
        return _enumerators(self).get(name)


_KIND_NAMES = {STRUCT: "struct", UNION: "union", VAR: "variable", TYPEDEF: "typedef", ENUM: "enum",
               DATASEC: "section", FUNC: "function"}


@lru_cache(maxsize=4)
def _running(modules: tuple[str, ...], root: Path) -> Btf:
    path = root / "vmlinux"
    try:
        btf = Btf.parse(path.read_bytes(), str(path))
    except OSError as e:
        raise BtfError(f"{path}: {e.strerror} (a kernel built without CONFIG_DEBUG_INFO_BTF?)") from None
    for mod in modules:
        mpath = root / mod
        if mpath.exists():
            btf = Btf.parse(mpath.read_bytes(), mod, base=btf)
    return btf


def _enumerators(btf: Btf) -> dict[str, int]:
    cached = getattr(btf, "_enum_values", None)
    if cached is None:
        cached = {}
        for b in btf._blobs:
            for (kind, _name), tid in b.names.items():
                if kind in (ENUM, ENUM64):
                    for n, v in btf.type(tid).enumerators:
                        cached.setdefault(n, v)
        btf._enum_values = cached  # type: ignore[attr-defined]
    return cached


class StructView:
    """Member offsets of one struct, by dotted path: ``arch.pio_data``, ``buses[2]``."""

    def __init__(self, btf: Btf, t: Type) -> None:
        self.btf = btf
        self.type = t
        self.name = t.name
        self.size = t.size
        self._paths: dict[str, tuple[int, int]] = {}

    def member(self, path: str) -> tuple[int, int]:
        """(byte offset, type id) of ``path`` inside this struct."""
        hit = self._paths.get(path)
        if hit is not None:
            return hit
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
        self._paths[path] = (off, tid)
        return off, tid

    def offset(self, path: str) -> int:
        """The byte offset of ``path`` (``arch.pio_data``) inside the struct."""
        return self.member(path)[0]


def _struct_view(btf: Btf, name: str) -> StructView:
    views = btf.__dict__.setdefault("_views", {})
    view = views.get(name)
    if view is None:
        view = views[name] = StructView(btf, btf.find(STRUCT, name))
    return view


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


__all__ = ["BTF_DIR", "Btf", "BtfError", "Member", "Param", "StructView", "Type"]
