# Benchmark: the KVM_HC_VAPIC_POLL_IRQ hypercall (a no-op KVM answers in the kernel); timed by
# the guest. VMCALL; on AMD KVM rewrites it to VMMCALL on first use. 4 instructions per
# iteration (mov, vmcall, dec, jnz); CPL0 only (KVM refuses hypercalls from CPL3).
# modes: long
        .include "kvmiso.inc"
        .set KVM_HC_VAPIC_POLL_IRQ, 1
        .macro BENCH_BATCH
        .endm
        .macro BENCH_BODY
        mov $KVM_HC_VAPIC_POLL_IRQ, %eax
        vmcall
        .endm
        .include "bench_batch.inc"
