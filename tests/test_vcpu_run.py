"""Vcpu.run()'s fast path: the compiled call packs an I/O or MMIO exit into one key and the
Exit built for a key serves it again. Reusing it is only right if equal keys mean equal exits:
checked on pages laid out field by field, then on the real device against a fresh decode."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, strategies as st

from kvmiso.guest import Machine, build
from kvmiso.guest.suite import SUITE_PAYLOADS, answer_io, answer_mmio, answer_msr
from kvmiso.guest.build import payload_modes, payload_path
from kvmiso.kvm import abi
from kvmiso.kvm.exitdecode import decode
from kvmiso.kvm.exits import IoExit, MmioExit
from kvmiso.kvm.vcpu import _RUN_LAYOUT, ffi, lib

# every value the packed key holds: direction, size (a byte), port, count and data_offset (a page
# of the 16 it can name); physical address (52 bits), length (7 bits) and direction for MMIO
IO_FIELDS = (st.sampled_from([abi.KVM_EXIT_IO_IN, abi.KVM_EXIT_IO_OUT]), st.integers(0, 0xFF),
             st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 15).map(lambda page: page * 4096))
MMIO_FIELDS = (st.integers(0, (1 << 52) - 1), st.integers(0, 0x7F), st.booleans())
IO, MMIO = st.tuples(*IO_FIELDS), st.tuples(*MMIO_FIELDS)


def _one_field_changed(fields):
    """(a, b): b is a with at most one field drawn again; a collision between two exits that
    differ in one field is what an overlapping or truncated bit in the key would make."""
    @st.composite
    def pairs(draw):
        a = draw(st.tuples(*fields))
        i = draw(st.integers(0, len(fields) - 1))
        return a, a[:i] + (draw(fields[i]),) + a[i + 1:]
    return pairs()


def _key(page: bytearray) -> int:
    v = ffi.new("struct kvmiso_vcpu *", {"page": ffi.from_buffer(page), "lay": _RUN_LAYOUT})
    return lib.kvmiso_exit_key(v)


def _io_page(direction: int, size: int, port: int, count: int, data_offset: int) -> bytearray:
    page = bytearray(3 * 4096)
    run = abi.kvm_run.from_buffer(page)
    run.exit_reason = abi.KVM_EXIT_IO
    run.u.io.direction, run.u.io.size, run.u.io.port = direction, size, port
    run.u.io.count, run.u.io.data_offset = count, data_offset
    return page


def _mmio_page(address: int, length: int, is_write: bool) -> bytearray:
    page = bytearray(3 * 4096)
    run = abi.kvm_run.from_buffer(page)
    run.exit_reason = abi.KVM_EXIT_MMIO
    run.u.mmio.phys_addr, run.u.mmio.len, run.u.mmio.is_write = address, length, is_write
    return page


@given(st.one_of(st.tuples(IO, IO), _one_field_changed(IO_FIELDS)))
def test_io_keys_are_equal_exactly_when_the_exits_are(pair):
    a, b = pair
    ka, kb = _key(_io_page(*a)), _key(_io_page(*b))
    assert ka >= lib.KVMISO_KEY_IO and kb >= lib.KVMISO_KEY_IO  # every field packed
    assert (ka == kb) == (a == b)


@given(st.one_of(st.tuples(MMIO, MMIO), _one_field_changed(MMIO_FIELDS)))
def test_mmio_keys_are_equal_exactly_when_the_exits_are(pair):
    a, b = pair
    ka, kb = _key(_mmio_page(*a)), _key(_mmio_page(*b))
    assert lib.KVMISO_KEY_MMIO <= ka < lib.KVMISO_KEY_IO and lib.KVMISO_KEY_MMIO <= kb < lib.KVMISO_KEY_IO
    assert (ka == kb) == (a == b)


def test_exits_too_wide_to_pack_are_keyed_by_their_reason():
    assert _key(_io_page(abi.KVM_EXIT_IO_OUT, 1, 0x10, 1 << 16, 4096)) == abi.KVM_EXIT_IO
    assert _key(_io_page(abi.KVM_EXIT_IO_OUT, 1, 0x10, 1, 4096 + 8)) == abi.KVM_EXIT_IO
    assert _key(_mmio_page(1 << 52, 4, True)) == abi.KVM_EXIT_MMIO
    page = bytearray(3 * 4096)
    abi.kvm_run.from_buffer(page).exit_reason = abi.KVM_EXIT_DEBUG
    assert _key(page) == abi.KVM_EXIT_DEBUG
    abi.kvm_run.from_buffer(page).exit_reason = lib.KVMISO_SAME_EXIT  # a reason that large is moved aside
    assert _key(page) == lib.KVMISO_SAME_EXIT << 32


def _suite():
    for name in SUITE_PAYLOADS:
        for mode in payload_modes(payload_path(name)):
            if name != "hypercall":  # never returns at CPL0 on some hosts (probe: cpl0_hypercall_returns)
                yield name, mode


@pytest.mark.parametrize("payload,mode", list(_suite()))
def test_every_exit_equals_a_fresh_decode_of_the_page(kvm, payload, mode):
    seen = []

    def check(e):
        fresh = decode(e_page)
        assert e == fresh and type(e) is type(fresh)
        if isinstance(e, (IoExit, MmioExit)):
            assert bytes(e.data) == bytes(fresh.data)
        seen.append(e)

    with Machine(payload, mode=mode, kvm=kvm) as m:
        e_page = m.vcpu.page
        if payload == "msr":
            m.vm.enable_cap("X86_USER_SPACE_MSR", abi.KVM_MSR_EXIT_REASON_UNKNOWN)
        if payload == "singlestep":
            m.vcpu.set_guest_debug(single_step=True)
        m.run(timeout=10, on_exit=check, on_io=answer_io, on_mmio=answer_mmio, on_msr=answer_msr)
    assert seen


def test_a_repeated_exit_is_the_same_frozen_object(kvm):
    with Machine(build("bench_out", "long"), kvm=kvm) as m:
        first, second = m.vcpu.run(), m.vcpu.run()
        assert first is second and first.port == m.image.symbols["PORT_BENCH"]
        with pytest.raises(dataclasses.FrozenInstanceError):
            first.port = 0
    with Machine("portio", mode="long", kvm=kvm) as m:
        exits = [m.vcpu.run() for _ in range(3)]
        # OUT 0x3000 size 1, OUT 0x3002 size 2, IN 0x3000: three keys, three objects, each as built
        assert [(e.port, e.size, e.is_in) for e in exits] == [(0x3000, 1, False), (0x3002, 2, False), (0x3000, 1, True)]


def test_repeated_interleaved_and_reason_exits_all_decode_right(kvm):
    # real mode at 0x1000: out 0x10; hlt; out 0x10; out 0x11; out 0x10; hlt
    code = bytes([0xE6, 0x10,  # out %al, $0x10
                  0xF4,        # hlt
                  0xE6, 0x10,  # out %al, $0x10   (the same exit as the last I/O one)
                  0xE6, 0x11,  # out %al, $0x11
                  0xE6, 0x10,  # out %al, $0x10   (seen before, not last)
                  0xF4])       # hlt
    with kvm.create_vm() as vm:
        vm.add_memory(0, 0x10000)
        vm.write(0x1000, code)
        vcpu = vm.create_vcpu()
        sregs = vcpu.get_sregs()
        sregs.cs.base = sregs.cs.selector = 0
        vcpu.set_sregs(sregs)
        regs = vcpu.get_regs()
        regs.rip, regs.rflags = 0x1000, 2
        vcpu.set_regs(regs)
        exits = []
        for _ in range(6):
            e = vcpu.run()
            assert e == decode(vcpu.page)
            exits.append(e)
    assert [getattr(e, "port", e.name) for e in exits] == [0x10, "HLT", 0x10, 0x11, 0x10, "HLT"]
    assert exits[0] is exits[2] is exits[4] and exits[3] is not exits[0]
