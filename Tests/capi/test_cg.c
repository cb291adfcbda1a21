/*
 * test_cg.c — the experimental conjugate-gradient and Newton-CG calls (kfac_cg_*), compiled with
 * KFAC_EXPERIMENTAL_API, in both precisions.
 *
 *   1. Numerics on TWIN_MODEL (36 parameters) with an explicit SPD G of known spectrum: with three
 *      distinct eigenvalues the float64 solve stops after exactly 3 iterations at the dense
 *      solution of (G + (λ + η) I) s = −g; the result's gᵀs, sᵀ(G + ηI)s, λ‖s‖², model and φ
 *      against explicit values; ρ of a report at α = 1/2 against (Δh) / (α gᵀs + ½α² sᵀ(G+η)s)
 *      and λ·2/3 (LM_DECAY 2/3, LM_INTERVAL 1); kfac_cg_solve_* with a product function gives a
 *      bitwise identical step and result to the reverse-communication loop; a product function
 *      failing on its second call gives KFAC_ERROR_CALLBACK with the solve left open at the first
 *      iterate (bitwise the step of a 1-iteration solve, reason CALLER); an older, smaller
 *      kfac_cg_result is filled only up to its struct_size. The K-FAC preconditioner on one dense
 *      layer fed one example, where G = āāᵀ ⊗ B exactly: one iteration.
 *   2. Errors on twin handles: every bad call before a solve, on an open solve and on a stopped
 *      solve, and every bad report, made on twin 1 only (after_bad: status, messages, identical
 *      state images); then the twins' solves must go on identically: same vectors, and bitwise
 *      identical steps, results, ρ and λ at the end. Caller buffers a failing call would write
 *      are compared too.
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"
#include "oracles.h"

#include <math.h>

enum { CG_N = 36 }; /* TWIN_MODEL: 5->4 + bias (20 + 4), 4->3 (12) */

/* Pointer arrays of a gradient set (entries past n point at layer 0's weights). */
static void arrays(const grads_t *g, void **w, void **b) {
    for (int l = 0; l < MAX_LAYERS; l++) {
        w[l] = l < g->n ? g->w[l].p : g->w[0].p;
        b[l] = l < g->n ? g->b[l].p : NULL;
    }
}

static void to_flat(const grads_t *g, double *x) {
    size_t k = 0;
    for (int l = 0; l < g->n; l++) {
        for (size_t i = 0; i < g->w[l].n; i++)
            x[k++] = g->w[l].dtype == KFAC_FLOAT32 ? ((float *)g->w[l].p)[i] : ((double *)g->w[l].p)[i];
        if (g->b[l].p)
            for (size_t i = 0; i < g->b[l].n; i++)
                x[k++] = g->b[l].dtype == KFAC_FLOAT32 ? ((float *)g->b[l].p)[i] : ((double *)g->b[l].p)[i];
    }
}

static void from_flat(const double *x, grads_t *g) {
    size_t k = 0;
    for (int l = 0; l < g->n; l++) {
        for (size_t i = 0; i < g->w[l].n; i++) buf_set(&g->w[l], i, x[k++]);
        if (g->b[l].p)
            for (size_t i = 0; i < g->b[l].n; i++) buf_set(&g->b[l], i, x[k++]);
    }
}

/* The calls, dispatched on the buffers' precision; NULL grads_t passes NULL arrays. */
static int begin_g(kfac_optimizer *h, int dtype, const kfac_cg_desc *desc, const grads_t *g, const grads_t *d,
                   int32_t n_layers, int32_t *request) {
    void *gw[MAX_LAYERS], *gb[MAX_LAYERS], *dw[MAX_LAYERS], *db[MAX_LAYERS];
    if (g) arrays(g, gw, gb);
    if (d) arrays(d, dw, db);
    if (dtype == KFAC_FLOAT32)
        return kfac_cg_begin_f32(h, desc, g ? (const float *const *)gw : NULL, g ? (const float *const *)gb : NULL,
                                 d ? (const float *const *)dw : NULL, d ? (const float *const *)db : NULL, n_layers,
                                 request);
    return kfac_cg_begin_f64(h, desc, g ? (const double *const *)gw : NULL, g ? (const double *const *)gb : NULL,
                             d ? (const double *const *)dw : NULL, d ? (const double *const *)db : NULL, n_layers,
                             request);
}

static int vector_g(kfac_optimizer *h, int dtype, grads_t *v, int32_t n_layers) {
    void *w[MAX_LAYERS], *b[MAX_LAYERS];
    if (v) arrays(v, w, b);
    if (dtype == KFAC_FLOAT32)
        return kfac_cg_get_vector_f32(h, v ? (float *const *)w : NULL, v ? (float *const *)b : NULL, n_layers);
    return kfac_cg_get_vector_f64(h, v ? (double *const *)w : NULL, v ? (double *const *)b : NULL, n_layers);
}

static int supply_g(kfac_optimizer *h, int dtype, const grads_t *p, int32_t n_layers, int32_t *request) {
    void *w[MAX_LAYERS], *b[MAX_LAYERS];
    if (p) arrays(p, w, b);
    if (dtype == KFAC_FLOAT32)
        return kfac_cg_supply_product_f32(h, p ? (const float *const *)w : NULL, p ? (const float *const *)b : NULL,
                                          n_layers, request);
    return kfac_cg_supply_product_f64(h, p ? (const double *const *)w : NULL, p ? (const double *const *)b : NULL,
                                      n_layers, request);
}

static int finish_g(kfac_optimizer *h, int dtype, grads_t *s, int32_t n_layers, kfac_cg_result *result) {
    void *w[MAX_LAYERS], *b[MAX_LAYERS];
    if (s) arrays(s, w, b);
    if (dtype == KFAC_FLOAT32)
        return kfac_cg_finish_f32(h, s ? (float *const *)w : NULL, s ? (float *const *)b : NULL, n_layers, result);
    return kfac_cg_finish_f64(h, s ? (double *const *)w : NULL, s ? (double *const *)b : NULL, n_layers, result);
}

/* Q diag(spectrum) Qᵀ, Q orthogonal from Gram–Schmidt on seeded random vectors. */
static void spd(double *G, const double *spectrum, int n, uint64_t seed) {
    rng_t r = {seed};
    double *q = malloc(sizeof(double) * (size_t)(n * n));
    for (int i = 0; i < n * n; i++) q[i] = rng_sym(&r);
    for (int i = 0; i < n; i++) {
        for (int j = 0; j < i; j++) {
            double d = 0;
            for (int k = 0; k < n; k++) d += q[i * n + k] * q[j * n + k];
            for (int k = 0; k < n; k++) q[i * n + k] -= d * q[j * n + k];
        }
        double norm = 0;
        for (int k = 0; k < n; k++) norm += q[i * n + k] * q[i * n + k];
        norm = sqrt(norm);
        for (int k = 0; k < n; k++) q[i * n + k] /= norm;
    }
    for (int i = 0; i < n; i++)
        for (int j = 0; j < n; j++) {
            double s = 0;
            for (int k = 0; k < n; k++) s += q[k * n + i] * spectrum[k] * q[k * n + j];
            G[i * n + j] = s;
        }
    free(q);
}

static void matvec(const double *G, const double *v, double *out, int n) {
    for (int i = 0; i < n; i++) {
        double s = 0;
        for (int j = 0; j < n; j++) s += G[i * n + j] * v[j];
        out[i] = s;
    }
}

static double dot(const double *a, const double *b, int n) {
    double s = 0;
    for (int i = 0; i < n; i++) s += a[i] * b[i];
    return s;
}

/* A whole solve through the reverse-communication calls with the product G·v; returns the
 * status of the first failing call (KFAC_OK if none). */
static int rci_solve(kfac_optimizer *h, int dtype, const kfac_cg_desc *desc, const grads_t *g, const double *G,
                     grads_t *step, kfac_cg_result *result) {
    rng_t r = {1};
    grads_t v = grads_new(dtype, &TWIN_MODEL, &r), p = grads_new(dtype, &TWIN_MODEL, &r);
    double vf[CG_N], pf[CG_N];
    int32_t request = 0;
    int st = begin_g(h, dtype, desc, g, NULL, 2, &request);
    while (st == KFAC_OK && request == KFAC_CG_NEED_PRODUCT) {
        st = vector_g(h, dtype, &v, 2);
        if (st != KFAC_OK) break;
        to_flat(&v, vf);
        matvec(G, vf, pf, CG_N);
        from_flat(pf, &p);
        st = supply_g(h, dtype, &p, 2, &request);
    }
    if (st == KFAC_OK) st = finish_g(h, dtype, step, 2, result);
    grads_free(&v);
    grads_free(&p);
    return st;
}

/* The product function of kfac_cg_solve_*: G·v in the layout of TWIN_MODEL. */
typedef struct {
    const double *G;
    int calls, fail_at;
} product_user_t;

static int product_f64(void *user, const double *const *vw, const double *const *vb, double *const *pw,
                       double *const *pb, int32_t n_layers) {
    product_user_t *u = user;
    if (++u->calls == u->fail_at || n_layers != 2 || pb[1] != NULL || vb[1] != NULL) return 7;
    double v[CG_N], p[CG_N];
    memcpy(v, vw[0], 20 * sizeof(double));
    memcpy(v + 20, vb[0], 4 * sizeof(double));
    memcpy(v + 24, vw[1], 12 * sizeof(double));
    matvec(u->G, v, p, CG_N);
    memcpy(pw[0], p, 20 * sizeof(double));
    memcpy(pb[0], p + 20, 4 * sizeof(double));
    memcpy(pw[1], p + 24, 12 * sizeof(double));
    return 0;
}

static int product_f32(void *user, const float *const *vw, const float *const *vb, float *const *pw,
                       float *const *pb, int32_t n_layers) {
    product_user_t *u = user;
    if (++u->calls == u->fail_at || n_layers != 2 || pb[1] != NULL || vb[1] != NULL) return 7;
    double v[CG_N], p[CG_N];
    for (int i = 0; i < 20; i++) v[i] = vw[0][i];
    for (int i = 0; i < 4; i++) v[20 + i] = vb[0][i];
    for (int i = 0; i < 12; i++) v[24 + i] = vw[1][i];
    matvec(u->G, v, p, CG_N);
    for (int i = 0; i < 20; i++) pw[0][i] = (float)p[i];
    for (int i = 0; i < 4; i++) pb[0][i] = (float)p[20 + i];
    for (int i = 0; i < 12; i++) pw[1][i] = (float)p[24 + i];
    return 0;
}

static int callback_solve(kfac_optimizer *h, int dtype, const kfac_cg_desc *desc, const grads_t *g,
                          product_user_t *u, grads_t *step, kfac_cg_result *result) {
    void *gw[MAX_LAYERS], *gb[MAX_LAYERS], *sw[MAX_LAYERS], *sb[MAX_LAYERS];
    arrays(g, gw, gb);
    arrays(step, sw, sb);
    if (dtype == KFAC_FLOAT32)
        return kfac_cg_solve_f32(h, desc, (const float *const *)gw, (const float *const *)gb, NULL, NULL, product_f32,
                                 u, (float *const *)sw, (float *const *)sb, 2, result);
    return kfac_cg_solve_f64(h, desc, (const double *const *)gw, (const double *const *)gb, NULL, NULL, product_f64, u,
                             (double *const *)sw, (double *const *)sb, 2, result);
}

static kfac_optimizer *cg_handle(int dtype, double lambda) {
    kfac_optimizer *h = make_handle(dtype, &TWIN_MODEL);
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_LM_INTERVAL, 1));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_LM_DECAY, 2.0 / 3.0));
    return h;
}

static void cg_numerics(int dtype) {
    const char *tag = dtype_tag(dtype);
    const double tol = dtype == KFAC_FLOAT32 ? 1e-4 : 1e-10;
    const double lambda = 1e-2, eta = 0.05;
    double spectrum[CG_N], G[CG_N * CG_N];
    for (int i = 0; i < CG_N; i++) spectrum[i] = (double[]){1, 4, 16}[i % 3];
    spd(G, spectrum, CG_N, 77);
    rng_t r = {99};
    grads_t g = grads_new(dtype, &TWIN_MODEL, &r), s = grads_new(dtype, &TWIN_MODEL, &r);
    double gf[CG_N], sf[CG_N];
    to_flat(&g, gf);

    kfac_optimizer *h = cg_handle(dtype, lambda);
    kfac_cg_desc desc = {sizeof desc, .tolerance = dtype == KFAC_FLOAT32 ? 1e-5 : 1e-11, .l2 = eta};
    kfac_cg_result res = {.struct_size = sizeof res};
    int st = rci_solve(h, dtype, &desc, &g, G, &s, &res);
    to_flat(&s, sf);
    double M[CG_N * CG_N], x[CG_N];
    memcpy(M, G, sizeof M);
    for (int i = 0; i < CG_N; i++) { M[i * CG_N + i] += lambda + eta; x[i] = -gf[i]; }
    solve(M, x, CG_N, 1);
    check(st == KFAC_OK && rel_diff(sf, x, CG_N) < tol && res.reason == KFAC_CG_REASON_RESIDUAL &&
              (dtype == KFAC_FLOAT32 ? res.iterations <= 6 : res.iterations == 3) && res.products == res.iterations &&
              res.struct_size == sizeof res,
          "[%s] CG on G with 3 distinct eigenvalues: %d iterations (3 in float64), s = dense solve (rel %.2e)", tag,
          res.iterations, rel_diff(sf, x, CG_N));
    double Gs[CG_N];
    matvec(G, sf, Gs, CG_N);
    const double gs = dot(gf, sf, CG_N), ss = dot(sf, sf, CG_N), sGs = dot(sf, Gs, CG_N) + eta * ss;
    const double model = gs + 0.5 * sGs;
    check(fabs(res.grad_dot_step - gs) < tol * fabs(gs) && fabs(res.step_curvature - sGs) < tol * fabs(sGs) &&
              fabs(res.damping_term - lambda * ss) < tol * lambda * ss && fabs(res.model_value - model) < tol * fabs(model) &&
              fabs(res.quadratic_value - (model + 0.5 * lambda * ss)) < tol * fabs(model) && res.damping == lambda &&
              fabs(res.gradient_norm - sqrt(dot(gf, gf, CG_N))) < tol * res.gradient_norm,
          "[%s] result: gᵀs, sᵀ(G+η)s, λ‖s‖², model without λ, φ, ‖g‖ against explicit values", tag);
    /* ρ at α = 1/2 and the LM rule. */
    const double m_half = 0.5 * gs + 0.125 * sGs;
    double rho = 0;
    st = kfac_cg_report_loss_change(h, 0.5, 1.0, 1.0 + 0.8 * m_half, &rho);
    double damping = 0;
    kfac_param_get_double(h, KFAC_PARAM_DAMPING, &damping);
    check(st == KFAC_OK && fabs(rho - 0.8) < tol && fabs(damping - lambda * 2.0 / 3.0) < 1e-15,
          "[%s] kfac_cg_report_loss_change: ρ = Δh / (α gᵀs + ½α² sᵀ(G+η)s) = %.6f, λ·2/3", tag, rho);
    kfac_optimizer_free(h);

    /* The product-function wrapper: bitwise the reverse-communication loop. */
    kfac_optimizer *h1 = cg_handle(dtype, lambda), *h2 = cg_handle(dtype, lambda);
    grads_t s1 = grads_clone(&s), s2 = grads_clone(&s);
    kfac_cg_result r1 = {.struct_size = sizeof r1}, r2 = {.struct_size = sizeof r2};
    product_user_t u = {G, 0, 0};
    const int st1 = rci_solve(h1, dtype, &desc, &g, G, &s1, &r1);
    const int st2 = callback_solve(h2, dtype, &desc, &g, &u, &s2, &r2);
    check(st1 == KFAC_OK && st2 == KFAC_OK && grads_same(&s1, &s2) && memcmp(&r1, &r2, sizeof r1) == 0 &&
              u.calls == r1.products,
          "[%s] kfac_cg_solve_* with a product function = the reverse-communication loop, bitwise", tag);
    /* A failing product function: CALLBACK, the solve open at the first iterate. */
    kfac_cg_desc one = desc;
    one.max_iterations = 1;
    kfac_cg_result r3 = {.struct_size = sizeof r3};
    product_user_t fail = {G, 0, 2};
    const int st3 = rci_solve(h1, dtype, &one, &g, G, &s1, &r1);
    const int st4 = callback_solve(h2, dtype, &desc, &g, &fail, &s2, &r2);
    const int message = nonempty(kfac_optimizer_last_error(h2));
    const int st5 = finish_g(h2, dtype, &s2, 2, &r3);
    check(st3 == KFAC_OK && st4 == KFAC_ERROR_CALLBACK && message && st5 == KFAC_OK &&
              grads_same(&s1, &s2) && r3.iterations == 1 && r3.reason == KFAC_CG_REASON_CALLER,
          "[%s] a product function returning non-zero -> CALLBACK; kfac_cg_finish then gives the last iterate", tag);
    /* An older, smaller kfac_cg_result. */
    kfac_cg_result small;
    memset(&small, 0x55, sizeof small);
    small.struct_size = offsetof(kfac_cg_result, reason);
    int32_t request = 0;
    st = begin_g(h1, dtype, &desc, &g, NULL, 2, &request);
    st = st ? st : finish_g(h1, dtype, &s1, 2, &small);
    check(st == KFAC_OK && small.struct_size == offsetof(kfac_cg_result, reason) && small.iterations == 0 &&
              small.products == 0 && small.reason == 0x55555555,
          "[%s] a kfac_cg_result of an older size is filled up to its struct_size only", tag);
    kfac_optimizer_free(h1);
    kfac_optimizer_free(h2);
    grads_free(&s1);
    grads_free(&s2);

    /* The K-FAC preconditioner where the Gauss-Newton matrix is A ⊗ G exactly. */
    {
        const model_t one_layer = {1, {{3, 2, 1, NULL}}};
        kfac_optimizer *k = make_handle(dtype, &one_layer);
        REQUIRE_OK(k, kfac_param_set_double(k, KFAC_PARAM_DAMPING, 0.05));
        REQUIRE_OK(k, kfac_param_set_int(k, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EIGEN));
        const double a[3] = {0.75, -1.25, 0.5}, abar[4] = {0.75, -1.25, 0.5, 1};
        const double S[2][2] = {{1.125, 0}, {-0.375, 0.8125}}; /* B = S Sᵀ */
        double B[4] = {S[0][0] * S[0][0], S[0][0] * S[1][0], S[0][0] * S[1][0], S[1][0] * S[1][0] + S[1][1] * S[1][1]};
        buf_t xa = buf_new(dtype, 3), ga = buf_new(dtype, 4);
        for (int i = 0; i < 3; i++) buf_set(&xa, (size_t)i, a[i]);
        /* rows √2 · columns of S: G = ½ Σ = S Sᵀ = B */
        const double rows[4] = {S[0][0], S[1][0], S[0][1], S[1][1]};
        for (int i = 0; i < 4; i++) buf_set(&ga, (size_t)i, rows[i] * sqrt(2.0));
        REQUIRE_OK(k, record_inputs(k, 0, &xa, 1));
        REQUIRE_OK(k, record_grads(k, 0, &ga, 2));
        REQUIRE_OK(k, kfac_optimizer_update_factors(k));
        REQUIRE_OK(k, kfac_optimizer_update_inverses(k));
        double K[64];
        for (int o = 0; o < 2; o++)
            for (int c = 0; c < 4; c++)
                for (int o2 = 0; o2 < 2; o2++)
                    for (int c2 = 0; c2 < 4; c2++) {
                        const int i = c < 3 ? o * 3 + c : 6 + o, j = c2 < 3 ? o2 * 3 + c2 : 6 + o2;
                        K[i * 8 + j] = B[o * 2 + o2] * abar[c] * abar[c2];
                    }
        rng_t rk = {5};
        grads_t gk = grads_new(dtype, &one_layer, &rk), vk = grads_new(dtype, &one_layer, &rk),
                pk = grads_new(dtype, &one_layer, &rk), sk = grads_new(dtype, &one_layer, &rk);
        kfac_cg_desc kd = {sizeof kd, .tolerance = 1e-4, .preconditioner = KFAC_CG_PRECONDITIONER_KFAC};
        double gk_f[8], v8[8], p8[8], s8[8], xk[8], Mk[64];
        to_flat(&gk, gk_f);
        int32_t req = 0;
        int products = 0;
        st = begin_g(k, dtype, &kd, &gk, NULL, 1, &req);
        while (st == KFAC_OK && req == KFAC_CG_NEED_PRODUCT) {
            st = vector_g(k, dtype, &vk, 1);
            to_flat(&vk, v8);
            matvec(K, v8, p8, 8);
            from_flat(p8, &pk);
            st = st ? st : supply_g(k, dtype, &pk, 1, &req);
            products++;
        }
        kfac_cg_result rk_res = {.struct_size = sizeof rk_res};
        st = st ? st : finish_g(k, dtype, &sk, 1, &rk_res);
        to_flat(&sk, s8);
        memcpy(Mk, K, sizeof Mk);
        for (int i = 0; i < 8; i++) { Mk[i * 8 + i] += 0.05; xk[i] = -gk_f[i]; }
        solve(Mk, xk, 8, 1);
        check(st == KFAC_OK && products == 1 && rk_res.iterations == 1 && rel_diff(s8, xk, 8) < tol,
              "[%s] K-FAC-preconditioned CG, one example on one layer (G = āāᵀ ⊗ B = A ⊗ G): 1 iteration, exact "
              "(rel %.2e)", tag, rel_diff(s8, xk, 8));
        buf_free(&xa);
        buf_free(&ga);
        grads_free(&gk);
        grads_free(&vk);
        grads_free(&pk);
        grads_free(&sk);
        kfac_optimizer_free(k);
    }
    grads_free(&g);
    grads_free(&s);
}

/* ------------------------------------------------------------------------------------------ */
/* Errors on twins                                                                             */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    twins_t *t;
    const double *G;
    grads_t v[MAX_TWINS], p[MAX_TWINS];
} cg_twins_t;

/* One reverse-communication step on every twin: the vectors must be bitwise identical. Returns
 * 1 if all calls succeeded and agreed; *request receives twin 0's request. */
static int twins_advance(cg_twins_t *c, int32_t *request) {
    twins_t *t = c->t;
    int ok = 1;
    int32_t req[MAX_TWINS] = {0};
    for (int i = 0; i < t->n; i++) {
        double vf[CG_N], pf[CG_N];
        ok &= vector_g(t->h[i], t->dtype, &c->v[i], 2) == KFAC_OK;
        to_flat(&c->v[i], vf);
        matvec(c->G, vf, pf, CG_N);
        from_flat(pf, &c->p[i]);
        ok &= supply_g(t->h[i], t->dtype, &c->p[i], 2, &req[i]) == KFAC_OK;
        ok &= grads_same(&c->v[0], &c->v[i]) && req[i] == req[0];
    }
    *request = req[0];
    return ok;
}

/* Runs every twin's open solve to its end and finishes it; then a report. 1 if the steps,
 * results, ρ and λ agree bitwise. */
static int twins_finish_from(cg_twins_t *c, int32_t request) {
    twins_t *t = c->t;
    int ok = 1, guard = 0;
    while (ok && request == KFAC_CG_NEED_PRODUCT && guard++ < 300) ok = twins_advance(c, &request);
    kfac_cg_result res[MAX_TWINS];
    double rho[MAX_TWINS], lambda[MAX_TWINS];
    for (int i = 0; i < t->n; i++) {
        res[i].struct_size = sizeof res[i];
        ok &= finish_g(t->h[i], t->dtype, &c->v[i], 2, &res[i]) == KFAC_OK;
        ok &= kfac_cg_report_loss_change(t->h[i], 1.0, 2.0, 2.0 + 0.5 * res[i].model_value, &rho[i]) == KFAC_OK;
        ok &= kfac_param_get_double(t->h[i], KFAC_PARAM_DAMPING, &lambda[i]) == KFAC_OK;
        ok &= grads_same(&c->v[0], &c->v[i]) && memcmp(&res[0], &res[i], sizeof res[0]) == 0 &&
              memcmp(&rho[0], &rho[i], sizeof rho[0]) == 0 && memcmp(&lambda[0], &lambda[i], sizeof lambda[0]) == 0;
    }
    return ok;
}

static int twins_finish(cg_twins_t *c) { return twins_finish_from(c, KFAC_CG_NEED_PRODUCT); }

static int twins_begin(cg_twins_t *c, const kfac_cg_desc *desc, const grads_t *g, const grads_t *d) {
    int ok = 1;
    for (int i = 0; i < c->t->n; i++) {
        int32_t request = 0;
        ok &= begin_g(c->t->h[i], c->t->dtype, desc, g, d, 2, &request) == KFAC_OK && request == KFAC_CG_NEED_PRODUCT;
    }
    return ok;
}

static void cg_errors(int dtype) {
    section(dtype == KFAC_FLOAT32 ? "kfac_cg_* errors on twins (float32)" : "kfac_cg_* errors on twins (float64)");
    twins_t t = twins_new(dtype, 4040);
    kfac_optimizer *B = t.h[1];
    const int other = other_dtype(dtype);
    double spectrum[CG_N], G[CG_N * CG_N];
    for (int i = 0; i < CG_N; i++) spectrum[i] = 0.5 + i % 7;
    spd(G, spectrum, CG_N, 78);
    cg_twins_t c = {&t, G, {{0}}, {{0}}};
    rng_t r = {17};
    for (int i = 0; i < t.n; i++) {
        c.v[i] = grads_new(dtype, &TWIN_MODEL, &r);
        c.p[i] = grads_new(dtype, &TWIN_MODEL, &r);
    }
    grads_t g = grads_new(dtype, &TWIN_MODEL, &r), d = grads_new(dtype, &TWIN_MODEL, &r);
    for (int l = 0; l < d.n; l++) {
        for (size_t i = 0; i < d.w[l].n; i++) buf_set(&d.w[l], i, 1 + fabs(rng_sym(&r)));
        if (d.b[l].p)
            for (size_t i = 0; i < d.b[l].n; i++) buf_set(&d.b[l], i, 1 + fabs(rng_sym(&r)));
    }
    grads_t go = grads_new(other, &TWIN_MODEL, &r);
    grads_t s = grads_new(dtype, &TWIN_MODEL, &r), s0 = grads_clone(&s);
    int32_t request = -777;
    kfac_cg_desc desc = {sizeof desc, .tolerance = 1e-6};
    kfac_cg_result res = {.struct_size = sizeof res};

    /* Before any solve. */
    BAD(vector_g(B, dtype, &s, 2), KFAC_ERROR_NO_SOLVE, "kfac_cg_get_vector before begin");
    BAD(supply_g(B, dtype, &g, 2, &request), KFAC_ERROR_NO_SOLVE, "kfac_cg_supply_product before begin");
    BAD(finish_g(B, dtype, &s, 2, &res), KFAC_ERROR_NO_SOLVE, "kfac_cg_finish before begin");
    BAD(kfac_cg_report_loss_change(B, 1, 1, 0, NULL), KFAC_ERROR_NO_SOLVE, "kfac_cg_report_loss_change before a solve");
    check(grads_same(&s, &s0) && request == -777, "[%s]   ... and wrote no caller buffer", dtype_tag(dtype));
    /* Bad begins. */
    BAD(begin_g(B, dtype, &desc, &g, NULL, 2, NULL), KFAC_ERROR_NULL_POINTER, "begin with request NULL");
    BAD(begin_g(B, dtype, &desc, NULL, NULL, 2, &request), KFAC_ERROR_NULL_POINTER, "begin with grad_w NULL");
    {
        void *gw[MAX_LAYERS], *gb[MAX_LAYERS];
        arrays(&g, gw, gb);
        gb[0] = NULL;
        const int st = dtype == KFAC_FLOAT32
            ? kfac_cg_begin_f32(B, &desc, (const float *const *)gw, (const float *const *)gb, NULL, NULL, 2, &request)
            : kfac_cg_begin_f64(B, &desc, (const double *const *)gw, (const double *const *)gb, NULL, NULL, 2, &request);
        BAD(st, KFAC_ERROR_NULL_POINTER, "begin with the bias gradient of a layer with bias NULL");
        gw[1] = NULL;
        gb[0] = g.b[0].p;
        const int st2 = dtype == KFAC_FLOAT32
            ? kfac_cg_begin_f32(B, &desc, (const float *const *)gw, (const float *const *)gb, NULL, NULL, 2, &request)
            : kfac_cg_begin_f64(B, &desc, (const double *const *)gw, (const double *const *)gb, NULL, NULL, 2, &request);
        BAD(st2, KFAC_ERROR_NULL_POINTER, "begin with grad_w[1] NULL");
        gw[1] = g.w[1].p;
        gb[1] = g.w[1].p;
        const int st3 = dtype == KFAC_FLOAT32
            ? kfac_cg_begin_f32(B, &desc, (const float *const *)gw, (const float *const *)gb, NULL, NULL, 2, &request)
            : kfac_cg_begin_f64(B, &desc, (const double *const *)gw, (const double *const *)gb, NULL, NULL, 2, &request);
        BAD(st3, KFAC_ERROR_INVALID_ARGUMENT, "begin with a bias gradient for a layer without bias");
    }
    BAD(begin_g(B, dtype, &desc, &g, NULL, 1, &request), KFAC_ERROR_INVALID_SIZE, "begin with n_layers 1 of 2");
    BAD(begin_g(B, other, &desc, &go, NULL, 2, &request), KFAC_ERROR_DTYPE_MISMATCH, "begin of the other precision");
    kfac_cg_desc bad = desc;
    bad.struct_size = 8;
    BAD(begin_g(B, dtype, &bad, &g, NULL, 2, &request), KFAC_ERROR_INVALID_SIZE, "begin with desc->struct_size 8");
    const struct { int field; double value; const char *what; } fields[] = {
        {0, -1, "max_iterations -1"}, {0, 2000000, "max_iterations 2e6"}, {1, 2, "stop_rule 2"},
        {2, -0.5, "tolerance -0.5"}, {2, 1.0, "tolerance 1 (residual rule)"}, {2, NAN, "tolerance NaN"},
        {3, 3, "preconditioner 3"}, {4, 2, "warm_start 2"}, {5, 1.5, "warm_start_decay 1.5"},
        {6, -0.5, "diagonal_exponent -0.5"}, {7, -1, "l2 -1"}, {7, INFINITY, "l2 Inf"},
    };
    for (size_t k = 0; k < sizeof fields / sizeof fields[0]; k++) {
        bad = desc;
        switch (fields[k].field) {
        case 0: bad.max_iterations = (int32_t)fields[k].value; break;
        case 1: bad.stop_rule = (int32_t)fields[k].value; break;
        case 2: bad.tolerance = fields[k].value; break;
        case 3: bad.preconditioner = (int32_t)fields[k].value; break;
        case 4: bad.warm_start = (int32_t)fields[k].value; break;
        case 5: bad.warm_start_decay = fields[k].value; break;
        case 6: bad.diagonal_exponent = fields[k].value; break;
        default: bad.l2 = fields[k].value; break;
        }
        char what[96];
        snprintf(what, sizeof what, "begin with desc %s", fields[k].what);
        BAD_NO_ROUND(begin_g(B, dtype, &bad, &g, NULL, 2, &request), KFAC_ERROR_INVALID_ARGUMENT, what);
    }
    grads_t gn = grads_clone(&g);
    buf_set(&gn.w[1], 3, NAN);
    BAD(begin_g(B, dtype, &desc, &gn, NULL, 2, &request), KFAC_ERROR_NON_FINITE, "begin with a NaN gradient");
    bad = desc;
    bad.preconditioner = KFAC_CG_PRECONDITIONER_DIAGONAL;
    BAD(begin_g(B, dtype, &bad, &g, NULL, 2, &request), KFAC_ERROR_NULL_POINTER, "begin DIAGONAL without diag");
    BAD(begin_g(B, dtype, &desc, &g, &d, 2, &request), KFAC_ERROR_INVALID_ARGUMENT, "begin with diag but NONE");
    grads_t dn = grads_clone(&d);
    buf_set(&dn.b[0], 1, -0.5);
    BAD(begin_g(B, dtype, &bad, &g, &dn, 2, &request), KFAC_ERROR_INVALID_ARGUMENT, "begin DIAGONAL with a negative d");
    buf_set(&dn.b[0], 1, INFINITY);
    BAD(begin_g(B, dtype, &bad, &g, &dn, 2, &request), KFAC_ERROR_NON_FINITE, "begin DIAGONAL with an infinite d");
    check(request == -777, "[%s]   ... no failed begin wrote *request", dtype_tag(dtype));
    {
        /* NO_STATISTICS for the K-FAC preconditioner on a fresh handle (alone: twins have factors). */
        kfac_optimizer *fresh = make_handle(dtype, &TWIN_MODEL);
        unsigned char *img;
        size_t size = 0;
        img = save_image(fresh, &size);
        kfac_cg_desc kd = desc;
        kd.preconditioner = KFAC_CG_PRECONDITIONER_KFAC;
        expect_fails_unchanged(fresh, begin_g(fresh, dtype, &kd, &g, NULL, 2, &request), KFAC_ERROR_NO_STATISTICS, img,
                               size, "begin KFAC before any statistics");
        free(img);
        kfac_optimizer_free(fresh);
    }
    check(twins_begin(&c, &desc, &g, NULL) && twins_finish(&c),
          "[%s] after the bad begins the twins solve and report identically", dtype_tag(dtype));

    /* On an open solve (two iterations in), for each preconditioner. */
    for (int pre = 0; pre < 3; pre++) {
        kfac_cg_desc od = desc;
        od.preconditioner = pre;
        od.warm_start = pre == 1;
        int ok = twins_begin(&c, &od, &g, pre == KFAC_CG_PRECONDITIONER_DIAGONAL ? &d : NULL);
        ok &= twins_advance(&c, &request) && twins_advance(&c, &request) && request == KFAC_CG_NEED_PRODUCT;
        check(ok, "[%s] preconditioner %d: an open solve on the twins", dtype_tag(dtype), pre);
        grads_t pn = grads_clone(&c.p[1]);
        buf_set(&pn.w[0], 5, INFINITY);
        BAD(supply_g(B, dtype, &pn, 2, &request), KFAC_ERROR_NON_FINITE, "supply_product with an Inf");
        buf_set(&pn.w[0], 5, NAN);
        BAD(supply_g(B, dtype, &pn, 2, &request), KFAC_ERROR_NON_FINITE, "supply_product with a NaN");
        grads_free(&pn);
        BAD(supply_g(B, dtype, &c.p[1], 3, &request), KFAC_ERROR_INVALID_SIZE, "supply_product with n_layers 3");
        BAD(supply_g(B, dtype, &c.p[1], 2, NULL), KFAC_ERROR_NULL_POINTER, "supply_product with request NULL");
        BAD(supply_g(B, dtype, NULL, 2, &request), KFAC_ERROR_NULL_POINTER, "supply_product with product_w NULL");
        BAD(supply_g(B, other, &go, 2, &request), KFAC_ERROR_DTYPE_MISMATCH, "supply_product of the other precision");
        grads_t sv = grads_clone(&s);
        BAD(vector_g(B, dtype, NULL, 2), KFAC_ERROR_NULL_POINTER, "get_vector with vector_w NULL");
        BAD(vector_g(B, dtype, &s, 1), KFAC_ERROR_INVALID_SIZE, "get_vector with n_layers 1");
        BAD(vector_g(B, other, &go, 2), KFAC_ERROR_DTYPE_MISMATCH, "get_vector of the other precision");
        kfac_cg_result small = {.struct_size = 4};
        BAD(finish_g(B, dtype, &s, 2, &small), KFAC_ERROR_INVALID_SIZE, "finish with result->struct_size 4");
        BAD(finish_g(B, dtype, &s, 1, &res), KFAC_ERROR_INVALID_SIZE, "finish with n_layers 1");
        BAD(finish_g(B, other, &go, 2, &res), KFAC_ERROR_DTYPE_MISMATCH, "finish of the other precision");
        BAD(kfac_cg_report_loss_change(B, 1, 1, 0, NULL), KFAC_ERROR_NO_SOLVE, "report during an open solve");
        check(grads_same(&s, &sv), "[%s]   ... and wrote no caller buffer", dtype_tag(dtype));
        grads_free(&sv);
        check(twins_finish(&c), "[%s] preconditioner %d: after the bad calls the twins finish identically "
              "(steps, results, ρ, λ)", dtype_tag(dtype), pre);
    }
    /* On a stopped solve. */
    {
        int ok = twins_begin(&c, &desc, &g, NULL);
        request = KFAC_CG_NEED_PRODUCT;
        for (int k = 0; ok && request == KFAC_CG_NEED_PRODUCT && k < 300; k++) ok = twins_advance(&c, &request);
        check(ok && request == KFAC_CG_DONE, "[%s] a stopped solve on the twins", dtype_tag(dtype));
        BAD(vector_g(B, dtype, &s, 2), KFAC_ERROR_NO_SOLVE, "get_vector on a stopped solve");
        BAD(supply_g(B, dtype, &c.p[1], 2, &request), KFAC_ERROR_NO_SOLVE, "supply_product on a stopped solve");
        check(twins_finish_from(&c, KFAC_CG_DONE), "[%s] then the twins finish identically", dtype_tag(dtype));
    }
    /* Reports. */
    {
        int ok = twins_begin(&c, &desc, &g, NULL);
        request = KFAC_CG_NEED_PRODUCT;
        for (int k = 0; ok && request == KFAC_CG_NEED_PRODUCT && k < 300; k++) ok = twins_advance(&c, &request);
        for (int i = 0; i < t.n; i++) ok &= finish_g(t.h[i], dtype, &c.v[i], 2, NULL) == KFAC_OK;
        check(ok, "[%s] a finished solve on the twins (result NULL accepted)", dtype_tag(dtype));
        double rho = -777;
        BAD(kfac_cg_report_loss_change(B, 0, 1, 0, &rho), KFAC_ERROR_INVALID_ARGUMENT, "report with step_scale 0");
        BAD(kfac_cg_report_loss_change(B, NAN, 1, 0, &rho), KFAC_ERROR_INVALID_ARGUMENT, "report with step_scale NaN");
        BAD(kfac_cg_report_loss_change(B, 1, NAN, 0, &rho), KFAC_ERROR_NON_FINITE, "report with loss_before NaN");
        BAD(kfac_cg_report_loss_change(B, 1, 1, NAN, &rho), KFAC_ERROR_NON_FINITE, "report with loss_after NaN");
        BAD(kfac_cg_report_loss_change(B, 1, 1, -INFINITY, &rho), KFAC_ERROR_NON_FINITE, "report with loss_after -Inf");
        expect_null_handle(kfac_cg_report_loss_change(NULL, 1, 1, 0, &rho), KFAC_ERROR_NULL_POINTER,
                           "kfac_cg_report_loss_change");
        check(rho == -777, "[%s]   ... no failed report wrote *rho", dtype_tag(dtype));
        double rhos[MAX_TWINS], lambdas[MAX_TWINS];
        for (int i = 0; i < t.n; i++) {
            ok &= kfac_cg_report_loss_change(t.h[i], 0.5, 1, INFINITY, &rhos[i]) == KFAC_OK;
            kfac_param_get_double(t.h[i], KFAC_PARAM_DAMPING, &lambdas[i]);
            ok &= isinf(rhos[i]) && rhos[i] < 0 && lambdas[i] == lambdas[0];
        }
        check(ok, "[%s] then a divergent step (+Inf) reports ρ = −Inf identically on the twins", dtype_tag(dtype));
        BAD(kfac_cg_report_loss_change(B, 1, 1, 0, &rho), KFAC_ERROR_NO_SOLVE, "a second report for one solve");
    }
    /* The product-function wrapper's own argument. */
    {
        void *gw[MAX_LAYERS], *gb[MAX_LAYERS], *sw[MAX_LAYERS], *sb[MAX_LAYERS];
        arrays(&g, gw, gb);
        arrays(&s, sw, sb);
        const int st = dtype == KFAC_FLOAT32
            ? kfac_cg_solve_f32(B, &desc, (const float *const *)gw, (const float *const *)gb, NULL, NULL, NULL, NULL,
                                (float *const *)sw, (float *const *)sb, 2, NULL)
            : kfac_cg_solve_f64(B, &desc, (const double *const *)gw, (const double *const *)gb, NULL, NULL, NULL, NULL,
                                (double *const *)sw, (double *const *)sb, 2, NULL);
        BAD(st, KFAC_ERROR_NULL_POINTER, "kfac_cg_solve with product NULL");
        check(twins_begin(&c, &desc, &g, NULL) && twins_finish(&c), "[%s] then the twins solve identically",
              dtype_tag(dtype));
    }
    for (int i = 0; i < t.n; i++) {
        grads_free(&c.v[i]);
        grads_free(&c.p[i]);
    }
    grads_free(&g);
    grads_free(&d);
    grads_free(&gn);
    grads_free(&dn);
    grads_free(&go);
    grads_free(&s);
    grads_free(&s0);
    twins_free(&t);
}

void test_cg(void) {
    section("conjugate gradient and Newton-CG (kfac_cg_*)");
    cg_numerics(KFAC_FLOAT64);
    cg_numerics(KFAC_FLOAT32);
    cg_errors(KFAC_FLOAT32);
    cg_errors(KFAC_FLOAT64);
}
