/*
 * common.h — small utilities shared by the C examples: allocation, libkfac error checks, a
 * seedable random generator, a clock and the digits data (data/digits.bin).
 */
#ifndef KFAC_EXAMPLE_COMMON_H
#define KFAC_EXAMPLE_COMMON_H

#include <kfac.h>

#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

/* calloc that exits with a message instead of returning NULL. */
void *xcalloc(size_t count, size_t size);

/* Aborts the program with libkfac's message if a kfac_* call failed. */
#define KFAC_CHECK(opt, call)                                                                  \
    do {                                                                                       \
        int kfac_check_status_ = (call);                                                       \
        if (kfac_check_status_ != KFAC_OK) {                                                   \
            fprintf(stderr, "%s:%d: %s failed: %s (%d): %s\n", __FILE__, __LINE__, #call,      \
                    kfac_status_string(kfac_check_status_), kfac_check_status_,                \
                    kfac_last_error(opt));                                                     \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

/* splitmix64: a small, seedable generator (no dependence on the C library's rand()). */
typedef struct { uint64_t state; } rng_t;

uint64_t rng_next(rng_t *r);
/* Uniform in [0, 1) with 24 random bits. */
float rng_uniform(rng_t *r);
/* Uniform in [0, n), n > 0 (the modulo bias is irrelevant for the small n used here). */
int rng_below(rng_t *r, int n);
/* Standard normal (Box–Muller, in double). */
double rng_normal(rng_t *r);
/* Fisher–Yates shuffle of order[0 .. n). */
void rng_shuffle(rng_t *r, int *order, int n);

/* Monotonic clock in seconds. */
double now_seconds(void);

/* data/digits.bin (format in data/README.md): n images of d = 64 pixels scaled to [0, 1]
 * (pixel / 16) and their labels 0..9. */
typedef struct {
    int n, d;
    float *x;   /* [n][d] */
    uint8_t *y; /* [n] */
} dataset_t;

enum { DIGITS_PIXELS = 64, DIGITS_CLASSES = 10 };

/* Loads the file; exits with a message on any problem, or if it has fewer than min_examples. */
dataset_t load_digits(const char *path, int min_examples);
void dataset_free(dataset_t *ds);

/* Exits unless the loaded library's version is the header's. */
void check_library_version(void);

#endif
