# A hypercall (VMCALL; KVM rewrites it to VMMCALL on AMD) with an unknown number: KVM answers
# -KVM_ENOSYS (-1000) in rax and the guest reports it. On kvm_pvm a CPL0 hypercall is
# re-emulated inside one KVM_RUN forever: there the host's timeout has to stop it.
# modes: long protected
        .include "kvmiso.inc"
        .text
        .globl main
main:
        mov $0x7fff, %eax
        vmcall
        mov %eax, %ebx
        REPORT 1, %ebx
        ret
