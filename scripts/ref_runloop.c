/*
 * The reference: a plain C program that times KVM_RUN round trips for a port OUT, with no
 * kvmiso in it. It builds the same guest the harness's bench_out payload is (long mode,
 * identity-mapped, `1: out %al,$0x10; jmp 1b` at CPL0 or CPL3, an I/O bitmap allowing every
 * port) and times each KVM_RUN exactly as kvmiso/bench/runloop.c does: CLOCK_MONOTONIC and
 * LFENCE;RDTSC right before and after the ioctl. scripts/ref_runloop.py builds and runs it
 * beside kvmiso's compiled loop and Python API, in the same run.
 *
 *   ref_runloop [-n samples] [-w warmup] [-c 0|3]    prints one line of JSON
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#include <x86intrin.h>

#define MEM_SIZE   (2u << 20)
#define CODE       0x8000
#define GDT        0x10000
#define PML4       0x12000
#define PDPT       0x13000
#define PD         0x14000
#define TSS        0x18000
#define TSS_IOMAP  0x68
#define TSS_LIMIT  (TSS_IOMAP + 65536 / 8)
#define PORT       0x10

#define CHECK(expr) do { if ((long)(expr) < 0) { perror(#expr); exit(1); } } while (0)

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

static uint64_t tsc(void)
{
    _mm_lfence();
    return __rdtsc();
}

static uint64_t desc(uint32_t base, uint32_t limit, int type, int s, int dpl, int l, int db, int g)
{
    uint64_t access = type | s << 4 | dpl << 5 | 1 << 7, flags = l << 1 | db << 2 | g << 3;
    return (limit & 0xffff) | (uint64_t)(base & 0xffffff) << 16 | access << 40 |
           (uint64_t)((limit >> 16) & 0xf) << 48 | flags << 52 | (uint64_t)(base >> 24) << 56;
}

static struct kvm_segment seg(uint16_t sel, int type, int s, int l, int db, int dpl)
{
    struct kvm_segment sg = { .base = 0, .limit = 0xffffffff, .selector = sel, .type = type,
                              .present = 1, .dpl = dpl, .db = db, .s = s, .l = l, .g = 1 };
    return sg;
}

static int cmp_u64(const void *a, const void *b)
{
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return x < y ? -1 : x > y;
}

int main(int argc, char **argv)
{
    long n = 20000, warmup = 2000;
    int cpl = 0, opt;
    while ((opt = getopt(argc, argv, "n:w:c:")) != -1) {
        if (opt == 'n') n = atol(optarg);
        else if (opt == 'w') warmup = atol(optarg);
        else if (opt == 'c') cpl = atoi(optarg);
        else { fprintf(stderr, "usage: %s [-n samples] [-w warmup] [-c 0|3]\n", argv[0]); return 2; }
    }
    if (n < 1 || (cpl != 0 && cpl != 3)) { fprintf(stderr, "bad arguments\n"); return 2; }

    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    CHECK(kvm);
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    CHECK(vm);
    uint8_t *mem = mmap(NULL, MEM_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) { perror("mmap"); return 1; }
    struct kvm_userspace_memory_region region = { .slot = 0, .guest_phys_addr = 0,
                                                  .memory_size = MEM_SIZE, .userspace_addr = (uintptr_t)mem };
    CHECK(ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region));

    static const uint8_t code[] = { 0xe6, PORT, 0xeb, 0xfc };  /* 1: out %al,$0x10; jmp 1b */
    memcpy(mem + CODE, code, sizeof(code));
    uint64_t *gdt = (uint64_t *)(mem + GDT);
    gdt[1] = desc(0, 0xfffff, 0xb, 1, 0, 1, 0, 1);  /* 0x08 code64 */
    gdt[2] = desc(0, 0xfffff, 0x3, 1, 0, 0, 1, 1);  /* 0x10 data */
    gdt[4] = desc(0, 0xfffff, 0x3, 1, 3, 0, 1, 1);  /* 0x20 user data */
    gdt[5] = desc(0, 0xfffff, 0xb, 1, 3, 1, 0, 1);  /* 0x28 user code64 */
    gdt[6] = desc(TSS, TSS_LIMIT, 0x9, 0, 0, 0, 0, 0);  /* 0x30 TSS (upper half 0) */
    *(uint64_t *)(mem + PML4) = PDPT | 7;
    *(uint64_t *)(mem + PDPT) = PD | 7;
    for (int i = 0; i < 512; i++)
        ((uint64_t *)(mem + PD))[i] = ((uint64_t)i << 21) | 0x87;  /* P RW US PS */
    *(uint16_t *)(mem + TSS + 0x66) = TSS_IOMAP;  /* a zero bitmap: every port allowed */
    *(uint64_t *)(mem + TSS + 4) = MEM_SIZE;      /* RSP0 */
    mem[TSS + TSS_LIMIT] = 0xff;

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    CHECK(vcpu);
    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = nent;
    CHECK(ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid));
    CHECK(ioctl(vcpu, KVM_SET_CPUID2, cpuid));  /* long mode needs CPUID.LM in the guest's CPUID */
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    CHECK(run_size);
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED) { perror("mmap kvm_run"); return 1; }

    struct kvm_sregs sregs;
    CHECK(ioctl(vcpu, KVM_GET_SREGS, &sregs));
    sregs.gdt.base = GDT;
    sregs.gdt.limit = 8 * 8 - 1;
    sregs.tr = (struct kvm_segment){ .base = TSS, .limit = TSS_LIMIT, .selector = 0x30, .type = 0xb, .present = 1 };
    sregs.ldt = (struct kvm_segment){ .type = 2, .present = 1, .unusable = 1 };
    sregs.cr0 = 1 | 2 | 0x10 | 0x20 | (1u << 16) | (1u << 31);  /* PE MP ET NE WP PG */
    sregs.cr3 = PML4;
    sregs.cr4 = (1 << 5) | (1 << 9) | (1 << 10);                 /* PAE OSFXSR OSXMMEXCPT */
    sregs.efer = (1 << 8) | (1 << 10) | (1 << 11);               /* LME LMA NXE */
    sregs.cs = cpl ? seg(0x28 | 3, 0xb, 1, 1, 0, 3) : seg(0x08, 0xb, 1, 1, 0, 0);
    struct kvm_segment data = cpl ? seg(0x20 | 3, 0x3, 1, 0, 1, 3) : seg(0x10, 0x3, 1, 0, 1, 0);
    sregs.ds = sregs.es = sregs.fs = sregs.gs = sregs.ss = data;
    CHECK(ioctl(vcpu, KVM_SET_SREGS, &sregs));
    struct kvm_regs regs = { .rip = CODE, .rflags = 2, .rsp = MEM_SIZE - 0x4000 };
    CHECK(ioctl(vcpu, KVM_SET_REGS, &regs));

    uint64_t *lat = calloc(n, sizeof(*lat)), *cyc = calloc(n, sizeof(*cyc));
    for (long i = -warmup; i < n; i++) {
        uint64_t t0 = now_ns(), c0 = tsc();
        int r = ioctl(vcpu, KVM_RUN, 0);
        uint64_t c1 = tsc(), t1 = now_ns();
        if (r < 0) {
            if (errno == EINTR) { i--; continue; }
            perror("KVM_RUN");
            return 1;
        }
        if (run->exit_reason != KVM_EXIT_IO || run->io.port != PORT) {
            fprintf(stderr, "unexpected exit %u\n", run->exit_reason);
            return 1;
        }
        if (i >= 0) {
            lat[i] = t1 - t0;
            cyc[i] = c1 - c0;
        }
    }
    double mean = 0;
    for (long i = 0; i < n; i++)
        mean += lat[i];
    mean /= n;
    qsort(lat, n, sizeof(*lat), cmp_u64);
    qsort(cyc, n, sizeof(*cyc), cmp_u64);
    /* p50 as the harness computes it: linear interpolation between the closest ranks */
    double pos = (n - 1) * 0.5;
    long lo = (long)pos, hi = lo + 1 < n ? lo + 1 : lo;
    double p50 = lat[lo] + (lat[hi] - lat[lo]) * (pos - lo);
    printf("{\"n\": %ld, \"cpl\": %d, \"min_ns\": %lu, \"p50_ns\": %.1f, \"mean_ns\": %.1f, \"p50_cycles\": %lu}\n",
           n, cpl, (unsigned long)lat[0], p50, mean, (unsigned long)cyc[n / 2]);
    return 0;
}
