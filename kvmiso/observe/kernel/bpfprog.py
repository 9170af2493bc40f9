"""The eBPF of kvmiso's BPF watcher (:mod:`..tracing.bpfwatch`), assembled here without a
compiler: one program per kvm tracepoint that writes a compact record into a ring buffer and names
its call chain by an id in a stack map, and the programs that follow a traced thread's forks and
exits. The maps they share and the perf events they hang on are made in :mod:`.bpfmaps`. The
record layout (``HEADER``) is the reader's contract with them.

Each program says in its docstring what it writes; registers by convention: r6 the tracepoint's
context, r7 ``cpu << 32 | tid``, r8 the traced set's generation until it is the time, r9 the
chain id, then the reserved record.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from .bpf import (_EXIT, BPF_PSEUDO_MAP_FD, _add_imm, _call, _insn, _ld_imm64, _ldx64, _mov, _mov_imm, _stx64)

PROG_TRACEPOINT, PROG_RAW_TRACEPOINT = 5, 17  # (include/uapi/linux/bpf.h)
# helpers
_LOOKUP, _UPDATE, _DELETE, _KTIME, _CPU, _PID_TGID = 1, 2, 3, 5, 8, 14
_GET_STACKID, _GET_STACK, _PROBE_READ_KERNEL, _RB_RESERVE, _RB_SUBMIT = 27, 67, 113, 131, 132
_TASK_STORAGE_GET, _CURRENT_TASK_BTF = 156, 158
STORAGE_CREATE = 1  # BPF_LOCAL_STORAGE_GET_F_CREATE
RB_NO_WAKEUP = 1  # kvmiso drains on a timer: no wakeup (an irq_work) per record
RB_BUSY, RB_DISCARD, RB_HDR = 1 << 31, 1 << 30, 8

MAX_DEPTH = 127  # frames per chain: perf's default kernel.perf_event_max_stack
HEADER = struct.Struct("<HHIQiI")  # event id, flags, tid, ns, chain id (or inline bytes), cpu
INLINE = 1  # flags: the chain follows the record, not in the stack map
INFERRED = 2  # flags: the chain is the one its path key had, not walked (see event_program)
# per-CPU counters (a PERCPU_ARRAY): records the ring buffer had no room for, chains copied
# inline, walks that found another chain than their path key had
LOST, INLINED, MISMATCHED = 0, 1, 2
COUNTERS = 3
# the chain cache (event_program): a key is walked when new, on its first VERIFY_FIRST repeats,
# then on one repeat in VERIFY_EVERY (a power of two); a walk that disagrees starts the count anew
VERIFY_FIRST, VERIFY_EVERY = 4, 256
PATH_EVENTS = 16  # events after an exit that still extend the path
FNV_PRIME = 0x100000001B3
# a thread's state, in task storage: its path, events in it, reference set, reference stack
# pointer, a scratch slot, then the generation of the traced set it was looked up in and the
# answer (1: traced, 0: not)
THREAD_STATE = struct.Struct("<QIIQQII")
GENERATION_AT, TRACED_AT = 32, 36
SWITCH = struct.Struct("<II")  # the "on" map's value: recording, the traced set's generation
CACHE_ENTRY = struct.Struct("<II")  # chain id, repeats seen since it was walked new or disagreed
BPF_NOEXIST = 1


class _Asm:
    """eBPF with labels: jumps name their target and are resolved at the end."""

    def __init__(self) -> None:
        self.items: list[bytes | tuple] = []

    def __call__(self, *code: bytes) -> "_Asm":
        self.items += code
        return self

    def jump(self, op: int, dst: int, imm: int, label: str) -> "_Asm":
        self.items.append(("jump", op, dst, 0, imm, label))
        return self

    def jump_reg(self, op: int, dst: int, src: int, label: str) -> "_Asm":
        self.items.append(("jump", op, dst, src, 0, label))
        return self

    def label(self, name: str) -> "_Asm":
        self.items.append(("label", name))
        return self

    def code(self) -> bytes:
        at, pc = {}, 0
        for it in self.items:
            if isinstance(it, tuple):
                if it[0] == "label":
                    at[it[1]] = pc
                else:
                    pc += 1
            else:
                pc += len(it) // 8
        out, pc = [], 0
        for it in self.items:
            if isinstance(it, tuple):
                if it[0] == "jump":
                    _, op, dst, src, imm, label = it
                    out.append(_insn(op, dst, src, at[label] - pc - 1, imm))
                    pc += 1
            else:
                out.append(it)
                pc += len(it) // 8
        return b"".join(out)


JEQ, JGE, JNE, JLE, JSLT, JA = 0x15, 0x35, 0x55, 0xB5, 0xC5, 0x05  # if dst ==, >=, !=, <= imm, (s64)dst < imm; goto
JEQ_REG = 0x1D  # if dst == src


def _st(size: int, dst: int, off: int, imm: int) -> bytes:
    return _insn({1: 0x72, 2: 0x6A, 4: 0x62, 8: 0x7A}[size], dst, 0, off, imm)


def _stx32(dst: int, src: int, off: int) -> bytes:
    return _insn(0x63, dst, src, off)


def _ldx32(dst: int, src: int, off: int) -> bytes:
    return _insn(0x61, dst, src, off)


def _map(reg: int, fd: int) -> bytes:
    return _ld_imm64(reg, fd, BPF_PSEUDO_MAP_FD)


def _stack_key(a: _Asm, reg: int, off: int) -> None:
    """r2 = r10 + off: a pointer to the key at that stack slot."""
    a(_mov(2, 10), _add_imm(2, off))


def _count(a: _Asm, counters: int, index: int, done: str) -> None:
    """counters[index] += 1 on this CPU, then goto ``done``."""
    a(_st(4, 10, -16, index), _map(1, counters))
    _stack_key(a, 2, -16)
    a(_call(_LOOKUP)).jump(JEQ, 0, 0, done)
    a(_mov_imm(1, 1), _insn(0xDB, 0, 1, 0, 0)).jump(JA, 0, 0, done)  # lock *(u64 *)r0 += r1


@dataclass(frozen=True)
class EventMaps:
    """The maps every event program shares (file descriptors): the traced threads' ids, each
    thread's state (task storage, ``THREAD_STATE``), the chains, the ring buffer, the per-CPU
    counters, the switch (``SWITCH``), and the chain cache (None: every event's chain is walked)."""

    tids: int
    threads: int
    stacks: int
    ring: int
    counters: int
    on: int
    cache: int | None = None


def event_program(event_id: int, static: int, extra: int, maps: EventMaps, reason_offset: int | None = None,
                  ends_run: bool = False) -> bytes:
    """The program of one tracepoint: while ``on[0]`` is set, for a thread in ``tids``, a record
    of ``HEADER`` plus the tracepoint's record after its common fields (to ``static``, its fixed
    part, then ``extra`` bytes of its __data_loc data), and the chain's id in ``stacks`` (or,
    where the stack map refuses it, the chain itself after the record).

    With a chain cache, the chain is walked only when its path key (:func:`_path_key`) is new,
    for the first ``VERIFY_FIRST`` repeats and then one in ``VERIFY_EVERY``; the others take the
    id the key had, marked ``INFERRED``. A walk that finds another chain than the key's counts
    ``MISMATCHED`` and gives the key the chain it found, with its count started anew: its next
    ``VERIFY_FIRST`` repeats are walked, so a key two paths share keeps being walked while they
    alternate, and one odd unwinding costs a hot key a few walks, not a walk on every event.
    ``reason_offset``: where the event's exit reason is (kvm_exit), which starts a new path;
    ``ends_run``: the event ends a KVM_RUN (kvm_userspace_exit), after which the path is empty."""
    payload = _payload(static, extra)
    a = _Asm()
    a(_mov(6, 1), _st(4, 10, -4, 0), _map(1, maps.on))
    _stack_key(a, 2, -4)
    a(_call(_LOOKUP)).jump(JEQ, 0, 0, "out")
    a(_ldx32(1, 0, 0)).jump(JEQ, 1, 0, "out")  # stopped: an array lookup the verifier inlines, no more
    a(_ldx32(8, 0, 4))  # the traced set's generation
    _traced_thread(a, maps)  # r7 = tid
    a(_call(_CPU), _insn(0x67, 0, 0, 0, 32), _insn(0x4F, 7, 0))  # r7 |= cpu << 32
    a(_call(_KTIME), _mov(8, 0))
    tails = [("walked", 0)]
    if maps.cache is None:
        _walk(a, maps.stacks, "walked")
    else:
        _path_key(a, event_id, reason_offset, ends_run)
        _cached_chain(a, maps)
        tails.insert(0, ("inferred", INFERRED))
    for label, flags in tails:
        a.label(label)
        _record(a, maps.ring, event_id, flags, static, extra)
    a.label("inline")
    size = HEADER.size + payload
    a(_map(1, maps.ring), _mov_imm(2, size + 8 * MAX_DEPTH), _mov_imm(3, 0), _call(_RB_RESERVE))
    a.jump(JEQ, 0, 0, "lost")
    a(_mov(9, 0))
    _fill(a, event_id, INLINE, static, extra)
    a(_mov(1, 6), _mov(2, 9), _add_imm(2, size), _mov_imm(3, 8 * MAX_DEPTH), _mov_imm(4, 0), _call(_GET_STACK))
    a(_stx32(9, 0, 16), _mov(1, 9), _mov_imm(2, RB_NO_WAKEUP), _call(_RB_SUBMIT))
    _count(a, maps.counters, INLINED, "out")
    a.label("lost")
    _count(a, maps.counters, LOST, "out")
    a.label("out")
    a(_mov_imm(0, 0), _EXIT)
    return a.code()


def _traced_thread(a: _Asm, maps: EventMaps) -> None:
    """Goto ``out`` unless the current thread is traced; r7 = its id, r10-24 = its state. The
    state is the thread's task storage, which keeps the traced set's answer (``tids``, a hash
    map) until the set's generation (r8) changes: a thread asks the set once, not every event,
    and each change starts every thread's path anew (kvmiso changes the set before it starts
    recording). The id is read every event: a thread that execs takes its leader's id. A thread
    whose storage the kernel cannot make (no memory; another BPF program holds it on this CPU)
    asks the set, and if traced its record is counted lost."""
    a(_call(_CURRENT_TASK_BTF), _mov(2, 0), _map(1, maps.threads), _mov_imm(3, 0), _mov_imm(4, STORAGE_CREATE),
      _call(_TASK_STORAGE_GET)).jump(JEQ, 0, 0, "stateless")
    a(_stx64(10, 0, -24), _ldx32(1, 0, GENERATION_AT)).jump_reg(JEQ_REG, 1, 8, "asked")
    a(_stx32(0, 8, GENERATION_AT), _st(8, 0, 0, 0), _st(4, 0, 8, 0), _st(4, 0, 12, 0))  # a new answer, a fresh path
    _in_set(a, maps.tids)
    a(_mov_imm(1, 0)).jump(JEQ, 0, 0, "answer")
    a(_mov_imm(1, 1))
    a.label("answer")
    a(_ldx64(0, 10, -24), _stx32(0, 1, TRACED_AT))
    a.label("asked")
    a(_ldx64(0, 10, -24), _ldx32(1, 0, TRACED_AT)).jump(JEQ, 1, 0, "out")
    a(_call(_PID_TGID), _insn(0xBC, 7, 0)).jump(JA, 0, 0, "traced")  # w7 = tid
    a.label("stateless")
    _in_set(a, maps.tids)
    a.jump(JEQ, 0, 0, "out").jump(JA, 0, 0, "lost")
    a.label("traced")


def _in_set(a: _Asm, tids: int) -> None:
    """r0 = the current thread's entry in ``tids`` (NULL: not traced)."""
    a(_call(_PID_TGID), _stx32(10, 0, -4), _map(1, tids))
    _stack_key(a, 2, -4)
    a(_call(_LOOKUP))


def _walk(a: _Asm, stacks: int, then: str) -> None:
    """r9 = the chain's id in ``stacks`` (walking the stack), then goto ``then`` (``inline``
    where the map refuses it)."""
    a(_mov(1, 6), _map(2, stacks), _mov_imm(3, 0), _call(_GET_STACKID), _mov(9, 0)).jump(JSLT, 9, 0, "inline")
    a.jump(JA, 0, 0, then)


def _path_key(a: _Asm, event_id: int, reason_offset: int | None, ends_run: bool) -> None:
    """The event's path key at r10-32: the thread's path (the events since its KVM_RUN began or
    its last exit, hashed in order; an exit starts it anew from its reason) with this event, and
    how deep this event's stack is below the first event of the path's (kernel stacks start at a
    random offset per system call: depths compare within one only). The path grows for
    ``PATH_EVENTS`` events, then stays, so a long run of events between two exits keeps a few
    keys; the event that ends a KVM_RUN (``ends_run``) clears it.

    The thread's state (r10-24 points at it, ``THREAD_STATE``): path, events in it, whether the
    reference depth is set, the reference, and a slot through which this program's stack pointer
    becomes a number (a pointer stored into a map reads back as one: root's programs may)."""
    a(_ldx64(1, 10, -24), _stx64(1, 10, 24), _ldx64(4, 1, 24))  # r4 = this stack pointer
    a(_ld_imm64(5, FNV_PRIME))
    if reason_offset is not None:  # an exit: a new path, from its reason, deep 0
        a(_stx64(1, 4, 16), _st(4, 1, 12, 1), _ldx32(2, 6, reason_offset), _mov_imm(3, 0), _insn(0x2F, 2, 5))
        a(_mov_imm(4, 0))
    else:
        a(_ldx32(2, 1, 12)).jump(JNE, 2, 0, "referenced")
        a(_stx64(1, 4, 16), _st(4, 1, 12, 1))  # the path's first event: its depth is the reference
        a.label("referenced")
        a(_ldx64(2, 1, 0), _ldx32(3, 1, 8), _ldx64(0, 1, 16), _insn(0x1F, 4, 0))  # r4 = depth below it
    a(_insn(0xA7, 2, 0, 0, event_id), _insn(0x2F, 2, 5))
    a.jump(JGE, 3, PATH_EVENTS, "key")
    a(_stx64(1, 2, 0), _add_imm(3, 1), _stx32(1, 3, 8))
    a.label("key")
    a(_insn(0xAF, 2, 4), _insn(0x2F, 2, 5), _stx64(10, 2, -32))  # the depth in the key, not in the path
    if ends_run:
        a(_st(8, 1, 0, 0), _st(4, 1, 8, 0), _st(4, 1, 12, 0))


def _cached_chain(a: _Asm, maps: EventMaps) -> None:
    """r9 = the chain id of the path key at r10-32, from the cache or walked (see
    :func:`event_program`); goto ``inferred`` or ``walked``."""
    assert maps.cache is not None
    a(_map(1, maps.cache))
    _stack_key(a, 2, -32)
    a(_call(_LOOKUP)).jump(JEQ, 0, 0, "new")
    a(_ldx32(1, 0, 4), _add_imm(1, 1), _stx32(0, 1, 4), _ldx32(9, 0, 0))  # seen += 1; r9 = its chain
    a.jump(JLE, 1, VERIFY_FIRST, "verify")
    a(_insn(0x57, 1, 0, 0, VERIFY_EVERY - 1)).jump(JEQ, 1, 0, "verify")
    a.jump(JA, 0, 0, "inferred")
    a.label("verify")
    a(_stx64(10, 0, -40), _mov(1, 6), _map(2, maps.stacks), _mov_imm(3, 0), _call(_GET_STACKID))
    a.jump(JSLT, 0, 0, "inline")
    a.jump_reg(JEQ_REG, 0, 9, "verified")
    a(_mov(9, 0), _ldx64(1, 10, -40), _stx32(1, 9, 0), _st(4, 1, 4, 0))  # the walked chain, seen from 0
    _count(a, maps.counters, MISMATCHED, "walked")
    a.label("verified")
    a(_mov(9, 0)).jump(JA, 0, 0, "walked")
    a.label("new")
    a(_mov(1, 6), _map(2, maps.stacks), _mov_imm(3, 0), _call(_GET_STACKID), _mov(9, 0)).jump(JSLT, 9, 0, "inline")
    a(_stx32(10, 9, -48), _st(4, 10, -44, 0), _map(1, maps.cache))  # repeats seen: 0
    _stack_key(a, 2, -32)
    a(_mov(3, 10), _add_imm(3, -48), _mov_imm(4, BPF_NOEXIST), _call(_UPDATE)).jump(JA, 0, 0, "walked")


def _record(a: _Asm, ring: int, event_id: int, flags: int, static: int, extra: int) -> None:
    """Reserve, fill and submit the record of chain id r9 (goto ``lost`` where the ring is full),
    then goto ``out``."""
    size = HEADER.size + _payload(static, extra)
    a(_map(1, ring), _mov_imm(2, size), _mov_imm(3, 0), _call(_RB_RESERVE)).jump(JEQ, 0, 0, "lost")
    a(_stx32(0, 9, 16), _mov(9, 0))
    _fill(a, event_id, flags, static, extra)
    a(_mov(1, 9), _mov_imm(2, RB_NO_WAKEUP), _call(_RB_SUBMIT)).jump(JA, 0, 0, "out")


def _payload(static: int, extra: int) -> int:
    """Bytes a record keeps after its common fields, rounded up to 8."""
    return (max(static, 8) - 8 + extra + 7) & ~7


def _fill(a: _Asm, event_id: int, flags: int, static: int, extra: int) -> None:
    """The record at r9: the header (r7: cpu << 32 | tid, r8: time) and the tracepoint's record
    from the context r6, from offset 8 (a tracepoint program's context has the perf probe's
    pt_regs pointer where the common fields were) to ``static``, each load within the record
    (the kernel refuses to attach a program that reads past it), then ``extra`` bytes after it
    with bpf_probe_read_kernel (the __data_loc data; the verifier cannot bound it)."""
    a(_st(2, 9, 0, event_id), _st(2, 9, 2, flags), _stx32(9, 7, 4), _stx64(9, 8, 8))
    a(_mov(1, 7), _insn(0x77, 1, 0, 0, 32), _stx32(9, 1, 20))
    off = 8
    for size, ld, st in ((8, 0x79, 0x7B), (4, 0x61, 0x63), (2, 0x69, 0x6B), (1, 0x71, 0x73)):
        while off + size <= static:
            a(_insn(ld, 1, 6, off), _insn(st, 9, 1, HEADER.size + off - 8))
            off += size
    if extra:
        a(_mov(1, 9), _add_imm(1, HEADER.size + static - 8), _mov_imm(2, extra), _mov(3, 6), _add_imm(3, static),
          _call(_PROBE_READ_KERNEL))


def fork_program(tids: int, child_pid_offset: int) -> bytes:
    """sched_process_fork: a thread or child of a traced thread is traced too (tracefs's
    ``event-fork``); it fires in the parent. (The child's state is made at its first event.)"""
    a = _Asm()
    a(_mov(6, 1))
    _in_set(a, tids)
    a.jump(JEQ, 0, 0, "out")
    a(_ldx32(1, 6, child_pid_offset), _stx32(10, 1, -8), _st(4, 10, -12, 1), _map(1, tids))
    _stack_key(a, 2, -8)
    a(_mov(3, 10), _add_imm(3, -12), _mov_imm(4, 0), _call(_UPDATE))
    a.label("out")
    a(_mov_imm(0, 0), _EXIT)
    return a.code()


def exit_program(tids: int) -> bytes:
    """sched_process_exit: a traced thread that ends leaves the set (its id may be reused)."""
    a = _Asm()
    a(_call(_PID_TGID), _stx32(10, 0, -4), _map(1, tids))
    _stack_key(a, 2, -4)
    a(_call(_DELETE), _mov_imm(0, 0), _EXIT)
    return a.code()


def tid_program(out: int) -> bytes:
    """Run by BPF_PROG_TEST_RUN in the calling thread: out[0] = its thread id as the kernel
    knows it (the initial PID namespace's, which the records carry)."""
    a = _Asm()
    a(_call(_PID_TGID), _mov(7, 0), _st(4, 10, -4, 0), _map(1, out))
    _stack_key(a, 2, -4)
    a(_call(_LOOKUP)).jump(JEQ, 0, 0, "out")
    a(_stx64(0, 7, 0))
    a.label("out")
    a(_mov_imm(0, 0), _EXIT)
    return a.code()


__all__ = ["CACHE_ENTRY", "COUNTERS", "EventMaps", "HEADER", "INFERRED", "INLINE", "INLINED", "LOST", "MAX_DEPTH",
           "MISMATCHED", "SWITCH", "THREAD_STATE", "VERIFY_EVERY", "VERIFY_FIRST", "event_program", "exit_program",
           "fork_program", "tid_program"]
