#!/usr/bin/env python3
"""What one iteration of the bench's page_fault row makes KVM do, from the vCPU's own stats:
KVM page faults taken and fixed, exits and emulated instructions per touched page, at each CPL,
with the host dropping the pages before every batch (as `kvmiso bench` does) and without.

    python3 scripts/page_fault_stats.py [--iterations 64] [--batches 50]
"""

from __future__ import annotations

import argparse
import struct
import sys

from kvmiso.bench import runloop
from kvmiso.bench.latency import BENCH_MEMORY, PAGE_SIZE
from kvmiso.guest import Machine, build

SHOWN = ("pf_taken", "pf_fixed", "pf_spurious", "exits", "insn_emulation", "tlb_flush")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iterations", type=int, default=64, help="pages touched per batch (one KVM_RUN)")
    ap.add_argument("--batches", type=int, default=50)
    args = ap.parse_args()
    image = build("bench_page_fault", "long")
    sym = image.symbols
    touches = args.iterations * args.batches
    for cpl in (0, 3):
        with Machine(image, cpl=cpl, memory=BENCH_MEMORY) as m, m.vcpu.stats() as st:
            m.vm.write(sym["iterations"], struct.pack("<Q", args.iterations))
            zap = (m.vm.host_address(sym["FAULT_BASE"]), args.iterations * PAGE_SIZE)
            runloop.compiled_loop(m.vcpu, 5, "io", sym["PORT_BENCH"], zap=zap)  # warm-up
            for dropped in (True, False):
                before = st.read_raw()
                runloop.compiled_loop(m.vcpu, args.batches, "io", sym["PORT_BENCH"], zap=zap if dropped else None)
                delta = st.delta(before, st.read_raw())
                per = "  ".join(f"{k} {delta.get(k, 0) / touches:.3f}" for k in SHOWN)
                print(f"CPL{cpl} {'pages dropped' if dropped else 'pages kept   '}: per touch  {per}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
