# A guest that jumps where nothing is: in long mode to a canonical address beyond the 4 GiB
# identity map (no translation: #PF on the fetch, reported with CR2); in protected mode, without
# paging, to guest-physical memory that no slot backs (KVM cannot fetch code from MMIO).
# modes: long protected
        .include "kvmiso.inc"
        .text
        .globl main
main:
.if BITS == 64
        mov $0x00007fff00000000, %rax   # not mapped by the guest's page tables
        jmp *%rax
.else
        mov $0x40000000, %eax           # 1 GiB: above the 2 MiB of RAM, no memory slot
        jmp *%eax
.endif
        FAIL 1                          # never reached
