# Says it is ready, then never exits: a test that sees the announcement counted knows that the
# next KVM_RUN is the endless one.  modes: long protected
        .include "kvmiso.inc"
        .include "ready.inc"
        .text
        .globl main
main:   READY
1:      jmp 1b
