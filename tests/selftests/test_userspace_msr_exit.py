"""x86/userspace_msr_exit_test (tools/testing/selftests/kvm/x86/userspace_msr_exit_test.c,
Linux 6.12 and upstream 08c51f5bddc8, which re-reads two MSRs after the last filter change):
KVM_X86_SET_MSR_FILTER with KVM_CAP_X86_USER_SPACE_MSR. MSRs the filter denies exit to
userspace, which answers them (a value, or #GP in the guest); a default-deny filter sends
unknown MSRs and denied ones, each with its reason; a new filter takes effect at once; unused
flag bits of the capability, the filter and its ranges are refused. With KVM's forced
emulation prefix on (kvm.force_emulation_prefix), the first test runs again through the emulator.

Upstream assertions (line in Linux 6.12's file; + for one added since: assertion -> line here):
    220-255 guest_code_filter_allow: GUEST_ASSERT(data, exception count), 10 -> 92, 93, 95, 97, 99, 101, 103, 105, 106, 107
    265-283 the same 10 through forced emulation (the em_ functions) -> 92, 93, 95, 97, 99, 101, 103, 105, 106, 107
    296-300 guest_msr_calls: GUEST_ASSERT(rdmsr(SYSCALL_MASK, GS_BASE) ==/!= index) -> 113, 114
    310 guest_msr_calls: GUEST_ASSERT(rdmsr(0xdeadbeef) == 0xdeadbeef) -> 117
    334-344 guest_code_permission_bitmap: GUEST_ASSERT(data ==/!= FS/GS_BASE), 4 -> 135, 136, 138, 139
    + (08c51f5bddc8) the same reads once more after filter_allow: != FS/GS_BASE -> 141
    360 __guest_gp_handler: GUEST_ASSERT(!"RIP is at an unknown location!") -> 85
    384 check_for_guest_assert: REPORT_GUEST_ASSERT -> 170
    394-395 process_rdmsr: TEST_ASSERT_KVM_EXIT_REASON(RDMSR), TEST_ASSERT(index) -> 171
    416 process_rdmsr: TEST_ASSERT(false, "Unexpected MSR") -> 176
    426-427 process_wrmsr: TEST_ASSERT_KVM_EXIT_REASON(WRMSR), TEST_ASSERT(index) -> 171
    444 process_wrmsr: TEST_ASSERT(false, "Unexpected MSR") -> 181
    454-456 process_ucall_done: TEST_ASSERT_KVM_EXIT_REASON(IO), UCALL_DONE -> 196, 227
    467, 479 process_ucall: TEST_ASSERT_KVM_EXIT_REASON(IO), "Unexpected ucall" -> 195, 223
    546 TEST_ASSERT_EQ(cmd, UCALL_SYNC) (forced emulation on) -> 195
    564 TEST_ASSERT_EQ(cmd, UCALL_DONE) -> 196
    575 handle_ucall: REPORT_GUEST_ASSERT, 583 TEST_FAIL("Unknown ucall") -> 213
    596, 601 handle_rdmsr: TEST_ASSERT(reason FILTER, UNKNOWN) -> 208
    612-621 handle_wrmsr: TEST_ASSERT(data 0x1234, reason FILTER, UNKNOWN) -> 211
    663-664 TEST_ASSERT(msr_reads == 4, msr_writes == 3) -> 215
    681 TEST_ASSERT(run_guest_then_process_ucall(vcpu) == UCALL_SYNC) -> 223
    693-695 test_user_exit_msr_ioctl: TEST_ASSERT(!r) or TEST_ASSERT(EINVAL) -> 232, 234
(TEST_ASSERT(kvm_check_cap(...)) at 520, 524, 633, 639, 673, 677, 708 and 736 are the kvm_cap
marks here, which skip where upstream fails. CPL0, as upstream.)

Lines: 179 here (Python and guest code, without this docstring, blank and comment lines) for
upstream's 573 (769 with comments and blank lines), counted in Linux 6.12's file, the smaller.
"""

from pathlib import Path

import pytest

from kvmiso import Source
from kvmiso.guest import Outcome
from kvmiso.kvm import KvmError, MsrFilterRange, abi
from kvmiso.kvm.exits import RdmsrExit, WrmsrExit

XSS, FLUSH_CMD, NON_EXISTENT, FS_BASE, GS_BASE = 0xDA0, 0x10B, 0x474F4F00, 0xC0000100, 0xC0000101
SYSCALL_MASK, POWER_CTL = 0xC0000084, 0x1FC
GUEST = Source.c(r"""
#define FEP "ud2; .byte 'k', 'v', 'm';"   /* KVM's forced emulation prefix */
volatile unsigned long which, fep;      /* the host writes them: the test, and whether FEP is on */
static volatile int guest_exception_count;
extern char rdmsr_start[], rdmsr_end[], wrmsr_start[], wrmsr_end[];
extern char em_rdmsr_start[], em_rdmsr_end[], em_wrmsr_start[], em_wrmsr_end[];
extern void (*exception_hook)(unsigned long, unsigned long, unsigned long *);

/* rdmsr and wrmsr at labels the #GP handler knows; eax:edx are 0 after a #GP, as upstream's handler makes them */
#define MSR_CALLS(p, prefix)                                                                              \
static __attribute__((noinline)) unsigned long test_##p##rdmsr(unsigned int msr)                             \
{                                                                                                         \
	unsigned int a = 0, d = 0;                                                                        \
	guest_exception_count = 0;                                                                        \
	__asm__ volatile(prefix #p "rdmsr_start: rdmsr; " #p "rdmsr_end:" : "+a"(a), "+d"(d) : "c"(msr) : "memory"); \
	return a | (unsigned long)d << 32;                                                                \
}                                                                                                         \
static __attribute__((noinline)) void test_##p##wrmsr(unsigned int msr, unsigned long v)                      \
{                                                                                                         \
	guest_exception_count = 0;                                                                        \
	__asm__ volatile(prefix #p "wrmsr_start: wrmsr; " #p "wrmsr_end:"                              \
			 : : "a"((unsigned int)v), "d"((unsigned int)(v >> 32)), "c"(msr) : "memory");     \
}
MSR_CALLS(, "")
MSR_CALLS(em_, FEP)

static void gp_handler(unsigned long vector, unsigned long error, unsigned long *rip)
{
	char *const at[][2] = {{rdmsr_start, rdmsr_end}, {wrmsr_start, wrmsr_end},
			       {em_rdmsr_start, em_rdmsr_end}, {em_wrmsr_start, em_wrmsr_end}};
	int i = 0;

	while (i < 4 && *rip != (unsigned long)at[i][0])
		i++;
	if (vector != 13 || i == 4)
		GUEST_FAIL("RIP is at an unknown location!");
	*rip = (unsigned long)at[i][1];
	++guest_exception_count;
}

static void filter_allow(unsigned long (*rd)(unsigned int), void (*wr)(unsigned int, unsigned long))
{
	GUEST_ASSERT(rd(0xda0) == 0);                   /* MSR_IA32_XSS: #GP for anything but 0 written */
	GUEST_ASSERT(guest_exception_count == 0);
	wr(0xda0, 0);
	GUEST_ASSERT(guest_exception_count == 0);
	wr(0xda0, 1);
	GUEST_ASSERT(guest_exception_count == 1);
	rd(0x10b);                                      /* MSR_IA32_FLUSH_CMD: #GP unless 1 is written */
	GUEST_ASSERT(guest_exception_count == 1);
	wr(0x10b, 0);
	GUEST_ASSERT(guest_exception_count == 1);
	wr(0x10b, 1);
	GUEST_ASSERT(guest_exception_count == 0);
	wr(0x474f4f00, 2);                              /* an MSR nobody knows, kept by userspace */
	GUEST_ASSERT(guest_exception_count == 0);
	GUEST_ASSERT(rd(0x474f4f00) == 2);
	GUEST_ASSERT(guest_exception_count == 0);
}

static void msr_calls(int trapped)
{
	wrmsr(0xc0000084, 0);                           /* MSR_SYSCALL_MASK, in the kernel */
	GUEST_ASSERT((rdmsr(0xc0000084) == 0xc0000084) == trapped);
	GUEST_ASSERT((rdmsr(0xc0000101) == 0xc0000101) == trapped);   /* MSR_GS_BASE */
	wrmsr(0x1fc, 0x1234);                           /* MSR_IA32_POWER_CTL: userspace's if trapped */
	rdmsr(0x1fc);
	GUEST_ASSERT(rdmsr(0xdeadbeef) == 0xdeadbeef);  /* unknown: always userspace's */
	wrmsr(0xdeadbeef, 0x1234);
}

void main(void)
{
	if (which == 0) {
		exception_hook = gp_handler;
		filter_allow(test_rdmsr, test_wrmsr);
		if (fep) {
			GUEST_SYNC(0);
			filter_allow(test_em_rdmsr, test_em_wrmsr);
		}
	} else if (which == 1) {
		msr_calls(1);
		GUEST_SYNC(0);                          /* the host drops the filter */
		msr_calls(0);
	} else {
		GUEST_ASSERT(test_rdmsr(0xc0000100) == 0xc0000100);   /* MSR_FS_BASE */
		GUEST_ASSERT(test_rdmsr(0xc0000101) != 0xc0000101);
		GUEST_SYNC(0);                          /* the host switches the filter to GS_BASE */
		GUEST_ASSERT(test_rdmsr(0xc0000100) != 0xc0000100);
		GUEST_ASSERT(test_rdmsr(0xc0000101) == 0xc0000101);
		for (int i = 0; i < 2; i++)             /* and again: KVM dropped the interception */
			GUEST_ASSERT(test_rdmsr(0xc0000100 + i) != 0xc0000100 + i);
	}
}
""")
FILTER, UNKNOWN = abi.KVM_MSR_EXIT_REASON_FILTER, abi.KVM_MSR_EXIT_REASON_UNKNOWN
R, W, RW = abi.KVM_MSR_FILTER_READ, abi.KVM_MSR_FILTER_WRITE, abi.KVM_MSR_FILTER_READ | abi.KVM_MSR_FILTER_WRITE
ONE = bytes(8)  # upstream's deny_bits: one MSR, denied
FILTER_ALLOW = [MsrFilterRange(RW, XSS, ONE, 1), MsrFilterRange(RW, FLUSH_CMD, ONE, 1),
                MsrFilterRange(RW, NON_EXISTENT, ONE, 1)]
FILTER_DENY = [MsrFilterRange.allowing(R, 0, 0x3000), MsrFilterRange.allowing(W, 0, 0x3000, deny=[POWER_CTL]),
               MsrFilterRange.allowing(RW, 0x40000000, 0x3000),
               MsrFilterRange.allowing(R, 0xC0000000, 0x3000, deny=[SYSCALL_MASK, GS_BASE]),
               MsrFilterRange.allowing(W, 0xC0000000, 0x3000), MsrFilterRange(RW, 0xDEADBEEF, b"\x01", 1)]
PARAM = Path("/sys/module/kvm/parameters/force_emulation_prefix")
FEP = PARAM.exists() and PARAM.read_text().strip() not in ("0", "N")


def msr_guest(machine, which, exits=abi.KVM_MSR_EXIT_REASON_FILTER):
    m = machine(GUEST)
    m.vm.write(m.image.symbols["which"], which.to_bytes(8, "little"))
    m.vm.write(m.image.symbols["fep"], int(FEP).to_bytes(8, "little"))
    m.vm.enable_cap("X86_USER_SPACE_MSR", exits)
    return m


def next_msr(m, kind, index, kept={}):  # noqa: B006 - upstream's static msr_non_existent_data
    seen = []
    r = m.run(on_exit=lambda e: isinstance(e, (RdmsrExit, WrmsrExit)) and not seen.append(e), stop_at_sync=True)
    if not seen:
        r.raise_for_guest()
    assert seen and isinstance(seen[0], kind) and seen[0].index == index, \
        f"{seen or r.detail}: wanted {kind.__name__} {index:#x}"
    e = seen[0]
    if kind is RdmsrExit:
        answers = {XSS: 0, NON_EXISTENT: kept.get(NON_EXISTENT, 0), FS_BASE: FS_BASE, GS_BASE: GS_BASE}
        assert index in answers or index == FLUSH_CMD, f"Unexpected MSR: {index:#x}"
        e.reply(answers.get(index, 0), error=index == FLUSH_CMD)
    elif index == NON_EXISTENT:
        kept[index] = e.data
    else:
        assert index in (XSS, FLUSH_CMD), f"Unexpected MSR: {index:#x}"
        e.reply(error=e.data != {XSS: 0, FLUSH_CMD: 1}[index])


@pytest.mark.kvm_cap("X86_USER_SPACE_MSR", "X86_MSR_FILTER")
def test_msr_filter_allow(machine):
    m = msr_guest(machine, 0)
    m.vm.set_msr_filter(FILTER_ALLOW)
    for emulated in range(1 + FEP):
        for kind, index in [(RdmsrExit, XSS), (WrmsrExit, XSS), (WrmsrExit, XSS),
                            (RdmsrExit, FLUSH_CMD), (WrmsrExit, FLUSH_CMD), (WrmsrExit, FLUSH_CMD),
                            (WrmsrExit, NON_EXISTENT), (RdmsrExit, NON_EXISTENT)]:
            next_msr(m, kind, index)
        if not emulated and FEP:
            m.run_until_sync()  # the guest goes on through the emulator
    m.run().raise_for_guest()  # UCALL_DONE


@pytest.mark.kvm_cap("X86_USER_SPACE_MSR", "X86_MSR_FILTER")
def test_msr_filter_deny(machine):
    m = msr_guest(machine, 1, abi.KVM_MSR_EXIT_REASON_MASK)
    m.vm.set_msr_filter(FILTER_DENY, default_deny=True)
    counts = {RdmsrExit: 0, WrmsrExit: 0}

    def handle(e):
        counts[type(e)] += 1
        if isinstance(e, RdmsrExit):
            assert e.msr_reason == (UNKNOWN if e.index == 0xDEADBEEF else FILTER)  # SYSCALL_MASK, GS_BASE: FILTER
            e.reply(e.index)
        elif e.index in (POWER_CTL, 0xDEADBEEF):
            assert (e.data, e.msr_reason) == (0x1234, FILTER if e.index == POWER_CTL else UNKNOWN)

    for _ in m.syncs(on_msr=handle):  # a guest that fails raises here
        m.vm.set_msr_filter()  # no filter: the kernel handles everything now
    assert (counts[RdmsrExit], counts[WrmsrExit]) == (4, 3), "4 RDMSR and 3 WRMSR handled in userspace"


@pytest.mark.kvm_cap("X86_USER_SPACE_MSR", "X86_MSR_FILTER")
def test_msr_permission_bitmap(machine):
    m = msr_guest(machine, 2)
    m.vm.set_msr_filter([MsrFilterRange(R, FS_BASE, ONE, 1)])
    next_msr(m, RdmsrExit, FS_BASE)
    m.run_until_sync()  # UCALL_SYNC, nothing else
    m.vm.set_msr_filter([MsrFilterRange(R, GS_BASE, ONE, 1)])
    next_msr(m, RdmsrExit, GS_BASE)
    m.vm.set_msr_filter(FILTER_ALLOW)
    m.run().raise_for_guest()  # UCALL_DONE


def accepted_iff(valid, call, *args, **kwargs):
    if valid:
        call(*args, **kwargs)  # asserts success: KvmError otherwise
    else:
        with pytest.raises(KvmError, match="EINVAL"):
            call(*args, **kwargs)


@pytest.mark.kvm_cap("X86_USER_SPACE_MSR", "X86_MSR_FILTER")
def test_unused_flag_bits_are_refused(vm):
    vm.create_vcpu()
    for i in range(64):
        accepted_iff(1 << i & abi.KVM_MSR_EXIT_REASON_MASK, vm.enable_cap, "X86_USER_SPACE_MSR", 1 << i)
    for i in range(32):
        accepted_iff(1 << i & abi.KVM_MSR_FILTER_VALID_MASK, vm.set_msr_filter, [MsrFilterRange(R, 0, ONE, 1)],
                     flags=1 << i)
        accepted_iff(1 << i & abi.KVM_MSR_FILTER_RANGE_VALID_MASK, vm.set_msr_filter, [MsrFilterRange(1 << i, 0, ONE, 1)])
