# MMIO: a 4-byte write and a 4-byte read at guest-physical MMIO_BASE, which no slot backs.
# modes: long protected
        .include "kvmiso.inc"
        .text
        .globl main
main:
        mov $MMIO_BASE, %ebx    # zero-extended to rbx in long mode
        movl $0x12345678, (%ebx)
        mov 8(%ebx), %ecx       # the host answers this read
        REPORT 1, %ecx
        ret
