# 32-bit protected mode entry: flat segments, no paging (the host loads GDT and IDT).
        .include "kvmiso.inc"
        .section .text.entry, "ax"
        .globl _start, exception_stubs
_start:
        call main
        DONE
1:      hlt
        jmp 1b

# One 16-byte stub per vector 0-31; the host points IDT gates here. Each pushes a zero error
# code where the CPU pushes none, then the vector.
        .balign 16
exception_stubs:
        .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 16
        .if (\vec == 8) || (\vec == 10) || (\vec == 11) || (\vec == 12) || (\vec == 13) || (\vec == 14) || (\vec == 17) || (\vec == 21) || (\vec == 29) || (\vec == 30)
        .else
        push $0
        .endif
        push $\vec
        jmp exception_common
        .endr

exception_common:
        pop %edi                # vector
        pop %esi                # error code
        mov (%esp), %edx        # faulting eip
        mov %cr2, %ecx
        UCALL UCALL_EXCEPTION
1:      hlt
        jmp 1b
