"""Where page-table frames live: a bytearray (the model's own tables), a VM's guest-physical
memory (tables a vCPU can load into CR3), or frames captured from the live kernel.

>>> from kvmiso.isolation import PageTable
>>> slot = vm.add_memory(0x40000000, 1 << 20)                # 1 MiB beside the guest's RAM
>>> pt = PageTable(GuestStore(vm, 0x40000000, 1 << 20))       # tables a vCPU can load into CR3
>>> pt.map(0x7000000000, 0, 4096)
>>> hex(pt.root), pt.translate(0x7000000123).phys
('0x40000000', 291)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:  # only its type: isolation opens no device
    from ..kvm import Vm

PAGE_SIZE = 4096


class PageTableError(ValueError):
    """A mapping request the hardware format cannot express, with the address at fault."""

    def __init__(self, message: str, address: int | None = None) -> None:
        super().__init__(message)
        self.address = address


class FrameStore(Protocol):
    """Physical memory that page-table frames live in."""

    def read(self, pa: int, length: int) -> bytes:
        """``length`` bytes at physical ``pa``."""

    def write(self, pa: int, data: bytes) -> None:
        """Write ``data`` at physical ``pa``."""

    def alloc(self) -> int:
        """A zeroed frame: its physical address."""


class _FramePool:
    """Hands out zeroed frames from physical [base, end) in order; subclasses read and write."""

    def __init__(self, base: int, size: int) -> None:
        self.base, self._end, self._next = base, base + size, base

    def read(self, pa: int, length: int) -> bytes:
        raise NotImplementedError

    def write(self, pa: int, data: bytes) -> None:
        raise NotImplementedError

    def alloc(self) -> int:
        if self._next + PAGE_SIZE > self._end:
            raise PageTableError(f"frame pool [{self.base:#x}, {self._end:#x}) is full")
        pa, self._next = self._next, self._next + PAGE_SIZE
        self.write(pa, bytes(PAGE_SIZE))
        return pa


class ByteStore(_FramePool):
    """Frames in a bytearray at physical ``base``."""

    def __init__(self, size: int, base: int = 0) -> None:
        super().__init__(base, size)
        self.mem = bytearray(size)

    def read(self, pa: int, length: int) -> bytes:
        """``length`` bytes at physical ``pa``."""
        off = pa - self.base
        if off < 0 or off + length > len(self.mem):
            raise PageTableError(f"physical {pa:#x} is outside the frame store", pa)
        return bytes(self.mem[off : off + length])

    def write(self, pa: int, data: bytes) -> None:
        """Write ``data`` at physical ``pa``."""
        off = pa - self.base
        if off < 0 or off + len(data) > len(self.mem):
            raise PageTableError(f"physical {pa:#x} is outside the frame store", pa)
        self.mem[off : off + len(data)] = data


class GuestStore(_FramePool):
    """Frames in a VM's guest-physical memory [base, base + size), through Vm.read/write
    (a :class:`kvmiso.kvm.Vm`): tables a vCPU can load into CR3."""

    def __init__(self, vm: Vm, base: int, size: int) -> None:
        vm.slot_for(base, size)  # the whole pool must be backed: fail now, not mid-build
        super().__init__(base, size)
        self.vm = vm

    def read(self, pa: int, length: int) -> bytes:
        """``length`` bytes of guest memory at guest-physical ``pa``."""
        return self.vm.read(pa, length)

    def write(self, pa: int, data: bytes) -> None:
        """Write ``data`` to guest memory at guest-physical ``pa``."""
        self.vm.write(pa, data)


class SnapshotStore:
    """Page-table frames captured from a live kernel (read-only, by physical address), plus
    frames the model allocates for tables of its own above every real physical address.

    Reading a frame the capture does not hold is an error naming it: the evidence did not walk
    there, and guessing its contents would make a verdict up.
    """

    def __init__(self, frames: dict[int, bytes], model_base: int = 1 << 51) -> None:
        self.captured = frames
        self._own: dict[int, bytearray] = {}
        self._next = model_base

    def _frame(self, pa: int) -> bytes | bytearray:
        base = pa & ~(PAGE_SIZE - 1)
        f = self._own.get(base)
        if f is None:
            f = self.captured.get(base)
        if f is None:
            raise PageTableError(f"the evidence holds no page-table page at physical {base:#x}", pa)
        return f

    def read(self, pa: int, length: int) -> bytes:
        """``length`` bytes at physical ``pa``, from a captured or a model frame."""
        off = pa & (PAGE_SIZE - 1)
        return bytes(self._frame(pa)[off:off + length])

    def write(self, pa: int, data: bytes) -> None:
        """Write into a frame the model allocated (a captured frame is refused)."""
        base = pa & ~(PAGE_SIZE - 1)
        if base not in self._own:
            raise PageTableError(f"physical {base:#x} is a captured kernel page-table page: never written", pa)
        off = pa - base
        self._own[base][off:off + len(data)] = data

    def alloc(self) -> int:
        """A zeroed frame of the model's own, above every real physical address."""
        pa, self._next = self._next, self._next + PAGE_SIZE
        self._own[pa] = bytearray(PAGE_SIZE)
        return pa


__all__ = ["ByteStore", "FrameStore", "GuestStore", "PAGE_SIZE", "PageTableError", "SnapshotStore"]
