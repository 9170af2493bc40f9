# Port OUT and IN: the host records the OUTs and answers the INs; the guest reports what it read.
# modes: long protected real
        .include "kvmiso.inc"
        .set PORT_TEST, 0x3000
        .text
        .globl main
main:
        mov $PORT_TEST, %dx
        mov $0xa5, %al
        out %al, %dx            # OUT byte 0xa5 to 0x3000
        add $2, %dx
        mov $0xbeef, %ax
        out %ax, %dx            # OUT word 0xbeef to 0x3002
        sub $2, %dx
        in %dx, %al             # IN byte from 0x3000: the host answers
        movzbl %al, %ebx
        REPORT 1, %ebx
        add $2, %dx
        in %dx, %ax             # IN word from 0x3002
        movzwl %ax, %ebx
        REPORT 2, %ebx
        ret
