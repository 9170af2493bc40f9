import dataclasses
import random
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvmiso.guest import Machine
from kvmiso.guest.build import build
from kvmiso.isolation.framestore import ByteStore, GuestStore, PageTableError
from kvmiso.isolation.pagetable import (NX, P, PS, RW, SIZE_1G, SIZE_2M, SIZE_4K, US, PageTable, canonical)

# --- pure logic ---------------------------------------------------------------------------------


def test_entries_are_in_the_hardware_format():
    pt = PageTable(ByteStore(1 << 20))
    pt.map(0xFFFFFFFF81000000, 0x1000000, SIZE_2M, page_size=SIZE_2M, flags=P | RW | NX)
    pt.map(0x7000, 0x9000, SIZE_4K, flags=P | US)
    steps = pt.walk(0xFFFFFFFF81000000)
    assert [(s.level, s.index) for s in steps] == [(4, 511), (3, 510), (2, 8)]
    assert steps[-1].pte == 0x1000000 | P | RW | PS | NX
    assert pt.walk(0x7000)[-1].pte == 0x9000 | P | US
    root = pt.store.read(pt.root, 4096)
    assert struct.unpack_from("<Q", root, 8 * 511)[0] == steps[0].pte  # PML4 slot 511, little endian


def test_translate_combines_rights_across_levels():
    pt = PageTable(ByteStore(1 << 20))
    pt.map(0x40000000, 0x40000000, SIZE_1G, page_size=SIZE_1G, flags=P | RW | US)
    t = pt.translate(0x40000000 + 0x12345678)
    assert (t.phys, t.page_size, t.writable, t.user, t.nx) == (0x52345678, SIZE_1G, True, True, False)
    # clearing US in an upper level takes it away for everything below (AND), NX is an OR
    pgd = pt.walk(0x40000000)[0]
    pt.write_entry(pgd.table, pgd.index, (pgd.pte & ~US) | NX)
    t = pt.translate(0x40000000)
    assert (t.user, t.nx, t.writable) == (False, True, True)
    assert pt.translate(0x80000000) is None


@pytest.mark.parametrize("va, pa, size, page, why", [
    (0x1000, 0x1000, 0x1000, 0x3000, "page size"),
    (0x1001, 0x1000, 0x1000, SIZE_4K, "multiple"),
    (0x200000, 0x1000, SIZE_2M, SIZE_2M, "multiple"),
    (0x0000800000000000, 0, SIZE_4K, SIZE_4K, "not canonical"),
    (0x00007FFFFFFFF000, 0, 2 * SIZE_4K, SIZE_4K, "not canonical"),  # runs off the lower half
    (0, 1 << 52, SIZE_4K, SIZE_4K, "MAXPHYADDR"),
])
def test_bad_mappings_are_refused(va, pa, size, page, why):
    pt = PageTable(ByteStore(1 << 20))
    with pytest.raises(PageTableError, match=why):
        pt.map(va, pa, size, page_size=page)


def test_overlaps_and_splits_are_refused():
    pt = PageTable(ByteStore(1 << 20))
    pt.map(0x200000, 0, SIZE_2M, page_size=SIZE_2M)
    with pytest.raises(PageTableError, match="already mapped"):
        pt.map(0x200000, 0, SIZE_2M, page_size=SIZE_2M)
    with pytest.raises(PageTableError, match="inside a 2 MiB page"):
        pt.map(0x201000, 0, SIZE_4K)
    with pytest.raises(PageTableError, match="split"):
        pt.unmap(0x201000, SIZE_4K)
    with pytest.raises(PageTableError, match="flags"):
        pt.map(0x1000, 0, SIZE_4K, flags=PS)
    pt.unmap(0x200000, SIZE_2M)
    assert pt.ranges() == []


def test_ranges_merge_and_dump_names_levels():
    pt = PageTable(ByteStore(1 << 20))
    pt.map(0x1000, 0x5000, 0x3000)
    pt.map(0x4000, 0x20000, 0x1000)  # virtually adjacent, physically not: a new range
    pt.map(0xFFFF888000000000, 0, 4 * SIZE_2M, page_size=SIZE_2M)
    rs = pt.ranges()
    assert [(r.start, r.end, r.phys) for r in rs] == [
        (0x1000, 0x4000, 0x5000), (0x4000, 0x5000, 0x20000), (0xFFFF888000000000, 0xFFFF888000800000, 0)]
    text = pt.dump()
    assert "PGD[273] 0xffff888000000000" in text and "PMD[  3]" in text and "(2048 KiB page)" in text


@st.composite
def mappings(draw):
    out = []
    for _ in range(draw(st.integers(1, 6))):
        page = draw(st.sampled_from([SIZE_4K, SIZE_2M, SIZE_1G]))
        half = draw(st.sampled_from([0, 0xFFFF800000000000]))
        # a small window of each half, so that mappings collide and share tables often
        va = half + draw(st.integers(0, (1 << 32) // page)) * page
        n = draw(st.integers(1, 3 if page != SIZE_4K else 40))
        pa = draw(st.integers(0, (1 << 40) // page)) * page
        flags = P | draw(st.sampled_from([0, RW, US, RW | US])) | draw(st.sampled_from([0, NX]))
        out.append((va, pa, n * page, page, flags))
    return out


def _blocks(va, size, span):
    return range(va // span, (va + size - 1) // span + 1)


def _conflicts(done, va, size, page):
    """Does [va, va + size) overlap a mapping, or need a table where a bigger page is (or a
    bigger page where a table of smaller pages is)?"""
    for v, _, s, p, _ in done:
        if va < v + s and v < va + size:
            return True
        big = max(p, page)
        if p != page and set(_blocks(va, size, big)) & set(_blocks(v, s, big)):
            return True
    return False


@settings(max_examples=60, deadline=None)
@given(mappings(), st.lists(st.integers(0, (1 << 64) - 1), max_size=50), st.randoms())
def test_model_agrees_with_a_list_of_mappings(maps, probes, rnd):
    pt = PageTable(ByteStore(8 << 20))
    done = []
    for va, pa, size, page, flags in maps:
        if _conflicts(done, va, size, page):
            with pytest.raises(PageTableError):
                pt.map(va, pa, size, page_size=page, flags=flags)
            continue
        pt.map(va, pa, size, page_size=page, flags=flags)
        done.append((va, pa, size, page, flags))
    assert sum(r.size for r in pt.ranges()) == sum(m[2] for m in done)
    for v, _, s, _, _ in done:
        probes += [v - 1, v, v + s - 1, v + s, v + rnd.randrange(s)]
    for a in probes:
        a &= (1 << 64) - 1
        if not canonical(a):
            with pytest.raises(PageTableError):
                pt.translate(a)
            continue
        t = pt.translate(a)
        want = next(((pa + a - v, f) for v, pa, s, _, f in done if v <= a < v + s), None)
        assert (t is None) == (want is None)
        if t:
            assert t.phys == want[0]
            assert (t.writable, t.user, t.nx) == (bool(want[1] & RW), bool(want[1] & US), bool(want[1] & NX))


def test_without_gbpages_a_pud_leaf_is_reserved():
    pt = PageTable(ByteStore(1 << 20), gbpages=False)
    with pytest.raises(PageTableError, match="pdpe1gb"):
        pt.map(0x40000000, 0, SIZE_1G, page_size=SIZE_1G)
    pt.map(0x1000, 0x1000, SIZE_4K)
    pud = pt.walk(0x1000)[1]
    pt.write_entry(pud.table, 1, P | RW | PS)  # what a CPU with gbpages would take as 1 GiB at 1 GiB
    assert pt.translate(0x40000000) is None and pt.ranges()[0].start == 0x1000
    pt.gbpages = True
    assert pt.translate(0x40000123).phys == 0x123


# --- on real KVM --------------------------------------------------------------------------------

MEMORY = 8 << 20
FRAMES = (0x400000, 0x200000)  # the model's table frames: guest-physical [4 MiB, 6 MiB)


def _has_gbpages(entries) -> bool:
    return any(e.function == 0x80000001 and e.edx >> 26 & 1 for e in entries)


def _gbpages(vcpu) -> bool:
    """What KVM's walker uses: the guest's CPUID bit, and only where KVM supports 1 GiB pages
    itself (guest capabilities are masked with KVM's since Linux 6.13; kvm_pvm lacks them)."""
    return _has_gbpages(vcpu.get_cpuid2()) and _has_gbpages(vcpu.vm.kvm.get_supported_cpuid())


def _model_tables(vm) -> PageTable:
    """The guest's own code/stack/host tables identity-mapped, plus kernel-half and user-half
    ranges of every page size with holes between them. The 1 GiB page is written even when
    the vCPU lacks gbpages: then both KVM and the model must fault on it."""
    pt = PageTable(GuestStore(vm, *FRAMES))
    pt.map(0, 0, MEMORY, page_size=SIZE_2M, flags=P | RW)
    pt.map(0xFFFFFFFF81000000, 0x200000, 2 * SIZE_2M, page_size=SIZE_2M, flags=P | RW | NX)
    pt.map(0xFFFFFFFF81600000, 0x600000, SIZE_2M, page_size=SIZE_2M, flags=P)
    pt.map(0xFFFF888000000000, 0x300000, 16 * SIZE_4K, flags=P | RW | NX)
    pt.map(0xFFFF888000011000, 0x320000, 3 * SIZE_4K, flags=P | RW)
    pt.map(0xFFFFC90000000000, 0, SIZE_1G, page_size=SIZE_1G, flags=P | RW)
    pt.map(0xFFFFFE0000001000, 0x380000, 8 * SIZE_4K, flags=P | RW)  # cpu_entry_area-like
    pt.map(0x00007FFFFFFFE000, 0x390000, 2 * SIZE_4K, flags=P | RW | US)  # top of the user half
    pt.map(0xFFFF800000000000, 0x3A0000, SIZE_4K, flags=P)  # bottom of the kernel half
    pt.gbpages = _gbpages(vm.vcpus[0])
    return pt


def _with_gbpages(m, on: bool) -> None:
    """Give the vCPU CPUID pdpe1gb (or take it away): KVM's walker follows the guest's CPUID."""
    entries = [dataclasses.replace(e, edx=e.edx | 1 << 26 if on else e.edx & ~(1 << 26))
               if e.function == 0x80000001 else e for e in m.vcpu.get_cpuid2()]
    m.vcpu.set_cpuid2(entries)


def _boundaries(pt: PageTable) -> list[int]:
    out = []
    for r in pt.ranges():
        out += [r.start - 1, r.start, r.start + 1, r.end - 1, r.end, r.end + 1]
    return [a & ((1 << 64) - 1) for a in out if canonical(a & ((1 << 64) - 1))]


@pytest.mark.parametrize("gbpages", [False, True])
def test_kvm_translate_agrees_with_the_model(kvm, gbpages):
    with Machine("iso_touch", mode="long", memory=MEMORY, kvm=kvm) as m:
        _with_gbpages(m, gbpages)
        pt = _model_tables(m.vm)
        assert pt.gbpages == (gbpages and _has_gbpages(kvm.get_supported_cpuid()))
        sregs = m.vcpu.get_sregs()
        sregs.cr3 = pt.root
        m.vcpu.set_sregs(sregs)
        rng = random.Random(4)
        probes = _boundaries(pt)
        for r in pt.ranges():
            probes += [rng.randrange(r.start, r.end) for _ in range(200)]
        while len(probes) < 5000:
            a = rng.randrange(0, 1 << 48)
            probes.append(a | 0xFFFF000000000000 if a >> 47 else a)
        kernel = sum(1 for a in probes if a >> 63)
        assert kernel > 1000
        valid = 0
        for a in probes:
            t = m.vcpu.translate(a)
            want = pt.translate(a)
            assert t.valid == (want is not None), f"{a:#x}: KVM valid={t.valid}, model {want}"
            if want:
                valid += 1
                assert t.physical_address == want.phys, f"{a:#x}: KVM {t.physical_address:#x} model {want.phys:#x}"
        assert valid > 1000  # the comparison covered mapped addresses, not only holes


def test_guest_faults_exactly_where_the_model_says(kvm):
    with Machine("iso_touch", mode="long", memory=MEMORY, kvm=kvm) as m:
        pt = _model_tables(m.vm)
        sregs = m.vcpu.get_sregs()
        sregs.cr3 = pt.root
        m.vcpu.set_sregs(sregs)
        # addresses backed by guest RAM where mapped (a read of unbacked RAM would be MMIO)
        addrs = [a for a in _boundaries(pt) if (t := pt.translate(a)) is None or t.phys < MEMORY]
        addrs += [0x0000123456789000, 0xFFFFEA0000000000, 0xFFFFFFFF81400000]
        m.vm.write(0x100000, struct.pack(f"<{len(addrs) + 1}Q", len(addrs), *addrs))
        result = m.run(timeout=20)
        assert result.ok, result.detail
        expected = [a for a in addrs if pt.translate(a) is None]
        assert 10 < len(expected) < len(addrs)
        cr2 = [r.value for r in result.reports if r.tag == 1]
        rip = {r.value for r in result.reports if r.tag == 2}
        assert cr2 == expected
        assert rip == {build("iso_touch", "long").symbols["touch"]}
        assert result.report(3) == len(expected)


def test_a_full_frame_pool_is_an_error_not_a_corruption():
    pt = PageTable(ByteStore(2 * 4096, base=0x10000))
    assert pt.root == 0x10000
    with pytest.raises(PageTableError, match=r"frame pool \[0x10000, 0x12000\) is full"):
        pt.map(0x1000, 0, SIZE_4K)  # needs PUD, PMD and PT frames: only one is left
    with pytest.raises(PageTableError, match="outside the frame store"):
        pt.store.read(0x12000, 8)
