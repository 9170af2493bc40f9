"""What a recorded access touched: the object (in the access model's names), the member (from the
guest's BTF; a per-CPU variable from kallsyms, which lists them at their unit offsets), and where
the object's address comes from.

Objects are the VM's real objects of the same boot (the evidence's regions: ``vcpu_struct``,
``vmcb``, ``kvm_run_page`` ...). Where none holds the address, the kernel's map names what it
can: the kernel's and KVM's global data (``kernel_data``, with the kallsyms variable), a
``struct page`` in vmemmap (``struct_page``), the cpu_entry_area, user memory, guest memory
through its direct-map alias (``guest_memory``, member ``(direct-map alias)``); an address in
the direct map or vmalloc space that no object of the evidence covers is *unplaced*
(``direct_map?``, ``vmalloc?``): an object kvmiso does not read (a shadow page's header, a TDP
table below the root, another slab object), never guessed.

>>> namer = AccessNamer(layout, symbols, fields)                              # doctest: +SKIP
>>> namer.name(0xffff8f52430e01a8)                                           # doctest: +SKIP
Named(object='vcpu_struct', member='vcpu.arch.regs[2]', offset=424, source='bpf: ...')
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..observe.kernel.btffields import field_at
from ..observe.kernel.kallsyms import Symbols
from .layout import Layout, Region

# Sections and map areas, named as the access model names what lies there.
AREA_OBJECT = {"text": "kernel_data", "kernel_data": "kernel_data", "kernel_image": "kernel_data",
               "vmemmap": "struct_page", "direct_map": "direct_map?", "vmalloc": "vmalloc?", "user": "user_memory"}
UNPLACED = frozenset({"direct_map?", "vmalloc?", "?"})
# Objects of a family kvmiso reads one of per index (memslot:0, rmap:0): the model names the family.
FAMILIES = ("memslot", "rmap", "lpage_info", "guest_memory")


@dataclass(frozen=True)
class Named:
    """One address, named: the object, the member at ``offset`` in it ("" where none is known),
    and where the object's address comes from."""

    object: str
    member: str
    offset: int
    source: str

    @property
    def placed(self) -> bool:
        """Is the object known (not an address no object of the evidence covers)?"""
        return self.object not in UNPLACED

    def text(self) -> str:
        """``vcpu_struct+0x1a8 vcpu.arch.regs[2]``, or the object alone."""
        at = f"{self.object}+{self.offset:#x}" if self.offset or self.member else self.object
        return f"{at} {self.member}" if self.member else at


class AccessNamer:
    """Names addresses against one VM's layout, the guest's kallsyms and its BTF members
    (``fields``: fields.json as :mod:`kvmiso.observe.accesses.recordruns` describes it; None: no members)."""

    def __init__(self, layout: Layout, symbols: Symbols, fields: dict[str, Any] | None = None,
                 aliases: list[tuple[str, int, int]] = ()) -> None:
        """``aliases``: (region, start, end) of the direct-map alias of each user page the
        evidence knows (guest memory's, as :class:`.mapset.DenylistSpace` finds them): the
        kernel reaches guest memory there too (a new page is cleared through it)."""
        self.layout = layout
        self.aliases = sorted((s, e, name.split(" ", 1)[0]) for name, s, e in aliases)
        self.symbols = symbols
        self.types = (fields or {}).get("types", {})
        self.ctypes = {o.name: o.ctype for o in layout.evidence.objects}
        self._cache: dict[tuple[int, int], Named] = {}

    def name(self, addr: int, size: int = 0) -> Named:
        """The object, member and source of ``addr`` (an access of ``size`` bytes: where members
        overlap, the one of that size)."""
        hit = self._cache.get((addr, size))
        if hit is None:
            hit = self._cache[(addr, size)] = self._name(addr, size)
        return hit

    def _name(self, addr: int, size: int) -> Named:
        for s, e, region in self.aliases:
            if s <= addr < e:
                family = region.split(":", 1)[0]
                return Named(family if family in FAMILIES else region, "(direct-map alias)", addr - s,
                             "the live table: the direct-map address of a page of the user mapping")
        r = self.layout.find(addr)
        if r is None:
            module = self.symbols.module_at(addr)
            return Named("kernel_data", self._variable(addr), 0, f"kallsyms: [{module}]") if module else \
                Named("?", "", 0, "no region of the layout")
        if r.kind in ("object", "user"):
            return self._object(r, addr, size)
        obj = AREA_OBJECT.get(r.name, "kernel_data" if r.name.endswith("_module") else r.name)
        member = self._variable(addr) if obj == "kernel_data" else ""
        return Named(obj, member, 0, r.source)

    def _object(self, r: Region, addr: int, size: int) -> Named:
        start = next(s for s, e in r.ranges if s <= addr < e)
        offset = addr - start
        family = r.name.split(":", 1)[0]
        obj = family if family in FAMILIES else r.name
        if r.name == "percpu_area":
            hit = self.symbols.percpu_var(offset)
            member = (f"{hit[0]}+{hit[1]:#x}" if hit[1] else hit[0]) if hit else ""
        else:
            flat = self.types.get(self.ctypes.get(r.name, ""))
            member = field_at(flat, offset, size) if flat else ""
        return Named(obj, member, offset, r.source)

    def _variable(self, addr: int) -> str:
        hit = self.symbols.resolve_data(addr)
        return f"{hit[0]}+{hit[1]:#x}" if hit and hit[1] else (hit[0] if hit else "")


__all__ = ["AREA_OBJECT", "AccessNamer", "FAMILIES", "Named", "UNPLACED"]
