/* A multiboot (v1) kernel for QEMU's -kernel: it prints COUNT bytes to the debugcon port 0xe9,
 * one OUT each, then asks QEMU to exit through isa-debug-exit (port 0xf4). With LOOP defined it
 * prints forever, a byte every DELAY iterations (default 100000), for tests that attach to a
 * running QEMU and for scripts/bench_attach.py (its rate of bytes is the guest's progress).
 * Built by tests/test_attach.py: as --32 --defsym COUNT=n [--defsym LOOP=1 [--defsym DELAY=n]];
 * ld -m elf_i386 -Ttext=0x100000. */
	.section .text
	.code32
	.globl _start
	.align 4
header:
	.long 0x1BADB002                    /* multiboot magic */
	.long 0x00010000                    /* flags: the address fields below are valid */
	.long -(0x1BADB002 + 0x00010000)    /* checksum */
	.long header                        /* header_addr */
	.long header                        /* load_addr: the file is loaded from here */
	.long _end                          /* load_end_addr */
	.long _end                          /* bss_end_addr */
	.long _start                        /* entry_addr */
_start:
	mov $0xe9, %dx
.ifdef LOOP
.ifndef DELAY
	.set DELAY, 100000
.endif
1:	mov $'.', %al
	out %al, %dx
	mov $DELAY, %ecx
2:	dec %ecx
	jnz 2b
	jmp 1b
.else
	mov $COUNT, %ecx
1:	mov $'K', %al
	out %al, %dx                        /* one KVM_EXIT_IO to QEMU per byte */
	loop 1b
	mov $0xf4, %dx
	xor %al, %al
	out %al, %dx                        /* isa-debug-exit: QEMU exits with status 1 */
	hlt
.endif
_end:
