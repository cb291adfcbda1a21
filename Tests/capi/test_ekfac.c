/*
 * test_ekfac.c — the experimental EKFAC section: the strategy KFAC_INVERSE_EKFAC,
 * kfac_layer_record_examples_* and kfac_layer_get_ekfac_scaling_*, compiled with
 * KFAC_EXPERIMENTAL_API.
 *
 *   1. Oracles, float32 and float64: a dense 4->3 layer with bias recording sequences of T = 2
 *      rows (per-example and per-row modes) and a dense 3->2 layer without bias (T = 1). The
 *      factors are read back, eigendecomposed here (cyclic Jacobi, ascending eigenvalues, the
 *      order the header documents for the readout), the per-example gradients G_n are summed
 *      from the rows here, and S = (1/R) Σ_n (Q_Gᵀ G_n Q_A)^∘2 is compared with the readout.
 *      kfac_layer_precondition_* against a dense solve of (Ũ diag(S) Ũᵀ + λI) vec(U) = vec(V),
 *      kfac_curvature_multiply_*(+1) against Ũ diag(S + λ) Ũᵀ vec(V), and the Frobenius
 *      distance to the explicit empirical Fisher never above K-FAC's A ⊗ G.
 *   2. Errors on twin handles with the EKFAC strategy and pending per-example gradients
 *      (after_bad: status, messages, identical state images, an identical next round), the
 *      readout buffer byte-compared: NULL pointers, rows and rows_per_example, layers, groups,
 *      NaN and overflowing values, DTYPE_MISMATCH, NO_INVERSES; NULL handles.
 *   3. A state image with pending per-example gradients resumes bit for bit.
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"
#include "oracles.h"

#include <float.h>
#include <math.h>

static int record_examples_raw(kfac_optimizer *h, int dtype, int32_t layer, const void *x, const void *g,
                               int64_t rows, int64_t rows_per_example) {
    if (dtype == KFAC_FLOAT32)
        return kfac_layer_record_examples_f32(h, layer, x, g, rows, rows_per_example);
    return kfac_layer_record_examples_f64(h, layer, x, g, rows, rows_per_example);
}

static int record_examples(kfac_optimizer *h, int32_t layer, const buf_t *x, const buf_t *g, int64_t rows,
                           int64_t rows_per_example) {
    return record_examples_raw(h, x->dtype, layer, x->p, g->p, rows, rows_per_example);
}

static int get_scaling(const kfac_optimizer *h, int dtype, int32_t layer, int32_t group, void *s) {
    if (dtype == KFAC_FLOAT32) return kfac_layer_get_ekfac_scaling_f32(h, layer, group, s);
    return kfac_layer_get_ekfac_scaling_f64(h, layer, group, s);
}

static double get(const buf_t *b, size_t i) {
    return b->dtype == KFAC_FLOAT32 ? (double)((const float *)b->p)[i] : ((const double *)b->p)[i];
}

/* Eigendecomposition of a symmetric n×n matrix by cyclic Jacobi rotations (a is destroyed):
 * values d ascending, vectors as the columns of v (n×n row-major). */
static void jacobi(double *a, int n, double *d, double *v) {
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) v[i * n + j] = i == j;
    for (int sweep = 0; sweep < 100; sweep++) {
        double off = 0;
        for (int p = 0; p < n; p++)
            for (int q = p + 1; q < n; q++) off += a[p * n + q] * a[p * n + q];
        if (off < 1e-300) break;
        for (int p = 0; p < n; p++) {
            for (int q = p + 1; q < n; q++) {
                if (a[p * n + q] == 0) continue;
                const double theta = (a[q * n + q] - a[p * n + p]) / (2 * a[p * n + q]);
                const double t = (theta >= 0 ? 1 : -1) / (fabs(theta) + sqrt(theta * theta + 1));
                const double c = 1 / sqrt(t * t + 1), s = t * c;
                for (int k = 0; k < n; k++) { /* A ← A J (columns p, q) */
                    const double akp = a[k * n + p], akq = a[k * n + q];
                    a[k * n + p] = c * akp - s * akq;
                    a[k * n + q] = s * akp + c * akq;
                }
                for (int k = 0; k < n; k++) { /* A ← Jᵀ A (rows p, q) */
                    const double apk = a[p * n + k], aqk = a[q * n + k];
                    a[p * n + k] = c * apk - s * aqk;
                    a[q * n + k] = s * apk + c * aqk;
                }
                for (int k = 0; k < n; k++) {
                    const double vkp = v[k * n + p], vkq = v[k * n + q];
                    v[k * n + p] = c * vkp - s * vkq;
                    v[k * n + q] = s * vkp + c * vkq;
                }
            }
        }
    }
    for (int i = 0; i < n; i++) d[i] = a[i * n + i];
    for (int i = 0; i < n; i++) { /* sort ascending, columns along */
        int m = i;
        for (int j = i + 1; j < n; j++)
            if (d[j] < d[m]) m = j;
        if (m == i) continue;
        const double t = d[i];
        d[i] = d[m];
        d[m] = t;
        for (int k = 0; k < n; k++) {
            const double x = v[k * n + i];
            v[k * n + i] = v[k * n + m];
            v[k * n + m] = x;
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 1. Oracles                                                                                  */
/* ------------------------------------------------------------------------------------------ */

enum { MAXP = 5, MAXO = 3, MAXN = MAXP * MAXO, ROWS = 8 };

static void ekfac_layer_oracle(int dtype, int32_t mode, int layer, int in, int out, int bias, int t) {
    const int p = in + bias, n = p * out;
    const double lambda = 0.05, tol = dtype == KFAC_FLOAT32 ? 2e-4 : 1e-10;
    kfac_optimizer *h = NULL;
    int32_t id = -1;
    REQUIRE_OK(h, kfac_optimizer_create(dtype, &h));
    REQUIRE_OK(h, add_dense(h, 4, 3, 1, &id));
    REQUIRE_OK(h, add_dense(h, 3, 2, 0, &id));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EKFAC));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_EKFAC_MODE, mode));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
    rng_t r = {9100 + (uint64_t)layer};
    buf_t x[2], g[2];
    const int ins[2] = {4, 3}, outs[2] = {3, 2}, ts[2] = {layer == 0 ? t : 1, layer == 1 ? t : 1};
    for (int l = 0; l < 2; l++) {
        x[l] = buf_new(dtype, (size_t)(ROWS * ins[l]));
        g[l] = buf_new(dtype, (size_t)(ROWS * outs[l]));
        buf_random(&x[l], &r);
        buf_random(&g[l], &r);
        REQUIRE_OK(h, record_examples(h, l, &x[l], &g[l], ROWS, ts[l]));
    }
    REQUIRE_OK(h, kfac_optimizer_update_factors(h));
    REQUIRE_OK(h, kfac_optimizer_update_inverses(h));

    /* The factors, their eigenbases here, the per-example gradients from the rows. */
    buf_t fa = buf_new(dtype, (size_t)(p * p)), fg = buf_new(dtype, (size_t)(out * out));
    REQUIRE_OK(h, get_factors(h, layer, &fa, &fg));
    double A[MAXP * MAXP], G[MAXO * MAXO], a[MAXP * MAXP], gg[MAXO * MAXO];
    double qa[MAXP * MAXP], qg[MAXO * MAXO], da[MAXP], dg[MAXO];
    for (int i = 0; i < p * p; i++) A[i] = a[i] = get(&fa, (size_t)i);
    for (int i = 0; i < out * out; i++) G[i] = gg[i] = get(&fg, (size_t)i);
    jacobi(a, p, da, qa);
    jacobi(gg, out, dg, qg);
    const int unit = mode == KFAC_EKFAC_PER_ROW ? 1 : t, units = ROWS / unit;
    double S[MAXN] = {0}, F[MAXN * MAXN] = {0};
    for (int e = 0; e < units; e++) {
        double Gn[MAXO * MAXP] = {0}; /* [out][p] */
        for (int row = e * unit; row < (e + 1) * unit; row++)
            for (int o = 0; o < out; o++)
                for (int j = 0; j < p; j++)
                    Gn[o * p + j] += get(&g[layer], (size_t)(row * out + o)) *
                                     (j < in ? get(&x[layer], (size_t)(row * in + j)) : 1.0);
        for (int i = 0; i < out; i++)
            for (int j = 0; j < p; j++) {
                double m = 0;
                for (int o = 0; o < out; o++)
                    for (int k = 0; k < p; k++) m += qg[o * out + i] * Gn[o * p + k] * qa[k * p + j];
                S[i * p + j] += m * m / ROWS;
            }
        for (int u = 0; u < n; u++) /* vec column-major: index j·out + o */
            for (int w = 0; w < n; w++)
                F[u * n + w] += Gn[(u % out) * p + u / out] * Gn[(w % out) * p + w / out] / ROWS;
    }
    buf_t s = buf_new(dtype, (size_t)n);
    int st = get_scaling(h, dtype, layer, 0, s.p);
    double got[MAXN];
    for (int i = 0; i < n; i++) got[i] = get(&s, (size_t)i);
    const double es = rel_diff(got, S, (size_t)n);
    check(st == KFAC_OK && es < tol,
          "[%s] EKFAC layer %d (T = %d, %s): S = (1/R) Σ (Q_Gᵀ G_n Q_A)² (rel. error %.2e)", dtype_tag(dtype),
          layer, t, mode ? "per row" : "per example", es);

    /* K = Ũ diag(S) Ũᵀ from the oracle's S, Ũ = Q_A ⊗ Q_G; K + λI against the library's products. */
    double K[MAXN * MAXN] = {0};
    for (int u = 0; u < n; u++)
        for (int w = 0; w < n; w++)
            for (int j = 0; j < p; j++)
                for (int i = 0; i < out; i++)
                    K[u * n + w] += qa[(u / out) * p + j] * qg[(u % out) * out + i] * S[i * p + j] *
                                    qa[(w / out) * p + j] * qg[(w % out) * out + i];
    double ekfac_err = 0, kfac_err = 0;
    for (int u = 0; u < n; u++)
        for (int w = 0; w < n; w++) {
            const double kron = A[(u / out) * p + w / out] * G[(u % out) * out + w % out];
            ekfac_err += (F[u * n + w] - K[u * n + w]) * (F[u * n + w] - K[u * n + w]);
            kfac_err += (F[u * n + w] - kron) * (F[u * n + w] - kron);
        }
    check(sqrt(ekfac_err) <= sqrt(kfac_err) * (1 + 1e-12) && sqrt(kfac_err) > 0,
          "[%s] layer %d: ‖F − Ũ diag(S) Ũᵀ‖ = %.4g ≤ ‖F − A ⊗ G‖ = %.4g", dtype_tag(dtype), layer,
          sqrt(ekfac_err), sqrt(kfac_err));
    for (int u = 0; u < n; u++) K[u * n + u] += lambda;
    rng_t rv = {77};
    buf_t w = buf_new(dtype, (size_t)(out * in)), b = buf_new(dtype, (size_t)out);
    buf_random(&w, &rv);
    buf_random(&b, &rv);
    double V[MAXO * MAXP], U[MAXO * MAXP], P[MAXO * MAXP];
    for (int o = 0; o < out; o++)
        for (int j = 0; j < p; j++) V[o * p + j] = j < in ? get(&w, (size_t)(o * in + j)) : get(&b, (size_t)o);
    buf_t w2 = buf_clone(&w), b2 = buf_clone(&b);
    st = precondition(h, layer, &w2, bias ? &b2 : NULL);
    kron_apply(K, p, out, 1, V, U);
    for (int o = 0; o < out; o++)
        for (int j = 0; j < p; j++) P[o * p + j] = j < in ? get(&w2, (size_t)(o * in + j)) : get(&b2, (size_t)o);
    const double ed = rel_diff(P, U, (size_t)n);
    check(st == KFAC_OK && ed < tol, "[%s] layer %d: precondition = (Ũ diag(S) Ũᵀ + λI)⁻¹ v (rel. error %.2e)",
          dtype_tag(dtype), layer, ed);
    /* +1 through kfac_curvature_multiply_* on both layers (the other layer's result unused). */
    buf_t ws[2], bs[2];
    for (int l = 0; l < 2; l++) {
        ws[l] = buf_new(dtype, (size_t)(ins[l] * outs[l]));
        bs[l] = buf_new(dtype, (size_t)outs[l]);
    }
    for (size_t i = 0; i < w.n; i++) buf_set(&ws[layer], i, get(&w, i));
    for (size_t i = 0; i < b.n; i++) buf_set(&bs[layer], i, get(&b, i));
    if (dtype == KFAC_FLOAT32) {
        float *wp[2] = {ws[0].p, ws[1].p}, *bp[2] = {bs[0].p, NULL};
        st = kfac_curvature_multiply_f32(h, 1, wp, bp, 2);
    } else {
        double *wp[2] = {ws[0].p, ws[1].p}, *bp[2] = {bs[0].p, NULL};
        st = kfac_curvature_multiply_f64(h, 1, wp, bp, 2);
    }
    kron_apply(K, p, out, 0, V, U);
    for (int o = 0; o < out; o++)
        for (int j = 0; j < p; j++) P[o * p + j] = j < in ? get(&ws[layer], (size_t)(o * in + j)) : get(&bs[layer], (size_t)o);
    const double ef = rel_diff(P, U, (size_t)n);
    check(st == KFAC_OK && ef < tol, "[%s] layer %d: curvature +1 = (Ũ diag(S + λ) Ũᵀ) v (rel. error %.2e)",
          dtype_tag(dtype), layer, ef);
    for (int l = 0; l < 2; l++) {
        buf_free(&x[l]);
        buf_free(&g[l]);
        buf_free(&ws[l]);
        buf_free(&bs[l]);
    }
    buf_free(&fa);
    buf_free(&fg);
    buf_free(&s);
    buf_free(&w);
    buf_free(&b);
    buf_free(&w2);
    buf_free(&b2);
    kfac_optimizer_free(h);
}

void test_ekfac_numerics(void) {
    section("EKFAC: S, directions and +1 against oracles");
    const int dtypes[2] = {KFAC_FLOAT32, KFAC_FLOAT64};
    for (int d = 0; d < 2; d++) {
        ekfac_layer_oracle(dtypes[d], KFAC_EKFAC_PER_EXAMPLE, 0, 4, 3, 1, 2);
        ekfac_layer_oracle(dtypes[d], KFAC_EKFAC_PER_ROW, 0, 4, 3, 1, 2);
        ekfac_layer_oracle(dtypes[d], KFAC_EKFAC_PER_EXAMPLE, 1, 3, 2, 0, 1);
        ekfac_layer_oracle(dtypes[d], KFAC_EKFAC_PER_EXAMPLE, 1, 3, 2, 0, 4);
    }
}

/* ------------------------------------------------------------------------------------------ */
/* 2. Errors on twins, 3. resume                                                               */
/* ------------------------------------------------------------------------------------------ */

/* Records the same paired batch on every twin (TWIN_MODEL: 5->4 + bias, 4->3): 6 rows, layer 0
 * in sequences of 2, layer 1 one row per example. */
static void twins_record_examples(twins_t *t) {
    const int64_t rows = 6;
    for (int l = 0; l < 2; l++) {
        buf_t x = buf_new(t->dtype, (size_t)(rows * spec_x_values(&t->model.l[l])));
        buf_t g = buf_new(t->dtype, (size_t)(rows * spec_g_values(&t->model.l[l])));
        buf_random(&x, &t->rng);
        buf_random(&g, &t->rng);
        for (int i = 0; i < t->n; i++) REQUIRE_OK(t->h[i], record_examples(t->h[i], l, &x, &g, rows, l == 0 ? 2 : 1));
        buf_free(&x);
        buf_free(&g);
    }
}

void test_ekfac_errors(int dtype) {
    section(dtype == KFAC_FLOAT32 ? "float32 handle: EKFAC errors" : "float64 handle: EKFAC errors");
    twins_t t = twins_new(dtype, 9200);
    kfac_optimizer *B = t.h[1];
    const int other = other_dtype(dtype);
    for (int i = 0; i < t.n; i++) REQUIRE_OK(t.h[i], kfac_param_set_int(t.h[i], KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EKFAC));
    twins_record_examples(&t);

    /* No inverses yet. */
    buf_t s = buf_new(dtype, 4 * 6), s0 = buf_new(dtype, 4 * 6);
    for (size_t i = 0; i < s.n; i++) buf_set(&s, i, 7.0), buf_set(&s0, i, 7.0);
    after_bad(&t, bad_call(B, get_scaling(B, dtype, 0, 0, s.p)), KFAC_ERROR_NO_INVERSES,
              "kfac_layer_get_ekfac_scaling before any inverse", 0, buf_same(&s, &s0));
    char why[512];
    check(twins_round(&t, why, sizeof why), "[%s] a round with pending per-example gradients: %s", dtype_tag(dtype), why);
    twins_record_examples(&t); /* pending again for the bad calls below */

    const int64_t rows = 4;
    buf_t x = buf_new(dtype, (size_t)(rows * 5)), g = buf_new(dtype, (size_t)(rows * 4));
    buf_t xo = buf_new(other, (size_t)(rows * 5)), go = buf_new(other, (size_t)(rows * 4));
    buf_random(&x, &t.rng);
    buf_random(&g, &t.rng);
    BAD(record_examples_raw(B, dtype, 0, NULL, g.p, rows, 1), KFAC_ERROR_NULL_POINTER, "record_examples(inputs NULL)");
    BAD(record_examples_raw(B, dtype, 0, x.p, NULL, rows, 1), KFAC_ERROR_NULL_POINTER, "record_examples(output_grads NULL)");
    BAD(record_examples(B, 0, &x, &g, 0, 1), KFAC_ERROR_INVALID_SIZE, "record_examples(rows 0)");
    BAD(record_examples(B, 0, &x, &g, -4, 1), KFAC_ERROR_INVALID_SIZE, "record_examples(rows -4)");
    BAD(record_examples(B, 0, &x, &g, rows, 0), KFAC_ERROR_INVALID_SIZE, "record_examples(rows_per_example 0)");
    BAD(record_examples(B, 0, &x, &g, rows, -2), KFAC_ERROR_INVALID_SIZE, "record_examples(rows_per_example -2)");
    BAD(record_examples(B, 0, &x, &g, rows, 3), KFAC_ERROR_INVALID_SIZE, "record_examples(rows_per_example 3 of 4 rows)");
    BAD(record_examples(B, 2, &x, &g, rows, 1), KFAC_ERROR_UNKNOWN_LAYER, "record_examples(layer 2)");
    BAD(record_examples(B, -1, &x, &g, rows, 1), KFAC_ERROR_UNKNOWN_LAYER, "record_examples(layer -1)");
    BAD(record_examples(B, 0, &xo, &go, rows, 1), KFAC_ERROR_DTYPE_MISMATCH, "record_examples of the other precision");
    buf_t bad = buf_clone(&g);
    buf_set(&bad, 5, NAN);
    BAD(record_examples(B, 0, &x, &bad, rows, 2), KFAC_ERROR_NON_FINITE, "record_examples(NaN output gradient)");
    buf_set(&bad, 5, 0.5);
    buf_t badx = buf_clone(&x);
    buf_set(&badx, 3, INFINITY);
    BAD(record_examples(B, 0, &badx, &g, rows, 2), KFAC_ERROR_NON_FINITE, "record_examples(Inf input)");
    const double huge = dtype == KFAC_FLOAT32 ? 1e17 : 1e150;
    for (size_t i = 0; i < bad.n; i++) buf_set(&bad, i, huge);
    for (size_t i = 0; i < badx.n; i++) buf_set(&badx, i, huge);
    BAD(record_examples(B, 0, &badx, &bad, rows, 2), KFAC_ERROR_NON_FINITE,
        "record_examples(per-example second moments overflow)");

    check(twins_round(&t, why, sizeof why), "[%s] a round inverting with EKFAC: %s", dtype_tag(dtype), why);
    for (size_t i = 0; i < s.n; i++) buf_set(&s, i, 7.0);
    after_bad(&t, bad_call(B, get_scaling(B, dtype, 0, 0, NULL)), KFAC_ERROR_NULL_POINTER,
              "get_ekfac_scaling(scaling NULL)", 1, 1);
    after_bad(&t, bad_call(B, get_scaling(B, dtype, 2, 0, s.p)), KFAC_ERROR_UNKNOWN_LAYER,
              "get_ekfac_scaling(layer 2)", 1, buf_same(&s, &s0));
    after_bad(&t, bad_call(B, get_scaling(B, dtype, 0, 1, s.p)), KFAC_ERROR_INVALID_ARGUMENT,
              "get_ekfac_scaling(group 1 of a dense layer)", 1, buf_same(&s, &s0));
    buf_t so = buf_new(other, 4 * 6), so0 = buf_new(other, 4 * 6);
    after_bad(&t, bad_call(B, get_scaling(B, other, 0, 0, so.p)), KFAC_ERROR_DTYPE_MISMATCH,
              "get_ekfac_scaling of the other precision", 1, buf_same(&so, &so0));
    const int st = get_scaling(B, dtype, 0, 0, s.p);
    check(st == KFAC_OK && same_state(t.h[0], t.h[1]), "[%s] a valid readout changes nothing", dtype_tag(dtype));
    int finite = 1;
    for (size_t i = 0; i < s.n; i++) finite = finite && isfinite(get(&s, i)) && get(&s, i) >= 0;
    check(finite, "[%s] S is finite and non-negative", dtype_tag(dtype));

    /* 3. Resume: an image with pending per-example gradients continues bit for bit. */
    twins_record_examples(&t);
    size_t size = 0;
    unsigned char *img = save_image(t.h[0], &size);
    kfac_optimizer *resumed = make_handle(dtype, &t.model);
    REQUIRE_OK(resumed, kfac_state_load(resumed, img, size));
    check(same_state(t.h[0], resumed), "[%s] the image with pending per-example gradients round-trips", dtype_tag(dtype));
    kfac_optimizer_free(t.h[1]);
    t.h[1] = resumed;
    int identical = 1;
    for (int k = 0; k < 4; k++) {
        identical = identical && twins_round(&t, why, sizeof why);
        twins_record_examples(&t);
    }
    check(identical && same_state(t.h[0], t.h[1]), "[%s] resumed EKFAC handle: bit-identical directions and states %s",
          dtype_tag(dtype), why);
    /* Another strategy: the readout has nothing to read. */
    for (int i = 0; i < t.n; i++) REQUIRE_OK(t.h[i], kfac_param_set_int(t.h[i], KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EIGEN));
    check(twins_round(&t, why, sizeof why), "[%s] a round after switching to the eigen strategy: %s", dtype_tag(dtype), why);
    B = t.h[1];
    after_bad(&t, bad_call(B, get_scaling(B, dtype, 0, 0, s.p)), KFAC_ERROR_NO_INVERSES,
              "get_ekfac_scaling with the eigen strategy", 1, 1);

    free(img);
    buf_free(&s);
    buf_free(&s0);
    buf_free(&so);
    buf_free(&so0);
    buf_free(&x);
    buf_free(&g);
    buf_free(&xo);
    buf_free(&go);
    buf_free(&bad);
    buf_free(&badx);
    twins_free(&t);

    float f = 0;
    double d = 0;
    expect_null_handle(kfac_layer_record_examples_f32(NULL, 0, &f, &f, 1, 1), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_record_examples_f32(NULL handle)");
    expect_null_handle(kfac_layer_record_examples_f64(NULL, 0, &d, &d, 1, 1), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_record_examples_f64(NULL handle)");
    expect_null_handle(kfac_layer_get_ekfac_scaling_f32(NULL, 0, 0, &f), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_get_ekfac_scaling_f32(NULL handle)");
    expect_null_handle(kfac_layer_get_ekfac_scaling_f64(NULL, 0, 0, &d), KFAC_ERROR_NULL_POINTER,
                       "kfac_layer_get_ekfac_scaling_f64(NULL handle)");
}
