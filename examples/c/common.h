/*
 * common.h — small utilities shared by the C examples: allocation, libkfac error checks, a
 * seedable random generator, a clock and the image data (data/digits.bin, build/mnist5k.bin).
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
                    kfac_optimizer_last_error(opt));                                           \
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

/* Image files of the DIGITS01 / DIGITS02 format (data/README.md): n images of d pixels and
 * their labels 0..9. DIGITS01 (data/digits.bin) stores pixels 0..16; DIGITS02 (build/mnist5k.bin,
 * written by data/export_mnist5k.py) adds a header field with the largest pixel value (255 for
 * MNIST). The loader scales the pixels to [0, 1] (pixel / 16 or pixel / max_value). */
typedef struct {
    int n, d;
    float *x;   /* [n][d] */
    uint8_t *y; /* [n] */
    int max_value; /* of the stored pixels: 16 (DIGITS01) or the DIGITS02 header's */
} dataset_t;

enum { DIGITS_PIXELS = 64, DIGITS_CLASSES = 10, DIGITS01_MAX_VALUE = 16 };

/* Loads a DIGITS01 or DIGITS02 file of any width d; exits with a message on any problem, or if
 * it has fewer than min_examples. */
dataset_t load_images(const char *path, int min_examples);
/* load_images, and exits unless d = 64 (the 8×8 digits). */
dataset_t load_digits(const char *path, int min_examples);
void dataset_free(dataset_t *ds);

/* Exits unless the loaded library's version is the header's. */
void check_library_version(void);

#endif
