"""Vm: a KVM VM fd, its memory slots and vCPUs."""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from . import abi
from ._fd import (FdOwner, close_all, eventfd_into, fd_cell, ioctl_into, map_into, mapping_cell, release_fd,
                  release_mapping)
from ._libc import get_errno, ioctl, raw_ioctl
from .errors import KvmError, VmDead
from .stats import Stats
from .vcpu import Vcpu

if TYPE_CHECKING:  # Kvm makes Vms: a runtime import would be a cycle
    from .system import Kvm

PAGE_SIZE = 4096


@dataclass
class MemorySlot:
    """One KVM memory slot, backed by an anonymous mapping owned by the VM, or (``owned`` False)
    by memory the caller gave :meth:`Vm.add_memory` and frees itself.

    ``view`` is a writable memoryview of the host memory; it is released with the slot.
    """

    slot: int
    guest_phys_addr: int
    size: int
    host_addr: int
    flags: int
    view: memoryview = field(repr=False)
    owned: bool = True
    _export: Any = field(default=None, repr=False, compare=False)  # holds the caller's buffer while in use
    _mapping: Any = field(default=None, repr=False, compare=False)  # the VM's mapping's cell (kvm._fd.mapping_cell)

    def _release(self) -> None:
        """Release the view, then unmap the memory where the VM mapped it."""
        self.view.release()  # first: no access through it once the memory is gone
        self._export = None
        if self._mapping is not None:
            release_mapping(self._mapping)

    @property
    def end(self) -> int:
        """The first guest-physical address past the slot."""
        return self.guest_phys_addr + self.size

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether ``[gpa, gpa + length)`` lies inside the slot."""
        return self.guest_phys_addr <= gpa and gpa + length <= self.end


@dataclass(frozen=True)
class MsrFilterRange:
    """One range of :meth:`Vm.set_msr_filter` (``struct kvm_msr_filter_range``): ``nmsrs`` MSRs
    (default: every bit of ``bitmap``) from index ``base``, whose ``flags`` accesses
    (``abi.KVM_MSR_FILTER_READ``, ``_WRITE``) KVM handles where ``bitmap``'s bit is 1 and denies
    where it is 0 (bit n of byte n // 8: MSR ``base + n``)."""

    flags: int
    base: int
    bitmap: bytes
    nmsrs: int | None = None

    @classmethod
    def allowing(cls, flags: int, base: int, nmsrs: int, deny: Iterable[int] = ()) -> "MsrFilterRange":
        """``nmsrs`` MSRs from ``base``, every one allowed but those in ``deny``."""
        bitmap = bytearray(b"\xff" * ((nmsrs + 7) // 8))
        for msr in deny:
            bitmap[(msr - base) // 8] &= ~(1 << (msr - base) % 8)
        return cls(flags, base, bytes(bitmap), nmsrs)


def _export(memory: Any, size: int) -> ctypes.Array:
    """A ctypes view of the caller's ``memory`` (which it keeps exported, so it cannot be freed
    or resized meanwhile) of ``size`` bytes; ValueError where that cannot back a memory slot."""
    try:
        buf = (ctypes.c_char * size).from_buffer(memory)
    except (TypeError, ValueError) as e:
        raise ValueError(f"memory for a slot must be a writable buffer of at least {size:#x} bytes: {e}") from None
    if ctypes.addressof(buf) % PAGE_SIZE:
        raise ValueError(f"memory for a slot must start on a {PAGE_SIZE}-byte page (an mmap does), "
                         f"not at {ctypes.addressof(buf):#x}")
    return buf


class Vm(FdOwner):
    """A KVM VM. Created by :meth:`Kvm.create_vm`; a context manager that closes every vCPU,
    unmaps every memory slot and closes every eventfd it made.

    >>> from kvmiso import Kvm
    >>> with Kvm() as kvm, kvm.create_vm() as vm:
    ...     slot = vm.add_memory(0, 2 << 20)
    ...     vcpu = vm.create_vcpu(0)
    >>> slot
    MemorySlot(slot=0, guest_phys_addr=0, size=2097152, host_addr=..., flags=0, owned=True)
    """

    def __init__(self, kvm: Kvm, fd: Any) -> None:
        """``fd``: the cell (``kvm._fd.fd_cell``) that KVM_CREATE_VM made the VM fd into."""
        self.kvm = kvm
        self.pid = os.getpid()  # KVM refuses the VM's ioctls from any other process
        self._fd = fd
        self.slots: dict[int, MemorySlot] = {}
        self.vcpus: list[Vcpu] = []
        self._eventfds: list[Any] = []  # their C cells (kvm._fd.fd_cell)

    def _release(self) -> None:
        """Close every vCPU, the VM fd, then unmap the memory and close the eventfds. A Ctrl-C
        meanwhile goes up once all of it is released."""
        # the kernel drops the slots with the VM; then the backing can go
        close_all(*(v.close for v in self.vcpus), functools.partial(release_fd, self._fd),
                  *(s._release for s in self.slots.values()),
                  *(functools.partial(release_fd, efd) for efd in self._eventfds))
        self.vcpus.clear()
        self.slots.clear()
        self._eventfds.clear()

    def ioctl(self, request: int, arg: int | ctypes._CData | None = None,
              explain: Callable[[int], str] | None = None, fd: int | None = None) -> int:
        """ioctl(2) on the VM fd, or on ``fd`` (one of its vCPUs'): a KvmError naming the request,
        VmDead where KVM refuses the VM itself (:meth:`diagnose`). Also the escape for any VM
        ioctl kvmiso does not wrap (see :meth:`Kvm.ioctl`): selftests' ``vm_ioctl``.

        >>> vm.ioctl(abi.KVM_SET_NR_MMU_PAGES, 64)
        0
        """
        try:
            return ioctl(self.fd if fd is None else fd, request, arg, explain)
        except KvmError as e:
            raise self.diagnose(e) from None

    def make_fd(self, request: int, arg: int, into: Any, fd: int | None = None) -> None:
        """An ioctl on the VM fd (or ``fd``) that makes an fd (KVM_CREATE_VCPU, KVM_GET_STATS_FD),
        put straight into the cell ``into``; errors as :meth:`ioctl`'s."""
        try:
            ioctl_into(into, self.fd if fd is None else fd, request, arg)
        except KvmError as e:
            raise self.diagnose(e) from None

    def diagnose(self, e: KvmError) -> KvmError:
        """``e``, or VmDead in its place: an EIO after which KVM_CHECK_EXTENSION on the VM fd
        fails with EIO too, as kvm_util checks (a live VM always answers it)."""
        if e.errno != errno.EIO or not self._refused():
            return e
        if os.getpid() != self.pid:
            return VmDead(e.ioctl, errno.EIO, f"this process ({os.getpid()}) did not create the VM (process {self.pid} "
                          "did): KVM refuses every ioctl of a VM from another process, a fork's child included")
        return VmDead(e.ioctl, errno.EIO, "KVM killed the VM (a KVM_BUG_ON, or a guest error it cannot recover "
                      "from) and refuses every ioctl of it now; the kernel log says why")

    def _refused(self) -> bool:
        """Whether KVM refuses the VM's own KVM_CHECK_EXTENSION with EIO."""
        return raw_ioctl(self.fd, abi.KVM_CHECK_EXTENSION, abi.capability_number("USER_MEMORY")) < 0 \
            and get_errno() == errno.EIO

    # --- memory -------------------------------------------------------------------------------

    def add_memory(self, guest_phys_addr: int, size: int, slot: int | None = None,
                   readonly: bool = False, log_dirty: bool = False, memory: Any = None) -> MemorySlot:
        """Back ``size`` bytes at ``guest_phys_addr`` with fresh anonymous memory (one slot), or
        with the first ``size`` bytes of ``memory``: a writable, page-aligned buffer the caller
        owns (an ``mmap.mmap``, say, of a file or with MAP_NORESERVE), held while the slot lives
        and never unmapped by the VM.

        Overlapping or misaligned slots are refused with a message naming the cause.

        >>> import mmap
        >>> buf = mmap.mmap(-1, 2 << 20)
        >>> vm.add_memory(0xc0000000, 2 << 20, slot=10, memory=buf)
        MemorySlot(slot=10, guest_phys_addr=3221225472, size=2097152, host_addr=..., flags=0, owned=False)
        """
        self._check_place(guest_phys_addr, size)
        if slot is None:
            slot = next(i for i in range(len(self.slots) + 1) if i not in self.slots)
        elif slot in self.slots:
            raise ValueError(f"memory slot {slot} is already in use")
        flags = (abi.KVM_MEM_READONLY if readonly else 0) | (abi.KVM_MEM_LOG_DIRTY_PAGES if log_dirty else 0)
        export = mapping = None
        if memory is None:
            mapping = mapping_cell(size)
            addr = map_into(mapping, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        else:
            export = _export(memory, size)
            addr = ctypes.addressof(export)
        try:
            self.set_user_memory_region(slot, guest_phys_addr, size, addr, flags)
        except BaseException:
            if mapping is not None:
                release_mapping(mapping)
            raise
        view = memoryview((ctypes.c_char * size).from_address(addr)).cast("B")
        ms = MemorySlot(slot, guest_phys_addr, size, addr, flags, view, export is None, export, mapping)
        self.slots[slot] = ms
        return ms

    def _check_place(self, guest_phys_addr: int, size: int, moving: int | None = None) -> None:
        """ValueError unless ``[guest_phys_addr, +size)`` is page-aligned and overlaps no slot
        (but slot ``moving``)."""
        if guest_phys_addr % PAGE_SIZE or size % PAGE_SIZE or size <= 0:
            raise ValueError(
                f"memory slot at {guest_phys_addr:#x} size {size:#x}: address and size must be "
                f"positive multiples of the {PAGE_SIZE}-byte page"
            )
        for s in self.slots.values():
            if s.slot != moving and guest_phys_addr < s.end and s.guest_phys_addr < guest_phys_addr + size:
                raise ValueError(
                    f"memory slot [{guest_phys_addr:#x}, {guest_phys_addr + size:#x}) overlaps slot "
                    f"{s.slot} [{s.guest_phys_addr:#x}, {s.end:#x})"
                )

    def delete_memory(self, slot: int) -> None:
        """Delete memory slot ``slot`` (KVM_SET_USER_MEMORY_REGION of size 0), then free its
        memory where the VM mapped it. A vCPU running meanwhile sees MMIO where the slot was."""
        s = self.slots.pop(slot)  # first: no reader finds it once KVM may have dropped it
        try:
            self.set_user_memory_region(slot, s.guest_phys_addr, 0, s.host_addr, s.flags)
        except BaseException:
            self.slots[slot] = s
            raise
        s._release()

    def move_memory(self, slot: int, guest_phys_addr: int) -> MemorySlot:
        """Move memory slot ``slot`` to ``guest_phys_addr``, same memory, same size (KVM's
        KVM_MR_MOVE: the region again with a new address); the slot, updated in place."""
        s = self.slots[slot]
        self._check_place(guest_phys_addr, s.size, moving=slot)
        self.set_user_memory_region(slot, guest_phys_addr, s.size, s.host_addr, s.flags)
        s.guest_phys_addr = guest_phys_addr
        return s

    def set_user_memory_region(self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int,
                               flags: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION as is (size 0 deletes the slot)."""
        region = abi.kvm_userspace_memory_region(slot, flags, guest_phys_addr, size, userspace_addr)

        def explain(err: int) -> str:
            if err == errno.EEXIST:
                return f"slot {slot} [{guest_phys_addr:#x}+{size:#x}) overlaps an existing slot"
            if err == errno.EINVAL:
                return f"slot {slot} at {guest_phys_addr:#x} size {size:#x} flags {flags:#x}: misaligned, too large, or flags unsupported"
            return ""

        self.ioctl(abi.KVM_SET_USER_MEMORY_REGION, region, explain)

    def set_user_memory_region2(self, slot: int, guest_phys_addr: int, size: int, userspace_addr: int,
                                flags: int = 0, guest_memfd: int = 0, guest_memfd_offset: int = 0) -> None:
        """KVM_SET_USER_MEMORY_REGION2 as is (Linux 6.8+, KVM_CAP_USER_MEMORY2): a slot whose
        private memory (KVM_MEM_GUEST_MEMFD) comes from ``guest_memfd`` at ``guest_memfd_offset``."""
        region = abi.kvm_userspace_memory_region2(slot, flags, guest_phys_addr, size, userspace_addr,
                                                  guest_memfd_offset, guest_memfd)
        self.ioctl(abi.KVM_SET_USER_MEMORY_REGION2, region)

    def set_nr_mmu_pages(self, pages: int) -> None:
        """KVM_SET_NR_MMU_PAGES: at most ``pages`` shadow/TDP page-table pages for this VM."""
        self.ioctl(abi.KVM_SET_NR_MMU_PAGES, pages)

    def set_msr_filter(self, ranges: Sequence["MsrFilterRange"] = (), default_deny: bool = False,
                       flags: int | None = None) -> None:
        """KVM_X86_SET_MSR_FILTER: which RDMSR/WRMSR KVM handles itself; a denied access goes to
        userspace (KVM_EXIT_X86_RDMSR/WRMSR) where KVM_CAP_X86_USER_SPACE_MSR asks for
        KVM_MSR_EXIT_REASON_FILTER, else the guest takes #GP. No ranges and no deny: no filter.
        ``flags`` (default: KVM_MSR_FILTER_DEFAULT_DENY or _ALLOW) is passed as it is.

        >>> vm.set_msr_filter([MsrFilterRange.allowing(abi.KVM_MSR_FILTER_READ, 0xc0000000, 0x2000, deny=[0xc0000101])])
        """
        if len(ranges) > abi.KVM_MSR_FILTER_MAX_RANGES:
            raise ValueError(f"an MSR filter has at most {abi.KVM_MSR_FILTER_MAX_RANGES} ranges, not {len(ranges)}")
        f = abi.kvm_msr_filter(flags if flags is not None else
                               abi.KVM_MSR_FILTER_DEFAULT_DENY if default_deny else abi.KVM_MSR_FILTER_DEFAULT_ALLOW)
        bitmaps = [ctypes.create_string_buffer(bytes(r.bitmap), len(r.bitmap)) for r in ranges]  # alive for the call
        for dst, r, bitmap in zip(f.ranges, ranges, bitmaps):
            dst.flags, dst.base, dst.bitmap = r.flags, r.base, ctypes.addressof(bitmap)
            dst.nmsrs = r.nmsrs if r.nmsrs is not None else 8 * len(r.bitmap)
        self.ioctl(abi.KVM_X86_SET_MSR_FILTER, f)

    def slot_for(self, gpa: int, length: int = 1) -> MemorySlot:
        """The slot holding ``[gpa, gpa + length)``; ValueError if no one slot does."""
        for s in self.slots.values():
            if s.contains(gpa, length):
                return s
        raise ValueError(f"guest-physical [{gpa:#x}, {gpa + length:#x}) is not inside one memory slot")

    def write(self, gpa: int, data: bytes) -> None:
        """Copy ``data`` into guest memory at ``gpa``."""
        s = self.slot_for(gpa, len(data))
        off = gpa - s.guest_phys_addr
        s.view[off : off + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        """A copy of ``length`` bytes of guest memory at ``gpa``."""
        s = self.slot_for(gpa, length)
        off = gpa - s.guest_phys_addr
        return bytes(s.view[off : off + length])

    def host_address(self, gpa: int) -> int:
        """The host virtual address backing guest-physical ``gpa``."""
        s = self.slot_for(gpa)
        return s.host_addr + gpa - s.guest_phys_addr

    def get_dirty_log(self, slot: int) -> list[int]:
        """KVM_GET_DIRTY_LOG: guest-physical addresses of the pages written since the last call."""
        s = self.slots[slot]
        npages = s.size // PAGE_SIZE
        bitmap = (ctypes.c_uint64 * ((npages + 63) // 64))()
        log = abi.kvm_dirty_log(slot, 0, ctypes.addressof(bitmap))
        self.ioctl(abi.KVM_GET_DIRTY_LOG, log)
        return [
            s.guest_phys_addr + (w * 64 + b) * PAGE_SIZE
            for w, word in enumerate(bitmap) if word
            for b in range(64) if word >> b & 1
        ]

    # --- vCPUs and devices -------------------------------------------------------------------

    def create_vcpu(self, vcpu_id: int | None = None) -> Vcpu:
        """KVM_CREATE_VCPU: a new vCPU (default id: the next free one), owned by this VM."""
        if vcpu_id is None:
            vcpu_id = len(self.vcpus)
        vcpu = Vcpu(self, vcpu_id)
        self.vcpus.append(vcpu)
        return vcpu

    def set_tss_addr(self, addr: int) -> None:
        """KVM_SET_TSS_ADDR: three pages of guest-physical space VMX needs for real mode."""
        self.ioctl(abi.KVM_SET_TSS_ADDR, addr)

    def set_identity_map_addr(self, addr: int) -> None:
        """KVM_SET_IDENTITY_MAP_ADDR: where VMX puts its real-mode identity page table (before any vCPU)."""
        self.ioctl(abi.KVM_SET_IDENTITY_MAP_ADDR, ctypes.c_uint64(addr))

    def create_irqchip(self) -> None:
        """KVM_CREATE_IRQCHIP: in-kernel PIC, IOAPIC and local APICs (before any vCPU)."""
        self.ioctl(abi.KVM_CREATE_IRQCHIP)

    def irq_line(self, irq: int, level: int) -> None:
        """KVM_IRQ_LINE: raise or lower an interrupt line of the in-kernel irqchip."""
        self.ioctl(abi.KVM_IRQ_LINE, abi.kvm_irq_level(irq, level))

    def ioeventfd(self, addr: int, length: int, pio: bool = True, datamatch: int | None = None) -> int:
        """KVM_IOEVENTFD: a guest write to ``addr`` signals the returned eventfd in the kernel,
        with no exit to userspace. The eventfd is closed with the VM."""
        efd = fd_cell()
        eventfd_into(efd, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
        flags = (abi.KVM_IOEVENTFD_FLAG_PIO if pio else 0) | (
            abi.KVM_IOEVENTFD_FLAG_DATAMATCH if datamatch is not None else 0
        )
        try:
            self.ioctl(abi.KVM_IOEVENTFD, abi.kvm_ioeventfd(datamatch or 0, addr, length, efd[0], flags))
        except BaseException:
            release_fd(efd)
            raise
        self._eventfds.append(efd)
        return efd[0]

    def enable_cap(self, cap: str | int, *args: int, flags: int = 0) -> None:
        """KVM_ENABLE_CAP on the VM, e.g. ``enable_cap("X86_USER_SPACE_MSR", mask)``."""
        a = (ctypes.c_uint64 * 4)(*args)
        self.ioctl(abi.KVM_ENABLE_CAP, abi.kvm_enable_cap(abi.capability_number(cap), flags, a))

    def get_stats_fd(self) -> int:
        """KVM_GET_STATS_FD for the VM; see :mod:`kvmiso.kvm.stats`. The caller closes it."""
        return self.ioctl(abi.KVM_GET_STATS_FD)

    def stats(self) -> Stats:
        """The VM's binary stats (KVM_GET_STATS_FD, parsed; a context manager)."""
        fd = fd_cell()
        self.make_fd(abi.KVM_GET_STATS_FD, 0, fd)
        return Stats(fd)

    def check_extension(self, cap: str | int) -> int:
        """KVM_CHECK_EXTENSION on the VM fd (answers for this VM's type)."""
        return self.ioctl(abi.KVM_CHECK_EXTENSION, abi.capability_number(cap))


