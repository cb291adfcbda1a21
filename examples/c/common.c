/* common.c — see common.h. */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */

#include "common.h"

#include <math.h>
#include <string.h>
#include <time.h>

void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count, size);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

uint64_t rng_next(rng_t *r) {
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

float rng_uniform(rng_t *r) { return (float)(rng_next(r) >> 40) * (1.0f / 16777216.0f); }

int rng_below(rng_t *r, int n) { return (int)(rng_next(r) % (uint64_t)n); }

double rng_normal(rng_t *r) {
    /* u1 in (0, 1]: 53 random bits, shifted away from 0. */
    const double u1 = ((double)(rng_next(r) >> 11) + 1.0) * (1.0 / 9007199254740992.0);
    const double u2 = (double)(rng_next(r) >> 11) * (1.0 / 9007199254740992.0);
    return sqrt(-2.0 * log(u1)) * cos(6.283185307179586 * u2);
}

void rng_shuffle(rng_t *r, int *order, int n) {
    for (int i = n - 1; i > 0; i--) {
        int j = rng_below(r, i + 1), t = order[i];
        order[i] = order[j];
        order[j] = t;
    }
}

double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static uint32_t read_u32_le(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

dataset_t load_digits(const char *path, int min_examples) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s (run from the repository root, or pass the path; "
                        "regenerate with python3 data/export_digits.py)\n", path);
        exit(1);
    }
    unsigned char header[16];
    if (fread(header, 1, sizeof header, f) != sizeof header || memcmp(header, "DIGITS01", 8)) {
        fprintf(stderr, "%s: not a DIGITS01 file\n", path);
        exit(1);
    }
    uint32_t n = read_u32_le(header + 8), d = read_u32_le(header + 12);
    if (n < (uint32_t)min_examples || n > 1000000 || d != DIGITS_PIXELS) {
        fprintf(stderr, "%s: unexpected sizes n=%u d=%u\n", path, n, d);
        exit(1);
    }
    unsigned char *pixels = xcalloc((size_t)n * d, 1);
    dataset_t ds = {(int)n, (int)d, xcalloc((size_t)n * d, sizeof(float)), xcalloc(n, 1)};
    if (fread(pixels, 1, (size_t)n * d, f) != (size_t)n * d || fread(ds.y, 1, n, f) != n) {
        fprintf(stderr, "%s: truncated\n", path);
        exit(1);
    }
    fclose(f);
    for (size_t i = 0; i < (size_t)n * d; i++) {
        if (pixels[i] > 16) {
            fprintf(stderr, "%s: pixel value %u out of range\n", path, pixels[i]);
            exit(1);
        }
        ds.x[i] = (float)pixels[i] / 16.0f;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (ds.y[i] >= DIGITS_CLASSES) {
            fprintf(stderr, "%s: label %u out of range\n", path, ds.y[i]);
            exit(1);
        }
    }
    free(pixels);
    return ds;
}

void dataset_free(dataset_t *ds) {
    free(ds->x);
    free(ds->y);
    ds->x = NULL;
    ds->y = NULL;
}

void check_library_version(void) {
    if (kfac_version_number() != KFAC_VERSION_NUMBER) {
        fprintf(stderr, "libkfac %s does not match kfac.h %d\n", kfac_version_string(),
                KFAC_VERSION_NUMBER);
        exit(1);
    }
}
