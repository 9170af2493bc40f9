# The fuzzer's carrier: main jumps to fuzz_code, FUZZ_SIZE bytes that kvmiso.guest.fuzz fills
# with random bytes or random instructions before each run (as built, they report DONE).
# In real mode there is no crt0 exception handler, so this payload points the IVT's first 32
# vectors at stubs that report the exception the way crt0 does in the other modes.
# modes: long protected real
        .include "kvmiso.inc"
        .set FUZZ_SIZE, 4096
        .text
        .globl main, fuzz_code, fuzz_end
main:
.if BITS == 16
        xor %ax, %ax
        mov %ax, %es
        xor %di, %di            # es:di = IVT entry 0 at physical 0
        mov $rm_stubs, %ax
        mov $32, %cx
        cld
1:      stosw                   # offset of this vector's stub
        movw $0, %es:(%di)      # segment 0
        add $2, %di
        add $8, %ax             # stubs are 8 bytes apart
        loop 1b
.endif
        jmp fuzz_code

.if BITS == 16
        .balign 8
rm_stubs:
        .irp vec, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15,16,17,18,19,20,21,22,23,24,25,26,27,28,29,30,31
        .balign 8
        push $\vec
        jmp rm_exception
        .endr
# The stack holds vector, IP, CS, FLAGS; real mode has no error code and no CR2.
rm_exception:
        pop %di
        movzwl %di, %edi        # vector
        pop %dx
        movzwl %dx, %edx        # faulting ip
        xor %esi, %esi
        xor %ecx, %ecx
        UCALL UCALL_EXCEPTION
1:      hlt
        jmp 1b
.endif

        .balign 16
fuzz_code:
        DONE
        .org fuzz_code + FUZZ_SIZE, 0xf4
fuzz_end:
