# HLT: the vCPU stops with KVM_EXIT_HLT (no irqchip); running it again continues after it.
# modes: long protected real
        .include "kvmiso.inc"
        .text
        .globl main
main:
        hlt
        REPORT 1, $1            # reached only when the host runs the vCPU again
        ret
