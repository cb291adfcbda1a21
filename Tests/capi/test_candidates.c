/*
 * test_candidates.c — the experimental section: re-choosing the factor damping γ
 * (kfac_candidates_*) on twin handles and against the oracles (kfac_curvature_multiply_* is
 * tested in test_curvature.c).
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"
#include "oracles.h"

#include <math.h>

/* The experimental entry points with a NULL handle (with the non-experimental
 * kfac_adaptive_get_update_*, which the candidate loop uses). */
void test_candidates_null_handle(void) {
    section("experimental entry points with a NULL handle");
    float f[16] = {0};
    double d[16] = {0};
    float *fp[2] = {f, f};
    double *dp[2] = {d, d};
    double alpha = -777, mu = -777, m = -777;
    /* The damping-candidate calls (KFAC_PARAM_FACTOR_DAMPING_PERIOD). */
    int32_t count = -777, chosen = -777;
    double gamma = -777;
    const float *fq[2] = {f, f};
    const double *dq[2] = {d, d};
    expect_null_handle(kfac_candidates_get_count(NULL, &count), KFAC_ERROR_NULL_POINTER,
                       "kfac_candidates_get_count");
    expect_null_handle(kfac_candidates_get_directions_f32(NULL, 0, fp, fp, 2, &gamma),
                       KFAC_ERROR_NULL_POINTER, "kfac_candidates_get_directions_f32");
    expect_null_handle(kfac_candidates_get_directions_f64(NULL, 0, dp, dp, 2, &gamma),
                       KFAC_ERROR_NULL_POINTER, "kfac_candidates_get_directions_f64");
    expect_null_handle(kfac_candidates_solve_step_size_f32(NULL, f, fq, 1, f, 2, 2,
                                                           KFAC_DIST_CATEGORICAL, &chosen,
                                                           &alpha, &mu, &m),
                       KFAC_ERROR_NULL_POINTER, "kfac_candidates_solve_step_size_f32");
    expect_null_handle(kfac_candidates_solve_step_size_f64(NULL, d, dq, 2, NULL, 2, 2,
                                                           KFAC_DIST_GAUSSIAN, &chosen, &alpha,
                                                           &mu, &m),
                       KFAC_ERROR_NULL_POINTER, "kfac_candidates_solve_step_size_f64");
    expect_null_handle(kfac_adaptive_get_update_f32(NULL, fp, fp, 2), KFAC_ERROR_NULL_POINTER,
                       "kfac_adaptive_get_update_f32");
    expect_null_handle(kfac_adaptive_get_update_f64(NULL, dp, dp, 2), KFAC_ERROR_NULL_POINTER,
                       "kfac_adaptive_get_update_f64");
    int untouched = count == -777 && chosen == -777 && gamma == -777 && alpha == -777 &&
                    mu == -777 && m == -777;
    for (int i = 0; i < 16; i++) untouched = untouched && f[i] == 0 && d[i] == 0;
    check(untouched, "NULL handle: the candidate calls leave *count, *factor_damping, *chosen, "
                     "*alpha, *mu, *predicted_change and the direction/update buffers");
}

/* Arrays of direction products get MAX_CAND entries, so that n_candidates = 4 reads valid memory
 * even if a buggy library accepts it. */
enum { MAX_CAND = 4 };

/* The two entry points that write per-layer buffers like kfac_optimizer_step_*. */
enum { FN_CANDIDATE = 0, FN_UPDATE = 1 };
static const char *const FN_NAME[2] = {"kfac_candidates_get_directions", "kfac_adaptive_get_update"};

/* kfac_candidates_get_directions_* (FN_CANDIDATE) or kfac_adaptive_get_update_* (FN_UPDATE) chosen by `dtype`
 * (the buffers' precision), with raw arrays of MAX_LAYERS pointers (w or b may be NULL). */
static int layer_call(int fn, kfac_optimizer *h, int dtype, void *const *w, void *const *b,
                      int32_t n_layers, int32_t candidate, double *factor_damping) {
    if (dtype == KFAC_FLOAT32) {
        float *wf[MAX_LAYERS], *bf[MAX_LAYERS];
        for (int l = 0; l < MAX_LAYERS; l++) {
            wf[l] = w ? (float *)w[l] : NULL;
            bf[l] = b ? (float *)b[l] : NULL;
        }
        if (fn == FN_CANDIDATE)
            return kfac_candidates_get_directions_f32(h, candidate, w ? wf : NULL, b ? bf : NULL, n_layers,
                                                 factor_damping);
        return kfac_adaptive_get_update_f32(h, w ? wf : NULL, b ? bf : NULL, n_layers);
    }
    double *wd[MAX_LAYERS], *bd[MAX_LAYERS];
    for (int l = 0; l < MAX_LAYERS; l++) {
        wd[l] = w ? (double *)w[l] : NULL;
        bd[l] = b ? (double *)b[l] : NULL;
    }
    if (fn == FN_CANDIDATE)
        return kfac_candidates_get_directions_f64(h, candidate, w ? wd : NULL, b ? bd : NULL, n_layers,
                                             factor_damping);
    return kfac_adaptive_get_update_f64(h, w ? wd : NULL, b ? bd : NULL, n_layers);
}

/* The same with the arrays built from g (its precision and layer count). */
static int layer_call_grads(int fn, kfac_optimizer *h, grads_t *g, int32_t candidate,
                            double *factor_damping) {
    void *w[MAX_LAYERS] = {NULL}, *b[MAX_LAYERS] = {NULL};
    for (int l = 0; l < g->n; l++) {
        w[l] = g->w[l].p;
        b[l] = g->b[l].p;
    }
    return layer_call(fn, h, g->w[0].dtype, w, b, g->n, candidate, factor_damping);
}

/* kfac_candidates_solve_step_size_* chosen by `dtype`, with raw pointers (jd: MAX_CAND entries
 * or NULL). */
static int solve_candidates_raw(kfac_optimizer *h, int dtype, const void *z, const void *const *jd,
                                int32_t n, const void *jp, int64_t rows, int64_t dim, int dist,
                                int32_t *chosen, double *alpha, double *mu, double *m) {
    if (dtype == KFAC_FLOAT32) {
        const float *p[MAX_CAND];
        for (int k = 0; k < MAX_CAND; k++) p[k] = jd ? (const float *)jd[k] : NULL;
        return kfac_candidates_solve_step_size_f32(h, (const float *)z, jd ? p : NULL, n,
                                                   (const float *)jp, rows, dim, dist, chosen, alpha,
                                                   mu, m);
    }
    const double *p[MAX_CAND];
    for (int k = 0; k < MAX_CAND; k++) p[k] = jd ? (const double *)jd[k] : NULL;
    return kfac_candidates_solve_step_size_f64(h, (const double *)z, jd ? p : NULL, n,
                                               (const double *)jp, rows, dim, dist, chosen, alpha,
                                               mu, m);
}

/* Outputs, MAX_CAND direction products and previous products of one "batch" (AD_ROWS × AD_DIM). */
typedef struct {
    buf_t z, jp, jd[MAX_CAND];
    const void *jdp[MAX_CAND];
} candidate_data_t;

static candidate_data_t candidate_data(int dtype, rng_t *r) {
    candidate_data_t d;
    adaptive_data_t a = adaptive_data(dtype, r);
    d.z = a.z;
    d.jp = a.jp;
    d.jd[0] = a.jd;
    for (int k = 1; k < MAX_CAND; k++) {
        d.jd[k] = buf_new(dtype, AD_ROWS * AD_DIM);
        buf_random(&d.jd[k], r);
    }
    for (int k = 0; k < MAX_CAND; k++) d.jdp[k] = d.jd[k].p;
    return d;
}

static void candidate_data_free(candidate_data_t *d) {
    buf_free(&d->z);
    buf_free(&d->jp);
    for (int k = 0; k < MAX_CAND; k++) buf_free(&d->jd[k]);
}

/* A valid candidate solve (with previous products) of n candidates. */
static int solve_candidates(kfac_optimizer *h, const candidate_data_t *d, int32_t n, int32_t *chosen,
                            double *alpha, double *mu, double *m) {
    return solve_candidates_raw(h, d->z.dtype, d->z.p, d->jdp, n, d->jp.p, AD_ROWS, AD_DIM,
                                KFAC_DIST_CATEGORICAL, chosen, alpha, mu, m);
}

/* What a bad call on twin 1 must not have changed although the state images do not show it (they
 * hold neither the candidates nor the directions awaiting a solve): kfac_candidates_get_count, every
 * candidate's directions and γ; then, with identical data on every twin, the candidate solve
 * (chosen, α, μ, M(δ), the resulting KFAC_PARAM_FACTOR_DAMPING), kfac_adaptive_get_update_* and a report.
 * Statuses must agree and results be bitwise identical; when candidates await, the solve and the
 * update must succeed. Consumes the pending candidates. */
static int twins_candidates_agree(twins_t *t, char *why, size_t why_size) {
    int32_t n[MAX_TWINS];
    why[0] = '\0';
    for (int i = 0; i < t->n; i++) {
        n[i] = -1;
        const int st = kfac_candidates_get_count(t->h[i], &n[i]);
        if (st != KFAC_OK || n[i] != n[0]) {
            snprintf(why, why_size, "kfac_candidates_get_count: twin 0 %d, twin %d %d (%s)", (int)n[0], i,
                     (int)n[i], status_name(st));
            return 0;
        }
    }
    int ok = 1;
    grads_t init = grads_new(t->dtype, &t->model, &t->rng);
    for (int k = 0; ok && k < n[0]; k++) {
        grads_t d[MAX_TWINS];
        double gamma[MAX_TWINS];
        for (int i = 0; i < t->n; i++) {
            d[i] = grads_clone(&init);
            gamma[i] = -1;
            const int st = layer_call_grads(FN_CANDIDATE, t->h[i], &d[i], k, &gamma[i]);
            if (ok && st != KFAC_OK) {
                snprintf(why, why_size, "candidate %d on twin %d: %s: %s", k, i, status_name(st),
                         kfac_optimizer_last_error(t->h[i]));
                ok = 0;
            } else if (ok && i > 0 && (!grads_same(&d[0], &d[i]) ||
                                       memcmp(&gamma[0], &gamma[i], sizeof(double)) != 0)) {
                snprintf(why, why_size, "candidate %d's directions or γ (%.17g / %.17g) differ", k,
                         gamma[0], gamma[i]);
                ok = 0;
            }
        }
        for (int i = 0; i < t->n; i++) grads_free(&d[i]);
    }
    grads_free(&init);
    if (!ok) return 0;

    candidate_data_t cd = candidate_data(t->dtype, &t->rng);
    grads_t u0 = grads_new(t->dtype, &t->model, &t->rng), u[MAX_TWINS];
    int st_solve[MAX_TWINS], st_update[MAX_TWINS], st_report[MAX_TWINS];
    int32_t chosen[MAX_TWINS];
    double res[MAX_TWINS][5]; /* α, μ, M(δ), γ afterwards, ρ */
    for (int i = 0; i < t->n; i++) {
        memset(res[i], 0, sizeof res[i]);
        chosen[i] = -1;
        st_solve[i] = n[0] > 0 ? solve_candidates(t->h[i], &cd, n[0], &chosen[i], &res[i][0],
                                                  &res[i][1], &res[i][2])
                               : KFAC_ERROR_NO_STEP;
        kfac_param_get_double(t->h[i], KFAC_PARAM_FACTOR_DAMPING, &res[i][3]);
        u[i] = grads_clone(&u0);
        st_update[i] = layer_call_grads(FN_UPDATE, t->h[i], &u[i], 0, NULL);
        st_report[i] = kfac_adaptive_report_loss_change(t->h[i], 1.0, 0.75, &res[i][4]);
    }
    if (n[0] > 0 && (st_solve[0] != KFAC_OK || st_update[0] != KFAC_OK)) {
        snprintf(why, why_size, "twin 0: candidate solve %s, kfac_adaptive_get_update %s: %s",
                 status_name(st_solve[0]), status_name(st_update[0]), kfac_optimizer_last_error(t->h[0]));
        ok = 0;
    }
    for (int i = 1; ok && i < t->n; i++) {
        if (st_solve[i] != st_solve[0] || st_update[i] != st_update[0] ||
            st_report[i] != st_report[0]) {
            snprintf(why, why_size, "statuses differ: solve %s / %s, update %s / %s, report %s / %s",
                     status_name(st_solve[0]), status_name(st_solve[i]), status_name(st_update[0]),
                     status_name(st_update[i]), status_name(st_report[0]), status_name(st_report[i]));
            ok = 0;
        } else if (chosen[i] != chosen[0] || memcmp(res[0], res[i], sizeof res[0]) != 0) {
            snprintf(why, why_size, "twins disagree: chosen %d / %d, α %.17g / %.17g, μ %.17g / "
                     "%.17g, γ %.17g / %.17g, ρ %.17g / %.17g", (int)chosen[0], (int)chosen[i],
                     res[0][0], res[i][0], res[0][1], res[i][1], res[0][3], res[i][3], res[0][4],
                     res[i][4]);
            ok = 0;
        } else if (st_update[0] == KFAC_OK && !grads_same(&u[0], &u[i])) {
            snprintf(why, why_size, "kfac_adaptive_get_update differs on twin %d", i);
            ok = 0;
        }
    }
    for (int i = 0; i < t->n; i++) grads_free(&u[i]);
    grads_free(&u0);
    candidate_data_free(&cd);
    return ok;
}

/* After a bad candidate call on twin 1: the usual checks, then twins_candidates_agree. */
static void after_bad_candidates(twins_t *t, int got, int want, const char *what, int extra_ok) {
    after_bad(t, got, want, what, 0, extra_ok);
    char why[512] = "";
    const int agree = twins_candidates_agree(t, why, sizeof why);
    check(agree, "[%s]   ... then candidates, candidate solve, update and report agree bitwise on "
                 "both twins%s%s", dtype_tag(t->dtype), why[0] ? ": " : "", why);
}

/* The state the twins are brought to before a bad call: the last step was a γ step (3
 * candidates await the solve), or was not (1 candidate), or was a γ step already solved on both
 * twins (no candidates; an update to get and a report pending). */
enum { SETUP_GAMMA, SETUP_PLAIN, SETUP_SOLVED };

static int twins_setup(twins_t *t, int setup, char *why, size_t why_size) {
    const int32_t want = setup == SETUP_PLAIN ? 1 : 3;
    int reached = 0;
    for (int tries = 0; !reached && tries < 2; tries++) {
        if (!twins_round(t, why, why_size)) return 0;
        int32_t n0 = -1, n1 = -1;
        reached = kfac_candidates_get_count(t->h[0], &n0) == KFAC_OK &&
                  kfac_candidates_get_count(t->h[1], &n1) == KFAC_OK && n0 == want && n1 == want;
    }
    if (!reached) {
        snprintf(why, why_size, "two rounds gave no step with %d candidates", (int)want);
        return 0;
    }
    if (setup != SETUP_SOLVED) return 1;
    candidate_data_t cd = candidate_data(t->dtype, &t->rng);
    int32_t c[2];
    double r[2][3];
    int ok = 1;
    for (int i = 0; i < 2; i++)
        ok = ok && solve_candidates(t->h[i], &cd, 3, &c[i], &r[i][0], &r[i][1], &r[i][2]) == KFAC_OK;
    ok = ok && c[0] == c[1] && memcmp(r[0], r[1], sizeof r[0]) == 0;
    if (!ok) snprintf(why, why_size, "the candidate solve on both twins failed or differed");
    candidate_data_free(&cd);
    return ok;
}

typedef struct {
    int dtype;
    const candidate_data_t *d;
} solve_candidates_args_t;

static int call_solve_candidates_overflow(kfac_optimizer *h, const void *arg) {
    const solve_candidates_args_t *a = arg;
    int32_t chosen;
    double alpha, mu, m;
    const int64_t big = (int64_t)1 << 32;
    return solve_candidates_raw(h, a->dtype, a->d->z.p, a->d->jdp, 3, NULL, big, big,
                                KFAC_DIST_CATEGORICAL, &chosen, &alpha, &mu, &m);
}

void test_candidate_errors(int dtype) {
    twins_t t = twins_new(dtype, dtype == KFAC_FLOAT32 ? 1101 : 1202);
    kfac_optimizer *B = t.h[1];
    const int dt = dtype, od = other_dtype(dt);
    char what[256], why[512] = "";
    section(dt == KFAC_FLOAT32 ? "float32 handle: factor-damping candidates (T₂ = 2)"
                               : "float64 handle: factor-damping candidates (T₂ = 2)");
    /* Both twins: a γ step every 2 steps with ω₂ = 0.8²; γ = 0 on float32 (the candidates start
     * from λ), γ = 0.01 on float64. */
    const double gamma0 = dt == KFAC_FLOAT32 ? 0.0 : 1e-2, base = 0.8;
    const double omega = base * base;
    for (int i = 0; i < t.n; i++) {
        REQUIRE_OK(t.h[i], kfac_param_set_int(t.h[i], KFAC_PARAM_FACTOR_DAMPING_PERIOD, 2));
        REQUIRE_OK(t.h[i], kfac_param_set_double(t.h[i], KFAC_PARAM_FACTOR_DAMPING_DECAY, base));
        REQUIRE_OK(t.h[i], kfac_param_set_double(t.h[i], KFAC_PARAM_FACTOR_DAMPING, gamma0));
        /* γ = 10 λ and beyond: no band (KFAC_PARAM_FACTOR_DAMPING_RATIO is tested elsewhere). */
        REQUIRE_OK(t.h[i], kfac_param_set_double(t.h[i], KFAC_PARAM_FACTOR_DAMPING_RATIO, 1e300));
    }

    /* Before any step: no candidates, nothing to solve or get. */
    int32_t count = -777, chosen = -777;
    double gamma = -777, alpha = -777, mu = -777, m = -777;
    int st = kfac_candidates_get_count(B, &count);
    check(st == KFAC_OK && count == 0, "[%s] kfac_candidates_get_count before any step: %d (want 0)",
          dtype_tag(dt), (int)count);
    grads_t g = grads_new(dt, &t.model, &t.rng), g0 = grads_clone(&g);
    st = bad_call(B, layer_call_grads(FN_CANDIDATE, B, &g, 0, &gamma));
    after_bad(&t, st, KFAC_ERROR_NO_STEP, "kfac_candidates_get_directions(candidate 0) before any step",
              0, grads_same(&g, &g0) && gamma == -777);
    st = bad_call(B, layer_call_grads(FN_UPDATE, B, &g, 0, NULL));
    after_bad(&t, st, KFAC_ERROR_NO_STEP, "kfac_adaptive_get_update before any step", 0, grads_same(&g, &g0));
    {
        candidate_data_t cd = candidate_data(dt, &t.rng);
        st = bad_call(B, solve_candidates(B, &cd, 1, &chosen, &alpha, &mu, &m));
        after_bad(&t, st, KFAC_ERROR_NO_STEP, "kfac_candidates_solve_step_size before any step", 0,
                  chosen == -777 && alpha == -777 && mu == -777 && m == -777);
        candidate_data_free(&cd);
    }

    /* The first step (k = 0) is a γ step; before the first solve there is no update. */
    if (!twins_setup(&t, SETUP_GAMMA, why, sizeof why))
        check(0, "[%s] the first step prepares 3 candidates: %s", dtype_tag(dt), why);
    st = bad_call(B, layer_call_grads(FN_UPDATE, B, &g, 0, NULL));
    after_bad_candidates(&t, st, KFAC_ERROR_NO_STEP,
                         "kfac_adaptive_get_update after a step, before the first solve",
                         grads_same(&g, &g0));

    /* Valid calls. The next step is a γ step (a plain step first), made here so that its written
     * directions can be compared with candidate 0. */
    if (!twins_setup(&t, SETUP_PLAIN, why, sizeof why))
        check(0, "[%s] a step that is not a γ step: %s", dtype_tag(dt), why);
    {
        double lam = 0, gam = 0;
        REQUIRE_OK(t.h[0], kfac_param_get_double(t.h[0], KFAC_PARAM_DAMPING, &lam));
        REQUIRE_OK(t.h[0], kfac_param_get_double(t.h[0], KFAC_PARAM_FACTOR_DAMPING, &gam));
        const double cur = gam > 0 ? gam : lam;
        const double want_gamma[3] = {cur, cur * omega, cur / omega};
        if (!twins_record(&t)) check(0, "[%s] twins_record before a γ step", dtype_tag(dt));
        grads_t in = grads_new(dt, &t.model, &t.rng), out[2], dir[2][3];
        double gk[2][3];
        int ok = 1;
        for (int i = 0; i < 2; i++) {
            out[i] = grads_clone(&in);
            ok = ok && step(t.h[i], &out[i]) == KFAC_OK;
            count = -1;
            ok = ok && kfac_candidates_get_count(t.h[i], &count) == KFAC_OK && count == 3;
            for (int k = 0; k < 3; k++) {
                dir[i][k] = grads_clone(&in);
                gk[i][k] = -1;
                ok = ok && layer_call_grads(FN_CANDIDATE, t.h[i], &dir[i][k], k, &gk[i][k]) == KFAC_OK;
            }
        }
        check(ok && grads_same(&dir[0][0], &out[0]) && grads_same(&dir[1][0], &out[1]) &&
                  gk[0][0] == want_gamma[0] && gk[1][0] == want_gamma[0],
              "[%s] γ step: 3 candidates; candidate 0's directions are bitwise those kfac_optimizer_step "
              "wrote, its γ the current %s %g (got %.17g)", dtype_tag(dt),
              gamma0 > 0 ? "γ" : "λ (γ = 0)",
              want_gamma[0], gk[0][0]);
        int gammas_ok = ok, distinct = ok;
        for (int k = 1; k < 3; k++) {
            gammas_ok = gammas_ok && fabs(gk[0][k] - want_gamma[k]) <= 1e-14 * want_gamma[k] &&
                        gk[1][k] == gk[0][k];
            distinct = distinct && !grads_same(&dir[0][k], &dir[0][0]) &&
                       grads_same(&dir[0][k], &dir[1][k]);
        }
        check(gammas_ok && distinct,
              "[%s] candidates 1, 2: γ·ω₂ = %.10g, γ/ω₂ = %.10g (want %.10g, %.10g; ω₂ = 0.8^2), "
              "directions of their own, identical on both twins", dtype_tag(dt), gk[0][1], gk[0][2],
              want_gamma[1], want_gamma[2]);

        /* Valid calls on twin 1 only change nothing: the count, every candidate's directions (twice,
         * once with factor_damping = NULL). */
        ok = kfac_candidates_get_count(B, &count) == KFAC_OK && count == 3;
        for (int rep = 0; rep < 2; rep++)
            for (int k = 2; k >= 0; k--) {
                grads_t d = grads_clone(&in);
                double gm = -1;
                ok = ok && layer_call_grads(FN_CANDIDATE, B, &d, k, rep ? NULL : &gm) == KFAC_OK &&
                     grads_same(&d, &dir[1][k]) && (rep || gm == gk[1][k]);
                grads_free(&d);
            }
        check(ok && same_state(t.h[0], B) && nonempty(kfac_optimizer_last_error(B)) == 0,
              "[%s] kfac_candidates_get_directions (every candidate, twice, factor_damping NULL once) "
              "and kfac_candidates_get_count on twin 1 only: same results, state image unchanged",
              dtype_tag(dt));

        /* The solve on both twins: the kept candidate's γ becomes KFAC_PARAM_FACTOR_DAMPING. */
        candidate_data_t cd = candidate_data(dt, &t.rng);
        int32_t c[2] = {-1, -1};
        double r[2][3], after[2] = {-1, -1};
        ok = 1;
        for (int i = 0; i < 2; i++) {
            ok = ok && solve_candidates(t.h[i], &cd, 3, &c[i], &r[i][0], &r[i][1], NULL) == KFAC_OK;
            r[i][2] = 0;
            kfac_param_get_double(t.h[i], KFAC_PARAM_FACTOR_DAMPING, &after[i]);
        }
        ok = ok && c[0] == c[1] && c[0] >= 0 && c[0] < 3 && memcmp(r[0], r[1], sizeof r[0]) == 0;
        check(ok && after[0] == gk[0][c[0]] && after[1] == after[0],
              "[%s] kfac_candidates_solve_step_size (predicted_change NULL) keeps candidate %d on both "
              "twins; KFAC_PARAM_FACTOR_DAMPING is then its γ %.10g (got %.10g)", dtype_tag(dt),
              (int)c[0], ok ? gk[0][c[0]] : NAN, after[0]);
        count = -1;
        ok = kfac_candidates_get_count(B, &count) == KFAC_OK && count == 0;
        check(ok, "[%s] kfac_candidates_get_count after the solve: %d (want 0)", dtype_tag(dt), (int)count);
        /* kfac_adaptive_get_update is also repeatable and changes nothing. */
        grads_t u1 = grads_clone(&in), u2 = grads_clone(&in), u0 = grads_clone(&in);
        ok = layer_call_grads(FN_UPDATE, B, &u1, 0, NULL) == KFAC_OK &&
             layer_call_grads(FN_UPDATE, B, &u2, 0, NULL) == KFAC_OK &&
             layer_call_grads(FN_UPDATE, t.h[0], &u0, 0, NULL) == KFAC_OK;
        check(ok && grads_same(&u1, &u2) && grads_same(&u0, &u1) && same_state(t.h[0], B),
              "[%s] kfac_adaptive_get_update twice on twin 1, once on twin 0: identical updates, state image "
              "unchanged", dtype_tag(dt));
        ok = kfac_adaptive_report_loss_change(t.h[0], 1.0, 0.5, NULL) == KFAC_OK &&
             kfac_adaptive_report_loss_change(B, 1.0, 0.5, NULL) == KFAC_OK;
        why[0] = '\0';
        ok = ok && twins_setup(&t, SETUP_GAMMA, why, sizeof why) &&
             twins_candidates_agree(&t, why, sizeof why);
        check(ok, "[%s]   ... then report, a γ step and its candidate cycle agree on both twins%s%s",
              dtype_tag(dt), why[0] ? ": " : "", why);
        grads_free(&u0);
        grads_free(&u1);
        grads_free(&u2);
        candidate_data_free(&cd);

        /* With one candidate the candidate solve is kfac_adaptive_solve_step_size_*: twin 0 calls the one,
         * twin 1 the other, with the same data. */
        if (!twins_setup(&t, SETUP_PLAIN, why, sizeof why))
            check(0, "[%s] a step that is not a γ step: %s", dtype_tag(dt), why);
        cd = candidate_data(dt, &t.rng);
        double single[3] = {0}, cand[3] = {0}, rho[2] = {0};
        int32_t kept = -1;
        ok = solve_raw(t.h[0], dt, cd.z.p, cd.jd[0].p, cd.jp.p, AD_ROWS, AD_DIM, KFAC_DIST_CATEGORICAL,
                       &single[0], &single[1], &single[2]) == KFAC_OK &&
             solve_candidates(B, &cd, 1, &kept, &cand[0], &cand[1], &cand[2]) == KFAC_OK;
        const int same_solve = ok && kept == 0 && memcmp(single, cand, sizeof single) == 0 &&
                               same_state(t.h[0], B);
        u0 = grads_clone(&in);
        u1 = grads_clone(&in);
        ok = layer_call_grads(FN_UPDATE, t.h[0], &u0, 0, NULL) == KFAC_OK &&
             layer_call_grads(FN_UPDATE, B, &u1, 0, NULL) == KFAC_OK && grads_same(&u0, &u1) &&
             kfac_adaptive_report_loss_change(t.h[0], 1.0, 0.75, &rho[0]) == KFAC_OK &&
             kfac_adaptive_report_loss_change(B, 1.0, 0.75, &rho[1]) == KFAC_OK && rho[0] == rho[1];
        check(same_solve && ok,
              "[%s] one candidate: kfac_candidates_solve_step_size(n_candidates = 1) on twin 1 gives "
              "bitwise kfac_adaptive_solve_step_size's α %.10g, μ %.10g, M(δ) %.10g (twin 0), chosen 0, the "
              "same state image, update and ρ", dtype_tag(dt), single[0], single[1], single[2]);
        grads_free(&u0);
        grads_free(&u1);
        candidate_data_free(&cd);
        for (int i = 0; i < 2; i++) {
            grads_free(&out[i]);
            for (int k = 0; k < 3; k++) grads_free(&dir[i][k]);
        }
        grads_free(&in);
    }

    /* kfac_candidates_get_directions and kfac_adaptive_get_update: arrays, n_layers, dtype, candidate, order. */
    const struct {
        int fn, setup, which, want;
        const char *what;
    } lc[] = {
        {FN_CANDIDATE, SETUP_GAMMA, 0, KFAC_ERROR_NULL_POINTER, "weight_dirs = NULL"},
        {FN_CANDIDATE, SETUP_GAMMA, 1, KFAC_ERROR_NULL_POINTER, "weight_dirs[1] = NULL"},
        {FN_CANDIDATE, SETUP_GAMMA, 2, KFAC_ERROR_NULL_POINTER, "bias_dirs = NULL, layer 0 has a bias"},
        {FN_CANDIDATE, SETUP_GAMMA, 3, KFAC_ERROR_NULL_POINTER,
         "bias_dirs[0] = NULL, layer 0 has a bias"},
        {FN_CANDIDATE, SETUP_GAMMA, 4, KFAC_ERROR_INVALID_ARGUMENT,
         "bias_dirs[1] given, layer 1 has no bias"},
        {FN_CANDIDATE, SETUP_GAMMA, 5, KFAC_ERROR_INVALID_SIZE, "n_layers = 0"},
        {FN_CANDIDATE, SETUP_GAMMA, 6, KFAC_ERROR_INVALID_SIZE, "n_layers = 1 < layer count"},
        {FN_CANDIDATE, SETUP_GAMMA, 7, KFAC_ERROR_INVALID_SIZE, "n_layers = 3 > layer count"},
        {FN_CANDIDATE, SETUP_GAMMA, 8, KFAC_ERROR_INVALID_SIZE, "n_layers = -1"},
        {FN_CANDIDATE, SETUP_GAMMA, 9, KFAC_ERROR_INVALID_SIZE, "n_layers = INT32_MIN"},
        {FN_CANDIDATE, SETUP_GAMMA, 10, KFAC_ERROR_DTYPE_MISMATCH, "other dtype"},
        {FN_CANDIDATE, SETUP_GAMMA, 11, KFAC_ERROR_INVALID_ARGUMENT, "candidate = -1"},
        {FN_CANDIDATE, SETUP_GAMMA, 12, KFAC_ERROR_INVALID_ARGUMENT, "candidate = 3 of 3"},
        {FN_CANDIDATE, SETUP_GAMMA, 13, KFAC_ERROR_INVALID_ARGUMENT, "candidate = INT32_MAX"},
        {FN_CANDIDATE, SETUP_GAMMA, 14, KFAC_ERROR_INVALID_ARGUMENT, "candidate = INT32_MIN"},
        {FN_CANDIDATE, SETUP_PLAIN, 15, KFAC_ERROR_INVALID_ARGUMENT,
         "candidate = 1 after a step that is not a γ step (1 candidate)"},
        {FN_CANDIDATE, SETUP_SOLVED, 16, KFAC_ERROR_NO_STEP, "candidate 0 after the step was solved"},
        {FN_UPDATE, SETUP_SOLVED, 0, KFAC_ERROR_NULL_POINTER, "weight_updates = NULL"},
        {FN_UPDATE, SETUP_SOLVED, 1, KFAC_ERROR_NULL_POINTER, "weight_updates[1] = NULL"},
        {FN_UPDATE, SETUP_SOLVED, 2, KFAC_ERROR_NULL_POINTER,
         "bias_updates = NULL, layer 0 has a bias"},
        {FN_UPDATE, SETUP_SOLVED, 3, KFAC_ERROR_NULL_POINTER,
         "bias_updates[0] = NULL, layer 0 has a bias"},
        {FN_UPDATE, SETUP_SOLVED, 4, KFAC_ERROR_INVALID_ARGUMENT,
         "bias_updates[1] given, layer 1 has no bias"},
        {FN_UPDATE, SETUP_SOLVED, 5, KFAC_ERROR_INVALID_SIZE, "n_layers = 0"},
        {FN_UPDATE, SETUP_SOLVED, 6, KFAC_ERROR_INVALID_SIZE, "n_layers = 1 < layer count"},
        {FN_UPDATE, SETUP_SOLVED, 7, KFAC_ERROR_INVALID_SIZE, "n_layers = 3 > layer count"},
        {FN_UPDATE, SETUP_SOLVED, 8, KFAC_ERROR_INVALID_SIZE, "n_layers = -1"},
        {FN_UPDATE, SETUP_SOLVED, 9, KFAC_ERROR_INVALID_SIZE, "n_layers = INT32_MIN"},
        {FN_UPDATE, SETUP_SOLVED, 10, KFAC_ERROR_DTYPE_MISMATCH, "other dtype"},
        {FN_UPDATE, SETUP_GAMMA, 10, KFAC_ERROR_DTYPE_MISMATCH, "other dtype, candidates pending"},
    };
    for (size_t c = 0; c < sizeof lc / sizeof lc[0]; c++) {
        const int which = lc[c].which, fn = lc[c].fn;
        if (!twins_setup(&t, lc[c].setup, why, sizeof why))
            check(0, "[%s] twins_setup before a bad %s: %s", dtype_tag(dt), FN_NAME[fn], why);
        grads_t gr = grads_new(which == 10 ? od : dt, &t.model, &t.rng), gr0 = grads_clone(&gr);
        /* MAX_LAYERS entries, so that n_layers = 3 reads valid memory even if it is accepted. */
        void *w[MAX_LAYERS] = {gr.w[0].p, gr.w[1].p, gr.w[1].p, NULL};
        void *b[MAX_LAYERS] = {gr.b[0].p, NULL, NULL, NULL};
        void **wp = w, **bp = b;
        int32_t n = 2, candidate = 1;
        switch (which) {
        case 0: wp = NULL; break;
        case 1: w[1] = NULL; break;
        case 2: bp = NULL; break;
        case 3: b[0] = NULL; break;
        case 4: b[1] = gr.w[0].p; break; /* any buffer of >= 3 values */
        case 5: n = 0; break;
        case 6: n = 1; break;
        case 7: n = 3; break;
        case 8: n = -1; break;
        case 9: n = INT32_MIN; break;
        case 11: candidate = -1; break;
        case 12: candidate = 3; break;
        case 13: candidate = INT32_MAX; break;
        case 14: candidate = INT32_MIN; break;
        case 15: candidate = 1; break;
        case 16: candidate = 0; break;
        default: break;
        }
        gamma = -777;
        st = bad_call(B, layer_call(fn, B, gr.w[0].dtype, wp, bp, n, candidate, &gamma));
        if (which == 10)
            snprintf(what, sizeof what, "%s_%s on a %s handle%s", FN_NAME[fn], dtype_tag(od),
                     dtype_tag(dt), lc[c].setup == SETUP_GAMMA ? " (candidates pending)" : "");
        else
            snprintf(what, sizeof what, "%s(%s)", FN_NAME[fn], lc[c].what);
        after_bad_candidates(&t, st, lc[c].want, what, grads_same(&gr, &gr0) && gamma == -777);
        grads_free(&gr);
        grads_free(&gr0);
    }

    /* kfac_candidates_get_count(count = NULL). */
    if (!twins_setup(&t, SETUP_GAMMA, why, sizeof why))
        check(0, "[%s] twins_setup: %s", dtype_tag(dt), why);
    st = bad_call(B, kfac_candidates_get_count(B, NULL));
    after_bad_candidates(&t, st, KFAC_ERROR_NULL_POINTER, "kfac_candidates_get_count(count = NULL)", 1);

    /* kfac_candidates_solve_step_size. The twins have a previous update δ₀ by now. */
    const struct {
        int setup, which, want;
        const char *what;
    } sc[] = {
        {SETUP_GAMMA, 0, KFAC_ERROR_NULL_POINTER, "outputs = NULL"},
        {SETUP_GAMMA, 1, KFAC_ERROR_NULL_POINTER, "direction_products = NULL"},
        {SETUP_GAMMA, 2, KFAC_ERROR_NULL_POINTER, "direction_products[1] = NULL"},
        {SETUP_GAMMA, 3, KFAC_ERROR_NULL_POINTER, "chosen = NULL"},
        {SETUP_GAMMA, 4, KFAC_ERROR_NULL_POINTER, "alpha = NULL"},
        {SETUP_GAMMA, 5, KFAC_ERROR_NULL_POINTER, "mu = NULL"},
        {SETUP_GAMMA, 6, KFAC_ERROR_INVALID_ARGUMENT, "n_candidates = 2, kfac_candidates_get_count 3"},
        {SETUP_GAMMA, 7, KFAC_ERROR_INVALID_ARGUMENT, "n_candidates = 4, kfac_candidates_get_count 3"},
        {SETUP_GAMMA, 8, KFAC_ERROR_INVALID_ARGUMENT, "n_candidates = 1 on a γ step (3 candidates)"},
        {SETUP_GAMMA, 9, KFAC_ERROR_INVALID_ARGUMENT, "n_candidates = 0"},
        {SETUP_GAMMA, 10, KFAC_ERROR_INVALID_ARGUMENT, "n_candidates = -1"},
        {SETUP_GAMMA, 11, KFAC_ERROR_INVALID_ARGUMENT, "n_candidates = INT32_MIN"},
        {SETUP_PLAIN, 12, KFAC_ERROR_INVALID_ARGUMENT,
         "n_candidates = 3 after a step with 1 candidate"},
        {SETUP_GAMMA, 13, KFAC_ERROR_INVALID_SIZE, "rows = 0"},
        {SETUP_GAMMA, 14, KFAC_ERROR_INVALID_SIZE, "output_dim = -3"},
        {SETUP_GAMMA, 15, KFAC_ERROR_SIZE_OVERFLOW, "rows = output_dim = 2^32"},
        {SETUP_GAMMA, 16, KFAC_ERROR_INVALID_ARGUMENT, "distribution = 3"},
        {SETUP_GAMMA, 17, KFAC_ERROR_NON_FINITE, "NaN in direction_products[2]"},
        {SETUP_GAMMA, 18, KFAC_ERROR_NON_FINITE, "-Inf in the last value of direction_products[0]"},
        {SETUP_PLAIN, 19, KFAC_ERROR_NON_FINITE, "NaN in direction_products[0], 1 candidate"},
        {SETUP_GAMMA, 20, KFAC_ERROR_NON_FINITE, "+Inf in the outputs"},
        {SETUP_GAMMA, 21, KFAC_ERROR_NON_FINITE, "NaN in the previous products (δ₀ exists)"},
        {SETUP_GAMMA, 22, KFAC_ERROR_DTYPE_MISMATCH, "other dtype"},
        {SETUP_SOLVED, 23, KFAC_ERROR_NO_STEP, "a second solve of the same step"},
    };
    for (size_t c = 0; c < sizeof sc / sizeof sc[0]; c++) {
        const int which = sc[c].which;
        if (!twins_setup(&t, sc[c].setup, why, sizeof why))
            check(0, "[%s] twins_setup before a bad candidate solve: %s", dtype_tag(dt), why);
        candidate_data_t cd = candidate_data(which == 22 ? od : dt, &t.rng);
        const void *z = cd.z.p, *jp = cd.jp.p;
        const void *jd[MAX_CAND];
        memcpy(jd, cd.jdp, sizeof jd);
        const void *const *jdp = jd;
        int32_t n = sc[c].setup == SETUP_PLAIN ? 1 : 3, *pc = &chosen;
        int64_t rows = AD_ROWS, dim = AD_DIM;
        int dist = KFAC_DIST_CATEGORICAL;
        double *pa = &alpha, *pm = &mu;
        switch (which) {
        case 0: z = NULL; break;
        case 1: jdp = NULL; break;
        case 2: jd[1] = NULL; break;
        case 3: pc = NULL; break;
        case 4: pa = NULL; break;
        case 5: pm = NULL; break;
        case 6: n = 2; break;
        case 7: n = 4; break;
        case 8: n = 1; break;
        case 9: n = 0; break;
        case 10: n = -1; break;
        case 11: n = INT32_MIN; break;
        case 12: n = 3; break;
        case 13: rows = 0; break;
        case 14: dim = -3; break;
        case 16: dist = 3; break;
        case 17: buf_set(&cd.jd[2], 5, NAN); break;
        case 18: buf_set(&cd.jd[0], cd.jd[0].n - 1, -INFINITY); break;
        case 19: buf_set(&cd.jd[0], 0, NAN); break;
        case 20: buf_set(&cd.z, 3, INFINITY); break;
        case 21: buf_set(&cd.jp, 2, NAN); break;
        default: break;
        }
        if (which == 15) {
            solve_candidates_args_t args = {dt, &cd};
            snprintf(what, sizeof what, "[%s] kfac_candidates_solve_step_size(%s)", dtype_tag(dt),
                     sc[c].what);
            if (!survives_in_child(B, call_solve_candidates_overflow, &args, what)) {
                candidate_data_free(&cd);
                continue;
            }
            rows = dim = (int64_t)1 << 32;
            jp = NULL;
        }
        chosen = -777;
        alpha = mu = m = -777;
        st = bad_call(B, solve_candidates_raw(B, cd.z.dtype, z, jdp, n, jp, rows, dim, dist, pc, pa,
                                              pm, &m));
        if (which == 22)
            snprintf(what, sizeof what, "kfac_candidates_solve_step_size_%s on a %s handle",
                     dtype_tag(od), dtype_tag(dt));
        else
            snprintf(what, sizeof what, "kfac_candidates_solve_step_size(%s)", sc[c].what);
        after_bad_candidates(&t, st, sc[c].want, what,
                             chosen == -777 && alpha == -777 && mu == -777 && m == -777);
        candidate_data_free(&cd);
    }

    /* Between a γ step and its solve: a failed step, a standalone precondition and a state image
     * leave the candidates alone (a load discards them: they are not saved). */
    if (!twins_setup(&t, SETUP_GAMMA, why, sizeof why))
        check(0, "[%s] twins_setup: %s", dtype_tag(dt), why);
    if (!twins_record(&t)) check(0, "[%s] twins_record before a bad step", dtype_tag(dt));
    {
        grads_t gr = grads_new(dt, &t.model, &t.rng);
        buf_set(&gr.w[1], 2, NAN);
        const int64_t k = step_count(B);
        st = bad_call(B, step(B, &gr));
        after_bad_candidates(&t, st, KFAC_ERROR_NON_FINITE,
                             "kfac_optimizer_step(NaN in a gradient) between a γ step and its candidate solve",
                             step_count(B) == k);
        grads_free(&gr);
    }
    if (!twins_setup(&t, SETUP_GAMMA, why, sizeof why))
        check(0, "[%s] twins_setup: %s", dtype_tag(dt), why);
    {
        grads_t gr = grads_new(dt, &t.model, &t.rng);
        st = precondition(B, 0, &gr.w[0], &gr.b[0]);
        const int same = same_state(t.h[0], B);
        why[0] = '\0';
        const int agree = st == KFAC_OK && same && twins_candidates_agree(&t, why, sizeof why);
        check(agree, "[%s] a kfac_layer_precondition on twin 1 between a γ step and its solve (%s): "
                     "state image %s; candidates, solve, update and report agree on both twins%s%s",
              dtype_tag(dt),
              status_name(st), same ? "unchanged" : "CHANGED", why[0] ? ": " : "", why);
        grads_free(&gr);
    }
    if (!twins_setup(&t, SETUP_GAMMA, why, sizeof why))
        check(0, "[%s] twins_setup: %s", dtype_tag(dt), why);
    {
        size_t size;
        unsigned char *img = save_image(t.h[0], &size);
        int ok = img != NULL;
        for (int i = 0; ok && i < t.n; i++) ok = kfac_state_load(t.h[i], img, size) == KFAC_OK;
        count = -1;
        ok = ok && kfac_candidates_get_count(B, &count) == KFAC_OK && count == 0;
        grads_t gr = grads_new(dt, &t.model, &t.rng), gr0 = grads_clone(&gr);
        gamma = -777;
        st = layer_call_grads(FN_CANDIDATE, B, &gr, 0, &gamma);
        check(ok && st == KFAC_ERROR_NO_STEP && grads_same(&gr, &gr0) && gamma == -777,
              "[%s] kfac_state_load (its own image) with 3 candidates pending: kfac_candidates_get_count "
              "0, kfac_candidates_get_directions -> NO_STEP (got %s), buffers untouched", dtype_tag(dt),
              status_name(st));
        why[0] = '\0';
        const int agree = twins_candidates_agree(&t, why, sizeof why) &&
                          twins_setup(&t, SETUP_GAMMA, why, sizeof why) &&
                          twins_candidates_agree(&t, why, sizeof why);
        check(agree, "[%s]   ... both twins loaded: update and report agree, then a γ step and its "
              "candidate cycle%s%s", dtype_tag(dt), why[0] ? ": " : "", why);
        grads_free(&gr);
        grads_free(&gr0);
        free(img);
    }
    grads_free(&g);
    grads_free(&g0);
    twins_free(&t);
}

/* The settings of one run of candidate_run. */
typedef struct {
    int strategy;  /* KFAC_INVERSE_EIGEN (inverses every step) or _CHOLESKY (every T₂ steps) */
    int period;    /* T₂ */
    double gamma0; /* KFAC_PARAM_FACTOR_DAMPING at the start (0: the candidates start from λ) */
    double decay;  /* KFAC_PARAM_FACTOR_DAMPING_DECAY */
    double kappa;  /* KFAC_PARAM_KL_CLIP (η is the default 0.1) */
    int plain;     /* 1: solve with kfac_adaptive_solve_step_size_f64 (J·D₀ only) instead of the candidates */
    int steps;
    uint64_t seed;
} candidate_run_t;

/* One run of the γ re-choice on the linear softmax model of 4b (float64, λ = 0.05,
 * ω₂ = decay^T₂): `steps` steps of the adaptive loop with kfac_candidates_solve_step_size_f64 and
 * kfac_adaptive_get_update_f64. At every step, against values computed here from the factors read back
 * (kfac_layer_get_factors_f64), the explicit 16×16 Fisher and the model's Jacobians:
 *   - kfac_candidates_get_count is 3 on steps k ≡ 0 mod T₂ and 1 otherwise;
 *   - candidate j's γ_j is γ, γ·ω₂, γ/ω₂ (γ = KFAC_PARAM_FACTOR_DAMPING, or λ while it is 0) and
 *     its directions are the explicit damped solve: eigen strategy (A ⊗ G + γ_j I)⁻¹ vec(V),
 *     a dense 16×16 solve (kron_solve); Cholesky strategy (G + (√γ_j/π) I)⁻¹ V (A + π√γ_j I)⁻¹,
 *     and on the steps between γ steps, with the inverses the solve adopted: the factors of the
 *     γ step and the kept γ; with κ > 0, each candidate's solve U_j scaled by its own
 *     ν_j = min(1, sqrt(κ / (η² |⟨U_j, V⟩|))). Candidate 0 is bitwise what kfac_optimizer_step wrote;
 *   - the candidate solve keeps the candidate whose minimised quadratic model M(δ_j) is lowest
 *     (model_minimum, with λ), with its α, μ and M(δ); KFAC_PARAM_FACTOR_DAMPING is then its γ
 *     (unchanged on other steps, and by kfac_adaptive_solve_step_size_f64 with `plain`, which solves for
 *     candidate 0);
 *   - kfac_adaptive_get_update_f64 is −α·D_kept + μ·δ₀, and still the last solve's update after the next
 *     step; ρ of the report uses the kept M(δ).
 * Returns the number of γ steps that kept a candidate other than 0 (a changed γ). */
static int candidate_run(const candidate_run_t *run) {
    char tag[64];
    snprintf(tag, sizeof tag, "%s, T₂ = %d%s%s",
             run->strategy == KFAC_INVERSE_EIGEN ? "eigen" : "Cholesky", run->period,
             run->kappa > 0 ? ", KL clip" : "", run->plain ? ", kfac_adaptive_solve_step_size" : "");
    rng_t r = {run->seed};
    linear_data_t data;
    for (int n = 0; n < AN; n++) {
        for (int i = 0; i < AI; i++) data.x[n][i] = 2.0 * rng_sym(&r);
        data.y[n] = (n * 3 + 1) % AO;
    }
    double theta[AQ], previous[AQ] = {0}, last_update[AQ] = {0};
    for (int q = 0; q < AQ; q++) theta[q] = 0.5 * rng_sym(&r);
    const double lambda = 0.05, eta = 0.1, omega = pow(run->decay, run->period);
    kfac_optimizer *h = NULL;
    int32_t id;
    REQUIRE_OK(h, kfac_optimizer_create(KFAC_FLOAT64, &h));
    REQUIRE_OK(h, add_dense(h, AI, AO, 1, &id));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_FACTOR_DAMPING, run->gamma0));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_FACTOR_DAMPING_DECAY, run->decay));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_FACTOR_DAMPING_PERIOD, run->period));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_FACTOR_DAMPING_RATIO, 1e300)); /* no band here */
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, run->kappa));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, run->strategy));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD,
                                     run->strategy == KFAC_INVERSE_EIGEN ? 1 : run->period));
    /* The factors and γ the Cholesky inverses in use were computed with. */
    double A_inv[AP * AP], G_inv[AO * AO], gamma_inv = 0;
    int changed = 0;

    for (int k = 0; k < run->steps; k++) {
        double x[AN * AI], g[AN * AO], z[AN * AO], grad[AQ];
        linear_batch(&data, theta, x, g, z, grad);
        double gamma_param = -1;
        REQUIRE_OK(h, kfac_param_get_double(h, KFAC_PARAM_FACTOR_DAMPING, &gamma_param));
        const double cur = gamma_param > 0 ? gamma_param : lambda;
        REQUIRE_OK(h, kfac_layer_record_inputs_f64(h, 0, x, AN));
        REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, 0, g, AN));
        double dw[AO * AI], db[AO], D[3][AQ];
        for (int o = 0; o < AO; o++) {
            for (int i = 0; i < AI; i++) dw[o * AI + i] = grad[o * AP + i];
            db[o] = grad[o * AP + AI];
        }
        double *wp[1] = {dw}, *bp[1] = {db};
        REQUIRE_OK(h, kfac_optimizer_step_f64(h, wp, bp, 1));
        double written[AQ];
        linear_theta(dw, db, written);
        const int two = k > 0;
        if (two) {
            double uw[AO * AI], ub[AO], U[AQ];
            double *uwp[1] = {uw}, *ubp[1] = {ub};
            const int st = kfac_adaptive_get_update_f64(h, uwp, ubp, 1);
            linear_theta(uw, ub, U);
            check(st == KFAC_OK && memcmp(U, last_update, sizeof U) == 0,
                  "[%s] step %d: after the step, before its solve, kfac_adaptive_get_update_f64 still gives "
                  "the last solve's update (%s)", tag, k, status_name(st));
        }

        /* (a) the count. */
        const int gamma_step = k % run->period == 0;
        int32_t n = -1;
        REQUIRE_OK(h, kfac_candidates_get_count(h, &n));
        check(n == (gamma_step ? 3 : 1), "[%s] step %d: kfac_candidates_get_count %d (want %d)", tag, k,
              (int)n, gamma_step ? 3 : 1);
        if (n < 1 || n > 3) break;

        /* (b) every candidate against the explicit solve. */
        double A[AP * AP], G[AO * AO];
        REQUIRE_OK(h, kfac_layer_get_factors_f64(h, 0, 0, A, G));
        if (run->strategy == KFAC_INVERSE_CHOLESKY && gamma_step) {
            memcpy(A_inv, A, sizeof A);
            memcpy(G_inv, G, sizeof G);
        }
        const double want_gamma[3] = {cur, cur * omega, cur / omega};
        double gamma_lib[3] = {-1, -1, -1}, nu[3] = {1, 1, 1}, worst = 0, worst_gamma = 0;
        int calls_ok = 1;
        for (int j = 0; j < n; j++) {
            double cw[AO * AI], cb[AO], E[AQ];
            double *cwp[1] = {cw}, *cbp[1] = {cb};
            calls_ok = calls_ok &&
                       kfac_candidates_get_directions_f64(h, j, cwp, cbp, 1, &gamma_lib[j]) == KFAC_OK;
            linear_theta(cw, cb, D[j]);
            if (run->strategy == KFAC_INVERSE_EIGEN)
                kron_solve(A, G, AP, AO, want_gamma[j], grad, E);
            else if (gamma_step)
                factored_solve(A, G, AP, AO, want_gamma[j], 1, grad, E);
            else
                factored_solve(A_inv, G_inv, AP, AO, gamma_inv, 1, grad, E);
            if (run->kappa > 0) {
                nu[j] = fmin(1.0, sqrt(run->kappa / (eta * eta * fabs(dotq(E, grad)))));
                for (int q = 0; q < AQ; q++) E[q] *= nu[j];
            }
            worst = fmax(worst, rel_diff(D[j], E, AQ));
            worst_gamma = fmax(worst_gamma, fabs(gamma_lib[j] - want_gamma[j]) / want_gamma[j]);
        }
        char gammas[160] = "";
        for (int j = 0; j < n; j++)
            snprintf(gammas + strlen(gammas), sizeof gammas - strlen(gammas), "%s%.6g", j ? ", " : "",
                     gamma_lib[j]);
        if (run->kappa > 0) {
            snprintf(gammas + strlen(gammas), sizeof gammas - strlen(gammas), "; ν_j = ");
            for (int j = 0; j < n; j++)
                snprintf(gammas + strlen(gammas), sizeof gammas - strlen(gammas), "%s%.4g",
                         j ? ", " : "", nu[j]);
        }
        const double nu_step = kl_scale(h);
        check(calls_ok && worst < 1e-10 && worst_gamma < 1e-14 &&
                  memcmp(D[0], written, sizeof written) == 0 && fabs(nu_step - nu[0]) <= 1e-12,
              "[%s] step %d: %d candidate(s), γ_j = %s (rel. diff %.1e), directions = the explicit "
              "%s solve with γ_j%s (rel. diff %.2e); candidate 0 is kfac_optimizer_step's output",
              tag, k, (int)n, gammas, worst_gamma,
              run->strategy == KFAC_INVERSE_EIGEN ? "(A⊗G + γ_j I)⁻¹ vec(V)" : "factored Tikhonov",
              run->strategy == KFAC_INVERSE_CHOLESKY && !gamma_step
                  ? " (the γ step's adopted inverses)" : "",
              worst);

        /* (c) the kept candidate against the quadratic model of each. */
        static double Fm[AQ * AQ];
        linear_fisher(&data, theta, Fm);
        double alpha_ref[3], mu_ref[3], m_ref[3];
        int best = 0;
        for (int j = 0; j < n; j++) {
            m_ref[j] = model_minimum(Fm, lambda, grad, D[j], previous, two, &alpha_ref[j], &mu_ref[j]);
            if (m_ref[j] < m_ref[best]) best = j;
        }
        if (run->plain) best = 0; /* kfac_adaptive_solve_step_size solves for candidate 0 */
        double margin = INFINITY;
        for (int j = 0; !run->plain && j < n; j++)
            if (j != best) margin = fmin(margin, (m_ref[j] - m_ref[best]) / fabs(m_ref[best]));
        double jd[3][AN * AO], jp[AN * AO];
        const double *jdp[3] = {jd[0], jd[1], jd[2]};
        for (int j = 0; j < n; j++) linear_products(&data, D[j], jd[j]);
        if (two) linear_products(&data, previous, jp);
        int32_t chosen = -1;
        double alpha = 0, mu = 0, m = 0, gamma_after = -1;
        if (run->plain) {
            REQUIRE_OK(h, kfac_adaptive_solve_step_size_f64(h, z, jd[0], two ? jp : NULL, AN, AO,
                                                   KFAC_DIST_CATEGORICAL, &alpha, &mu, &m));
            chosen = 0;
        } else {
            REQUIRE_OK(h, kfac_candidates_solve_step_size_f64(h, z, jdp, n, two ? jp : NULL, AN, AO,
                                                              KFAC_DIST_CATEGORICAL, &chosen,
                                                              &alpha, &mu, &m));
        }
        REQUIRE_OK(h, kfac_param_get_double(h, KFAC_PARAM_FACTOR_DAMPING, &gamma_after));
        const int c = chosen >= 0 && chosen < n ? chosen : 0;
        char models[160] = "";
        for (int j = 0; j < n; j++)
            snprintf(models + strlen(models), sizeof models - strlen(models), "%s%.8g", j ? ", " : "",
                     m_ref[j]);
        check(chosen == best && margin > 1e-6 &&
                  fabs(alpha - alpha_ref[c]) <= 1e-9 * fabs(alpha_ref[c]) &&
                  fabs(mu - mu_ref[c]) <= 1e-9 * fmax(fabs(mu_ref[c]), 1e-3) &&
                  fabs(m - m_ref[c]) <= 1e-9 * fabs(m_ref[c]) && (mu != 0) == two,
              "[%s] step %d: kept candidate %d (oracle %d of M(δ_j) = %s), α = %.10g (%.10g), "
              "μ = %.10g (%.10g), M(δ) = %.10g (%.10g)", tag, k, (int)chosen, best, models, alpha,
              alpha_ref[c], mu, mu_ref[c], m, m_ref[c]);
        const double want_after = gamma_step && !run->plain ? gamma_lib[c] : gamma_param;
        int32_t left = -1;
        REQUIRE_OK(h, kfac_candidates_get_count(h, &left));
        check(gamma_after == want_after && left == 0,
              "[%s] step %d: KFAC_PARAM_FACTOR_DAMPING after the solve %.10g (want %.10g: %s); "
              "kfac_candidates_get_count %d (want 0)", tag, k, gamma_after, want_after,
              gamma_step && !run->plain ? "the kept candidate's γ" : "unchanged", (int)left);
        if (gamma_step && c != 0) changed++;
        if (run->strategy == KFAC_INVERSE_CHOLESKY && gamma_step) gamma_inv = gamma_lib[c];

        /* (d) the update. */
        double uw[AO * AI], ub[AO], U[AQ], want_u[AQ];
        double *uwp[1] = {uw}, *ubp[1] = {ub};
        REQUIRE_OK(h, kfac_adaptive_get_update_f64(h, uwp, ubp, 1));
        linear_theta(uw, ub, U);
        for (int q = 0; q < AQ; q++) want_u[q] = -alpha * D[c][q] + (two ? mu * previous[q] : 0.0);
        const double du = rel_diff(U, want_u, AQ);
        check(du < 1e-13, "[%s] step %d: kfac_adaptive_get_update_f64 = −α·D_%d + μ·δ₀ (rel. diff %.2e)", tag,
              k, (int)chosen, du);
        memcpy(last_update, U, sizeof U);

        /* Apply it, report: ρ = (h(θ + δ) − h(θ)) / M(δ_kept). */
        const double before = linear_loss(&data, theta);
        for (int q = 0; q < AQ; q++) {
            previous[q] = want_u[q];
            theta[q] += previous[q];
        }
        const double after = linear_loss(&data, theta);
        double rho = 0;
        REQUIRE_OK(h, kfac_adaptive_report_loss_change(h, before, after, &rho));
        const double rho_ref = (after - before) / m_ref[c];
        check(fabs(rho - rho_ref) <= 1e-8 * fabs(rho_ref),
              "[%s] step %d: ρ = %.10g (oracle %.10g, with the kept M(δ)); loss %.6f -> %.6f", tag,
              k, rho, rho_ref, before, after);
    }
    kfac_optimizer_free(h);
    return changed;
}

void test_candidate_numerics(void) {
    section("numerics through the C ABI: re-choosing the factor damping γ (float64, linear softmax "
            "model)");
    /* γ = 0.02 apart from λ = 0.05; ω₂ = 0.5² spreads the candidates (γ/4, γ, 4γ). */
    const candidate_run_t eigen = {KFAC_INVERSE_EIGEN, 2, 0.02, 0.5, 0.0, 0, 6, 727};
    const int eigen_changed = candidate_run(&eigen);
    /* Cholesky with inverses on the γ steps only: the steps between use the adopted inverses. */
    candidate_run_t cholesky = eigen;
    cholesky.strategy = KFAC_INVERSE_CHOLESKY;
    const int cholesky_changed = candidate_run(&cholesky);
    check(eigen_changed > 0 && cholesky_changed > 0,
          "the runs kept a candidate other than 0 on %d (eigen) and %d (Cholesky) of 3 γ steps "
          "(so the changed-γ paths were exercised)", eigen_changed, cholesky_changed);
    /* γ = 0: the candidates start from λ, and the kept one becomes γ. */
    const candidate_run_t from_lambda = {KFAC_INVERSE_EIGEN, 2, 0.0, 0.7, 0.0, 0, 2, 737};
    candidate_run(&from_lambda);
    /* KL clipping on: each candidate has its own ν. */
    const candidate_run_t clipped = {KFAC_INVERSE_EIGEN, 2, 0.02, 0.5, 2e-4, 0, 3, 747};
    candidate_run(&clipped);
    /* T₂ = 3: the count pattern 3, 1, 1, 3 and ω₂ = decay³. */
    const candidate_run_t period3 = {KFAC_INVERSE_EIGEN, 3, 0.02, 0.6, 0.0, 0, 4, 757};
    candidate_run(&period3);
    /* kfac_adaptive_solve_step_size_f64 on γ steps: candidate 0's model, γ kept, candidates discarded. */
    const candidate_run_t plain = {KFAC_INVERSE_EIGEN, 2, 0.02, 0.5, 0.0, 1, 3, 727};
    candidate_run(&plain);
}
