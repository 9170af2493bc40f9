# Three exceptions the guest takes and survives: #UD (ud2), #DE (a division by zero) and #GP (a
# load from a non-canonical address). crt0's exception_hook resumes each one after its faulting
# instruction; the handler reports every vector (REPORT 1 = vector, REPORT 2 = error code) and
# main ends with REPORT 3 = exceptions taken, then DONE. At CPL3 each exception enters the CPL0
# handler on the TSS's RSP0 stack and iretq returns to CPL3.
# modes: long
        .include "kvmiso.inc"
        .set NONCANONICAL, 0x8000000000000000
        .text
        .globl main, ud_site, de_site, gp_site
main:
        lea handler(%rip), %rax
        mov %rax, exception_hook(%rip)  # the handler runs at CPL0: .data is writable at CPL3 too
        xor %r14d, %r14d                # exceptions taken (the handler counts them)
        lea 1f(%rip), %r15              # where the handler resumes the guest
ud_site:
        ud2                             # #UD
1:      lea 2f(%rip), %r15
        xor %ecx, %ecx
        mov $1, %eax
        xor %edx, %edx
de_site:
        div %ecx                        # #DE
2:      lea 3f(%rip), %r15
        mov $NONCANONICAL, %rbx
gp_site:
        mov (%rbx), %rax                # #GP(0): bit 63 set, bits 62:47 clear
3:      REPORT 3, %r14d
        ret

# crt0's exception_hook: rdi = vector, rsi = error code, rdx = &saved RIP. It may clobber rax,
# rcx, rdx, rsi, rdi (crt0 restores them); r15 is the resume address main set before the fault.
handler:
        inc %r14
        mov %r15, (%rdx)                # resume after the faulting instruction
        mov %rsi, %rdx                  # the error code (REPORT uses rsi)
        mov %edi, %ecx
        REPORT 1, %ecx
        REPORT 2, %edx
        ret
