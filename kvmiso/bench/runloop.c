/*
 * The compiled KVM_RUN loop: N round trips with no Python in between.
 *
 * This file knows no KVM ABI of its own: it is handed a vCPU (struct kvmiso_vcpu, filled by
 * kvmiso.kvm.Vcpu) or an ioctl to time (struct kvmiso_ioctl, from kvmiso.kvm.Kvm), and reads
 * exits through kvm/_vcpu.h, so kvm/ stays the only place that knows the KVM ABI.
 *
 * Each iteration reads CLOCK_MONOTONIC (and the TSC where the caller says it is usable) right
 * before and right after the call, checks the exit, and answers an IN or an MMIO read after
 * the second timestamp, so the timed interval is the call alone.
 */
#include "_vcpu.h"

#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__) || defined(__i386__)
#include <x86intrin.h>
#define KVMISO_HAVE_TSC 1
#else
#define KVMISO_HAVE_TSC 0
#endif

#include "runloop.h"

static inline uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static inline uint64_t tsc(int use)
{
#if KVMISO_HAVE_TSC
    if (use) {
        _mm_lfence();  /* keep RDTSC from running ahead of the work before it */
        return __rdtsc();
    }
#endif
    (void)use;
    return 0;
}

/* Answer an IN or an MMIO read; returns 1 if it did, -1 if the exit is not the expected one. */
static inline int check_exit(const struct kvmiso_loop *l, struct kvmiso_result *res)
{
    const struct kvmiso_vcpu *v = l->vcpu;
    uint32_t reason = kvmiso_exit_reason(v);
    unsigned char *data;
    uint32_t len;
    if (l->expect_reason >= 0 && reason != (uint32_t)l->expect_reason) {
        res->reason = reason;
        return -1;
    }
    if (reason == v->lay.exit_io) {
        struct kvmiso_io io = kvmiso_exit_io(v);
        if (l->expect_port >= 0 && io.port != (uint16_t)l->expect_port) {
            res->reason = reason;
            return -1;
        }
        if (io.in) {
            for (uint32_t k = 0; k < io.count; k++)
                memcpy(v->page + io.data_offset + (uint64_t)k * io.size, &l->reply, io.size <= 8 ? io.size : 8);
            return 1;
        }
    } else if (reason == v->lay.exit_mmio && kvmiso_exit_mmio_read(v, &data, &len)) {
        memcpy(data, &l->reply, len <= 8 ? len : 8);
        return 1;
    }
    return 0;
}

/*
 * Run n iterations, or until an error, an unexpected exit or a signal. t_start/t_end get
 * CLOCK_MONOTONIC nanoseconds, c_start/c_end TSC values (may be NULL). res->done counts the
 * iterations stored, and is kept up to date so a caller interrupted mid-loop can read it.
 */
int kvmiso_loop(const struct kvmiso_loop *l, uint64_t n, uint64_t *t_start, uint64_t *t_end,
                uint64_t *c_start, uint64_t *c_end, struct kvmiso_result *res)
{
    int use_tsc = l->use_tsc && c_start && c_end;
    res->done = 0;
    res->status = KVMISO_OK;
    res->err = 0;
    res->answered = 0;
    if (l->zap)
        madvise(l->zap, l->zap_len, MADV_NOHUGEPAGE);  /* one fault per 4 KiB page */
    for (uint64_t i = 0; i < n; i++) {
        long r;
        uint64_t t0, t1, c0, c1;
        if (l->zap)
            madvise(l->zap, l->zap_len, MADV_DONTNEED);
        t0 = now_ns();
        c0 = tsc(use_tsc);
        if (l->op == KVMISO_OP_RUN)
            r = kvmiso_ioctl_issue(&l->vcpu->run);
        else if (l->op == KVMISO_OP_IOCTL)
            r = kvmiso_ioctl_issue(l->call);
        else
            r = syscall(SYS_getppid);
        c1 = tsc(use_tsc);
        t1 = now_ns();
        if (r < 0 && l->eintr_ok && errno == EINTR) {
            r = 0;  /* KVM returned before entering the guest, as asked; no exit to check */
        } else if (r < 0) {
            res->err = errno;
            res->status = res->err == EINTR ? KVMISO_INTERRUPTED : KVMISO_ERRNO;
            return res->status;
        } else if (l->op == KVMISO_OP_RUN) {
            int a = check_exit(l, res);
            if (a < 0) {
                res->status = KVMISO_UNEXPECTED;
                return res->status;
            }
            res->answered += (uint64_t)a;
        }
        t_start[i] = t0;
        t_end[i] = t1;
        if (use_tsc) {
            c_start[i] = c0;
            c_end[i] = c1;
        }
        res->done = i + 1;
    }
    return KVMISO_OK;
}

int kvmiso_have_tsc(void)
{
    return KVMISO_HAVE_TSC;
}
