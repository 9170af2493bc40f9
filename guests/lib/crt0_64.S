# 64-bit long mode entry, at CPL0 or CPL3 (the host sets segments, paging and the TSS).
        .include "kvmiso.inc"
        .section .text.entry, "ax"
        .globl _start, exception_stubs, exception_hook
_start:
        call main
        DONE
1:      hlt
        jmp 1b

        EXCEPTION_STUBS

# A payload may set exception_hook to its own handler: it is called with rdi=vector,
# rsi=error code, rdx=pointer to the saved RIP (which it may advance); when it returns the
# fault is resumed with iretq. Otherwise the exception is reported to the host and the guest stops.
exception_common:
        push %rax
        push %rcx
        push %rdx
        push %rsi
        push %rdi
        mov 40(%rsp), %rdi      # vector
        mov 48(%rsp), %rsi      # error code
        lea 56(%rsp), %rdx      # &saved rip
        mov exception_hook(%rip), %rax
        test %rax, %rax
        jz 2f
        call *%rax
        pop %rdi
        pop %rsi
        pop %rdx
        pop %rcx
        pop %rax
        add $16, %rsp           # vector and error code
        iretq
2:      mov (%rdx), %rdx        # faulting rip
        mov %cr2, %rcx
        UCALL UCALL_EXCEPTION
1:      hlt
        jmp 1b

        .data
        .balign 8
exception_hook:
        .quad 0
