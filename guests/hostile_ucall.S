# A guest that makes a call the convention does not define (number 0x42 on the ucall port):
# the host must end the run as a malformed ucall that names the number, not guess.
# modes: long protected real
        .include "kvmiso.inc"
        .text
        .globl main
main:
        REPORT 1, $7                    # a well-formed call first: the host keeps its value
        UCALL 0x42
        FAIL 1                          # never reached: the host stops at the bad call
