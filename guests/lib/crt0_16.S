# Real mode entry: the host sets CS=DS=ES=SS=0 and SP and points the IVT's first 32 vectors at
# exception_stubs (segment 0); call main, then report DONE.
        .include "kvmiso.inc"
        .section .text.entry, "ax"
        .globl _start, exception_stubs
_start:
        call main
        DONE
1:      hlt
        jmp 1b

        EXCEPTION_STUBS

# The stack holds vector, error code (0), then what the CPU pushed: IP, CS, FLAGS. Real mode has
# no CR2, so the host gets the faulting cs in rcx instead. Everything is 16 bits wide here and
# the ucall reads 32, so each argument is zero-extended.
exception_common:
        pop %di
        movzwl %di, %edi        # vector
        pop %si
        movzwl %si, %esi        # error code
        pop %dx
        movzwl %dx, %edx        # faulting ip
        pop %cx
        movzwl %cx, %ecx        # its cs
        UCALL UCALL_EXCEPTION
1:      hlt
        jmp 1b
