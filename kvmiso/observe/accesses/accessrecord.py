"""The access record, read back: every data access the guest kernel's KVM made while handling
each exit of its own guest, as ``kvmiso boot --record-accesses DIR`` wrote it (the TCG plugin
kvmiso/boot/record/accesses.c, one file per vCPU, and the guest's own kallsyms).

A record is facts from the emulator (source ``tcg-plugin``): the instruction's address, the
data's virtual address, the size and the direction. It carries no data values and no register
state, so it cannot say which exit a window handled; the functions that ran say it
(``io_interception``, ``npf_interception``).

A *mark* is a point a user-mode program put in the record (:mod:`.recordmark`): ``kvmiso record``
marks the end of each guest run, so that each run's windows can be told from the next run's.

The folder::

    vcpu0.rec, vcpu1.rec ...  the plugin's files, one per vCPU that handled an exit
    kallsyms, modules         the guest's /proc/kallsyms and /proc/modules, written when the
                              command ended (the same boot: KASLR moves them every boot)

A ``vcpuN.rec`` file, little-endian::

    file header, 32 bytes   magic "KVMISOAR", u16 format (2; 1 is read too), u16 header size (32), u32 vCPU,
                            u32 cap (accesses kept per window), u32 QEMU's plugin API version,
                            u64 the lowest kernel address (0xffff800000000000)
    then windows, each:
      header, 56 bytes      magic "WNDW", u32 why it closed (1 the next VMRUN, 2 L1's user mode,
                            3 still open when QEMU ended, 4 a mark), u64 sequence number on this
                            vCPU, u64 the VMRUN after which it opened, u64 where it closed (that
                            VMRUN, or the user-mode address; 0; a mark's ID), u64 instructions
                            (of the translation blocks entered: an upper bound where a block is
                            left early), u32 accesses kept, u32 dropped (past the cap, or
                            while a mark paused the record), u32
                            accesses of VMRUN/VMLOAD/VMSAVE filtered out, u32 the place of this
                            window or mark among every vCPU's (format 1: zero)
      accesses, 24 bytes    u64 instruction address, u64 data address (virtual), u32 size in
                            bytes, u32 flags (bit 0: a write)

>>> rec = read_record("/tmp/rec")                                  # doctest: +SKIP
>>> [(w.reason, len(w.accesses)) for w in rec.windows][:2]         # doctest: +SKIP
[('user', 3494), ('vmrun', 2804)]
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from ..kernel.kallsyms import Symbols, parse_kallsyms

MAGIC = b"KVMISOAR"
WINDOW_MAGIC = b"WNDW"
FORMAT = 2
FORMATS = (1, 2)  # format 1: no marks, no order across vCPUs
FILE_HEADER = struct.Struct("<8sHHIIIQ")
WINDOW_HEADER = struct.Struct("<4sIQQQQIIII")
ACCESS = struct.Struct("<QQII")
KERNEL_MIN = 0xFFFF_8000_0000_0000
REASONS = {1: "vmrun", 2: "user", 3: "end", 4: "mark"}
WRITE = 1
MARK_PAUSES = 1 << 31  # a mark's ID with this bit pauses the record (accesses only counted)
_VCPU_FILE = re.compile(r"vcpu(\d+)\.rec\Z")


class RecordError(ValueError):
    """A record file that is not what the plugin writes: the message names the file and offset."""


class Access(NamedTuple):
    """One data access: ``pc`` the instruction's address, ``addr`` the data's virtual address."""

    pc: int
    addr: int
    size: int
    flags: int

    @property
    def write(self) -> bool:
        """True for a store."""
        return bool(self.flags & WRITE)


@dataclass(frozen=True)
class Window:
    """The accesses of one exit's handling on one vCPU, from the instruction after VMRUN until
    ``reason``: ``vmrun`` (the next VMRUN: handled in the kernel), ``user`` (L1 reached user
    mode: the exit went to the VMM, or the vCPU thread gave way to another task), ``end``
    (QEMU ended with the window open)."""

    vcpu: int
    seq: int
    reason: str
    vmrun_pc: int
    end_pc: int
    insns: int
    accesses: tuple[Access, ...]
    dropped: int
    filtered: int
    order: int = 0  # the place among every vCPU's windows and marks (format 1: seq, one vCPU)

    @property
    def complete(self) -> bool:
        """Every access is here: none past the cap, and the window closed."""
        return self.dropped == 0 and self.reason != "end"


@dataclass(frozen=True)
class Mark:
    """A point a user-mode program put in the record (``id``), at ``order`` among the windows;
    ``pauses``: the record keeps no access until the next mark that does not."""

    vcpu: int
    id: int
    order: int
    pauses: bool = False


@dataclass(frozen=True)
class AccessRecord:
    """A record folder: the windows of every vCPU (by vCPU, then in order), and the guest's
    symbols of the same boot when it wrote them (None otherwise)."""

    directory: Path
    windows: tuple[Window, ...]
    symbols: Symbols | None
    api: int  # QEMU's plugin API version, as the plugin was told
    cap: int
    marks: tuple[Mark, ...] = ()
    format: int = FORMAT

    def paused(self) -> list[Window]:
        """The windows made while a mark paused the record (their accesses only counted)."""
        stops = sorted((m.order, m.pauses) for m in self.marks)
        out = []
        for w in self.windows:
            before = [p for o, p in stops if o < w.order]
            if before and before[-1]:
                out.append(w)
        return out

    def vcpus(self) -> list[int]:
        """The vCPUs (QEMU's, the guest kernel's CPUs) that have a file."""
        return sorted({w.vcpu for w in self.windows})


def read_record(directory: str | Path) -> AccessRecord:
    """Read a record folder. RecordError when it holds no record at all or a file is not one
    the plugin writes; a folder whose command ran no guest holds kallsyms and no vCPU file,
    and is read as a record without windows."""
    d = Path(directory)
    files = sorted((int(m.group(1)), p) for p in d.glob("vcpu*.rec") if (m := _VCPU_FILE.match(p.name)))
    kallsyms = d / "kallsyms"
    if not files and not kallsyms.exists():
        raise RecordError(f"{d} holds no access record (no vcpuN.rec, no kallsyms): "
                          "kvmiso boot --record-accesses DIR writes one")
    windows: list[Window] = []
    api = cap = 0
    fmt = FORMAT
    for _, path in files:
        got, api, cap, fmt = read_vcpu_file(path)
        windows.extend(got)
    symbols = parse_kallsyms(kallsyms.read_text()) if kallsyms.exists() else None
    marks = tuple(Mark(w.vcpu, w.end_pc & ~MARK_PAUSES, w.order, bool(w.end_pc & MARK_PAUSES))
                  for w in windows if w.reason == "mark")
    return AccessRecord(d, tuple(w for w in windows if w.reason != "mark"), symbols, api, cap, marks, fmt)


def read_vcpu_file(path: Path) -> tuple[list[Window], int, int, int]:
    """One ``vcpuN.rec``: its windows and marks, QEMU's plugin API version, the cap and the
    file's format."""
    data = path.read_bytes()
    if len(data) < FILE_HEADER.size:
        raise RecordError(f"{path}: {len(data)} bytes, shorter than the record's header")
    magic, fmt, header_size, vcpu, cap, api, kernel_min = FILE_HEADER.unpack_from(data)
    if magic != MAGIC:
        raise RecordError(f"{path}: not an access record (magic {magic!r})")
    if fmt not in FORMATS or header_size != FILE_HEADER.size or kernel_min != KERNEL_MIN:
        raise RecordError(f"{path}: record format {fmt} (header {header_size} bytes); this kvmiso reads formats "
                          f"{', '.join(map(str, FORMATS))}")
    windows = []
    off = header_size
    while off < len(data):
        if off + WINDOW_HEADER.size > len(data):
            raise RecordError(f"{path}: cut short at byte {off} (a window header needs {WINDOW_HEADER.size})")
        wmagic, reason, seq, vmrun_pc, end_pc, insns, n, dropped, filtered, order = WINDOW_HEADER.unpack_from(data, off)
        if wmagic != WINDOW_MAGIC or reason not in REASONS:
            raise RecordError(f"{path}: no window at byte {off} (magic {wmagic!r}, reason {reason})")
        off += WINDOW_HEADER.size
        end = off + n * ACCESS.size
        if end > len(data):
            raise RecordError(f"{path}: window {seq} at byte {off - WINDOW_HEADER.size} is cut short "
                              f"({n} accesses announced)")
        accesses = tuple(map(Access._make, ACCESS.iter_unpack(data[off:end])))
        windows.append(Window(vcpu, seq, REASONS[reason], vmrun_pc, end_pc, insns, accesses, dropped, filtered,
                              order if fmt >= 2 else seq))
        off = end
    return windows, api, cap, fmt


__all__ = ["ACCESS", "Access", "AccessRecord", "KERNEL_MIN", "Mark", "RecordError", "Window", "read_record", "read_vcpu_file"]
