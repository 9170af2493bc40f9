"""The binary stats interface (KVM_GET_STATS_FD) of a VM or vCPU.

The descriptors are read once; ``snapshot()`` then reads only the data block with one pread.
Descriptors are stepped through by ``sizeof(kvm_stats_desc) + name_size``, as the ABI says.

>>> with vcpu.stats() as st:
...     before = st.snapshot(); exit = vcpu.run(); delta = st.snapshot() - before
>>> delta["exits"] >= 1                     # this one, and any KVM handled inside the KVM_RUN
True
"""

from __future__ import annotations

import ctypes
import itertools
import operator
import os
import struct
from dataclasses import dataclass

from . import abi
from typing import Any

from ._fd import FdOwner, fd_cell

_DESC_SIZE = ctypes.sizeof(abi.kvm_stats_desc)


@dataclass(frozen=True)
class StatDesc:
    """One statistic: ``size`` u64 values (buckets for a histogram) at ``offset`` in the data."""

    name: str
    type: str  # cumulative | instant | peak | linear_hist | log_hist
    unit: str  # none | bytes | seconds | cycles | boolean
    base: str  # pow10 | pow2
    exponent: int
    size: int
    offset: int
    bucket_size: int

    @property
    def is_histogram(self) -> bool:
        """A linear or logarithmic histogram: ``size`` bucket counts."""
        return self.type.endswith("_hist")

    @property
    def is_tuple(self) -> bool:
        """Its value is a tuple of ``size`` words (a histogram's buckets, or an array)."""
        return self.is_histogram or self.size > 1


class Snapshot(dict):
    """name -> int (a tuple for a histogram's buckets or an array: ``StatDesc.is_tuple``).
    ``a - b`` is the delta of the cumulative statistics; instant and peak ones (``levels``) keep
    ``a``'s value, since a difference of two levels means nothing."""

    levels: frozenset[str] = frozenset()

    def __sub__(self, other: "Snapshot") -> "Snapshot":
        get, levels = other.get, self.levels
        out = Snapshot({k: v if k in levels or (o := get(k)) is None else
                        v - o if v.__class__ is int else tuple(map(operator.sub, v, o))
                        for k, v in self.items()})
        out.levels = levels
        return out

    def nonzero(self) -> dict:
        """The statistics that are not zero (histograms with any count), e.g. for a delta."""
        return {k: v for k, v in self.items() if (any(v) if isinstance(v, tuple) else v)}


class Stats(FdOwner):
    """A stats fd with its parsed descriptors. Owns and closes the fd: ``fd`` is its number, or
    the cell (``kvm._fd.fd_cell``) it was made into."""

    def __init__(self, fd: int | Any) -> None:
        self._fd = fd_cell(fd) if isinstance(fd, int) else fd
        number = self.fd
        try:
            hdr = abi.kvm_stats_header.from_buffer_copy(os.pread(number, ctypes.sizeof(abi.kvm_stats_header), 0))
            self.id = os.pread(number, hdr.name_size, hdr.id_offset).rstrip(b"\0").decode()
            stride = _DESC_SIZE + hdr.name_size
            raw = os.pread(number, stride * hdr.num_desc, hdr.desc_offset)
            self.descriptors = [_parse_desc(raw[i * stride : (i + 1) * stride]) for i in range(hdr.num_desc)]
        except BaseException:
            self.close()
            raise
        self._data_offset = hdr.data_offset
        self._data_len = max((d.offset + 8 * d.size for d in self.descriptors), default=0)
        self._by_name = {d.name: d for d in self.descriptors}
        self._levels = frozenset(d.name for d in self.descriptors if d.type in ("instant", "peak"))
        # decode() in C: one unpack, then one itemgetter picks each value (a slice for buckets)
        self._unpack = struct.Struct(f"<{self._data_len // 8}Q").unpack
        self._names = [d.name for d in self.descriptors]
        self._pick = operator.itemgetter(*(slice(d.offset // 8, d.offset // 8 + d.size) if d.is_tuple
                                           else d.offset // 8 for d in self.descriptors)) if self.descriptors else None
        # delta(): which statistic each data word belongs to, and where each one's words are
        self._owner = [-1] * (self._data_len // 8)
        self._words: list[tuple[str, int, int, bool, bool]] = []  # name, first, end, level, tuple
        for i, d in enumerate(self.descriptors):
            first = d.offset // 8
            self._owner[first : first + d.size] = [i] * d.size
            self._words.append((d.name, first, first + d.size, d.name in self._levels, d.is_tuple))
        self._level_ids = [i for i, w in enumerate(self._words) if w[3]]

    def __contains__(self, name: str) -> bool:
        return name in self._by_name

    def desc(self, name: str) -> StatDesc:
        """The descriptor (``struct kvm_stats_desc``) of statistic ``name``."""
        return self._by_name[name]

    def snapshot(self) -> Snapshot:
        """Every statistic now: :meth:`read_raw` then :meth:`decode`."""
        return self.decode(self.read_raw())

    def read_raw(self) -> bytes:
        """The data block as it is now: one pread, nothing decoded. For sampling at every exit
        cheaply; :meth:`decode` turns it into a Snapshot later."""
        return os.pread(self.fd, self._data_len, self._data_offset)

    def delta(self, before: bytes, after: bytes) -> dict:
        """``(decode(after) - decode(before)).nonzero()`` for two blocks from :meth:`read_raw`,
        decoding only the statistics whose words moved (and the levels): a run changes a few of
        them, and this is paid once per ``Machine.run``."""
        now, was, owner = self._unpack(after), self._unpack(before), self._owner
        ids = {owner[w] for w in itertools.compress(range(len(now)), map(operator.ne, now, was))}
        ids.update(self._level_ids)
        ids.discard(-1)  # padding between statistics
        out = {}
        for i in sorted(ids):
            name, first, end, level, is_tuple = self._words[i]
            if level:
                v = tuple(now[first:end]) if is_tuple else now[first]
            else:
                v = tuple(map(operator.sub, now[first:end], was[first:end])) if is_tuple else now[first] - was[first]
            if any(v) if is_tuple else v:
                out[name] = v
        return out

    def decode(self, data: bytes) -> Snapshot:
        """A Snapshot from a data block read by :meth:`read_raw`."""
        values = self._pick(self._unpack(data)) if self._pick else ()
        snap = Snapshot(zip(self._names, values if len(self._names) > 1 else (values,)))
        snap.levels = self._levels
        return snap


def _parse_desc(raw: bytes) -> StatDesc:
    d = abi.kvm_stats_desc.from_buffer_copy(raw[:_DESC_SIZE])
    return StatDesc(
        name=raw[_DESC_SIZE:].split(b"\0", 1)[0].decode(),
        type=abi.KVM_STATS_TYPE_NAMES.get(d.flags & abi.KVM_STATS_TYPE_MASK, "unknown"),
        unit=abi.KVM_STATS_UNIT_NAMES.get((d.flags & abi.KVM_STATS_UNIT_MASK) >> abi.KVM_STATS_UNIT_SHIFT, "unknown"),
        base=abi.KVM_STATS_BASE_NAMES.get((d.flags & abi.KVM_STATS_BASE_MASK) >> abi.KVM_STATS_BASE_SHIFT, "unknown"),
        exponent=d.exponent,
        size=d.size,
        offset=d.offset,
        bucket_size=d.bucket_size,
    )

