"""tracefs ring-buffer pages (``per_cpu/cpuN/trace_pipe_raw``) and their header
(``events/header_page``), parsed as the kernel's ring_buffer.c writes them, and decoded into
TraceEvents with their formats: pure functions of bytes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterator

from .exitlog import TraceEvent
from .traceformat import FIELD_RE, EventFormat, FormatError, common_pid, common_type, kernel_stack

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


@dataclass
class Decoded:
    """Records decoded from ring-buffer pages, and those that were not kept."""

    events: list[TraceEvent]
    missed: int = 0  # lost before a page, as the pages report it
    foreign: int = 0  # records of threads not asked for
    unknown: int = 0  # records of event ids without a format
    orphan_stacks: int = 0  # kernel_stack records with no event of theirs before them


def decode_buffers(raw: dict[int, bytes], header: PageHeader, page_size: int, formats: dict[int, EventFormat],
                   pids: set[int] | None = None, stack_format: EventFormat | None = None) -> Decoded:
    """TraceEvents from ``trace_pipe_raw`` pages per CPU, ordered by timestamp; records of
    threads outside ``pids`` (when given) are counted, not kept. A ``kernel_stack`` record (the
    ``stacktrace`` trigger writes one right after its event, on the same CPU) becomes the
    ``stack`` of the event before it."""
    out = Decoded([])
    stack_id = stack_format.id if stack_format else None
    for cpu, data in raw.items():
        mine: list[TraceEvent] = []
        for page in iter_pages(data, page_size):
            parsed = parse_page(page, header, cpu)
            out.missed += max(parsed.missed, 1) if parsed.missed else 0
            for rec in parsed.events:
                kind = common_type(rec.data)
                fmt = stack_format if kind == stack_id else formats.get(kind)
                if fmt is None:
                    out.unknown += 1
                    continue
                pid = common_pid(rec.data, fmt)
                if pids is not None and pid not in pids:
                    out.foreign += 1
                    continue
                if kind == stack_id:
                    if mine and mine[-1].pid == pid and not mine[-1].stack:
                        mine[-1] = dataclasses.replace(mine[-1], stack=kernel_stack(rec.data, fmt))
                    else:
                        out.orphan_stacks += 1
                    continue
                fields, symbols = fmt.decode(rec.data)
                mine.append(TraceEvent(rec.ts, fmt.system, fmt.name, cpu, pid, fields, symbols))
        out.events += mine
    out.events.sort(key=lambda e: e.ts_ns)  # stable: same-timestamp records keep buffer order
    return out


__all__ = ["Decoded", "MISSED_EVENTS", "MISSED_STORED", "Page", "PageHeader", "RawEvent", "TS_SHIFT", "TYPE_PADDING",
           "TYPE_TIME_EXTEND", "TYPE_TIME_STAMP", "decode_buffers", "iter_pages", "parse_page"]
