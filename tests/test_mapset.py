import struct
from pathlib import Path

import pytest

from kvmiso.guest import Machine
from kvmiso.guest.build import build
from kvmiso.isolation.layout import build_layout
from kvmiso.isolation.mapset import (KernelTable, KvmAddressSpace, MapSetError, SharedTableError, default_specs,
                                     load_regions)
from kvmiso.isolation.pagetable import SIZE_2M, GuestStore, P, RW

FIXTURES = Path(__file__).parent / "fixtures" / "isolation"
KALLSYMS = (FIXTURES / "kallsyms.txt").read_text()
FLAGS = "flags\t\t: fpu pae nx pdpe1gb lm\n"


@pytest.fixture(scope="module")
def layout():
    return build_layout(KALLSYMS, FLAGS, cpus=2, vendor="kvm_pvm", ram=4 << 30)


def _kernel_bytes(kas):
    return {f: kas.kernel.store.read(f, 4096) for f in kas.kernel.table_frames()}


def test_default_set_is_the_rfc_set(layout):
    kas = KvmAddressSpace.default(layout)
    names = [r.name for r in kas.regions]
    assert names[:5] == ["kernel_image", "percpu_areas", "cpu_entry_area", "espfix", "irq_stacks"]
    assert {"vm_struct", "vcpu_struct", "pio_data", "vcpu_task", "memslots", "buses", "pvcs"} <= set(names)
    assert all(r.cite for r in kas.regions)
    assert next(r for r in kas.regions if r.name == "memslots").cite.startswith("RFC patch 26")
    intel = KvmAddressSpace.default(build_layout(KALLSYMS, FLAGS, vendor="kvm_intel"))
    assert {"vmcs", "msr_bitmap", "pml_page", "l1d_flush_pages"} <= {r.name for r in intel.regions}


def test_every_region_maps_what_the_kernel_maps_and_nothing_else(layout):
    kas = KvmAddressSpace.default(layout)
    for spec in kas.regions:
        region = layout.region(spec.name)
        for s, e in region.ranges:
            for a in (s, e - 1, (s + e) // 2):
                assert kas.table.translate(a) == kas.kernel.translate(a), (spec.name, hex(a))
    # guard pages and the rest of the direct map and vmalloc space stay unmapped
    vcpu = layout.region("vcpu_struct")
    assert not kas.mapped(vcpu.ranges[0][1]) and kas.kernel.translate(vcpu.ranges[0][1])
    assert not kas.mapped(layout.region("direct_map").start)
    s = kas.summary()
    assert 0 < s["kvm_pages_4k"] < s["kernel_pages_4k"] and 0 < s["share_of_kernel_mapped"] < 0.1


def test_kernel_table_never_changes(layout):
    kas = KvmAddressSpace(KernelTable(layout))
    before = _kernel_bytes(kas)
    text = layout.region("text")
    ops = [
        lambda: [kas.add_region(s) for s in default_specs(layout)],
        lambda: kas.copy(text.start & ~(SIZE_2M - 1), (text.start & ~(SIZE_2M - 1)) + SIZE_2M, "PMD", "again"),
        lambda: kas.copy(text.start & ~0xFFF, (text.start & ~0xFFF) + 0x3000, "PTE", "inside"),  # merged
        lambda: kas.drop_region("buses"),
        lambda: kas.drop_region("vcpu_stack"),
        lambda: kas.clear(layout.region("cpu_entry_area").start, layout.region("cpu_entry_area").ranges[0][1], "PGD"),
        lambda: kas.copy(layout.region("direct_map").start, layout.region("direct_map").start + 0x1000, "PTE", "dm"),
    ]
    for op in ops:
        op()
        assert _kernel_bytes(kas) == before
    # refused writes leave it unchanged too
    with pytest.raises(MapSetError, match="inside a 2 MiB page"):
        kas.clear(text.start & ~0xFFF, (text.start & ~0xFFF) + 0x1000, "PTE")
    cea = layout.region("cpu_entry_area")
    kas.copy(cea.start, cea.ranges[0][1], "P4D", "cpu_entry_area")
    with pytest.raises(SharedTableError):
        kas.clear(cea.start, cea.start + 0x1000, "PTE")
    assert _kernel_bytes(kas) == before


def test_copy_above_pte_shares_and_refuses_shared_writes(layout):
    kas = KvmAddressSpace(KernelTable(layout))
    cea = layout.region("cpu_entry_area")
    kas.copy(cea.start, cea.ranges[0][1], "P4D", "cpu_entry_area")
    pgd = kas.table.walk(cea.start)[0].pte
    assert pgd == kas.kernel.walk(cea.start)[0].pte  # the same PUD page: shared
    with pytest.raises(SharedTableError, match="shared with the kernel"):
        kas.clear(cea.start, cea.start + 0x1000, "PTE")
    assert kas.mapped(cea.start)
    kas.clear(cea.start, cea.ranges[0][1], "PGD")  # the PGD entry is KVM's own: allowed
    assert not kas.mapped(cea.start)


def test_huge_kernel_pages_are_copied_whole_and_merges_are_noted(layout):
    kas = KvmAddressSpace(KernelTable(layout))
    dm = layout.region("direct_map").start
    c = kas.copy(dm, dm + 0x1000, "PTE", "a page")
    assert c.mapped == [(dm, dm + (1 << 30))] and "copied whole" in c.notes[0]
    img = layout.region("kernel_image").start + (16 << 20)
    kas.copy(img, img + SIZE_2M, "PMD", "image")
    tables = _kernel_bytes(kas)
    kvm_tables = {f: kas.table.store.read(f, 4096) for f in kas.owned}
    c = kas.copy(img + 0x1000, img + 0x2000, "PTE", "inside")
    assert c.mapped == [(img, img + SIZE_2M)]  # the kernel's 2 MiB leaf, already present: merged
    assert {f: kas.table.store.read(f, 4096) for f in kas.owned} == kvm_tables
    assert _kernel_bytes(kas) == tables


@pytest.mark.parametrize("start, end, level, why", [
    (0xFFFFFFFF81000000, 0xFFFFFFFF81001000, "PMD", "cannot hold"),
    (0xFFFF888000001000, 0xFFFF888000002000, "PUD", "cannot hold"),
    (0x0000800000000000, 0x0000800000001000, "PTE", "not canonical"),
    (0xFFFFFFFF81000000, 0xFFFFFFFF81001000, "PXD", "unknown level"),
])
def test_bad_copies_are_refused(layout, start, end, level, why):
    kas = KvmAddressSpace(KernelTable(layout))
    with pytest.raises(ValueError, match=why):
        kas.copy(start, end, level)


def test_policies_and_drops(layout):
    kas = KvmAddressSpace.default(layout, policy="asi", drop=("buses",))
    assert kas.summary()["policy"] == "asi" and "buses" not in [r.name for r in kas.regions]
    assert not kas.mapped(layout.region("buses").start)
    with pytest.raises(MapSetError, match="unknown policy"):
        KvmAddressSpace.default(layout, policy="pti")
    with pytest.raises(MapSetError, match="cannot drop 'nope'"):
        KvmAddressSpace.default(layout, drop=("nope",))


@pytest.mark.parametrize("toml, line, why", [
    ('drop = ["buses"]\ndrop2 = 1\n', 2, "unknown key"),
    ('drop = [\n  "buses",\n  "nosuch",\n]\n', 3, "unknown region 'nosuch'"),
    ('[[region]]\nname = "x"\nstart = 0x0000900000000000\nsize = 0x1000\n', 2, "not canonical"),
    ('[[region]]\nname = "x"\nstart = 0xffffffff81000000\nsize = 0x1000\n', 2, "overlaps region 'kernel_image'"),
    ('\n[[region]]\nname = "y"\nstart = 0xffffea0000001000\nsize = 0x1000\nlevel = "PMD"\n', 3, "level PMD cannot hold"),
    ('[[region]]\nname = "nolayout"\n', 2, "unknown region 'nolayout'"),
    ('policy = "asi"\ndrop = ["buses"\n  "x"]\n', 3, "not valid TOML"),
])
def test_region_files_name_the_line(layout, tmp_path, toml, line, why):
    f = tmp_path / "regions.toml"
    f.write_text(toml)
    with pytest.raises(MapSetError) as e:
        load_regions(f, layout)
    assert why in str(e.value)
    assert f"{f}:{line}" in str(e.value) or f"line {line}" in str(e.value)


def test_region_files_add_and_drop(layout, tmp_path):
    f = tmp_path / "regions.toml"
    f.write_text('policy = "asi"\ndrop = ["memslots"]\n\n[[region]]\nname = "vmemmap"\nlevel = "PGD"\n'
                 'cite = "struct page lookups"\n')
    kas = load_regions(f, layout)
    assert kas.policy.name == "asi" and "memslots" not in [r.name for r in kas.regions]
    vm = layout.region("vmemmap")
    assert kas.spec("vmemmap").group == "user-added"
    assert kas.region_of(layout.region("vcpu_struct").start) == "vcpu_struct"
    assert not kas.mapped(vm.start)  # the kernel table maps nothing in vmemmap: nothing to copy


def test_guest_runs_on_the_mapset_tables(kvm):
    """The KVM table mapset built, in guest memory, plus an identity part for the guest: the
    guest faults exactly on the addresses kvm_mm does not map."""
    memory = 8 << 20
    with Machine("iso_touch", mode="long", memory=memory, kvm=kvm) as m:
        lay = build_layout(KALLSYMS, FLAGS, cpus=2, vendor="kvm_pvm", ram=1 << 30)
        kernel = KernelTable(lay, gbpages=False, store=GuestStore(m.vm, 0x400000, 0x300000))
        kas = KvmAddressSpace(kernel)
        for spec in default_specs(lay):
            if spec.name not in ("buses", "vcpu_stack"):
                kas.add_region(spec)
        kas.table.map(0, 0, memory, page_size=SIZE_2M, flags=P | RW)  # the guest's own code, stack, tables
        sregs = m.vcpu.get_sregs()
        sregs.cr3 = kas.table.root
        m.vcpu.set_sregs(sregs)
        probes = []
        for name in ("buses", "vcpu_stack", "vcpu_struct", "pio_data", "memslots", "vm_struct", "percpu_areas"):
            for s, e in lay.region(name).ranges:
                probes += [s, e - 1, e]  # e: the guard page after the object
        probes += [lay.region("text").start, lay.region("direct_map").start + (2 << 30)]
        m.vm.write(0x100000, struct.pack(f"<{len(probes) + 1}Q", len(probes), *probes))
        result = m.run(timeout=20)
        assert result.ok, result.detail
        expected = [a for a in probes if not kas.mapped(a)]
        assert [r.value for r in result.reports if r.tag == 1] == expected
        assert len(expected) >= 8 and len(expected) < len(probes)
        assert {r.value for r in result.reports if r.tag == 2} == {build("iso_touch", "long").symbols["touch"]}


def test_a_different_entry_is_never_overwritten(layout):
    """kvm_set_pXd() in the RFC returns -EBUSY rather than overwrite: a PMD-level copy over a
    PTE-level one is refused until that copy is cleared."""
    kas = KvmAddressSpace(KernelTable(layout))
    vcpu = layout.region("vcpu_struct").start
    pmd = vcpu & ~(SIZE_2M - 1)
    kas.copy(vcpu, vcpu + 0x1000, "PTE", "vcpu_struct")
    before = kas.table.store.read(kas.table.root, 4096)
    with pytest.raises(MapSetError, match="would overwrite"):
        kas.copy(pmd, pmd + SIZE_2M, "PMD", "wider")
    assert kas.table.store.read(kas.table.root, 4096) == before


def test_user_regions_come_from_the_vcpu_tasks_mm(layout):
    """The kernel table models current->mm: the VMM's guest memory is there, and kvm_mm maps
    it only when a region asks for it."""
    kas = KvmAddressSpace.default(layout)
    gm = layout.region("guest_memory")
    assert kas.kernel.translate(gm.start).user and not kas.mapped(gm.start)
    from kvmiso.isolation.mapset import RegionSpec

    kas.add_region(RegionSpec("guest_memory", "user-added", "PTE", "test"))
    assert kas.mapped(gm.start) and kas.mapped(gm.ranges[-1][1] - 1)
    assert kas.region_of(gm.start) == "guest_memory"
