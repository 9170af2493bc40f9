"""tracefs ring-buffer pages (``per_cpu/cpuN/trace_pipe_raw``) and their header
(``events/header_page``), parsed as the kernel's ring_buffer.c writes them: pure functions of bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from .traceformat import FIELD_RE, FormatError

# The compressed event header (events/header_event): type_len:5, time_delta:27, array[].
TYPE_PADDING, TYPE_TIME_EXTEND, TYPE_TIME_STAMP = 29, 30, 31
TS_SHIFT = 27
# Flags in the top bits of the page's commit field (kernel/trace/ring_buffer.c).
MISSED_EVENTS, MISSED_STORED = 1 << 31, 1 << 30
_COMMIT_MASK = (1 << 30) - 1


@dataclass(frozen=True)
class PageHeader:
    """Where a ring-buffer page keeps its timestamp, commit word and data (``header_page``)."""

    timestamp_offset: int = 0
    timestamp_size: int = 8
    commit_offset: int = 8
    commit_size: int = 8
    data_offset: int = 16

    @classmethod
    def parse(cls, text: str) -> "PageHeader":
        """``events/header_page``'s text, parsed."""
        got = {m["decl"].split()[-1]: (int(m["offset"]), int(m["size"])) for m in FIELD_RE.finditer(text)}
        try:
            (ts_off, ts_size), (c_off, c_size), (d_off, _) = got["timestamp"], got["commit"], got["data"]
        except KeyError as e:
            raise FormatError(f"header_page has no {e.args[0]} field") from None
        return cls(ts_off, ts_size, c_off, c_size, d_off)


@dataclass(frozen=True)
class RawEvent:
    """One record from a ring-buffer page: absolute timestamp (ns on the trace clock), the CPU
    whose buffer held it, and the record bytes (common fields first)."""

    ts: int
    cpu: int
    data: bytes


@dataclass
class Page:
    """A parsed page: its records and the events the kernel reported lost before it
    (-1: lost, count unknown)."""

    events: list[RawEvent]
    missed: int = 0


def parse_page(page: bytes, header: PageHeader, cpu: int = 0) -> Page:
    """Every record in one ``trace_pipe_raw`` page, with absolute timestamps, in order."""
    if len(page) < header.data_offset:
        raise FormatError(f"a ring-buffer page of {len(page)} bytes is shorter than its header")
    ts = int.from_bytes(page[header.timestamp_offset : header.timestamp_offset + header.timestamp_size], "little")
    commit = int.from_bytes(page[header.commit_offset : header.commit_offset + header.commit_size], "little")
    size = commit & _COMMIT_MASK
    data = page[header.data_offset : header.data_offset + size]
    if len(data) < size:
        raise FormatError(f"page commit {size} runs past the page ({len(page)} bytes)")
    missed = 0
    if commit & MISSED_EVENTS:
        missed = -1
        if commit & MISSED_STORED:  # the count follows the data, as a long
            end = header.data_offset + size
            missed = int.from_bytes(page[end : end + header.commit_size], "little")
    events: list[RawEvent] = []
    pos = 0
    while pos + 4 <= size:
        word = int.from_bytes(data[pos : pos + 4], "little")
        type_len, delta = word & 0x1F, word >> 5
        pos += 4
        if type_len == TYPE_PADDING:
            if delta == 0:  # padding to the end of the page
                break
            # a discarded event (the kernel sets its delta to at least 1 to tell it from the end
            # of the page); like the kernel's reader, its delta does not move the clock
            pos += int.from_bytes(data[pos : pos + 4], "little")
        elif type_len == TYPE_TIME_EXTEND:
            ts += (int.from_bytes(data[pos : pos + 4], "little") << TS_SHIFT) + delta
            pos += 4
        elif type_len == TYPE_TIME_STAMP:
            absolute = (int.from_bytes(data[pos : pos + 4], "little") << TS_SHIFT) + delta
            # the kernel stores the low 59 bits; the top bits come from the page's time
            ts = absolute | (ts & ~((1 << 59) - 1))
            pos += 4
        else:
            if type_len == 0:
                length = int.from_bytes(data[pos : pos + 4], "little") - 4
                length = (length + 3) & ~3
                pos += 4
            else:
                length = type_len * 4
            ts += delta
            events.append(RawEvent(ts, cpu, bytes(data[pos : pos + length])))
            pos += length
    return Page(events, missed)


def iter_pages(raw: bytes, page_size: int) -> Iterator[bytes]:
    """Split what ``trace_pipe_raw`` returned into pages."""
    for off in range(0, len(raw) - page_size + 1, page_size):
        yield raw[off : off + page_size]


__all__ = ["MISSED_EVENTS", "MISSED_STORED", "Page", "PageHeader", "RawEvent", "TS_SHIFT", "TYPE_PADDING",
           "TYPE_TIME_EXTEND", "TYPE_TIME_STAMP", "iter_pages", "parse_page"]
