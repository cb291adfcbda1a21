#define _GNU_SOURCE
#include "AllocationCounter.h"
#include <errno.h>
#include <stdatomic.h>
#include <stddef.h>
#include <execinfo.h>
#include <stdlib.h>
#include <dlfcn.h>
#include <string.h>

// glibc's real allocator entry points.
extern void *__libc_malloc(size_t);
extern void *__libc_calloc(size_t, size_t);
extern void *__libc_realloc(void *, size_t);
extern void *__libc_memalign(size_t, size_t);
extern void __libc_free(void *);

static atomic_int counting;
static atomic_llong allocations;

static atomic_llong openblas_allocations;
static _Thread_local int tracing;

/// Whether the calling stack passes through OpenBLAS (whose threaded dispatch and small-matrix
/// kernels allocate on their own).
static int called_from_openblas(void) {
    void *frames[24];
    int n = backtrace(frames, 24);
    for (int i = 0; i < n; i++) {
        Dl_info info;
        if (dladdr(frames[i], &info) && info.dli_fname && strstr(info.dli_fname, "openblas")) return 1;
    }
    return 0;
}

static inline void note(void) {
    if (atomic_load_explicit(&counting, memory_order_relaxed) && !tracing) {
        tracing = 1;
        atomic_fetch_add_explicit(&allocations, 1, memory_order_relaxed);
        if (called_from_openblas()) atomic_fetch_add_explicit(&openblas_allocations, 1, memory_order_relaxed);
        // KFAC_ALLOCATION_TRACE=1 prints where each counted allocation comes from.
        if (getenv("KFAC_ALLOCATION_TRACE")) {
            void *frames[12];
            int n = backtrace(frames, 12);
            backtrace_symbols_fd(frames, n, 2);
        }
        tracing = 0;
    }
}

void allocation_counter_start(void) {
    // backtrace() loads its unwinder (allocating) on first use: do that before counting.
    static int warmed;
    if (!warmed) {
        void *frames[2];
        backtrace(frames, 2);
        warmed = 1;
    }
    atomic_store(&allocations, 0);
    atomic_store(&openblas_allocations, 0);
    atomic_store(&counting, 1);
}

int64_t allocation_counter_openblas(void) {
    return atomic_load(&openblas_allocations);
}

int64_t allocation_counter_stop(void) {
    atomic_store(&counting, 0);
    return atomic_load(&allocations);
}

void *malloc(size_t n) { note(); return __libc_malloc(n); }
void *calloc(size_t c, size_t n) { note(); return __libc_calloc(c, n); }
void *realloc(void *p, size_t n) { note(); return __libc_realloc(p, n); }
void free(void *p) { __libc_free(p); }
void *memalign(size_t a, size_t n) { note(); return __libc_memalign(a, n); }
void *aligned_alloc(size_t a, size_t n) { note(); return __libc_memalign(a, n); }
int posix_memalign(void **out, size_t a, size_t n) {
    note();
    void *p = __libc_memalign(a, n);
    if (!p) return ENOMEM;
    *out = p;
    return 0;
}
