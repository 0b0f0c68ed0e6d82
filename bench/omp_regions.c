/* Counts OpenMP parallel regions and the time spent in them, for bench.step7_profile --regions.
 *
 * Preloaded (LD_PRELOAD) ahead of libgomp, the OpenMP runtime that torch, oneDNN and step 7's
 * C++ kernels share: every `#pragma omp parallel` becomes a call to GOMP_parallel (or one of
 * its loop forms), which this file defines, counts and times, then hands to libgomp's own.
 * A region's time is its whole call: the fork, the work on every thread, the join.
 * `omp_regions_empty(n)` times n regions that do nothing: the fork and join alone;
 * `omp_regions_masters()` counts the threads that opened a region (each has a team of its own).
 * With OMP_REGIONS_REPORT=path, the process writes "regions masters" there as it exits. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

typedef void (*body_fn)(void *);
static atomic_long regions, region_ns;
#define MASTERS 64
static atomic_long masters[MASTERS]; /* the thread ids that opened a region, 0: free */

static void note_master(void) {
    static __thread int noted;
    if (noted) return;
    noted = 1;
    long tid = syscall(SYS_gettid);
    for (int i = 0; i < MASTERS; i++) {
        long seen = 0;
        if (atomic_compare_exchange_strong(&masters[i], &seen, tid) || seen == tid) return;
    }
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void *real(const char *name) {
    void *f = dlsym(RTLD_NEXT, name);
    if (!f) { /* torch loads libgomp with RTLD_LOCAL: ask for it by its soname */
        void *lib = dlopen("libgomp.so.1", RTLD_NOW | RTLD_NOLOAD);
        f = lib ? dlsym(lib, name) : NULL;
    }
    if (!f) {
        fprintf(stderr, "omp_regions: no %s in libgomp\n", name);
        abort();
    }
    return f;
}

#define TIMED(call)                                    \
    do {                                               \
        note_master();                                 \
        long began = now_ns();                         \
        call;                                          \
        atomic_fetch_add(&region_ns, now_ns() - began); \
        atomic_fetch_add(&regions, 1);                 \
    } while (0)

void GOMP_parallel(body_fn fn, void *data, unsigned threads, unsigned flags) {
    static void (*f)(body_fn, void *, unsigned, unsigned);
    if (!f) f = real("GOMP_parallel");
    TIMED(f(fn, data, threads, flags));
}

#define LOOP(name)                                                                        \
    void name(body_fn fn, void *data, unsigned threads, long start, long end, long incr, \
              long chunk, unsigned flags) {                                              \
        static void (*f)(body_fn, void *, unsigned, long, long, long, long, unsigned);  \
        if (!f) f = real(#name);                                                         \
        TIMED(f(fn, data, threads, start, end, incr, chunk, flags));                     \
    }
LOOP(GOMP_parallel_loop_static)
LOOP(GOMP_parallel_loop_dynamic)
LOOP(GOMP_parallel_loop_guided)
LOOP(GOMP_parallel_loop_nonmonotonic_dynamic)
LOOP(GOMP_parallel_loop_nonmonotonic_guided)

void GOMP_parallel_loop_runtime(body_fn fn, void *data, unsigned threads, long start, long end,
                                long incr, unsigned flags) {
    static void (*f)(body_fn, void *, unsigned, long, long, long, unsigned);
    if (!f) f = real("GOMP_parallel_loop_runtime");
    TIMED(f(fn, data, threads, start, end, incr, flags));
}

long omp_regions_count(void) { return atomic_load(&regions); }
long omp_regions_ns(void) { return atomic_load(&region_ns); }

long omp_regions_masters(void) {
    long n = 0;
    for (int i = 0; i < MASTERS; i++) n += atomic_load(&masters[i]) != 0;
    return n;
}

__attribute__((destructor)) static void report(void) {
    const char *path = getenv("OMP_REGIONS_REPORT");
    FILE *f = path ? fopen(path, "w") : NULL;
    if (!f) return;
    fprintf(f, "%ld %ld\n", omp_regions_count(), omp_regions_masters());
    fclose(f);
}

static void nothing(void *data) { (void)data; }

/* ns per region that does nothing, on `threads` threads (the fork and the join), over n. */
double omp_regions_empty(long n, unsigned threads) {
    static void (*f)(body_fn, void *, unsigned, unsigned);
    if (!f) f = real("GOMP_parallel");
    long began = now_ns();
    for (long i = 0; i < n; i++) f(nothing, NULL, threads, 0);
    return (double)(now_ns() - began) / n;
}
