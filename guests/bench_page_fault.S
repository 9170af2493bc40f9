# Benchmark: the first touch of a guest page the host dropped. Each batch writes one byte to each
# 4 KiB page from FAULT_BASE on; the host drops those pages (MADV_DONTNEED) before every KVM_RUN,
# so every touch faults: a KVM page fault where the guest runs natively, the host mm's fault in
# KVM's emulated write where it does not (kvm_pvm CPL0; scripts/page_fault_stats.py shows which).
# 4 instructions per iteration (mov, add, dec, jnz); CPL0 or CPL3.
# modes: long
        .include "kvmiso.inc"
        .set FAULT_BASE, 0x400000
        .macro BENCH_BATCH
        mov $FAULT_BASE, %ebx      # the same pages every batch: the host dropped them
        .endm
        .macro BENCH_BODY
        movb %al, (%rbx)
        add $4096, %rbx
        .endm
        .include "bench_batch.inc"
