/*
 * test_curvature.c — the experimental kfac_curvature_multiply_f32/_f64 (products with the damped
 * curvature at power +1 or −1), compiled with KFAC_EXPERIMENTAL_API.
 *
 *   1. Oracles: a handle with a dense layer with bias, a dense layer with channel grouping
 *      (input and output groups, bias), a grouped dense layer without bias and a 2-group
 *      convolution with padding. After a few folded batches, the factors are read back per group
 *      (kfac_layer_get_factors_*) and the explicit damped Kronecker matrix is built here
 *      (oracles.c: damped_kron): A ⊗ G + λI (eigen), (A + π√λ I) ⊗ (G + √λ/π I) (Cholesky, with π
 *      from the traces and with KFAC_PARAM_PI_DAMPING 0), λ replaced by KFAC_PARAM_FACTOR_DAMPING
 *      γ when γ > 0. Power +1 against K vec(V); after kfac_optimizer_update_inverses, power −1
 *      against the dense solve K vec(U) = vec(V), +1 then −1 against V, and −1 bitwise against
 *      kfac_layer_precondition_* per layer. With the Cholesky strategy a new λ reaches +1 at once
 *      and −1 only at the next inverse update; with the eigen strategy −1 follows λ at once.
 *      Every call leaves the state image byte-identical.
 *   2. Errors on twin handles (after_bad: status, messages, identical state images, an identical
 *      next round) with every caller buffer byte-compared: NULL pointers, n_layers, power, bias
 *      buffers, DTYPE_MISMATCH, NaN/Inf, NO_STATISTICS (also with one layer folded), NO_INVERSES
 *      (also after a strategy change), a product that overflows in one layer only. Valid calls
 *      change nothing either: identical images, identical next rounds and, between a step and its
 *      solve, identical adaptive solves.
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"
#include "oracles.h"

#include <float.h>
#include <math.h>

/* kfac_curvature_multiply_* chosen by `dtype` (the buffers' precision), with raw arrays of
 * MAX_LAYERS pointers; w or b NULL passes a NULL array. */
static int curv_raw(kfac_optimizer *h, int dtype, int32_t power, void *const *w, void *const *b,
                    int32_t n_layers) {
    if (dtype == KFAC_FLOAT32) {
        float *wf[MAX_LAYERS], *bf[MAX_LAYERS];
        for (int l = 0; l < MAX_LAYERS; l++) {
            wf[l] = w ? (float *)w[l] : NULL;
            bf[l] = b ? (float *)b[l] : NULL;
        }
        return kfac_curvature_multiply_f32(h, power, w ? wf : NULL, b ? bf : NULL, n_layers);
    }
    double *wd[MAX_LAYERS], *bd[MAX_LAYERS];
    for (int l = 0; l < MAX_LAYERS; l++) {
        wd[l] = w ? (double *)w[l] : NULL;
        bd[l] = b ? (double *)b[l] : NULL;
    }
    return kfac_curvature_multiply_f64(h, power, w ? wd : NULL, b ? bd : NULL, n_layers);
}

/* The pointer arrays of a gradient set; entries past g->n point at layer 0's weights so that a
 * library reading past n_layers reads valid memory. */
static void grads_arrays(grads_t *g, void **w, void **b) {
    for (int l = 0; l < MAX_LAYERS; l++) {
        w[l] = l < g->n ? g->w[l].p : g->w[0].p;
        b[l] = l < g->n ? g->b[l].p : NULL;
    }
}

static int curv_grads(kfac_optimizer *h, int32_t power, grads_t *g) {
    void *w[MAX_LAYERS], *b[MAX_LAYERS];
    grads_arrays(g, w, b);
    return curv_raw(h, g->w[0].dtype, power, w, b, g->n);
}

static double buf_get(const buf_t *b, size_t i) {
    return b->dtype == KFAC_FLOAT32 ? (double)((const float *)b->p)[i] : ((const double *)b->p)[i];
}

static int image_is(const kfac_optimizer *h, const unsigned char *img, size_t size) {
    size_t now_size = 0;
    unsigned char *now = save_image(h, &now_size);
    const int same = now && img && now_size == size && memcmp(now, img, size) == 0;
    free(now);
    return same;
}

/* ------------------------------------------------------------------------------------------ */
/* 1. Oracles                                                                                  */
/* ------------------------------------------------------------------------------------------ */

enum { CL = 4 }; /* layers of the oracle handle */

static kfac_conv2d_desc g_curv_conv;

static const char *const CURV_LAYER[CL] = {
    "dense 5->3 + bias", "dense 7->5 + bias, input groups of 3, output groups of 2",
    "dense 4->3 no bias, input groups of 2", "conv 4->6, 2 groups, 3x3, padding 1, + bias"};

static model_t curv_model(void) {
    g_curv_conv = base_conv(); /* 4 -> 6 channels, 2 groups, 3x3 on 5x5, bias */
    g_curv_conv.padding_h = g_curv_conv.padding_w = 1;
    const model_t m = {CL, {{5, 3, 1, NULL}, {7, 5, 1, NULL}, {4, 3, 0, NULL}, {4, 6, 1, &g_curv_conv}}};
    return m;
}

static kfac_optimizer *curv_handle(int dtype, const model_t *m) {
    kfac_optimizer *h = NULL;
    int32_t id = -1;
    REQUIRE_OK(h, kfac_optimizer_create(dtype, &h));
    REQUIRE_OK(h, add_dense(h, 5, 3, 1, &id));
    REQUIRE_OK(h, add_dense_grouped(h, 7, 5, 1, 3, 2, &id));
    REQUIRE_OK(h, add_dense_grouped(h, 4, 3, 0, 2, 0, &id));
    REQUIRE_OK(h, kfac_layer_add_conv2d(h, m->l[3].conv, &id));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, 0.0));
    /* Batches of random inputs in [-1, 1) and output gradients in [-0.2, 0.2), so that the two
     * factors' mean diagonals differ and π is far from 1. */
    rng_t r = {4242};
    for (int batch = 0; batch < 3; batch++) {
        const int64_t rows = 3 + batch;
        for (int l = 0; l < CL; l++) {
            buf_t x = buf_new(dtype, (size_t)(rows * spec_x_values(&m->l[l])));
            buf_t g = buf_new(dtype, (size_t)(rows * spec_g_values(&m->l[l])));
            buf_random(&x, &r);
            for (size_t i = 0; i < g.n; i++) buf_set(&g, i, 0.2 * rng_sym(&r));
            REQUIRE_OK(h, record_inputs(h, l, &x, rows));
            REQUIRE_OK(h, record_grads(h, l, &g, rows));
            buf_free(&x);
            buf_free(&g);
        }
        REQUIRE_OK(h, kfac_optimizer_update_factors(h));
    }
    return h;
}

/* A layer's values (weights then bias) as doubles, into out[0 .. w.n + b.n). */
static size_t layer_values(const grads_t *g, int l, double *out) {
    size_t k = 0;
    for (size_t i = 0; i < g->w[l].n; i++) out[k++] = buf_get(&g->w[l], i);
    if (g->b[l].p)
        for (size_t i = 0; i < g->b[l].n; i++) out[k++] = buf_get(&g->b[l], i);
    return k;
}

/* The oracle of layer l: every group's block of (vw, vb) multiplied by the explicit damped
 * Kronecker matrix built from the factors read back (power +1), or solved with it (power −1).
 * want receives the weights then the bias, as layer_values lays them out. Returns group 0's π. */
static double oracle_layer(const kfac_optimizer *h, int dtype, int32_t l, int factored,
                           double lambda, int use_pi, int power, const double *v, double *want) {
    kfac_layer_info info;
    memset(&info, 0, sizeof info);
    info.struct_size = sizeof info;
    REQUIRE_OK(h, kfac_layer_get_info(h, l, &info));
    const int p = (int)info.a_dim, o = (int)info.g_dim, bias = info.has_bias;
    const int P = p - bias, groups = (int)info.groups, out = o * groups;
    buf_t A = buf_new(dtype, (size_t)(p * p)), G = buf_new(dtype, (size_t)(o * o));
    double *Ad = malloc(sizeof(double) * p * p), *Gd = malloc(sizeof(double) * o * o);
    double *K = malloc(sizeof(double) * p * o * p * o);
    double *V = malloc(sizeof(double) * o * p), *U = malloc(sizeof(double) * o * p);
    double pi0 = 1.0;
    for (int gi = 0; gi < groups; gi++) {
        REQUIRE_OK(h, get_group_factors(h, l, gi, &A, &G));
        for (int i = 0; i < p * p; i++) Ad[i] = buf_get(&A, (size_t)i);
        for (int i = 0; i < o * o; i++) Gd[i] = buf_get(&G, (size_t)i);
        if (gi == 0) pi0 = factored_pi(Ad, Gd, p, o, use_pi);
        damped_kron(Ad, Gd, p, o, factored, lambda, use_pi, K);
        for (int r = 0; r < o; r++) {
            for (int k = 0; k < P; k++) V[r * p + k] = v[(gi * o + r) * P + k];
            if (bias) V[r * p + P] = v[out * P + gi * o + r];
        }
        if (!kron_apply(K, p, o, power < 0, V, U)) check(0, "oracle: singular damped Kronecker matrix");
        for (int r = 0; r < o; r++) {
            for (int k = 0; k < P; k++) want[(gi * o + r) * P + k] = U[r * p + k];
            if (bias) want[out * P + gi * o + r] = U[r * p + P];
        }
    }
    buf_free(&A);
    buf_free(&G);
    free(Ad);
    free(Gd);
    free(K);
    free(V);
    free(U);
    return pi0;
}

typedef struct {
    const char *name;
    int strategy;
    double lambda, gamma;
    int pi;
} curv_case_t;

static void set_case(kfac_optimizer *h, const curv_case_t *c) {
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, c->lambda));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_FACTOR_DAMPING, c->gamma));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, c->strategy));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_PI_DAMPING, c->pi));
}

/* Largest relative difference over all layers between a product and the oracle applied to V
 * (power +1 or −1, damping lambda); per-layer values in diff[]. */
static double against_oracle(const kfac_optimizer *h, int dtype, const grads_t *V,
                             const grads_t *got, int factored, double lambda, int use_pi,
                             int power, double *diff, double *pi) {
    double worst = 0;
    for (int l = 0; l < V->n; l++) {
        static double v[512], want[512], have[512];
        const size_t n = layer_values(V, l, v);
        layer_values(got, l, have);
        pi[l] = oracle_layer(h, dtype, l, factored, lambda, use_pi, power, v, want);
        diff[l] = rel_diff(have, want, n);
        worst = fmax(worst, diff[l]);
    }
    return worst;
}

static void oracle_case(kfac_optimizer *h, int dtype, const model_t *m, rng_t *r,
                        const curv_case_t *c) {
    const char *tag = dtype_tag(dtype);
    const int f32 = dtype == KFAC_FLOAT32, factored = c->strategy == KFAC_INVERSE_CHOLESKY;
    const double lambda = c->gamma > 0 ? c->gamma : c->lambda;
    /* Tolerances: the product is formed in the handle's precision from the factors read back;
     * the inverse and the round trip also carry the damped block's condition number (< 1e3). */
    const double tol_one = f32 ? 1e-4 : 1e-12, tol_inverse = f32 ? 1e-4 : 1e-12;
    set_case(h, c);
    grads_t V = grads_new(dtype, m, r), U = grads_clone(&V);
    size_t size = 0;
    unsigned char *img = save_image(h, &size);
    int st = curv_grads(h, +1, &U);
    check(st == KFAC_OK && kfac_optimizer_last_error(h)[0] == '\0',
          "[%s] %s: kfac_curvature_multiply(+1) over %d layers -> KFAC_OK (got %s: %s)", tag,
          c->name, m->n, status_name(st), kfac_optimizer_last_error(h));
    double diff[MAX_LAYERS], pi[MAX_LAYERS];
    against_oracle(h, dtype, &V, &U, factored, lambda, c->pi, +1, diff, pi);
    for (int l = 0; l < m->n; l++)
        check(diff[l] < tol_one,
              "[%s] %s, layer %d (%s): +1 equals the explicit damped Kronecker matrix times "
              "vec(V) per group (λ used %g, π %.4f; rel. diff %.1e < %.0e)",
              tag, c->name, l, CURV_LAYER[l], lambda, factored ? pi[l] : 1.0, diff[l], tol_one);
    check(image_is(h, img, size), "[%s] %s: +1 left the state image byte-identical", tag, c->name);
    free(img);

    /* Power −1 after the inverses: the oracle solve, +1 then −1, and kfac_layer_precondition_*. */
    REQUIRE_OK(h, kfac_optimizer_update_inverses(h));
    img = save_image(h, &size);
    grads_t R = grads_clone(&U), I = grads_clone(&V);
    st = curv_grads(h, -1, &R);
    const int st2 = curv_grads(h, -1, &I);
    check(st == KFAC_OK && st2 == KFAC_OK, "[%s] %s: kfac_curvature_multiply(-1) -> KFAC_OK (got %s, %s: %s)",
          tag, c->name, status_name(st), status_name(st2), kfac_optimizer_last_error(h));
    double worst_round = 0;
    for (int l = 0; l < m->n; l++) {
        static double have[512], v[512];
        const size_t n = layer_values(&R, l, have);
        layer_values(&V, l, v);
        worst_round = fmax(worst_round, rel_diff(have, v, n));
    }
    check(worst_round < tol_inverse,
          "[%s] %s: +1 then -1 gives V back on every layer (rel. diff %.1e < %.0e)", tag, c->name,
          worst_round, tol_inverse);
    against_oracle(h, dtype, &V, &I, factored, lambda, c->pi, -1, diff, pi);
    double worst_inverse = 0;
    for (int l = 0; l < m->n; l++) worst_inverse = fmax(worst_inverse, diff[l]);
    check(worst_inverse < tol_inverse,
          "[%s] %s: -1 solves the explicit damped Kronecker system on every layer (rel. diff "
          "%.1e < %.0e)", tag, c->name, worst_inverse, tol_inverse);
    for (int l = 0; l < m->n; l++) {
        buf_t w = buf_clone(&V.w[l]), b = {dtype, 0, NULL};
        if (V.b[l].p) b = buf_clone(&V.b[l]);
        st = precondition(h, l, &w, V.b[l].p ? &b : NULL);
        check(st == KFAC_OK && buf_same(&w, &I.w[l]) && (!V.b[l].p || buf_same(&b, &I.b[l])),
              "[%s] %s, layer %d: -1 is bitwise kfac_layer_precondition (%s)", tag, c->name, l,
              status_name(st));
        buf_free(&w);
        if (b.p) buf_free(&b);
    }
    check(image_is(h, img, size),
          "[%s] %s: -1 and kfac_layer_precondition left the state image byte-identical", tag, c->name);
    free(img);
    grads_free(&V);
    grads_free(&U);
    grads_free(&R);
    grads_free(&I);
}

/* A new λ: with the Cholesky strategy +1 uses it at once and −1 keeps the inverses' λ (bitwise)
 * until the next inverse update; with the eigen strategy −1 uses it at once. */
static void new_damping_case(kfac_optimizer *h, int dtype, const model_t *m, rng_t *r,
                             int strategy) {
    const char *tag = dtype_tag(dtype), *name = strategy == KFAC_INVERSE_EIGEN ? "eigen" : "Cholesky";
    const int f32 = dtype == KFAC_FLOAT32, factored = strategy == KFAC_INVERSE_CHOLESKY;
    const double tol_one = f32 ? 1e-4 : 1e-12, tol_inverse = f32 ? 1e-4 : 1e-12;
    const curv_case_t first = {"", strategy, 0.05, 0.0, 1};
    set_case(h, &first);
    REQUIRE_OK(h, kfac_optimizer_update_inverses(h));
    grads_t V = grads_new(dtype, m, r), before = grads_clone(&V);
    REQUIRE_OK(h, curv_grads(h, -1, &before));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, 0.2));
    grads_t one = grads_clone(&V), after = grads_clone(&V);
    REQUIRE_OK(h, curv_grads(h, +1, &one));
    REQUIRE_OK(h, curv_grads(h, -1, &after));
    double diff[MAX_LAYERS], pi[MAX_LAYERS];
    const double d_one = against_oracle(h, dtype, &V, &one, factored, 0.2, 1, +1, diff, pi);
    check(d_one < tol_one, "[%s] %s, λ 0.05 -> 0.2 after the inverses: +1 uses λ = 0.2 at once "
                           "(rel. diff %.1e)", tag, name, d_one);
    if (factored) {
        check(grads_same(&after, &before),
              "[%s] Cholesky, λ 0.05 -> 0.2: -1 still uses the inverses computed with 0.05 "
              "(bitwise the same as before the change)", tag);
        REQUIRE_OK(h, kfac_optimizer_update_inverses(h));
        grads_t again = grads_clone(&V);
        REQUIRE_OK(h, curv_grads(h, -1, &again));
        const double d = against_oracle(h, dtype, &V, &again, factored, 0.2, 1, -1, diff, pi);
        check(d < tol_inverse, "[%s] Cholesky, λ 0.2 after the next inverse update: -1 solves "
                               "with λ = 0.2 (rel. diff %.1e)", tag, d);
        grads_free(&again);
    } else {
        const double d = against_oracle(h, dtype, &V, &after, factored, 0.2, 1, -1, diff, pi);
        check(d < tol_inverse && !grads_same(&after, &before),
              "[%s] eigen, λ 0.05 -> 0.2 without an inverse update: -1 solves with λ = 0.2 at "
              "once (rel. diff %.1e)", tag, d);
    }
    grads_free(&V);
    grads_free(&before);
    grads_free(&one);
    grads_free(&after);
}

static void curvature_oracles(int dtype) {
    section(dtype == KFAC_FLOAT32 ? "experimental: kfac_curvature_multiply_f32 against the oracles"
                                  : "experimental: kfac_curvature_multiply_f64 against the oracles");
    const model_t m = curv_model();
    kfac_optimizer *h = curv_handle(dtype, &m);
    const char *tag = dtype_tag(dtype);

    /* The setup is what it claims: the grouped layers' factors have zeros off their blocks. */
    {
        buf_t A = buf_new(dtype, 64), G = buf_new(dtype, 25), A2 = buf_new(dtype, 16); /* 8x8, 5x5, 4x4 */
        REQUIRE_OK(h, get_factors(h, 1, &A, &G));
        REQUIRE_OK(h, get_factors(h, 2, &A2, NULL));
        check(buf_get(&A, 0 * 8 + 3) == 0 && buf_get(&A, 0 * 8 + 7) == 0 && buf_get(&A, 0 * 8 + 1) != 0 &&
                  buf_get(&G, 0 * 5 + 2) == 0 && buf_get(&G, 0 * 5 + 1) != 0 &&
                  buf_get(&A2, 0 * 4 + 2) == 0 && buf_get(&A2, 0 * 4 + 3) == 0 &&
                  buf_get(&A2, 0 * 4 + 1) != 0,
              "[%s] setup: the grouped layers' factors are block diagonal (zeros across input "
              "groups, the bias and output groups; non-zero inside a block)", tag);
        buf_free(&A);
        buf_free(&G);
        buf_free(&A2);
    }

    const curv_case_t cases[] = {
        {"eigen, λ 0.05", KFAC_INVERSE_EIGEN, 0.05, 0.0, 1},
        {"eigen, λ 0.05, π damping 0 (no effect)", KFAC_INVERSE_EIGEN, 0.05, 0.0, 0},
        {"Cholesky with π, λ 0.05", KFAC_INVERSE_CHOLESKY, 0.05, 0.0, 1},
        {"Cholesky, π damping 0 (π = 1), λ 0.05", KFAC_INVERSE_CHOLESKY, 0.05, 0.0, 0},
        {"eigen, λ 0.05, factor damping γ 0.3", KFAC_INVERSE_EIGEN, 0.05, 0.3, 1},
        {"Cholesky with π, λ 0.05, factor damping γ 0.3", KFAC_INVERSE_CHOLESKY, 0.05, 0.3, 1},
        {"Cholesky, π = 1, λ 2, factor damping γ 0.01", KFAC_INVERSE_CHOLESKY, 2.0, 0.01, 0},
    };
    rng_t r = {dtype == KFAC_FLOAT32 ? 5151u : 6161u};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) oracle_case(h, dtype, &m, &r, &cases[i]);
    new_damping_case(h, dtype, &m, &r, KFAC_INVERSE_CHOLESKY);
    new_damping_case(h, dtype, &m, &r, KFAC_INVERSE_EIGEN);
    kfac_optimizer_free(h);
}

/* ------------------------------------------------------------------------------------------ */
/* 2. Errors on twin handles                                                                   */
/* ------------------------------------------------------------------------------------------ */

/* A bad call on twin 1 (B) with the buffers of g; every buffer must be byte-identical to keep. */
#define CURV_BAD(call, want, what, round)                                                      \
    do {                                                                                       \
        const int curv_status_ = bad_call(B, (call));                                          \
        after_bad(&t, curv_status_, (want), (what), (round), grads_same(&g, &keep));            \
    } while (0)

/* A valid call on twin 1 only: succeeds with an empty message, changes the buffers, leaves
 * both twins' state images identical; the same call on twin 0 gives bitwise the same product;
 * then (if `round`) an identical next round. */
static void valid_on_b(twins_t *t, int32_t power, const char *what, int round) {
    rng_t r = {0xC0FFEEu + (uint64_t)power};
    grads_t v = grads_new(t->dtype, &t->model, &r), b = grads_clone(&v), a = grads_clone(&v);
    const int st = curv_grads(t->h[1], power, &b);
    const int message_ok = kfac_optimizer_last_error(t->h[1])[0] == '\0';
    const int state_ok = same_state(t->h[0], t->h[1]);
    const int st0 = curv_grads(t->h[0], power, &a);
    char why[512] = "";
    const int round_ok = !round || twins_round(t, why, sizeof why);
    check(st == KFAC_OK && st0 == KFAC_OK && message_ok && state_ok && !grads_same(&b, &v) &&
              grads_same(&a, &b) && round_ok,
          "[%s] %s -> KFAC_OK (got %s: %s)%s%s%s%s on twin 1 only: the twins' state images stay "
          "identical, twin 0 gives bitwise the same product%s", dtype_tag(t->dtype), what,
          status_name(st), kfac_optimizer_last_error(t->h[1]), message_ok ? "" : "; MESSAGE NOT EMPTY",
          state_ok ? "" : "; STATE CHANGED", grads_same(&a, &b) ? "" : "; TWINS DIFFER",
          round_ok ? "" : why, round ? ", the next round is identical" : "");
    grads_free(&v);
    grads_free(&b);
    grads_free(&a);
}

/* Records one batch on layer `only` of every twin (the other layers get nothing). */
static void twins_record_layer(twins_t *t, int only) {
    const layer_spec_t *s = &t->model.l[only];
    buf_t x = buf_new(t->dtype, (size_t)(4 * spec_x_values(s))), g = buf_new(t->dtype, (size_t)(4 * spec_g_values(s)));
    buf_random(&x, &t->rng);
    buf_random(&g, &t->rng);
    for (int i = 0; i < t->n; i++) {
        REQUIRE_OK(t->h[i], record_inputs(t->h[i], only, &x, 4));
        REQUIRE_OK(t->h[i], record_grads(t->h[i], only, &g, 4));
    }
    buf_free(&x);
    buf_free(&g);
}

static void twins_all(twins_t *t, int (*fn)(kfac_optimizer *)) {
    for (int i = 0; i < t->n; i++) REQUIRE_OK(t->h[i], fn(t->h[i]));
}

static void curvature_errors(int dtype) {
    section(dtype == KFAC_FLOAT32 ? "experimental: kfac_curvature_multiply_f32 errors (twins)"
                                  : "experimental: kfac_curvature_multiply_f64 errors (twins)");
    twins_t t = twins_new(dtype, dtype == KFAC_FLOAT32 ? 8101u : 8202u);
    kfac_optimizer *B = t.h[1];
    const int dt = dtype, od = other_dtype(dtype);
    /* TWIN_MODEL: layer 0 dense 5->4 with bias, layer 1 dense 4->3 without. */
    rng_t r = {dtype == KFAC_FLOAT32 ? 77u : 88u};
    grads_t g = grads_new(dt, &t.model, &r), keep = grads_clone(&g);
    void *w[MAX_LAYERS], *b[MAX_LAYERS];
    grads_arrays(&g, w, b);

    /* Before any statistics: NO_STATISTICS for either power. */
    CURV_BAD(curv_raw(B, dt, +1, w, b, 2), KFAC_ERROR_NO_STATISTICS, "kfac_curvature_multiply(+1) before any statistics", 0);
    CURV_BAD(curv_raw(B, dt, -1, w, b, 2), KFAC_ERROR_NO_STATISTICS, "kfac_curvature_multiply(-1) before any statistics", 0);

    /* Layer 0 folded, layer 1 not: NO_STATISTICS, and layer 0's buffer untouched too. */
    twins_record_layer(&t, 0);
    twins_all(&t, kfac_optimizer_update_factors);
    CURV_BAD(curv_raw(B, dt, +1, w, b, 2), KFAC_ERROR_NO_STATISTICS,
             "kfac_curvature_multiply(+1) with factors for layer 0 only (layer 0's buffers untouched)", 0);

    /* Every layer folded, no inverses: +1 works, −1 is NO_INVERSES. */
    check(twins_record(&t), "[%s] (a batch recorded on both twins)", dtype_tag(dt));
    twins_all(&t, kfac_optimizer_update_factors);
    CURV_BAD(curv_raw(B, dt, -1, w, b, 2), KFAC_ERROR_NO_INVERSES,
             "kfac_curvature_multiply(-1) with factors but before any inverses", 0);
    valid_on_b(&t, +1, "kfac_curvature_multiply(+1) with factors, no inverses", 0);

    /* Inverses: both powers work. */
    twins_all(&t, kfac_optimizer_update_inverses);
    valid_on_b(&t, +1, "kfac_curvature_multiply(+1) with inverses", 1);
    valid_on_b(&t, -1, "kfac_curvature_multiply(-1) with inverses", 1);

    /* The error table; each bad call is followed by an identical round on both twins. */
    void *w_null0[MAX_LAYERS], *w_null1[MAX_LAYERS], *b_null0[MAX_LAYERS], *b_extra1[MAX_LAYERS];
    memcpy(w_null0, w, sizeof w);
    memcpy(w_null1, w, sizeof w);
    memcpy(b_null0, b, sizeof b);
    memcpy(b_extra1, b, sizeof b);
    w_null0[0] = NULL;
    w_null1[1] = NULL;
    b_null0[0] = NULL;
    b_extra1[1] = g.w[1].p; /* a buffer with enough values, for the layer without bias */
    CURV_BAD(curv_raw(B, dt, +1, NULL, b, 2), KFAC_ERROR_NULL_POINTER, "kfac_curvature_multiply(weights = NULL)", 1);
    CURV_BAD(curv_raw(B, dt, -1, NULL, b, 2), KFAC_ERROR_NULL_POINTER, "kfac_curvature_multiply(-1, weights = NULL)", 1);
    CURV_BAD(curv_raw(B, dt, +1, w_null0, b, 2), KFAC_ERROR_NULL_POINTER, "kfac_curvature_multiply(weights[0] = NULL)", 1);
    CURV_BAD(curv_raw(B, dt, +1, w_null1, b, 2), KFAC_ERROR_NULL_POINTER, "kfac_curvature_multiply(weights[1] = NULL)", 1);
    CURV_BAD(curv_raw(B, dt, +1, w, NULL, 2), KFAC_ERROR_NULL_POINTER,
             "kfac_curvature_multiply(biases = NULL, layer 0 has a bias)", 1);
    CURV_BAD(curv_raw(B, dt, -1, w, b_null0, 2), KFAC_ERROR_NULL_POINTER,
             "kfac_curvature_multiply(-1, biases[0] = NULL, layer 0 has a bias)", 1);
    CURV_BAD(curv_raw(B, dt, +1, w, b_extra1, 2), KFAC_ERROR_INVALID_ARGUMENT,
             "kfac_curvature_multiply(biases[1] given, layer 1 has none)", 1);
    CURV_BAD(curv_raw(B, dt, -1, w, b_extra1, 2), KFAC_ERROR_INVALID_ARGUMENT,
             "kfac_curvature_multiply(-1, biases[1] given, layer 1 has none)", 1);
    const int32_t bad_counts[] = {0, 1, 3, -1, INT32_MIN, INT32_MAX};
    for (size_t i = 0; i < sizeof bad_counts / sizeof bad_counts[0]; i++) {
        char what[128];
        snprintf(what, sizeof what, "kfac_curvature_multiply(n_layers = %d, 2 registered)", (int)bad_counts[i]);
        CURV_BAD(curv_raw(B, dt, +1, w, b, bad_counts[i]), KFAC_ERROR_INVALID_SIZE, what, 1);
    }
    const int32_t bad_powers[] = {0, 2, -2, 3, INT32_MIN, INT32_MAX};
    for (size_t i = 0; i < sizeof bad_powers / sizeof bad_powers[0]; i++) {
        char what[128];
        snprintf(what, sizeof what, "kfac_curvature_multiply(power = %d)", (int)bad_powers[i]);
        CURV_BAD(curv_raw(B, dt, bad_powers[i], w, b, 2), KFAC_ERROR_INVALID_ARGUMENT, what, 1);
    }
    {
        /* The other precision's entry point, with correctly typed buffers of that precision. */
        rng_t r2 = {99};
        grads_t o = grads_new(od, &t.model, &r2), o_keep = grads_clone(&o);
        void *ow[MAX_LAYERS], *ob[MAX_LAYERS];
        grads_arrays(&o, ow, ob);
        const int st1 = bad_call(B, curv_raw(B, od, +1, ow, ob, 2));
        after_bad(&t, st1, KFAC_ERROR_DTYPE_MISMATCH,
                  dt == KFAC_FLOAT32 ? "kfac_curvature_multiply_f64 on a float32 handle (+1)"
                                     : "kfac_curvature_multiply_f32 on a float64 handle (+1)",
                  1, grads_same(&o, &o_keep));
        const int st2 = bad_call(B, curv_raw(B, od, -1, ow, ob, 2));
        after_bad(&t, st2, KFAC_ERROR_DTYPE_MISMATCH,
                  dt == KFAC_FLOAT32 ? "kfac_curvature_multiply_f64 on a float32 handle (-1)"
                                     : "kfac_curvature_multiply_f32 on a float64 handle (-1)",
                  1, grads_same(&o, &o_keep));
        grads_free(&o);
        grads_free(&o_keep);
    }
    /* NaN/Inf in V: one bad value, in either layer, weights or bias. */
    const struct {
        int layer, bias;
        size_t index;
        double value;
        int32_t power;
        const char *what;
    } poison[] = {
        {1, 0, 5, NAN, +1, "kfac_curvature_multiply(+1, NaN in layer 1's weights)"},
        {1, 0, 0, -INFINITY, -1, "kfac_curvature_multiply(-1, -Inf in layer 1's weights)"},
        {0, 0, 19, INFINITY, +1, "kfac_curvature_multiply(+1, Inf in layer 0's last weight)"},
        {0, 1, 3, NAN, -1, "kfac_curvature_multiply(-1, NaN in layer 0's bias)"},
        {0, 1, 0, INFINITY, +1, "kfac_curvature_multiply(+1, Inf in layer 0's bias)"},
    };
    for (size_t i = 0; i < sizeof poison / sizeof poison[0]; i++) {
        buf_t *target = poison[i].bias ? &g.b[poison[i].layer] : &g.w[poison[i].layer];
        buf_t *target_keep = poison[i].bias ? &keep.b[poison[i].layer] : &keep.w[poison[i].layer];
        buf_set(target, poison[i].index, poison[i].value);
        buf_set(target_keep, poison[i].index, poison[i].value);
        CURV_BAD(curv_raw(B, dt, poison[i].power, w, b, 2), KFAC_ERROR_NON_FINITE, poison[i].what, 1);
        const double fine = 0.25;
        buf_set(target, poison[i].index, fine);
        buf_set(target_keep, poison[i].index, fine);
    }

    /* The strategy changes on both twins: the inverses are discarded, −1 is NO_INVERSES again. */
    const int64_t other_strategy = KFAC_INVERSE_CHOLESKY; /* the default is eigen */
    for (int i = 0; i < t.n; i++)
        REQUIRE_OK(t.h[i], kfac_param_set_int(t.h[i], KFAC_PARAM_INVERSE_STRATEGY, other_strategy));
    CURV_BAD(curv_raw(B, dt, -1, w, b, 2), KFAC_ERROR_NO_INVERSES,
             "kfac_curvature_multiply(-1) after a change of strategy, before new inverses", 0);
    valid_on_b(&t, +1, "kfac_curvature_multiply(+1) after a change of strategy (Cholesky)", 0);
    twins_all(&t, kfac_optimizer_update_inverses);
    valid_on_b(&t, -1, "kfac_curvature_multiply(-1) with the Cholesky inverses", 1);

    /* A product that overflows: finite V whose product is not finite. λ = 10 on both twins
     * makes λV alone overflow for V near the largest finite value. Only one layer overflows;
     * neither layer's buffers may be written. Both strategies. */
    for (int i = 0; i < t.n; i++) REQUIRE_OK(t.h[i], kfac_param_set_double(t.h[i], KFAC_PARAM_DAMPING, 10.0));
    const double huge = dt == KFAC_FLOAT32 ? 3.0e38 : 1.0e308;
    for (int strategy = KFAC_INVERSE_CHOLESKY; strategy <= KFAC_INVERSE_EIGEN; strategy++) {
        for (int i = 0; i < t.n; i++)
            REQUIRE_OK(t.h[i], kfac_param_set_int(t.h[i], KFAC_PARAM_INVERSE_STRATEGY, strategy));
        for (int which = 1; which >= 0; which--) {
            for (size_t k = 0; k < g.w[which].n; k++) {
                const double v = (k % 2 ? -huge : huge);
                buf_set(&g.w[which], k, v);
                buf_set(&keep.w[which], k, v);
            }
            char what[200];
            snprintf(what, sizeof what,
                     "kfac_curvature_multiply(+1, %s, λ 10, layer %d's weights ±%g: its product "
                     "overflows, the other layer's is finite; every buffer untouched)",
                     strategy == KFAC_INVERSE_EIGEN ? "eigen" : "Cholesky", which, huge);
            CURV_BAD(curv_raw(B, dt, +1, w, b, 2), KFAC_ERROR_NON_FINITE, what, 1);
            for (size_t k = 0; k < g.w[which].n; k++) {
                const double v = 0.5 * rng_sym(&r);
                buf_set(&g.w[which], k, v);
                buf_set(&keep.w[which], k, v);
            }
        }
    }

    /* Between a step and its solve: valid and failing products leave the directions awaiting
     * the solve alone (the state image does not hold them). */
    {
        char why[512] = "";
        check(twins_round(&t, why, sizeof why), "[%s] (a round: a step on both twins) %s", dtype_tag(dt), why);
        grads_t v = grads_clone(&g);
        const int st_one = curv_grads(B, +1, &v);
        const int st_inv = curv_grads(B, -1, &v);
        buf_set(&v.w[1], 0, NAN);
        const int st_bad = curv_grads(B, +1, &v);
        check(st_one == KFAC_OK && st_inv == KFAC_OK && st_bad == KFAC_ERROR_NON_FINITE &&
                  twins_adaptive_agree(&t, why, sizeof why),
              "[%s] kfac_curvature_multiply(+1), (-1) and a failing (+1) on twin 1 between a step "
              "and its solve: both twins then solve and report bitwise alike%s%s",
              dtype_tag(dt), why[0] ? ": " : "", why);
        grads_free(&v);
    }

    grads_free(&g);
    grads_free(&keep);
    twins_free(&t);
}

/* ------------------------------------------------------------------------------------------ */

void test_curvature_multiply(void) {
    section("experimental: kfac_curvature_multiply_* with a NULL handle");
    float f[32] = {0};
    double d[32] = {0};
    float *fp[2] = {f, f};
    double *dp[2] = {d, d};
    expect_null_handle(kfac_curvature_multiply_f32(NULL, 1, fp, fp, 2), KFAC_ERROR_NULL_POINTER,
                       "kfac_curvature_multiply_f32(+1)");
    expect_null_handle(kfac_curvature_multiply_f32(NULL, -1, fp, NULL, 2), KFAC_ERROR_NULL_POINTER,
                       "kfac_curvature_multiply_f32(-1)");
    expect_null_handle(kfac_curvature_multiply_f64(NULL, 1, dp, dp, 2), KFAC_ERROR_NULL_POINTER,
                       "kfac_curvature_multiply_f64(+1)");
    expect_null_handle(kfac_curvature_multiply_f64(NULL, 0, NULL, NULL, 0), KFAC_ERROR_NULL_POINTER,
                       "kfac_curvature_multiply_f64(power 0, everything NULL)");
    int untouched = 1;
    for (int i = 0; i < 32; i++) untouched = untouched && f[i] == 0 && d[i] == 0;
    check(untouched, "NULL handle: kfac_curvature_multiply_* leaves the buffers untouched");

    curvature_oracles(KFAC_FLOAT64);
    curvature_oracles(KFAC_FLOAT32);
    curvature_errors(KFAC_FLOAT32);
    curvature_errors(KFAC_FLOAT64);
}
