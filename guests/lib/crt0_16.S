# Real mode entry: the host sets CS=DS=ES=SS=0 and SP; call main, then report DONE.
        .include "kvmiso.inc"
        .section .text.entry, "ax"
        .globl _start
_start:
        call main
        DONE
1:      hlt
        jmp 1b
