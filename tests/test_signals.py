"""Interrupted runs: SIGINT or SIGTERM during a guest that never exits (inside one KVM_RUN)
ends the run cleanly, with the partial result marked incomplete and nothing left behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from typing import Callable

import psutil
import pytest
from ready import READY_HYPERCALL, READY_SPIN, interrupt_when, vcpu_counts, wait_until_counted

from kvmiso import cli
from kvmiso.guest import Machine, Outcome
from kvmiso.guest.threads import run_in_threads
from kvmiso.interrupt import Interrupted, start_kicker
from kvmiso.kvm.exits import IntrExit


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
@pytest.mark.parametrize("as_json", [True, False])
def test_signal_to_kvmiso_run_ends_it_with_a_partial_result(kvm, tmp_path, sig, as_json):
    # a private cache and TMPDIR: the guest is built inside this run, and any leftover shows
    env = dict(os.environ, TMPDIR=str(tmp_path / "tmp"), XDG_CACHE_HOME=str(tmp_path / "cache"))
    (tmp_path / "tmp").mkdir()
    argv = [sys.executable, "-m", "kvmiso.cli", "run", READY_SPIN, "--timeout", "600"] + (["--json"] if as_json else [])
    p = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    # after the guest's announcement its next KVM_RUN never ends
    out, err = interrupt_when(p, sig, lambda: wait_until_counted(p.pid, proc=p))
    name = signal.Signals(sig).name
    assert p.returncode == 128 + sig, err
    assert err.strip().splitlines()[-1] == f"kvmiso: interrupted by {name}" and "Traceback" not in err
    if as_json:
        r = json.loads(out)
        assert r["incomplete"] is True and r["outcome"] == "interrupted"
        detail = r["detail"]
    else:
        detail = out.strip().splitlines()[-1]
        assert detail.startswith("interrupted: ")
    assert f"{name} arrived before the guest finished; stopped at rip" in detail and "jmp ." in detail
    assert list((tmp_path / "tmp").iterdir()) == []  # the build's temporary directory is gone
    cached = sorted(f.suffix for f in (tmp_path / "cache" / "kvmiso" / "guests").iterdir())
    assert cached == [".bin", ".sym"]  # complete files only, no half-written temporaries


def test_json_result_is_marked_complete_when_not_interrupted(kvm):
    p = subprocess.run([sys.executable, "-m", "kvmiso.cli", "run", "hello", "--json"],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and json.loads(p.stdout)["incomplete"] is False


class _Sender(threading.Thread):
    """Sends ``sig`` to the main thread once ``ready()`` returns (``to_itself``: to this thread
    instead, which then runs the C part of Python's handler, not the main thread). The signal
    goes even if ready() fails, so the test ends rather than waiting out a 600 s deadline, and
    join() raises that failure. With ``rescue``, a main thread still not interrupted 20 s later
    gets a second signal and ``rescued`` is set: a lost signal fails the test, not the suite."""

    def __init__(self, sig: int, ready: Callable[[], None], to_itself: bool = False, rescue: bool = False) -> None:
        super().__init__(name="test-signal-sender")
        self.sig, self.ready, self.to_itself, self.rescue = sig, ready, to_itself, rescue
        self.main = threading.main_thread().ident
        self.error: BaseException | None = None
        self.rescued = False
        self._joined = threading.Event()
        self.start()

    def run(self) -> None:
        try:
            self.ready()
        except BaseException as e:  # for join() to raise in the test's thread
            self.error = e
        signal.pthread_kill(threading.get_ident() if self.to_itself else self.main, self.sig)
        if self.rescue and not self._joined.wait(20):
            self.rescued = True
            signal.pthread_kill(self.main, self.sig)

    def join(self) -> None:  # type: ignore[override]
        """Wait for the thread (the main thread was interrupted, or gives up); raise what
        ready() raised."""
        self._joined.set()
        super().join()
        if self.error is not None:
            raise AssertionError(f"the sender's wait for the guest failed: {self.error!r}") from self.error


def _signal_main_thread_when_ready(sig: int, vcpus: int = 1, then: tuple[str, int | None] | None = None) -> _Sender:
    """A :class:`_Sender` of ``sig`` to the main thread once ``vcpus`` of this process's vCPUs
    have made the ready guest's announcement, and then, with ``then=(stat, n)``, counted ``stat``
    at least ``n`` times (``n`` None: once more than after the announcement): proof that the next
    KVM_RUN is under way, so the announcement's exit was handled and recorded (a signal in
    between would find it returned but not yet kept)."""
    def ready() -> None:
        wait_until_counted(os.getpid(), vcpus=vcpus)
        if then is not None:
            stat, n = then
            if n is None:  # one more than now: an exit the vCPU can only make in its next KVM_RUN
                n = max(vcpu_counts(os.getpid(), stat).values()) + 1
            wait_until_counted(os.getpid(), stat=stat, vcpus=vcpus, at_least=n)

    return _Sender(sig, ready)


@pytest.mark.parametrize("payload,what", [(READY_SPIN, "jmp ."), (READY_HYPERCALL, "VMCALL")], ids=["spin", "hypercall"])
def test_ctrl_c_inside_kvm_run_gives_the_result_and_leaks_nothing(kvm, vendor, payload, what):
    if what == "VMCALL" and vendor != "kvm_pvm":
        pytest.skip(f"needs kvm_pvm, where a CPL0 hypercall never returns (this host: {vendor})")
    start_kicker()  # the process's one interrupt kicker lives as long as the process
    fds, threads = psutil.Process().num_fds(), _thread_ids()
    with Machine(payload, mode="long", kvm=kvm) as m:
        # kvm_pvm emulates the endless VMCALL again and again: 100 emulations are far more than
        # the few instructions before it, so by then the guest is in its endless KVM_RUN
        # the spin: any later exit (an emulation on kvm_pvm, a host interrupt where CPL0 runs
        # natively) comes from the endless KVM_RUN, after the announcement was recorded
        then = ("insn_emulation", 100) if what == "VMCALL" else ("exits", None)
        sender = _signal_main_thread_when_ready(signal.SIGINT, then=then)
        with pytest.raises(Interrupted) as info:  # a plain Ctrl-C, no handler installed: SIGINT
            m.run(timeout=600)
        sender.join()
    assert info.value.signal == signal.SIGINT and info.value.status == 130
    r = info.value.partial
    assert r.outcome is Outcome.INTERRUPTED and [e.name for e in r.exits] == ["MMIO"]  # the announcement
    assert r.detail.startswith("SIGINT arrived before the guest finished; stopped at rip")
    assert what in r.detail
    # the sender thread has ended for Python; the kernel may still list it for a moment
    assert psutil.Process().num_fds() == fds and not _threads_left_since(threads)


def test_cli_turns_sigterm_into_an_interrupt_and_restores_the_handlers(kvm, capsys):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    sender = _signal_main_thread_when_ready(signal.SIGTERM)
    status = cli.main(["run", READY_SPIN, "--timeout", "600", "--json"])
    sender.join()
    out, err = capsys.readouterr()
    assert status == 128 + signal.SIGTERM and err == "kvmiso: interrupted by SIGTERM\n"
    assert json.loads(out)["incomplete"] is True
    assert {s: signal.getsignal(s) for s in before} == before


def test_cli_run_interrupted_before_the_run_begins(kvm, capsys, monkeypatch):
    # a SIGTERM that lands before Machine.run has a result: nothing to print, no traceback
    real_run = Machine.run

    def run_after_sigterm(self, *args, **kwargs):
        signal.raise_signal(signal.SIGTERM)  # the CLI's handler raises Interrupted here, partial None
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(Machine, "run", run_after_sigterm)
    for extra in ([], ["--json"]):
        status = cli.main(["run", "hello", *extra])
        out, err = capsys.readouterr()
        assert status == 128 + signal.SIGTERM and err == "kvmiso: interrupted by SIGTERM\n"


def _thread_ids() -> set[int]:
    return {t.id for t in psutil.Process().threads()}


def _threads_left_since(before: set[int]) -> set[int]:
    """Threads alive now that were not before, once those that finished have left the kernel's
    list (a moment after their work). By identity, not by count: a thread of an earlier test
    that was still leaving when ``before`` was taken must not hide a new one, nor fail the test."""
    for _ in range(1000):
        if not _thread_ids() - before:
            break
        time.sleep(0.01)
    return _thread_ids() - before


def test_ctrl_c_during_run_all_stops_every_vcpu_before_the_vm_closes(kvm):
    before = _thread_ids()
    with Machine(READY_SPIN, mode="long", vcpus=2, kvm=kvm) as m:
        sender = _signal_main_thread_when_ready(signal.SIGINT, vcpus=2)
        with pytest.raises(Interrupted):
            m.run_all(timeout=600)
        sender.join()
    # a vCPU thread left spinning would outlive its VM (and its 600 s deadline died with it)
    assert not _threads_left_since(before)


def test_sigint_taken_by_another_thread_still_stops_run_all(kvm):
    # Python's C handler only notes a signal; the handler runs once the main thread is back in
    # the interpreter. A signal that lands just before run_all's wait goes to sleep (or, sent to
    # the process, is taken by another thread) never wakes that wait: here another thread takes
    # it, which makes that window certain. The wait must still see it, not only at the deadline.
    before = _thread_ids()
    with Machine(READY_SPIN, mode="long", vcpus=2, kvm=kvm) as m:
        sender = _Sender(signal.SIGINT, lambda: wait_until_counted(os.getpid(), vcpus=2), to_itself=True, rescue=True)
        try:
            with pytest.raises(Interrupted):
                m.run_all(timeout=600)
        finally:
            sender.join()
    assert not sender.rescued, "run_all slept through a SIGINT until a second one came"
    assert not _threads_left_since(before)


def test_a_signal_held_while_the_vcpu_threads_start_still_stops_them(kvm):
    # run_in_threads holds SIGINT back while it starts the threads and raises it as that block
    # ends; it must still kick and wait for every thread, or the caller closes the VM under a
    # running KVM_RUN (a segfault). Worker 0 signals at once, while the others are starting.
    main = threading.main_thread().ident
    with Machine(READY_SPIN, mode="long", vcpus=4, kvm=kvm) as m:
        def work(i: int) -> None:
            if i == 0:
                signal.pthread_kill(main, signal.SIGINT)
            m.run(timeout=600, vcpu=i)

        with pytest.raises(KeyboardInterrupt):
            run_in_threads(work, m.vcpus, "kvmiso-held")
        alive = [t for t in threading.enumerate() if t.name.startswith("kvmiso-held")]
        for t in alive:  # the failure path: stop them here, so the VM can close
            m.vcpus[int(t.name.rsplit("-", 1)[1])].kick(t.ident)
            t.join()
    assert not alive, [t.name for t in alive]


def test_a_second_ctrl_c_while_run_in_threads_stops_its_threads_still_stops_them(kvm):
    # The second SIGINT comes while the first is being handled (from before_kick, the first
    # step of that cleanup): it must not cut the cleanup short, or a vCPU thread is left in
    # KVM_RUN while the caller closes the VM. It goes up once every thread has ended.
    main = threading.main_thread().ident
    with Machine(READY_SPIN, mode="long", vcpus=2, kvm=kvm) as m:
        sender = _signal_main_thread_when_ready(signal.SIGINT, vcpus=2)
        with pytest.raises(KeyboardInterrupt):
            run_in_threads(lambda i: m.run(timeout=600, vcpu=i), m.vcpus, "kvmiso-twice",
                           before_kick=lambda: signal.pthread_kill(main, signal.SIGINT))
        sender.join()
        alive = [t for t in threading.enumerate() if t.name.startswith("kvmiso-twice") and t.is_alive()]
        for t in alive:  # the failure path: stop them here, so the VM can close
            m.vcpus[int(t.name.rsplit("-", 1)[1])].kick(t.ident)
            t.join()
    assert not alive, [t.name for t in alive]


def test_reader_closing_the_pipe_ends_kvmiso_run_quietly(kvm):
    # kvmiso run hostile_flood | head: the flood prints a line per exit until the pipe breaks
    p = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", "run", "hostile_flood", "--timeout", "600"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline().startswith("running hostile_flood")
        p.stdout.close()
        err = p.stderr.read()
        p.wait(timeout=60)  # a hang fails here instead of stalling the suite
    finally:
        p.kill()
        p.wait()
    assert p.returncode == 128 + signal.SIGPIPE
    assert "Traceback" not in err and "BrokenPipeError" not in err


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_interrupted_trace_and_check_keep_what_they_saw(kvm, tmp_path, sig):
    """trace writes the partial exit log, check reports the payloads it finished plus the
    interrupted one; both marked incomplete, no tracefs instance left behind."""
    from kvmiso.observe.tracing.exitlog import read_jsonl

    name = signal.Signals(sig).name
    log_path = tmp_path / "trace.jsonl"
    commands = {
        "trace": ["trace", READY_SPIN, "--timeout", "600", "--json", str(log_path)],
        "check": ["check", "portio", READY_SPIN, "--timeout", "600", "--json"],
    }
    for what, args in commands.items():
        p = subprocess.Popen([sys.executable, "-m", "kvmiso.cli", *args], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
        # the spinning payload runs last; portio, checked before it, makes no MMIO exit
        out, err = interrupt_when(p, sig, lambda: wait_until_counted(p.pid, proc=p))
        assert p.returncode == 128 + sig, (what, err)
        assert err.strip().splitlines()[-1] == f"kvmiso: interrupted by {name}", err
        assert not os.path.exists(f"/sys/kernel/tracing/instances/kvmiso-{p.pid}")
        if what == "trace":
            log = read_jsonl(log_path)
            assert log.incomplete == f"interrupted by {name}" and log.records
            assert isinstance(log.records[-1].exit, IntrExit)
        else:
            results = json.loads(out)
            assert [(r["payload"], r["incomplete"]) for r in results] == [("portio", False), (READY_SPIN, True)]
            assert results[1]["incomplete_reason"] == f"interrupted by {name}"


def test_a_signal_noted_just_before_kvm_run_still_ends_it(kvm):
    """Python notes a signal at once but acts on it between bytecodes: one that lands after the
    last check and before the KVM_RUN ioctl would wait inside a spinning guest. The wakeup fd
    kicks the vCPU as soon as the signal arrives. Here the handler only notes the signal (it
    never raises), so the run can only end by that kick, not by the deadline."""
    noted = []
    old = signal.signal(signal.SIGINT, lambda signum, frame: noted.append(signum))
    try:
        with Machine(READY_SPIN, mode="long", kvm=kvm) as m:
            sender = _signal_main_thread_when_ready(signal.SIGINT)
            r = m.run(timeout=60)
            sender.join()
    finally:
        signal.signal(signal.SIGINT, old)
    assert noted == [signal.SIGINT]
    assert r.outcome is Outcome.INTERRUPTED and r.detail == "KVM_RUN was interrupted by a kick"


BLOCKING_THREAD = r"""
import json, signal, threading
from kvmiso.guest import GuestTimeout, Machine
from kvmiso.kvm import KICK_SIGNAL

out = {}


def outcome(call):
    try:
        call()
    except GuestTimeout:
        return "timeout"
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "returned"


def blocking_all_signals(work):
    def target():
        signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
        work()
    return threading.Thread(target=target, name="quiet")


def runs():
    with Machine("spin", mode="long") as m:
        out["run(timeout=0.5)"] = outcome(lambda: m.run(timeout=0.5))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [KICK_SIGNAL])  # what the error says to do
        out["after unblocking"] = outcome(lambda: m.run(timeout=0.5))


t = blocking_all_signals(runs)
t.start()
t.join()
waiting = threading.Event()
t = blocking_all_signals(waiting.wait)
t.start()
with Machine("spin", mode="long") as m:
    out["kick"] = outcome(lambda: m.vcpu.kick(t.ident))
waiting.set()
t.join()
print(json.dumps(out))
"""


def test_a_timeout_or_kick_for_a_thread_that_blocks_the_kick_signal_is_refused(kvm):
    # in a child process: before kvmiso checked, the run in that thread never ended
    p = subprocess.run([sys.executable, "-c", BLOCKING_THREAD], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    for what in ("run(timeout=0.5)", "kick"):
        assert out[what].startswith("KickSignalBlocked: thread 'quiet' blocks SIGRTMIN"), out[what]
        assert "signal.pthread_sigmask(signal.SIG_UNBLOCK, [kvmiso.kvm.KICK_SIGNAL])" in out[what]
    assert out["after unblocking"] == "timeout"
