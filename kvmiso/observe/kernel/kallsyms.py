"""/proc/kallsyms, parsed: function names for the return addresses of call chains, image and
module spans. Pure parsing of the text (tests feed saved copies); :func:`read_kallsyms` reads
the running kernel's.

Without CONFIG_KALLSYMS_ALL the kernel lists only code symbols (and a few section markers):
data such as ``page_offset_base`` or ``__per_cpu_offset`` is absent, which is why kvmiso reads
those facts through BPF instead.
"""

from __future__ import annotations

import bisect
import re
from functools import lru_cache
from pathlib import Path

KALLSYMS = "/proc/kallsyms"
PAGE = 4096
START_KERNEL_MAP = 0xFFFF_FFFF_8000_0000  # __START_KERNEL_map


def _page_up(a: int) -> int:
    return (a + PAGE - 1) & ~(PAGE - 1)


class Symbols:
    """/proc/kallsyms: name -> address, and address -> the symbol at or below it.

    Addresses stay the fixed-width hex strings kallsyms prints until asked for (sorting those
    strings sorts the addresses), which keeps reading 120k symbols cheap.

    >>> syms = read_kallsyms()                    # needs root: real addresses
    >>> syms.resolve(syms.address("kvm_fast_pio") + 0x10)
    ('kvm_fast_pio', 16)
    """

    def __init__(self, entries: list[tuple[str, str, str, str]]) -> None:
        """``entries``: (address in hex, type letter, name, module or "") as kallsyms lists them."""
        self._entries = entries
        # reversed, so that the first of several same-named symbols (static functions) wins
        self._by_name: dict[str, str] = {n: a for a, _, n, _ in reversed(entries)}
        self._addrs: list[int] = []
        self._names: list[str] = []
        # a module's per-CPU variables are listed as offsets (0x35000): only its code and data
        # addresses, in the module area above __START_KERNEL_map, give its span
        mods = [(int(a, 16), m) for a, _, _, m in entries if m and int(a, 16) >= START_KERNEL_MAP]
        self.module_low = min((a for a, _ in mods), default=None)
        top = max((a for a, _, _, m in entries if not m and len(a) == 16 and a >= f"{START_KERNEL_MAP:x}"), default=None)
        self.image_high = int(top, 16) if top else None
        self._modules: dict[str, tuple[int, int]] = {}
        for a, m in mods:
            lo, hi = self._modules.get(m, (a, a))
            self._modules[m] = (min(lo, a), max(hi, a))

    def __len__(self) -> int:
        return len(self._by_name)

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def address(self, name: str) -> int:
        """The address of ``name`` (KeyError where the kernel has none)."""
        try:
            return int(self._by_name[name], 16)
        except KeyError:
            raise KeyError(f"the running kernel has no symbol {name!r}") from None

    def get(self, name: str) -> int | None:
        """The address of ``name``, or None."""
        a = self._by_name.get(name)
        return int(a, 16) if a is not None else None

    def module_span(self, module: str) -> tuple[int, int] | None:
        """[first, last symbol + a page) of a loaded module's symbols, page-aligned."""
        span = self._modules.get(module)
        return (span[0] & ~(PAGE - 1), _page_up(span[1] + 1)) if span else None

    def module_at(self, addr: int) -> str | None:
        """The loaded module whose symbols' span holds ``addr``, or None (the kernel image, or
        no module).

        >>> syms = read_kallsyms()                # needs root: real addresses
        >>> print(syms.module_at(syms.address("schedule")))
        None

        (``syms.module_at(syms.address("npf_interception"))`` is ``'kvm_amd'`` on an AMD host.)
        """
        for name in self._modules:
            lo, hi = self.module_span(name)
            if lo <= addr < hi:
                return name
        return None

    def resolve(self, addr: int) -> tuple[str, int] | None:
        """(function, offset) of the code symbol at or below ``addr``."""
        self._index_code()
        i = bisect.bisect_right(self._addrs, addr) - 1
        return (self._names[i], addr - self._addrs[i]) if i >= 0 else None

    def resolve_data(self, addr: int) -> tuple[str, int] | None:
        """(variable, offset) of the data symbol at or below ``addr`` (kallsyms lists data with
        CONFIG_KALLSYMS_ALL only; a module's per-CPU offsets are not addresses and are left out)."""
        if not hasattr(self, "_data_addrs"):
            data = sorted((int(a, 16), n) for a, t, n, _ in self._entries if t in "DdBbRr" and a >= f"{START_KERNEL_MAP:x}")
            self._data_addrs = [a for a, _ in data]
            self._data_names = [n for _, n in data]
        i = bisect.bisect_right(self._data_addrs, addr) - 1
        return (self._data_names[i], addr - self._data_addrs[i]) if i >= 0 else None

    def percpu_var(self, offset: int) -> tuple[str, int] | None:
        """(variable, offset) of the kernel's per-CPU variable at ``offset`` in a CPU's unit:
        kallsyms lists them at their offsets (``0000000000000000 A fixed_percpu_data``). Past
        ``__per_cpu_end`` lies the unit's dynamic part (modules' per-CPU variables, alloc_percpu),
        which kallsyms does not list at unit offsets: ``("(dynamic)", offset past the end)``."""
        if not hasattr(self, "_pcpu_addrs"):
            pcpu = sorted((int(a, 16), n) for a, t, n, m in self._entries
                          if not m and t in "Aa" and a < f"{START_KERNEL_MAP:x}" and not n.startswith("__per_cpu"))
            self._pcpu_addrs = [a for a, _ in pcpu]
            self._pcpu_names = [n for _, n in pcpu]
        end = self.get("__per_cpu_end")
        if end is not None and end < START_KERNEL_MAP and offset >= end:
            return "(dynamic)", offset - end
        i = bisect.bisect_right(self._pcpu_addrs, offset) - 1
        return (self._pcpu_names[i], offset - self._pcpu_addrs[i]) if i >= 0 else None

    def code_size(self, name: str) -> int:
        """Bytes from the function ``name`` to the next code symbol (its size, padding included)."""
        self._index_code()
        a = self.get(name)
        if a is None:
            return 0
        i = bisect.bisect_right(self._addrs, a)
        return self._addrs[i] - a if i < len(self._addrs) else 0

    def _index_code(self) -> None:
        if not self._addrs:
            # __pfx_ symbols are the padding before a function (CONFIG_FUNCTION_PADDING): never a name
            code = sorted((a, n) for a, t, n, _ in self._entries if t in "TtWw" and not n.startswith("__pfx_"))
            self._addrs = [int(a, 16) for a, _ in code]
            self._names = [n for _, n in code]


_KALLSYMS_LINE = re.compile(r"^([0-9a-fA-F]+) (\w) (\S+)(?:\s+\[(\S+)\])?[ \t]*$", re.M)


def parse_kallsyms(text: str) -> Symbols | None:
    """Symbols from kallsyms text, or None when the addresses are hidden (all zero).

    Module symbols (``[module]``) are kept: a KVM built as a module lives there.
    """
    entries = _KALLSYMS_LINE.findall(text)  # x86-64 prints 16 lowercase hex digits: sortable as text
    if not any(a.strip("0") for a, _, _, _ in entries):
        return None
    return Symbols(entries)


@lru_cache(maxsize=2)
def read_kallsyms(path: str | Path = KALLSYMS) -> Symbols | None:
    """The running kernel's symbols, or None where the addresses are hidden or unreadable.
    Read once per process (120,000 lines; modules do not come and go under kvmiso)."""
    try:
        return parse_kallsyms(Path(path).read_text())
    except OSError:
        return None


__all__ = ["KALLSYMS", "Symbols", "parse_kallsyms", "read_kallsyms"]
