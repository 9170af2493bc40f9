"""x86/userspace_io_test (tools/testing/selftests/kvm/x86_64/userspace_io_test.c, Linux 6.12):
a ``rep insb`` from port 0x80 whose count (RCX) the host changes at the I/O exit, 2 -> 1 and
3 -> 8192, must neither crash KVM nor overflow the buffer; without such a change KVM fills all
8192 bytes with what the host gave.

Upstream assertions (upstream line: assertion -> line here):
    23 GUEST_ASSERT_EQ(count, 0) -> 26
    24 GUEST_ASSERT_EQ((unsigned long)buffer, end) -> 27
    46 __GUEST_ASSERT(buffer[i] == 0xaa, ...) -> 41
    68 TEST_ASSERT_KVM_EXIT_REASON(vcpu, KVM_EXIT_IO) -> 56
    73 TEST_ASSERT(run->io.port == 0x80, ...) -> 50
    93-98 UCALL_DONE, REPORT_GUEST_ASSERT, TEST_FAIL on any other ucall -> 56

Lines: 31 here (Python and guest code, without this docstring, blank and comment lines) for
upstream's 69 (103 with comments and blank lines).
"""

from kvmiso import Source

GUEST = Source.c(r"""
static void guest_ins_port80(unsigned char *buffer, unsigned int count)
{
	unsigned long end = (unsigned long)buffer + (count == 2 ? 1 : 8192);

	__asm__ volatile("cld; rep insb" : "+D"(buffer), "+c"(count) : "d"(0x80) : "memory");
	GUEST_ASSERT_EQ(count, 0);
	GUEST_ASSERT_EQ((unsigned long)buffer, end);
}

void main(void)
{
	volatile unsigned char buffer[8192];

	guest_ins_port80((unsigned char *)buffer, 2);   /* the host makes it 1 */
	guest_ins_port80((unsigned char *)buffer, 3);   /* and this 8192 */
	for (int i = 0; i < 8192; i++)
		buffer[i] = 0;
	guest_ins_port80((unsigned char *)buffer, 8192);
	for (int i = 0; i < 8192; i++)
		if (buffer[i] != 0xaa)
			GUEST_FAIL("Expected '0xaa', got '0x%x' at buffer[%u]", buffer[i], i);
}
""")


def test_userspace_io(machine):
    m = machine(GUEST)

    def on_io(exit):
        assert exit.port == 0x80, f"Expected I/O at port 0x80, got port {exit.port:#x}"
        regs = m.vcpu.get_regs()
        regs.rcx = {2: 1, 3: 8192}.get(regs.rcx, regs.rcx)  # abuses KVM's batching of rep I/O, as upstream
        exit.data[:] = b"\xaa" * len(exit.data)
        m.vcpu.set_regs(regs)

    m.run(timeout=60, on_io=on_io).raise_for_guest()  # any exit but I/O, or a ucall but DONE, raises
