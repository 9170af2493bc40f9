"""Host facts from /sys and /proc: the vendor module from a /sys/module tree, and this host's."""

from __future__ import annotations

from kvmiso.host import VENDOR_MODULES, Host, vendor_module


def test_vendor_module_is_the_sys_module_directory_present(tmp_path):
    assert vendor_module(tmp_path) is None
    (tmp_path / "kvm").mkdir()  # the common module alone names no vendor
    assert vendor_module(tmp_path) is None
    (tmp_path / "kvm_amd").mkdir()
    assert vendor_module(tmp_path) == "kvm_amd"


def test_this_host(kvm):
    h = Host.read()
    assert h.vendor in VENDOR_MODULES  # /dev/kvm answered, so a vendor module runs
    assert "fpu" in h.cpu_flags and "sse2" in h.cpu_flags  # every x86-64 CPU lists them
    assert h.cpu and h.cpu != "unknown"
    assert set(h.mitigations) <= set(h.vulnerabilities)
    assert "Not affected" not in h.mitigations.values()
