/*
 * kvmiso.h: the guest side of KVM selftests' ucall (GUEST_ASSERT, GUEST_SYNC, GUEST_PRINTF,
 * GUEST_DONE) for kvmiso payloads. kvmiso's builder includes it in every .S payload (before the
 * first line) and every C payload, so each site records the file and line it is written at.
 *
 * In assembly the macros of guests/lib/kvmiso.inc do the work; here their names get the place:
 * `GUEST_ASSERT_EQ %eax, $0xaa` on line 12 of x.S reaches the assembler as
 * `_GUEST_ASSERT_EQ "x.S", 12, %eax, $0xaa`. In C (long mode, compiled freestanding) the same
 * calls are the macros below, as in selftests (GUEST_ASSERT_EQ(a, b), GUEST_SYNC(1),
 * GUEST_PRINTF("%lx\n", x), GUEST_DONE()); main() is `void main(void)`, and its return is DONE.
 * kvmiso/guest/ucall.py and sites.py are the host side.
 */
#ifndef KVMISO_H
#define KVMISO_H

#ifdef __ASSEMBLER__

#define GUEST_ASSERT _GUEST_ASSERT __FILE__, __LINE__,
#define GUEST_ASSERT_EQ _GUEST_ASSERT_EQ __FILE__, __LINE__,
#define GUEST_ASSERT_NE _GUEST_ASSERT_NE __FILE__, __LINE__,
#define GUEST_ASSERT_LT _GUEST_ASSERT_LT __FILE__, __LINE__,
#define GUEST_ASSERT_LE _GUEST_ASSERT_LE __FILE__, __LINE__,
#define GUEST_ASSERT_GT _GUEST_ASSERT_GT __FILE__, __LINE__,
#define GUEST_ASSERT_GE _GUEST_ASSERT_GE __FILE__, __LINE__,
#define GUEST_FAIL _GUEST_FAIL __FILE__, __LINE__,
#define GUEST_SYNC _GUEST_SYNC __FILE__, __LINE__,
#define GUEST_PRINTF _GUEST_PRINTF __FILE__, __LINE__,

#else /* C: long mode, compiled freestanding (kvmiso.guest.build.C_FLAGS) */

/* The convention of guests/lib/kvmiso.inc, for C (test_layers.py checks they agree). */
#define PORT_CONSOLE 0xe9
#define PORT_UCALL 0xea
#define SCRATCH 0x100000UL
enum { UCALL_DONE = 1, UCALL_FAIL, UCALL_REPORT, UCALL_EXCEPTION, UCALL_ASSERT, UCALL_SYNC, UCALL_PRINTF };
enum { SITE_ASSERT, SITE_EQ, SITE_NE, SITE_LT, SITE_LE, SITE_GT, SITE_GE, SITE_FAIL, SITE_SYNC, SITE_PRINTF };

/* What the host reads at rdi: kvmiso/guest/sites.py */
struct kvmiso_site {
	unsigned int line;
	unsigned char kind, nargs;
	unsigned short zero;
	const char *file, *text;
};
_Static_assert(sizeof(struct kvmiso_site) == 24, "the site record is 24 bytes");

/* A ucall: one OUT of the call number; "memory", since the host may write guest memory at it */
static inline void kvmiso_ucall(unsigned char nr, const void *rdi, unsigned long rsi, unsigned long rdx,
				unsigned long rcx, unsigned long r8_value, unsigned long r9_value)
{
	register unsigned long r8 __asm__("r8") = r8_value;
	register unsigned long r9 __asm__("r9") = r9_value;

	__asm__ volatile("outb %%al, %[port]"
			 : : "a"(nr), "D"(rdi), "S"(rsi), "d"(rdx), "c"(rcx), "r"(r8), "r"(r9), [port] "i"(PORT_UCALL)
			 : "memory");
}

/* the number of macro arguments (0 to 5), and each cast to a register's width */
#define __KVMISO_NARGS(...) __KVMISO_NTH(_, ##__VA_ARGS__, 5, 4, 3, 2, 1, 0)
#define __KVMISO_NTH(_0, _1, _2, _3, _4, _5, n, ...) n
#define __KVMISO_CAT(a, b) __KVMISO_CAT_(a, b)
#define __KVMISO_CAT_(a, b) a##b
#define __KVMISO_U0() 0
#define __KVMISO_U1(a) (unsigned long)(a)
#define __KVMISO_U2(a, ...) (unsigned long)(a), __KVMISO_U1(__VA_ARGS__)
#define __KVMISO_U3(a, ...) (unsigned long)(a), __KVMISO_U2(__VA_ARGS__)
#define __KVMISO_U4(a, ...) (unsigned long)(a), __KVMISO_U3(__VA_ARGS__)
#define __KVMISO_U5(a, ...) (unsigned long)(a), __KVMISO_U4(__VA_ARGS__)
#define __KVMISO_VALUES(...) __KVMISO_CAT(__KVMISO_U, __KVMISO_NARGS(__VA_ARGS__))(__VA_ARGS__)

/* ucall nr with a site for this line and up to 5 values in rsi, rdx, rcx, r8, r9 */
#define __KVMISO_CALL(nr, kind, text, ...)                                                        \
	do {                                                                                      \
		static const struct kvmiso_site __kvmiso_site = {                                \
			__LINE__, kind, __KVMISO_NARGS(__VA_ARGS__), 0, __FILE__, text};          \
		unsigned long __kvmiso_v[5] = {__KVMISO_VALUES(__VA_ARGS__)};                     \
		kvmiso_ucall(nr, &__kvmiso_site, __kvmiso_v[0], __kvmiso_v[1], __kvmiso_v[2],     \
			     __kvmiso_v[3], __kvmiso_v[4]);                                       \
	} while (0)

/* A failed assertion reports and, were the host to resume the guest, reports again. */
#define __GUEST_ASSERT_CMP(kind, op, a, b)                                                        \
	do {                                                                                      \
		unsigned long __kvmiso_a = (unsigned long)(a), __kvmiso_b = (unsigned long)(b);   \
		if (!(__kvmiso_a op __kvmiso_b))                                                  \
			for (;;)                                                                  \
				__KVMISO_CALL(UCALL_ASSERT, kind, #a ", " #b, __kvmiso_a, __kvmiso_b); \
	} while (0)

#define GUEST_ASSERT(cond)                                                                        \
	do {                                                                                      \
		if (!(cond))                                                                      \
			for (;;)                                                                  \
				__KVMISO_CALL(UCALL_ASSERT, SITE_ASSERT, #cond);                  \
	} while (0)
#define GUEST_ASSERT_EQ(a, b) __GUEST_ASSERT_CMP(SITE_EQ, ==, a, b)
#define GUEST_ASSERT_NE(a, b) __GUEST_ASSERT_CMP(SITE_NE, !=, a, b)
#define GUEST_ASSERT_LT(a, b) __GUEST_ASSERT_CMP(SITE_LT, <, a, b)
#define GUEST_ASSERT_LE(a, b) __GUEST_ASSERT_CMP(SITE_LE, <=, a, b)
#define GUEST_ASSERT_GT(a, b) __GUEST_ASSERT_CMP(SITE_GT, >, a, b)
#define GUEST_ASSERT_GE(a, b) __GUEST_ASSERT_CMP(SITE_GE, >=, a, b)
/* fmt is a string literal, formatted by the host as printf does (%s reads guest memory) */
#define GUEST_FAIL(fmt, ...)                                                                      \
	do {                                                                                      \
		for (;;)                                                                          \
			__KVMISO_CALL(UCALL_ASSERT, SITE_FAIL, fmt, ##__VA_ARGS__);               \
	} while (0)
#define GUEST_SYNC(value, ...) __KVMISO_CALL(UCALL_SYNC, SITE_SYNC, #value, value, ##__VA_ARGS__)
#define GUEST_PRINTF(fmt, ...) __KVMISO_CALL(UCALL_PRINTF, SITE_PRINTF, fmt, ##__VA_ARGS__)
#define GUEST_DONE() kvmiso_ucall(UCALL_DONE, 0, 0, 0, 0, 0, 0)
#define GUEST_REPORT(tag, value) kvmiso_ucall(UCALL_REPORT, (void *)(unsigned long)(tag), (unsigned long)(value), 0, 0, 0, 0)

/* The instructions KVM tests use most */
static inline void outb(unsigned short port, unsigned char value)
{
	__asm__ volatile("outb %0, %1" : : "a"(value), "Nd"(port));
}

static inline unsigned char inb(unsigned short port)
{
	unsigned char value;

	__asm__ volatile("inb %1, %0" : "=a"(value) : "Nd"(port));
	return value;
}

static inline unsigned long rdmsr(unsigned int index)
{
	unsigned int lo, hi;

	__asm__ volatile("rdmsr" : "=a"(lo), "=d"(hi) : "c"(index));
	return (unsigned long)hi << 32 | lo;
}

static inline void wrmsr(unsigned int index, unsigned long value)
{
	__asm__ volatile("wrmsr" : : "c"(index), "a"((unsigned int)value), "d"((unsigned int)(value >> 32)) : "memory");
}

static inline void cpuid(unsigned int leaf, unsigned int subleaf, unsigned int *eax, unsigned int *ebx,
			 unsigned int *ecx, unsigned int *edx)
{
	__asm__ volatile("cpuid" : "=a"(*eax), "=b"(*ebx), "=c"(*ecx), "=d"(*edx) : "a"(leaf), "c"(subleaf));
}

#endif /* __ASSEMBLER__ */
#endif /* KVMISO_H */
