/*
 * fuzz_api.c — a libFuzzer harness for the whole C interface of libkfac (include/kfac.h).
 *
 * The input is a program: a sequence of operations, each one byte choosing the entry point and
 * further bytes choosing its arguments — sizes, enums, flags, parameter numbers and values, row
 * counts and buffer contents from tables of hostile values (0, −1, INT64_MAX, 2^31, NaN, ±Inf,
 * subnormals, values near the overflow limits, …), NULL pointers and wrong precisions. Every
 * entry point is reachable: handles, parameters (the table, get/set), dense and convolution
 * layers (every descriptor field, struct_size), record calls (also EKFAC's paired recording),
 * factor and inverse updates,
 * discarding statistics, steps, preconditioning, factors, the adaptive mode, the experimental
 * candidate and curvature calls, the EKFAC scaling readout, the Gauss-Newton output-Hessian
 * products, kept columns and their products, the Gauss-Newton chain (define, forward, columns,
 * KFRA, products), conjugate gradient (begin/get_vector/supply_product/finish/report and the
 * callback solve, whose product may stop or return NaN), distributed pack/unpack (statistics,
 * inverses, model sums), block-tridiagonal links and cross factors (op 15 and its second byte),
 * samplers, state images (saved, then edited byte by byte and
 * optionally resealed with the image's public checksum rule, then loaded) and state files
 * (save/load, hostile paths).
 *
 * Buffers are always as long as the call claims (the harness derives their length from the
 * layers it registered); a claim the harness cannot back (too large) is not made, except with
 * sizes the library must refuse before reading (non-positive rows, products that overflow).
 *
 * Oracles besides the sanitizers: a call that fails must leave the handle's state image
 * byte-identical (the header's promise), and statuses must be KFAC_OK or a defined code;
 * a violation calls abort() so that libFuzzer records the input.
 *
 * Build: `make fuzz` (long run) or `make fuzz-smoke` (bounded, part of `make test`); the seed
 * corpus is Tests/fuzz/corpus/ (Tests/fuzz/make_seeds.py writes it).
 */
#define _GNU_SOURCE
#define KFAC_EXPERIMENTAL_API
#include <kfac.h>

#include <dlfcn.h>
#include <float.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------------ */
/* Reading the program                                                                         */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    const uint8_t *p;
    size_t n, at;
} input_t;

static uint8_t u8(input_t *in) { return in->at < in->n ? in->p[in->at++] : 0; }
static int more(const input_t *in) { return in->at < in->n; }
static uint32_t u32(input_t *in) {
    uint32_t v = 0;
    for (int i = 0; i < 4; i++) v = v << 8 | u8(in);
    return v;
}

static const int64_t SIZES[] = {1, 2, 3, 4, 5, 8, 0, -1, INT64_MAX, INT64_MIN, (int64_t)1 << 31, 46341,
                                (int64_t)1 << 40, 7, 16, 6, 3, 2, 1, 4};
static int64_t size_arg(input_t *in) { return SIZES[u8(in) % (sizeof SIZES / sizeof SIZES[0])]; }
/* Sizes that are always valid and small (shapes the harness can back with buffers). */
static int64_t small(input_t *in, int64_t max) { return 1 + u8(in) % max; }

static double value_arg(input_t *in) {
    static const double V[] = {0.0, 1.0, -1.0, 0.5, 1e-3, 2.0, 1e18, 2.5e18, 1e30, 3e38, 1e154, 1e300,
                               NAN, INFINITY, -INFINITY, 1e-310, 1e-45, DBL_MAX, FLT_MAX, -0.0, 0.95, 10.0};
    uint8_t b = u8(in);
    if (b < 200) return ((double)b - 100.0) / 37.0; /* ordinary values */
    return V[(b - 200) % (sizeof V / sizeof V[0])];
}

static int32_t enum_arg(input_t *in) {
    static const int32_t E[] = {0, 1, 2, 3, -1, 4, 100, INT32_MAX, INT32_MIN};
    return E[u8(in) % (sizeof E / sizeof E[0])];
}

/* ------------------------------------------------------------------------------------------ */
/* The harness's view of its handles                                                           */
/* ------------------------------------------------------------------------------------------ */

enum { MAX_HANDLES = 2, MAX_LAYERS = 4, MAX_VALUES = 1 << 16 };

typedef struct {
    int64_t x_values, g_values, w_values, out, a_dim, g_dim, groups;
    int has_bias;
    int64_t work; /* values a convolution's record forms per example (patches) */
} layer_t;

typedef struct {
    kfac_optimizer *h;
    int dtype;
    int n;
    layer_t l[MAX_LAYERS];
    unsigned char *image;
    size_t image_size;
} handle_t;

static handle_t H[MAX_HANDLES];
static char g_dir[128];
static int g_trace; /* KFAC_FUZZ_TRACE=1 prints every call on a handle and its status */

/* A buffer of n values of `dtype` filled from the program (hostile values included). */
static void *values(input_t *in, int dtype, int64_t n) {
    if (n < 0 || n > MAX_VALUES) return NULL;
    void *b = calloc((size_t)(n ? n : 1), 8);
    uint8_t mode = u8(in);
    for (int64_t i = 0; i < n; i++) {
        double v = mode % 4 == 0 ? value_arg(in) : (double)((int)((i * 7919 + mode) % 41) - 20) / 9.0;
        if (mode % 4 == 1 && i == 0) v = value_arg(in);
        if (dtype == KFAC_FLOAT32) ((float *)b)[i] = (float)v;
        else ((double *)b)[i] = v;
    }
    return b;
}

static void fail(const char *what) {
    fprintf(stderr, "fuzz_api: %s\n", what);
    abort();
}

static void check_status(int s) {
    if (s == 0) return;
    if (!((s <= -1 && s >= -5) || (s <= -10 && s >= -13) || (s <= -20 && s >= -25) || (s <= -30 && s >= -32) ||
          s == -40 || s == -50 || (s <= -60 && s >= -64) || s == -70 || s == -99))
        fail("a status that the header does not define");
    if (s == -99) fail("KFAC_ERROR_INTERNAL");
}

/* The handle's image, to compare before (slot 0) and after (slot 1) a call that fails. The two
 * buffers are kept across calls and grown as needed: a malloc per call was a large part of an
 * execution's cost under ASan. */
static unsigned char *g_snap[2];
static size_t g_snap_capacity[2];

static unsigned char *snapshot(handle_t *t, size_t *size, int slot) {
    *size = 0;
    if (!t->h || kfac_state_get_size(t->h, size) != KFAC_OK) return NULL;
    if (*size > g_snap_capacity[slot]) {
        free(g_snap[slot]);
        g_snap_capacity[slot] = *size * 2;
        g_snap[slot] = malloc(g_snap_capacity[slot]);
        if (!g_snap[slot]) fail("out of memory for a snapshot");
    }
    size_t written = 0;
    if (kfac_state_save(t->h, g_snap[slot], *size, &written) != KFAC_OK || written != *size) fail("kfac_state_save failed");
    return g_snap[slot];
}

/* Calls made on a handle: a failure must leave its image unchanged. */
#define ON_HANDLE(t, call)                                                                       \
    do {                                                                                         \
        size_t before_size_, after_size_;                                                        \
        unsigned char *before_ = snapshot((t), &before_size_, 0);                                \
        int status_ = (call);                                                                    \
        if (g_trace) fprintf(stderr, "%-60.60s -> %d\n", #call, status_);                       \
        check_status(status_);                                                                   \
        if (status_ != KFAC_OK && (t)->h) {                                                      \
            if (!kfac_optimizer_last_error((t)->h)[0]) fail("a failed call left no message");   \
            unsigned char *after_ = snapshot((t), &after_size_, 1);                              \
            if (before_size_ != after_size_ || (before_size_ && memcmp(before_, after_, before_size_))) \
                fail("a failed call changed the handle: " #call);                               \
        }                                                                                        \
    } while (0)

static void forget(handle_t *t) {
    kfac_optimizer_free(t->h);
    free(t->image);
    memset(t, 0, sizeof *t);
}

static int record_layer(handle_t *t, const kfac_layer_info *info, layer_t *l) {
    if (t->n >= MAX_LAYERS) return 0;
    l->out = info->out_features;
    l->a_dim = info->a_dim;
    l->g_dim = info->g_dim;
    l->groups = info->groups;
    l->has_bias = info->has_bias;
    t->l[t->n++] = *l;
    return 1;
}

/* ------------------------------------------------------------------------------------------ */
/* Operations                                                                                  */
/* ------------------------------------------------------------------------------------------ */

static void op_create(input_t *in, handle_t *t) {
    forget(t);
    int32_t dtype = u8(in) % 8 == 7 ? enum_arg(in) : 1 + (u8(in) & 1);
    kfac_optimizer *h = (kfac_optimizer *)(uintptr_t)1;
    int s = kfac_optimizer_create(dtype, u8(in) % 16 == 0 ? NULL : &h);
    check_status(s);
    if (s == KFAC_OK) {
        t->h = h;
        t->dtype = dtype;
    }
}

static void op_param(input_t *in, handle_t *t) {
    static const int32_t P[] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 200, 201, 202, 203, 204, 0, -1, 12, 300, 1000,
                               205, 206, 400, 401, 500, 8, 8};
    int32_t p = P[u8(in) % (sizeof P / sizeof P[0])];
    uint8_t kind = u8(in) % 5;
    if (kind == 0) {
        double v = value_arg(in);
        ON_HANDLE(t, kfac_param_set_double(t->h, p, v));
    } else if (kind == 1) {
        static const int64_t I[] = {0, 1, 2, 3, 10, -1, INT64_MAX, (int64_t)1 << 31, 256, 257, 4};
        int64_t v = I[u8(in) % (sizeof I / sizeof I[0])];
        if (p == KFAC_PARAM_NUM_THREADS && v > 4) v %= 5; /* keep thread creation cheap */
        ON_HANDLE(t, kfac_param_set_int(t->h, p, v));
    } else if (kind == 2) {
        double v;
        ON_HANDLE(t, kfac_param_get_double(t->h, p, u8(in) % 8 ? &v : NULL));
        int64_t i;
        ON_HANDLE(t, kfac_param_get_int(t->h, p, u8(in) % 8 ? &i : NULL));
    } else if (kind == 3) {
        kfac_param_info info;
        memset(&info, 0, sizeof info);
        static const size_t S[] = {sizeof(kfac_param_info), 0, 8, 16, 24, 4096};
        info.struct_size = S[u8(in) % 6];
        check_status(kfac_param_get_info(p, u8(in) % 8 ? &info : NULL));
    } else {
        int32_t list[64], count;
        static const int32_t C[] = {0, 1, 5, 64, -1};
        check_status(kfac_param_list(u8(in) % 4 ? list : NULL, C[u8(in) % 5], u8(in) % 8 ? &count : NULL));
    }
}

/* The fuzzer runs under -rss_limit_mb/-malloc_limit_mb = 2048, so a registration the library
 * would accept and allocate for (a factor dimension up to 46340 is valid: 17 GB) must not be
 * attempted here: it would be reported as an out-of-memory "crash" of a correct call. Layers
 * whose factors alone take more than 16 MiB are skipped (staging copies and inverses add up to
 * five times that, for up to 2 handles × 4 layers); sizes the library refuses (above 46340,
 * overflowing, non-positive) still reach it. Large valid registrations are tested under an
 * address-space limit in Tests/capi/test_reliability.c (OUT_OF_MEMORY, no abort). */
static int too_large_to_allocate(int64_t input_dim, int64_t output_dim, int64_t groups) {
    if (input_dim < 1 || output_dim < 1 || input_dim > 46340 || output_dim > 46340) return 0;
    int64_t bytes;
    if (__builtin_mul_overflow(input_dim * input_dim + output_dim * output_dim, 8, &bytes) ||
        __builtin_mul_overflow(bytes, groups, &bytes))
        return 1;
    return bytes > ((int64_t)16 << 20);
}

static void op_add_dense(input_t *in, handle_t *t) {
    if (t->n >= MAX_LAYERS) return; /* every layer the library has must be one the harness sizes buffers for */
    kfac_dense_desc d;
    memset(&d, 0, sizeof d);
    static const size_t S[] = {sizeof(kfac_dense_desc), 0, 8, 24, 32, 4096};
    d.struct_size = u8(in) % 6 ? sizeof d : S[u8(in) % 6];
    int hostile = u8(in) % 4 == 0;
    d.in_features = hostile ? size_arg(in) : small(in, 8);
    d.out_features = hostile ? size_arg(in) : small(in, 8);
    d.has_bias = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) & 1;
    d.reserved = u8(in) % 16 == 0 ? 1 : 0;
    d.input_group_size = u8(in) % 4 == 0 ? size_arg(in) : 0;
    d.output_group_size = u8(in) % 4 == 0 ? size_arg(in) : 0;
    int32_t id = -7;
    int null_desc = u8(in) % 32 == 0;
    if (d.has_bias == 0 || d.has_bias == 1) {
        if (d.in_features < INT64_MAX && too_large_to_allocate(d.in_features + d.has_bias, d.out_features, 1)) return;
    }
    ON_HANDLE(t, kfac_layer_add_dense(t->h, null_desc ? NULL : &d, &id));
    if (t->h && id >= 0) {
        kfac_layer_info info = {sizeof info, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        if (kfac_layer_get_info(t->h, id, &info) != KFAC_OK) fail("layer_get_info failed on a new layer");
        layer_t l = {info.in_features, info.out_features, info.out_features * info.in_features, 0, 0, 0, 0, 0, 0};
        record_layer(t, &info, &l);
    }
}

static void op_add_conv(input_t *in, handle_t *t) {
    if (t->n >= MAX_LAYERS) return;
    kfac_conv2d_desc d;
    memset(&d, 0, sizeof d);
    d.struct_size = u8(in) % 8 ? sizeof d : (size_t)(u8(in) % 2 ? 0 : 120);
    int hostile = u8(in) % 4 == 0;
    d.in_channels = hostile ? size_arg(in) : small(in, 4);
    d.out_channels = hostile ? size_arg(in) : small(in, 4);
    d.kernel_h = hostile ? size_arg(in) : small(in, 3);
    d.kernel_w = hostile ? size_arg(in) : small(in, 3);
    d.stride_h = u8(in) % 4 == 0 ? size_arg(in) : u8(in) % 3;
    d.stride_w = u8(in) % 4 == 0 ? size_arg(in) : u8(in) % 3;
    d.padding_h = u8(in) % 4 == 0 ? size_arg(in) : u8(in) % 2;
    d.padding_w = u8(in) % 4 == 0 ? size_arg(in) : u8(in) % 2;
    d.dilation_h = u8(in) % 4 == 0 ? size_arg(in) : u8(in) % 3;
    d.dilation_w = u8(in) % 4 == 0 ? size_arg(in) : u8(in) % 3;
    d.groups = u8(in) % 4 == 0 ? size_arg(in) : u8(in) % 3;
    d.input_h = hostile ? size_arg(in) : small(in, 8);
    d.input_w = hostile ? size_arg(in) : small(in, 8);
    d.has_bias = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) & 1;
    d.layout = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) & 1;
    d.approximation = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) & 1;
    d.reserved = u8(in) % 16 == 0 ? 3 : 0;
    d.input_group_size = u8(in) % 4 == 0 ? size_arg(in) : 0;
    d.output_group_size = u8(in) % 4 == 0 ? size_arg(in) : 0;
    int32_t id = -7;
    {
        int64_t g = d.groups ? d.groups : 1, taps = 0, din = 0;
        if (g > 0 && d.in_channels > 0 && d.in_channels % g == 0 && (d.has_bias == 0 || d.has_bias == 1) &&
            !__builtin_mul_overflow(d.in_channels / g, d.kernel_h, &taps) &&
            !__builtin_mul_overflow(taps, d.kernel_w, &taps) && !__builtin_add_overflow(taps, d.has_bias, &din) &&
            d.out_channels > 0 && d.out_channels % g == 0 && too_large_to_allocate(din, d.out_channels / g, g))
            return;
    }
    ON_HANDLE(t, kfac_layer_add_conv2d(t->h, u8(in) % 32 ? &d : NULL, &id));
    if (t->h && id >= 0) {
        kfac_layer_info info = {sizeof info, 0, 0, 0, 0, 0, 0, 0, 0, 0};
        if (kfac_layer_get_info(t->h, id, &info) != KFAC_OK) fail("layer_get_info failed on a new layer");
        int64_t sh = d.stride_h ? d.stride_h : 1, sw = d.stride_w ? d.stride_w : 1;
        int64_t dh = d.dilation_h ? d.dilation_h : 1, dw = d.dilation_w ? d.dilation_w : 1;
        int64_t groups = d.groups ? d.groups : 1;
        int64_t ho = (d.input_h + 2 * d.padding_h - dh * (d.kernel_h - 1) - 1) / sh + 1;
        int64_t wo = (d.input_w + 2 * d.padding_w - dw * (d.kernel_w - 1) - 1) / sw + 1;
        layer_t l = {d.in_channels * d.input_h * d.input_w, d.out_channels * ho * wo,
                     d.out_channels * (d.in_channels / groups) * d.kernel_h * d.kernel_w, 0, 0, 0, 0, 0,
                     ho * wo * d.in_channels * d.kernel_h * d.kernel_w};
        record_layer(t, &info, &l);
    }
}

static int wrong_dtype(input_t *in, const handle_t *t) {
    int d = t->dtype ? t->dtype : KFAC_FLOAT32;
    return u8(in) % 16 == 0 ? (d == KFAC_FLOAT32 ? KFAC_FLOAT64 : KFAC_FLOAT32) : d;
}

static void op_record(input_t *in, handle_t *t) {
    int32_t layer = u8(in) % 8 == 0 ? enum_arg(in) : (int32_t)(u8(in) % (t->n ? t->n : 1));
    int side = u8(in) & 1;
    int dtype = wrong_dtype(in, t);
    int64_t rows = u8(in) % 8 == 0 ? size_arg(in) : small(in, 6);
    int64_t per = 1;
    if (layer >= 0 && layer < t->n) per = side ? t->l[layer].g_values : t->l[layer].x_values;
    /* Valid but huge convolution geometries (e.g. padding 46341) make a record legitimately
     * slow: keep each input's work bounded (the library's cost is the caller's choice there). */
    if (layer >= 0 && layer < t->n && rows > 0 && rows <= 64 && t->l[layer].work * rows > ((int64_t)1 << 22)) return;
    int64_t count;
    void *b;
    if (rows <= 0 || __builtin_mul_overflow(rows, per, &count)) b = values(in, dtype, 4); /* refused before reading */
    else if (count <= MAX_VALUES) b = values(in, dtype, count);
    else return; /* a claim the harness cannot back */
    if (u8(in) % 32 == 0) {
        free(b);
        b = NULL;
    }
    if (dtype == KFAC_FLOAT32) {
        if (side) ON_HANDLE(t, kfac_layer_record_output_grads_f32(t->h, layer, b, rows));
        else ON_HANDLE(t, kfac_layer_record_inputs_f32(t->h, layer, b, rows));
    } else {
        if (side) ON_HANDLE(t, kfac_layer_record_output_grads_f64(t->h, layer, b, rows));
        else ON_HANDLE(t, kfac_layer_record_inputs_f64(t->h, layer, b, rows));
    }
    free(b);
}

/* Per-layer weight and bias buffers, as kfac_optimizer_step_* takes them. */
typedef struct {
    void *w[MAX_LAYERS], *b[MAX_LAYERS];
    int32_t n;
    int null_array, null_bias_array;
} layer_buffers_t;

static void buffers_new(input_t *in, const handle_t *t, int dtype, layer_buffers_t *lb) {
    memset(lb, 0, sizeof *lb);
    lb->n = u8(in) % 16 == 0 ? enum_arg(in) : t->n;
    for (int l = 0; l < t->n; l++) {
        lb->w[l] = values(in, dtype, t->l[l].w_values);
        int bias = t->l[l].has_bias;
        if (u8(in) % 32 == 0) bias = !bias; /* the wrong bias rule */
        lb->b[l] = bias ? values(in, dtype, t->l[l].out) : NULL;
        if (u8(in) % 64 == 0) {
            free(lb->w[l]);
            lb->w[l] = NULL;
        }
    }
    lb->null_array = u8(in) % 64 == 0;
    lb->null_bias_array = u8(in) % 32 == 0;
}

static void buffers_free(layer_buffers_t *lb) {
    for (int l = 0; l < MAX_LAYERS; l++) {
        free(lb->w[l]);
        free(lb->b[l]);
    }
}

#define W32(lb) ((lb)->null_array ? NULL : (float *const *)(lb)->w)
#define B32(lb) ((lb)->null_bias_array ? NULL : (float *const *)(lb)->b)
#define W64(lb) ((lb)->null_array ? NULL : (double *const *)(lb)->w)
#define B64(lb) ((lb)->null_bias_array ? NULL : (double *const *)(lb)->b)

static void op_step(input_t *in, handle_t *t) {
    int dtype = wrong_dtype(in, t);
    layer_buffers_t lb;
    buffers_new(in, t, dtype, &lb);
    uint8_t which = u8(in) % 6;
    if (which == 0) {
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_optimizer_step_f32(t->h, W32(&lb), B32(&lb), lb.n));
        else ON_HANDLE(t, kfac_optimizer_step_f64(t->h, W64(&lb), B64(&lb), lb.n));
    } else if (which == 1) {
        int32_t power = u8(in) % 8 == 0 ? enum_arg(in) : (u8(in) & 1 ? 1 : -1);
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_curvature_multiply_f32(t->h, power, W32(&lb), B32(&lb), lb.n));
        else ON_HANDLE(t, kfac_curvature_multiply_f64(t->h, power, W64(&lb), B64(&lb), lb.n));
    } else if (which == 2) {
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_adaptive_get_update_f32(t->h, W32(&lb), B32(&lb), lb.n));
        else ON_HANDLE(t, kfac_adaptive_get_update_f64(t->h, W64(&lb), B64(&lb), lb.n));
    } else if (which == 3) {
        int32_t c = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 3;
        double gamma;
        if (dtype == KFAC_FLOAT32)
            ON_HANDLE(t, kfac_candidates_get_directions_f32(t->h, c, W32(&lb), B32(&lb), lb.n, u8(in) & 1 ? &gamma : NULL));
        else
            ON_HANDLE(t, kfac_candidates_get_directions_f64(t->h, c, W64(&lb), B64(&lb), lb.n, u8(in) & 1 ? &gamma : NULL));
    } else {
        int32_t layer = u8(in) % 8 == 0 ? enum_arg(in) : (int32_t)(u8(in) % (t->n ? t->n : 1));
        int l = layer >= 0 && layer < t->n ? layer : 0;
        if (dtype == KFAC_FLOAT32)
            ON_HANDLE(t, kfac_layer_precondition_f32(t->h, layer, lb.w[l], lb.b[l]));
        else
            ON_HANDLE(t, kfac_layer_precondition_f64(t->h, layer, lb.w[l], lb.b[l]));
    }
    buffers_free(&lb);
}

static void op_factors(input_t *in, handle_t *t) {
    int32_t layer = u8(in) % 8 == 0 ? enum_arg(in) : (int32_t)(u8(in) % (t->n ? t->n : 1));
    int32_t group = u8(in) % 8 == 0 ? enum_arg(in) : 0;
    int dtype = wrong_dtype(in, t);
    int64_t a = 1, g = 1;
    if (layer >= 0 && layer < t->n) {
        a = t->l[layer].a_dim * t->l[layer].a_dim;
        g = t->l[layer].g_dim * t->l[layer].g_dim;
    }
    if (a > MAX_VALUES || g > MAX_VALUES) return;
    void *ab = u8(in) % 8 ? calloc((size_t)a, 8) : NULL, *gb = u8(in) % 8 ? calloc((size_t)g, 8) : NULL;
    if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_layer_get_factors_f32(t->h, layer, group, ab, gb));
    else ON_HANDLE(t, kfac_layer_get_factors_f64(t->h, layer, group, ab, gb));
    kfac_layer_info info;
    static const size_t S[] = {sizeof(kfac_layer_info), 0, 8, 16, 24, 4096};
    memset(&info, 0, sizeof info);
    info.struct_size = S[u8(in) % 6];
    ON_HANDLE(t, kfac_layer_get_info(t->h, layer, u8(in) % 16 ? &info : NULL));
    free(ab);
    free(gb);
}

static void op_schedule(input_t *in, handle_t *t) {
    int32_t v;
    int64_t c;
    double d;
    switch (u8(in) % 10) {
    case 0: ON_HANDLE(t, kfac_optimizer_update_factors(t->h)); break;
    case 1: ON_HANDLE(t, kfac_optimizer_update_inverses(t->h)); break;
    case 2: ON_HANDLE(t, kfac_optimizer_discard_statistics(t->h)); break;
    case 3: ON_HANDLE(t, kfac_optimizer_wants_statistics(t->h, u8(in) % 8 ? &v : NULL)); break;
    case 4: ON_HANDLE(t, kfac_optimizer_get_step_count(t->h, u8(in) % 8 ? &c : NULL)); break;
    case 5: ON_HANDLE(t, kfac_optimizer_get_kl_scale(t->h, u8(in) % 8 ? &d : NULL)); break;
    case 6: ON_HANDLE(t, kfac_optimizer_get_dtype(t->h, u8(in) % 8 ? &v : NULL)); break;
    case 7: ON_HANDLE(t, kfac_layer_count(t->h, u8(in) % 8 ? &v : NULL)); break;
    case 8: ON_HANDLE(t, kfac_candidates_get_count(t->h, u8(in) % 8 ? &v : NULL)); break;
    default: ON_HANDLE(t, kfac_adaptive_get_reduction_ratio(t->h, u8(in) % 8 ? &d : NULL)); break;
    }
    if (!kfac_optimizer_last_error(t->h)) fail("last_error returned NULL");
    if (!kfac_status_string((int)u32(in))) fail("status_string returned NULL");
}

static void op_adaptive(input_t *in, handle_t *t) {
    int dtype = wrong_dtype(in, t);
    int64_t rows = u8(in) % 8 == 0 ? size_arg(in) : small(in, 5);
    int64_t dim = u8(in) % 8 == 0 ? size_arg(in) : small(in, 4);
    int64_t count;
    if (rows > 0 && dim > 0 && (__builtin_mul_overflow(rows, dim, &count) || count > MAX_VALUES)) return;
    if (rows <= 0 || dim <= 0) count = 4;
    int32_t dist = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 3;
    void *z = values(in, dtype, count), *jd[3], *jp = u8(in) & 1 ? values(in, dtype, count) : NULL;
    for (int k = 0; k < 3; k++) jd[k] = values(in, dtype, count);
    double alpha, mu, m, rho;
    int32_t chosen;
    uint8_t which = u8(in) % 5;
    if (which == 0) {
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_adaptive_solve_step_size_f32(t->h, z, jd[0], jp, rows, dim, dist, &alpha, &mu, u8(in) & 1 ? &m : NULL));
        else ON_HANDLE(t, kfac_adaptive_solve_step_size_f64(t->h, z, jd[0], jp, rows, dim, dist, &alpha, &mu, u8(in) & 1 ? &m : NULL));
    } else if (which == 1) {
        int32_t n = u8(in) % 8 == 0 ? enum_arg(in) : 1 + u8(in) % 3;
        if (n > 3) n = 3;
        if (dtype == KFAC_FLOAT32)
            ON_HANDLE(t, kfac_candidates_solve_step_size_f32(t->h, z, (const float *const *)jd, n, jp, rows, dim, dist, &chosen, &alpha, &mu, &m));
        else
            ON_HANDLE(t, kfac_candidates_solve_step_size_f64(t->h, z, (const double *const *)jd, n, jp, rows, dim, dist, &chosen, &alpha, &mu, &m));
    } else if (which == 2) {
        double before = value_arg(in), after = value_arg(in);
        int32_t needed;
        switch (u8(in) % 4) {
        case 0: ON_HANDLE(t, kfac_adaptive_skip_loss_report(t->h)); break;
        case 1: ON_HANDLE(t, kfac_adaptive_get_report_needed(t->h, u8(in) % 8 ? &needed : NULL)); break;
        default: ON_HANDLE(t, kfac_adaptive_report_loss_change(t->h, before, after, u8(in) & 1 ? &rho : NULL)); break;
        }
    } else {
        void *out = calloc((size_t)count, 8);
        uint64_t seed = u32(in);
        int s;
        if (which == 3) s = dtype == KFAC_FLOAT32 ? kfac_sample_targets_f32(z, rows, dim, dist, seed, out)
                                                  : kfac_sample_targets_f64(z, rows, dim, dist, seed, out);
        else s = dtype == KFAC_FLOAT32 ? kfac_sample_output_grads_f32(z, rows, dim, dist, seed, out)
                                       : kfac_sample_output_grads_f64(z, rows, dim, dist, seed, out);
        check_status(s);
        free(out);
    }
    free(z);
    free(jp);
    for (int k = 0; k < 3; k++) free(jd[k]);
}


/* Added with 0.2's experimental EKFAC and Gauss-Newton sections: paired recording (which feeds
 * the same pending sums as the record calls), the EKFAC scaling readout, the output-Hessian
 * products (no handle) and the kept columns' info and clear. */
static void op_paired(input_t *in, handle_t *t) {
    int32_t layer = u8(in) % 8 == 0 ? enum_arg(in) : (int32_t)(u8(in) % (t->n ? t->n : 1));
    int dtype = wrong_dtype(in, t);
    uint8_t which = u8(in) % 4;
    if (which == 0) {
        int64_t rows = u8(in) % 8 == 0 ? size_arg(in) : small(in, 6);
        int64_t per_example = u8(in) % 4 == 0 ? size_arg(in) : 1 + u8(in) % 2;
        int64_t xs = 1, gs = 1, cx, cg;
        if (layer >= 0 && layer < t->n) {
            xs = t->l[layer].x_values;
            gs = t->l[layer].g_values;
            if (rows > 0 && rows <= 64 && t->l[layer].work * rows > ((int64_t)1 << 22)) return;
        }
        void *x, *g;
        if (rows <= 0 || __builtin_mul_overflow(rows, xs, &cx) || __builtin_mul_overflow(rows, gs, &cg)) {
            x = values(in, dtype, 4);
            g = values(in, dtype, 4);
        } else if (cx <= MAX_VALUES && cg <= MAX_VALUES) {
            x = values(in, dtype, cx);
            g = values(in, dtype, cg);
        } else {
            return;
        }
        if (dtype == KFAC_FLOAT32)
            ON_HANDLE(t, kfac_layer_record_examples_f32(t->h, layer, x, u8(in) % 32 ? g : NULL, rows, per_example));
        else
            ON_HANDLE(t, kfac_layer_record_examples_f64(t->h, layer, x, u8(in) % 32 ? g : NULL, rows, per_example));
        free(x);
        free(g);
    } else if (which == 1) {
        int32_t group = u8(in) % 8 == 0 ? enum_arg(in) : 0;
        int64_t n = 1;
        if (layer >= 0 && layer < t->n) n = t->l[layer].a_dim * t->l[layer].g_dim;
        if (n > MAX_VALUES) return;
        void *sbuf = calloc((size_t)(n ? n : 1), 8);
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_layer_get_ekfac_scaling_f32(t->h, layer, group, u8(in) % 16 ? sbuf : NULL));
        else ON_HANDLE(t, kfac_layer_get_ekfac_scaling_f64(t->h, layer, group, u8(in) % 16 ? sbuf : NULL));
        free(sbuf);
    } else if (which == 2) {
        int64_t rows = u8(in) % 8 == 0 ? size_arg(in) : small(in, 5), dim = u8(in) % 8 == 0 ? size_arg(in) : small(in, 4);
        int64_t count;
        if (rows > 0 && dim > 0 && (__builtin_mul_overflow(rows, dim, &count) || count > MAX_VALUES / dim)) return;
        if (rows <= 0 || dim <= 0) count = 4;
        int32_t dist = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 3;
        void *z = values(in, dtype, count), *q = values(in, dtype, count);
        /* count·dim ≤ MAX_VALUES when both are valid; otherwise the call is refused before writing. */
        void *out = calloc(rows > 0 && dim > 0 ? (size_t)(count * dim) : 4, 8);
        int st = u8(in) & 1
            ? (dtype == KFAC_FLOAT32 ? kfac_gn_output_hessian_multiply_f32(z, q, rows, dim, dist, out)
                                     : kfac_gn_output_hessian_multiply_f64(z, q, rows, dim, dist, out))
            : (dtype == KFAC_FLOAT32 ? kfac_gn_output_hessian_sqrt_f32(z, rows, dim, dist, out)
                                     : kfac_gn_output_hessian_sqrt_f64(z, rows, dim, dist, out));
        check_status(st);
        free(z);
        free(q);
        free(out);
    } else {
        int64_t examples, values_kept;
        int32_t k;
        ON_HANDLE(t, kfac_gn_columns_get_info(t->h, u8(in) & 1 ? &examples : NULL, &k, &values_kept));
        if (u8(in) % 4 == 0) ON_HANDLE(t, kfac_gn_columns_clear(t->h));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* The experimental families added in 0.2 (reached through op 15's second byte): the           */
/* Gauss-Newton chain and KFRA, stored columns and their products, conjugate gradient (reverse  */
/* communication and the callback solve), distributed pack/unpack, block-tridiagonal links.     */
/* Buffers are sized for the widest registered layer, so a chain or link the harness does not  */
/* model exactly (the library decides which definitions it accepts) can never be under-backed.  */
/* ------------------------------------------------------------------------------------------ */

/* The largest per-example value count any registered layer reads or writes. */
static int64_t widest(const handle_t *t) {
    int64_t w = 1, sq;
    for (int l = 0; l < t->n; l++) {
        if (t->l[l].x_values > w) w = t->l[l].x_values;
        if (t->l[l].g_values > w) w = t->l[l].g_values;
        if (t->l[l].w_values > w) w = t->l[l].w_values;
        if (__builtin_mul_overflow(t->l[l].a_dim, t->l[l].a_dim, &sq)) return INT64_MAX; /* too wide to back */
        if (sq > w) w = sq;
        if (__builtin_mul_overflow(t->l[l].g_dim, t->l[l].g_dim, &sq)) return INT64_MAX;
        if (sq > w) w = sq;
    }
    return w;
}

static int32_t layer_arg(input_t *in, const handle_t *t) {
    return u8(in) % 8 == 0 ? enum_arg(in) : (int32_t)(u8(in) % (t->n ? t->n : 1));
}

static void op_chain(input_t *in, handle_t *t) {
    int dtype = wrong_dtype(in, t);
    int64_t wide = widest(t);
    if (wide > MAX_VALUES / 8) return; /* layers too wide to back a chain's buffers */
    uint8_t which = u8(in) % 6;
    if (which == 0) {
        int32_t layers[MAX_LAYERS + 1], acts[MAX_LAYERS + 1];
        int32_t n = u8(in) % 8 == 0 ? enum_arg(in) : 1 + u8(in) % MAX_LAYERS;
        uint8_t order = u8(in);
        for (int i = 0; i < MAX_LAYERS + 1; i++) {
            layers[i] = order & 1 ? (int32_t)((i + (order >> 1)) % (t->n ? t->n : 1)) : i;
            acts[i] = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 5;
        }
        if (n >= 1 && n <= MAX_LAYERS && u8(in) % 2) acts[n - 1] = KFAC_ACTIVATION_IDENTITY;
        if (n > MAX_LAYERS + 1) n = MAX_LAYERS + 1; /* the arrays hold MAX_LAYERS + 1 entries */
        int32_t dist = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 3;
        int nulls = u8(in) % 32;
        ON_HANDLE(t, kfac_gn_chain_define(t->h, nulls == 1 ? NULL : layers, nulls == 2 ? NULL : acts, n, dist));
    } else if (which == 1) {
        int64_t rows = u8(in) % 8 == 0 ? size_arg(in) : small(in, 4);
        if (rows > 8) return; /* a claim the harness does not back (KFRA's buffer holds 8 rows) */
        int64_t per = rows > 0 ? rows * wide : 4; /* rows < 1 is refused before reading */
        void *w[MAX_LAYERS], *b[MAX_LAYERS], *x[MAX_LAYERS], *d[MAX_LAYERS];
        for (int i = 0; i < MAX_LAYERS; i++) {
            w[i] = values(in, dtype, wide);
            b[i] = u8(in) % 4 ? values(in, dtype, wide) : NULL;
            x[i] = i == 0 || u8(in) % 4 == 0 ? values(in, dtype, per) : NULL;
            d[i] = values(in, dtype, per);
        }
        void *out = u8(in) % 2 ? calloc((size_t)per, 8) : NULL;
        uint8_t nulls = u8(in) % 16;
        const void *const *W = nulls == 1 ? NULL : (const void *const *)w;
        const void *const *B = nulls == 2 ? NULL : (const void *const *)b;
        const void *const *X = nulls == 3 ? NULL : (const void *const *)x;
        const void *const *D = nulls == 4 ? NULL : (const void *const *)d;
        if (dtype == KFAC_FLOAT32)
            ON_HANDLE(t, kfac_gn_chain_forward_f32(t->h, (const float *const *)W, (const float *const *)B,
                                                   (const float *const *)X, (const float *const *)D, rows, out));
        else
            ON_HANDLE(t, kfac_gn_chain_forward_f64(t->h, (const double *const *)W, (const double *const *)B,
                                                   (const double *const *)X, (const double *const *)D, rows, out));
        for (int i = 0; i < MAX_LAYERS; i++) {
            free(w[i]);
            free(b[i]);
            free(x[i]);
            free(d[i]);
        }
        free(out);
    } else if (which == 2) {
        int32_t uses = u8(in) % 8 == 0 ? enum_arg(in) : 1 + u8(in) % 3;
        ON_HANDLE(t, kfac_gn_chain_record_columns(t->h, uses));
    } else if (which == 3) {
        int32_t variant = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 2;
        int32_t rec = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 2;
        void *grads = u8(in) % 8 ? values(in, dtype, 8 * wide <= MAX_VALUES ? 8 * wide : 4) : NULL;
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_gn_chain_record_kfra_f32(t->h, variant, rec, grads));
        else ON_HANDLE(t, kfac_gn_chain_record_kfra_f64(t->h, variant, rec, grads));
        free(grads);
    } else {
        /* G·v from the chain (4) or from the kept columns (5). */
        layer_buffers_t v, p;
        buffers_new(in, t, dtype, &v);
        buffers_new(in, t, dtype, &p);
        p.n = v.n;
        int chain = which == 4;
        if (dtype == KFAC_FLOAT32) {
            if (chain) ON_HANDLE(t, kfac_gn_chain_multiply_f32(t->h, (const float *const *)W32(&v), (const float *const *)B32(&v), W32(&p), B32(&p), v.n));
            else ON_HANDLE(t, kfac_gn_columns_multiply_f32(t->h, (const float *const *)W32(&v), (const float *const *)B32(&v), W32(&p), B32(&p), v.n));
        } else {
            if (chain) ON_HANDLE(t, kfac_gn_chain_multiply_f64(t->h, (const double *const *)W64(&v), (const double *const *)B64(&v), W64(&p), B64(&p), v.n));
            else ON_HANDLE(t, kfac_gn_columns_multiply_f64(t->h, (const double *const *)W64(&v), (const double *const *)B64(&v), W64(&p), B64(&p), v.n));
        }
        buffers_free(&v);
        buffers_free(&p);
    }
}

static void op_columns(input_t *in, handle_t *t) {
    int32_t layer = layer_arg(in, t);
    int dtype = wrong_dtype(in, t);
    int64_t rows = u8(in) % 8 == 0 ? size_arg(in) : small(in, 4);
    int32_t k = u8(in) % 8 == 0 ? (int32_t)enum_arg(in) : 1 + u8(in) % 3;
    int32_t uses = u8(in) % 8 == 0 ? enum_arg(in) : 1 + u8(in) % 3;
    int64_t xs = 1, gs = 1;
    if (layer >= 0 && layer < t->n) {
        xs = t->l[layer].x_values;
        gs = t->l[layer].g_values;
        if (rows > 0 && rows <= 64 && t->l[layer].work * rows > ((int64_t)1 << 22)) return;
    }
    int64_t cx = 4, cg = 4;
    if (rows > 0 && k > 0) {
        if (rows > 64 || __builtin_mul_overflow(rows, xs, &cx) || __builtin_mul_overflow(rows * k, gs, &cg)) return;
        if (cx > MAX_VALUES || cg > MAX_VALUES) return;
    }
    void *x = u8(in) % 8 ? values(in, dtype, cx) : NULL, *c = u8(in) % 32 ? values(in, dtype, cg) : NULL;
    if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_layer_record_output_grad_columns_f32(t->h, layer, x, c, rows, k, uses));
    else ON_HANDLE(t, kfac_layer_record_output_grad_columns_f64(t->h, layer, x, c, rows, k, uses));
    free(x);
    free(c);
}

/* The product callback of kfac_cg_solve_*: product = scale · vector (+ a hostile twist). */
typedef struct {
    const handle_t *t;
    double scale;
    int mode; /* 0 plain, 1 stop after `after` calls, 2 NaN in the product after `after` calls */
    int after, calls;
} cg_user_t;

static int cg_product(cg_user_t *u, const void *const *vw, const void *const *vb, void *const *pw, void *const *pb,
                      int32_t n, int f32) {
    if (u->mode == 1 && u->calls >= u->after) return 1;
    int poison = u->mode == 2 && u->calls >= u->after;
    u->calls++;
    for (int32_t l = 0; l < n && l < u->t->n; l++) {
        for (int side = 0; side < 2; side++) {
            const void *v = side ? vb[l] : vw[l];
            void *p = side ? pb[l] : pw[l];
            int64_t count = side ? u->t->l[l].out : u->t->l[l].w_values;
            if (!v || !p) continue;
            for (int64_t i = 0; i < count; i++) {
                double x = f32 ? ((const float *)v)[i] : ((const double *)v)[i];
                double y = poison && i == 0 ? NAN : u->scale * x;
                if (f32) ((float *)p)[i] = (float)y;
                else ((double *)p)[i] = y;
            }
        }
    }
    return 0;
}

static int cg_product_f32(void *user, const float *const *vw, const float *const *vb, float *const *pw,
                          float *const *pb, int32_t n) {
    return cg_product(user, (const void *const *)vw, (const void *const *)vb, (void *const *)pw, (void *const *)pb, n, 1);
}

static int cg_product_f64(void *user, const double *const *vw, const double *const *vb, double *const *pw,
                          double *const *pb, int32_t n) {
    return cg_product(user, (const void *const *)vw, (const void *const *)vb, (void *const *)pw, (void *const *)pb, n, 0);
}

static void cg_desc(input_t *in, kfac_cg_desc *d) {
    memset(d, 0, sizeof *d);
    static const size_t S[] = {sizeof(kfac_cg_desc), 0, 8, 16, 24, 4096};
    d->struct_size = u8(in) % 8 ? sizeof *d : S[u8(in) % 6];
    int hostile = u8(in) % 4 == 0;
    static const int32_t IT[] = {0, 1, 2, 5, 20, 1000000, 1000001};
    d->max_iterations = hostile ? enum_arg(in) : IT[u8(in) % 5];
    d->stop_rule = hostile ? enum_arg(in) : u8(in) % 2;
    d->tolerance = hostile ? value_arg(in) : (u8(in) % 2 ? 0.0 : 1e-3);
    d->preconditioner = hostile ? enum_arg(in) : u8(in) % 3;
    d->warm_start = hostile ? enum_arg(in) : u8(in) % 2;
    d->warm_start_decay = hostile ? value_arg(in) : 0.0;
    d->diagonal_exponent = hostile ? value_arg(in) : 0.0;
    d->l2 = hostile ? value_arg(in) : (u8(in) % 2 ? 0.0 : 0.1);
}

static void op_cg(input_t *in, handle_t *t) {
    int dtype = wrong_dtype(in, t);
    uint8_t which = u8(in) % 6;
    int32_t request = 0;
    if (which == 0 || which == 5) {
        kfac_cg_desc d;
        cg_desc(in, &d);
        layer_buffers_t g, dg;
        buffers_new(in, t, dtype, &g);
        int diag = u8(in) % 4 == 0 || d.preconditioner == KFAC_CG_PRECONDITIONER_DIAGONAL;
        buffers_new(in, t, dtype, &dg);
        /* A diagonal must be non-negative to be valid: make most of them so. */
        if (u8(in) % 4)
            for (int l = 0; l < t->n; l++) {
                for (int64_t i = 0; dg.w[l] && i < t->l[l].w_values; i++)
                    if (dtype == KFAC_FLOAT32) ((float *)dg.w[l])[i] = fabsf(((float *)dg.w[l])[i]);
                    else ((double *)dg.w[l])[i] = fabs(((double *)dg.w[l])[i]);
                for (int64_t i = 0; dg.b[l] && i < t->l[l].out; i++)
                    if (dtype == KFAC_FLOAT32) ((float *)dg.b[l])[i] = fabsf(((float *)dg.b[l])[i]);
                    else ((double *)dg.b[l])[i] = fabs(((double *)dg.b[l])[i]);
            }
        const kfac_cg_desc *dp = u8(in) % 8 ? &d : NULL;
        if (which == 0) {
            if (dtype == KFAC_FLOAT32)
                ON_HANDLE(t, kfac_cg_begin_f32(t->h, dp, (const float *const *)W32(&g), (const float *const *)B32(&g),
                                               diag ? (const float *const *)W32(&dg) : NULL,
                                               diag ? (const float *const *)B32(&dg) : NULL, g.n, u8(in) % 16 ? &request : NULL));
            else
                ON_HANDLE(t, kfac_cg_begin_f64(t->h, dp, (const double *const *)W64(&g), (const double *const *)B64(&g),
                                               diag ? (const double *const *)W64(&dg) : NULL,
                                               diag ? (const double *const *)B64(&dg) : NULL, g.n, u8(in) % 16 ? &request : NULL));
        } else {
            cg_user_t user = {t, 0.25 + u8(in) % 8, u8(in) % 3, u8(in) % 4, 0};
            layer_buffers_t s;
            buffers_new(in, t, dtype, &s);
            kfac_cg_result r;
            memset(&r, 0, sizeof r);
            r.struct_size = u8(in) % 8 ? sizeof r : (size_t)(u8(in) % 3) * 8;
            int with_fn = u8(in) % 16 != 0;
            if (dtype == KFAC_FLOAT32)
                ON_HANDLE(t, kfac_cg_solve_f32(t->h, dp, (const float *const *)W32(&g), (const float *const *)B32(&g),
                                               diag ? (const float *const *)W32(&dg) : NULL,
                                               diag ? (const float *const *)B32(&dg) : NULL, with_fn ? cg_product_f32 : NULL,
                                               &user, W32(&s), B32(&s), g.n, u8(in) % 4 ? &r : NULL));
            else
                ON_HANDLE(t, kfac_cg_solve_f64(t->h, dp, (const double *const *)W64(&g), (const double *const *)B64(&g),
                                               diag ? (const double *const *)W64(&dg) : NULL,
                                               diag ? (const double *const *)B64(&dg) : NULL, with_fn ? cg_product_f64 : NULL,
                                               &user, W64(&s), B64(&s), g.n, u8(in) % 4 ? &r : NULL));
            buffers_free(&s);
        }
        buffers_free(&g);
        buffers_free(&dg);
    } else if (which == 1) {
        layer_buffers_t v;
        buffers_new(in, t, dtype, &v);
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_cg_get_vector_f32(t->h, W32(&v), B32(&v), v.n));
        else ON_HANDLE(t, kfac_cg_get_vector_f64(t->h, W64(&v), B64(&v), v.n));
        buffers_free(&v);
    } else if (which == 2) {
        layer_buffers_t p;
        buffers_new(in, t, dtype, &p);
        if (dtype == KFAC_FLOAT32)
            ON_HANDLE(t, kfac_cg_supply_product_f32(t->h, (const float *const *)W32(&p), (const float *const *)B32(&p), p.n, u8(in) % 16 ? &request : NULL));
        else
            ON_HANDLE(t, kfac_cg_supply_product_f64(t->h, (const double *const *)W64(&p), (const double *const *)B64(&p), p.n, u8(in) % 16 ? &request : NULL));
        buffers_free(&p);
    } else if (which == 3) {
        layer_buffers_t s;
        buffers_new(in, t, dtype, &s);
        kfac_cg_result r;
        memset(&r, 0, sizeof r);
        r.struct_size = u8(in) % 8 ? sizeof r : (size_t)(u8(in) % 3) * 8;
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_cg_finish_f32(t->h, W32(&s), B32(&s), s.n, u8(in) % 4 ? &r : NULL));
        else ON_HANDLE(t, kfac_cg_finish_f64(t->h, W64(&s), B64(&s), s.n, u8(in) % 4 ? &r : NULL));
        buffers_free(&s);
    } else {
        double scale = u8(in) % 4 ? 1.0 : value_arg(in), before = value_arg(in), after = value_arg(in), rho;
        ON_HANDLE(t, kfac_cg_report_loss_change(t->h, scale, before, after, u8(in) & 1 ? &rho : NULL));
    }
}

static void op_distributed(input_t *in, handle_t *t) {
    int dtype = wrong_dtype(in, t);
    uint8_t which = u8(in) % 8;
    int32_t what = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 2;
    if (which == 0) {
        int32_t rank = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 3, size = u8(in) % 8 == 0 ? enum_arg(in) : 1 + u8(in) % 3;
        ON_HANDLE(t, kfac_distributed_set_world(t->h, rank, size));
        int32_t r, s;
        ON_HANDLE(t, kfac_distributed_get_world(t->h, u8(in) % 4 ? &r : NULL, u8(in) % 4 ? &s : NULL));
    } else if (which == 1) {
        int32_t due, rank;
        ON_HANDLE(t, kfac_distributed_get_due(t->h, what, u8(in) % 16 ? &due : NULL));
        int32_t layer = layer_arg(in, t), group = u8(in) % 8 == 0 ? enum_arg(in) : 0;
        int32_t side = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 2, block = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 3;
        ON_HANDLE(t, kfac_distributed_get_owner(t->h, layer, group, side, block, u8(in) % 16 ? &rank : NULL));
    } else if (which <= 5) {
        /* Pack then unpack (an allreduce over the world: the pack times a factor, or edited). */
        int64_t count = 0;
        ON_HANDLE(t, kfac_distributed_get_count(t->h, what, u8(in) % 32 ? &count : NULL));
        if (count < 0 || count > MAX_VALUES) return;
        static const int64_t slack[] = {0, 0, 0, -1, 1, INT64_MIN};
        int64_t claim = count + (slack[u8(in) % 6] == INT64_MIN ? -count - 1 : slack[u8(in) % 6]);
        void *buf = calloc((size_t)count + 2, 8);
        int stats = what == KFAC_DISTRIBUTED_STATISTICS;
        if (which != 5) {
            if (dtype == KFAC_FLOAT32)
                ON_HANDLE(t, stats ? kfac_distributed_pack_statistics_f32(t->h, buf, claim) : kfac_distributed_pack_inverses_f32(t->h, buf, claim));
            else
                ON_HANDLE(t, stats ? kfac_distributed_pack_statistics_f64(t->h, buf, claim) : kfac_distributed_pack_inverses_f64(t->h, buf, claim));
        }
        double factor = which == 3 ? 1.0 : which == 4 ? (double)(1 + u8(in) % 3) : 0.0;
        for (int64_t i = 0; i < count; i++) {
            double v = dtype == KFAC_FLOAT32 ? ((float *)buf)[i] : ((double *)buf)[i];
            v = which == 5 ? value_arg(in) : v * factor;
            if (dtype == KFAC_FLOAT32) ((float *)buf)[i] = (float)v;
            else ((double *)buf)[i] = v;
        }
        if (count && u8(in) % 4 == 0) {
            int64_t at = u8(in) % count;
            double v = value_arg(in);
            if (dtype == KFAC_FLOAT32) ((float *)buf)[at] = (float)v;
            else ((double *)buf)[at] = v;
        }
        const void *src = u8(in) % 32 ? buf : NULL;
        if (dtype == KFAC_FLOAT32)
            ON_HANDLE(t, stats ? kfac_distributed_unpack_statistics_f32(t->h, src, claim) : kfac_distributed_unpack_inverses_f32(t->h, src, claim));
        else
            ON_HANDLE(t, stats ? kfac_distributed_unpack_statistics_f64(t->h, src, claim) : kfac_distributed_unpack_inverses_f64(t->h, src, claim));
        free(buf);
    } else {
        /* The adaptive model's sums: pack over this rank's rows, then solve from them. */
        int64_t rows = u8(in) % 8 == 0 ? size_arg(in) : u8(in) % 4, dim = u8(in) % 8 == 0 ? size_arg(in) : small(in, 4);
        int64_t count = 4;
        if (rows > 0 && dim > 0 && (__builtin_mul_overflow(rows, dim, &count) || count > MAX_VALUES)) return;
        if (rows <= 0 || dim <= 0) count = 4;
        int32_t nc = u8(in) % 8 == 0 ? enum_arg(in) : 1 + u8(in) % 3;
        if (nc > 3) nc = 3;
        int32_t dist = u8(in) % 8 == 0 ? enum_arg(in) : u8(in) % 3;
        void *z = values(in, dtype, count), *u[3], *prev = u8(in) & 1 ? values(in, dtype, count) : NULL;
        for (int k = 0; k < 3; k++) u[k] = values(in, dtype, count);
        double sums[16];
        memset(sums, 0, sizeof sums);
        int64_t n_sums = nc > 0 ? 3 * (int64_t)nc + 2 : 2;
        if (u8(in) % 8 == 0) n_sums += 1;
        if (which == 6) {
            if (dtype == KFAC_FLOAT32)
                ON_HANDLE(t, kfac_distributed_pack_model_sums_f32(t->h, z, (const float *const *)u, nc, prev, rows, dim, dist, sums, n_sums));
            else
                ON_HANDLE(t, kfac_distributed_pack_model_sums_f64(t->h, z, (const double *const *)u, nc, prev, rows, dim, dist, sums, n_sums));
        } else {
            for (int i = 0; i < 16; i++) sums[i] = u8(in) % 2 ? value_arg(in) : (double)(i % 4);
        }
        int32_t chosen;
        double alpha, mu, m;
        if (u8(in) % 2)
            ON_HANDLE(t, kfac_distributed_solve_model_sums(t->h, sums, n_sums, u8(in) & 1 ? &chosen : NULL,
                                                           u8(in) % 16 ? &alpha : NULL, &mu, u8(in) & 1 ? &m : NULL));
        free(z);
        free(prev);
        for (int k = 0; k < 3; k++) free(u[k]);
    }
}

static void op_link(input_t *in, handle_t *t) {
    int32_t lower = layer_arg(in, t);
    int32_t upper = u8(in) % 8 == 0 ? enum_arg(in) : (int32_t)((uint32_t)lower + 1); /* wraps at INT32_MAX */
    if (u8(in) % 2) {
        ON_HANDLE(t, kfac_layer_link(t->h, lower, upper));
    } else {
        int dtype = wrong_dtype(in, t);
        int64_t wide = widest(t);
        if (wide > MAX_VALUES) return;
        /* A cross factor has at most (widest a_dim)² or (widest g_dim)² values. */
        void *a = u8(in) % 8 ? calloc((size_t)wide, 8) : NULL, *g = u8(in) % 8 ? calloc((size_t)wide, 8) : NULL;
        if (dtype == KFAC_FLOAT32) ON_HANDLE(t, kfac_layer_get_cross_factors_f32(t->h, lower, a, g));
        else ON_HANDLE(t, kfac_layer_get_cross_factors_f64(t->h, lower, a, g));
        free(a);
        free(g);
    }
}

static void op_experimental(input_t *in, handle_t *t) {
    switch (u8(in) % 8) {
    case 0: {
        int32_t v;
        check_status(kfac_optimizer_get_dtype(t->h, &v));
        if (!kfac_version_string() || kfac_version_number() != KFAC_VERSION_NUMBER) fail("version");
        break;
    }
    case 1: case 2: op_chain(in, t); break;
    case 3: op_columns(in, t); break;
    case 4: case 5: op_cg(in, t); break;
    case 6: op_distributed(in, t); break;
    default: op_link(in, t); break;
    }
}

static uint64_t rd64(const unsigned char *p) {
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--) v = v << 8 | p[i];
    return v;
}

static void wr64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++) p[i] = (unsigned char)(v >> (8 * i));
}

/* The image's public checksum rule (Sources/KFAC/State/StateImage.swift). */
static void reseal(unsigned char *img, size_t size) {
    if (size < 40) return;
    wr64(img + 24, size);
    uint64_t h = 0xcbf29ce484222325ull;
    size_t n = size - 8, words = n / 8;
    for (size_t i = 0; i < words; i++) h = (h ^ rd64(img + 8 * i)) * 0x00000100000001b3ull;
    for (size_t i = words * 8; i < n; i++) h = (h ^ img[i]) * 0x00000100000001b3ull;
    wr64(img + size - 8, h ^ (h >> 29));
}

static void op_state(input_t *in, handle_t *t, handle_t *other) {
    uint8_t which = u8(in) % 6;
    if (which == 0) {
        size_t size = 0;
        ON_HANDLE(t, kfac_state_get_size(t->h, &size));
        static const int64_t slack[] = {0, -1, 1, -8, 64};
        int64_t capacity = (int64_t)size + slack[u8(in) % 5];
        if (capacity < 0) capacity = 0;
        unsigned char *b = malloc((size_t)capacity + 1);
        size_t written = 0;
        ON_HANDLE(t, kfac_state_save(t->h, u8(in) % 32 ? b : NULL, (size_t)capacity, &written));
        if (t->h && written && written <= (size_t)capacity) {
            free(t->image);
            t->image = b;
            t->image_size = written;
        } else {
            free(b);
        }
    } else if (which <= 2) {
        /* Load an image (this handle's or the other's), edited and maybe resealed. */
        handle_t *src = u8(in) & 1 ? other : t;
        if (!src->image) return;
        size_t size = src->image_size;
        uint8_t cut = u8(in);
        if (cut % 8 == 0 && size) size = cut / 8 < size ? size - cut / 8 : 0;
        unsigned char *c = malloc(size ? size : 1);
        memcpy(c, src->image, size);
        int edits = u8(in) % 4;
        for (int e = 0; e < edits && size; e++) {
            size_t at = u32(in) % size;
            uint8_t kind = u8(in) % 4;
            if (kind == 0) c[at] ^= (uint8_t)(1u << (u8(in) % 8));
            else if (kind == 1) c[at] = u8(in);
            else if (size >= 8 && at <= size - 8) {
                static const uint64_t Q[] = {0, 1, 2, UINT64_MAX, (uint64_t)INT64_MAX, (uint64_t)INT64_MIN,
                                             0x7ff8000000000000ull, 0x7ff0000000000000ull, 0xfff0000000000000ull,
                                             (uint64_t)-30, 1ull << 53, 0x7f8000007f800000ull, 5};
                wr64(c + at - at % 8, Q[u8(in) % (sizeof Q / sizeof Q[0])]);
            }
        }
        if (u8(in) % 4) reseal(c, size);
        ON_HANDLE(t, kfac_state_load(t->h, u8(in) % 32 ? c : NULL, size));
        free(c);
    } else if (which <= 4) {
        char path[256];
        static const char *names[] = {"a", "b", "run\xff.ckpt", "", "missing/dir/x", ".", "a/"};
        const char *name = names[u8(in) % 7];
        snprintf(path, sizeof path, "%s/%s", g_dir, name);
        const char *p = u8(in) % 32 ? path : NULL;
        if (which == 3) ON_HANDLE(t, kfac_state_save_file(t->h, p));
        else ON_HANDLE(t, kfac_state_load_file(t->h, p));
    } else {
        /* Write an edited image to a file and load it from there. */
        if (!t->image) return;
        char path[256];
        snprintf(path, sizeof path, "%s/edited", g_dir);
        FILE *f = fopen(path, "wb");
        if (!f) return;
        size_t size = t->image_size;
        if (u8(in) % 2) size -= size ? 1 : 0;
        fwrite(t->image, 1, size, f);
        fclose(f);
        ON_HANDLE(t, kfac_state_load_file(t->h, path));
    }
}

/* ------------------------------------------------------------------------------------------ */

int LLVMFuzzerInitialize(int *argc, char ***argv) {
    (void)argc;
    (void)argv;
    /* Parallel inversion runs only while OpenBLAS is single-threaded: make it so. */
    void (*set_threads)(int) = (void (*)(int))dlsym(RTLD_DEFAULT, "openblas_set_num_threads");
    if (set_threads) set_threads(1);
    g_trace = getenv("KFAC_FUZZ_TRACE") != NULL;
    /* Files in memory where possible: the save's fsyncs then cost nothing (the fuzzer's speed). */
    struct stat shm;
    const char *base = stat("/dev/shm", &shm) == 0 && S_ISDIR(shm.st_mode) ? "/dev/shm" : "/tmp";
    snprintf(g_dir, sizeof g_dir, "%s/kfac-fuzz-%d", base, (int)getpid());
    mkdir(g_dir, 0700);
    return 0;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size) {
    input_t in = {data, size, 0};
    for (int ops = 0; ops < 96 && more(&in); ops++) {
        uint8_t op = u8(&in);
        handle_t *t = &H[op >> 7], *other = &H[!(op >> 7)];
        op &= 0x7f;
        if (!t->h && op % 16 != 0) {
            /* Calls with a NULL handle. */
            if (op % 16 == 1) check_status(kfac_optimizer_step_f32(NULL, NULL, NULL, 0));
            else if (op % 16 == 2) check_status(kfac_state_load(NULL, data, size));
            else if (op % 16 == 3) check_status(kfac_optimizer_discard_statistics(NULL));
            continue;
        }
        switch (op % 16) {
        case 0: op_create(&in, t); break;
        case 1: op_param(&in, t); break;
        case 2: op_add_dense(&in, t); break;
        case 3: op_add_conv(&in, t); break;
        case 4: case 5: case 6: op_record(&in, t); break;
        case 7: case 8: op_step(&in, t); break;
        case 9: op_factors(&in, t); break;
        case 10: op_schedule(&in, t); break;
        case 11: op_adaptive(&in, t); break;
        case 12: case 13: op_state(&in, t, other); break;
        case 14:
            if (u8(&in) % 8 == 0) forget(t);
            else op_paired(&in, t);
            break;
        default: op_experimental(&in, t); break;
        }
    }
    for (int i = 0; i < MAX_HANDLES; i++) forget(&H[i]);
    return 0;
}
