# An undefined opcode at `fault`: crt0 reports #UD there, in every mode.  modes: real protected long
        .include "kvmiso.inc"
        .text
        .globl main, fault
main:
fault:  ud2
        ret
