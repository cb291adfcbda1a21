/*
 * test_reliability.c — regressions of issue 15 (reliability): the promises of the header that a
 * crafted state image, a sequence of accepted calls, a file system or memory pressure must not
 * break. Each check names the defect it guards:
 *   #1  crafted images with a valid checksum and out-of-range counters or row counts;
 *   #2  record calls whose pending sums overflow only together; kfac_optimizer_discard_statistics;
 *   #3  kfac_optimizer_free joins the handle's worker threads;
 *   #4  a state file far larger than memory is refused before it is read;
 *   #5  allocation failures under an address-space limit are OUT_OF_MEMORY (save, load, conv);
 *   #6  a link at a predictable temporary name is not followed;
 *   #7  concurrent saves to one path;
 *   #8  paths that are not UTF-8 are passed through unchanged;
 *   #9  non-finite or impossible numbers in an image;
 * and the smaller gaps: the checksum before the version, FIFOs, stale temporary files, the
 * registration time of long 1-D convolutions; then every single-bit flip and truncation of a
 * multi-layer image (dense + convolution + adaptive state) on twins, and saves killed mid-write.
 */
#define KFAC_EXPERIMENTAL_API /* EKFAC's paired recording and block-tridiagonal links (gaps of the last note) */
#include "harness.h"

#if defined(__SANITIZE_ADDRESS__)
#define KFAC_TEST_ASAN 1
#elif defined(__has_feature)
#if __has_feature(address_sanitizer)
#define KFAC_TEST_ASAN 1
#endif
#endif
#ifndef KFAC_TEST_ASAN
#define KFAC_TEST_ASAN 0
#endif

#include <dirent.h>
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <pthread.h>
#include <signal.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Image editing: the layout of Sources/KFAC/State/StateImage.swift (format 5)                 */
/* ------------------------------------------------------------------------------------------ */

static uint64_t rd64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void wr64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* The image's checksum rule (public, which is why it cannot stop a deliberate edit). */
static uint64_t image_checksum(const unsigned char *b, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    const uint64_t prime = 0x00000100000001b3ull;
    size_t words = n / 8;
    for (size_t i = 0; i < words; i++) h = (h ^ rd64(b + 8 * i)) * prime;
    for (size_t i = words * 8; i < n; i++) h = (h ^ b[i]) * prime;
    return h ^ (h >> 29);
}

static void reseal(unsigned char *img, size_t size) {
    wr64(img + 24, size);
    wr64(img + size - 8, image_checksum(img, size - 8));
}

/* Offsets of the fields of an image of dense layers without grouping (each one block). */
typedef struct {
    size_t steps, kl;
    size_t running[MAX_LAYERS][2], buffered[MAX_LAYERS][2], summed[MAX_LAYERS][2];
    size_t inverse_tag[MAX_LAYERS], inverse[MAX_LAYERS];
    size_t adaptive;
} layout_t;

static layout_t dense_layout(const unsigned char *img, const model_t *m, size_t scalar) {
    layout_t L;
    memset(&L, 0, sizeof L);
    size_t o = 32;
    uint64_t params = rd64(img + o);
    o += 8 + 16 * params;
    L.steps = o;
    L.kl = o + 8;
    o += 16;
    o += 8;                                  /* statistics started */
    uint64_t layers = rd64(img + o);
    o += 8;
    for (uint64_t l = 0; l < layers; l++) o += 8 + 8 * rd64(img + o);
    for (int l = 0; l < m->n; l++) {
        size_t dims[2] = {(size_t)(m->l[l].in + m->l[l].bias), (size_t)m->l[l].out};
        for (int side = 0; side < 2; side++) {
            size_t d = dims[side];
            L.running[l][side] = o;
            o += 8 + (rd64(img + o) ? d * d * scalar : 0);
            L.buffered[l][side] = o;
            o += 8 + rd64(img + o) * d * scalar;
            L.summed[l][side] = o;
            o += 8 + (rd64(img + o) ? d * d * scalar : 0);
        }
        L.inverse_tag[l] = o;
        uint64_t tag = rd64(img + o);
        o += 8;
        L.inverse[l] = o;
        size_t a = dims[0], g = dims[1];
        if (tag == 1) o += (a * a + g * g) * scalar;                 /* Cholesky */
        else if (tag == 2) o += (a * a + a + g * g + g) * scalar;    /* eigen */
    }
    L.adaptive = o;
    return L;
}

static void put_scalar(unsigned char *p, int dtype, double v) {
    if (dtype == KFAC_FLOAT32) {
        float f = (float)v;
        memcpy(p, &f, 4);
    } else {
        memcpy(p, &v, 8);
    }
}

/* Loads a crafted image into h and checks the status and that h is unchanged. */
static void expect_refused(kfac_optimizer *h, unsigned char *img, size_t size, int want, const char *what) {
    size_t before_size = 0;
    unsigned char *before = save_image(h, &before_size);
    int got = kfac_state_load(h, img, size);
    /* The message of the failed load, before save_image's successful calls clear it. */
    char message[256];
    snprintf(message, sizeof message, "%s", kfac_optimizer_last_error(h));
    size_t after_size = 0;
    unsigned char *after = save_image(h, &after_size);
    check(got == want && message[0] != 0 && before && after && before_size == after_size &&
              !memcmp(before, after, before_size),
          "#1/#9 %s: kfac_state_load -> %s (want %s), handle unchanged (last_error: \"%s\")", what,
          status_name(got), status_name(want), message);
    free(before);
    free(after);
}

/* A fresh copy of `img` with a 64-bit field replaced, resealed. */
static unsigned char *edited(const unsigned char *img, size_t size, size_t at, uint64_t v) {
    unsigned char *c = malloc(size);
    memcpy(c, img, size);
    wr64(c + at, v);
    reseal(c, size);
    return c;
}

/* ------------------------------------------------------------------------------------------ */
/* Forked children: a call that could crash, hang or exhaust memory                             */
/* ------------------------------------------------------------------------------------------ */

typedef int (*child_fn)(void *arg);

enum { CHILD_SIGNALED = 1000, CHILD_TIMEOUT = 2000 };

/* Runs fn in a forked child and returns the status it returned (a kfac status, 0 or negative),
 * or CHILD_SIGNALED + signal, or CHILD_TIMEOUT if it did not return within `seconds`. */
static int in_child(child_fn fn, void *arg, int seconds) {
    fflush(stdout);
    pid_t pid = fork();
    if (pid < 0) return CHILD_TIMEOUT + 1;
    if (pid == 0) {
        int s = fn(arg);
        _exit(s <= 0 && s >= -200 ? -s : 255);
    }
    int status = 0;
    for (int waited = 0;; waited++) {
        pid_t done = waitpid(pid, &status, WNOHANG);
        if (done == pid) break;
        if (done < 0 || waited >= seconds * 100) {
            kill(pid, SIGKILL);
            waitpid(pid, &status, 0);
            return CHILD_TIMEOUT;
        }
        const struct timespec ten_ms = {0, 10 * 1000 * 1000};
        nanosleep(&ten_ms, NULL);
    }
    if (WIFSIGNALED(status)) return CHILD_SIGNALED + WTERMSIG(status);
    return -WEXITSTATUS(status);
}

static const char *child_result(int r) {
    static char text[64];
    if (r >= CHILD_TIMEOUT) return "did not return (timeout)";
    if (r >= CHILD_SIGNALED) {
        snprintf(text, sizeof text, "CRASHED with signal %d", r - CHILD_SIGNALED);
        return text;
    }
    return status_name(r);
}

/* Limits the address space to what is mapped now plus `extra` bytes. */
static void limit_memory(size_t extra) {
    size_t pages = 0;
    FILE *f = fopen("/proc/self/statm", "r");
    if (f) {
        if (fscanf(f, "%zu", &pages) != 1) pages = 0;
        fclose(f);
    }
    struct rlimit r;
    r.rlim_cur = r.rlim_max = (rlim_t)(pages * (size_t)sysconf(_SC_PAGESIZE) + extra);
    setrlimit(RLIMIT_AS, &r);
}

/* ------------------------------------------------------------------------------------------ */
/* #1, #9 and the checksum: crafted images                                                     */
/* ------------------------------------------------------------------------------------------ */

static const model_t ONE_DENSE = {1, {{3, 2, 1, NULL}}};

static void crafted_images(int dtype, int strategy) {
    const size_t scalar = dtype_size(dtype);
    kfac_optimizer *h = make_handle(dtype, &ONE_DENSE);
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, strategy));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_LM_INTERVAL, 1));
    rng_t r = {0x15 + (uint64_t)dtype};
    buf_t x = buf_new(dtype, 4 * 3), g = buf_new(dtype, 4 * 2);
    grads_t gr = grads_new(dtype, &ONE_DENSE, &r);
    for (int k = 0; k < 3; k++) {
        buf_random(&x, &r);
        buf_random(&g, &r);
        REQUIRE_OK(h, record_inputs(h, 0, &x, 4));
        REQUIRE_OK(h, record_grads(h, 0, &g, 4));
        REQUIRE_OK(h, step(h, &gr));
    }
    /* Pending statistics on both sides: one batch buffered as rows, then (input side) summed. */
    REQUIRE_OK(h, record_inputs(h, 0, &x, 4));
    REQUIRE_OK(h, record_inputs(h, 0, &x, 4));
    REQUIRE_OK(h, record_grads(h, 0, &g, 1));
    size_t size = 0;
    unsigned char *img = save_image(h, &size);
    layout_t L = dense_layout(img, &ONE_DENSE, scalar);
    char what[160];
    const char *tag = dtype == KFAC_FLOAT32 ? "f32" : "f64";
    const char *st = strategy == KFAC_INVERSE_EIGEN ? "eigen" : "cholesky";

    /* The walker found the end of the estimator where the adaptive section starts. */
    check(L.adaptive + 40 + 8 == size, "[%s %s] the test's image walker matches the layout (%zu + 48 = %zu)", tag,
          st, L.adaptive, size);
    check(rd64(img + L.summed[0][0]) > 0 && rd64(img + L.buffered[0][1]) > 0,
          "[%s %s] the image has summed input statistics and buffered gradient rows", tag, st);

    /* The image as saved loads (resealing changes nothing). */
    unsigned char *same = edited(img, size, L.steps, rd64(img + L.steps));
    check(kfac_state_load(h, same, size) == KFAC_OK, "[%s %s] an unedited resealed image loads", tag, st);
    free(same);

    const struct {
        size_t at;
        uint64_t v;
        const char *name;
    } fields[] = {
        {L.steps, (uint64_t)INT64_MAX, "step count INT64_MAX"},
        {L.steps, (uint64_t)-30, "step count -30"},
        {L.steps, 0, "step count 0 with a KL scale"},
        {L.kl, 0x7ff0000000000000ull, "KL scale +Inf"},
        {L.kl, 0x4000000000000000ull, "KL scale 2"},
        {L.adaptive + 32, (uint64_t)INT64_MAX, "loss-report count INT64_MAX"},
        {L.adaptive + 32, (uint64_t)-1, "loss-report count -1"},
        {L.adaptive + 16, 0x7ff8000000000000ull, "predicted change NaN"},
        {L.adaptive, 2, "flag 2 (has previous update)"},
        {L.summed[0][0], (uint64_t)INT64_MAX, "summed input rows INT64_MAX"},
        {L.summed[0][0], (uint64_t)-1, "summed input rows -1"},
        {L.summed[0][0], (1ull << 53) + 1, "summed input rows 2^53 + 1"},
        {L.buffered[0][1], (uint64_t)INT64_MAX, "buffered gradient rows INT64_MAX"},
        {L.running[0][0], 7, "has-running flag 7"},
        {L.inverse_tag[0], 9, "inverse strategy tag 9"},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        unsigned char *c = edited(img, size, fields[i].at, fields[i].v);
        snprintf(what, sizeof what, "[%s %s] resealed image with %s", tag, st, fields[i].name);
        expect_refused(h, c, size, KFAC_ERROR_CORRUPT_STATE, what);
        free(c);
    }

    /* #9: numbers. Each edit puts one value in one place and reseals. */
    const double nan = NAN, inf = INFINITY;
    const size_t a = 4, gd = 2; /* factor dimensions */
    const struct {
        size_t at;
        double v;
        const char *name;
    } numbers[] = {
        {L.running[0][0] + 8 + (0 * a + 1) * scalar, nan, "NaN in the running A"},
        {L.running[0][1] + 8, inf, "Inf on the running G's diagonal"},
        {L.running[0][1] + 8 + (1 * gd + 1) * scalar, -1, "a negative diagonal in the running G"},
        {L.summed[0][0] + 8 + (2 * a + 3) * scalar, nan, "NaN in the pending input sums"},
        {L.summed[0][0] + 8, 1e308, "pending sums beyond the record limit"},
        {L.buffered[0][1] + 8, nan, "NaN in a buffered gradient row"},
        {L.inverse[0], nan, "NaN in the inverse"},
        {L.inverse[0] + (strategy == KFAC_INVERSE_EIGEN ? a * a : 1) * scalar,
         strategy == KFAC_INVERSE_EIGEN ? -1.0 : 12345.0,
         strategy == KFAC_INVERSE_EIGEN ? "a negative eigenvalue" : "an asymmetric Cholesky inverse"},
        {L.inverse[0], strategy == KFAC_INVERSE_EIGEN ? 2.0 : -1.0,
         strategy == KFAC_INVERSE_EIGEN ? "an eigenvector entry of 2" : "a negative diagonal in the Cholesky inverse"},
    };
    for (size_t i = 0; i < sizeof numbers / sizeof numbers[0]; i++) {
        if (numbers[i].v == 1e308 && dtype == KFAC_FLOAT32) continue; /* not representable */
        unsigned char *c = malloc(size);
        memcpy(c, img, size);
        put_scalar(c + numbers[i].at, dtype, numbers[i].v);
        reseal(c, size);
        snprintf(what, sizeof what, "[%s %s] resealed image with %s", tag, st, numbers[i].name);
        expect_refused(h, c, size, KFAC_ERROR_CORRUPT_STATE, what);
        free(c);
    }

    /* The checksum is checked before the version: a flipped version bit is corruption. */
    unsigned char *v = malloc(size);
    memcpy(v, img, size);
    v[8] ^= 0x04;
    snprintf(what, sizeof what, "[%s %s] a bit flipped in the version field", tag, st);
    expect_refused(h, v, size, KFAC_ERROR_CORRUPT_STATE, what);
    reseal(v, size);
    snprintf(what, sizeof what, "[%s %s] another version, resealed", tag, st);
    expect_refused(h, v, size, KFAC_ERROR_STATE_VERSION, what);
    free(v);

    /* After all that, the handle still steps. */
    check(step(h, &gr) == KFAC_OK, "[%s %s] the handle steps after the refused images", tag, st);
    free(img);
    grads_free(&gr);
    buf_free(&x);
    buf_free(&g);
    kfac_optimizer_free(h);
}

/* ------------------------------------------------------------------------------------------ */
/* #2: pending sums that overflow only together; the way out                                   */
/* ------------------------------------------------------------------------------------------ */

static void pending_bound(void) {
    const model_t m = {1, {{2, 2, 0, NULL}}};
    kfac_optimizer *h = make_handle(KFAC_FLOAT32, &m);
    float big[6], bigger[6], g[6] = {1, 0.5f, -1, 0.25f, 0.5f, 1};
    for (int i = 0; i < 6; i++) {
        big[i] = 2.5e18f;
        bigger[i] = 1.8e18f;
    }
    check(kfac_layer_record_inputs_f32(h, 0, big, 3) == KFAC_OK, "#2 [f32] 3 rows of 2.5e18 are accepted");
    size_t size = 0;
    unsigned char *before = save_image(h, &size);
    int s = kfac_layer_record_inputs_f32(h, 0, bigger, 3);
    char message[256];
    snprintf(message, sizeof message, "%s", kfac_optimizer_last_error(h));
    size_t size2 = 0;
    unsigned char *after = save_image(h, &size2);
    check(s == KFAC_ERROR_NON_FINITE && message[0] != 0 && size == size2 && !memcmp(before, after, size),
          "#2 [f32] 3 more rows of 1.8e18, whose sums would overflow with the pending ones -> %s (want NON_FINITE), "
          "nothing recorded (last_error: \"%s\")", status_name(s), message);
    free(before);
    free(after);
    REQUIRE_OK(h, kfac_layer_record_output_grads_f32(h, 0, g, 3));
    float w[4] = {1, 2, 3, 4};
    float *ws[1] = {w};
    s = kfac_optimizer_step_f32(h, ws, NULL, 1);
    check(s == KFAC_OK, "#2 [f32] the step after the refused record succeeds -> %s", status_name(s));

    /* Discarding pending statistics: the image equals a twin's that never recorded them. */
    kfac_optimizer *t = make_handle(KFAC_FLOAT32, &m);
    REQUIRE_OK(h, kfac_optimizer_update_factors(h));
    float x[4] = {1, 2, 3, 4};
    REQUIRE_OK(h, kfac_layer_record_inputs_f32(h, 0, x, 2));
    s = kfac_optimizer_discard_statistics(h);
    size_t n1 = 0, n2 = 0;
    unsigned char *ih = save_image(h, &n1);
    /* The twin: same history without the discarded record. */
    REQUIRE_OK(t, kfac_layer_record_inputs_f32(t, 0, big, 3));
    REQUIRE_OK(t, kfac_layer_record_output_grads_f32(t, 0, g, 3));
    float w2[4] = {1, 2, 3, 4};
    float *ws2[1] = {w2};
    REQUIRE_OK(t, kfac_optimizer_step_f32(t, ws2, NULL, 1));
    REQUIRE_OK(t, kfac_optimizer_update_factors(t));
    unsigned char *it = save_image(t, &n2);
    check(s == KFAC_OK && n1 == n2 && !memcmp(ih, it, n1),
          "#2 kfac_optimizer_discard_statistics drops the pending rows and nothing else (image = twin's)");
    check(kfac_optimizer_discard_statistics(NULL) == KFAC_ERROR_NULL_POINTER,
          "kfac_optimizer_discard_statistics(NULL) -> NULL_POINTER");
    free(ih);
    free(it);
    kfac_optimizer_free(t);
    kfac_optimizer_free(h);

    /* Cholesky, float64, a dense 6→5 layer with bias, one 2-row record at the bound: the step
     * cannot invert the numerically singular factor; discarding the statistics is the way out. */
    const model_t m2 = {1, {{6, 5, 1, NULL}}};
    h = make_handle(KFAC_FLOAT64, &m2);
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_CHOLESKY));
    double hx[12], hg[10], gw[30], gb[5];
    const double at_bound = sqrt(1.7976931348623157e308 / 16 / 2 / 6) * 0.999;
    for (int i = 0; i < 12; i++) hx[i] = (i % 3 == 0 ? 1 : -1) * at_bound;
    for (int i = 0; i < 10; i++) hg[i] = 0.1 * (i + 1);
    int rec = kfac_layer_record_inputs_f64(h, 0, hx, 2);
    REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, 0, hg, 2));
    for (int i = 0; i < 30; i++) gw[i] = 0.01 * i;
    for (int i = 0; i < 5; i++) gb[i] = 0.1;
    double *pw[1] = {gw}, *pb[1] = {gb};
    int first = kfac_optimizer_step_f64(h, pw, pb, 1);
    int second = kfac_optimizer_step_f64(h, pw, pb, 1);
    int d = kfac_optimizer_discard_statistics(h);
    double nx[12];
    for (int i = 0; i < 12; i++) nx[i] = 0.1 * (i % 5) - 0.2;
    REQUIRE_OK(h, kfac_layer_record_inputs_f64(h, 0, nx, 2));
    REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, 0, hg, 2));
    int after_discard = kfac_optimizer_step_f64(h, pw, pb, 1);
    check(d == KFAC_OK && after_discard == KFAC_OK,
          "#2 [f64 cholesky] record at the bound -> %s, steps -> %s, %s; after kfac_optimizer_discard_statistics "
          "and a normal batch the step -> %s", status_name(rec), status_name(first), status_name(second),
          status_name(after_discard));
    kfac_optimizer_free(h);
}

/* Gap (a) of the last note: EKFAC's paired recording bounds the second moments of the
 * per-example gradients it keeps across calls, not only per call. Float32, dense 2→2 without
 * bias, one row x = g = (v, v) per call: each call's bound 4·v⁴ (v = 1.4e9: 1.5e37) is within
 * FLT_MAX/16, two are not; the rotated per-example gradient of that row has the entry 2v², whose
 * square (1.5e37) S_batch sums over the rows before dividing, so 23 such rows overflow. */
static void ekfac_pending_bound(void) {
    const model_t m = {1, {{2, 2, 0, NULL}}};
    kfac_optimizer *h = make_handle(KFAC_FLOAT32, &m);
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EKFAC));
    /* Bases first: a small batch and a step. */
    float x0[8] = {1, 0.5f, -0.25f, 1, 0.75f, -1, 0.5f, 0.25f}, g0[8] = {0.5f, -1, 1, 0.25f, -0.5f, 0.75f, 1, 1};
    float w[4] = {0.1f, 0.2f, 0.3f, 0.4f};
    float *ws[1] = {w};
    REQUIRE_OK(h, kfac_layer_record_examples_f32(h, 0, x0, g0, 4, 1));
    REQUIRE_OK(h, kfac_optimizer_step_f32(h, ws, NULL, 1));
    const float v = 1.4e9f;
    const float big[2] = {v, v};
    int accepted = 0, refused_status = KFAC_OK, unchanged = 1;
    char message[256] = "";
    for (int k = 0; k < 30; k++) {
        size_t n1 = 0, n2 = 0;
        unsigned char *before = save_image(h, &n1);
        int s = kfac_layer_record_examples_f32(h, 0, big, big, 1, 1);
        if (s == KFAC_OK) {
            accepted++;
        } else {
            refused_status = s;
            snprintf(message, sizeof message, "%s", kfac_optimizer_last_error(h));
            unsigned char *after = save_image(h, &n2);
            unchanged = n1 == n2 && !memcmp(before, after, n1);
            free(after);
            free(before);
            break;
        }
        free(before);
    }
    check(accepted == 1 && refused_status == KFAC_ERROR_NON_FINITE && unchanged && message[0],
          "EKFAC [f32] paired rows whose per-example second moments overflow only together: %d of 30 calls "
          "accepted (want 1), then %s (want NON_FINITE) with the handle unchanged (last_error: \"%s\")", accepted,
          status_name(refused_status), message);
    /* The step folds S from what was accepted: finite, and the step succeeds. */
    int s = kfac_optimizer_step_f32(h, ws, NULL, 1);
    float scaling[4] = {0};
    int g = kfac_layer_get_ekfac_scaling_f32(h, 0, 0, scaling);
    int finite = 1;
    for (int i = 0; i < 4; i++) finite &= isfinite(scaling[i]) && scaling[i] >= 0;
    check(s == KFAC_OK && g == KFAC_OK && finite,
          "EKFAC [f32] the step after the refused paired call -> %s, S finite and >= 0 (%g %g %g %g)", status_name(s),
          scaling[0], scaling[1], scaling[2], scaling[3]);
    /* Discarding the statistics makes room again (the bound is of what is pending). */
    REQUIRE_OK(h, kfac_layer_record_examples_f32(h, 0, big, big, 1, 1));
    REQUIRE_OK(h, kfac_optimizer_discard_statistics(h));
    s = kfac_layer_record_examples_f32(h, 0, big, big, 1, 1);
    check(s == KFAC_OK, "EKFAC [f32] after kfac_optimizer_discard_statistics a paired call at the bound -> %s",
          status_name(s));
    /* An image keeps the bound: a twin loaded from it refuses the next such call too. */
    size_t n = 0;
    unsigned char *img = save_image(h, &n);
    kfac_optimizer *t = make_handle(KFAC_FLOAT32, &m);
    REQUIRE_OK(t, kfac_param_set_int(t, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EKFAC));
    REQUIRE_OK(t, kfac_state_load(t, img, n));
    s = kfac_layer_record_examples_f32(t, 0, big, big, 1, 1);
    check(s == KFAC_ERROR_NON_FINITE,
          "EKFAC [f32] a handle loaded from an image with such a row pending refuses another -> %s", status_name(s));
    free(img);
    kfac_optimizer_free(t);
    kfac_optimizer_free(h);
}

/* Gap (b): the block-tridiagonal links section of an image (Sources/KFAC/Tridiagonal/
 * TridiagonalLinks.swift, CrossFactor.swift) is validated on load like the rest: crafted,
 * resealed images with non-finite cross factors or inverses, impossible row counts, flags,
 * asymmetric or non-positive inverses give CORRUPT_STATE with the handle unchanged. And
 * kfac_optimizer_discard_statistics drops the links' pending cross rows too, so that a link whose
 * rows did not pair can be recorded again. Two linked dense layers 3→2 and 2→2 with biases. */
static const model_t LINKED = {2, {{3, 2, 1, NULL}, {2, 2, 1, NULL}}};

static kfac_optimizer *linked_handle(int dtype) {
    kfac_optimizer *h = make_handle(dtype, &LINKED);
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, 0.1));
    REQUIRE_OK(h, kfac_layer_link(h, 0, 1));
    return h;
}

/* Records `rows` rows of inputs (lower: 3 values, upper: 2) and gradients (2 and 2) per layer. */
static void linked_record(kfac_optimizer *h, int dtype, rng_t *r, int64_t in0, int64_t in1, int64_t g0, int64_t g1) {
    buf_t x0 = buf_new(dtype, (size_t)(8 * 3)), x1 = buf_new(dtype, 8 * 2), d0 = buf_new(dtype, 8 * 2),
          d1 = buf_new(dtype, 8 * 2);
    buf_random(&x0, r);
    buf_random(&x1, r);
    buf_random(&d0, r);
    buf_random(&d1, r);
    if (in0) REQUIRE_OK(h, record_inputs(h, 0, &x0, in0));
    if (in1) REQUIRE_OK(h, record_inputs(h, 1, &x1, in1));
    if (g0) REQUIRE_OK(h, record_grads(h, 0, &d0, g0));
    if (g1) REQUIRE_OK(h, record_grads(h, 1, &d1, g1));
    buf_free(&x0);
    buf_free(&x1);
    buf_free(&d0);
    buf_free(&d1);
}

typedef struct {
    size_t flag, running, paired, sum, lower_rows, lower_data, upper_rows, upper_data;
} cross_offsets_t;

static size_t walk_cross(const unsigned char *img, size_t o, size_t lw, size_t uw, size_t scalar, cross_offsets_t *c) {
    c->flag = o;
    uint64_t running = rd64(img + o);
    o += 8;
    c->running = o;
    if (running) o += lw * uw * scalar;
    c->paired = o;
    uint64_t paired = rd64(img + o);
    o += 8;
    c->sum = o;
    if (paired) o += lw * uw * scalar;
    c->lower_rows = o;
    uint64_t lr = rd64(img + o);
    o += 8;
    c->lower_data = o;
    o += lr * lw * scalar;
    c->upper_rows = o;
    uint64_t ur = rd64(img + o);
    o += 8;
    c->upper_data = o;
    o += ur * uw * scalar;
    return o;
}

static void crafted_link_images(int dtype) {
    const size_t scalar = dtype_size(dtype);
    const char *tag = dtype_tag(dtype);
    kfac_optimizer *h = linked_handle(dtype);
    rng_t r = {0x1515 + (uint64_t)dtype};
    grads_t gr = grads_new(dtype, &LINKED, &r);
    for (int k = 0; k < 3; k++) {
        linked_record(h, dtype, &r, 4, 4, 4, 4);
        REQUIRE_OK(h, step(h, &gr));
    }
    /* Pending: 2 input rows of the lower layer paired with 2 of the upper, 2 more unpaired. */
    linked_record(h, dtype, &r, 4, 2, 0, 0);
    size_t size = 0;
    unsigned char *img = save_image(h, &size);
    layout_t L = dense_layout(img, &LINKED, scalar);
    size_t o = L.adaptive + 40;
    int count_ok = rd64(img + o) == 1 && rd64(img + o + 8) == 0;
    o += 16;
    cross_offsets_t A, G;
    o = walk_cross(img, o, 4, 3, scalar, &A);
    o = walk_cross(img, o, 2, 2, scalar, &G);
    size_t has_inverses = o, inv = o + 8;
    /* Layer 0 (linked up): Ā 4², Ḡ 2², Ā⁻¹ 4², Ḡ⁻¹ 2², Ψ^A 4×3, Ψ^G 2×2, C 4², D 2², Σ's sides (4², 4,
     * 2², 2) and scale 2×4; layer 1: Ā 3², Ḡ 2² and their inverses. */
    const size_t inverse_scalars = 16 + 4 + 16 + 4 + 12 + 4 + 16 + 4 + 16 + 4 + 4 + 2 + 8 + 9 + 4 + 9 + 4;
    char what[160];
    if (!check(count_ok && rd64(img + has_inverses) == 1 && inv + inverse_scalars * scalar + 8 == size &&
                   rd64(img + A.paired) == 2 && rd64(img + A.lower_rows) == 2 && rd64(img + A.upper_rows) == 0 &&
                   rd64(img + A.flag) == 1,
               "[%s] the test's walker of the links section matches the image (%zu + %zu scalars + 8 = %zu; A: 2 paired "
               "rows, 2 unpaired lower rows)", tag, inv, inverse_scalars, size)) {
        free(img);
        grads_free(&gr);
        kfac_optimizer_free(h);
        return;
    }
    unsigned char *same = edited(img, size, A.flag, 1);
    check(kfac_state_load(h, same, size) == KFAC_OK, "[%s] an unedited resealed image with links loads", tag);
    free(same);

    const struct {
        size_t at;
        uint64_t v;
        const char *name;
    } fields[] = {
        {A.flag, 2, "cross A has-running flag 2"},
        {A.paired, (uint64_t)INT64_MAX, "paired cross rows INT64_MAX"},
        {A.paired, (uint64_t)-1, "paired cross rows -1"},
        {A.paired, 5, "5 paired cross rows, more than the 4 / 2 rows the layers have pending"},
        {A.lower_rows, 3, "3 unpaired lower rows (the lower layer has 4 pending, 2 paired)"},
        {A.lower_rows, (uint64_t)1 << 32, "2^32 unpaired lower rows"},
        {A.lower_rows, (uint64_t)INT64_MIN, "unpaired lower rows INT64_MIN"},
        {G.paired, 1, "a paired gradient row where no gradient is pending"},
        {has_inverses, 7, "has-inverses flag 7"},
    };
    for (size_t i = 0; i < sizeof fields / sizeof fields[0]; i++) {
        unsigned char *c = edited(img, size, fields[i].at, fields[i].v);
        snprintf(what, sizeof what, "[%s links] resealed image with %s", tag, fields[i].name);
        expect_refused(h, c, size, KFAC_ERROR_CORRUPT_STATE, what);
        free(c);
    }
    const double nan = NAN, inf = INFINITY;
    const size_t psi_a = 16 + 4 + 16 + 4, c_a = psi_a + 12 + 4, scale0 = c_a + 16 + 4 + 16 + 4 + 4 + 2;
    const struct {
        size_t at;
        double v;
        const char *name;
    } numbers[] = {
        {A.running + 5 * scalar, nan, "NaN in the running cross A"},
        {G.running + 3 * scalar, inf, "+Inf in the running cross G"},
        {A.sum + 1 * scalar, -inf, "-Inf in the pending cross sum"},
        {A.sum, dtype == KFAC_FLOAT64 ? 1e308 : 3e38, "a pending cross sum beyond the record limit"},
        {A.lower_data + 2 * scalar, nan, "NaN in an unpaired lower row"},
        {inv, nan, "NaN in the damped Ā"},
        {inv + 1 * scalar, 12345, "an asymmetric damped Ā"},
        {inv + (16 + 4) * scalar, -1, "a negative diagonal in Ā⁻¹"},
        {inv + psi_a * scalar, inf, "+Inf in Ψ^A"},
        {inv + (c_a + 1) * scalar, 12345, "an asymmetric C"},
        {inv + scale0 * scalar, -0.5, "a negative entry in Σ's scale grid"},
        {inv + (inverse_scalars - 1) * scalar, nan, "NaN in the upper layer's Ḡ⁻¹"},
    };
    for (size_t i = 0; i < sizeof numbers / sizeof numbers[0]; i++) {
        unsigned char *c = malloc(size);
        memcpy(c, img, size);
        put_scalar(c + numbers[i].at, dtype, numbers[i].v);
        reseal(c, size);
        snprintf(what, sizeof what, "[%s links] resealed image with %s", tag, numbers[i].name);
        expect_refused(h, c, size, KFAC_ERROR_CORRUPT_STATE, what);
        free(c);
    }
    /* The handle still pairs, folds and steps after all that. */
    linked_record(h, dtype, &r, 0, 2, 4, 4);
    int s = step(h, &gr);
    check(s == KFAC_OK, "[%s links] the handle steps after the refused images -> %s", tag, status_name(s));
    free(img);
    grads_free(&gr);
    kfac_optimizer_free(h);
}

static void discard_links(int dtype) {
    const char *tag = dtype_tag(dtype);
    kfac_optimizer *h = linked_handle(dtype), *twin = linked_handle(dtype);
    rng_t r = {0x2515 + (uint64_t)dtype}, r2 = r;
    grads_t gr = grads_new(dtype, &LINKED, &r), gt = grads_clone(&gr);
    r2 = r;
    /* Rows that do not pair: every fold fails. */
    linked_record(h, dtype, &r, 4, 3, 4, 4);
    int first = step(h, &gr), second = step(h, &gr);
    int d = kfac_optimizer_discard_statistics(h);
    /* Then the same batch on the handle and on a twin that never saw the bad rows. */
    linked_record(h, dtype, &r, 4, 4, 4, 4);
    linked_record(twin, dtype, &r2, 0, 0, 0, 0);
    rng_t r3 = r;
    (void)r3;
    int after = step(h, &gr);
    check(first == KFAC_ERROR_INVALID_SIZE && second == KFAC_ERROR_INVALID_SIZE && d == KFAC_OK && after == KFAC_OK,
          "[%s links] unpaired rows: steps -> %s, %s (want INVALID_SIZE); after kfac_optimizer_discard_statistics "
          "and a paired batch the step -> %s (want OK)", tag, status_name(first), status_name(second),
          status_name(after));
    grads_free(&gr);
    grads_free(&gt);
    kfac_optimizer_free(h);
    kfac_optimizer_free(twin);
}

/* ------------------------------------------------------------------------------------------ */
/* #3: free joins the worker threads                                                            */
/* ------------------------------------------------------------------------------------------ */

static int thread_count(void) {
    int n = 0;
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

static int threads_child(void *arg) {
    (void)arg;
    void (*set_threads)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
    if (!set_threads) return -1;
    set_threads(1);  /* parallel inversion is used only while OpenBLAS is single-threaded */
    const int before = thread_count();
    const model_t m = {2, {{3, 2, 1, NULL}, {4, 3, 1, NULL}}};
    for (int i = 0; i < 20; i++) {
        kfac_optimizer *h = make_handle(KFAC_FLOAT64, &m);
        kfac_param_set_int(h, KFAC_PARAM_NUM_THREADS, 2);
        double x[8] = {1, 2, 3, 4, 5, 6, 7, 8}, g[6] = {1, -1, 2, 0.5, 0.25, 1};
        for (int l = 0; l < 2; l++) {
            kfac_layer_record_inputs_f64(h, l, x, 2);
            kfac_layer_record_output_grads_f64(h, l, g, 2);
        }
        if (kfac_optimizer_update_factors(h) || kfac_optimizer_update_inverses(h)) return -2;
        if (i == 0 && thread_count() != before + 1) return -3; /* the worker exists while the handle lives */
        kfac_optimizer_free(h);
    }
    return thread_count() == before ? 0 : -4;
}

static void free_joins_threads(void) {
    int r = in_child(threads_child, NULL, 60);
    check(r == 0, "#3 20 handles that inverted on 2 threads, freed: no thread left (%s; -3: no worker was started, "
                  "-4: threads left behind)", r <= 0 ? (r == 0 ? "OK" : r == -3 ? "-3" : r == -4 ? "-4" : "setup") : child_result(r));
}

/* ------------------------------------------------------------------------------------------ */
/* Files: #4, #6, #7, #8, FIFOs, temporary files                                                */
/* ------------------------------------------------------------------------------------------ */

static char g_dir[256];

static int count_temporaries(void) {
    int n = 0;
    DIR *d = opendir(g_dir);
    if (!d) return -1;
    struct dirent *e;
    while ((e = readdir(d)))
        if (strstr(e->d_name, ".tmp") || strstr(e->d_name, "kfac-tmp")) n++;
    closedir(d);
    return n;
}

static int file_equals(const char *path, const unsigned char *img, size_t size) {
    FILE *f = fopen(path, "rb");
    if (!f) return 0;
    unsigned char *b = malloc(size + 1);
    size_t n = fread(b, 1, size + 1, f);
    fclose(f);
    int same = n == size && !memcmp(b, img, size);
    free(b);
    return same;
}

typedef struct {
    kfac_optimizer *h;
    const char *path;
    int status;
} save_job_t;

static void *save_thread(void *arg) {
    save_job_t *j = arg;
    j->status = kfac_state_save_file(j->h, j->path);
    return NULL;
}

static int fifo_child(void *arg) {
    kfac_optimizer *h = make_handle(KFAC_FLOAT64, &ONE_DENSE);
    return kfac_state_load_file(h, (const char *)arg);
}

static int huge_file_child(void *arg) {
    kfac_optimizer *h = make_handle(KFAC_FLOAT64, &ONE_DENSE);
    return kfac_state_load_file(h, (const char *)arg);
}

static void files(void) {
    char path[512], other[512], link_name[600], victim[512];
    rng_t r = {77};
    const model_t *m = &ONE_DENSE;
    kfac_optimizer *a = make_handle(KFAC_FLOAT64, m), *b = make_handle(KFAC_FLOAT64, m);
    buf_t x = buf_new(KFAC_FLOAT64, 6), g = buf_new(KFAC_FLOAT64, 4);
    buf_random(&x, &r);
    buf_random(&g, &r);
    REQUIRE_OK(a, record_inputs(a, 0, &x, 2));
    REQUIRE_OK(b, record_grads(b, 0, &g, 2));
    size_t na = 0, nb = 0;
    unsigned char *ia = save_image(a, &na), *ib = save_image(b, &nb);

    /* #6: a link at the 0.1 temporary name (and at any name) is not followed. */
    snprintf(path, sizeof path, "%s/ckpt", g_dir);
    snprintf(victim, sizeof victim, "%s/victim", g_dir);
    FILE *f = fopen(victim, "w");
    fputs("precious", f);
    fclose(f);
    snprintf(link_name, sizeof link_name, "%s.tmp.%d", path, (int)getpid());
    if (symlink(victim, link_name) != 0) check(0, "symlink failed");
    int s = kfac_state_save_file(a, path);
    struct stat st;
    int regular = lstat(path, &st) == 0 && S_ISREG(st.st_mode);
    check(s == KFAC_OK && regular && file_equals(victim, (const unsigned char *)"precious", 8) && file_equals(path, ia, na),
          "#6 save with a link at <path>.tmp.<pid>: OK, the link's target untouched, <path> a regular file with the image");
    unlink(link_name);
    unlink(victim);
    check(count_temporaries() == 0, "no temporary file is left after a successful save");

    /* #7: two threads saving different handles to one path, many rounds. */
    int bad = 0, torn = 0;
    for (int round = 0; round < 100; round++) {
        save_job_t ja = {a, path, 1}, jb = {b, path, 1};
        pthread_t ta, tb;
        pthread_create(&ta, NULL, save_thread, &ja);
        pthread_create(&tb, NULL, save_thread, &jb);
        pthread_join(ta, NULL);
        pthread_join(tb, NULL);
        if (ja.status != KFAC_OK || jb.status != KFAC_OK) bad++;
        if (!file_equals(path, ia, na) && !file_equals(path, ib, nb)) torn++;
    }
    check(bad == 0 && torn == 0 && count_temporaries() == 0,
          "#7 100 rounds of two concurrent saves to one path: %d failed, %d files neither image, no temporary left", bad,
          torn);

    /* #8: paths are bytes. */
    snprintf(path, sizeof path, "%s/run\xff.ckpt", g_dir);
    snprintf(other, sizeof other, "%s/run\xfe.ckpt", g_dir);
    int s1 = kfac_state_save_file(a, path), s2 = kfac_state_save_file(b, other);
    kfac_optimizer *c = make_handle(KFAC_FLOAT64, m);
    int s3 = kfac_state_load_file(c, path);
    size_t nc = 0;
    unsigned char *ic = save_image(c, &nc);
    check(s1 == KFAC_OK && s2 == KFAC_OK && s3 == KFAC_OK && file_equals(path, ia, na) && file_equals(other, ib, nb) &&
              nc == na && !memcmp(ic, ia, na),
          "#8 saves to run\\xff.ckpt and run\\xfe.ckpt write two files; loading the first gives its own image");
    free(ic);
    unlink(path);
    unlink(other);

    /* FIFO with no writer: refused at once. */
    snprintf(path, sizeof path, "%s/fifo", g_dir);
    mkfifo(path, 0600);
    int rf = in_child(fifo_child, path, 10);
    check(rf == KFAC_ERROR_IO, "kfac_state_load_file on a FIFO with no writer -> %s (want IO, without blocking)",
          child_result(rf));
    unlink(path);
    snprintf(path, sizeof path, "%s", g_dir);
    s = kfac_state_load_file(a, path);
    check(s == KFAC_ERROR_IO, "kfac_state_load_file on a directory -> %s (want IO)", status_name(s));

    /* #4: a 64 GiB sparse file is refused before it is read. */
    snprintf(path, sizeof path, "%s/huge", g_dir);
    int fd = open(path, O_CREAT | O_WRONLY | O_TRUNC, 0600);
    int sparse = fd >= 0 && ftruncate(fd, (off_t)64 << 30) == 0;
    if (fd >= 0) close(fd);
    if (sparse) {
        struct timespec t0, t1;
        clock_gettime(CLOCK_MONOTONIC, &t0);
        int rh = in_child(huge_file_child, path, 60);
        clock_gettime(CLOCK_MONOTONIC, &t1);
        double seconds = (double)(t1.tv_sec - t0.tv_sec) + 1e-9 * (double)(t1.tv_nsec - t0.tv_nsec);
        check(rh == KFAC_ERROR_CORRUPT_STATE && seconds < 5,
              "#4 kfac_state_load_file of a 64 GiB sparse file -> %s in %.2f s (want CORRUPT_STATE at once)",
              child_result(rh), seconds);
        /* The same size with an image header of larger layers: STATE_MISMATCH from the header. */
        fd = open(path, O_WRONLY);
        unsigned char header[32];
        memcpy(header, ia, 32);
        wr64(header + 24, (uint64_t)64 << 30);
        int wrote = fd >= 0 && write(fd, header, 32) == 32;
        if (fd >= 0) close(fd);
        rh = in_child(huge_file_child, path, 60);
        check(wrote && rh == KFAC_ERROR_STATE_MISMATCH,
              "#4 a 64 GiB file with a valid image header -> %s (want STATE_MISMATCH: the image of larger layers)",
              child_result(rh));
    } else {
        check(1, "#4 (skipped: the file system refuses a 64 GiB sparse file)");
    }
    unlink(path);

    free(ia);
    free(ib);
    buf_free(&x);
    buf_free(&g);
    kfac_optimizer_free(a);
    kfac_optimizer_free(b);
    kfac_optimizer_free(c);
}

/* ------------------------------------------------------------------------------------------ */
/* #5: allocation failures are statuses                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    kfac_optimizer *h;
    const char *path;
    int load;
} big_job_t;

static int big_state_child(void *arg) {
    big_job_t *j = arg;
    limit_memory((size_t)8 << 20);
    return j->load ? kfac_state_load_file(j->h, j->path) : kfac_state_save_file(j->h, j->path);
}

static int conv_child(void *arg) {
    const kfac_conv2d_desc *d = arg;
    kfac_optimizer *h = NULL;
    if (kfac_optimizer_create(KFAC_FLOAT32, &h)) return -99;
    limit_memory((size_t)256 << 20);
    int32_t id;
    return kfac_layer_add_conv2d(h, d, &id);
}

static void out_of_memory(void) {
#if KFAC_TEST_ASAN
    /* ASan reserves its allocator's address space at start-up: an address-space limit set
     * later does not limit its allocations, so these checks mean nothing in that build. */
    check(1, "#5 (skipped under AddressSanitizer: RLIMIT_AS does not bound its allocator)");
    return;
#endif
    /* A 2100→2100 float64 layer with factors: an image of about 71 MB (more than a malloc arena a thread reserved,
     * which malloc may fall back to), saved and loaded with only
     * 8 MB of address space to spare (the image and the loaded factors do not both fit). */
    const model_t m = {1, {{2100, 2100, 0, NULL}}};
    kfac_optimizer *h = make_handle(KFAC_FLOAT64, &m);
    rng_t r = {5};
    buf_t x = buf_new(KFAC_FLOAT64, 2100 * 2);
    buf_random(&x, &r);
    REQUIRE_OK(h, record_inputs(h, 0, &x, 2));
    REQUIRE_OK(h, record_grads(h, 0, &x, 2));
    REQUIRE_OK(h, kfac_optimizer_update_factors(h));
    char path[512];
    snprintf(path, sizeof path, "%s/big", g_dir);
    REQUIRE_OK(h, kfac_state_save_file(h, path));
    big_job_t save = {h, path, 0}, load = {h, path, 1};
    int rs = in_child(big_state_child, &save, 60), rl = in_child(big_state_child, &load, 60);
    check(rs == KFAC_ERROR_OUT_OF_MEMORY && rl == KFAC_ERROR_OUT_OF_MEMORY,
          "#5 save and load of a 71 MB image with 8 MB to spare -> %s, %s (want OUT_OF_MEMORY, no crash)",
          child_result(rs), child_result(rl));
    unlink(path);
    buf_free(&x);
    kfac_optimizer_free(h);

    kfac_conv2d_desc d = base_conv();
    d.in_channels = 1;
    d.out_channels = 1;
    d.groups = 1;
    d.kernel_h = 1;
    d.kernel_w = 3;
    d.input_h = 1;
    d.input_w = (int64_t)1 << 30;
    d.approximation = KFAC_CONV_SUA;
    int rc = in_child(conv_child, &d, 60);
    check(rc == KFAC_ERROR_OUT_OF_MEMORY,
          "#5 kfac_layer_add_conv2d (SUA, 1-D over 2^30 positions) with 256 MB to spare -> %s (want OUT_OF_MEMORY)",
          child_result(rc));
    d.in_channels = 1 << 20;
    d.out_channels = 1 << 20;
    d.groups = 1 << 20;
    d.input_w = 8;
    d.approximation = KFAC_CONV_KFC;
    rc = in_child(conv_child, &d, 60);
    check(rc == KFAC_ERROR_OUT_OF_MEMORY,
          "#5 kfac_layer_add_conv2d with 2^20 groups with 256 MB to spare -> %s (want OUT_OF_MEMORY)", child_result(rc));
}

/* Registering a 1-D convolution over 2^24 positions with a 4,000-tap kernel answers at once. */
static int long_conv_child(void *arg) {
    kfac_conv2d_desc d = base_conv();
    d.in_channels = 1;
    d.out_channels = 1;
    d.groups = 1;
    d.kernel_h = 1;
    d.kernel_w = 4000;
    d.input_h = 1;
    d.input_w = (int64_t)1 << 24;
    d.approximation = *(const int32_t *)arg;
    kfac_optimizer *h = NULL;
    if (kfac_optimizer_create(KFAC_FLOAT32, &h)) return -99;
    int32_t id;
    int s = kfac_layer_add_conv2d(h, &d, &id);
    kfac_optimizer_free(h);
    return s;
}

static void long_conv(void) {
    for (int32_t approximation = KFAC_CONV_KFC; approximation <= KFAC_CONV_SUA; approximation++) {
        int rc = in_child(long_conv_child, &approximation, 10);
        check(rc == KFAC_OK, "kfac_layer_add_conv2d (%s, 1-D over 2^24 positions, 4,000 taps) -> %s within 10 s",
              approximation == KFAC_CONV_KFC ? "KFC" : "SUA", child_result(rc));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Every single-bit flip and truncation of a multi-layer image                                 */
/* ------------------------------------------------------------------------------------------ */

static const kfac_conv2d_desc FLIP_CONV = {
    sizeof(kfac_conv2d_desc), 2, 4, 3, 3, 1, 1, 1, 1, 1, 1, 2, 5, 5, 1, KFAC_LAYOUT_NCHW, KFAC_CONV_KFC, 0, 0, 0};

static void exhaustive_image_edits(int dtype) {
    const model_t m = {2, {{3, 4, 1, NULL}, {2, 4, 1, &FLIP_CONV}}};
    twins_t t = twins_new_model(dtype, 0x1515 + (uint64_t)dtype, &m);
    char why[256];
    for (int k = 0; k < 4; k++) {
        if (!twins_round(&t, why, sizeof why)) {
            check(0, "exhaustive edits: a setup round failed: %s", why);
            twins_free(&t);
            return;
        }
    }
    /* Adaptive state: a solve and a report on every twin (δ₀, ρ, report count in the image). */
    rng_t r = {99};
    adaptive_data_t ad = adaptive_data(dtype, &r);
    for (int i = 0; i < t.n; i++) {
        double alpha, mu, mdelta, rho;
        REQUIRE_OK(t.h[i], solve_raw(t.h[i], dtype, ad.z.p, ad.jd.p, NULL, AD_ROWS, AD_DIM, KFAC_DIST_CATEGORICAL, &alpha,
                                     &mu, &mdelta));
        REQUIRE_OK(t.h[i], kfac_adaptive_report_loss_change(t.h[i], 1.0, 0.9, &rho));
    }
    twins_record(&t); /* pending statistics too */
    adaptive_data_free(&ad);
    size_t size = 0;
    unsigned char *img = save_image(t.h[0], &size);
    kfac_optimizer *B = t.h[1];
    unsigned char *c = malloc(size);
    long accepted = 0, changed = 0, tried = 0, other = 0;
    for (size_t byte = 0; byte < size; byte++) {
        for (int bit = 0; bit < 8; bit++) {
            memcpy(c, img, size);
            c[byte] ^= (unsigned char)(1u << bit);
            tried++;
            int s = kfac_state_load(B, c, size);
            if (s == KFAC_OK) accepted++;
            else if (s != KFAC_ERROR_CORRUPT_STATE) other++;
        }
    }
    for (size_t n = 0; n < size; n++) {
        int s = kfac_state_load(B, img, n);
        if (s == KFAC_OK) accepted++;
        else if (s != KFAC_ERROR_CORRUPT_STATE) other++;
    }
    if (!same_state(t.h[0], B)) changed++;
    check(accepted == 0 && other == 0 && changed == 0,
          "[%s] every single-bit flip (%ld) and truncation (%zu) of a %zu-byte dense + conv + adaptive image is "
          "CORRUPT_STATE (%ld accepted, %ld other statuses) and leaves the handle equal to its twin",
          dtype_tag(dtype), tried, size, size, accepted, other);
    check(twins_round(&t, why, sizeof why), "[%s] after the edits the twins step identically %s", dtype_tag(dtype), why);
    free(c);
    free(img);
    twins_free(&t);
}

/* ------------------------------------------------------------------------------------------ */
/* A save killed mid-write never replaces the previous file                                    */
/* ------------------------------------------------------------------------------------------ */

static void killed_saves(void) {
    const model_t m = {1, {{600, 600, 1, NULL}}};
    kfac_optimizer *h = make_handle(KFAC_FLOAT64, &m);
    rng_t r = {3};
    buf_t x = buf_new(KFAC_FLOAT64, 600 * 2);
    buf_random(&x, &r);
    REQUIRE_OK(h, record_inputs(h, 0, &x, 2));
    REQUIRE_OK(h, record_grads(h, 0, &x, 2));
    REQUIRE_OK(h, kfac_optimizer_update_factors(h));
    char path[512];
    snprintf(path, sizeof path, "%s/killed", g_dir);
    REQUIRE_OK(h, kfac_state_save_file(h, path));
    size_t size = 0;
    unsigned char *img = save_image(h, &size);
    int intact = 0, rounds = 24;
    for (int k = 0; k < rounds; k++) {
        fflush(stdout);
        pid_t pid = fork();
        if (pid == 0) {
            for (;;) kfac_state_save_file(h, path);
        }
        const struct timespec wait = {0, (long)(1 + k) * 700 * 1000};
        nanosleep(&wait, NULL);
        kill(pid, SIGKILL);
        waitpid(pid, NULL, 0);
        intact += file_equals(path, img, size);
    }
    /* Temporary files of killed saves are recognisable: remove them. */
    DIR *d = opendir(g_dir);
    struct dirent *e;
    char name[600];
    int stale = 0;
    while (d && (e = readdir(d))) {
        if (strstr(e->d_name, "killed.kfac-tmp-")) {
            snprintf(name, sizeof name, "%s/%s", g_dir, e->d_name);
            unlink(name);
            stale++;
        }
    }
    if (d) closedir(d);
    check(intact == rounds, "a save killed mid-write (%d times) never replaces the previous file (%d intact; %d "
                            "recognisable temporary files removed)", rounds, intact, stale);
    unlink(path);
    free(img);
    buf_free(&x);
    kfac_optimizer_free(h);
}


/* ------------------------------------------------------------------------------------------ */
/* Numerical faults: each gives a clear status, and the handle computes correctly again       */
/* ------------------------------------------------------------------------------------------ */

static const model_t FAULT_MODEL = {1, {{6, 4, 1, NULL}}};

/* One good batch and step on both handles: 1 if both succeed with bitwise equal directions. */
static int good_round_agrees(kfac_optimizer *a, kfac_optimizer *b, int dtype, rng_t *r) {
    buf_t x = buf_new(dtype, 8 * 6), g = buf_new(dtype, 8 * 4);
    buf_random(&x, r);
    buf_random(&g, r);
    grads_t ga = grads_new(dtype, &FAULT_MODEL, r), gb = grads_clone(&ga);
    int ok = record_inputs(a, 0, &x, 8) == KFAC_OK && record_grads(a, 0, &g, 8) == KFAC_OK &&
             record_inputs(b, 0, &x, 8) == KFAC_OK && record_grads(b, 0, &g, 8) == KFAC_OK && step(a, &ga) == KFAC_OK &&
             step(b, &gb) == KFAC_OK && grads_same(&ga, &gb);
    buf_free(&x);
    buf_free(&g);
    grads_free(&ga);
    grads_free(&gb);
    return ok;
}

static void numerical_faults(int dtype, int strategy) {
    const char *tag = dtype == KFAC_FLOAT32 ? "f32" : "f64";
    const char *st = strategy == KFAC_INVERSE_EIGEN ? "eigen" : "cholesky";
    const double huge = dtype == KFAC_FLOAT32 ? 1e17 : 1e150, tiny = dtype == KFAC_FLOAT32 ? 1e-30 : 1e-300;
    enum { ZEROS, RANK_ONE, HUGE_RANGE, NAN_INPUTS, INF_GRADS, FAULTS };
    static const char *names[FAULTS] = {"all-zero statistics", "rank-one statistics (one row)",
                                        "huge-range statistics", "NaN inputs after good steps",
                                        "Inf output gradients after good steps"};
    for (int fault = 0; fault < FAULTS; fault++) {
        kfac_optimizer *a = make_handle(dtype, &FAULT_MODEL), *b = make_handle(dtype, &FAULT_MODEL);
        for (int i = 0; i < 2; i++) {
            kfac_optimizer *h = i ? b : a;
            REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, strategy));
            REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 1));
            REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_FACTOR_DECAY, 0)); /* each update replaces the factors */
        }
        rng_t r = {0xfa17 + (uint64_t)fault};
        int good = good_round_agrees(a, b, dtype, &r) && good_round_agrees(a, b, dtype, &r);
        /* The fault, on handle a only. */
        int rows = fault == RANK_ONE ? 1 : 8;
        buf_t x = buf_new(dtype, (size_t)rows * 6), g = buf_new(dtype, (size_t)rows * 4);
        buf_random(&x, &r);
        buf_random(&g, &r);
        for (size_t i = 0; i < x.n; i++) {
            if (fault == ZEROS) buf_set(&x, i, 0);
            if (fault == HUGE_RANGE) buf_set(&x, i, i % 2 ? huge : tiny);
            if (fault == NAN_INPUTS && i == 3) buf_set(&x, i, NAN);
        }
        for (size_t i = 0; i < g.n; i++) {
            if (fault == ZEROS) buf_set(&g, i, 0);
            if (fault == INF_GRADS && i == 2) buf_set(&g, i, INFINITY);
        }
        int si = record_inputs(a, 0, &x, rows), sg = record_grads(a, 0, &g, rows);
        grads_t gr = grads_new(dtype, &FAULT_MODEL, &r);
        int ss = (si == KFAC_OK && sg == KFAC_OK) ? step(a, &gr) : KFAC_ERROR_NON_FINITE;
        int finite = 1;
        for (size_t i = 0; ss == KFAC_OK && i < gr.w[0].n; i++) {
            double v = dtype == KFAC_FLOAT32 ? ((float *)gr.w[0].p)[i] : ((double *)gr.w[0].p)[i];
            finite = finite && isfinite(v);
        }
        const int clear = (ss == KFAC_OK && finite) || ss == KFAC_ERROR_NON_FINITE || ss == KFAC_ERROR_NOT_POSITIVE_DEFINITE ||
                          ss == KFAC_ERROR_EIGEN_FAILED;
        /* A failed record adds nothing; a failed step keeps its pending statistics: drop them. */
        if (ss != KFAC_OK) REQUIRE_OK(a, kfac_optimizer_discard_statistics(a));
        int recovers = good_round_agrees(a, b, dtype, &r) && good_round_agrees(a, b, dtype, &r);
        check(good && clear && recovers,
              "[%s %s] %s: record %s/%s, step %s%s; then good data: directions bitwise those of a twin that never "
              "saw the fault", tag, st, names[fault], status_name(si), status_name(sg),
              si == KFAC_OK && sg == KFAC_OK ? status_name(ss) : "not called",
              ss == KFAC_OK ? (finite ? " (finite directions)" : " (NOT FINITE)") : " (then discard_statistics)");
        grads_free(&gr);
        buf_free(&x);
        buf_free(&g);
        kfac_optimizer_free(a);
        kfac_optimizer_free(b);
    }
}

/* KFAC_TEST_LIGHT=1 (the valgrind run of `make test-valgrind`): only the checks that do not fork,
 * limit memory, time calls or repeat a load 90,000 times — under valgrind those measure valgrind. */
/* Gap (c): a state file larger than any image of the layers' fixed sections, for an EKFAC image
 * (pending per-example gradients) or a handle with links (unpaired cross rows), is measured by
 * the image's own row counts before it is read: legitimate large images load from files, a file
 * whose size disagrees with its counts is refused without reading it whole (the child's address
 * space leaves no room for reading 1 GiB). */
typedef struct {
    const char *path;
    int links;
} sized_file_t;

static kfac_optimizer *sections_handle(int links) {
    kfac_optimizer *h = links ? linked_handle(KFAC_FLOAT64) : make_handle(KFAC_FLOAT64, &LINKED);
    if (!links) REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EKFAC));
    return h;
}

static int sized_file_child(void *arg) {
    const sized_file_t *f = arg;
    kfac_optimizer *h = sections_handle(f->links);
    limit_memory((size_t)256 << 20);
    return kfac_state_load_file(h, f->path);
}

static void large_section_files(void) {
    for (int links = 0; links <= 1; links++) {
        const char *what = links ? "links with 3000 unpaired rows" : "EKFAC with 3000 pending per-example rows";
        kfac_optimizer *h = sections_handle(links), *t = sections_handle(links);
        rng_t r = {0x3515 + (uint64_t)links};
        grads_t gr = grads_new(KFAC_FLOAT64, &LINKED, &r);
        linked_record(h, KFAC_FLOAT64, &r, 4, 4, 4, 4);
        REQUIRE_OK(h, step(h, &gr));
        /* Many pending rows: the image outgrows the layers' fixed sections. */
        buf_t x = buf_new(KFAC_FLOAT64, 3000 * 3), g = buf_new(KFAC_FLOAT64, 3000 * 2);
        buf_random(&x, &r);
        buf_random(&g, &r);
        if (links) REQUIRE_OK(h, record_inputs(h, 0, &x, 3000));
        else REQUIRE_OK(h, kfac_layer_record_examples_f64(h, 0, x.p, g.p, 3000, 1));
        char path[512];
        snprintf(path, sizeof path, "%s/sections-%d", g_dir, links);
        REQUIRE_OK(h, kfac_state_save_file(h, path));
        int s = kfac_state_load_file(t, path);
        check(s == KFAC_OK && same_state(h, t), "gap (c) [%s] the image (larger than the fixed sections) loads from "
              "its file -> %s, state equal to the saved handle's", what, status_name(s));
        /* The same file grown to 1 GiB (sparse), its size field patched: refused before reading. */
        int fd = open(path, O_WRONLY);
        unsigned char field[8];
        wr64(field, (uint64_t)1 << 30);
        int ok = fd >= 0 && ftruncate(fd, (off_t)1 << 30) == 0 && pwrite(fd, field, 8, 24) == 8;
        if (fd >= 0) close(fd);
        sized_file_t f = {path, links};
        int rc = ok ? in_child(sized_file_child, &f, 60) : CHILD_TIMEOUT;
        check(rc == KFAC_ERROR_CORRUPT_STATE, "gap (c) [%s] the file grown to 1 GiB -> %s (want CORRUPT_STATE from "
              "the row counts, without reading it into a 256 MiB address-space margin)", what, child_result(rc));
        unlink(path);
        buf_free(&x);
        buf_free(&g);
        grads_free(&gr);
        kfac_optimizer_free(h);
        kfac_optimizer_free(t);
    }
}

/* Found by the fuzzer (Tests/fuzz/corpus/seed-link-rows-overflow): a linked layer reserved room
 * for its unpaired cross rows before the row count was checked, so recording INT64_MAX rows
 * after a few unpaired ones trapped (Swift overflow in CrossFactor.prepare). In a child: before
 * the fix it dies of a signal. Returns the status, or -199 if the refused call changed the image. */
static int link_rows_overflow_child(void *arg) {
    const int upper = *(const int *)arg;
    kfac_optimizer *h = linked_handle(KFAC_FLOAT64);
    rng_t r = {0x4515};
    linked_record(h, KFAC_FLOAT64, &r, upper ? 0 : 4, upper ? 2 : 0, 0, 0);
    size_t n1 = 0, n2 = 0;
    unsigned char *before = save_image(h, &n1);
    buf_t x = buf_new(KFAC_FLOAT64, 8 * 3);
    buf_random(&x, &r);
    int s = record_inputs(h, upper, &x, INT64_MAX);
    unsigned char *after = save_image(h, &n2);
    int same = n1 == n2 && !memcmp(before, after, n1);
    return same ? s : -199;
}

static void link_rows_overflow(void) {
    for (int upper = 0; upper <= 1; upper++) {
        int rc = in_child(link_rows_overflow_child, &upper, 30);
        check(rc == KFAC_ERROR_SIZE_OVERFLOW,
              "links: INT64_MAX rows recorded for the %s layer of a link with unpaired rows -> %s (want SIZE_OVERFLOW, "
              "the handle unchanged)", upper ? "upper" : "lower", rc == -199 ? "changed the handle" : child_result(rc));
    }
}

void test_reliability(const char *tmpdir) {
    section("issue 15: reliability (crafted images, pending bound, threads, files, memory)");
    snprintf(g_dir, sizeof g_dir, "%s", tmpdir);
    const int light = getenv("KFAC_TEST_LIGHT") != NULL;
    crafted_images(KFAC_FLOAT64, KFAC_INVERSE_EIGEN);
    crafted_images(KFAC_FLOAT32, KFAC_INVERSE_CHOLESKY);
    crafted_images(KFAC_FLOAT64, KFAC_INVERSE_CHOLESKY);
    pending_bound();
    ekfac_pending_bound();
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        crafted_link_images(dtype);
        discard_links(dtype);
    }
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        numerical_faults(dtype, KFAC_INVERSE_EIGEN);
        numerical_faults(dtype, KFAC_INVERSE_CHOLESKY);
    }
    if (light) {
        printf("(KFAC_TEST_LIGHT: the forking, memory-limit, timing and exhaustive checks are skipped)\n");
        return;
    }
    free_joins_threads();
    files();
    large_section_files();
    link_rows_overflow();
    out_of_memory();
    long_conv();
    exhaustive_image_edits(KFAC_FLOAT32);
    exhaustive_image_edits(KFAC_FLOAT64);
    killed_saves();
}
