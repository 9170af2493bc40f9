"""Bad input gets one clear error naming the cause, and leaves no fd, mapping or thread."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
import threading
import time

import psutil
import pytest

from kvmiso.guest import BuildError, GuestTimeout, Machine, build
from kvmiso.interrupt import start_kicker
from kvmiso.kvm import Kvm, KvmError, KvmUnavailable, VcpuBusy
from kvmiso.kvm.system import check_api_version


def _resources():
    start_kicker()  # the process's one interrupt kicker (kvmiso.interrupt) lives as long as it does
    p = psutil.Process()
    return p.num_fds(), _vm_maps(p), threading.active_count()


def _vm_maps(p) -> int:
    """The mappings a VM makes: KVM's own (a vCPU's kvm_run: anon_inode:kvm-vcpu) and anonymous
    ones of guest RAM's size or more. Python's allocator arenas (1 MiB) come and go with the
    interpreter's own use and would make any count of every mapping flaky."""
    def size(m) -> int:
        lo, hi = m.addr.split("-")
        return int(hi, 16) - int(lo, 16)

    # grouped=False: grouped maps merge every anonymous mapping into one entry, hiding a leak
    return sum(1 for m in p.memory_maps(grouped=False)
               if "kvm" in m.path or (m.path in ("", "[anon]") and size(m) >= 2 << 20))


def test_missing_device_is_named(tmp_path):
    with pytest.raises(KvmUnavailable, match="does not exist"):
        Kvm(str(tmp_path / "kvm"))


def test_permission_denied_is_named(kvm):
    # a real unprivileged process opening the real device
    # import first: this Python's own files may be unreadable to the unprivileged user
    code = ("import os\nfrom kvmiso.kvm import Kvm, KvmUnavailable\n"
            "os.setgid(65534); os.setuid(65534)\n"
            "try:\n Kvm()\nexcept KvmUnavailable as e:\n print(e)")
    if os.geteuid() != 0:
        pytest.skip("needs root to drop to an unprivileged user")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "permission denied" in out and "/dev/kvm" in out


def test_wrong_api_version_is_refused():
    with pytest.raises(KvmUnavailable, match="API version 11; kvmiso needs 12"):
        check_api_version(11, "/dev/kvm")
    check_api_version(12, "/dev/kvm")


def test_payload_that_does_not_assemble_shows_the_assembler(tmp_path):
    bad = tmp_path / "bad.S"
    bad.write_text('        .include "kvmiso.inc"\n        .globl main\nmain:\n        movq %rax, %nosuchreg\n')
    with pytest.raises(BuildError) as info:
        build(bad, "long", cache_dir=tmp_path / "cache")
    assert "bad.S:4" in str(info.value) and "nosuchreg" in str(info.value)


def test_source_change_rebuilds(tmp_path):
    src = tmp_path / "p.S"
    src.write_text('        .include "kvmiso.inc"\n        .globl main\nmain:\n        ret\n')
    a = build(src, "long", cache_dir=tmp_path)
    assert build(src, "long", cache_dir=tmp_path).code == a.code  # cached
    src.write_text('        .include "kvmiso.inc"\n        .globl main\nmain:\n        nop\n        ret\n')
    b = build(src, "long", cache_dir=tmp_path)
    main = b.symbols["main"] - b.load_address
    assert b.code[main : main + 2] == b"\x90\xc3" and a.code[main] == 0xC3  # nop; ret vs ret
    assert len(list(tmp_path.glob("p-long-*.bin"))) == 2


def test_overlapping_and_misaligned_slots(kvm):
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        with pytest.raises(ValueError, match="overlaps slot 0"):
            vm.add_memory(0x8000, 0x10000)
        with pytest.raises(ValueError, match="multiples of the 4096-byte page"):
            vm.add_memory(0x20800, 0x1000)
        # the kernel's own refusal, straight through the ioctl, names the ioctl and the cause
        with pytest.raises(KvmError) as info:
            vm.set_user_memory_region(5, 0x8000, 0x1000, vm.slots[0].host_addr)
        assert info.value.errno == errno.EEXIST
        assert "KVM_SET_USER_MEMORY_REGION failed: EEXIST" in str(info.value)
        assert len(vm.slots) == 1


def test_failed_machine_leaves_nothing(kvm, tmp_path):
    bad = tmp_path / "bad.S"
    bad.write_text("garbage\n")

    def fail_twice() -> None:
        with pytest.raises(ValueError, match="guest memory"):
            Machine("hello", memory=4096, kvm=kvm)
        with pytest.raises(BuildError):
            Machine(bad, kvm=kvm)

    build("hello", "long")  # warm the cache: its files are not leaks
    fail_twice()  # and the modules a failure imports on first use
    before = _resources()
    fail_twice()
    assert _resources() == before


def test_timeouts_leave_no_thread(kvm):
    from kvmiso.guest import GuestTimeout

    def timeouts(n: int) -> None:
        for _ in range(n):
            with Machine("spin", kvm=kvm) as m, pytest.raises(GuestTimeout):
                m.run(timeout=0.05)

    timeouts(1)  # steady state: the kicker thread's first wakeup gives it its malloc arena
    before = _resources()
    timeouts(3)
    assert _resources() == before


def test_500_vms_do_not_leak(kvm):
    proc = psutil.Process()

    def cycle(n):
        for _ in range(n):
            with kvm.create_vm() as vm:
                vm.add_memory(0, 1 << 20)
                vm.create_vcpu(0)

    cycle(20)  # let allocators reach steady state
    fds, maps, rss = proc.num_fds(), len(proc.memory_maps(grouped=False)), proc.memory_info().rss
    cycle(500)
    assert proc.num_fds() == fds
    assert len(proc.memory_maps(grouped=False)) == maps
    assert proc.memory_info().rss - rss < 8 << 20  # no per-VM growth (1 MiB slots would be 500 MiB)


def _wait_until_in_kvm_run(stats) -> None:
    """Until the vCPU has exited to KVM at least once: the spin guest's first KVM_RUN is under
    way (it never comes back to userspace before its deadline)."""
    for _ in range(3000):
        if stats.snapshot()["exits"]:
            return
        time.sleep(0.01)
    raise AssertionError("the vCPU never entered KVM_RUN")


def test_a_second_thread_is_refused_the_vcpu_another_thread_runs(kvm):
    with Machine("spin", mode="long", kvm=kvm) as m, m.vcpu.stats() as stats:
        got: dict[str, object] = {}

        def run(name, call):
            try:
                got[name] = call()
            except GuestTimeout as e:
                got[name] = e.result.outcome
            except Exception as e:
                got[name] = e

        first = threading.Thread(target=run, args=("first", lambda: m.run(timeout=3)), name="first-runner")
        first.start()
        _wait_until_in_kvm_run(stats)
        seconds = [threading.Thread(target=run, args=(name, call)) for name, call in
                   [("Vcpu.run", m.vcpu.run), ("Machine.run", lambda: m.run(timeout=1))]]
        for t in seconds:
            t.start()
            t.join(20)  # refused at once; before, each waited for the vCPU, and two deadlines shared one timer
        stuck = [t for t in seconds if t.is_alive()]
        for t in stuck + [first] if stuck else ():  # without this, neither run would ever return
            m.vcpu.kick(t.ident)
        for t in seconds + [first]:
            t.join()
        assert not stuck, f"{len(stuck)} runs neither returned nor were refused"
        for name in ("Vcpu.run", "Machine.run"):
            assert isinstance(got[name], VcpuBusy), (name, got[name])
            assert "vCPU 0 is already running in thread 'first-runner'" in str(got[name])
        assert got["first"] == "timeout" and m.vcpu.runner is None  # its own deadline ended it


FORKED = r"""
import json, os
from kvmiso.guest import Machine

with Machine("hello", mode="long") as m:
    r, w = os.pipe()
    if os.fork() == 0:  # the child: KVM refuses every ioctl of the parent's VM with EIO
        out = {}
        for what, call in [("KVM_GET_REGS", m.vcpu.get_regs), ("KVM_RUN", m.vcpu.run),
                           ("KVM_CHECK_EXTENSION", lambda: m.vm.check_extension("USER_MEMORY"))]:
            try:
                call()
                out[what] = "answered"
            except Exception as e:
                out[what] = f"{type(e).__name__}: {e}"
        os.write(w, json.dumps(out).encode())
        os._exit(0)
    os.close(w)
    out = json.loads(os.read(r, 1 << 16))
    os.wait()
    out["parent"] = m.run(timeout=30).console_text
print(json.dumps(out))
"""


def test_a_vm_kvm_refuses_is_named_as_such(kvm):
    # kvm_util's test for a VM KVM killed (EIO, then EIO from KVM_CHECK_EXTENSION on the VM fd)
    # is also true of a VM used from a process that did not create it, which a test can make
    p = subprocess.run([sys.executable, "-c", FORKED], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    out = json.loads(p.stdout)
    for ioctl in ("KVM_GET_REGS", "KVM_RUN", "KVM_CHECK_EXTENSION"):
        assert out[ioctl].startswith(f"VmDead: {ioctl} failed: EIO (Input/output error): this process ("), out[ioctl]
        assert "KVM refuses every ioctl of a VM from another process, a fork's child included" in out[ioctl]
    assert out["parent"] == "Hello from a kvmiso guest!\n"  # the VM itself is fine
