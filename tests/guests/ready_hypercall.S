# Says it is ready, then makes a hypercall with an unknown number (on kvm_pvm a CPL0 hypercall
# is re-emulated inside one KVM_RUN forever).  modes: long protected
        .include "kvmiso.inc"
        .include "ready.inc"
        .text
        .globl main
main:   READY
        mov $0x7fff, %eax
        vmcall
        mov %eax, %ebx
        REPORT 1, %ebx
        ret
