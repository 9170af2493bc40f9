"""Shared fixtures. Tests that need KVM use the real /dev/kvm; only a missing device skips
(EACCES fails, as in the KVM selftests). KVMISO_REQUIRE_KVM=1 turns that skip into a failure,
and KVMISO_REQUIRE_VENDOR=kvm_amd (say) fails every device test on another vendor module: CI's
kvm_amd lane sets both, so a guest without kvm_amd cannot pass it.

Every test that takes the ``kvm`` fixture is marked ``device`` here, so that a lane on another
vendor module can select them (``pytest -m device``) without a mark in every file."""

from __future__ import annotations

import os
import signal

import pytest

from kvmiso.host import vendor_module
from kvmiso.kvm import Kvm, KvmUnavailable

_skip_reason: str | None = None

# A shell starts a background job with SIGINT ignored, and Python (and kvmiso's CLI) then leave
# it ignored: the signal tests, which Ctrl-C this process and its children, would wait for
# nothing. The suite wants Ctrl-C whatever started it (and children inherit the default).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def _kvm_missing() -> str | None:
    global _skip_reason
    if _skip_reason is None:
        _skip_reason = "" if os.path.exists("/dev/kvm") else "/dev/kvm does not exist on this host"
    return _skip_reason or None


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if "kvm" in getattr(item, "fixturenames", ()):
            item.add_marker("device")


@pytest.fixture(scope="session")
def tracing() -> None:
    """Root and a kernel with tracefs, decided from /proc/filesystems, not by kvmiso's own
    tracefs code: that code is under test, and its failure must fail the tests, not skip them."""
    if os.geteuid() != 0:
        pytest.skip("tracing kvm events needs root")
    with open("/proc/filesystems") as f:
        if "tracefs" not in f.read().split():
            pytest.skip("this kernel has no tracefs (not in /proc/filesystems)")


@pytest.fixture
def kvm():
    reason = _kvm_missing()
    if reason:
        if os.environ.get("KVMISO_REQUIRE_KVM") == "1":
            pytest.fail(f"KVMISO_REQUIRE_KVM=1 but {reason}")
        pytest.skip(reason)
    try:
        k = Kvm()
    except KvmUnavailable as e:
        pytest.fail(str(e))
    required = os.environ.get("KVMISO_REQUIRE_VENDOR")
    if required and vendor_module() != required:
        k.close()
        pytest.fail(f"KVMISO_REQUIRE_VENDOR={required} but the vendor module is {vendor_module()}")
    with k:
        yield k


@pytest.fixture
def vendor():
    return vendor_module()
