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
    assert hists, "KVM exports histogram vCPU stats (halt_poll_success_hist and the like)"
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


def test_delta_of_raw_blocks_is_the_nonzero_snapshot_difference(kvm):
    """Stats.delta (what Machine.run and capture pay per run) against the decoded path, on this
    kernel's own descriptors: a real run's two blocks, then arbitrary ones (levels, histograms,
    counters that moved or did not, padding words)."""
    import struct

    from hypothesis import given, settings
    from hypothesis import strategies as st_

    with Machine("mmio", mode="long", kvm=kvm) as m, m.vcpu.stats() as st:
        raw0 = st.read_raw()
        m.run(timeout=10)
        raw1 = st.read_raw()
    assert st.delta(raw0, raw1) == (st.decode(raw1) - st.decode(raw0)).nonzero()
    assert st.delta(raw0, raw1)["mmio_exits"] == 2
    words = len(raw0) // 8
    real0, real1 = struct.unpack(f"<{words}Q", raw0), struct.unpack(f"<{words}Q", raw1)
    level_words = [d.offset // 8 for d in st.descriptors if d.type in ("instant", "peak")]
    assert level_words

    @settings(max_examples=300, deadline=None)
    @given(st_.lists(st_.tuples(st_.integers(0, words - 1), st_.integers(0, 2**20)), max_size=40),
           st_.integers(0, 3))
    def check(moves, level):
        before, after = list(real0), list(real1)
        for w in level_words:  # a level that did not move is reported when it is not zero
            before[w] = after[w] = level
        for w, add in moves:  # counters only grow, as KVM's do
            before[w] = min(before[w], after[w])
            after[w] = before[w] + add
        b, a = struct.pack(f"<{words}Q", *before), struct.pack(f"<{words}Q", *after)
        assert st.delta(b, a) == (st.decode(a) - st.decode(b)).nonzero()

    check()
