"""Guests that fight back (guests/hostile_*.S): each run ends in a classified RunResult whose
detail names what the guest did, with the console and the exit record bounded."""

from __future__ import annotations

import json

import pytest

from kvmiso.guest import GuestTimeout, Machine, Outcome
from kvmiso.guest import machine as machine_mod
from kvmiso.guest.fuzz import Fuzzer


def run(kvm, payload, mode, cpl=0, timeout=5.0):
    with Machine(payload, mode=mode, cpl=cpl, kvm=kvm) as m:
        try:
            return m.run(timeout=timeout)
        except GuestTimeout as e:
            return e.result


@pytest.mark.parametrize("cpl", [0, 3])
def test_wiping_its_own_page_tables_is_a_shutdown_at_an_unmapped_rip(kvm, cpl):
    with Machine("hostile_pagetables", mode="long", cpl=cpl, kvm=kvm) as m:
        r = m.run(timeout=5)
        rip = m.vcpu.get_regs().rip
    assert r.outcome is Outcome.SHUTDOWN, r.detail
    # kvm_amd resets the vCPU before it reports the shutdown (measured), others leave it where it
    # faulted: the RIP the vCPU holds now says which, and the detail must say the same
    if rip == 0xFFF0:
        assert r.detail.endswith("near rip 0xfff0 (the vCPU's reset state: KVM reset it on shutdown, as kvm_amd does)")
    else:
        assert "triple-faulted" in r.detail and "not mapped by the guest's page tables" in r.detail
    assert r.fail_code is None  # the FAIL after the wipe never ran


@pytest.mark.parametrize("cpl,error_code", [(0, 0x10), (3, 0x14)])  # instruction fetch (+ user)
def test_jump_beyond_the_page_tables_is_a_reported_page_fault(kvm, cpl, error_code):
    r = run(kvm, "hostile_unmapped", "long", cpl)
    assert r.outcome is Outcome.EXCEPTION, r.detail
    e = r.exception
    assert (e.name, e.error_code, e.rip, e.cr2) == ("#PF", error_code, 0x7FFF00000000, 0x7FFF00000000)
    assert "#PF" in r.detail and "cr2 0x7fff00000000" in r.detail


def test_jump_to_memory_no_slot_backs_names_the_address(kvm):
    # protected mode has no paging: the fetch goes to guest-physical 1 GiB, which is MMIO
    r = run(kvm, "hostile_unmapped", "protected")
    assert r.outcome is Outcome.INTERNAL_ERROR, r.detail
    assert "at rip 0x40000000" in r.detail and "which no memory slot backs" in r.detail


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_spin_with_interrupts_off_is_stopped_by_the_timeout(kvm, mode):
    r = run(kvm, "hostile_cli_spin", mode, timeout=0.2)
    assert r.outcome is Outcome.TIMEOUT
    assert "jmp . (a tight loop)" in r.detail and "right after CLI, with interrupts disabled" in r.detail
    assert r.runs == 1  # one KVM_RUN, ended by the kick; the guest never exited on its own


def test_spin_with_interrupts_on_is_not_called_disabled(kvm):
    with Fuzzer("long", timeout=0.2, kvm=kvm) as f:
        r = f.run(bytes([
            0xFB,        # sti
            0xEB, 0xFE,  # jmp .
        ]))
    assert r.outcome is Outcome.TIMEOUT and "jmp ." in r.detail
    assert "interrupts disabled" not in r.detail


@pytest.mark.parametrize("mode,cpl", [("real", 0), ("long", 0), ("long", 3)])
def test_console_flood_is_capped_and_ends_cleanly(kvm, monkeypatch, mode, cpl):
    # small caps, so that the flood passes both before the timeout ends it (kvm_pvm exits per
    # byte); where exits are slow (kvm_amd under QEMU's TCG in kvmiso boot, a loaded host) the
    # guest gets longer, until it has passed them: the checks below are the same either way
    monkeypatch.setattr(machine_mod, "MAX_CONSOLE", 1000)
    monkeypatch.setattr(machine_mod, "MAX_EXITS", 30)
    for timeout in (0.5, 2.0, 8.0, 32.0):
        r = run(kvm, "hostile_flood", mode, cpl, timeout=timeout)
        if r.console_dropped and r.exits_dropped:
            break
    assert r.outcome is Outcome.TIMEOUT
    line = b"flood flood flood flood flood flood flood flood flood flood flood!\n"
    assert r.console == (line * 20)[:1000]
    assert r.console_dropped > 0
    assert len(r.exits) == 30 and r.exits_dropped == r.runs - 1 - 30  # the kick's IntrExit is not kept
    assert f"console output capped at 1000 bytes, {r.console_dropped} more dropped" in r.detail
    d = json.loads(json.dumps(r.to_dict()))
    assert d["exits_dropped"] == r.exits_dropped and len(d["exits"]) == 30


@pytest.mark.parametrize("mode", ["real", "protected", "long"])
def test_unknown_ucall_number_is_malformed_and_named(kvm, mode):
    r = run(kvm, "hostile_ucall", mode)
    assert r.outcome is Outcome.MALFORMED_UCALL
    assert r.detail == "unknown ucall number 66 on port 0xea"
    assert r.report(1) == 7 and r.fail_code is None  # the call before it counted; nothing after ran


def test_wide_ucall_is_malformed_not_guessed(kvm):
    # DONE's number in the low byte of a 4-byte OUT: not the convention, so not DONE
    with Fuzzer("long", kvm=kvm) as f:
        r = f.run(bytes([
            0xB8, 0x01, 0x01, 0x00, 0x00,  # mov $0x101, %eax
            0xE7, 0xEA,                    # out %eax, $0xea
        ]))
    assert r.outcome is Outcome.MALFORMED_UCALL
    assert "one 1-byte OUT to port 0xea" in r.detail and "1 x 4 bytes (01 01 00 00)" in r.detail
