# The probe's CPUID interception test: CPUID leaf 0x40000000 (the hypervisor leaf), its ebx,
# ecx and edx as tags 0-2. The host puts a marker there in the CPUID it sets: the marker back
# means KVM answered the CPUID; anything else is the host CPU's own answer (not intercepted).
# modes: long
        .include "kvmiso.inc"
        .text
        .globl main
main:
        mov $0x40000000, %eax
        xor %ecx, %ecx
        cpuid
        mov %ebx, result        # REPORT clobbers eax/esi/edi: keep the answer in memory
        mov %ecx, result+4
        mov %edx, result+8
        REPORT 0, result
        REPORT 1, result+4
        REPORT 2, result+8
        ret
        .data
result: .long 0, 0, 0
