# A division by zero at `fault`: crt0 reports #DE there, in every mode.  modes: real protected long
        .include "kvmiso.inc"
        .text
        .globl main, fault
main:
        xor %ecx, %ecx
        mov $1, %eax
        xor %edx, %edx
fault:  div %ecx
        ret
