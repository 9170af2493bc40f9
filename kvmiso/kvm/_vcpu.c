/*
 * kvmiso.kvm._vcpu: what Vcpu needs in C.
 *
 * - kvmiso_vcpu_run: KVM_RUN once, the exit reason or -errno, without ctypes' argument
 *   conversion on the path every exit takes.
 * - The kick signal: a handler installed with sigaction(2), so any thread may install it (Python's
 *   signal.signal() works from the main thread only). A kick that pthread_kill() sends only
 *   interrupts KVM_RUN; the kicker has set immediate_exit already.
 * - The kick timer: a one-shot POSIX timer per vCPU whose expiry sends the kick signal to the
 *   thread that armed it (SIGEV_THREAD_ID). Its handler sets immediate_exit in that vCPU's
 *   kvm_run page, so a KVM_RUN that had not started yet returns at once too. No watchdog thread.
 * - Owning an fd or a mapping from Python: each is made straight into its cell (an int, a
 *   struct kvmiso_mapping, a vCPU's struct), and marked gone and released in one call. Python
 *   cannot be interrupted inside one call (its signal handlers, and so Ctrl-C, run between
 *   bytecodes), so a Ctrl-C never leaves an fd that nothing owns, nor a number that a second
 *   close would close after the kernel gave it to someone else.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE  /* SIGEV_THREAD_ID */
#endif
#include "_vcpu.h"

#include <fcntl.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <sys/eventfd.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#ifndef sigev_notify_thread_id
#define sigev_notify_thread_id _sigev_un._tid
#endif

/* The exit in v's page as one number: KVMISO_KEY_IO or KVMISO_KEY_MMIO with every field the
 * decoder reads packed below it, or, for any other exit (or one too wide to pack), its reason. */
long long kvmiso_exit_key(const struct kvmiso_vcpu *v)
{
    uint32_t reason = kvmiso_exit_reason(v);
    if (reason >= KVMISO_SAME_EXIT)  /* no exit number is, today: kept apart from the answer */
        return (long long)reason << 32;
    if (reason == v->lay.exit_io) {
        struct kvmiso_io io = kvmiso_exit_io(v);
        if (io.count < 0x10000 && io.data_offset % 4096 == 0 && io.data_offset < 16 * 4096)
            return KVMISO_KEY_IO | (long long)(io.data_offset >> 12) << 41 | (long long)io.in << 40 |
                   (long long)io.size << 32 | (long long)io.port << 16 | io.count;
    } else if (reason == v->lay.exit_mmio) {
        uint64_t addr;
        uint32_t len = kvmiso_u32(v, v->lay.mmio_len);
        memcpy(&addr, v->page + v->lay.mmio_phys_addr, 8);
        if (addr < (1ull << 52) && len < 0x80)
            return KVMISO_KEY_MMIO | (long long)(v->page[v->lay.mmio_is_write] != 0) << 59 |
                   (long long)len << 52 | (long long)addr;
    }
    return reason;
}

/* Keep v to the calling thread: 1 if it takes v now, 0 if it held v already, KVMISO_RUN_BUSY
 * if another thread runs or holds it. */
int kvmiso_vcpu_hold(struct kvmiso_vcpu *v)
{
    unsigned long me = (unsigned long)pthread_self(), runner = 0;
    if (__atomic_compare_exchange_n(&v->runner, &runner, me, 0, __ATOMIC_ACQUIRE, __ATOMIC_RELAXED))
        return 1;
    return runner == me ? 0 : KVMISO_RUN_BUSY;
}

/* Let another thread run v (after kvmiso_vcpu_hold returned 1). */
void kvmiso_vcpu_unhold(struct kvmiso_vcpu *v)
{
    __atomic_store_n(&v->runner, 0, __ATOMIC_RELEASE);
}

/* The exit's key (kvmiso_exit_key), KVMISO_SAME_EXIT if that is the packed key returned last. */
static long long kvmiso_run_key(struct kvmiso_vcpu *v)
{
    long long key = kvmiso_exit_key(v);
    if (key < KVMISO_KEY_MMIO)
        return key;
    if (key == v->last_key)
        return KVMISO_SAME_EXIT;
    v->last_key = key;
    return key;
}

/* KVM_RUN once from a thread that holds v (for this call, or for longer): the exit's key
 * (kvmiso_run_key), -errno, or KVMISO_RUN_BUSY without a KVM_RUN. Two threads in KVM_RUN on
 * one vCPU would take turns at the kernel's vCPU mutex and split its exits between them. */
long long kvmiso_vcpu_run(struct kvmiso_vcpu *v)
{
    long long key;
    int took = kvmiso_vcpu_hold(v);
    if (took < 0)
        return KVMISO_RUN_BUSY;
    key = kvmiso_ioctl_issue(&v->run) < 0 ? -errno : kvmiso_run_key(v);
    if (took)
        kvmiso_vcpu_unhold(v);
    return key;
}

static void kvmiso_kick_handler(int sig, siginfo_t *si, void *uc)
{
    (void)sig;
    (void)uc;
    if (si->si_code == SI_TIMER && si->si_value.sival_ptr) {
        struct kvmiso_vcpu *v = si->si_value.sival_ptr;
        unsigned char *page = v->page;
        if (page)
            page[v->lay.immediate_exit] = 1;
        v->timer_fired = 1;
    }
}

/* The lock between a kick and the release of the page it writes to: both are rare and short, so
 * it spins. The signal handler does not take it (the timer is deleted before the page goes). */
static void kvmiso_lock(struct kvmiso_vcpu *v)
{
    while (__atomic_test_and_set(&v->lock, __ATOMIC_ACQUIRE))
        sched_yield();
}

static void kvmiso_unlock(struct kvmiso_vcpu *v)
{
    __atomic_clear(&v->lock, __ATOMIC_RELEASE);
}

/* Stop the KVM_RUN of `thread` (a pthread_t) on v: immediate_exit, then signo. 0 (nothing done
 * on a closed vCPU), or -errno from pthread_kill (ESRCH: no such thread). */
int kvmiso_vcpu_kick(struct kvmiso_vcpu *v, unsigned long thread, int signo)
{
    int r = 0;
    kvmiso_lock(v);
    if (v->page) {
        v->page[v->lay.immediate_exit] = 1;
        r = -pthread_kill((pthread_t)thread, signo);
    }
    kvmiso_unlock(v);
    return r;
}

/* 0: the handler is installed (now or before); 1: the signal has a handler of someone else's. */
int kvmiso_kick_install(int signo)
{
    struct sigaction old, sa;
    if (sigaction(signo, NULL, &old) < 0)
        return -errno;
    if ((old.sa_flags & SA_SIGINFO) && old.sa_sigaction == kvmiso_kick_handler)
        return 0;
    if (!(old.sa_flags & SA_SIGINFO) && old.sa_handler != SIG_DFL && old.sa_handler != SIG_IGN)
        return 1;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = kvmiso_kick_handler;
    sa.sa_flags = SA_SIGINFO;  /* no SA_RESTART: the point is the interrupted KVM_RUN */
    sigemptyset(&sa.sa_mask);
    return sigaction(signo, &sa, NULL) < 0 ? -errno : 0;
}

/* Arm v's timer to send signo to thread tid after ns nanoseconds (at least 1). */
int kvmiso_kick_after(struct kvmiso_vcpu *v, int signo, int tid, int64_t ns)
{
    struct itimerspec its;
    if (v->timer_made && v->timer_tid != tid) {  /* the timer signals one thread: another runs now */
        timer_delete((timer_t)v->timer);
        v->timer_made = 0;
    }
    if (!v->timer_made) {
        struct sigevent sev;
        timer_t t;
        memset(&sev, 0, sizeof(sev));
        sev.sigev_notify = SIGEV_THREAD_ID;
        sev.sigev_signo = signo;
        sev.sigev_value.sival_ptr = v;
        sev.sigev_notify_thread_id = tid;
        if (timer_create(CLOCK_MONOTONIC, &sev, &t) < 0)
            return -errno;
        v->timer = (void *)t;
        v->timer_made = 1;
        v->timer_tid = tid;
    }
    if (ns < 1)
        ns = 1;  /* an it_value of zero would disarm the timer instead */
    memset(&its, 0, sizeof(its));
    its.it_value.tv_sec = ns / 1000000000;
    its.it_value.tv_nsec = ns % 1000000000;
    v->timer_fired = 0;
    return timer_settime((timer_t)v->timer, 0, &its, NULL) < 0 ? -errno : 0;
}

/* Disarm v's timer. Called by the thread that armed it, so a signal the timer sent before has
 * been handled when this returns (a pending signal is delivered on the way out of the syscall). */
int kvmiso_kick_cancel(struct kvmiso_vcpu *v)
{
    struct itimerspec its;
    if (!v->timer_made)
        return 0;
    memset(&its, 0, sizeof(its));
    return timer_settime((timer_t)v->timer, 0, &its, NULL) < 0 ? -errno : 0;
}

/* The fd `made` (or -1 and errno) into *into: 0, or -errno. */
static int kvmiso_into(int made, int *into)
{
    if (made < 0)
        return -errno;
    *into = made;
    return 0;
}

/* open(2) into *into. */
int kvmiso_open(const char *path, int flags, int *into)
{
    return kvmiso_into(open(path, flags), into);
}

/* An ioctl that makes an fd (KVM_CREATE_VM, KVM_CREATE_VCPU, KVM_GET_STATS_FD), into *into. */
int kvmiso_ioctl_fd(int fd, unsigned long request, unsigned long arg, int *into)
{
    return kvmiso_into(ioctl(fd, request, arg), into);
}

/* eventfd(2), counting from 0, into *into. */
int kvmiso_eventfd(int flags, int *into)
{
    return kvmiso_into(eventfd(0, flags), into);
}

/* mmap(2) of m->size bytes into m->addr: 0 or -errno. */
int kvmiso_map(struct kvmiso_mapping *m, int prot, int flags, int fd)
{
    void *addr = mmap(NULL, m->size, prot, flags, fd, 0);
    if (addr == MAP_FAILED)
        return -errno;
    m->addr = addr;
    return 0;
}

/* Map v's kvm_run page (mmap of the vCPU fd) into v->page: 0 or -errno. */
int kvmiso_vcpu_map(struct kvmiso_vcpu *v)
{
    struct kvmiso_mapping page = {NULL, v->page_size};
    int r = kvmiso_map(&page, PROT_READ | PROT_WRITE, MAP_SHARED, v->run.fd);
    v->page = page.addr;
    return r;
}

/* Close *fd and set it to -1 (nothing if it is -1 already): 0 or -errno. */
int kvmiso_close(int *fd)
{
    int f = *fd;
    *fd = -1;
    return f < 0 || close(f) == 0 ? 0 : -errno;
}

/* Unmap m and set m->addr to NULL (nothing if it is NULL already): 0 or -errno. */
int kvmiso_unmap(struct kvmiso_mapping *m)
{
    void *addr = m->addr;
    m->addr = NULL;
    return !addr || munmap(addr, m->size) == 0 ? 0 : -errno;
}

/* The vCPU is closing: no timer, no page for the handler to write to, then the mapping and the
 * fd go. 0, or the -errno of the first step that failed (the others are done all the same). */
int kvmiso_vcpu_release(struct kvmiso_vcpu *v)
{
    struct kvmiso_mapping page = {v->page, v->page_size};
    int unmapped, closed;
    if (v->timer_made) {
        v->timer_made = 0;
        timer_delete((timer_t)v->timer);
    }
    kvmiso_lock(v);  /* no kick is writing to the page */
    v->page = NULL;
    kvmiso_unlock(v);
    unmapped = kvmiso_unmap(&page);
    closed = kvmiso_close(&v->run.fd);
    return unmapped ? unmapped : closed;
}
