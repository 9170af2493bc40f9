# Benchmark: RDMSR of IA32_SYSENTER_CS, handled inside KVM; timed by the guest.
# 3 instructions per iteration (rdmsr, dec, jnz); CPL0 only (RDMSR is privileged).
# modes: long
        .include "kvmiso.inc"
        .set MSR_SYSENTER_CS, 0x174
        .macro BENCH_BATCH
        mov $MSR_SYSENTER_CS, %ecx
        .endm
        .macro BENCH_BODY
        rdmsr
        .endm
        .include "bench_batch.inc"
