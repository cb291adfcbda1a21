/*
 * test_kfra.c — KFRA on the dense chain (kfac_gn_chain_record_kfra_*), compiled with
 * KFAC_EXPERIMENTAL_API.
 *
 *   1. Oracles, float32 and float64, the three distributions, on a 3 →(tanh) 4 → 2 net:
 *      - at N = 1, KFRA's factors (A from the chain's inputs) equal KFLR's
 *        (kfac_gn_chain_record_columns with FACTOR, A recorded by the caller);
 *      - at N = 6, Ḡ of both layers against the recursion written out here per example, for the
 *        GGN and the Hessian variant (D̄ from output gradients given here).
 *   2. Misuse on twin handles (after_bad: status, messages, identical state images, an identical
 *      next round): variant, record_inputs, NULL or NaN output gradients for HESSIAN, other dtype,
 *      NULL handle, no forward pass; then a valid KFRA record on every twin and a round.
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"

#include <math.h>

enum { KX = 3, KH = 4, KZ = 2, KN = 6 };

static int record_kfra(kfac_optimizer *h, int dtype, int32_t variant, int32_t inputs, const void *grads) {
    return dtype == KFAC_FLOAT32 ? kfac_gn_chain_record_kfra_f32(h, variant, inputs, grads)
                                 : kfac_gn_chain_record_kfra_f64(h, variant, inputs, grads);
}

static int forward(kfac_optimizer *h, int dtype, void *const *w, void *const *b, void *const *a, int64_t rows) {
    if (dtype == KFAC_FLOAT32)
        return kfac_gn_chain_forward_f32(h, (const float *const *)w, (const float *const *)b, (const float *const *)a, NULL, rows, NULL);
    return kfac_gn_chain_forward_f64(h, (const double *const *)w, (const double *const *)b, (const double *const *)a, NULL, rows, NULL);
}

static double at(const buf_t *b, size_t i) {
    return b->dtype == KFAC_FLOAT32 ? ((const float *)b->p)[i] : ((const double *)b->p)[i];
}

/* B at z for the distribution, written out. */
static void out_hessian(int dist, const double *z, double B[KZ][KZ]) {
    double p[KZ];
    if (dist == KFAC_DIST_CATEGORICAL) {
        double m = z[0] > z[1] ? z[0] : z[1], t = 0;
        for (int i = 0; i < KZ; i++) t += exp(z[i] - m);
        for (int i = 0; i < KZ; i++) p[i] = exp(z[i] - m) / t;
    } else {
        for (int i = 0; i < KZ; i++) p[i] = 1 / (1 + exp(-z[i]));
    }
    for (int i = 0; i < KZ; i++)
        for (int j = 0; j < KZ; j++)
            B[i][j] = dist == KFAC_DIST_CATEGORICAL ? (i == j ? p[i] : 0) - p[i] * p[j]
                    : dist == KFAC_DIST_BERNOULLI   ? (i == j ? p[i] * (1 - p[i]) : 0)
                                                    : (i == j ? 1 : 0);
}

static kfac_optimizer *net_handle(int dtype, int dist) {
    kfac_optimizer *h = NULL;
    int32_t id, layers[2] = {0, 1}, acts[2] = {KFAC_ACTIVATION_TANH, KFAC_ACTIVATION_IDENTITY};
    if (kfac_optimizer_create(dtype, &h) != KFAC_OK || add_dense(h, KX, KH, 1, &id) != KFAC_OK ||
        add_dense(h, KH, KZ, 0, &id) != KFAC_OK || kfac_gn_chain_define(h, layers, acts, 2, dist) != KFAC_OK) {
        kfac_optimizer_free(h);
        return NULL;
    }
    return h;
}

static void test_oracles(int dtype, int dist) {
    rng_t r = {81 + (uint64_t)dist};
    buf_t w0 = buf_new(dtype, KH * KX), b0 = buf_new(dtype, KH), w1 = buf_new(dtype, KZ * KH), x = buf_new(dtype, KN * KX),
          g = buf_new(dtype, KN * KZ);
    buf_random(&w0, &r); buf_random(&b0, &r); buf_random(&w1, &r); buf_random(&x, &r); buf_random(&g, &r);
    void *w[2] = {w0.p, w1.p}, *b[2] = {b0.p, NULL}, *a[2] = {x.p, NULL};
    const double tol = dtype == KFAC_FLOAT32 ? 2e-5 : 1e-12;
    /* N = 1: KFRA = KFLR. */
    kfac_optimizer *kflr = net_handle(dtype, dist), *kfra = net_handle(dtype, dist);
    int ok = kflr && kfra && forward(kflr, dtype, w, b, a, 1) == KFAC_OK && kfac_gn_chain_record_columns(kflr, KFAC_COLUMNS_FACTOR) == KFAC_OK &&
             record_inputs(kflr, 0, &x, 1) == KFAC_OK;
    buf_t a1 = buf_new(dtype, KH);   /* layer 1's inputs tanh(W0 x + b0) for example 0 */
    for (int j = 0; j < KH; j++) {
        double s = at(&b0, j);
        for (int i = 0; i < KX; i++) s += at(&w0, j * KX + i) * at(&x, i);
        buf_set(&a1, j, tanh(s));
    }
    ok = ok && record_inputs(kflr, 1, &a1, 1) == KFAC_OK && kfac_optimizer_update_factors(kflr) == KFAC_OK;
    ok = ok && forward(kfra, dtype, w, b, a, 1) == KFAC_OK && record_kfra(kfra, dtype, KFAC_KFRA_GGN, 1, NULL) == KFAC_OK &&
         kfac_optimizer_update_factors(kfra) == KFAC_OK;
    double worst = 0;
    for (int l = 0; ok && l < 2; l++) {
        const int da = l == 0 ? KX + 1 : KH, dg = l == 0 ? KH : KZ;
        buf_t fa[2] = {buf_new(dtype, da * da), buf_new(dtype, da * da)}, fg[2] = {buf_new(dtype, dg * dg), buf_new(dtype, dg * dg)};
        ok &= get_factors(kflr, l, &fa[0], &fg[0]) == KFAC_OK && get_factors(kfra, l, &fa[1], &fg[1]) == KFAC_OK;
        for (int i = 0; i < dg * dg; i++) worst = fmax(worst, fabs(at(&fg[1], i) - at(&fg[0], i)));
        for (int i = 0; i < da * da; i++) worst = fmax(worst, fabs(at(&fa[1], i) - at(&fa[0], i)));
        for (int i = 0; i < 2; i++) { buf_free(&fa[i]); buf_free(&fg[i]); }
    }
    check(ok && worst < tol, "[%s] dist %d: KFRA = KFLR at N = 1 (both layers, A and G; max difference %.2g)", dtype_tag(dtype), dist, worst);
    kfac_optimizer_free(kflr);
    kfac_optimizer_free(kfra);
    /* N = 6: the recursion written out, GGN and Hessian. */
    for (int variant = 0; variant < 2; variant++) {
        double G1[KZ][KZ] = {{0}}, M[KH][KH], E[KH][KH] = {{0}}, D[KH] = {0}, G0[KH][KH];
        double phi1[KN][KH], phi2[KN][KH];
        for (int n = 0; n < KN; n++) {
            double z[KZ] = {0}, B[KZ][KZ], t[KH];
            for (int j = 0; j < KH; j++) {
                double s = at(&b0, j);
                for (int i = 0; i < KX; i++) s += at(&w0, j * KX + i) * at(&x, n * KX + i);
                t[j] = tanh(s);
                phi1[n][j] = 1 - t[j] * t[j];
                phi2[n][j] = -2 * t[j] * (1 - t[j] * t[j]);
            }
            for (int k = 0; k < KZ; k++) for (int j = 0; j < KH; j++) z[k] += at(&w1, k * KH + j) * t[j];
            out_hessian(dist, z, B);
            for (int i = 0; i < KZ; i++) for (int j = 0; j < KZ; j++) G1[i][j] += B[i][j] / KN;
            for (int i = 0; i < KH; i++) {
                for (int j = 0; j < KH; j++) E[i][j] += phi1[n][i] * phi1[n][j] / KN;
                double da = 0;   /* ∂ℓ/∂a_i = (W1ᵀ g)_i */
                for (int k = 0; k < KZ; k++) da += at(&w1, k * KH + i) * at(&g, n * KZ + k);
                D[i] += phi2[n][i] * da / KN;
            }
        }
        for (int i = 0; i < KH; i++)
            for (int j = 0; j < KH; j++) {
                M[i][j] = 0;
                for (int p = 0; p < KZ; p++) for (int q = 0; q < KZ; q++) M[i][j] += at(&w1, p * KH + i) * G1[p][q] * at(&w1, q * KH + j);
                G0[i][j] = M[i][j] * E[i][j] + (variant == KFAC_KFRA_HESSIAN && i == j ? D[i] : 0);
            }
        kfac_optimizer *h = net_handle(dtype, dist);
        buf_t fa0 = buf_new(dtype, (KX + 1) * (KX + 1)), fg0 = buf_new(dtype, KH * KH), fa1 = buf_new(dtype, KH * KH),
              fg1 = buf_new(dtype, KZ * KZ);
        ok = h && forward(h, dtype, w, b, a, KN) == KFAC_OK && record_kfra(h, dtype, variant, 1, g.p) == KFAC_OK &&
             kfac_optimizer_update_factors(h) == KFAC_OK && get_factors(h, 0, &fa0, &fg0) == KFAC_OK &&
             get_factors(h, 1, &fa1, &fg1) == KFAC_OK;
        double e = 0, m = 0;
        for (int i = 0; i < KH; i++) for (int j = 0; j < KH; j++) { e = fmax(e, fabs(at(&fg0, i * KH + j) - G0[i][j])); m = fmax(m, fabs(G0[i][j])); }
        for (int i = 0; i < KZ; i++) for (int j = 0; j < KZ; j++) { e = fmax(e, fabs(at(&fg1, i * KZ + j) - G1[i][j])); m = fmax(m, fabs(G1[i][j])); }
        check(ok && e / m < tol, "[%s] dist %d: KFRA %s at N = %d = the recursion written out (relative %.2g)", dtype_tag(dtype), dist,
              variant ? "Hessian" : "GGN", KN, e / m);
        buf_free(&fa0); buf_free(&fg0); buf_free(&fa1); buf_free(&fg1);
        kfac_optimizer_free(h);
    }
    buf_free(&w0); buf_free(&b0); buf_free(&w1); buf_free(&x); buf_free(&g); buf_free(&a1);
}

/* Twins of TWIN_MODEL (5 -> 4 with bias -> 3): chain 0 →(tanh) 1, categorical, 4 examples. */
static void test_twins(int dtype) {
    twins_t t = twins_new(dtype, 83);
    kfac_optimizer *B = t.h[1];
    rng_t r = {84};
    enum { R = 4 };
    buf_t w0 = buf_new(dtype, 20), b0 = buf_new(dtype, 4), w1 = buf_new(dtype, 12), x = buf_new(dtype, R * 5),
          g = buf_new(dtype, R * 3), wrong = buf_new(other_dtype(dtype), R * 3);
    buf_random(&w0, &r); buf_random(&b0, &r); buf_random(&w1, &r); buf_random(&x, &r); buf_random(&g, &r);
    void *w[2] = {w0.p, w1.p}, *b[2] = {b0.p, NULL}, *a[2] = {x.p, NULL};
    int32_t layers[2] = {0, 1}, acts[2] = {KFAC_ACTIVATION_TANH, KFAC_ACTIVATION_IDENTITY};
    int ok = 1;
    for (int i = 0; i < t.n; i++) ok &= kfac_gn_chain_define(t.h[i], layers, acts, 2, KFAC_DIST_CATEGORICAL) == KFAC_OK;
    check(ok, "[%s] KFRA twins: chain defined on every twin", dtype_tag(dtype));
    BAD(record_kfra(B, dtype, KFAC_KFRA_GGN, 1, NULL), KFAC_ERROR_NO_COLUMNS, "record kfra before the forward pass");
    ok = 1;
    for (int i = 0; i < t.n; i++) ok &= forward(t.h[i], dtype, w, b, a, R) == KFAC_OK;
    check(ok, "[%s] KFRA twins: chain forward on every twin", dtype_tag(dtype));
    BAD(record_kfra(B, dtype, 2, 1, g.p), KFAC_ERROR_INVALID_ARGUMENT, "record kfra: variant 2");
    BAD(record_kfra(B, dtype, -1, 0, NULL), KFAC_ERROR_INVALID_ARGUMENT, "record kfra: variant -1");
    BAD(record_kfra(B, dtype, KFAC_KFRA_GGN, 2, NULL), KFAC_ERROR_INVALID_ARGUMENT, "record kfra: record_inputs 2");
    BAD(record_kfra(B, dtype, KFAC_KFRA_HESSIAN, 1, NULL), KFAC_ERROR_NULL_POINTER, "record kfra: HESSIAN without output gradients");
    buf_set(&g, 5, NAN);
    BAD(record_kfra(B, dtype, KFAC_KFRA_HESSIAN, 1, g.p), KFAC_ERROR_NON_FINITE, "record kfra: NaN output gradient");
    buf_set(&g, 5, 0.5);
    BAD(record_kfra(B, other_dtype(dtype), KFAC_KFRA_HESSIAN, 1, wrong.p), KFAC_ERROR_DTYPE_MISMATCH, "record kfra: other dtype");
    check(record_kfra(NULL, dtype, KFAC_KFRA_GGN, 1, NULL) == KFAC_ERROR_NULL_POINTER, "[%s] record kfra: NULL handle", dtype_tag(dtype));
    ok = 1;
    for (int i = 0; i < t.n; i++) ok &= record_kfra(t.h[i], dtype, KFAC_KFRA_HESSIAN, 0, g.p) == KFAC_OK &&
                                       record_kfra(t.h[i], dtype, KFAC_KFRA_GGN, 0, NULL) == KFAC_OK;
    char why[256] = "";
    ok = ok && same_state(t.h[0], t.h[1]) && twins_round(&t, why, sizeof why);
    check(ok, "[%s] KFRA twins: a valid KFRA record on every twin, identical images, then an identical round %s", dtype_tag(dtype), why);
    buf_free(&w0); buf_free(&b0); buf_free(&w1); buf_free(&x); buf_free(&g); buf_free(&wrong);
    twins_free(&t);
}

void test_kfra(void) {
    section("KFRA on the dense chain (experimental)");
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        for (int dist = 0; dist < 3; dist++) test_oracles(dtype, dist);
        test_twins(dtype);
    }
}
