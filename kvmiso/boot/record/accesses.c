/*
 * kvmiso's access record: a QEMU TCG plugin that writes down every data access the L1 kernel
 * makes while its KVM handles one exit of a nested guest.
 *
 * Loaded by `kvmiso boot --record-accesses DIR` as -plugin FILE.so,dir=DIR[,cap=N]. The guest
 * (L1) runs kvm_amd under QEMU's SVM emulation; its nested guest is L2.
 *
 * - A window opens when L1 executes the instruction after a VMRUN: L2 has exited and KVM
 *   resumes there. It closes at the next VMRUN (the exit was handled in the kernel), at L1's
 *   first user-mode instruction (the exit went to the VMM, or the vCPU thread gave way to
 *   another task), or when QEMU ends with it open.
 * - Inside a window every load and store of an instruction at a kernel address (>=
 *   0xffff800000000000) is kept: the instruction's address, the data's virtual address, size,
 *   read or write. At most `cap` per window; the rest are counted as dropped.
 * - Accesses of VMRUN, VMLOAD and VMSAVE are counted as filtered, not kept: QEMU's helpers
 *   for them read and write the VMCB and the host save area by physical address, which the
 *   plugin API reports as virtual addresses. They need a callback of their own all the same:
 *   QEMU 7.2 reports a helper's accesses to the callback of the last instruction that had one
 *   (without it, VMLOAD's 24 loads of the VMCB appeared as amd_clear_divider's).
 * - Nothing is instrumented until L1 first translates a VMRUN: booting and starting the VMM
 *   run at TCG's own speed. Then the plugin resets itself (QEMU flushes its translations)
 *   and every block is translated again with the callbacks below.
 * - One file per vCPU (vcpuN.rec), written on that vCPU's thread when a window closes: the
 *   callbacks of several vCPUs run concurrently and share nothing but the list of VMRUN sites
 *   and one counter that puts every window and mark of every vCPU in a single order.
 * - Marks: a user-mode program marks a point of its own in the record by running two 7-byte
 *   NOPs, `nopl 0x494d564b(%rax)` ("KVMI") then `nopl ID(%rax)`. The plugin writes a mark
 *   (a window of no access, reason 4, the ID where a window's end is) in the order of the
 *   windows. `kvmiso record` marks the end of each guest run so that its windows can be told
 *   from the next run's, whose VM may reuse the same addresses. A NOP with that displacement
 *   is no compiler's padding (padding NOPs have displacement 0). A mark whose ID has bit 31
 *   set pauses the record until the next mark without it: windows are still written, their
 *   accesses only counted as dropped (kvmiso record pauses it while it traces).
 *
 * The record cannot tell L1 from L2 by register state (plugin API 1 reads no CR3 and no
 * guest-mode flag): it relies on L2 never running code at the address after L1's VMRUN.
 * Interrupts that L1 takes inside a window are in that window.
 *
 * The format is documented in kvmiso/observe/accessrecord.py, which reads it.
 *
 * QEMU's plugin API is declared here, not included: Debian ships no qemu-plugin.h. These are
 * the types and functions of plugin API version 1, as QEMU 7.2 offers it, that this file uses.
 */
#include <errno.h>
#include <inttypes.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* --- QEMU's plugin API, version 1 ------------------------------------------------------- */

#define EXPORT __attribute__((visibility("default")))

typedef uint64_t qemu_plugin_id_t;
typedef uint32_t qemu_plugin_meminfo_t;
struct qemu_plugin_tb;
struct qemu_plugin_insn;

typedef struct {
    const char *target_name;
    struct {
        int min;
        int cur;
    } version;
    bool system_emulation;
    union {
        struct {
            int smp_vcpus;
            int max_vcpus;
        } system;
    };
} qemu_info_t;

enum qemu_plugin_cb_flags { QEMU_PLUGIN_CB_NO_REGS };
enum qemu_plugin_mem_rw { QEMU_PLUGIN_MEM_RW = 3 };

typedef void (*udata_cb_t)(unsigned int vcpu_index, void *userdata);
typedef void (*mem_cb_t)(unsigned int vcpu_index, qemu_plugin_meminfo_t info, uint64_t vaddr, void *userdata);
typedef void (*tb_trans_cb_t)(qemu_plugin_id_t id, struct qemu_plugin_tb *tb);
typedef void (*atexit_cb_t)(qemu_plugin_id_t id, void *userdata);

void qemu_plugin_register_vcpu_tb_trans_cb(qemu_plugin_id_t id, tb_trans_cb_t cb);
void qemu_plugin_register_vcpu_tb_exec_cb(struct qemu_plugin_tb *tb, udata_cb_t cb,
                                          enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_vcpu_insn_exec_cb(struct qemu_plugin_insn *insn, udata_cb_t cb,
                                            enum qemu_plugin_cb_flags flags, void *userdata);
void qemu_plugin_register_vcpu_mem_cb(struct qemu_plugin_insn *insn, mem_cb_t cb, enum qemu_plugin_cb_flags flags,
                                      enum qemu_plugin_mem_rw rw, void *userdata);
void qemu_plugin_register_atexit_cb(qemu_plugin_id_t id, atexit_cb_t cb, void *userdata);
size_t qemu_plugin_tb_n_insns(const struct qemu_plugin_tb *tb);
struct qemu_plugin_insn *qemu_plugin_tb_get_insn(const struct qemu_plugin_tb *tb, size_t idx);
const void *qemu_plugin_insn_data(const struct qemu_plugin_insn *insn);
size_t qemu_plugin_insn_size(const struct qemu_plugin_insn *insn);
uint64_t qemu_plugin_insn_vaddr(const struct qemu_plugin_insn *insn);
unsigned int qemu_plugin_mem_size_shift(qemu_plugin_meminfo_t info);
bool qemu_plugin_mem_is_store(qemu_plugin_meminfo_t info);
typedef void (*simple_cb_t)(qemu_plugin_id_t id);
void qemu_plugin_reset(qemu_plugin_id_t id, simple_cb_t cb);

EXPORT int qemu_plugin_version = 1;

/* --- the record ----------------------------------------------------------------------------- */

#define KERNEL_MIN 0xffff800000000000ull  /* x86-64's upper half, 4-level paging */
#define FORMAT_VERSION 2  /* 2: marks, and the order of windows over all vCPUs */
#define DEFAULT_CAP 1000000u
#define MAX_SITES 64  /* VMRUN instructions in L1's kernel: kvm_amd has two */

enum reason { CLOSED_BY_VMRUN = 1, CLOSED_BY_USER = 2, OPEN_AT_END = 3, MARK = 4 };
enum { ACCESS_WRITE = 1 };

struct file_header {  /* 32 bytes, little-endian as the host */
    char magic[8];    /* "KVMISOAR" */
    uint16_t format, header_size;
    uint32_t vcpu, cap, api;
    uint64_t kernel_min;
};

struct window_header {  /* 56 bytes */
    char magic[4];      /* "WNDW" */
    uint32_t reason;
    uint64_t seq;       /* this vCPU's windows, from 0 */
    uint64_t vmrun_pc;  /* the VMRUN whose return opened it (a mark: 0) */
    uint64_t end_pc;    /* the VMRUN or the user-mode address that closed it; 0 at the end;
                           a mark: its ID */
    uint64_t insns;     /* instructions of the blocks entered in the window */
    uint32_t n_accesses, dropped;  /* kept; past the cap or while paused */
    uint32_t filtered;  /* of VMRUN, VMLOAD and VMSAVE */
    uint32_t order;     /* windows and marks of all vCPUs, numbered from 0 as they close */
};

struct access {  /* 24 bytes */
    uint64_t pc, addr;
    uint32_t size, flags;
};

struct vcpu {
    bool open, failed;
    struct window_header w;
    struct access *buf;
    FILE *out;
};

static const char *dir;
static uint32_t cap = DEFAULT_CAP;
static int api;
static struct vcpu *vcpus;
static unsigned int n_vcpus;
static pthread_mutex_t sites_lock = PTHREAD_MUTEX_INITIALIZER;
static struct {
    uint64_t vmrun, after;  /* each VMRUN seen, and the address after it, where windows open */
} sites[MAX_SITES];
static unsigned int n_sites;
static uint32_t order;  /* the next window's or mark's place in the order of all vCPUs' */
static bool paused;     /* by a mark with MARK_PAUSES: accesses are counted, not kept */
#define MARK_PAUSES 0x80000000u

/* On QEMU's stderr, where kvmiso looks when QEMU fails: qemu_plugin_outs() writes only under
 * -d plugin. Each failure is said once, so the pipe never fills. */
static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
}

static struct vcpu *vcpu_of(unsigned int index)
{
    return index < n_vcpus ? &vcpus[index] : NULL;
}

/* This vCPU's file and buffer, made on its first window; a failure is said once and the
 * vCPU records nothing more (kvmiso finds its file missing and says so). */
static bool ready(struct vcpu *v, unsigned int index)
{
    if (v->out)
        return true;
    if (v->failed)
        return false;
    char path[4096];
    snprintf(path, sizeof(path), "%s/vcpu%u.rec", dir, index);
    v->buf = malloc((size_t)cap * sizeof(struct access));
    v->out = v->buf ? fopen(path, "wb") : NULL;
    struct file_header h = {"KVMISOAR", FORMAT_VERSION, sizeof(h), index, cap, (uint32_t)api, KERNEL_MIN};
    if (!v->out || fwrite(&h, sizeof(h), 1, v->out) != 1) {
        say("kvmiso access record: cannot write %s: %s\n", path, strerror(errno));
        free(v->buf);
        v->buf = NULL;
        v->failed = true;
        return false;
    }
    return true;
}

static void close_window(struct vcpu *v, enum reason why, uint64_t end_pc)
{
    v->open = false;
    v->w.reason = why;
    v->w.end_pc = end_pc;
    v->w.order = __atomic_fetch_add(&order, 1, __ATOMIC_SEQ_CST);
    if (fwrite(&v->w, sizeof(v->w), 1, v->out) != 1 ||
        fwrite(v->buf, sizeof(struct access), v->w.n_accesses, v->out) != v->w.n_accesses ||
        fflush(v->out) != 0) {
        say("kvmiso access record: writing vcpu%" PRIu64 "'s record failed: %s\n", (uint64_t)(v - vcpus), strerror(errno));
        v->failed = true;
        fclose(v->out);
        v->out = NULL;
    }
    v->w.seq++;
}

static void open_window(unsigned int index, uint64_t vmrun_pc, uint64_t insns)
{
    struct vcpu *v = vcpu_of(index);
    if (!v || !ready(v, index))
        return;
    v->open = true;
    memcpy(v->w.magic, "WNDW", 4);
    v->w.vmrun_pc = vmrun_pc;
    v->w.insns = insns;
    v->w.n_accesses = v->w.dropped = v->w.filtered = 0;
}

/* --- VMRUN sites -------------------------------------------------------------------------- */

/* The index of the VMRUN site whose next instruction is at pc, or -1. */
static int site_at(uint64_t pc)
{
    int found = -1;
    pthread_mutex_lock(&sites_lock);
    for (unsigned int i = 0; i < n_sites && found < 0; i++)
        if (sites[i].after == pc)
            found = (int)i;
    pthread_mutex_unlock(&sites_lock);
    return found;
}

static uint64_t site_vmrun(uint64_t index)
{
    pthread_mutex_lock(&sites_lock);
    uint64_t pc = index < n_sites ? sites[index].vmrun : 0;
    pthread_mutex_unlock(&sites_lock);
    return pc;
}

static void add_site(uint64_t vmrun, uint64_t after)
{
    if (site_at(after) >= 0)
        return;
    pthread_mutex_lock(&sites_lock);
    if (n_sites < MAX_SITES) {
        sites[n_sites].vmrun = vmrun;
        sites[n_sites++].after = after;
    } else {
        say("kvmiso access record: more than %d VMRUN sites; the one at %#" PRIx64 " opens no window\n",
            MAX_SITES, vmrun);
    }
    pthread_mutex_unlock(&sites_lock);
}

/* --- callbacks, on the vCPU's thread ------------------------------------------------------- */

static void on_access(unsigned int index, qemu_plugin_meminfo_t info, uint64_t addr, void *pc)
{
    struct vcpu *v = vcpu_of(index);
    if (!v || !v->open)
        return;
    if (v->w.n_accesses == cap || __atomic_load_n(&paused, __ATOMIC_RELAXED)) {
        v->w.dropped++;
        return;
    }
    struct access *a = &v->buf[v->w.n_accesses++];
    a->pc = (uint64_t)(uintptr_t)pc;
    a->addr = addr;
    a->size = 1u << qemu_plugin_mem_size_shift(info);
    a->flags = qemu_plugin_mem_is_store(info) ? ACCESS_WRITE : 0;
}

static void on_svm_access(unsigned int index, qemu_plugin_meminfo_t info, uint64_t addr, void *pc)
{
    (void)info, (void)addr, (void)pc;
    struct vcpu *v = vcpu_of(index);
    if (v && v->open)
        v->w.filtered++;
}

static void on_vmrun(unsigned int index, void *pc)
{
    struct vcpu *v = vcpu_of(index);
    if (v && v->open)
        close_window(v, CLOSED_BY_VMRUN, (uint64_t)(uintptr_t)pc);
}

/* A mark (see the top of this file): written as a window of no access, closed by MARK, with
 * the ID where a window's end address is. The window open before it (if any) was closed as
 * the user-mode block holding the NOPs was entered. */
static void on_mark(unsigned int index, void *id)
{
    struct vcpu *v = vcpu_of(index);
    if (!v || !ready(v, index))
        return;
    if (v->open)  /* not expected: the block's own callback ran first */
        close_window(v, CLOSED_BY_USER, 0);
    uint64_t seq = v->w.seq;
    memset(&v->w, 0, sizeof(v->w));
    memcpy(v->w.magic, "WNDW", 4);
    v->w.seq = seq;
    v->open = true;
    close_window(v, MARK, (uint64_t)(uintptr_t)id);
    __atomic_store_n(&paused, ((uint64_t)(uintptr_t)id & MARK_PAUSES) != 0, __ATOMIC_SEQ_CST);
}

/* What entering a block means, packed into its callback's user data (no allocation per
 * translation: QEMU translates the same code again after a flush): the kind in bits 0-1, the
 * block's instruction count in bits 2-11 (QEMU's blocks hold at most 512), and above them the
 * block's address (user blocks) or its VMRUN site's index (resume blocks). */
enum block_kind { KERNEL_BLOCK, USER_BLOCK, RESUME_BLOCK };

static void *block_data(enum block_kind kind, size_t n_insns, uint64_t above)
{
    return (void *)(uintptr_t)(above << 12 | (n_insns < 1023 ? n_insns : 1023) << 2 | kind);
}

static void on_block(unsigned int index, void *data)
{
    uint64_t d = (uintptr_t)data;
    uint64_t n_insns = d >> 2 & 1023, above = d >> 12;
    struct vcpu *v = vcpu_of(index);
    if (!v)
        return;
    switch (d & 3) {
    case RESUME_BLOCK: {
        uint64_t vmrun = site_vmrun(above);
        if (v->open)  /* entered other than through a VMRUN: a window never spans two exits */
            close_window(v, CLOSED_BY_VMRUN, vmrun);
        open_window(index, vmrun, n_insns);
        break;
    }
    case USER_BLOCK:
        if (v->open)
            close_window(v, CLOSED_BY_USER, above);
        break;
    default:
        if (v->open)
            v->w.insns += n_insns;
    }
}

/* --- translation ----------------------------------------------------------------------------- */

/* 0f 01 d8 (VMRUN), da (VMLOAD), db (VMSAVE) after any legacy or REX prefixes; 1 for VMRUN. */
static int svm_state_insn(const uint8_t *p, size_t n)
{
    size_t i = 0;
    while (i < n && (p[i] == 0x66 || p[i] == 0x67 || p[i] == 0xf2 || p[i] == 0xf3 || (p[i] & 0xf0) == 0x40))
        i++;
    if (i + 3 > n || p[i] != 0x0f || p[i + 1] != 0x01)
        return 0;
    return p[i + 2] == 0xd8 ? 1 : (p[i + 2] == 0xda || p[i + 2] == 0xdb) ? 2 : 0;
}

/* The marking NOP's bytes: `nopl 0x494d564b(%rax)`; the next instruction, `nopl ID(%rax)`,
 * carries the mark's ID in the same place. */
static const uint8_t MARK_NOP[7] = {0x0f, 0x1f, 0x80, 0x4b, 0x56, 0x4d, 0x49};

/* Marks in a user-mode block: each gets a callback with its ID. */
static void find_marks(struct qemu_plugin_tb *tb, size_t n)
{
    for (size_t i = 0; i + 1 < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i), *next = qemu_plugin_tb_get_insn(tb, i + 1);
        const uint8_t *p = qemu_plugin_insn_data(insn), *q = qemu_plugin_insn_data(next);
        if (qemu_plugin_insn_size(insn) != sizeof(MARK_NOP) || memcmp(p, MARK_NOP, sizeof(MARK_NOP)) != 0 ||
            qemu_plugin_insn_size(next) != sizeof(MARK_NOP) || memcmp(q, MARK_NOP, 3) != 0)
            continue;
        uint32_t id;
        memcpy(&id, q + 3, sizeof(id));
        qemu_plugin_register_vcpu_insn_exec_cb(next, on_mark, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)id);
    }
}

static void on_translate(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    (void)id;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (n == 0)
        return;
    uint64_t first = qemu_plugin_insn_vaddr(qemu_plugin_tb_get_insn(tb, 0));
    if (first < KERNEL_MIN) {  /* user mode, or L2 at a low address: no access is kept */
        qemu_plugin_register_vcpu_tb_exec_cb(tb, on_block, QEMU_PLUGIN_CB_NO_REGS, block_data(USER_BLOCK, n, first));
        find_marks(tb, n);
        return;
    }
    /* QEMU ends a block after VMRUN, so the instruction after one always starts a block; a
     * VMRUN is translated before the code after it runs, so its site is known by then */
    int site = site_at(first);
    qemu_plugin_register_vcpu_tb_exec_cb(tb, on_block, QEMU_PLUGIN_CB_NO_REGS,
                                         site >= 0 ? block_data(RESUME_BLOCK, n, (uint64_t)site)
                                                   : block_data(KERNEL_BLOCK, n, 0));
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        size_t size = qemu_plugin_insn_size(insn);
        int svm = svm_state_insn(qemu_plugin_insn_data(insn), size);
        if (svm == 1) {
            add_site(pc, pc + size);
            qemu_plugin_register_vcpu_insn_exec_cb(insn, on_vmrun, QEMU_PLUGIN_CB_NO_REGS, (void *)(uintptr_t)pc);
        }
        qemu_plugin_register_vcpu_mem_cb(insn, svm ? on_svm_access : on_access, QEMU_PLUGIN_CB_NO_REGS,
                                         QEMU_PLUGIN_MEM_RW, (void *)(uintptr_t)pc);
    }
}

static void instrument(qemu_plugin_id_t id);

/* Until the first VMRUN: no callback at run time, only the search for VMRUN sites. */
static void on_translate_before_vmrun(qemu_plugin_id_t id, struct qemu_plugin_tb *tb)
{
    static bool resetting;
    size_t n = qemu_plugin_tb_n_insns(tb);
    if (n && qemu_plugin_insn_vaddr(qemu_plugin_tb_get_insn(tb, 0)) < KERNEL_MIN)
        find_marks(tb, n);  /* a mark before the first VMRUN is kept too */
    for (size_t i = 0; i < n; i++) {
        struct qemu_plugin_insn *insn = qemu_plugin_tb_get_insn(tb, i);
        uint64_t pc = qemu_plugin_insn_vaddr(insn);
        size_t size = qemu_plugin_insn_size(insn);
        if (pc >= KERNEL_MIN && svm_state_insn(qemu_plugin_insn_data(insn), size) == 1) {
            add_site(pc, pc + size);
            /* QEMU resets at the vCPU's next safe point, before the nested guest exits */
            if (!__atomic_exchange_n(&resetting, true, __ATOMIC_SEQ_CST))
                qemu_plugin_reset(id, instrument);
        }
    }
}

static void on_qemu_exit(qemu_plugin_id_t id, void *data)
{
    (void)id;
    (void)data;
    for (unsigned int i = 0; i < n_vcpus; i++) {
        struct vcpu *v = &vcpus[i];
        if (v->open && v->out)
            close_window(v, OPEN_AT_END, 0);
        if (v->out)
            fclose(v->out);
        v->out = NULL;
    }
}

/* The reset's end: every block from now on is translated with the record's callbacks. */
static void instrument(qemu_plugin_id_t id)
{
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate);
    qemu_plugin_register_atexit_cb(id, on_qemu_exit, NULL);
}

EXPORT int qemu_plugin_install(qemu_plugin_id_t id, const qemu_info_t *info, int argc, char **argv)
{
    for (int i = 0; i < argc; i++) {
        char *end;
        if (!strncmp(argv[i], "dir=", 4)) {
            dir = argv[i] + 4;
        } else if (!strncmp(argv[i], "cap=", 4)) {
            unsigned long v = strtoul(argv[i] + 4, &end, 10);
            if (*end || v == 0 || v > UINT32_MAX / sizeof(struct access)) {
                say("kvmiso access record: cap=%s is not a count from 1 to %zu\n", argv[i] + 4,
                    UINT32_MAX / sizeof(struct access));
                return -1;
            }
            cap = (uint32_t)v;
        } else {
            say("kvmiso access record: unknown argument %s (dir=DIR, cap=N)\n", argv[i]);
            return -1;
        }
    }
    if (!dir) {
        say("kvmiso access record: no dir=DIR given\n");
        return -1;
    }
    if (!info->system_emulation || strcmp(info->target_name, "x86_64") != 0) {
        say("kvmiso access record: needs qemu-system-x86_64, not %s%s\n", info->target_name,
            info->system_emulation ? "" : " in user mode");
        return -1;
    }
    api = info->version.cur;
    n_vcpus = info->system.max_vcpus > 0 ? (unsigned int)info->system.max_vcpus : 1;
    vcpus = calloc(n_vcpus, sizeof(*vcpus));
    if (!vcpus)
        return -1;
    qemu_plugin_register_vcpu_tb_trans_cb(id, on_translate_before_vmrun);
    return 0;
}
