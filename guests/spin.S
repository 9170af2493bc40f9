# A guest that never exits: the host's timeout must stop it.  modes: long protected real
        .include "kvmiso.inc"
        .text
        .globl main
main:
1:      jmp 1b
