# CPUID leaf 0 (max leaf, vendor) as tags 0-3 and leaf 1 (signature) as tag 4.
# modes: long protected
        .include "kvmiso.inc"
        .text
        .globl main
main:
        xor %eax, %eax
        xor %ecx, %ecx
        cpuid
        mov %eax, result        # REPORT clobbers eax/esi/edi: keep the leaf in memory
        mov %ebx, result+4
        mov %ecx, result+8
        mov %edx, result+12
        REPORT 0, result
        REPORT 1, result+4
        REPORT 2, result+8
        REPORT 3, result+12
        mov $1, %eax
        xor %ecx, %ecx
        cpuid
        REPORT 4, %eax
        ret
        .data
result: .long 0, 0, 0, 0
