# Benchmark: CPUID leaf 0, handled inside KVM (no exit to userspace); timed by the guest.
# 4 instructions per iteration (xor, cpuid, dec, jnz); CPL0 or CPL3.
# modes: long
        .include "kvmiso.inc"
        .macro BENCH_BATCH
        .endm
        .macro BENCH_BODY
        xor %eax, %eax
        cpuid
        .endm
        .include "bench_batch.inc"
