"""Each policy's isolated space as its patch series defines it, built over a fresh VM's real
objects and live page table (the running kernel's, read through BPF): the 2019 RFC's per-CPU
copy level and memslots, the 2022 ASI RFC's allowlist, and the mapped-size figure."""

import pytest

from kvmiso.guest import Machine
from kvmiso.isolation import address_space, model_summary, model_text
from kvmiso.isolation.kerneltable import leaf_extents
from kvmiso.isolation.layout import PAGE
from kvmiso.isolation.pagetable import SIZE_2M
from kvmiso.session import host_cpus, layout_of, machine_evidence


def _fresh(kvm, setup_vm=None):
    """The layout of a fresh VM that has run (its MMU root, kvm_run page and thread exist)."""
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
    assert 0 < s["isolated_physical_bytes"] - without["isolated_physical_bytes"] <= PAGE * len(frames)
    assert s["isolated_physical_bytes"] < s["isolated_mapped_bytes"]
    assert 0 < s["isolated_physical_bytes"] <= s["kernel_physical_bytes"] <= s["kernel_mapped_bytes"]
    assert s["share_of_kernel_physical"] == s["isolated_physical_bytes"] / s["kernel_physical_bytes"]
    assert "of distinct physical memory of the" in model_text(kas)
