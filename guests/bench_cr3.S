# Switch-cost estimate: MOV to CR3 with the current value (a full non-global TLB flush, as an
# address-space switch without PCID), timed by the guest. Meaningful only where CPL0 runs
# natively (VMX/SVM with EPT/NPT, where the write does not exit). 3 instructions per
# iteration (mov, dec, jnz); CPL0 only.
# modes: long
        .include "kvmiso.inc"
        .macro BENCH_BATCH
        mov %cr3, %rsi
        .endm
        .macro BENCH_BODY
        mov %rsi, %cr3
        .endm
        .include "bench_batch.inc"
