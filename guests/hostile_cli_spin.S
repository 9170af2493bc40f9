# A guest that disables interrupts and spins: no exit ever reaches the host, and no interrupt
# could stop it either. Only the host's timeout (a signal that ends KVM_RUN) gets it back.
# modes: long protected real
        .include "kvmiso.inc"
        .text
        .globl main
main:
        cli
1:      jmp 1b
