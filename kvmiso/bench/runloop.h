/* The compiled loop's interface: cffi reads this file as its cdef (bench/_build.py), runloop.c
 * includes it. struct kvmiso_vcpu and struct kvmiso_ioctl come from kvm/_vcpu.h. */

/* What one iteration calls. */
enum { KVMISO_OP_IOCTL = 0, KVMISO_OP_SYSCALL = 1, KVMISO_OP_RUN = 2 };
/* How the loop ended. */
enum { KVMISO_OK = 0, KVMISO_ERRNO = 1, KVMISO_UNEXPECTED = 2, KVMISO_INTERRUPTED = 3 };

struct kvmiso_loop {
    int op;                          /* KVMISO_OP_IOCTL, _SYSCALL or _RUN */
    const struct kvmiso_ioctl *call; /* OP_IOCTL: the ioctl timed */
    struct kvmiso_vcpu *vcpu;        /* OP_RUN: the vCPU run; each exit is checked */
    int32_t expect_reason;           /* the exit every KVM_RUN must end with; -1: any */
    int32_t expect_port;             /* for IO exits: the port; -1: any */
    uint64_t reply;                  /* the answer to an IN or an MMIO read, little-endian */
    unsigned char *zap;              /* if set: MADV_DONTNEED before every call (untimed), so the */
    size_t zap_len;                  /*   guest's next touch of those pages faults again */
    int use_tsc;
    int eintr_ok;                    /* EINTR completes an iteration: KVM_RUN with immediate_exit set */
};

struct kvmiso_result {
    uint64_t done;                   /* iterations completed and timestamped */
    int status;
    int err;
    uint32_t reason;                 /* the exit reason that ended a KVMISO_UNEXPECTED loop */
    uint64_t answered;               /* INs and MMIO reads answered */
};

int kvmiso_loop(const struct kvmiso_loop *l, uint64_t n, uint64_t *t_start, uint64_t *t_end,
                uint64_t *c_start, uint64_t *c_end, struct kvmiso_result *res);
int kvmiso_have_tsc(void);
