# 32-bit protected mode entry: flat segments, no paging (the host loads GDT and IDT).
        .include "kvmiso.inc"
        .section .text.entry, "ax"
        .globl _start, exception_stubs
_start:
        call main
        DONE
1:      hlt
        jmp 1b

        EXCEPTION_STUBS

exception_common:
        pop %edi                # vector
        pop %esi                # error code
        mov (%esp), %edx        # faulting eip
        mov %cr2, %ecx
        UCALL UCALL_EXCEPTION
1:      hlt
        jmp 1b
