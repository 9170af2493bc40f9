"""kvm_mm built the RFC's way (copies at a level, huge leaves copied whole, no write into a
shared table) over the live kernel table of the evidence and over a modeled one, ASI's denylist,
the 2022 ASI RFC's allowlist, and the distinct physical bytes each maps."""

import struct
from pathlib import Path

import pytest

from kvmiso.guest import Machine
from kvmiso.guest.build import build
from kvmiso.isolation import model_summary
from kvmiso.isolation.kerneltable import ModeledKernelTable, leaf_extents, physical_bytes
from kvmiso.isolation.layout import build_layout
from kvmiso.isolation.mapset import (DenylistSpace, KvmAddressSpace, MapSetError, RegionSpec, SharedTableError,
                                     address_space, default_specs)
from kvmiso.isolation.framestore import GuestStore, PageTableError
from kvmiso.isolation.pagetable import SIZE_2M, P, RW
from kvmiso.isolation.regionfile import load_regions
from kvmiso.observe.kernel.evidence import read_evidence

from test_layout import modeled

PORTIO = read_evidence(Path(__file__).parent / "fixtures" / "evidence" / "portio.evidence.json")


@pytest.fixture(scope="module")
def layout():
    return modeled()


@pytest.fixture(scope="module")
def live():
    return build_layout(PORTIO, cpus=2)


def _kernel_bytes(kas):
    return {f: kas.kernel.store.read(f, 4096) for f in kas.kernel.table_frames()}


def test_default_set_is_the_rfc_set(layout, live):
    kas = KvmAddressSpace.default(layout)
    names = [r.name for r in kas.regions]
    assert names[:5] == ["kernel_image", "percpu_area", "cpu_entry_area", "espfix", "irq_stack"]
    assert {"vm_struct", "vcpu_struct", "pio_data", "vcpu_task", "memslots", "buses"} <= set(names)
    assert all(r.cite for r in kas.regions)
    assert next(r for r in kas.regions if r.name == "memslots").cite.startswith("RFC patch 26")
    intel = KvmAddressSpace.default(modeled("kvm_intel"))
    assert {"vmcs", "msr_bitmap"} <= {r.name for r in intel.regions}
    real = KvmAddressSpace.default(live)
    assert "lapic" in real.missing  # no in-kernel LAPIC on this VM: vcpu->arch.apic is NULL, said so


@pytest.mark.parametrize("which", ["modeled", "live"])
def test_every_region_maps_what_the_kernel_maps(layout, live, which):
    lay = layout if which == "modeled" else live
    kas = KvmAddressSpace.default(lay)
    for spec in kas.regions:
        for region in lay.matching(spec.layout or spec.name):
            for s, e in region.ranges:
                for a in (s, e - 1):
                    assert kas.table.translate(a) == kas.kernel.translate(a), (spec.name, hex(a))


def test_modeled_guard_pages_stay_unmapped(layout):
    kas = KvmAddressSpace.default(layout)
    vcpu = layout.region("vcpu_struct")
    end = (vcpu.ranges[0][1] + 4095) & ~4095
    assert not kas.mapped(end) and kas.kernel.translate(end)
    assert not kas.mapped(layout.region("direct_map").start)


def test_live_huge_leaves_expose_their_neighbours(live):
    """The real table maps this vCPU struct with a huge leaf: the RFC's PTE-level copy of it
    copies the whole leaf (patch 14), and the summary counts what that exposes."""
    kas = KvmAddressSpace.default(live)
    vcpu = live.region("vcpu_struct")
    leaf = kas.kernel.walk(vcpu.start)[-1]
    assert leaf.leaf and leaf.level >= 2  # 2 MiB or 1 GiB on this host
    span = 1 << {2: 21, 3: 30}[leaf.level]
    base = vcpu.start & ~(span - 1)
    assert kas.mapped(base) and kas.mapped(base + span - 1)
    exposed, own = kas.exposed("vcpu_struct")
    assert exposed >= span > own
    c = next(c for c in kas.copies if c.region == "vcpu_struct")
    assert any("copied whole" in n for n in c.notes)


def test_live_kernel_frames_are_never_written(live):
    kas = KvmAddressSpace.default(live)
    frame = next(iter(kas.kernel.captured))
    with pytest.raises(PageTableError, match="never written"):
        kas.kernel.store.write(frame, b"\0" * 8)
    missing = max(kas.kernel.captured) + (1 << 40)
    with pytest.raises(PageTableError, match="holds no page-table page"):
        kas.kernel.store.read(missing, 8)


def test_kernel_table_never_changes(layout):
    kas = KvmAddressSpace(ModeledKernelTable(layout, 1 << 30))
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
    with pytest.raises(MapSetError, match="inside a 2 MiB page"):
        kas.clear(text.start & ~0xFFF, (text.start & ~0xFFF) + 0x1000, "PTE")
    cea = layout.region("cpu_entry_area")
    kas.copy(cea.start, cea.ranges[0][1], "P4D", "cpu_entry_area")
    with pytest.raises(SharedTableError):
        kas.clear(cea.start, cea.start + 0x1000, "PTE")
    assert _kernel_bytes(kas) == before


def test_copy_above_pte_shares_and_refuses_shared_writes(layout):
    kas = KvmAddressSpace(ModeledKernelTable(layout, 1 << 30))
    cea = layout.region("cpu_entry_area")
    kas.copy(cea.start, cea.ranges[0][1], "P4D", "cpu_entry_area")
    assert kas.table.walk(cea.start)[0].pte == kas.kernel.walk(cea.start)[0].pte  # the same PUD page: shared
    with pytest.raises(SharedTableError, match="shared with the kernel"):
        kas.clear(cea.start, cea.start + 0x1000, "PTE")
    assert kas.mapped(cea.start)
    kas.clear(cea.start, cea.ranges[0][1], "PGD")  # the PGD entry is KVM's own: allowed
    assert not kas.mapped(cea.start)


@pytest.mark.parametrize("start, end, level, why", [
    (0xFFFFFFFF81000000, 0xFFFFFFFF81001000, "PMD", "cannot hold"),
    (0xFFFF888000001000, 0xFFFF888000002000, "PUD", "cannot hold"),
    (0x0000800000000000, 0x0000800000001000, "PTE", "not canonical"),
    (0xFFFFFFFF81000000, 0xFFFFFFFF81001000, "PXD", "unknown level"),
])
def test_bad_copies_are_refused(layout, start, end, level, why):
    kas = KvmAddressSpace(ModeledKernelTable(layout, 1 << 30))
    with pytest.raises(ValueError, match=why):
        kas.copy(start, end, level)


def test_policies_and_drops(layout):
    kas = address_space(layout, "rfc-v1", drop=("buses",))
    assert "buses" not in [r.name for r in kas.regions]
    assert not kas.mapped(layout.region("bus:PIO").start)
    with pytest.raises(MapSetError, match="unknown policy"):
        address_space(layout, "pti")
    with pytest.raises(MapSetError, match="cannot drop 'nope'"):
        address_space(layout, drop=("nope",))
    for policy in ("asi", "asi-2022"):
        with pytest.raises(MapSetError, match="no region to drop"):
            address_space(layout, policy, drop=("buses",))
        with pytest.raises(MapSetError, match="region files change the RFC's kvm_mm copies only"):
            load_regions("modern", layout, policy)


def test_asi_maps_everything_but_sensitive_memory(live):
    asi = address_space(live, "asi")
    assert isinstance(asi, DenylistSpace)
    for name in ("emulate_ctxt", "cpuid_entries", "vcpu_struct", "kvm_run_page", "memslot:0"):
        assert asi.mapped(live.region(name).start), name  # slab, page allocator, vmalloc: all non-sensitive
    gm = live.region("guest_memory:0")
    assert asi.sensitive(gm.start) and not asi.mapped(gm.start)  # the KVM class maps no user half
    touched = next(a for a in range(gm.start, gm.ranges[0][1], 4096) if asi.kernel.translate(a))  # a page the guest used
    alias = live.region("direct_map").start + asi.kernel.translate(touched).phys
    assert asi.sensitive(alias) and not asi.mapped(alias)  # nor guest memory's direct-map alias
    old = address_space(live, "asi-2022")
    assert old.mapped(touched) and not old.sensitive(gm.start)  # "locally non-sensitive"
    assert asi.mapped_bytes() < asi.kernel.mapped_bytes()


@pytest.mark.parametrize("toml, line, why", [
    ('drop = ["buses"]\ndrop2 = 1\n', 2, "unknown key"),
    ('drop = [\n  "buses",\n  "nosuch",\n]\n', 3, "unknown region 'nosuch'"),
    ('[[region]]\nname = "x"\nstart = 0x0000900000000000\nsize = 0x1000\n', 2, "not canonical"),
    ('\n[[region]]\nname = "y"\nstart = 0xffffea0000001000\nsize = 0x1000\nlevel = "PMD"\n', 3, "level PMD cannot hold"),
    ('[[region]]\nname = "nolayout"\n', 2, "unknown region 'nolayout'"),
    ('drop = ["buses"\n  "x"]\n', 2, "not valid TOML"),
])
def test_region_files_name_the_line(layout, tmp_path, toml, line, why):
    f = tmp_path / "regions.toml"
    f.write_text(toml)
    with pytest.raises(MapSetError) as e:
        load_regions(f, layout)
    assert why in str(e.value) and f"{f}:{line}" in str(e.value)


def _binary(p):
    (p / "bin.toml").write_bytes(b"\xd0\xff\x00")
    return p / "bin.toml"


@pytest.mark.parametrize("make, why", [
    (lambda p: p / "nosuch", "no region file"),
    (lambda p: p, "is a directory"),
    (_binary, "is not UTF-8"),
])
def test_bad_region_files_are_one_line(layout, tmp_path, make, why):
    with pytest.raises(MapSetError) as e:
        load_regions(make(tmp_path), layout)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_region_files_add_and_drop(layout, tmp_path):
    f = tmp_path / "regions.toml"
    f.write_text('drop = ["memslots"]\n\n[[region]]\nname = "emulate_ctxt"\ncite = "a 6.x slab object"\n')
    kas = load_regions(f, layout)
    assert "memslots" not in [r.name for r in kas.regions] and kas.spec("emulate_ctxt").group == "user-added"
    assert kas.mapped(layout.region("emulate_ctxt").start)
    modern = load_regions("modern", layout)
    assert {"emulate_ctxt", "cpuid_entries", "kvm_run_page"} <= {r.name for r in modern.regions}


def test_guest_runs_on_the_mapset_tables(kvm):
    """The KVM table, built in guest memory, plus an identity part for the guest: the guest
    faults exactly on the addresses kvm_mm does not map."""
    memory = 8 << 20
    with Machine("iso_touch", mode="long", memory=memory, kvm=kvm) as m:
        lay = modeled()
        kernel = ModeledKernelTable(lay, 1 << 30, gbpages=False, store=GuestStore(m.vm, 0x400000, 0x300000))
        kas = KvmAddressSpace(kernel)
        for spec in default_specs(lay):
            if spec.name not in ("buses", "vcpu_stack"):
                kas.add_region(spec)
        kas.table.map(0, 0, memory, page_size=SIZE_2M, flags=P | RW)  # the guest's own code, stack, tables
        sregs = m.vcpu.get_sregs()
        sregs.cr3 = kas.table.root
        m.vcpu.set_sregs(sregs)
        probes = []
        for name in ("bus:PIO", "vcpu_stack", "vcpu_struct", "pio_data", "memslots", "vm_struct", "percpu_area"):
            for s, e in lay.region(name).ranges:
                probes += [s, e - 1, (e + 4095) & ~4095]  # the last: the guard page after the object
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
    kas = KvmAddressSpace(ModeledKernelTable(layout, 1 << 30))
    vcpu = layout.region("vcpu_struct").start
    pmd = vcpu & ~(SIZE_2M - 1)
    kas.copy(vcpu, vcpu + 0x1000, "PTE", "vcpu_struct")
    before = kas.table.store.read(kas.table.root, 4096)
    with pytest.raises(MapSetError, match="would overwrite"):
        kas.copy(pmd, pmd + SIZE_2M, "PMD", "wider")
    assert kas.table.store.read(kas.table.root, 4096) == before


def test_user_regions_come_from_the_vcpu_tasks_mm(layout):
    """The kernel table holds current->mm's user half: the VMM's guest memory is there, and
    kvm_mm maps it only when a region asks for it."""
    kas = KvmAddressSpace.default(layout)
    gm = layout.region("guest_memory")
    assert kas.kernel.translate(gm.start).user and not kas.mapped(gm.start)
    kas.add_region(RegionSpec("guest_memory", "user-added", "PTE", "test"))
    assert kas.mapped(gm.start) and kas.mapped(gm.ranges[-1][1] - 1)


def test_physical_bytes_count_an_aliased_page_once(live):
    """Saved evidence of this host: the RFC's P4D copy of ESPFIX is 65,536 leaves onto one page
    per CPU; the distinct physical count takes each page once, the address-space count all of
    them. A 1 GiB direct-map leaf counts 1 GiB either way."""
    kas = KvmAddressSpace.default(live)
    (esp,) = live.region("espfix").ranges
    aliases = list(leaf_extents(kas.table, *esp))
    frames = {pa for _, pa, _ in aliases}
    assert len(aliases) == 65536 and len(frames) <= 2
    assert physical_bytes(kas.table, [esp]) == 4096 * len(frames)
    gib = next((va, n) for va, _, n in leaf_extents(kas.table) if n == 1 << 30)
    assert physical_bytes(kas.table, [(gib[0], gib[0] + gib[1])]) == 1 << 30
    everything = [(pa, n) for _, pa, n in leaf_extents(kas.table)]
    assert kas.physical_bytes() == physical_bytes(kas.table) < sum(n for _, n in everything) == kas.mapped_bytes()
    assert model_summary(kas)["kernel_physical_bytes"] is None  # this evidence predates the kernel half's count


def test_asi_2022_leaves_on_what_its_series_does_not_mark(live):
    """Saved evidence and exits of this host: under the 2022 RFC the CPL3 page faults leave the
    restricted space where the shadow MMU reads the root's struct page (no patch maps vmemmap),
    not on guest memory (patch 33 maps what KVM maps for the guest); the 2024 denylist leaves on
    guest memory and maps struct pages."""
    from kvmiso.isolation import check, load_access_model
    from kvmiso.observe.tracing.exitlog import read_jsonl

    fix = Path(__file__).parent / "fixtures" / "evidence"
    log, ev = read_jsonl(fix / "hello-cpl3.jsonl"), read_evidence(fix / "hello-cpl3.evidence.json")
    lay = build_layout(ev, cpus=2)
    old, new = address_space(lay, "asi-2022"), address_space(lay, "asi")
    sp = lay.region("struct_page").start
    assert old.sensitive(sp) and not old.mapped(sp) and new.mapped(sp)
    assert old.mapped(lay.region("mmu_root").start)  # mmu_shadow_page_cache: __GFP_LOCAL_NONSENSITIVE (patch 43)
    access = load_access_model()
    r_old, r_new = check(old, log, access), check(new, log, access)
    assert r_old.classes["fault"] == r_new.classes["fault"] == 0  # an unmapped access is asi_exit, by design
    assert r_old.classes["host_mm"] > 0 and all("(struct_page)" in why for why in r_old.reasons)
    assert all("(guest_memory:0)" in why for why in r_new.reasons)
    assert any(m.startswith("isolated space: percpu_area") for m in r_old.modeled)
