"""Fuzzing the harness: random payloads — random bytes, or random instruction sequences from a
small generator — run one after another on one reused VM per mode. Every run must end in a
classified :class:`RunResult`; the harness must not crash, hang or leak.

>>> stats = fuzz("long-cpl3", 100, seed=20261124, kvm=kvm)
>>> sum(stats.outcomes.values()), all(isinstance(o, Outcome) for o in stats.outcomes)
(100, True)

(2,000 cases of that seed with 2 jobs on kvm_pvm ended mostly in an exception (1,426), DONE
(194) and a timeout (153); timeouts vary a little with the host's load.)

A case is reproducible from its label: ``Fuzzer(target).run(make_case(target, kind, seed, i).code)``.
"""

from __future__ import annotations

import json
import random
import threading
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import psutil

from ..kvm import Kvm
from .deadline import GuestTimeout
from .machine import Machine
from .result import Outcome, RunResult
from .threads import run_in_threads

# target name -> (mode, CPL)
TARGETS = {"real": ("real", 0), "protected": ("protected", 0), "long": ("long", 0), "long-cpl3": ("long", 3)}
KINDS = ("bytes", "insns")
CARRIER = "hostile_fuzz"  # guests/hostile_fuzz.S: jumps to fuzz_code, FUZZ_SIZE bytes we fill
DONE_UCALL = b"\xb0\x01\xe6\xea"  # mov $1, %al; out %al, $0xea: what a payload that falls through reports

_VALUES = (0, 1, 2, 0x7F, 0x80, 0xFF, 0xE9, 0xEA, 0x1000, 0x8000, 0xFFFF, 0x100000, 0x40000000,
           0xD0000000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
_PORTS = (0xE9, 0xEA, 0x80, 0x20, 0x60, 0x70, 0x3F8, 0xCF8, 0xCFC)
_MSRS = (0x10, 0x1B, 0x3A, 0x8B, 0x10A, 0x174, 0x176, 0x1D9, 0x277, 0xC0000080, 0xC0000081,
         0xC0000082, 0xC0000100, 0xC0000102, 0x4B564D00, 0x4B564D01, 0x40000000)


def _value(rng: random.Random, size: int) -> bytes:
    v = rng.choice(_VALUES) if rng.random() < 0.7 else rng.getrandbits(32)
    return (v & ((1 << (8 * size)) - 1)).to_bytes(size, "little")


def _reg(rng: random.Random) -> int:
    return rng.randrange(8)


def _mem_rm(rng: random.Random, bits: int) -> int:
    """A register-indirect r/m that needs no SIB byte or displacement in this mode."""
    return rng.choice((0, 1, 2, 3, 4, 5, 7) if bits == 16 else (0, 1, 2, 3, 6, 7))


def _imm_size(bits: int) -> int:
    return 2 if bits == 16 else 4


def _mov_imm(rng, bits):  # mov $v, %reg
    return bytes([0xB8 + _reg(rng)]) + _value(rng, _imm_size(bits))


def _alu(rng, bits):  # add/or/and/sub/xor/cmp/test/xchg/mov %reg, %reg
    return bytes([rng.choice((0x01, 0x09, 0x21, 0x29, 0x31, 0x39, 0x85, 0x87, 0x89)), 0xC0 | _reg(rng) << 3 | _reg(rng)])


def _unary(rng, bits):  # inc dec not neg mul imul div idiv %reg (div may raise #DE)
    op = rng.choice(((0xFF, 0), (0xFF, 1), (0xF7, 2), (0xF7, 3), (0xF7, 4), (0xF7, 5), (0xF7, 6), (0xF7, 7)))
    return bytes([op[0], 0xC0 | op[1] << 3 | _reg(rng)])


def _stack(rng, bits):  # push/pop %reg, pushf/popf
    return bytes([rng.choice((0x50 + _reg(rng), 0x58 + _reg(rng), 0x9C, 0x9D))])


def _load_store(rng, bits):  # mov (%reg), %reg / mov %reg, (%reg)
    return bytes([rng.choice((0x8B, 0x89)), _reg(rng) << 3 | _mem_rm(rng, bits)])


def _io(rng, bits):  # in/out on an immediate port or %dx, rep ins/outs
    port = rng.choice(_PORTS) if rng.random() < 0.8 else rng.getrandbits(16)
    form = rng.randrange(4)
    if form == 0 and port < 256:
        return bytes([rng.choice((0xE4, 0xE5, 0xE6, 0xE7)), port])
    head = b"\xba" + port.to_bytes(2, "little") + (b"\x00\x00" if bits != 16 else b"")  # mov $port, %edx
    if form == 3:
        return head + b"\xb9" + _value(rng, _imm_size(bits)) + bytes([0xF3, rng.choice((0x6C, 0x6E))])
    return head + bytes([rng.choice((0xEC, 0xED, 0xEE, 0xEF))])


def _ucall(rng, bits):  # mov $n, %al; out %al, $0xea — known calls and unknown numbers
    return bytes([0xB0, rng.choice((1, 2, 3, 4, 0, 5, 0xFF)), 0xE6, 0xEA])


def _msr(rng, bits):  # mov $msr, %ecx; rdmsr/wrmsr
    prefix = b"\x66" if bits == 16 else b""
    return prefix + b"\xb9" + rng.choice(_MSRS).to_bytes(4, "little") + rng.choice((b"\x0f\x32", b"\x0f\x30"))


def _system(rng, bits):  # one privileged or trapping instruction
    return rng.choice((
        b"\xfa", b"\xfb", b"\xf4", b"\xcc", b"\x0f\x0b", b"\x0f\xa2", b"\x0f\x31", b"\x0f\x01\xc1",
        b"\x0f\x05", b"\xcf", b"\x90", b"\xf3\x90", b"\x0f\x20\xc0", b"\xcd" + bytes([rng.getrandbits(8)]),
        bytes([0x0F, 0x22, 0xC0 | rng.choice((0, 2, 3, 4)) << 3 | _reg(rng)]),  # mov %reg, %crN
        bytes([0x0F, 0x01, rng.choice((2, 3)) << 3 | _mem_rm(rng, bits)]),  # lgdt/lidt (%reg)
        bytes([0x8E, 0xC0 | rng.randrange(6) << 3 | _reg(rng)]),  # mov %reg, %sreg
    ))


def _control(rng, bits):  # short jumps (rel -2 is a tight loop), jcc, loop, call/ret
    rel = rng.randrange(-8, 9) & 0xFF
    return rng.choice((bytes([0xEB, rel]), bytes([0x70 + rng.randrange(16), rel]), bytes([0xE2, rel]),
                       b"\xe8" + bytes(_imm_size(bits)), b"\xc3"))


def _string(rng, bits):  # mov $n, %ecx; rep stos/movs: bulk writes over guest memory
    return b"\xb9" + _value(rng, _imm_size(bits)) + rng.choice((b"\xf3\xaa", b"\xf3\xab", b"\xf3\xa4"))


_TEMPLATES: tuple[tuple[int, Callable[[random.Random, int], bytes]], ...] = (
    (6, _mov_imm), (6, _alu), (3, _unary), (3, _stack), (3, _load_store), (4, _io), (2, _ucall),
    (1, _msr), (3, _system), (2, _control), (1, _string),
)
_FUNCS = [f for _, f in _TEMPLATES]
_WEIGHTS = [w for w, _ in _TEMPLATES]


def random_instructions(rng: random.Random, bits: int, count: int) -> bytes:
    """``count`` random instructions for ``bits``-bit code, drawn from the templates above."""
    return b"".join(f(rng, bits) for f in rng.choices(_FUNCS, _WEIGHTS, k=count))


@dataclass(frozen=True)
class Case:
    """One fuzz payload: ``code`` (ending in a DONE ucall) and the label that reproduces it."""

    target: str
    kind: str
    seed: int
    index: int
    code: bytes

    @property
    def label(self) -> str:
        """``target/kind/seed S/#i``: enough to make the case again with :func:`make_case`."""
        return f"{self.target}/{self.kind}/seed {self.seed}/#{self.index}"


def make_case(target: str, kind: str, seed: int, index: int) -> Case:
    """The ``index``-th case of ``seed`` for ``target``: the same arguments give the same bytes."""
    rng = random.Random(f"{seed}:{target}:{kind}:{index}")
    bits = {"real": 16, "protected": 32}.get(TARGETS[target][0], 64)
    if kind == "bytes":
        body = rng.randbytes(rng.randrange(1, 257))
    elif kind == "insns":
        body = random_instructions(rng, bits, rng.randrange(1, 33))
    else:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return Case(target, kind, seed, index, body + DONE_UCALL)


@dataclass
class FuzzStats:
    """What a fuzz run produced: outcomes (overall and per kind), and every harness failure."""

    target: str
    runs: int = 0
    kvm_runs: int = 0  # KVM_RUN calls, over all cases
    elapsed: float = 0.0
    outcomes: Counter = field(default_factory=Counter)
    by_kind: dict[str, Counter] = field(default_factory=dict)
    errors: list[tuple[str, str]] = field(default_factory=list)  # (case label, traceback): harness bugs
    unclassified: list[tuple[str, str, str]] = field(default_factory=list)  # (label, outcome, detail)
    jobs: int = 1  # machines that ran the cases side by side
    setup_ns: list[int] = field(default_factory=list)  # per case: Machine.reset() and writing the payload

    @property
    def per_second(self) -> float:
        """Payloads per second of wall-clock time (0 before any ran)."""
        return self.runs / self.elapsed if self.elapsed else 0.0

    def add(self, other: "FuzzStats") -> None:
        """Count ``other``'s cases in with these (one target run by several machines)."""
        self.runs += other.runs
        self.kvm_runs += other.kvm_runs
        self.outcomes.update(other.outcomes)
        for kind, c in other.by_kind.items():
            self.by_kind.setdefault(kind, Counter()).update(c)
        self.errors += other.errors
        self.unclassified += other.unclassified
        self.setup_ns += other.setup_ns


class Fuzzer:
    """One Machine for ``target`` running the carrier payload, reset before every case."""

    def __init__(self, target: str, timeout: float = 0.03, kvm: Kvm | None = None) -> None:
        if target not in TARGETS:
            raise ValueError(f"target must be one of {', '.join(TARGETS)}, not {target!r}")
        mode, cpl = TARGETS[target]
        self.target, self.timeout = target, timeout
        self.machine = Machine(CARRIER, mode=mode, cpl=cpl, kvm=kvm)
        self._at = self.machine.image.symbols["fuzz_code"]
        self.last_setup_ns = 0  # what the last case's reset and payload write took
        self._room = self.machine.image.symbols["fuzz_end"] - self._at

    def close(self) -> None:
        """Close the machine the cases run in."""
        self.machine.close()

    def __enter__(self) -> "Fuzzer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def run(self, code: bytes) -> RunResult:
        """Reset the VM, put ``code`` at fuzz_code, run it with the short timeout. Exits are
        counted, not recorded: a payload may make thousands, and the allocator's growth
        for them would blur the leak check."""
        if len(code) > self._room:
            raise ValueError(f"a fuzz payload holds at most {self._room} bytes, not {len(code)}")
        t0 = time.perf_counter_ns()
        self.machine.reset()
        self.machine.vm.write(self._at, code)
        self.last_setup_ns = time.perf_counter_ns() - t0
        try:
            return self.machine.run(timeout=self.timeout, record=False)
        except GuestTimeout as e:
            return e.result

    def run_many(self, count: int, seed: int = 0, kinds: tuple[str, ...] = KINDS,
                 start: int = 0, step: int = 1, stop: threading.Event | None = None) -> FuzzStats:
        """Cases ``start, start + step, ...`` below ``count``, alternating ``kinds``; harness
        exceptions are recorded, not raised. ``stop`` ends the run between two cases."""
        stats = FuzzStats(self.target, by_kind={k: Counter() for k in kinds})
        t0 = time.perf_counter()
        for i in range(start, count, step):
            if stop is not None and stop.is_set():
                break
            case = make_case(self.target, kinds[i % len(kinds)], seed, i)
            try:
                r = self.run(case.code)
                json.dumps(r.to_dict())  # every result must serialize, whatever the guest did
            except Exception:
                stats.errors.append((case.label, traceback.format_exc()))
                continue
            stats.runs += 1
            stats.kvm_runs += r.runs
            stats.setup_ns.append(self.last_setup_ns)
            stats.outcomes[r.outcome] += 1
            stats.by_kind[case.kind][r.outcome] += 1
            if not isinstance(r.outcome, Outcome) or not r.detail:
                stats.unclassified.append((case.label, r.outcome, r.detail))
        stats.elapsed = time.perf_counter() - t0
        return stats


def fuzz(target: str, count: int, seed: int = 0, kinds: tuple[str, ...] = KINDS, timeout: float = 0.03,
         jobs: int = 1, kvm: Kvm | None = None) -> FuzzStats:
    """``count`` cases for ``target`` on ``jobs`` machines, one thread each (case ``i`` on
    machine ``i % jobs``): the same cases and outcomes as one machine, in less time where CPUs
    are free, since a guest runs inside KVM_RUN without holding the GIL. Ctrl-C kicks every
    machine's vCPU and waits for its thread before going up."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, not {jobs}")
    fuzzers: list[Fuzzer] = []
    stop = threading.Event()
    parts: list[FuzzStats] = []
    try:
        for _ in range(jobs):
            fuzzers.append(Fuzzer(target, timeout, kvm))
            parts.append(FuzzStats(target))

        def work(j: int) -> None:
            parts[j] = fuzzers[j].run_many(count, seed, kinds, start=j, step=jobs, stop=stop)

        t0 = time.perf_counter()
        errors = run_in_threads(work, [f.machine.vcpu for f in fuzzers], f"kvmiso-fuzz-{target}", before_kick=stop.set)
        elapsed = time.perf_counter() - t0
    finally:
        for f in fuzzers:
            f.close()
    for e in errors:
        if e is not None:
            raise e
    total = FuzzStats(target, by_kind={k: Counter() for k in kinds}, elapsed=elapsed, jobs=jobs)
    for part in parts:
        total.add(part)
    return total


@dataclass(frozen=True)
class Resources:
    """What a leak would show: open fds, memory mappings and threads of this process."""

    fds: int
    maps: int
    threads: int

    @classmethod
    def now(cls) -> "Resources":
        """This process's open fds, mappings and threads, now."""
        p = psutil.Process()
        return cls(p.num_fds(), len(p.memory_maps(grouped=False)), p.num_threads())
