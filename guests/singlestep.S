# Single step: main is six instructions; with KVM_GUESTDBG_SINGLESTEP every instruction from
# _start to the DONE call gives one KVM_EXIT_DEBUG.
# modes: long protected real
        .include "kvmiso.inc"
        .text
        .globl main
main:
        nop
        inc %eax
        dec %eax
        xchg %eax, %ebx
        xchg %eax, %ebx
        ret
