# Benchmark: the first touch of a guest page KVM has not mapped yet (a KVM page fault, handled
# inside KVM with the host's mm). Each batch writes one byte to each 4 KiB page from FAULT_BASE
# on; the host drops those pages (MADV_DONTNEED) before every KVM_RUN, so every touch faults.
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
