# Benchmark: HLT with no in-kernel irqchip: one KVM_EXIT_HLT per iteration; running the vCPU
# again continues after the HLT. 2 instructions per iteration; CPL0 only (HLT is privileged).
# modes: long
        .include "kvmiso.inc"
        .text
        .globl main
main:
1:      hlt
        jmp 1b
