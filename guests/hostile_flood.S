# A guest that floods the console port with output and never stops: the host must keep only
# MAX_CONSOLE bytes (counting the rest) and a bounded number of recorded exits, and the run must
# still end cleanly at the timeout.
# modes: long protected real
        .include "kvmiso.inc"
        .text
        .globl main
main:
1:      PUTS text, (text_end-text)
        jmp 1b
text:   .rept 64
        .ascii "flood flood flood flood flood flood flood flood flood flood flood!\n"
        .endr
text_end:
