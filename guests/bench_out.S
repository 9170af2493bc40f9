# Benchmark: port OUT to userspace. Every iteration is one KVM_RUN round trip (KVM_EXIT_IO).
# 2 instructions per iteration (CPL0 or CPL3; CPL3 may use the port through the TSS I/O bitmap).
# modes: long
        .include "kvmiso.inc"
        .text
        .globl main
main:
1:      out %al, $PORT_BENCH
        jmp 1b
