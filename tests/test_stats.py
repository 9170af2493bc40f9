"""KVM binary stats (KVM_GET_STATS_FD) on the real device: descriptors, snapshots, deltas that
count what a guest did, histograms, and the raw read that capture takes at every exit."""

from __future__ import annotations

import os

from kvmiso.guest import Machine, Outcome
from kvmiso.kvm.stats import Snapshot


def test_vcpu_descriptors_and_id(kvm):
    with Machine("hlt", mode="long", kvm=kvm) as m, m.vcpu.stats() as st:
        assert st.id == f"kvm-{os.getpid()}/vcpu-0"
        names = [d.name for d in st.descriptors]
        assert len(names) == len(set(names))
        for name in ("exits", "insn_emulation", "halt_exits", "mmio_exits"):
            assert name in st
        exits = st.desc("exits")
        assert (exits.type, exits.unit, exits.size) == ("cumulative", "none", 1)
        assert all(d.offset % 8 == 0 and d.size >= 1 for d in st.descriptors)


def test_deltas_count_what_the_guest_did(kvm):
    with Machine("hlt", mode="long", kvm=kvm) as m, m.vcpu.stats() as st:
        before = st.snapshot()
        r = m.run(timeout=10)
        delta = st.snapshot() - before
    assert r.outcome is Outcome.HALT
    assert delta["halt_exits"] == 1 and delta["exits"] >= 1 and delta["mmio_exits"] == 0
    assert delta.nonzero()["halt_exits"] == 1 and "mmio_exits" not in delta.nonzero()


def test_raw_reads_decode_to_the_same_snapshot(kvm):
    with Machine("mmio", mode="long", kvm=kvm) as m, m.vcpu.stats() as st:
        raw0 = st.read_raw()
        m.run(timeout=10)
        raw1 = st.read_raw()
        snap = st.snapshot()
        assert st.decode(raw1) == snap
        assert (st.decode(raw1) - st.decode(raw0))["mmio_exits"] == 2  # one write, one read


def test_histograms_are_tuples_and_subtract_per_bucket(kvm):
    with Machine("hlt", mode="long", kvm=kvm) as m, m.vcpu.stats() as st:
        hists = [d for d in st.descriptors if d.is_histogram]
        snap = st.snapshot()
    for d in hists:
        assert isinstance(snap[d.name], tuple) and len(snap[d.name]) == d.size
    a = Snapshot(h=(5, 7, 9), n=10)
    b = Snapshot(h=(1, 7, 2), n=4)
    assert a - b == {"h": (4, 0, 7), "n": 6}
    assert (a - b).nonzero() == {"h": (4, 0, 7), "n": 6} and (b - b).nonzero() == {}


def test_vm_stats(kvm):
    with Machine("hello", mode="long", kvm=kvm) as m, m.vm.stats() as st:
        assert st.id == f"kvm-{os.getpid()}"
        assert st.desc("remote_tlb_flush").type == "cumulative" and st.desc("pages_4k").type == "instant"
        before = st.snapshot()
        assert m.run(timeout=10).ok
        delta = st.snapshot() - before
    assert set(delta) == {d.name for d in st.descriptors}
    # running mapped guest memory: shadow pages on kvm_pvm, TDP pages (pages_4k/2m) on Intel/AMD
    assert any(delta[n] for n in ("mmu_cache_miss", "pages_4k", "pages_2m", "pages_1g"))


def test_delta_keeps_levels_and_subtracts_counters(kvm):
    from kvmiso.guest import Machine

    with Machine("portio", kvm=kvm) as m, m.vcpu.stats() as st:
        levels = {d.name for d in st.descriptors if d.type in ("instant", "peak")}
        before = st.snapshot()
        m.run(timeout=5)
        after = st.snapshot()
    delta = after - before
    assert delta["exits"] == after["exits"] - before["exits"] > 0
    assert levels, "KVM exports at least one instant/peak vCPU stat (e.g. guest_mode)"
    assert all(delta[k] == after[k] for k in levels)
