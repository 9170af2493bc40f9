# Benchmark: a 4-byte MMIO write to MMIO_BASE (no memory slot there): one KVM_EXIT_MMIO per
# iteration. 2 instructions per iteration (CPL0 or CPL3).
# modes: long
        .include "kvmiso.inc"
        .text
        .globl main
main:
        mov $MMIO_BASE, %ebx
1:      movl %eax, (%rbx)
        jmp 1b
