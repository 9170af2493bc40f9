# Benchmark: port IN answered by the host. Every iteration is one KVM_RUN round trip; the
# answer lands in %al, where the host can read it back with KVM_GET_REGS.
# 2 instructions per iteration (CPL0 or CPL3).
# modes: long
        .include "kvmiso.inc"
        .text
        .globl main
main:
        xor %eax, %eax
1:      in $PORT_BENCH, %al
        jmp 1b
