/*
 * The C view of a vCPU, shared by kvmiso's compiled code: kvm/_vcpu.c (Vcpu.run()'s KVM_RUN and
 * the kick signal) and bench/runloop.c (the compiled KVM_RUN loop).
 *
 * This header is the one declaration of these structs: cffi reads the part above the "C only"
 * line as its cdef (kvm/_build.py, bench/_build.py), the C files include all of it. It knows no
 * KVM ABI of its own (no <linux/kvm.h>): kvmiso.kvm.vcpu fills struct kvmiso_vcpu from
 * kvmiso.kvm.abi, the one place that knows ioctl numbers, kvm_run offsets and exit numbers.
 */

/* kvmiso_vcpu_run's answer above every exit reason: an I/O or MMIO exit, all its fields in one
 * number, so that equal exits give equal keys (Vcpu.run() reuses the Exit it built for a key). */
#define KVMISO_KEY_MMIO 0x2000000000000000
#define KVMISO_KEY_IO 0x4000000000000000
/* ... and the answer for the same I/O or MMIO exit as the last such one: a number Python keeps
 * as one shared object (no exit reason comes near it), so the commonest exit costs no lookup. */
#define KVMISO_SAME_EXIT 255
/* ... and the answer when another thread is running the vCPU (no -errno is this low). */
#define KVMISO_RUN_BUSY -4097

/* One ioctl, ready to issue: what a compiled loop times. */
struct kvmiso_ioctl {
    int fd;
    unsigned long request;
    unsigned long arg;
};

/* Offsets in struct kvm_run, and the KVM_EXIT_* numbers the compiled code tests. */
struct kvmiso_run_layout {
    uint32_t exit_reason, immediate_exit;
    uint32_t io_direction, io_size, io_port, io_count, io_data_offset;
    uint32_t mmio_phys_addr, mmio_data, mmio_len, mmio_is_write;
    uint32_t exit_io, exit_mmio, exit_intr, io_in;
};

/* A mapping a Python object owns: addr is NULL once it is unmapped. */
struct kvmiso_mapping {
    void *addr;
    size_t size;
};

/* One vCPU (kvmiso.kvm.Vcpu): its KVM_RUN, its kvm_run mapping and the kick timer's state. The
 * vCPU fd (run.fd, -1 once closed) and the mapping are this struct's: kvmiso_vcpu_release frees them. */
struct kvmiso_vcpu {
    struct kvmiso_ioctl run;        /* KVM_RUN on the vCPU fd */
    unsigned char *page;            /* the kvm_run mapping; NULL once the vCPU is closed */
    size_t page_size;
    struct kvmiso_run_layout lay;
    void *timer;                    /* the kick timer (a timer_t), once made */
    int timer_made;
    int timer_tid;                  /* the thread it signals */
    int timer_fired;                /* set by the kick signal's handler when the timer kicked */
    unsigned char lock;             /* held by a kick and by the release of the page it writes to */
    unsigned long runner;           /* the pthread_self() of the thread running or holding it, or 0 */
    long long last_key;             /* the last packed exit key kvmiso_vcpu_run returned */
};

/* ---------------------------------------------------------------------------------- C only --- */

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/ioctl.h>

/* ioctl(2) as the caller described it: its result, errno set on failure. */
static inline long kvmiso_ioctl_issue(const struct kvmiso_ioctl *c)
{
    return ioctl(c->fd, c->request, c->arg);
}

static inline uint32_t kvmiso_u32(const struct kvmiso_vcpu *v, uint32_t off)
{
    uint32_t x;
    memcpy(&x, v->page + off, 4);
    return x;
}

static inline uint32_t kvmiso_exit_reason(const struct kvmiso_vcpu *v)
{
    return kvmiso_u32(v, v->lay.exit_reason);
}

/* An I/O exit: port, direction, access size and count, and where its data is in the page. */
struct kvmiso_io {
    uint16_t port;
    uint8_t in, size;
    uint32_t count;
    uint64_t data_offset;
};

static inline struct kvmiso_io kvmiso_exit_io(const struct kvmiso_vcpu *v)
{
    struct kvmiso_io io;
    memcpy(&io.port, v->page + v->lay.io_port, 2);
    io.in = v->page[v->lay.io_direction] == v->lay.io_in;
    io.size = v->page[v->lay.io_size];
    io.count = kvmiso_u32(v, v->lay.io_count);
    memcpy(&io.data_offset, v->page + v->lay.io_data_offset, 8);
    return io;
}

/* An MMIO exit: a read gets its answer in data[0..len). */
static inline int kvmiso_exit_mmio_read(const struct kvmiso_vcpu *v, unsigned char **data, uint32_t *len)
{
    if (v->page[v->lay.mmio_is_write])
        return 0;
    *data = v->page + v->lay.mmio_data;
    *len = kvmiso_u32(v, v->lay.mmio_len);
    return 1;
}
