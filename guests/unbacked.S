# A read from guest-physical memory that no slot backs (1 GiB, above the 2 MiB of RAM): KVM
# turns it into an MMIO exit; with nothing there the host answers all-ones.
# modes: long protected
        .include "kvmiso.inc"
        .set UNBACKED, 0x40000000
        .text
        .globl main
main:
        mov $UNBACKED, %ebx
        mov (%ebx), %ecx
        REPORT 1, %ecx
        ret
