# Touch a host-written list of addresses on host-built page tables; every #PF is reported and
# skipped. Input at SCRATCH: a u64 count, then that many u64 addresses. For each fault the
# guest sends REPORT 1 = CR2 and REPORT 2 = the faulting RIP; at the end REPORT 3 = faults.
# modes: long
        .include "kvmiso.inc"
        .text
        .globl main, touch, touch_end
main:
        lea pf_handler(%rip), %rax
        mov %rax, exception_hook(%rip)
        mov $SCRATCH, %r12d
        mov (%r12), %r13        # addresses left
        xor %r14d, %r14d        # faults taken (the handler counts them)
1:      test %r13, %r13
        jz 2f
        add $8, %r12
        mov (%r12), %rbx
touch:  mov (%rbx), %al         # the access under test: a #PF resumes at touch_end
touch_end:
        dec %r13
        jmp 1b
2:      REPORT 3, %r14d
        ret

# crt0's exception_hook: rdi = vector, rsi = error code, rdx = &saved RIP. It may clobber
# rax, rcx, rdx, rsi, rdi (crt0 restores them); r14 is the main loop's fault count.
pf_handler:
        cmp $14, %rdi
        jne 3f
        inc %r14
        mov %cr2, %rax
        REPORT64 1, %rax
        mov (%rdx), %rax
        REPORT64 2, %rax
        addq $(touch_end - touch), (%rdx)
        ret
3:      UCALL UCALL_FAIL        # any other exception: FAIL with the vector as the code
4:      hlt
        jmp 4b
