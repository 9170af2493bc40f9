"""Machines from any thread, and what an unclosed one costs: the garbage collector releases it
with a ResourceWarning, as it does a file (issue 9, items 9 and 10)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import warnings

import psutil

from kvmiso.guest import Machine
from kvmiso.kvm import Kvm

EIGHT_THREADS = r"""
import json, threading
from kvmiso.guest import GuestTimeout, Machine

out = [None] * 8

def work(i):
    try:
        with Machine("hello", mode="long") as m:
            done = m.run(timeout=30)
        try:
            with Machine("spin", mode="long") as m:
                m.run(timeout=0.2)
            stopped = "no timeout"
        except GuestTimeout as e:
            stopped = e.result.outcome
        out[i] = [done.outcome, done.console_text, stopped]
    except BaseException as e:
        out[i] = repr(e)

threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(out))
"""


def test_eight_threads_each_run_their_own_machine(kvm):
    # a fresh interpreter whose main thread never makes a Machine: the kick's signal handler
    # and every deadline are set up from the worker threads alone
    p = subprocess.run([sys.executable, "-c", EIGHT_THREADS], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert json.loads(p.stdout) == [["done", "Hello from a kvmiso guest!\n", "timeout"]] * 8


RAM = (2 << 20) + 0x7000  # guest RAM of a size nothing else maps, so its mappings can be counted


def _resources() -> tuple[int, int, int, int]:
    """fds, threads (KVM's per-VM kernel thread counts), kvm_run mappings and guest RAM mappings
    (the allocator's own mappings come and go, so the rest are not counted)."""
    p = psutil.Process()
    maps = p.memory_maps(grouped=False)
    kvm_run = sum(m.path.startswith("anon_inode:kvm-vcpu") for m in maps)
    ram = 0
    for m in maps:
        lo, hi = (int(x, 16) for x in m.addr.split("-"))
        ram += m.path in ("", "[anon]") and hi - lo == RAM
    return p.num_fds(), p.num_threads(), kvm_run, ram


def test_an_unclosed_machine_is_released_by_the_garbage_collector(kvm):
    with Machine("hello", mode="long") as m:  # warm up: the image is built, modules imported
        m.run(timeout=30)
    gc.collect()
    before = _resources()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        for _ in range(200):
            m = Machine("hello", mode="long", memory=RAM)  # its own Kvm: 4 fds, 2 mappings, KVM's thread
            assert m.run(timeout=30).ok
        del m
        gc.collect()
    assert _resources() == before
    unclosed = [w for w in caught if w.category is ResourceWarning and "unclosed <Machine hello" in str(w.message)]
    assert len(unclosed) == 200


def test_unclosed_kvm_handles_are_closed_by_the_garbage_collector(kvm):
    before = _resources()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        k = Kvm()
        vm = k.create_vm()
        vm.add_memory(0, RAM)
        stats = vm.create_vcpu().stats()
        del k, vm, stats
        gc.collect()  # the VM and its vCPU refer to each other: only the cycle collector frees them
    assert _resources() == before
    assert sorted(str(w.message).split()[1].strip("<") for w in caught if w.category is ResourceWarning) == [
        "Kvm", "Stats", "Vm"]


AFTER_CLOSE = r"""
import json
from kvmiso.guest import Machine


def io_in(m):
    while True:
        e = m.vcpu.run()
        if e.name == "IO" and e.is_in:
            return e


def outcome(touch):
    try:
        touch()
    except Exception as x:
        return f"{type(x).__name__}: {x}"
    return "no error"


m = Machine("portio", mode="long")
old = io_in(m)
m.close()
out = {what: outcome(touch) for what, touch in
       [("reply", lambda: old.reply(1)), ("data", lambda: bytes(old.data)), ("value", lambda: old.value)]}
with Machine("portio", mode="long") as new:  # its kvm_run page may take the old page's address
    page = bytes(new.vcpu.page)
    out["reply with a new VM"] = outcome(lambda: old.reply(0x41))
    out["new page untouched"] = bytes(new.vcpu.page) == page
    out["new guest reads"] = [r.value for r in new.run(timeout=30).reports]
print(json.dumps(out))
"""


def test_an_exit_of_a_closed_vcpu_raises_and_touches_no_memory(kvm):
    # in a child process: before kvmiso checked, the first reply() wrote to the unmapped page
    # and Python died of SIGSEGV
    p = subprocess.run([sys.executable, "-c", AFTER_CLOSE], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, (p.returncode, p.stderr[-2000:])
    out = json.loads(p.stdout)
    for what in ("reply", "data", "value", "reply with a new VM"):
        assert out[what].startswith("VcpuClosed: vCPU 0 is closed"), (what, out[what])
    assert out["new page untouched"] and out["new guest reads"] == [0xFF, 0xFFFF]  # the host's default answer
