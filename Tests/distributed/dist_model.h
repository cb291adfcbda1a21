/*
 * dist_model.h — the model and data shared by the distributed C tests (the in-process fake world
 * of Tests/capi/test_distributed.c and the mpirun test of Tests/mpi/test_mpi.c): a float64
 * handle with a channel-grouped dense layer, a plain dense layer and a grouped convolution, a
 * union batch made from a seed, each rank's uneven slice of it, and the exchange sequence of
 * include/kfac.h ("Distributed") over a caller-supplied SUM-allreduce. With the EKFAC strategy the
 * rows are recorded as paired examples (kfac_layer_record_examples_f64).
 */
#ifndef KFAC_DIST_MODEL_H
#define KFAC_DIST_MODEL_H

#ifndef KFAC_EXPERIMENTAL_API
#define KFAC_EXPERIMENTAL_API
#endif
#include <kfac.h>

#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define DM_LAYERS 3
#define DM_ROWS 13
/* layer sizes: inputs and output gradients per example, weight and bias counts */
static const int64_t dm_in[DM_LAYERS] = {7, 5, 2 * 4 * 4};
static const int64_t dm_out[DM_LAYERS] = {5, 3, 4 * 4 * 4};
static const int64_t dm_w[DM_LAYERS] = {35, 15, 4 * 1 * 9};
static const int64_t dm_b[DM_LAYERS] = {5, 0, 4};

static uint64_t dm_next(uint64_t *s) {
    uint64_t z = (*s += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}
static double dm_uniform(uint64_t *s) { return (double)(dm_next(s) >> 11) / (double)(1ull << 52) - 1.0; }

/* A handle of the model (float64), rank `rank` of `size`, with the strategy and reduce mode. */
static int dm_create(kfac_optimizer **out, int32_t rank, int32_t size, int32_t strategy, int32_t reduce) {
    kfac_optimizer *o = NULL;
    int s = kfac_optimizer_create(KFAC_FLOAT64, &o);
    if (s) return s;
    kfac_dense_desc d0 = {sizeof(kfac_dense_desc), 7, 5, 1, 0, 3, 2};
    kfac_dense_desc d1 = {sizeof(kfac_dense_desc), 5, 3, 0, 0, 0, 0};
    kfac_conv2d_desc c = {0};
    c.struct_size = sizeof(c);
    c.in_channels = 2; c.out_channels = 4; c.kernel_h = 3; c.kernel_w = 3; c.padding_h = 1; c.padding_w = 1;
    c.groups = 2; c.has_bias = 1; c.input_h = 4; c.input_w = 4;
    int32_t id;
    if ((s = kfac_param_set_int(o, KFAC_PARAM_INVERSE_STRATEGY, strategy)) || (s = kfac_param_set_int(o, KFAC_PARAM_DISTRIBUTED_REDUCE, reduce)) ||
        (s = kfac_param_set_int(o, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 3)) || (s = kfac_param_set_int(o, KFAC_PARAM_NUM_THREADS, 1)) ||
        (s = kfac_param_set_double(o, KFAC_PARAM_KL_CLIP, 1e-2)) ||
        (s = kfac_layer_add_dense(o, &d0, &id)) || (s = kfac_layer_add_dense(o, &d1, &id)) || (s = kfac_layer_add_conv2d(o, &c, &id)) ||
        (s = kfac_distributed_set_world(o, rank, size))) {
        kfac_optimizer_free(o);
        return s;
    }
    *out = o;
    return 0;
}

/* One step's data: inputs and output gradients of DM_ROWS examples, and the (union) gradient. */
typedef struct {
    double x[DM_LAYERS][DM_ROWS * 64], g[DM_LAYERS][DM_ROWS * 64];
    double w[DM_LAYERS][64], b[DM_LAYERS][8];
} dm_step_data;

static void dm_make(dm_step_data *d, uint64_t *seed) {
    for (int l = 0; l < DM_LAYERS; l++) {
        for (int64_t i = 0; i < DM_ROWS * dm_in[l]; i++) d->x[l][i] = dm_uniform(seed);
        for (int64_t i = 0; i < DM_ROWS * dm_out[l]; i++) d->g[l][i] = 0.5 * dm_uniform(seed);
        for (int64_t i = 0; i < dm_w[l]; i++) d->w[l][i] = dm_uniform(seed);
        for (int64_t i = 0; i < dm_b[l]; i++) d->b[l][i] = dm_uniform(seed);
    }
}

/* Rank r's rows [lo, hi) of a union batch of `rows` rows: shares proportional to r + 1, or
 * equal (rows divisible by p). */
static void dm_slice(int32_t r, int32_t p, int rows, int even, int *lo, int *hi) {
    if (even) { *lo = rows * r / p; *hi = rows * (r + 1) / p; return; }
    int total = p * (p + 1) / 2, before = r * (r + 1) / 2;
    *lo = rows * before / total;
    *hi = rows * (before + r + 1) / total;
}

static int dm_record(kfac_optimizer *o, const dm_step_data *d, int lo, int hi) {
    int32_t wanted = 0;
    int s = kfac_optimizer_wants_statistics(o, &wanted);
    if (s || !wanted || hi <= lo) return s;
    int64_t strategy = 0;
    if ((s = kfac_param_get_int(o, KFAC_PARAM_INVERSE_STRATEGY, &strategy))) return s;
    for (int l = 0; l < DM_LAYERS; l++) {
        if (strategy == KFAC_INVERSE_EKFAC) {  /* paired: EKFAC's scaling needs per-example gradients */
            if ((s = kfac_layer_record_examples_f64(o, l, d->x[l] + lo * dm_in[l], d->g[l] + lo * dm_out[l], hi - lo, 1))) return s;
            continue;
        }
        if ((s = kfac_layer_record_inputs_f64(o, l, d->x[l] + lo * dm_in[l], hi - lo))) return s;
        if ((s = kfac_layer_record_output_grads_f64(o, l, d->g[l] + lo * dm_out[l], hi - lo))) return s;
    }
    return 0;
}

static const char *dm_strategy_name(int32_t strategy) {
    return strategy == KFAC_INVERSE_EIGEN ? "eigen" : strategy == KFAC_INVERSE_EKFAC ? "EKFAC" : "Cholesky";
}

/* The step on a copy of the gradient, directions into w and b. */
static int dm_step(kfac_optimizer *o, const dm_step_data *d, double w[DM_LAYERS][64], double b[DM_LAYERS][8]) {
    double *wp[DM_LAYERS], *bp[DM_LAYERS];
    for (int l = 0; l < DM_LAYERS; l++) {
        memcpy(w[l], d->w[l], sizeof d->w[l]);
        memcpy(b[l], d->b[l], sizeof d->b[l]);
        wp[l] = w[l];
        bp[l] = dm_b[l] ? b[l] : NULL;
    }
    return kfac_optimizer_step_f64(o, wp, bp, DM_LAYERS);
}

/* max |a − ref| / max |ref| over the directions. */
static double dm_relative_difference(double a[DM_LAYERS][64], double ab[DM_LAYERS][8], double r[DM_LAYERS][64],
                                     double rb[DM_LAYERS][8]) {
    double diff = 0, scale = 1e-300;
    for (int l = 0; l < DM_LAYERS; l++) {
        for (int64_t i = 0; i < dm_w[l]; i++) {
            double e = a[l][i] - r[l][i]; if (e < 0) e = -e; if (e > diff) diff = e;
            double m = r[l][i] < 0 ? -r[l][i] : r[l][i]; if (m > scale) scale = m;
        }
        for (int64_t i = 0; i < dm_b[l]; i++) {
            double e = ab[l][i] - rb[l][i]; if (e < 0) e = -e; if (e > diff) diff = e;
            double m = rb[l][i] < 0 ? -rb[l][i] : rb[l][i]; if (m > scale) scale = m;
        }
    }
    return diff / scale;
}

enum { LK_LAYERS = 3, LK_ROWS = 11 };
static const int64_t lk_in[LK_LAYERS] = {6, 5, 4}, lk_out[LK_LAYERS] = {5, 4, 3}, lk_bias[LK_LAYERS] = {1, 1, 0};

/* The block-tridiagonal model: dense 6 → 5 → 4 → 3 (biases on the first two), layers 0–1 and
 * 1–2 linked, damping 5e-2 with π; rank `rank` of `size`. */
static int lk_create(kfac_optimizer **out, int32_t rank, int32_t size) {
    kfac_optimizer *o = NULL;
    int s = kfac_optimizer_create(KFAC_FLOAT64, &o);
    if (s) return s;
    s = kfac_param_set_double(o, KFAC_PARAM_DAMPING, 5e-2);
    if (!s) s = kfac_param_set_int(o, KFAC_PARAM_PI_DAMPING, 1);
    if (!s) s = kfac_param_set_int(o, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 3);
    if (!s) s = kfac_param_set_int(o, KFAC_PARAM_NUM_THREADS, 1);
    for (int l = 0; l < LK_LAYERS && !s; l++) {
        kfac_dense_desc d = {sizeof(kfac_dense_desc), lk_in[l], lk_out[l], (int32_t)lk_bias[l], 0, 0, 0};
        int32_t got;
        s = kfac_layer_add_dense(o, &d, &got);
    }
    if (!s) s = kfac_layer_link(o, 0, 1);
    if (!s) s = kfac_layer_link(o, 1, 2);
    if (!s) s = kfac_distributed_set_world(o, rank, size);
    if (s) { kfac_optimizer_free(o); return s; }
    *out = o;
    return 0;
}

#endif
