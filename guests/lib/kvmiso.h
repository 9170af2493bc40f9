/*
 * kvmiso.h: the guest side of KVM selftests' ucall (GUEST_ASSERT, GUEST_SYNC, GUEST_PRINTF,
 * GUEST_DONE) for kvmiso payloads. kvmiso's builder includes it in every .S payload (before the
 * first line) and every C payload, so each site records the file and line it is written at.
 *
 * In assembly the macros of guests/lib/kvmiso.inc do the work; here their names get the place:
 * `GUEST_ASSERT_EQ %eax, $0xaa` on line 12 of x.S reaches the assembler as
 * `_GUEST_ASSERT_EQ "x.S", 12, %eax, $0xaa`. In C (long mode, compiled freestanding) the same
 * calls are functions and macros below. kvmiso/guest/ucall.py and sites.py are the host side.
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

#endif /* __ASSEMBLER__ */
#endif /* KVMISO_H */
