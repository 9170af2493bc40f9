"""Shared fixtures. Tests that need KVM take the ``kvm`` fixture of kvmiso's own pytest plugin
(kvmiso/pytest_plugin.py, loaded through its ``pytest11`` entry point): the real /dev/kvm, where
only a missing device skips (EACCES fails, as in the KVM selftests). KVMISO_REQUIRE_KVM=1 turns
that skip into a failure, and KVMISO_REQUIRE_VENDOR=kvm_amd (say) fails every device test on
another vendor module: CI's kvm_amd lane sets both, so a guest without kvm_amd cannot pass it.
The suite thus runs the plugin a user gets, rather than a copy of it.

Every test that takes the ``kvm`` fixture (itself or through ``vm`` or ``machine``) is marked
``device`` here, so that a lane on another vendor module can select them (``pytest -m device``)
without a mark in every file."""

from __future__ import annotations

import importlib
import os
import signal
from pathlib import Path

import pytest

from kvmiso.host import vendor_module

# A shell starts a background job with SIGINT ignored, and Python (and kvmiso's CLI) then leave
# it ignored: the signal tests, which Ctrl-C this process and its children, would wait for
# nothing. The suite wants Ctrl-C whatever started it (and children inherit the default).
if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_configure(config) -> None:
    # where plugins are not autoloaded (PYTEST_DISABLE_PLUGIN_AUTOLOAD=1), the suite loads
    # kvmiso's itself, under the entry point's name (-p no:kvmiso still blocks it)
    if not config.pluginmanager.has_plugin("kvmiso"):
        config.pluginmanager.register(importlib.import_module("kvmiso.pytest_plugin"), "kvmiso")


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
def vendor():
    return vendor_module()


@pytest.fixture(scope="session")
def checkout_open_to_nobody() -> None:
    """The checkout readable and every directory above it searchable by others, as an
    unprivileged user's kvmiso needs it (its payloads are read at run time); else skip, naming
    the closed directory (a clone in a `mktemp -d` directory is mode 700)."""
    root = Path(__file__).resolve().parent.parent
    closed = next((d for d, need in ((root, 0o005), *((p, 0o001) for p in root.parents))
                   if os.stat(d).st_mode & need != need), None)
    if closed is not None:
        pytest.skip(f"uid 65534 cannot read the checkout: {closed} is mode {os.stat(closed).st_mode & 0o777:o}")
