/*
 * kvmbox-atomics: shared-memory atomics across CPUs, for the kit's `kvmbox.run=atomics`.
 *
 *   kvmbox-atomics [ITERATIONS]      (default 1000000 per worker)
 *
 * Maps shared anonymous memory (MAP_SHARED|MAP_ANONYMOUS), forks 2 workers, pins worker w to
 * CPU w (sched_setaffinity), lines them up at a barrier (plain flags), and has each do ITERATIONS rounds of
 * locked read-modify-writes on shared counters (each instruction written out in inline asm, so
 * the compiler cannot pick another form):
 *   xadd        lock xadd (64-bit); its old values also show whether the workers interleaved
 *   cas         lock cmpxchg retry loop incrementing a 64-bit counter
 *   cmpxchg_lock  a plain (non-atomic) increment under a spinlock taken with lock cmpxchg
 *   xchg_lock   a plain increment under a spinlock taken with xchg (implicitly locked)
 *   orphaned_locks  spinlocks found set while neither worker held one (see acquire(): a
 *               broken locked instruction can do that, and both workers would spin forever;
 *               instead the run stops and fails with bad=orphaned_locks, the other counters
 *               of the unfinished rounds not compared)
 *   inc         lock inc (64-bit)
 *   add32       lock add $3 (32-bit)
 *   sub16       lock sub $1 (16-bit, wraps: checked modulo 2^16)
 *   orand_errors  lock or sets the worker's own bit of a shared word, lock and clears it; a
 *               read after each must see that bit as the worker left it (a lost update of the
 *               other worker's non-atomic write would show here)
 *   btsr_errors lock bts / lock btr on the worker's own bit: CF (the old bit) must be 0 / 1
 *   cx8         lock cmpxchg8b retry loop (64-bit)
 *   cx16        lock cmpxchg16b retry loop on a 16-byte pair (low += 1, high += 2)
 *   split_line  lock xadd on a 64-bit counter that crosses a 64-byte cache line
 *   split_page  lock xadd on a 64-bit counter that crosses a 4 KiB page
 *   racy        a plain add without LOCK: expected to LOSE updates on real SMP (reported only)
 * then the parent checks every counter is exactly 2 * ITERATIONS (scaled as above) and prints
 * one line on stdout:
 *   KVMBOX-ATOMICS ok workers=2 iterations=N xadd=... ... cpus_used=0,1 w0_cpus=0 w1_cpus=1
 *     interleaved=... cas_retries=... spins=... racy=... seconds=...
 * or the same line with FAIL and `bad=<names of the wrong counters>`. wN_cpus lists every CPU
 * worker N was seen on (sched_getcpu after pinning and every 64 rounds), cpus_used all of
 * them; interleaved counts the
 * xadds whose old value was not the worker's previous one + 1 (the other worker had added in
 * between), i.e. evidence that the two really ran at the same time.
 * Exit status: 0 ok, 1 a counter is wrong, 2 the program could not set up (a message on stderr
 * and a FAIL line saying why).
 *
 * Build: gcc -O2 -static -o kvmbox-atomics atomics.c (x86-64 only).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 2
#define LINE 64
#define PAGE 4096

/* One counter per cache line, so each instruction's contention is its own. */
union line {
    _Alignas(LINE) uint64_t v[LINE / 8];
    uint32_t w[LINE / 4];
    uint16_t h[LINE / 2];
    unsigned char b[LINE];
};

struct shared {
    union line xadd, cas, cmpxchg_lock, cmpxchg_plain, xchg_lock, xchg_plain, inc, add32, sub16,
        orand, btsr, cx8, cx16, racy;
    union line ready[WORKERS];  /* the start barrier: plain flags, so it needs no atomics */
    union line failed[WORKERS]; /* failed lock attempts of each worker (see acquire) */
    union line abort;           /* set by a worker that found a lock nobody holds */
    union line split; /* a counter at offset 60: bytes 60..67 cross into the next line */
    union line split_next;
    struct {
        uint64_t interleaved, cas_retries, spins, orand_errors, btsr_errors, orphaned, cpus;
        int pin_errno;
    } w[WORKERS];
};

/* The page-crossing counter: the last 4 bytes of page 1 and the first 4 of page 2 of the map. */
#define SPLIT_PAGE_OFF (2 * PAGE - 4)
#define MAP_LEN (4 * PAGE)

static inline uint64_t lock_xadd64(volatile uint64_t *p, uint64_t v)
{
    __asm__ volatile("lock xaddq %0, %1" : "+r"(v), "+m"(*p) : : "memory", "cc");
    return v;
}

static inline uint64_t lock_cmpxchg64(volatile uint64_t *p, uint64_t old, uint64_t new)
{
    __asm__ volatile("lock cmpxchgq %2, %1" : "+a"(old), "+m"(*p) : "r"(new) : "memory", "cc");
    return old; /* the value found */
}

static inline uint32_t lock_cmpxchg32(volatile uint32_t *p, uint32_t old, uint32_t new)
{
    __asm__ volatile("lock cmpxchgl %2, %1" : "+a"(old), "+m"(*p) : "r"(new) : "memory", "cc");
    return old;
}

static inline uint32_t xchg32(volatile uint32_t *p, uint32_t v)
{
    __asm__ volatile("xchgl %0, %1" : "+r"(v), "+m"(*p) : : "memory");
    return v;
}

static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }

/* Release: a plain store (x86 is TSO), as Linux's spin_unlock. */
static inline void unlock32(volatile uint32_t *p)
{
    __asm__ volatile("" ::: "memory");
    *p = 0;
}

/* A plain, deliberately non-atomic increment (load, add, store). */
static inline void plain_inc(volatile uint64_t *p) { *p = *p + 1; }

/* 1 if the 8-byte compare-exchange succeeded; *expect gets the value found. */
static inline int lock_cmpxchg8b(volatile uint64_t *p, uint64_t *expect, uint64_t new)
{
    uint32_t lo = (uint32_t)*expect, hi = (uint32_t)(*expect >> 32);
    unsigned char ok;
    __asm__ volatile("lock cmpxchg8b %1\n\tsete %0"
                     : "=q"(ok), "+m"(*p), "+a"(lo), "+d"(hi)
                     : "b"((uint32_t)new), "c"((uint32_t)(new >> 32))
                     : "memory", "cc");
    *expect = ((uint64_t)hi << 32) | lo;
    return ok;
}

static inline int lock_cmpxchg16b(volatile uint64_t *p, uint64_t *lo, uint64_t *hi, uint64_t nlo,
                                  uint64_t nhi)
{
    unsigned char ok;
    __asm__ volatile("lock cmpxchg16b %1\n\tsete %0"
                     : "=q"(ok), "+m"(*(volatile __int128 *)p), "+a"(*lo), "+d"(*hi)
                     : "b"(nlo), "c"(nhi)
                     : "memory", "cc");
    return ok;
}

/*
 * Take a spinlock (with lock cmpxchg 0 -> 1, or with xchg); 0 once taken, 1 if the run is to
 * stop. A broken (non-atomic) locked instruction can leave a lock set that nobody holds: a
 * failing cmpxchg or xchg that writes back a stale 1 after the holder's release. The workers
 * would then spin forever, so each one counts its failed attempts in shared memory, and a
 * spinning worker that sees the other fail twice after it began to spin knows that a lock was
 * set while neither of the two held one (locks are never nested, so a spinning worker holds
 * none): it sets `orphaned`, raises `abort` and both stop. On a correct CPU this never happens
 * (no timing involved).
 */
static int acquire(struct shared *s, int w, int use_xchg, volatile uint32_t *lock,
                   uint64_t *spins)
{
    volatile uint64_t *mine = &s->failed[w].v[0], *theirs = &s->failed[1 - w].v[0];
    uint64_t start = 0;
    int spinning = 0;
    for (;;) {
        uint32_t was = use_xchg ? xchg32(lock, 1) : lock_cmpxchg32(lock, 0, 1);
        if (was == 0) {
            return 0;
        }
        *mine = *mine + 1;
        (*spins)++;
        if (!spinning) {
            start = *theirs;
            spinning = 1;
        } else if (*theirs >= start + 2) {
            s->w[w].orphaned++;
            s->abort.v[0] = 1;
            return 1;
        }
        if (s->abort.v[0]) {
            return 1;
        }
        cpu_relax();
    }
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec / 1e9;
}

static void worker(struct shared *s, volatile unsigned char *map, int w, uint64_t iters)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(w, &set);
    if (sched_setaffinity(0, sizeof set, &set) != 0) {
        s->w[w].pin_errno = errno ? errno : -1;
    }
    int cpu = sched_getcpu();
    if (cpu >= 0) {
        s->w[w].cpus |= 1ull << (cpu & 63);
    }

    volatile uint64_t *xadd = &s->xadd.v[0], *cas = &s->cas.v[0], *inc = &s->inc.v[0];
    volatile uint32_t *lock1 = &s->cmpxchg_lock.w[0];
    volatile uint32_t *lock2 = &s->xchg_lock.w[0];
    volatile uint64_t *plain1 = &s->cmpxchg_plain.v[0], *plain2 = &s->xchg_plain.v[0];
    volatile uint32_t *add32 = &s->add32.w[0];
    volatile uint16_t *sub16 = &s->sub16.h[0];
    volatile uint64_t *orand = &s->orand.v[0], *btsr = &s->btsr.v[0];
    volatile uint64_t *cx8 = &s->cx8.v[0], *cx16 = &s->cx16.v[0];
    volatile uint64_t *racy = &s->racy.v[0];
    volatile uint64_t *split = (volatile uint64_t *)&s->split.b[60];
    volatile uint64_t *split_page = (volatile uint64_t *)(map + SPLIT_PAGE_OFF);
    uint64_t bit = 1ull << (w * 8 + 3), bitno = w * 8 + 5;
    uint64_t interleaved = 0, cas_retries = 0, spins = 0, orand_errors = 0, btsr_errors = 0;
    uint64_t prev = 0;

    /* Start together: otherwise the first worker may be done before the second has forked. */
    s->ready[w].v[0] = 1;
    for (int o = 0; o < WORKERS; o++) {
        while (!s->ready[o].v[0]) {
            cpu_relax();
        }
    }

    for (uint64_t i = 0; i < iters && !s->abort.v[0]; i++) {
        uint64_t old = lock_xadd64(xadd, 1);
        if (i > 0 && old != prev + 1) {
            interleaved++;
        }
        prev = old;

        uint64_t v = *cas;
        for (;;) {
            uint64_t seen = lock_cmpxchg64(cas, v, v + 1);
            if (seen == v) {
                break;
            }
            v = seen;
            cas_retries++;
        }

        if (acquire(s, w, 0, lock1, &spins)) {
            break;
        }
        plain_inc(plain1);
        unlock32(lock1);

        if (acquire(s, w, 1, lock2, &spins)) {
            break;
        }
        plain_inc(plain2);
        unlock32(lock2);

        __asm__ volatile("lock incq %0" : "+m"(*inc) : : "memory", "cc");
        __asm__ volatile("lock addl $3, %0" : "+m"(*add32) : : "memory", "cc");
        __asm__ volatile("lock subw $1, %0" : "+m"(*sub16) : : "memory", "cc");

        __asm__ volatile("lock orq %1, %0" : "+m"(*orand) : "r"(bit) : "memory", "cc");
        if (!(*orand & bit)) {
            orand_errors++;
        }
        __asm__ volatile("lock andq %1, %0" : "+m"(*orand) : "r"(~bit) : "memory", "cc");
        if (*orand & bit) {
            orand_errors++;
        }

        unsigned char cf;
        __asm__ volatile("lock btsq %2, %0\n\tsetc %1"
                         : "+m"(*btsr), "=q"(cf)
                         : "r"(bitno)
                         : "memory", "cc");
        if (cf != 0) {
            btsr_errors++;
        }
        __asm__ volatile("lock btrq %2, %0\n\tsetc %1"
                         : "+m"(*btsr), "=q"(cf)
                         : "r"(bitno)
                         : "memory", "cc");
        if (cf != 1) {
            btsr_errors++;
        }

        uint64_t e8 = *cx8;
        while (!lock_cmpxchg8b(cx8, &e8, e8 + 1)) {
            cas_retries++;
        }

        uint64_t lo = cx16[0], hi = cx16[1];
        while (!lock_cmpxchg16b(cx16, &lo, &hi, lo + 1, hi + 2)) {
            cas_retries++;
        }

        lock_xadd64(split, 1);
        lock_xadd64(split_page, 1);

        __asm__ volatile("addq $1, %0" : "+m"(*racy) : : "memory", "cc");

        if ((i & 63) == 0) {
            int c = sched_getcpu();
            if (c >= 0) {
                s->w[w].cpus |= 1ull << (c & 63);
            }
        }
    }
    s->w[w].interleaved = interleaved;
    s->w[w].cas_retries = cas_retries;
    s->w[w].spins = spins;
    s->w[w].orand_errors = orand_errors;
    s->w[w].btsr_errors = btsr_errors;
}

/* "0,1": the CPUs set in `mask` (CPUs 0-63). */
static void cpu_list(char *out, size_t size, uint64_t mask)
{
    out[0] = 0;
    for (int cpu = 0; cpu < 64; cpu++) {
        if (mask & (1ull << cpu)) {
            size_t u = strlen(out);
            snprintf(out + u, size - u, "%s%d", u ? "," : "", cpu);
        }
    }
}

int main(int argc, char **argv)
{
    uint64_t iters = 1000000;
    if (argc > 2) {
        fprintf(stderr, "usage: kvmbox-atomics [ITERATIONS]\n");
        return 2;
    }
    if (argc == 2) {
        char *end;
        errno = 0;
        unsigned long long n = strtoull(argv[1], &end, 10);
        if (errno || *end || end == argv[1] || n == 0 || n > (1ull << 40)) {
            fprintf(stderr, "kvmbox-atomics: ITERATIONS must be a number from 1 to 2^40, not '%s'\n",
                    argv[1]);
            return 2;
        }
        iters = n;
    }
    setvbuf(stdout, NULL, _IONBF, 0);
    long online = sysconf(_SC_NPROCESSORS_ONLN);
    if (online < WORKERS) {
        printf("KVMBOX-ATOMICS FAIL setup: %ld CPU(s) online, need %d\n", online, WORKERS);
        return 2;
    }
    unsigned char *map =
        mmap(NULL, MAP_LEN, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (map == MAP_FAILED) {
        printf("KVMBOX-ATOMICS FAIL setup: mmap: %s\n", strerror(errno));
        return 2;
    }
    struct shared *s = (struct shared *)map;
    _Static_assert(sizeof(struct shared) <= PAGE, "struct shared fits in the first page");

    double t0 = now();
    pid_t pid[WORKERS];
    for (int w = 0; w < WORKERS; w++) {
        pid[w] = fork();
        if (pid[w] < 0) {
            printf("KVMBOX-ATOMICS FAIL setup: fork: %s\n", strerror(errno));
            return 2;
        }
        if (pid[w] == 0) {
            worker(s, map, w, iters);
            _exit(0);
        }
    }
    int died = 0;
    for (int w = 0; w < WORKERS; w++) {
        int st;
        if (waitpid(pid[w], &st, 0) != pid[w] || !WIFEXITED(st) || WEXITSTATUS(st) != 0) {
            died = 1;
        }
    }
    double secs = now() - t0;
    if (died) {
        printf("KVMBOX-ATOMICS FAIL setup: a worker did not exit with status 0\n");
        return 2;
    }
    for (int w = 0; w < WORKERS; w++) {
        if (s->w[w].pin_errno) {
            printf("KVMBOX-ATOMICS FAIL setup: sched_setaffinity(CPU %d): %s\n", w,
                   strerror(s->w[w].pin_errno));
            return 2;
        }
    }

    uint64_t n = WORKERS * iters;
    uint64_t split_page = *(volatile uint64_t *)(map + SPLIT_PAGE_OFF);
    uint64_t split_line = *(volatile uint64_t *)&s->split.b[60];
    uint64_t orand_errors = 0, btsr_errors = 0, interleaved = 0, cas_retries = 0, spins = 0;
    uint64_t orphaned = 0;
    uint64_t cpus = 0;
    for (int w = 0; w < WORKERS; w++) {
        orand_errors += s->w[w].orand_errors;
        btsr_errors += s->w[w].btsr_errors;
        interleaved += s->w[w].interleaved;
        cas_retries += s->w[w].cas_retries;
        spins += s->w[w].spins;
        orphaned += s->w[w].orphaned;
        cpus |= s->w[w].cpus;
    }
    struct {
        const char *name;
        uint64_t got, want;
    } c[] = {
        {"xadd", s->xadd.v[0], n},
        {"cas", s->cas.v[0], n},
        {"cmpxchg_lock", s->cmpxchg_plain.v[0], n},
        {"xchg_lock", s->xchg_plain.v[0], n},
        {"inc", s->inc.v[0], n},
        {"add32", s->add32.w[0], (uint32_t)(3 * n)},
        {"sub16", s->sub16.h[0], (uint16_t)(0 - n)},
        {"orand_errors", orand_errors + s->orand.v[0], 0},
        {"btsr_errors", btsr_errors + s->btsr.v[0], 0},
        {"orphaned_locks", orphaned, 0},
        {"cx8", s->cx8.v[0], n},
        {"cx16", s->cx16.v[0], n},
        {"cx16_hi", s->cx16.v[1], 2 * n},
        {"split_line", split_line, n},
        {"split_page", split_page, n},
    };
    char bad[512] = "";
    char line[2048];
    int len = 0;
    for (size_t i = 0; i < sizeof c / sizeof c[0]; i++) {
        len += snprintf(line + len, sizeof line - len, " %s=%llu", c[i].name,
                        (unsigned long long)c[i].got);
        /* A stopped run (orphaned lock) did not finish its rounds: only that is reported. */
        if (c[i].got != c[i].want && (!orphaned || !strcmp(c[i].name, "orphaned_locks"))) {
            size_t b = strlen(bad);
            snprintf(bad + b, sizeof bad - b, "%s%s", b ? "," : "", c[i].name);
        }
    }
    char used[3][200];
    cpu_list(used[0], sizeof used[0], cpus);
    cpu_list(used[1], sizeof used[1], s->w[0].cpus);
    cpu_list(used[2], sizeof used[2], s->w[1].cpus);
    printf("KVMBOX-ATOMICS %s workers=%d iterations=%llu%s cpus_used=%s w0_cpus=%s w1_cpus=%s "
           "interleaved=%llu cas_retries=%llu spins=%llu racy=%llu seconds=%.2f%s%s\n",
           bad[0] ? "FAIL" : "ok", WORKERS, (unsigned long long)iters, line, used[0], used[1],
           used[2], (unsigned long long)interleaved, (unsigned long long)cas_retries,
           (unsigned long long)spins, (unsigned long long)s->racy.v[0], secs,
           bad[0] ? " bad=" : "", bad);
    return bad[0] ? 1 : 0;
}
