"""Marks in an access record, made from user mode: this process runs two 7-byte NOPs, the first
with the displacement "KVMI", the second with the mark's ID, and the record's TCG plugin
(kvmiso/boot/record/accesses.c) writes a mark with that ID in the order of the windows. Where no
plugin watches (any machine but ``kvmiso boot --record-accesses``), the NOPs do nothing.

``kvmiso record`` marks the end of each guest run: a run's windows are those after the mark
before it, and the next VM may sit at the same addresses (slab and page allocators reuse what
the last VM freed), so no address could tell them apart.

>>> mark(3)                                    # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import mmap

MARK_NOP = bytes.fromhex("0f1f804b564d49")  # nopl 0x494d564b(%rax): "KVMI"
ID_NOP = bytes.fromhex("0f1f80")  # nopl ID(%rax), the ID little-endian after it
RET = b"\xc3"
SLOT = 16  # bytes per mark's code: the two NOPs and RET
MAX_ID = 0x7FFF_FFFF
PAUSES = 1 << 31  # the plugin keeps no access after this mark until the next mark without it


def mark_code(mark_id: int) -> bytes:
    """The instructions of mark ``mark_id``: the two NOPs, then RET (it is called)."""
    if not 0 <= mark_id <= 0xFFFF_FFFF:
        raise ValueError(f"a mark's ID is a u32, not {mark_id}")
    return MARK_NOP + ID_NOP + mark_id.to_bytes(4, "little") + RET


class _Marker:
    """One executable page; each mark writes its code into the next slot and calls it. QEMU
    translates a slot again when its bytes change (it watches pages it translated code
    from), and the slots turn round only after 256 marks."""

    def __init__(self) -> None:
        self.page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        self.base = ctypes.addressof(ctypes.c_char.from_buffer(self.page))
        self.next = 0

    def __call__(self, mark_id: int) -> None:
        code = mark_code(mark_id)
        at = self.next
        self.next = (self.next + SLOT) % mmap.PAGESIZE
        self.page[at:at + len(code)] = code
        ctypes.CFUNCTYPE(None)(self.base + at)()


_marker: _Marker | None = None


def mark(mark_id: int, pause: bool = False) -> None:
    """Put mark ``mark_id`` (up to 2**31 - 1) in the access record, if one is being made;
    ``pause``: keep no access after it (only count them) until the next mark without it."""
    global _marker
    if not 0 <= mark_id <= MAX_ID:
        raise ValueError(f"a mark's ID is 0 to {MAX_ID:#x}, not {mark_id}")
    if _marker is None:
        _marker = _Marker()
    _marker(mark_id | (PAUSES if pause else 0))


__all__ = ["MARK_NOP", "mark", "mark_code"]
