/*
 * test_tridiagonal.c — the experimental block-tridiagonal section (kfac_layer_link,
 * kfac_layer_get_cross_factors_*, and what links change in the step, the inverse update and
 * kfac_curvature_multiply_*), compiled with KFAC_EXPERIMENTAL_API.
 *
 *   1. Oracle, both precisions: a chain 4→5 (bias), 5→3 (bias), 3→2 (no bias), both pairs linked.
 *      After folded batches, the factors (kfac_layer_get_factors_*) and cross factors are read back
 *      and F̂⁻¹ v = Ξᵀ Λ Ξ v is computed here with explicit Kronecker matrices and dense solves
 *      (Ψ_l = F̃_{l,l+1} F̃_{l+1,l+1}⁻¹, Σ_l = F̃_{l,l} − Ψ_l F̃_{l+1,l}); kfac_curvature_multiply_*
 *      at −1 must match (1e-10 in float64), +1 then −1 must give v back, and a step without KL clip
 *      must write kfac_curvature_multiply's −1 bitwise.
 *   2. Errors on twin handles (after_bad: status, message, identical state, identical next round):
 *      link misuse, cross-factor getter misuse, unpaired rows at a fold and in a step,
 *      kfac_layer_precondition_* on a linked layer, γ re-choice with links, and a singular Σ.
 *   3. Resume: an image saved with unpaired rows restores bit for bit on a fresh linked handle;
 *      handles with other links (or none) refuse it, and a linked handle refuses an unlinked image.
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"
#include "oracles.h"

#include <math.h>

static const model_t TRI_MODEL = {3, {{4, 5, 1, NULL}, {5, 3, 1, NULL}, {3, 2, 0, NULL}}};

static double bget(const buf_t *b, size_t i) {
    return b->dtype == KFAC_FLOAT32 ? (double)((float *)b->p)[i] : ((double *)b->p)[i];
}

static int get_cross(const kfac_optimizer *h, int dtype, int32_t lower, void *a, void *g) {
    return dtype == KFAC_FLOAT32 ? kfac_layer_get_cross_factors_f32(h, lower, (float *)a, (float *)g)
                                 : kfac_layer_get_cross_factors_f64(h, lower, (double *)a, (double *)g);
}

static int multiply(kfac_optimizer *h, int32_t power, grads_t *g) {
    if (g->w[0].dtype == KFAC_FLOAT32) {
        float *w[MAX_LAYERS], *b[MAX_LAYERS];
        for (int l = 0; l < g->n; l++) { w[l] = (float *)g->w[l].p; b[l] = (float *)g->b[l].p; }
        return kfac_curvature_multiply_f32(h, power, w, b, g->n);
    }
    double *w[MAX_LAYERS], *b[MAX_LAYERS];
    for (int l = 0; l < g->n; l++) { w[l] = (double *)g->w[l].p; b[l] = (double *)g->b[l].p; }
    return kfac_curvature_multiply_f64(h, power, w, b, g->n);
}

/* vec([W | b]) column-major of layer l into v (p·out values). */
static void layer_vec(const grads_t *g, const layer_spec_t *s, int l, double *v) {
    const int p = (int)s->in + s->bias, o = (int)s->out;
    for (int j = 0; j < p; j++)
        for (int i = 0; i < o; i++)
            v[j * o + i] = j < s->in ? bget(&g->w[l], (size_t)(i * s->in + j)) : bget(&g->b[l], (size_t)i);
}

/* K = A ⊗ B for A (ra×ca), B (rb×cb), row-major. */
static void kron(const double *A, int ra, int ca, const double *B, int rb, int cb, double *K) {
    for (int i = 0; i < ra; i++)
        for (int j = 0; j < ca; j++)
            for (int p = 0; p < rb; p++)
                for (int q = 0; q < cb; q++) K[(size_t)(i * rb + p) * (size_t)(ca * cb) + (size_t)(j * cb + q)] = A[i * ca + j] * B[p * cb + q];
}

enum { TL = 3, TMAX = 30 };

/* F̂⁻¹ v from the handle's own factors (float64 dense). */
static int oracle_inverse(const kfac_optimizer *h, int dtype, const model_t *m, double lambda, const double *v,
                          double *u) {
    int P[TL], off[TL], pp[TL], oo[TL], total = 0;
    double F[TL][TMAX * TMAX], X[TL - 1][TMAX * TMAX], Psi[TL - 1][TMAX * TMAX];
    for (int l = 0; l < TL; l++) {
        pp[l] = (int)m->l[l].in + m->l[l].bias;
        oo[l] = (int)m->l[l].out;
        P[l] = pp[l] * oo[l];
        off[l] = total;
        total += P[l];
        buf_t a = buf_new(dtype, (size_t)(pp[l] * pp[l])), g = buf_new(dtype, (size_t)(oo[l] * oo[l]));
        if (get_factors(h, l, &a, &g) != KFAC_OK) return 0;
        double A[TMAX * TMAX], G[TMAX * TMAX];
        for (int i = 0; i < pp[l] * pp[l]; i++) A[i] = bget(&a, (size_t)i);
        for (int i = 0; i < oo[l] * oo[l]; i++) G[i] = bget(&g, (size_t)i);
        damped_kron(A, G, pp[l], oo[l], 1, lambda, 1, F[l]);
        buf_free(&a);
        buf_free(&g);
    }
    for (int l = 0; l < TL - 1; l++) {
        buf_t a = buf_new(dtype, (size_t)(pp[l] * pp[l + 1])), g = buf_new(dtype, (size_t)(oo[l] * oo[l + 1]));
        if (get_cross(h, dtype, l, a.p, g.p) != KFAC_OK) return 0;
        double A[TMAX * TMAX], G[TMAX * TMAX];
        for (size_t i = 0; i < a.n; i++) A[i] = bget(&a, i);
        for (size_t i = 0; i < g.n; i++) G[i] = bget(&g, i);
        kron(A, pp[l], pp[l + 1], G, oo[l], oo[l + 1], X[l]);
        /* Ψ_lᵀ = F_{l+1}⁻¹ X_lᵀ */
        double M[TMAX * TMAX], R[TMAX * TMAX];
        memcpy(M, F[l + 1], sizeof(double) * (size_t)(P[l + 1] * P[l + 1]));
        for (int i = 0; i < P[l + 1]; i++)
            for (int j = 0; j < P[l]; j++) R[i * P[l] + j] = X[l][j * P[l + 1] + i];
        if (!solve(M, R, P[l + 1], P[l])) return 0;
        for (int i = 0; i < P[l]; i++)
            for (int j = 0; j < P[l + 1]; j++) Psi[l][i * P[l + 1] + j] = R[j * P[l] + i];
        buf_free(&a);
        buf_free(&g);
    }
    double z[TL * TMAX];
    for (int l = 0; l < TL; l++) {
        double w[TMAX], S[TMAX * TMAX];
        for (int i = 0; i < P[l]; i++) w[i] = v[off[l] + i];
        memcpy(S, F[l], sizeof(double) * (size_t)(P[l] * P[l]));
        if (l < TL - 1) {
            for (int i = 0; i < P[l]; i++)
                for (int j = 0; j < P[l + 1]; j++) w[i] -= Psi[l][i * P[l + 1] + j] * v[off[l + 1] + j];
            for (int i = 0; i < P[l]; i++)
                for (int j = 0; j < P[l]; j++) {
                    double s = 0;
                    for (int k = 0; k < P[l + 1]; k++) s += Psi[l][i * P[l + 1] + k] * X[l][j * P[l + 1] + k];
                    S[i * P[l] + j] -= s;
                }
        }
        if (!solve(S, w, P[l], 1)) return 0;
        for (int i = 0; i < P[l]; i++) z[off[l] + i] = w[i];
    }
    for (int l = 0; l < TL; l++)
        for (int i = 0; i < P[l]; i++) {
            double s = z[off[l] + i];
            if (l > 0)
                for (int k = 0; k < P[l - 1]; k++) s -= Psi[l - 1][k * P[l] + i] * z[off[l - 1] + k];
            u[off[l] + i] = s;
        }
    return total;
}

static void link_all(kfac_optimizer *h) {
    REQUIRE_OK(h, kfac_layer_link(h, 0, 1));
    REQUIRE_OK(h, kfac_layer_link(h, 1, 2));
}

static void configure(kfac_optimizer *h, double lambda) {
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_FACTOR_DECAY, 0.7));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, 0));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_PI_DAMPING, 1));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_FACTOR_UPDATE_PERIOD, 1));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 1));
}

static void tridiagonal_oracle(int dtype) {
    const double lambda = 0.03, tol = dtype == KFAC_FLOAT32 ? 2e-3 : 1e-10;
    kfac_optimizer *h = make_handle(dtype, &TRI_MODEL);
    link_all(h);
    configure(h, lambda);
    twins_t t = twins_new_model(dtype, 77, &TRI_MODEL);
    kfac_optimizer_free(t.h[1]);
    t.h[1] = h; /* record the twins' batches on h too */
    kfac_optimizer_free(t.h[0]);
    t.h[0] = make_handle(dtype, &TRI_MODEL);
    link_all(t.h[0]);
    configure(t.h[0], lambda);
    char why[512] = "";
    int ok = 1;
    for (int k = 0; k < 3; k++) ok = ok && twins_round(&t, why, sizeof why);
    check(ok, "[%s] three steps on linked twins agree%s%s", dtype_tag(dtype), why[0] ? ": " : "", why);
    /* F̂⁻¹ v against the dense oracle, F̂ then F̂⁻¹ back. */
    rng_t r = {4242};
    double worst = 0, roundtrip = 0;
    for (int trial = 0; trial < 3; trial++) {
        grads_t g = grads_new(dtype, &TRI_MODEL, &r), g0 = grads_clone(&g);
        double v[TL * TMAX], u[TL * TMAX], expected[TL * TMAX];
        int total = 0;
        for (int l = 0; l < TL; l++) { layer_vec(&g, &TRI_MODEL.l[l], l, v + total); total += (int)((TRI_MODEL.l[l].in + TRI_MODEL.l[l].bias) * TRI_MODEL.l[l].out); }
        if (multiply(h, -1, &g) != KFAC_OK || !oracle_inverse(h, dtype, &TRI_MODEL, lambda, v, expected)) {
            check(0, "[%s] kfac_curvature_multiply(-1) on linked layers: %s", dtype_tag(dtype), kfac_optimizer_last_error(h));
            return;
        }
        total = 0;
        for (int l = 0; l < TL; l++) { layer_vec(&g, &TRI_MODEL.l[l], l, u + total); total += (int)((TRI_MODEL.l[l].in + TRI_MODEL.l[l].bias) * TRI_MODEL.l[l].out); }
        double d = rel_diff(u, expected, (size_t)total);
        if (d > worst) worst = d;
        if (multiply(h, 1, &g) != KFAC_OK) check(0, "[%s] +1 failed", dtype_tag(dtype));
        total = 0;
        for (int l = 0; l < TL; l++) { layer_vec(&g, &TRI_MODEL.l[l], l, u + total); total += (int)((TRI_MODEL.l[l].in + TRI_MODEL.l[l].bias) * TRI_MODEL.l[l].out); }
        d = rel_diff(u, v, (size_t)total);
        if (d > roundtrip) roundtrip = d;
        grads_free(&g);
        grads_free(&g0);
    }
    check(worst < tol, "[%s] linked chain: kfac_curvature_multiply(-1) = Ξᵀ Λ Ξ v from the handle's factors (rel %.2e)",
          dtype_tag(dtype), worst);
    check(roundtrip < tol, "[%s] linked chain: +1 then -1 gives v back (rel %.2e)", dtype_tag(dtype), roundtrip);
    /* A step (no KL clip) writes what -1 gives with the inverses it commits: record, step on h,
     * then -1 on the twin (whose update_factors + update_inverses reproduce the step's). */
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 1));
    grads_t g = grads_new(dtype, &TRI_MODEL, &r), gm = grads_clone(&g);
    check(twins_record(&t), "[%s] record on linked twins", dtype_tag(dtype));
    REQUIRE_OK(t.h[0], kfac_optimizer_update_factors(t.h[0]));
    REQUIRE_OK(t.h[0], kfac_optimizer_update_inverses(t.h[0]));
    const int s = step(h, &g), mu = multiply(t.h[0], -1, &gm);
    check(s == KFAC_OK && mu == KFAC_OK && grads_same(&g, &gm),
          "[%s] a step's linked directions are bitwise kfac_curvature_multiply(-1) after update_factors + update_inverses",
          dtype_tag(dtype));
    grads_free(&g);
    grads_free(&gm);
    twins_free(&t);
}

static void tridiagonal_errors(int dtype) {
    twins_t t = twins_new_model(dtype, 99, &TRI_MODEL);
    kfac_optimizer *B = t.h[1];
    for (int i = 0; i < t.n; i++) configure(t.h[i], 0.03);
    BAD_NO_ROUND(kfac_layer_link(B, 0, 2), KFAC_ERROR_INVALID_ARGUMENT, "kfac_layer_link of layers 0 and 2 (not consecutive)");
    BAD_NO_ROUND(kfac_layer_link(B, 2, 3), KFAC_ERROR_UNKNOWN_LAYER, "kfac_layer_link of an unknown layer");
    BAD_NO_ROUND(kfac_layer_link(B, -1, 0), KFAC_ERROR_UNKNOWN_LAYER, "kfac_layer_link of layer -1");
    expect_null_handle(kfac_layer_link(NULL, 0, 1), KFAC_ERROR_NULL_POINTER, "kfac_layer_link(NULL, ...)");
    for (int i = 0; i < t.n; i++) link_all(t.h[i]);
    BAD_NO_ROUND(kfac_layer_link(B, 1, 2), KFAC_ERROR_INVALID_ARGUMENT, "kfac_layer_link twice");
    double a[64], gx[64];
    BAD_NO_ROUND(get_cross(B, dtype, 0, a, gx), KFAC_ERROR_NO_STATISTICS, "kfac_layer_get_cross_factors before statistics");
    BAD_NO_ROUND(get_cross(B, other_dtype(dtype), 0, a, gx), KFAC_ERROR_DTYPE_MISMATCH, "kfac_layer_get_cross_factors in the other precision");
    BAD_NO_ROUND(get_cross(B, dtype, 2, a, gx), KFAC_ERROR_INVALID_ARGUMENT, "kfac_layer_get_cross_factors of a layer without a link up");
    BAD_NO_ROUND(get_cross(B, dtype, 7, a, gx), KFAC_ERROR_UNKNOWN_LAYER, "kfac_layer_get_cross_factors of an unknown layer");
    char why[512] = "";
    check(twins_round(&t, why, sizeof why), "[%s] a round on linked twins%s%s", dtype_tag(dtype), why[0] ? ": " : "", why);
    BAD(kfac_layer_link(B, 0, 1), KFAC_ERROR_LAYERS_FROZEN, "kfac_layer_link after statistics");
    /* Unpaired rows: layer 1 gets one input row fewer than layers 0 and 2. */
    {
        buf_t x0 = buf_new(dtype, 4 * 4), x1 = buf_new(dtype, 3 * 5), x2 = buf_new(dtype, 4 * 3);
        buf_t g0 = buf_new(dtype, 4 * 5), g1 = buf_new(dtype, 4 * 3), g2 = buf_new(dtype, 4 * 2);
        rng_t r = {5};
        buf_t *all[] = {&x0, &x1, &x2, &g0, &g1, &g2};
        for (int i = 0; i < 6; i++) buf_random(all[i], &r);
        int ok = record_inputs(B, 0, &x0, 4) == KFAC_OK && record_inputs(B, 1, &x1, 3) == KFAC_OK &&
                 record_inputs(B, 2, &x2, 4) == KFAC_OK && record_grads(B, 2, &g2, 4) == KFAC_OK &&
                 record_grads(B, 1, &g1, 4) == KFAC_OK && record_grads(B, 0, &g0, 4) == KFAC_OK;
        check(ok, "[%s] recording rows that will not pair succeeds (checked at the fold)", dtype_tag(dtype));
        /* twin 0 records the same, so that the states agree */
        kfac_optimizer *A = t.h[0];
        ok = record_inputs(A, 0, &x0, 4) == KFAC_OK && record_inputs(A, 1, &x1, 3) == KFAC_OK &&
             record_inputs(A, 2, &x2, 4) == KFAC_OK && record_grads(A, 2, &g2, 4) == KFAC_OK &&
             record_grads(A, 1, &g1, 4) == KFAC_OK && record_grads(A, 0, &g0, 4) == KFAC_OK;
        BAD_NO_ROUND(kfac_optimizer_update_factors(B), KFAC_ERROR_INVALID_SIZE, "kfac_optimizer_update_factors with unpaired rows");
        grads_t g = grads_new(dtype, &TRI_MODEL, &r), g_before = grads_clone(&g);
        after_bad(&t, bad_call(B, step(B, &g)), KFAC_ERROR_INVALID_SIZE, "kfac_optimizer_step with unpaired rows", 0,
                  grads_same(&g, &g_before));
        /* The missing row pairs them; both twins continue identically. */
        buf_t x1b = buf_new(dtype, 5);
        buf_random(&x1b, &r);
        ok = ok && record_inputs(A, 1, &x1b, 1) == KFAC_OK && record_inputs(B, 1, &x1b, 1) == KFAC_OK;
        grads_t ga = grads_clone(&g);
        ok = ok && step(A, &ga) == KFAC_OK && step(B, &g) == KFAC_OK && grads_same(&g, &ga) && same_state(A, B);
        check(ok, "[%s] after the missing row both twins step identically", dtype_tag(dtype));
        for (int i = 0; i < 6; i++) buf_free(all[i]);
        buf_free(&x1b);
        grads_free(&g);
        grads_free(&g_before);
        grads_free(&ga);
    }
    {
        rng_t r = {6};
        grads_t g = grads_new(dtype, &TRI_MODEL, &r), g_before = grads_clone(&g);
        after_bad(&t, bad_call(B, precondition(B, 1, &g.w[1], &g.b[1])), KFAC_ERROR_UNSUPPORTED,
                  "kfac_layer_precondition on a linked layer", 1, grads_same(&g, &g_before));
        grads_free(&g);
        grads_free(&g_before);
    }
    twins_free(&t);

    /* γ re-choice with links; a singular Σ (negligible damping, inputs of layer 1 copying layer
     * 0's, output gradients of layer 0 copying layer 1's) leaves the handle unchanged. */
    twins_t u = twins_new_model(dtype, 7, &TRI_MODEL);
    for (int i = 0; i < u.n; i++) {
        configure(u.h[i], 1e-30);
        link_all(u.h[i]);
        REQUIRE_OK(u.h[i], kfac_param_set_int(u.h[i], KFAC_PARAM_FACTOR_UPDATE_PERIOD, 0));
        REQUIRE_OK(u.h[i], kfac_param_set_int(u.h[i], KFAC_PARAM_INVERSE_UPDATE_PERIOD, 0));
    }
    {
        const int64_t rows = 12;
        rng_t r = {8};
        buf_t x[TL], g[TL];
        for (int l = 0; l < TL; l++) {
            x[l] = buf_new(dtype, (size_t)(rows * TRI_MODEL.l[l].in));
            g[l] = buf_new(dtype, (size_t)(rows * TRI_MODEL.l[l].out));
            buf_random(&x[l], &r);
            buf_random(&g[l], &r);
        }
        for (int n = 0; n < rows; n++) {
            for (int i = 0; i < 5; i++) buf_set(&x[1], (size_t)(n * 5 + i), bget(&x[0], (size_t)(n * 4 + i % 4)));
            for (int i = 0; i < 5; i++) buf_set(&g[0], (size_t)(n * 5 + i), bget(&g[1], (size_t)(n * 3 + i % 3)));
        }
        int ok = 1;
        for (int i = 0; i < u.n; i++) {
            for (int l = 0; l < TL; l++) ok = ok && record_inputs(u.h[i], l, &x[l], rows) == KFAC_OK;
            for (int l = TL - 1; l >= 0; l--) ok = ok && record_grads(u.h[i], l, &g[l], rows) == KFAC_OK;
            ok = ok && kfac_optimizer_update_factors(u.h[i]) == KFAC_OK;
        }
        check(ok, "[%s] correlated statistics recorded and folded", dtype_tag(dtype));
        kfac_optimizer *Bu = u.h[1];
        g_last_error[0] = '\0';
        const int got = bad_call(Bu, kfac_optimizer_update_inverses(Bu));
        char last[512];
        snprintf(last, sizeof last, "%s", g_last_error);
        check(got == KFAC_ERROR_NOT_POSITIVE_DEFINITE && nonempty(last) && same_state(u.h[0], Bu),
              "[%s] a singular Σ_{l|l+1} -> NOT_POSITIVE_DEFINITE, state unchanged (got %s: %s)", dtype_tag(dtype),
              status_name(got), last);
        for (int l = 0; l < TL; l++) { buf_free(&x[l]); buf_free(&g[l]); }
    }
    twins_free(&u);
    twins_t w = twins_new_model(dtype, 9, &TRI_MODEL);
    for (int i = 0; i < w.n; i++) {
        configure(w.h[i], 0.03);
        link_all(w.h[i]);
        REQUIRE_OK(w.h[i], kfac_param_set_double(w.h[i], KFAC_PARAM_FACTOR_DAMPING, 0.03));
        REQUIRE_OK(w.h[i], kfac_param_set_int(w.h[i], KFAC_PARAM_FACTOR_DAMPING_PERIOD, 2));
    }
    check(twins_record(&w), "[%s] record for the γ re-choice check", dtype_tag(dtype));
    {
        rng_t r = {10};
        grads_t g = grads_new(dtype, &TRI_MODEL, &r), g_before = grads_clone(&g);
        kfac_optimizer *Bw = w.h[1];
        g_last_error[0] = '\0';
        const int got = bad_call(Bw, step(Bw, &g));
        check(got == KFAC_ERROR_UNSUPPORTED && grads_same(&g, &g_before) && same_state(w.h[0], Bw),
              "[%s] γ re-choice with links -> UNSUPPORTED, nothing changed (got %s)", dtype_tag(dtype), status_name(got));
        grads_free(&g);
        grads_free(&g_before);
    }
    twins_free(&w);
}

/* Resume: an image saved with unpaired rows pending (inputs recorded, output gradients not yet)
 * restores bit for bit on a fresh linked handle; handles whose links differ refuse it. */
static void tridiagonal_resume(int dtype) {
    twins_t t = twins_new_model(dtype, 55, &TRI_MODEL);
    for (int i = 0; i < t.n; i++) { configure(t.h[i], 0.03); link_all(t.h[i]); }
    char why[512] = "";
    int ok = twins_round(&t, why, sizeof why) && twins_round(&t, why, sizeof why);
    rng_t r = {12};
    buf_t x[TL], g[TL];
    for (int l = 0; l < TL; l++) {
        x[l] = buf_new(dtype, (size_t)(5 * TRI_MODEL.l[l].in));
        g[l] = buf_new(dtype, (size_t)(5 * TRI_MODEL.l[l].out));
        buf_random(&x[l], &r);
        buf_random(&g[l], &r);
    }
    kfac_optimizer *A = t.h[0];
    for (int l = 0; l < TL; l++) ok = ok && record_inputs(A, l, &x[l], 5) == KFAC_OK;
    size_t size = 0;
    unsigned char *img = save_image(A, &size);
    kfac_optimizer *C = make_handle(dtype, &TRI_MODEL);
    link_all(C);
    ok = ok && img && kfac_state_load(C, img, size) == KFAC_OK && same_state(A, C);
    grads_t ga = grads_new(dtype, &TRI_MODEL, &r), gc = grads_clone(&ga);
    for (int l = TL - 1; l >= 0; l--) {
        ok = ok && record_grads(A, l, &g[l], 5) == KFAC_OK && record_grads(C, l, &g[l], 5) == KFAC_OK;
    }
    ok = ok && step(A, &ga) == KFAC_OK && step(C, &gc) == KFAC_OK && grads_same(&ga, &gc) && same_state(A, C);
    check(ok, "[%s] linked handle resumed from an image with unpaired rows steps bit for bit%s%s", dtype_tag(dtype),
          why[0] ? ": " : "", why);
    kfac_optimizer *U = make_handle(dtype, &TRI_MODEL), *P = make_handle(dtype, &TRI_MODEL);
    REQUIRE_OK(P, kfac_layer_link(P, 0, 1));
    const int su = img ? kfac_state_load(U, img, size) : KFAC_OK, sp = img ? kfac_state_load(P, img, size) : KFAC_OK;
    size_t usize = 0;
    unsigned char *unlinked = save_image(U, &usize);
    const int sl = unlinked ? kfac_state_load(C, unlinked, usize) : KFAC_OK;
    check(su == KFAC_ERROR_STATE_MISMATCH && sp == KFAC_ERROR_STATE_MISMATCH &&
              sl == KFAC_ERROR_STATE_MISMATCH,
          "[%s] an image with links refused by an unlinked handle (%s) and by other links (%s); an unlinked image by a "
          "linked handle (%s)", dtype_tag(dtype), status_name(su), status_name(sp), status_name(sl));
    free(img);
    free(unlinked);
    for (int l = 0; l < TL; l++) { buf_free(&x[l]); buf_free(&g[l]); }
    grads_free(&ga);
    grads_free(&gc);
    kfac_optimizer_free(C);
    kfac_optimizer_free(U);
    kfac_optimizer_free(P);
    twins_free(&t);
}

void test_tridiagonal(void) {
    section("Block-tridiagonal K-FAC (experimental): oracles and errors");
    tridiagonal_oracle(KFAC_FLOAT32);
    tridiagonal_oracle(KFAC_FLOAT64);
    tridiagonal_errors(KFAC_FLOAT32);
    tridiagonal_errors(KFAC_FLOAT64);
    tridiagonal_resume(KFAC_FLOAT32);
    tridiagonal_resume(KFAC_FLOAT64);
}
