"""The command line as a user runs it: real processes, real /dev/kvm, exit statuses checked."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from kvmiso.guest.probe import PROBE_INSNS, cpuid_intercepted, emulated_instructions, hypercall_returns
from ready import GUESTS


def kvmiso(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "kvmiso.cli", *args], capture_output=True, text=True, timeout=timeout)


def test_probe_json_has_the_documented_keys(kvm, vendor):
    p = kvmiso("probe", "--json")
    assert p.returncode == 0, p.stderr
    info = json.loads(p.stdout)
    for key in ("api_version", "vendor", "capabilities", "cpl0_native", "tracefs", "kallsyms", "cpu",
                "kernel", "vulnerabilities"):
        assert key in info
    assert info["api_version"] == 12 and info["vendor"] == vendor
    assert "IMMEDIATE_EXIT" in info["capabilities"]
    # what the command prints is what kvmiso measures on this host, whatever the vendor module:
    # builds of one kernel differ (CPL3 CPUID is intercepted on some kvm_pvm builds, not others)
    assert info["cpuid_intercepted"] == {"cpl0": cpuid_intercepted(kvm, 0), "cpl3": cpuid_intercepted(kvm, 3)}
    assert info["cpuid_intercepted"]["cpl0"] is True  # CPL0 CPUID exits to KVM on every host
    for cpl in (0, 3):
        emulated = emulated_instructions(kvm, "long", cpl)
        assert info[f"cpl{cpl}_native"] == (emulated < PROBE_INSNS), emulated
    assert info["cpl0_hypercall_returns"] == hypercall_returns(kvm)


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_run_hello_prints_the_guest_text(kvm, mode):
    p = kvmiso("run", "hello", "--mode", mode)
    assert p.returncode == 0, p.stderr
    assert "console| Hello from a kvmiso guest!" in p.stdout
    assert "done: the guest reported DONE" in p.stdout


def test_run_json(kvm):
    p = kvmiso("run", "portio", "--json")
    assert p.returncode == 0
    r = json.loads(p.stdout)
    assert r["outcome"] == "done" and [x["tag"] for x in r["reports"]] == [1, 2]
    assert r["exits"][0] == {"exit": "IO", "port": 0x3000, "size": 1, "count": 1, "is_in": False, "data": "a5"}


def test_run_spin_times_out_nonzero(kvm):
    p = kvmiso("run", "spin", "--timeout", "0.2")
    assert p.returncode == 1
    assert "did not finish within 0.2 s" in p.stderr and "jmp ." in p.stderr


def test_run_triple_fault_nonzero(kvm):
    p = kvmiso("run", "triplefault")
    assert p.returncode == 1 and "triple-faulted" in p.stdout


def test_bad_payload_and_bad_mode(kvm, tmp_path):
    p = kvmiso("run", "nonesuch")
    assert p.returncode == 2 and "unknown payload 'nonesuch'" in p.stderr
    bad = tmp_path / "bad.S"
    bad.write_text("        bogus_instruction\n")
    p = kvmiso("run", str(bad))
    assert p.returncode == 2 and "bad.S:1" in p.stderr and "Traceback" not in p.stderr
    p = kvmiso("run", "hello", "--mode", "real", "--cpl", "3")
    assert p.returncode == 2 and "CPL3 is available in long mode only" in p.stderr


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
@pytest.mark.parametrize("payload,name", [("fault_ud2", "#UD"), ("fault_div0", "#DE")])
def test_run_reports_the_guest_exception_and_where(kvm, mode, payload, name):
    # crt0 reports an exception in every mode; real mode through the IVT the host fills
    from kvmiso.guest.build import build

    source = str(GUESTS / f"{payload}.S")
    fault = build(source, mode).symbols["fault"]
    where = f"at cs:ip 0000:{fault:04x}" if mode == "real" else f"(error code 0x0) at rip {fault:#x}"
    p = kvmiso("run", source, "--mode", mode)
    assert p.returncode == 1, p.stderr
    # the RIP named by the image's label too: the payload's `fault`
    assert f"exception: the guest took {name} {where} (fault) (1 KVM_RUN calls" in p.stdout
    r = json.loads(kvmiso("run", source, "--mode", mode, "--json").stdout)
    vector = {"#UD": 6, "#DE": 0}[name]
    assert r["outcome"] == "exception"
    assert r["exception"] == {"vector": vector, "error_code": 0, "rip": fault, "cr2": 0,
                              "cs": 0 if mode == "real" else None}
