# String I/O: `rep insb` fills a buffer from port 0x3010, `rep outsb` sends it to port 0x3011.
# modes: long protected real
        .include "kvmiso.inc"
        .set PORT_SRC, 0x3010
        .set PORT_DST, 0x3011
        .set LEN, 8
        .text
        .globl main
main:
        cld
        mov $buffer, %edi
        mov $LEN, %ecx
        mov $PORT_SRC, %dx
        rep insb                # LEN bytes from the host into buffer
        mov $buffer, %esi
        mov $LEN, %ecx
        mov $PORT_DST, %dx
        rep outsb               # the same bytes back out
        ret
        .bss
buffer: .skip LEN
