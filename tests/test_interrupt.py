"""The interruption protocol (kvmiso.interrupt) on real signals sent to this process."""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys

import pytest

from kvmiso.interrupt import Interrupted, Terminated, deferred, signals_raise_interrupted, sigterm_unwinds


def test_interrupted_names_its_signal_and_carries_the_partial_result():
    e = Interrupted(signal.SIGTERM, partial=[1, 2])
    assert isinstance(e, KeyboardInterrupt) and e.signal is signal.SIGTERM and e.status == 143
    assert str(e) == "SIGTERM" and e.partial == [1, 2]
    again = Interrupted.of(e, partial="more")
    assert again.signal is signal.SIGTERM and again.partial == "more"
    plain = Interrupted.of(KeyboardInterrupt())  # a Ctrl-C with Python's own handler
    assert plain.signal is signal.SIGINT and plain.status == 130 and plain.partial is None
    t = Interrupted.of(Terminated(), partial=3)
    assert isinstance(t, Terminated) and isinstance(t, SystemExit) and t.code == 143 and t.partial == 3
    assert pickle.loads(pickle.dumps(e)).partial == [1, 2]  # crosses a process pool intact


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signals_raise_interrupted_then_the_old_handlers_come_back(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    with pytest.raises(Interrupted) as info:
        with signals_raise_interrupted():
            signal.raise_signal(sig)
    assert info.value.signal == sig
    assert {s: signal.getsignal(s) for s in before} == before


def test_deferred_holds_a_signal_until_the_block_is_done():
    done = []
    with signals_raise_interrupted(), pytest.raises(Interrupted) as info:
        with deferred():
            signal.raise_signal(signal.SIGTERM)
            done.append("the block ran to its end")
    assert done and info.value.signal == signal.SIGTERM


_UNWIND_CHILD = """
import signal
from kvmiso.interrupt import sigterm_unwinds
sigterm_unwinds()
try:
    signal.raise_signal(signal.SIGTERM)
finally:
    print("cleaned up", flush=True)
"""


def test_sigterm_unwinds_a_program_without_a_handler_and_ends_it_as_sigterm_asks():
    p = subprocess.run([sys.executable, "-c", _UNWIND_CHILD], capture_output=True, text=True, timeout=60)
    assert p.returncode == 143 and p.stdout == "cleaned up\n" and p.stderr == ""


def test_sigterm_unwinds_leaves_a_program_handler_alone():
    with signals_raise_interrupted():
        assert sigterm_unwinds() is None  # the program (here: the CLI policy) handles SIGTERM
    undo = sigterm_unwinds()
    assert undo is not None and signal.getsignal(signal.SIGTERM) not in (signal.SIG_DFL, None)
    with deferred() as restore:
        undo(restore)
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL


def test_a_signal_ignored_from_the_start_stays_ignored():
    # as a shell's background job: SIGINT ignored; kvmiso does not take it back
    child = ("import signal; signal.signal(signal.SIGINT, signal.SIG_IGN)\n"
             "from kvmiso.interrupt import signals_raise_interrupted\n"
             "with signals_raise_interrupted():\n"
             "    signal.raise_signal(signal.SIGINT)\n"
             "    print(signal.getsignal(signal.SIGINT) == signal.SIG_IGN, flush=True)\n")
    p = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout == "True\n", p.stderr
