"""Each policy's isolated space as its patch series defines it, built over a fresh VM's real
objects and live page table (the running kernel's, read through BPF, on /dev/kvm): the 2019
RFC's per-CPU copy level (patch 19) and memslots (patch 26), the 2022 ASI RFC's allowlist, and
the mapped-size figure in distinct physical bytes."""

import os

import pytest

from kvmiso.guest import Machine
from kvmiso.isolation import address_space, model_summary, model_text
from kvmiso.isolation.kerneltable import leaf_extents
from kvmiso.isolation.layout import PAGE
from kvmiso.isolation.pagetable import SIZE_2M
from kvmiso.session import host_cpus, layout_of, machine_evidence


def _fresh(kvm, setup_vm=None):
    """The layout of a fresh VM that has run (its MMU root, kvm_run page and thread exist),
    read from the running kernel: as root that must work; without root it cannot (BPF)."""
    if os.geteuid() != 0:
        pytest.skip("reading a VM's objects and page table through BPF needs root")
    with Machine("hello", mode="long", kvm=kvm, setup_vm=setup_vm) as m:
        m.run(timeout=5)
        ev = machine_evidence(m)
        if not ev.real:
            pytest.fail(f"no real objects on this host: {ev.source}")
        return layout_of(ev, m)


def test_rfc_copies_the_per_cpu_first_chunk_at_pmd_level(kvm):
    """RFC patch 19: kvm_copy_mapping(pcpu_base_addr, pcpu_unit_size * pcpu_nr_units,
    PGT_LEVEL_PMD): one copy of every unit, widened to whole 2 MiB PMD entries."""
    lay = _fresh(kvm)
    kas = address_space(lay, "rfc-v1")
    units = lay.region("percpu_area").ranges
    (c,) = [c for c in kas.copies if c.region == "percpu_area"]
    lo, hi = min(s for s, _ in units), max(e for _, e in units)
    assert (c.level, c.start, c.end) == ("PMD", lo & ~(SIZE_2M - 1), (hi + SIZE_2M - 1) & ~(SIZE_2M - 1))
    for va in range(c.start, c.end, SIZE_2M):  # each 2 MiB the kernel maps there, whole
        if kas.kernel.translate(va) is not None:
            assert kas.mapped(va) and kas.mapped(va + SIZE_2M - 1), hex(va)


def test_rfc_maps_every_memslot_of_the_vm(kvm):
    """RFC patch 26 copies struct kvm_memslots, which held every kvm_memory_slot inline in 2019;
    on 6.x each slot is its own object: the RFC's set maps each one (here two slots), not only
    the set inside struct kvm, and still none of the rmap arrays the RFC never mapped."""
    lay = _fresh(kvm, setup_vm=lambda vm: vm.add_memory(0x4000_0000, 0x20_0000))
    kas = address_space(lay, "rfc-v1")
    slots = lay.matching("memslot:*")
    assert len(slots) == 2
    copied = [(c.start, c.end) for c in kas.copies if c.region == "memslot"]
    for r in slots:
        (s, e), = r.ranges
        assert any(cs <= s and e <= ce for cs, ce in copied), r.name  # named by the set, not by chance
        assert kas.mapped(s) and kas.mapped(e - 1)
    assert any(c.region == "memslots" for c in kas.copies)  # the active set, inside struct kvm
    assert not any(c.region.startswith("rmap") for c in kas.copies)


def test_the_mapped_size_figure_counts_each_physical_page_once(kvm):
    """ESPFIX's P4D copy maps each CPU's page 65,536 times: the address-space count takes every
    alias, the figure (distinct physical bytes) takes the page once; and the kernel half's own
    count, the denominator, is of distinct physical bytes too."""
    lay = _fresh(kvm)
    kas = address_space(lay, "rfc-v1")
    s = model_summary(kas)
    (esp,) = lay.region("espfix").ranges
    aliases = list(leaf_extents(kas.table, *esp))
    frames = {pa for _, pa, _ in aliases}
    assert len(aliases) >= 65536 and 1 <= len(frames) <= host_cpus()
    without = model_summary(address_space(lay, "rfc-v1", drop=("espfix",)))
    assert s["isolated_mapped_bytes"] - without["isolated_mapped_bytes"] == sum(n for *_, n in aliases)
    # ESPFIX's pages count at most once, and not at all where another copy maps them already
    assert 0 <= s["isolated_physical_bytes"] - without["isolated_physical_bytes"] <= PAGE * len(frames)
    assert s["isolated_physical_bytes"] < s["isolated_mapped_bytes"]
    assert 0 < s["isolated_physical_bytes"] <= s["kernel_physical_bytes"] <= s["kernel_mapped_bytes"]
    assert s["share_of_kernel_physical"] == s["isolated_physical_bytes"] / s["kernel_physical_bytes"]
    assert "of distinct physical memory of the" in model_text(kas)


# Objects every VM of every vendor has, and (second) ones it has where its MMU allocated them
# (rmap and lpage_info with the shadow MMU, the root's struct page where kvmiso found the root).
SENSITIVE_HERE = ("pgd", "files_struct", "vcpu_file", "anon_inode", "guest_fpstate"), ("rmap:0", "struct_page")
MARKED_HERE = ("vcpu_struct", "vm_struct", "kvm_run_page", "pio_data", "emulate_ctxt", "cpuid_entries", "mmu_root",
               "memslots", "memslot:0", "memslot:1", "vcpu_task", "vcpu_stack", "active_mm", "srcu_sda",
               "irq_stack"), ("lpage_info:0",)


def test_asi_2022_is_an_allowlist_of_what_its_series_marks(kvm):
    """The 2022 RFC treats all memory as sensitive unless marked (cover letter): each object of a
    fresh VM is mapped exactly when a patch of the series marks its allocation, page by page
    (asi_map splits huge pages, patch 07), so no huge leaf brings a neighbour along."""
    lay = _fresh(kvm, setup_vm=lambda vm: vm.add_memory(0x4000_0000, 0x20_0000))
    space = address_space(lay, "asi-2022")
    for name in MARKED_HERE[0] + tuple(n for n in MARKED_HERE[1] if n in lay.regions):
        r = lay.region(name)
        assert space.mapped(r.start), name
        assert any(c.startswith("2022 ASI RFC patch") for c in (s.cite for s in space.regions if s.name == name)), name
    for name in SENSITIVE_HERE[0] + tuple(n for n in SENSITIVE_HERE[1] if n in lay.regions):
        r = lay.region(name)
        assert space.kernel.translate(r.start) is not None and space.sensitive(r.start) and not space.mapped(r.start), name
    for r in lay.matching("bus:*"):  # kvm_create_vm's empty buses: kvm_io_bus_register_dev's are the marked ones
        assert "+ 0 ranges" in r.description and not space.mapped(r.start), r.name
    rfc, beside = address_space(lay, "rfc-v1"), 0
    for name in ("vcpu_struct", "vm_struct", "pio_data"):  # the pages a huge leaf holds beside them
        start = lay.region(name).start
        leaf = space.kernel.walk(start)[-1]
        span = {1: PAGE, 2: SIZE_2M, 3: 1 << 30}[leaf.level]
        for va in (start & ~(span - 1), (start | (span - 1)) & ~(PAGE - 1)):
            if span > PAGE and space.sensitive(va):  # the RFC copies the leaf whole; 2022 maps the object's pages
                assert space.kernel.translate(va) is not None and not space.mapped(va) and rfc.mapped(va), (name, hex(va))
                beside += 1
    assert beside  # the direct map is 2 MiB and 1 GiB leaves but for a few MiB: some object sits in one
    s = model_summary(space)
    assert s["mapping"] == "allowlist" and {"kernel_data", "percpu_area"} <= {r["name"] for r in s["regions"] if r["modeled"]}
    # pages, not leaves: less than the RFC, which copies each object's leaf whole, on the same
    # layout (a share of RAM would be a property of the host: 0.19% here, 2.8% in the lane's 2 GiB)
    copied = model_summary(rfc)["isolated_physical_bytes"]
    assert s["isolated_physical_bytes"] < copied, (s["isolated_physical_bytes"], copied)
