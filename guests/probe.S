# Sixteen plain instructions, then DONE: `kvmiso probe` reads the vCPU's insn_emulation stat
# around it to tell whether guest code at this CPL runs natively or under KVM's emulator.
# modes: long protected real
        .include "kvmiso.inc"
        .text
        .globl main
main:
        .rept 16
        nop
        .endr
        ret
