# A guest that wipes its own page tables: it zeroes the PML4 the host built and reloads CR3.
# The next instruction fetch cannot be translated, nor can the #PF be delivered (the IDT, the
# stack and the handlers are unmapped too): #PF -> #DF -> triple fault, KVM_EXIT_SHUTDOWN.
# modes: long
        .include "kvmiso.inc"
        .set PML4, 0x12000              # modes.py's PML4 (guests/lib/kvmiso.inc: host tables)
        .text
        .globl main
main:
        mov $PML4, %edi
        xor %eax, %eax
        mov $512, %ecx
        cld
        rep stosq                       # every PML4 entry: not present
        mov %cr3, %rax
        mov %rax, %cr3                  # flush the TLB: the wipe takes effect now
        FAIL 1                          # never reached: this fetch is not mapped any more
