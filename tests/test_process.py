"""Another process's KVM fds, copied with pidfd_getfd(2): a copy must be the fd that was listed,
even when the process closed it and reused its number in between."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from kvmiso.observe.process import ForeignVm, ProcessEnded, ProcessError, kvm_fds

_CHILD = """
import os, sys
from kvmiso.kvm import Kvm
with Kvm() as kvm, kvm.create_vm() as vm:
    vcpu = vm.create_vcpu(0)
    print(vcpu.fd, flush=True)
    sys.stdin.readline()  # the test has listed this process's fds
    os.dup2(os.open("/dev/null", os.O_RDONLY), vcpu.fd)  # the vCPU's fd number, reused
    print("reused", flush=True)
    sys.stdin.readline()
    os._exit(0)
"""


def test_a_vcpu_fd_reused_after_the_listing_is_not_taken_for_the_vcpu(kvm):
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        number = int(child.stdout.readline())
        listed = kvm_fds(child.pid)
        assert listed.vcpus == {0: number}
        with ForeignVm.attach(child.pid, listed) as vm:  # while it is still the vCPU's
            assert [(v.id, v.their_fd) for v in vm.vcpus] == [(0, number)]
        child.stdin.write("\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "reused"
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ProcessError, match=f"its fd {number} was no longer vCPU 0's when copied"):
            ForeignVm.attach(child.pid, listed)
        assert len(os.listdir("/proc/self/fd")) == before  # the wrong copy was closed
    finally:
        child.kill()
        child.wait()


def test_a_process_that_ended_after_the_listing_is_named_as_ended(kvm):
    # A process that has ended but is not yet reaped still has a pidfd; pidfd_getfd then fails
    # (ESRCH), and attach says the process ended rather than that a copy failed.
    child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        int(child.stdout.readline())
        listed = kvm_fds(child.pid)
        child.kill()
        for _ in range(5000):  # 1 ms each: until the kernel has made it a zombie
            if Path(f"/proc/{child.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                break
            time.sleep(0.001)
        else:
            pytest.fail(f"pid {child.pid} did not become a zombie")
        before = len(os.listdir("/proc/self/fd"))
        with pytest.raises(ProcessEnded, match=f"pid {child.pid}: ended while its vCPU fds were being copied"):
            ForeignVm.attach(child.pid, listed)
        assert len(os.listdir("/proc/self/fd")) == before  # the pidfd was closed
    finally:
        child.kill()
        child.wait()
