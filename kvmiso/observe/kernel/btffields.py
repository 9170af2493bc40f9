"""Which member of an object an offset falls in, from the kernel's BTF: ``struct vcpu_svm`` at
0x1a8 is ``vcpu.arch.regs[2]``. The members of each C type are flattened once, in the guest
whose BTF they are (``kvmiso record`` writes them into the record folder as ``fields.json``), and
looked up later anywhere: the host that reads a record runs another kernel.

A flattened type is a list of ``[offset, size, path, element size]`` leaves in offset order;
an array of scalars is one leaf whose element size gives the index (``arch.regs[2]``); an array of
up to 64 structs is expanded element by element, a longer one is one leaf (its index only).

>>> fields = {"vcpu_svm": flatten(btf, "struct vcpu_svm")}           # doctest: +SKIP
>>> field_at(fields["vcpu_svm"], 0x1a8)                                # doctest: +SKIP
'vcpu.arch.regs[2]'
"""

from __future__ import annotations

import bisect
import re
from typing import Any

from .btf import ARRAY, STRUCT, UNION, Btf, BtfError

MAX_EXPANDED = 64  # struct array elements expanded one by one
_CTYPE = re.compile(r"struct (\w+)(?:\[(\d*)\])?")

Leaf = list  # [offset, size, path, element size (0: not an array)]


def flatten(btf: Btf, ctype: str) -> dict[str, Any] | None:
    """The leaves of ``ctype`` as kvmiso names an object's type (``struct kvm_run``,
    ``struct kvm_cpuid_entry2[30]``, ``struct kvm_io_bus + 0 ranges``), with its size and, for an
    array, the element size; None for a type that is no struct (a page, guest RAM)."""
    m = _CTYPE.match(ctype)
    if not m:
        return None
    try:
        t = btf.find(STRUCT, m.group(1))
    except BtfError:
        return None
    leaves: list[Leaf] = []
    _walk(btf, t.id, 0, "", leaves)
    leaves.sort(key=lambda x: (x[0], -x[1]))
    return {"size": t.size, "element": t.size if m.group(2) is not None else 0, "fields": leaves}


def _walk(btf: Btf, tid: int, off: int, path: str, out: list[Leaf]) -> None:
    t = btf.resolve(tid)
    if t.kind in (STRUCT, UNION):
        for mem in t.members:
            name = f"{path}.{mem.name}" if path and mem.name else (mem.name or path)
            _walk(btf, mem.type, off + mem.bit_offset // 8, name, out)
        return
    if t.kind == ARRAY:
        elem = btf.sizeof(t.ref)
        if btf.resolve(t.ref).kind in (STRUCT, UNION) and t.nelems <= MAX_EXPANDED:
            for i in range(t.nelems):
                _walk(btf, t.ref, off + i * elem, f"{path}[{i}]", out)
        else:
            out.append([off, t.nelems * elem, f"{path}[]", elem])
        return
    out.append([off, btf.sizeof(tid), path, 0])


def field_at(flat: dict[str, Any], offset: int, size: int = 0) -> str:
    """The member at ``offset`` of a flattened type: its path, ``[i]`` for an array's element,
    and ``+N`` where the offset is inside a leaf; "" outside every member (padding). Where
    members overlap (unions, bitfields), the first declared that starts there with the access's
    ``size``, else the innermost."""
    prefix = ""
    if flat.get("element"):
        prefix, offset = f"[{offset // flat['element']}]", offset % flat["element"]
    leaves = flat["fields"]
    i = bisect.bisect_right(leaves, offset, key=lambda x: x[0]) - 1
    # leaves overlap where unions and bitfields are: the latest-starting leaf that holds the
    # offset is the innermost member; none within reach is padding
    holding = [leaves[j] for j in range(i, max(-1, i - 64), -1)
               if leaves[j][0] <= offset < leaves[j][0] + max(leaves[j][1], 1)]
    if not holding:
        return prefix
    exact = [x for x in holding if x[0] == offset and x[1] == size]  # the first declared of them last
    start, width, path, elem = exact[-1] if exact else holding[0]
    rel = offset - start
    if elem:
        path, rel = path[:-2] + f"[{rel // elem}]", rel % elem
    name = prefix + ("." if prefix and path else "") + path
    return name + (f"+{rel}" if rel else "")


__all__ = ["field_at", "flatten"]
