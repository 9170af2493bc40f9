"""vCPUs run by threads: start one thread per vCPU, wait for all, and on an interrupt stop them
before the caller can close the VM under them."""

from __future__ import annotations

import threading
from typing import Callable, Sequence

from ..interrupt import deferred, threads_without_interrupts, wait_seeing_signals
from ..kvm import Vcpu


def run_in_threads(work: Callable[[int], None], vcpus: Sequence[Vcpu], name: str,
                   before_kick: Callable[[], None] | None = None) -> list[BaseException | None]:
    """Call ``work(i)`` in a thread of its own for each ``vcpus[i]`` and wait for every one.
    Returns what each raised (None where it returned).

    If the waiting thread is interrupted (Ctrl-C, or SIGTERM as kvmiso's CLI raises it),
    ``before_kick`` runs (say, to ask the workers to stop), every vCPU whose thread has not
    ended is kicked out of KVM_RUN, and the interrupt goes up once all have ended.
    """
    errors: list[BaseException | None] = [None] * len(vcpus)
    done = [threading.Event() for _ in vcpus]
    done_lock = threading.Lock()  # a kick never targets a thread that has left work()

    def target(i: int) -> None:
        try:
            work(i)
        except BaseException as e:  # handed to the caller's thread
            errors[i] = e
        finally:
            with done_lock:
                done[i].set()

    threads = [threading.Thread(target=target, args=(i,), name=f"{name}-{i}") for i in range(len(vcpus))]
    try:
        # every thread starts, or none: a Ctrl-C between two starts would leave a vCPU spinning
        # that the handler below does not know of; the workers never take SIGINT/SIGTERM. A
        # signal held meanwhile is raised as the block ends, with every thread running: inside
        # this try, or the caller would close the VM under them.
        with deferred(), threads_without_interrupts():
            for t in threads:
                t.start()
        for d in done:  # not join(): an untimed wait can sleep through a Ctrl-C
            wait_seeing_signals(d)
        for t in threads:  # each has left work(); this waits for the thread itself to end
            t.join()
    except BaseException:
        _stop_started(vcpus, threads, done, done_lock, before_kick)
        raise
    return errors


def _stop_started(vcpus: Sequence[Vcpu], threads: list[threading.Thread], done: list[threading.Event],
                  done_lock: threading.Lock, before_kick: Callable[[], None] | None) -> None:
    """The wait was interrupted: ``before_kick``, then every started thread still in work()
    kicked out of KVM_RUN, and all of them waited for."""
    # Our own events decide what is still running, not is_alive(): an interrupted join()
    # can mark a live thread as stopped (CPython bpo-45274). A thread that never started
    # (start() failed) has no ident and nothing to wait for. A second Ctrl-C is held back until every thread has
    # ended (then it goes up in place of the first): cut short, this would leave a KVM_RUN
    # running in a VM the caller is about to close.
    with deferred():
        started = [t.ident is not None for t in threads]
        if before_kick is not None:
            before_kick()
        with done_lock:
            for v, t, d, s in zip(vcpus, threads, done, started):
                if s and not d.is_set():
                    v.kick(t.ident)
        for t, d, s in zip(threads, done, started):
            if s:
                d.wait()  # kicked: each ends within microseconds
                t.join()  # and is gone, as on the way out without an interrupt
