/*
 * The compiled KVM_RUN loop: N round trips with no Python in between.
 *
 * This file knows no KVM ABI of its own (no <linux/kvm.h>): the ioctl number, the kvm_run
 * offsets and the KVM_EXIT_* numbers come from kvmiso.kvm.abi at call time, in a
 * struct kvmiso_layout, so kvm/ stays the only place that knows them.
 *
 * Each iteration reads CLOCK_MONOTONIC (and the TSC where the caller says it is usable) right
 * before and right after the call, checks the exit, and answers an IN or an MMIO read after
 * the second timestamp, so the timed interval is the call alone.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>
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

/* What one iteration calls. */
enum { KVMISO_OP_IOCTL = 0, KVMISO_OP_SYSCALL = 1 };
/* How the loop ended. */
enum { KVMISO_OK = 0, KVMISO_ERRNO = 1, KVMISO_UNEXPECTED = 2, KVMISO_INTERRUPTED = 3 };

struct kvmiso_layout {
    uint32_t exit_reason, immediate_exit;                 /* offsets in struct kvm_run */
    uint32_t io_direction, io_size, io_port, io_count, io_data_offset;
    uint32_t mmio_data, mmio_len, mmio_is_write;
    uint32_t exit_io, exit_mmio, io_in;                    /* KVM_EXIT_IO, _MMIO, KVM_EXIT_IO_IN */
};

struct kvmiso_loop {
    int op;
    int fd;
    unsigned long request;
    unsigned long arg;
    unsigned char *run;      /* the vCPU's kvm_run mapping; NULL: no exit to check */
    int32_t expect_reason;   /* the exit every call must end with; -1: any */
    int32_t expect_port;     /* for IO exits: the port; -1: any (ucalls and exception reports differ) */
    uint64_t reply;          /* the answer to an IN or an MMIO read, little-endian */
    unsigned char *zap;      /* if set: MADV_DONTNEED before every call (untimed), so the */
    size_t zap_len;          /*   guest's next touch of those pages faults again */
    int use_tsc;
    int eintr_ok;            /* EINTR completes an iteration: KVM_RUN with immediate_exit set */
};

struct kvmiso_result {
    uint64_t done;           /* iterations completed and timestamped */
    int status;
    int err;
    uint32_t reason;         /* the exit reason that ended a KVMISO_UNEXPECTED loop */
    uint64_t answered;       /* INs and MMIO reads answered */
};

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
static inline int check_exit(const struct kvmiso_loop *l, const struct kvmiso_layout *lay,
                             struct kvmiso_result *res)
{
    unsigned char *run = l->run;
    uint32_t reason;
    memcpy(&reason, run + lay->exit_reason, 4);
    if (l->expect_reason >= 0 && reason != (uint32_t)l->expect_reason) {
        res->reason = reason;
        return -1;
    }
    if (reason == lay->exit_io) {
        uint16_t port;
        memcpy(&port, run + lay->io_port, 2);
        if (l->expect_port >= 0 && port != (uint16_t)l->expect_port) {
            res->reason = reason;
            return -1;
        }
        if (run[lay->io_direction] == lay->io_in) {
            uint8_t size = run[lay->io_size];
            uint32_t count;
            uint64_t off;
            memcpy(&count, run + lay->io_count, 4);
            memcpy(&off, run + lay->io_data_offset, 8);
            for (uint32_t k = 0; k < count; k++)
                memcpy(run + off + (uint64_t)k * size, &l->reply, size <= 8 ? size : 8);
            return 1;
        }
    } else if (reason == lay->exit_mmio && !run[lay->mmio_is_write]) {
        uint32_t len;
        memcpy(&len, run + lay->mmio_len, 4);
        memcpy(run + lay->mmio_data, &l->reply, len <= 8 ? len : 8);
        return 1;
    }
    return 0;
}

/*
 * Run n iterations, or until an error, an unexpected exit or a signal. t_start/t_end get
 * CLOCK_MONOTONIC nanoseconds, c_start/c_end TSC values (may be NULL). res->done counts the
 * iterations stored, and is kept up to date so a caller interrupted mid-loop can read it.
 */
int kvmiso_loop(const struct kvmiso_loop *l, const struct kvmiso_layout *lay, uint64_t n,
                uint64_t *t_start, uint64_t *t_end, uint64_t *c_start, uint64_t *c_end,
                struct kvmiso_result *res)
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
        if (l->op == KVMISO_OP_SYSCALL)
            r = syscall(SYS_getppid);
        else
            r = ioctl(l->fd, l->request, l->arg);
        c1 = tsc(use_tsc);
        t1 = now_ns();
        if (r < 0 && l->eintr_ok && errno == EINTR) {
            r = 0;  /* KVM returned before entering the guest, as asked; no exit to check */
        } else if (r < 0) {
            res->err = errno;
            res->status = res->err == EINTR ? KVMISO_INTERRUPTED : KVMISO_ERRNO;
            return res->status;
        } else if (l->run) {
            int a = check_exit(l, lay, res);
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
