# Benchmark: a 4-byte MMIO read from MMIO_BASE, answered by the host: one KVM_EXIT_MMIO per
# iteration; the answer lands in %eax. 2 instructions per iteration (CPL0 or CPL3).
# modes: long
        .include "kvmiso.inc"
        .text
        .globl main
main:
        mov $MMIO_BASE, %ebx
        xor %eax, %eax
1:      movl (%rbx), %eax
        jmp 1b
