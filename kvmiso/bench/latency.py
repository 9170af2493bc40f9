"""KVM_RUN round trips per exit kind, measured after pyperf: pinned, warmed up, several runs of
many samples, floors in the same run, the host fingerprint in the result.

>>> from kvmiso.bench import format_table
>>> with Kvm() as kvm:
...     result = bench(kvm, kinds=["out"], samples=500, runs=3)
>>> print(format_table(result))
kind            cpl  path  ...
null_ioctl      -    c ...
out             0    c ...
out             0    python ...

Each run builds a fresh VM (pyperf runs fresh processes; a fresh VM is this harness's analogue:
new memory, new vCPU, new kvm_run page). Kinds that exit to userspace are timed per KVM_RUN by
the compiled loop and by the Python API; kinds KVM handles in the kernel are timed by the guest
with RDTSC around ``iterations`` executions (as kvm-unit-tests x86/vmexit.c does) and by the
host as the time of the KVM_RUN that holds them, divided by ``iterations``.
"""

from __future__ import annotations

import contextlib
import statistics
import struct
import threading
import time
from typing import Any, Callable, Iterable, Iterator

from ..guest import Machine, build
from ..guest.threads import run_in_threads
from ..interrupt import Interrupted
from ..guest.ucall import PORT_UCALL, GuestException, MalformedUcall, decode_ucall
from ..kvm import Kvm
from ..kvm.exitdecode import decode
from ..kvm.exits import IoExit
from ..kvm.vm import PAGE_SIZE
from . import runloop
from .environment import host_facts, pin, unpin
from .kinds import DEFAULT_KINDS, KINDS, Kind
from .results import BenchResult, Result
from .runloop import LoopError, Timings
from .samples import percentile, stable_p50, summarize_samples, unstable_runs, warnings

BENCH_MEMORY = 8 << 20  # guest RAM: room for the page-fault region above FAULT_BASE
MAX_FAULT_PAGES = 512  # pages one page-fault batch touches at most


# --- measuring -----------------------------------------------------------------------------------

def _result(kind: str, path: str, cpl: int | None, per_run: list[list[float]], **kw) -> Result:
    pooled = [v for run in per_run for v in run]
    summary = summarize_samples(pooled)
    runs = [{"n": len(r), "mean": statistics.fmean(r), "p50": percentile(sorted(r), 50)}
            for r in per_run if r]
    summary["stable_p50"] = stable_p50([r["p50"] for r in runs], [r["mean"] for r in runs])
    return Result(kind, path, cpl, summary, runs, warnings([r["mean"] for r in runs], [r["p50"] for r in runs]),
                  samples=pooled, **kw)


class _Collector:
    """Per-run samples of one (kind, path, cpl), kept even when a run is cut short."""

    def __init__(self) -> None:
        self.rows: dict[tuple, list[list[float]]] = {}
        self.meta: dict[tuple, dict[str, Any]] = {}
        self.replaced: dict[tuple, int] = {}  # unstable runs measured again, per key

    def add(self, key: tuple, values: list[float], **meta) -> None:
        if values:
            self.rows.setdefault(key, []).append(values)
        m = self.meta.setdefault(key, {})
        for k, v in meta.items():
            m.setdefault(k, []).append(v)
        self.replaced.setdefault(key, 0)

    def drop_run(self, key: tuple, index: int, unstable: bool) -> None:
        """Forget run ``index`` of ``key`` (and its per-run facts); count it if it was unstable."""
        self.rows[key].pop(index)
        for values in self.meta.get(key, {}).values():
            if index < len(values):
                values.pop(index)
        self.replaced[key] += unstable

    def keep_stable(self, keys: Iterable[tuple], runs: int) -> bool:
        """Back to ``runs`` runs per key, dropping the one farthest from the others (unstable or
        not) where a key has more; whether any key still holds an unstable run."""
        left = False
        for key in keys:
            per_run = self.rows.get(key, [])
            p50s = [percentile(sorted(r), 50) for r in per_run]
            means = [statistics.fmean(r) for r in per_run]
            bad = unstable_runs(p50s, means)
            if len(per_run) > runs:
                mid = statistics.median(p50s)
                worst = max(range(len(p50s)), key=lambda i: (i in bad, abs(p50s[i] - mid)))
                self.drop_run(key, worst, worst in bad)
                bad = [i for i in bad if i != worst]
            left = left or bool(bad)
        return left


@contextlib.contextmanager
def _explained(m: Machine) -> Iterator[None]:
    """Turn "unexpected exit IO" into what the guest did, when it was a crt0 exception report."""
    try:
        yield
    except LoopError as e:
        exit = decode(m.vcpu.page)
        if isinstance(exit, IoExit) and exit.port == PORT_UCALL and not exit.is_in:
            try:
                u = decode_ucall(exit.value & 0xFF, m.vcpu.get_regs(), m.bits)
            except MalformedUcall:
                raise e from None
            if isinstance(u, GuestException):
                raise LoopError(f"the guest took {u}", e.timings, e.reason) from None
        raise


def _emulated(st, before, iterations: int) -> float | None:
    delta = (st.snapshot() - before).get("insn_emulation")
    return None if delta is None else delta / iterations


def _measure_exit_kind(kvm: Kvm, kind: Kind, cpl: int, n: int, warmup: int, col: _Collector,
                       python: bool) -> None:
    """One run of a kind that exits to userspace: compiled loop, then the Python API."""
    with Machine(build(kind.guest, "long"), cpl=cpl, kvm=kvm) as m, m.vcpu.stats() as st, _explained(m):
        args = dict(expect=kind.exit, port=m.image.symbols["PORT_BENCH"] if kind.exit == "io" else None,
                    reply=kind.reply)
        runloop.compiled_loop(m.vcpu, warmup, **args)
        before = st.snapshot()
        try:
            t = runloop.compiled_loop(m.vcpu, n, **args)
        except Interrupted as e:
            if e.partial is not None:  # None: it came before the first round trip
                col.add((kind.name, "c", cpl), e.partial.latencies())
            raise
        cycles = t.cycles()
        col.add((kind.name, "c", cpl), t.latencies(), emulated=_emulated(st, before, t.n),
                period_p50=percentile(sorted(t.periods()), 50),
                tsc_p50=percentile(sorted(cycles), 50) if cycles else None)
        if python:
            runloop.python_loop(m.vcpu, warmup, **args)
            try:
                t = runloop.python_loop(m.vcpu, n, **args)
            except Interrupted as e:
                if e.partial is not None:
                    col.add((kind.name, "python", cpl), e.partial.latencies())
                raise
            col.add((kind.name, "python", cpl), t.latencies(),
                    period_p50=percentile(sorted(t.periods()), 50))


def _measure_in_kernel(kvm: Kvm, kind: Kind, cpl: int, batches: int, warmup: int, iterations: int,
                       col: _Collector, tsc_hz: float | None) -> None:
    """One run of a kind KVM handles inside the kernel: batches of ``iterations``, one exit each
    (at most as many as the guest's result ring holds)."""
    image = build(kind.guest, "long")
    sym = image.symbols  # guests/lib/bench_batch.inc and the payload name these
    batches = min(batches, sym["RESULTS_MASK"] + 1 - warmup)
    with Machine(image, cpl=cpl, kvm=kvm, memory=BENCH_MEMORY) as m, m.vcpu.stats() as st, _explained(m):
        m.vm.write(sym["iterations"], struct.pack("<Q", iterations))
        zap = (m.vm.host_address(sym["FAULT_BASE"]), iterations * PAGE_SIZE) if kind.name == "page_fault" else None
        runloop.compiled_loop(m.vcpu, warmup, "io", sym["PORT_BENCH"], zap=zap)
        before = st.snapshot()
        try:
            t = runloop.compiled_loop(m.vcpu, batches, "io", sym["PORT_BENCH"], zap=zap)
        except Interrupted as e:
            if e.partial is not None:
                _in_kernel_rows(m, kind, cpl, e.partial, warmup, iterations, col, tsc_hz, None)
            raise
        _in_kernel_rows(m, kind, cpl, t, warmup, iterations, col, tsc_hz,
                        _emulated(st, before, t.n * iterations))


def _in_kernel_rows(m: Machine, kind: Kind, cpl: int, t: Timings, warmup: int, iterations: int,
                    col: _Collector, tsc_hz: float | None, emulated: float | None) -> None:
    col.add((kind.name, "host", cpl), [x / iterations for x in t.latencies()], emulated=emulated)
    hz = t.tsc_hz() or tsc_hz
    if hz and t.n:
        cycles = guest_cycles(m, warmup, t.n)
        col.add((kind.name, "guest", cpl), [c / iterations * 1e9 / hz for c in cycles], emulated=emulated)


def guest_cycles(m: Machine, first: int, n: int) -> list[int]:
    """The TSC deltas an in-kernel benchmark guest stored for batches ``first`` to ``first + n``
    (guests/lib/bench_batch.inc: batch k at SCRATCH + 8 * (k mod RESULTS_MASK + 1))."""
    ring = m.image.symbols["RESULTS_MASK"] + 1
    raw = m.vm.read(m.image.symbols["SCRATCH"], 8 * ring)
    return [struct.unpack_from("<Q", raw, 8 * ((first + k) % ring))[0] for k in range(n)]


def _measure_vm_create(kvm: Kvm, cpl: int, n: int, col: _Collector) -> None:
    """VM, memory, vCPU, registers and the first KVM_RUN to its first exit, via Machine."""
    image = build("bench_out", "long")
    port = image.symbols["PORT_BENCH"]
    values = []
    try:
        for _ in range(n):
            t0 = time.monotonic_ns()
            m = Machine(image, cpl=cpl, kvm=kvm)
            try:
                e = m.vcpu.run()
                t1 = time.monotonic_ns()
            finally:
                m.close()
            if not (isinstance(e, IoExit) and e.port == port):
                raise LoopError(f"the first exit was {e!r}, not the OUT to port {port:#x}", Timings([], []))
            values.append(t1 - t0)
    finally:
        col.add(("vm_create", "python", cpl), values)


def _measure_parallel(kvm: Kvm, cpl: int, nvcpus: int, cpus: list[int], n: int, warmup: int,
                      col: _Collector) -> None:
    """``nvcpus`` vCPUs of one VM, each running the OUT loop in its own thread on its own CPU."""
    import psutil

    with Machine(build("bench_out", "long"), cpl=cpl, kvm=kvm, vcpus=nvcpus) as m:
        out: dict[int, Timings] = {}
        barrier = threading.Barrier(nvcpus)
        port = m.image.symbols["PORT_BENCH"]

        def worker(i: int) -> None:
            try:
                psutil.Process(threading.get_native_id()).cpu_affinity([cpus[i]])
                runloop.compiled_loop(m.vcpus[i], warmup, "io", port)
                barrier.wait()
                out[i] = runloop.compiled_loop(m.vcpus[i], n, "io", port)
            except BaseException:
                barrier.abort()  # the other vCPU's thread stops waiting for this one
                raise

        for e in run_in_threads(worker, m.vcpus, "kvmiso-bench-vcpu"):
            if e is not None:
                raise e
        wall = max(o.t_end[-1] for o in out.values()) - min(o.t_start[0] for o in out.values())
        col.add((f"parallel_{nvcpus}", "c", cpl), [x for o in out.values() for x in o.latencies()],
                exits_per_s=nvcpus * n * 1e9 / wall)


def _measure_floors(kvm: Kvm, n: int, warmup: int, col: _Collector, python: bool) -> float | None:
    """The null ioctl, the bare syscall and KVM_RUN that returns before entering the guest
    (immediate_exit); returns the TSC rate the C loop calibrated."""
    runloop.null_ioctl_loop(kvm, warmup)
    t = runloop.null_ioctl_loop(kvm, n)
    col.add(("null_ioctl", "c", None), t.latencies())
    runloop.syscall_loop(warmup)
    col.add(("syscall", "c", None), runloop.syscall_loop(n).latencies())
    with Machine(build("bench_out", "long"), kvm=kvm) as m:
        runloop.immediate_exit_loop(m.vcpu, warmup)
        col.add(("immediate_exit", "c", None), runloop.immediate_exit_loop(m.vcpu, n).latencies())
        if python:
            runloop.python_immediate_exit_loop(m.vcpu, warmup)
            col.add(("immediate_exit", "python", None), runloop.python_immediate_exit_loop(m.vcpu, n).latencies())
    if python:
        runloop.python_null_ioctl_loop(kvm, warmup)
        col.add(("null_ioctl", "python", None), runloop.python_null_ioctl_loop(kvm, n).latencies())
    return t.tsc_hz()


def skip_reason(kind: Kind, cpl: int, host: dict[str, Any]) -> str | None:
    """Why ``kind`` cannot run at ``cpl`` on this host, or None."""
    if cpl == 3 and kind.cpl3:
        return kind.cpl3
    if kind.name == "hypercall" and cpl == 0 and host.get("cpl0_hypercall_returns") is False:
        return ("a CPL0 hypercall never returns on this host (the probe's guest did not get past it): "
                "KVM executes it again and again inside one KVM_RUN")
    if kind.name == "cpuid" and host.get("cpuid_intercepted", {}).get(f"cpl{cpl}") is False:
        return (f"CPUID at CPL{cpl} is not intercepted on this host (the probe's guest read the host "
                "CPU's own values, not the CPUID KVM was given): the row would time the bare "
                "instruction, not a round trip into KVM")
    if kind.name == "parallel" and len(host["pinning"].get("allowed") or []) < 2:
        return "2 vCPUs in parallel need 2 CPUs this process may run on"
    return None


def bench(kvm: Kvm, kinds: Iterable[str] = DEFAULT_KINDS, cpls: Iterable[int] = (0,), samples: int = 5000,
          runs: int = 5, warmup: int | None = None, iterations: int = 100, cpu: int | None = None,
          python: bool = True, progress: Callable[[str], None] | None = None) -> BenchResult:
    """Measure ``kinds`` at each CPL in ``cpls``, plus the floors; ``runs`` runs of ``samples``.

    Kinds the host cannot run are skipped with the reason; a kind that fails at run time is
    skipped with what happened. Ctrl-C returns what was measured, marked incomplete.
    """
    kinds, cpls = list(kinds), list(cpls)
    for k in kinds:
        if k not in KINDS:
            raise ValueError(f"unknown benchmark kind {k!r}; kinds: {', '.join(KINDS)}")
    if samples < 2 or runs < 1 or iterations < 1:
        raise ValueError("need at least 2 samples, 1 run and 1 iteration per sample")
    warmup = max(10, samples // 10) if warmup is None else warmup
    pinning = pin(cpu)
    try:
        host = host_facts(kvm, pinning)
        settings = {"kinds": kinds, "cpls": cpls, "samples": samples, "runs": runs, "warmup": warmup,
                    "iterations": iterations, "python": python, "clock": "CLOCK_MONOTONIC",
                    "batches": min(samples, max(20, samples // 10)),
                    "vm_create_samples": min(100, max(5, samples // 100))}
        out = BenchResult(host, settings)
        col = _Collector()
        plan = [(None, None, "floors")] + [(KINDS[k], cpl, k) for cpl in cpls for k in kinds]
        current = ""
        try:
            for i, (kind, cpl, label) in enumerate(plan, 1):
                if kind is not None:
                    reason = skip_reason(kind, cpl, host)
                    if reason:
                        out.skipped.append({"kind": kind.name, "cpl": cpl, "reason": reason})
                        continue
                current = f"{label}" + (f" at CPL{cpl}" if cpl is not None else "")

                def one_run(r: int, why: str = "") -> None:
                    if progress:
                        progress(f"[{i}/{len(plan)}] {current}, run {r + 1}/{runs}{why}")
                    _measure_one(kvm, kind, cpl, label, settings, host, col, python, pinning)

                failed = _stable_runs(one_run, col, runs)
                if failed:
                    out.skipped.append({"kind": label, "cpl": cpl, "reason": failed})
        except KeyboardInterrupt as e:  # SIGINT or SIGTERM: the result keeps what was measured
            out.complete = False
            out.interrupted_by = Interrupted.of(e).signal.name
            out.incomplete_reason = f"interrupted by {out.interrupted_by} during {current}"
        out.results = _rows(col, settings)
        return out
    finally:
        unpin(pinning)


def _stable_runs(one_run: Callable[..., None], col: _Collector, runs: int) -> str:
    """``runs`` runs of one plan entry; a run a noisy neighbour disturbed (off its siblings by
    the instability threshold) is measured again, within a budget of as many extra runs,
    instead of being pooled. What went wrong, or ""."""
    before, at = set(col.rows), 0
    try:
        for at in range(runs):
            one_run(at)
        for at in range(runs, 2 * runs):
            if not col.keep_stable(set(col.rows) - before, runs):
                break
            one_run(at, " (again: an unstable run)")
        col.keep_stable(set(col.rows) - before, runs)
    except (LoopError, OSError) as e:
        return f"failed in run {at + 1}: {e}"
    return ""


def _measure_one(kvm: Kvm, kind: Kind | None, cpl: int | None, label: str, settings: dict[str, Any],
                 host: dict[str, Any], col: _Collector, python: bool, pinning: dict[str, Any]) -> None:
    """One run of one plan entry (``kind`` None: the floors)."""
    n, warmup = settings["samples"], settings["warmup"]
    if kind is None:
        hz = _measure_floors(kvm, n, warmup, col, python)
        if hz:
            host["tsc"]["hz"] = hz
    elif kind.name == "vm_create":
        _measure_vm_create(kvm, cpl, settings["vm_create_samples"], col)
    elif kind.name == "parallel":
        first = pinning.get("cpu")  # vCPU 0 where the rest of the run is pinned, if it is
        cpus = ([first] if first is not None else []) + [c for c in pinning["allowed"] if c != first]
        for nv in (1, 2):
            _measure_parallel(kvm, cpl, nv, cpus, n, warmup, col)
    elif kind.in_kernel:
        iterations = min(settings["iterations"], MAX_FAULT_PAGES) if kind.name == "page_fault" else settings["iterations"]
        _measure_in_kernel(kvm, kind, cpl, settings["batches"], min(warmup, 50), iterations, col,
                           host["tsc"].get("hz"))
    else:
        _measure_exit_kind(kvm, kind, cpl, n, warmup, col, python)


def _rows(col: _Collector, settings: dict[str, Any]) -> list[Result]:
    rows = []
    for key, per_run in col.rows.items():
        kind, path, cpl = key
        meta = col.meta.get(key, {})
        base = KINDS.get("parallel" if kind.startswith("parallel_") else kind)
        in_kernel = base is not None and base.in_kernel
        iterations = settings["iterations"] if in_kernel else 1
        if kind == "page_fault":
            iterations = min(iterations, MAX_FAULT_PAGES)
        emulated = [e for e in meta.get("emulated", []) if e is not None]
        extra = {}
        for k in ("period_p50", "tsc_p50", "exits_per_s"):  # per run
            if meta.get(k):
                extra[k] = [v for v in meta[k] if v is not None]
        rows.append(_result(kind, path, cpl, per_run, iterations=iterations,
                            insns=base.insns if base else None,
                            emulated=statistics.fmean(emulated) if emulated else None, extra=extra,
                            replaced=col.replaced.get(key, 0)))
    floor = next((r for r in rows if r.key == ("null_ioctl", "c", None)), None)
    for r in rows:
        if floor and floor.summary["p50"]:
            r.ratio_to_floor = r.summary["p50"] / floor.summary["p50"]
    return rows
