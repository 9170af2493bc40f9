# A triple fault: with an empty IDT, #UD cannot be delivered (-> #DF -> shutdown). Not in real
# mode: kvm_pvm's emulator delivers real-mode exceptions through the IVT whatever the IDT limit.
# modes: long protected
        .include "kvmiso.inc"
        .text
        .globl main
main:
        lidt empty_idt
        ud2
        FAIL 1                  # never reached
        .data
empty_idt:
        .word 0                 # limit 0
        .long 0, 0              # base
