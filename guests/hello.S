# Console hello, in every mode.  modes: long protected real
        .include "kvmiso.inc"
        .text
        .globl main
main:
        PUTS msg, (msg_end-msg)
        ret
msg:    .ascii "Hello from a kvmiso guest!\n"
msg_end:
