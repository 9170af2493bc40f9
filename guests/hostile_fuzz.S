# The fuzzer's carrier: main jumps to fuzz_code, FUZZ_SIZE bytes that kvmiso.guest.fuzz fills
# with random bytes or random instructions before each run (as built, they report DONE).
# modes: long protected real
        .include "kvmiso.inc"
        .set FUZZ_SIZE, 4096
        .text
        .globl main, fuzz_code, fuzz_end
main:
        jmp fuzz_code

        .balign 16
fuzz_code:
        DONE
        .org fuzz_code + FUZZ_SIZE, 0xf4
fuzz_end:
