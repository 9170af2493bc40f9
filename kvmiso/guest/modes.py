"""Real, 32-bit protected and 64-bit long mode (CPL0 or CPL3): the host builds the GDT, IDT,
TSS and identity page tables in guest memory and loads the matching segment state.

Guest-physical layout (shared with guests/lib/kvmiso.inc):

====================  ==================================================
0x0000_0000           real-mode IVT (vectors 0-31)
0x0000_7000           real-mode stack top
0x0000_8000           the payload image (code, data), at most 32 KiB
0x0001_0000           GDT; 0x11000 IDT
0x0001_2000           PML4; 0x13000 PDPT; 0x14000-0x17fff four PDs
0x0001_8000           TSS of vCPU 0 with a full I/O permission bitmap (all ports allowed), to
                      0x1a069; vCPU n's at 0x18000 + n * 0x3000 (its own CPL0 stack)
0x0010_0000           scratch memory for payloads
top - 0x10000         user (CPL3) stack top; kernel stack top at the end
====================  ==================================================
"""

from __future__ import annotations

import functools
import struct
from dataclasses import dataclass

from ..kvm import Vcpu, Vm, abi
from .build import Image

IVT, GDT, IDT = 0x0, 0x10000, 0x11000
PML4, PDPT, PD = 0x12000, 0x13000, 0x14000
TSS = 0x18000
TSS_IOMAP = 0x68
TSS_LIMIT = TSS_IOMAP + 65536 // 8  # the bitmap's last byte is the required 0xff terminator
TSS_STRIDE = 0x3000  # one TSS per vCPU: each holds its own vCPU's CPL0 stack for CPL3 interrupts
SCRATCH = 0x100000
MAX_VCPUS = (SCRATCH - TSS - TSS_LIMIT - 1) // TSS_STRIDE + 1
REAL_MODE_STACK = 0x7000
IDENTITY_MAP_GIB = 4  # the long-mode identity map covers guest-physical [0, 4 GiB) in 2 MiB pages

SEL_CODE64, SEL_DATA, SEL_CODE32 = 0x08, 0x10, 0x18
SEL_USER_DATA, SEL_USER_CODE64 = 0x20 | 3, 0x28 | 3
SEL_TSS = 0x30  # a 16-byte descriptor in long mode (0x30 and 0x38)

CR0_PE, CR0_MP, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1 << 0, 1 << 1, 1 << 4, 1 << 5, 1 << 16, 1 << 31
CR4_PAE, CR4_OSFXSR, CR4_OSXMMEXCPT = 1 << 5, 1 << 9, 1 << 10
EFER_LME, EFER_LMA, EFER_NXE = 1 << 8, 1 << 10, 1 << 11
RFLAGS_FIXED = 1 << 1
RFLAGS_IOPL3 = 3 << 12
PTE_P, PTE_RW, PTE_US, PTE_PS = 1 << 0, 1 << 1, 1 << 2, 1 << 7

# type, s, l, db, dpl of each GDT entry; base 0, limit 4 GiB, granularity 4 KiB
_SEGMENTS = {
    SEL_CODE64: (0xB, 1, 1, 0, 0),
    SEL_DATA: (0x3, 1, 0, 1, 0),
    SEL_CODE32: (0xB, 1, 0, 1, 0),
    SEL_USER_DATA & ~3: (0x3, 1, 0, 1, 3),
    SEL_USER_CODE64 & ~3: (0xB, 1, 1, 0, 3),
}


def _descriptor(base: int, limit: int, typ: int, s: int, dpl: int, l: int, db: int, g: int) -> int:
    access = typ | s << 4 | dpl << 5 | 1 << 7
    flags = l << 1 | db << 2 | g << 3
    return ((limit & 0xFFFF) | (base & 0xFFFFFF) << 16 | access << 40 | ((limit >> 16) & 0xF) << 48
            | flags << 52 | ((base >> 24) & 0xFF) << 56)


def _segment(selector: int, typ: int, s: int, l: int, db: int, dpl: int,
             base: int = 0, limit: int = 0xFFFFFFFF, g: int = 1) -> abi.kvm_segment:
    return abi.kvm_segment(base=base, limit=limit, selector=selector, type=typ, present=1, dpl=dpl,
                           db=db, s=s, l=l, g=g)


# The tables below depend on a handful of values, never on the VM: each is built once per
# process and copied into guest memory (a fresh Machine and Machine.reset() write them again).

@functools.lru_cache(maxsize=None)
def gdt_bytes(long_mode: bool) -> bytes:
    """The GDT: flat code and data segments for CPL0 and CPL3, and the TSS descriptor."""
    entries = [0] * 8
    for sel, (typ, s, l, db, dpl) in _SEGMENTS.items():
        entries[sel >> 3] = _descriptor(0, 0xFFFFF, typ, s, dpl, l, db, 1)
    tss_type = 0x9  # available TSS (64-bit in long mode, 32-bit otherwise)
    entries[SEL_TSS >> 3] = _descriptor(TSS, TSS_LIMIT, tss_type, 0, 0, 0, 0, 0)
    entries[(SEL_TSS >> 3) + 1] = TSS >> 32 if long_mode else 0
    return struct.pack("<8Q", *entries)


@functools.lru_cache(maxsize=64)
def idt_bytes(stubs: int, long_mode: bool) -> bytes:
    """Gates for vectors 0-31 pointing at crt0's exception stubs (16 bytes apart from ``stubs``)."""
    gates = bytearray()
    for vec in range(32):
        off = stubs + 16 * vec
        if long_mode:
            gates += struct.pack("<HHBBHII", off & 0xFFFF, SEL_CODE64, 0, 0x8E, (off >> 16) & 0xFFFF, off >> 32, 0)
        else:
            gates += struct.pack("<HHBBH", off & 0xFFFF, SEL_CODE32, 0, 0x8E, (off >> 16) & 0xFFFF)
    return bytes(gates)


@functools.lru_cache(maxsize=64)
def ivt_bytes(stubs: int) -> bytes:
    """Real-mode IVT entries (offset, segment 0) for vectors 0-31 pointing at crt0's exception
    stubs, which the image keeps below 64 KiB. Later vectors are past the IDTR limit."""
    return struct.pack("<64H", *(half for vec in range(32) for half in (stubs + 16 * vec, 0)))


@functools.lru_cache(maxsize=64)
def tss_bytes(long_mode: bool, kernel_stack_top: int) -> bytes:
    """The TSS with the CPL0 stack for interrupts from CPL3 and an all-zero I/O bitmap, which
    lets CPL3 use every port (see :func:`setup`)."""
    tss = bytearray(TSS_LIMIT + 1)
    tss[-1] = 0xFF
    if long_mode:
        struct.pack_into("<Q", tss, 4, kernel_stack_top)
    else:
        struct.pack_into("<II", tss, 4, kernel_stack_top, SEL_DATA)
    struct.pack_into("<H", tss, 0x66, TSS_IOMAP)
    return bytes(tss)


@functools.lru_cache(maxsize=1)
def identity_map_bytes() -> tuple[bytes, bytes, bytes]:
    """PML4, PDPT and PDs identity-mapping guest-physical [0, 4 GiB) with 2 MiB user-accessible,
    writable pages."""
    pml4 = struct.pack("<Q", PDPT | PTE_P | PTE_RW | PTE_US)
    pdpt = struct.pack(f"<{IDENTITY_MAP_GIB}Q", *(PD + i * 0x1000 | PTE_P | PTE_RW | PTE_US
                                                   for i in range(IDENTITY_MAP_GIB)))
    pdes = [(i << 21) | PTE_P | PTE_RW | PTE_US | PTE_PS for i in range(512 * IDENTITY_MAP_GIB)]
    return pml4, pdpt, struct.pack(f"<{len(pdes)}Q", *pdes)


@dataclass(frozen=True)
class Boot:
    """What :func:`setup` loads into one vCPU for a mode: the tables it writes into guest memory
    and the sregs and regs it sets. Built once per image; loading it again is a reset's share."""

    writes: tuple[tuple[int, bytes], ...]  # (guest-physical address, bytes)
    sregs: bytes  # a struct kvm_sregs; bytes, so that nothing can change what the next load sets
    regs: bytes  # a struct kvm_regs

    def load(self, vm: Vm, vcpu: Vcpu) -> None:
        """Write the tables, then KVM_SET_SREGS and KVM_SET_REGS."""
        for address, data in self.writes:
            vm.write(address, data)
        vcpu.set_sregs(abi.kvm_sregs.from_buffer_copy(self.sregs))
        vcpu.set_regs(abi.kvm_regs.from_buffer_copy(self.regs))


def setup(vm: Vm, vcpu: Vcpu, image: Image, mode: str, cpl: int, stack_top: int, kernel_stack_top: int,
          sregs: abi.kvm_sregs | None = None) -> Boot:
    """Load segment, control and general registers for ``mode`` and enter at the image's _start.
    ``sregs`` is the state to complete (default: the vCPU's own, read with KVM_GET_SREGS).
    Returns what it loaded, for loading again."""
    boot = boot_state(image, mode, cpl, vcpu.id, stack_top, kernel_stack_top,
                      vcpu.get_sregs() if sregs is None else sregs)
    boot.load(vm, vcpu)
    return boot


def boot_state(image: Image, mode: str, cpl: int, vcpu_id: int, stack_top: int, kernel_stack_top: int,
               sregs: abi.kvm_sregs) -> Boot:
    """The :class:`Boot` of vCPU ``vcpu_id`` entering the image's _start in ``mode`` at ``cpl``;
    ``sregs`` (completed in place) holds what the mode leaves alone (CR2, CR8, APIC base)."""
    if cpl not in (0, 3):
        raise ValueError(f"cpl must be 0 or 3, not {cpl}")
    if cpl == 3 and mode != "long":
        raise ValueError(f"CPL3 is available in long mode only, not in {mode} mode")
    regs = abi.kvm_regs(rip=image.entry, rflags=RFLAGS_FIXED, rsp=stack_top, rdi=vcpu_id)
    if mode == "real":
        return Boot(_real_mode(image, sregs, regs), bytes(sregs), bytes(regs))
    writes = _descriptor_tables(image, mode == "long", vcpu_id, kernel_stack_top, sregs)
    sregs.cr0 = CR0_PE | CR0_ET | CR0_NE
    if mode == "long":
        writes += _paging(sregs)
        if cpl == 3:
            code, data = SEL_USER_CODE64, SEL_USER_DATA
            regs.rflags |= RFLAGS_IOPL3  # CPL3 may use every port: see _descriptor_tables
        else:
            code, data = SEL_CODE64, SEL_DATA
    else:
        code, data = SEL_CODE32, SEL_DATA
        sregs.cr4 = sregs.efer = 0
    _flat_segments(sregs, code, data)
    return Boot(tuple(writes), bytes(sregs), bytes(regs))


def _real_mode(image: Image, sregs: abi.kvm_sregs, regs: abi.kvm_regs) -> tuple[tuple[int, bytes], ...]:
    """Real mode's segments, IVT and stack, set in ``sregs`` and ``regs``; the IVT's write."""
    seg = _segment(0, 0x3, 1, 0, 0, 0, limit=0xFFFF, g=0)
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, seg)
    sregs.cs = _segment(0, 0xB, 1, 0, 0, 0, limit=0xFFFF, g=0)
    ivt = ivt_bytes(image.symbols["exception_stubs"])
    sregs.idt.base, sregs.idt.limit = IVT, len(ivt) - 1
    regs.rsp = REAL_MODE_STACK
    sregs.cr0 &= ~(CR0_PE | CR0_PG)
    return ((IVT, ivt),)


def _descriptor_tables(image: Image, long_mode: bool, vcpu_id: int, kernel_stack_top: int,
                       sregs: abi.kvm_sregs) -> list[tuple[int, bytes]]:
    """The GDT, the IDT and this vCPU's TSS: their writes, and GDTR, IDTR, TR and LDTR in ``sregs``."""
    # CPL3 may use every port by both rules: a zero I/O bitmap in the TSS (kvm_pvm ignores
    # RFLAGS.IOPL for the guest but honours the bitmap) and IOPL 3 (set by boot_state; QEMU's TCG
    # consults the bitmap only through a TR cached as "available", and KVM loads it "busy":
    # measured under kvmiso boot, CPL3 port I/O took #GP there with the bitmap alone).
    if vcpu_id >= MAX_VCPUS:
        raise ValueError(f"at most {MAX_VCPUS} vCPUs: each has its own TSS below the scratch memory at {SCRATCH:#x}")
    idt = idt_bytes(image.symbols["exception_stubs"], long_mode)
    tss = TSS + vcpu_id * TSS_STRIDE
    sregs.gdt.base, sregs.gdt.limit = GDT, 8 * 8 - 1
    sregs.idt.base, sregs.idt.limit = IDT, len(idt) - 1
    # TR's base is loaded as given (the GDT's descriptor, vCPU 0's, is read only by LTR)
    sregs.tr = _segment(SEL_TSS, 0xB, 0, 0, 0, 0, base=tss, limit=TSS_LIMIT, g=0)
    sregs.ldt = abi.kvm_segment(type=0x2, present=1, unusable=1)
    return [(GDT, gdt_bytes(long_mode)), (IDT, idt), (tss, tss_bytes(long_mode, kernel_stack_top))]


def _paging(sregs: abi.kvm_sregs) -> list[tuple[int, bytes]]:
    """Long mode's paging (the identity map of the low 4 GiB) and control registers in
    ``sregs``; the tables' writes."""
    sregs.cr0 |= CR0_PG | CR0_WP | CR0_MP
    sregs.cr3 = PML4
    sregs.cr4 = CR4_PAE | CR4_OSFXSR | CR4_OSXMMEXCPT
    sregs.efer = EFER_LME | EFER_LMA | EFER_NXE
    return list(zip((PML4, PDPT, PD), identity_map_bytes()))


def _flat_segments(sregs: abi.kvm_sregs, code: int, data: int) -> None:
    """CS from selector ``code``, and DS, ES, FS, GS and SS from ``data``, as the GDT has them."""
    typ, s, l, db, dpl = _SEGMENTS[code & ~3]
    sregs.cs = _segment(code, typ, s, l, db, dpl)
    typ, s, l, db, dpl = _SEGMENTS[data & ~3]
    for name in ("ds", "es", "fs", "gs", "ss"):
        setattr(sregs, name, _segment(data, typ, s, l, db, dpl))
