/*
 * test_adaptive.c — the adaptive mode: error paths on twin handles, call order on a fresh
 * handle and state images, the samplers, the step size and ρ against the explicit Fisher of a
 * linear softmax model, the pending solve across a precondition or a failed step, and loss
 * reports on λ's steps only (experimental: kfac_adaptive_get_report_needed,
 * kfac_adaptive_skip_loss_report).
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"
#include "oracles.h"

#include <math.h>

typedef struct {
    int dtype;
    int64_t rows, dim;
    const void *z, *jd;
} solve_args_t;

static int call_solve(kfac_optimizer *h, const void *arg) {
    const solve_args_t *a = arg;
    double alpha, mu, m;
    return solve_raw(h, a->dtype, a->z, a->jd, NULL, a->rows, a->dim, KFAC_DIST_CATEGORICAL,
                     &alpha, &mu, &m);
}

void errors_adaptive(twins_t *tp) {
    twins_t t = *tp;
    kfac_optimizer *B = t.h[1];
    const int dt = t.dtype, od = other_dtype(dt);
    char what[256], why[512] = "";
    section(dt == KFAC_FLOAT32 ? "float32 handle: adaptive mode" : "float64 handle: adaptive mode");

    /* Every case starts from a round (identical fresh directions on both twins). Case 0 is the
     * valid call that gives both twins a previous update δ₀, so that later cases exercise the
     * momentum path too. */
    const struct {
        int which;
        int want;
        const char *what;
    } cases[] = {
        {0, KFAC_OK, "(valid: a first solve and report on both twins)"},
        {1, KFAC_ERROR_NULL_POINTER, "kfac_adaptive_solve_step_size(outputs = NULL)"},
        {2, KFAC_ERROR_NULL_POINTER, "kfac_adaptive_solve_step_size(direction_products = NULL)"},
        {3, KFAC_ERROR_NULL_POINTER, "kfac_adaptive_solve_step_size(alpha = NULL)"},
        {4, KFAC_ERROR_NULL_POINTER, "kfac_adaptive_solve_step_size(mu = NULL)"},
        {5, KFAC_ERROR_INVALID_SIZE, "kfac_adaptive_solve_step_size(rows = 0)"},
        {6, KFAC_ERROR_INVALID_SIZE, "kfac_adaptive_solve_step_size(rows = -1)"},
        {7, KFAC_ERROR_INVALID_SIZE, "kfac_adaptive_solve_step_size(rows = INT64_MIN)"},
        {8, KFAC_ERROR_INVALID_SIZE, "kfac_adaptive_solve_step_size(output_dim = 0)"},
        {9, KFAC_ERROR_INVALID_SIZE, "kfac_adaptive_solve_step_size(output_dim = -3)"},
        {10, KFAC_ERROR_SIZE_OVERFLOW, "kfac_adaptive_solve_step_size(rows = output_dim = 2^32)"},
        {11, KFAC_ERROR_SIZE_OVERFLOW, "kfac_adaptive_solve_step_size(rows = INT64_MAX, output_dim = 2)"},
        {12, KFAC_ERROR_INVALID_ARGUMENT, "kfac_adaptive_solve_step_size(distribution = 3)"},
        {13, KFAC_ERROR_INVALID_ARGUMENT, "kfac_adaptive_solve_step_size(distribution = -1)"},
        {14, KFAC_ERROR_INVALID_ARGUMENT, "kfac_adaptive_solve_step_size(distribution = INT32_MIN)"},
        {15, KFAC_ERROR_NON_FINITE, "kfac_adaptive_solve_step_size(NaN in the first output)"},
        {16, KFAC_ERROR_NON_FINITE, "kfac_adaptive_solve_step_size(+Inf in the last output)"},
        {17, KFAC_ERROR_NON_FINITE, "kfac_adaptive_solve_step_size(NaN in a direction product)"},
        {18, KFAC_ERROR_NON_FINITE, "kfac_adaptive_solve_step_size(-Inf in the last direction product)"},
        {19, KFAC_ERROR_NON_FINITE, "kfac_adaptive_solve_step_size(NaN in a previous product, δ₀ exists)"},
        {20, KFAC_ERROR_DTYPE_MISMATCH, "kfac_adaptive_solve_step_size_<other dtype>"},
        {21, KFAC_ERROR_NO_STEP, "kfac_adaptive_solve_step_size twice for one step"},
        {22, KFAC_ERROR_NO_STEP, "kfac_adaptive_report_loss_change twice for one solve"},
        {23, KFAC_ERROR_NON_FINITE, "kfac_adaptive_report_loss_change(loss_before = NaN)"},
        {24, KFAC_ERROR_NON_FINITE, "kfac_adaptive_report_loss_change(loss_after = NaN)"},
        {25, KFAC_ERROR_NON_FINITE, "kfac_adaptive_report_loss_change(loss_after = -Inf)"},
        {26, KFAC_ERROR_NULL_POINTER, "kfac_adaptive_solve_step_size(alpha = mu = NULL)"},
    };
    for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
        const int which = cases[c].which;
        if (!twins_round(&t, why, sizeof why))
            check(0, "[%s] a round before an adaptive case: %s", dtype_tag(dt), why);
        if (which == 0) {
            check(twins_adaptive_agree(&t, why, sizeof why),
                  "[%s] valid solve and report after a round: bitwise identical on both twins%s%s",
                  dtype_tag(dt), why[0] ? ": " : "", why);
            continue;
        }
        adaptive_data_t d = adaptive_data(which == 20 ? od : dt, &t.rng);
        double alpha = -777, mu = -777, m = -777, rho = -777;
        const void *z = d.z.p, *jd = d.jd.p, *jp = d.jp.p;
        double *pa = &alpha, *pm = &mu;
        int64_t rows = AD_ROWS, dim = AD_DIM;
        int dist = KFAC_DIST_CATEGORICAL, st;
        switch (which) {
        case 1: z = NULL; break;
        case 2: jd = NULL; break;
        case 3: pa = NULL; break;
        case 4: pm = NULL; break;
        case 5: rows = 0; break;
        case 6: rows = -1; break;
        case 7: rows = INT64_MIN; break;
        case 8: dim = 0; break;
        case 9: dim = -3; break;
        case 10: rows = dim = (int64_t)1 << 32; break;
        case 11: rows = INT64_MAX; dim = 2; break;
        case 12: dist = 3; break;
        case 13: dist = -1; break;
        case 14: dist = INT32_MIN; break;
        case 15: buf_set(&d.z, 0, NAN); break;
        case 16: buf_set(&d.z, d.z.n - 1, INFINITY); break;
        case 17: buf_set(&d.jd, 7, NAN); break;
        case 18: buf_set(&d.jd, d.jd.n - 1, -INFINITY); break;
        case 19: buf_set(&d.jp, 4, NAN); break;
        case 26: pa = pm = NULL; break;
        default: break;
        }
        if (which == 10 || which == 11) {
            solve_args_t args = {dt, rows, dim, z, jd};
            snprintf(what, sizeof what, "[%s] %s", dtype_tag(dt), cases[c].what);
            if (!survives_in_child(B, call_solve, &args, what)) {
                adaptive_data_free(&d);
                continue;
            }
        }
        int extra_ok = 1;
        if (which <= 20 || which == 26) {
            st = bad_call(B, solve_raw(B, d.z.dtype, z, jd, jp, rows, dim, dist, pa, pm, &m));
            extra_ok = alpha == -777 && mu == -777 && m == -777;
        } else if (which == 21) {
            /* Both twins solve once (identically); the second solve on B fails. */
            double a0, m0, p0, a1, m1, p1;
            const int ok = solve_raw(t.h[0], dt, z, jd, jp, rows, dim, dist, &a0, &m0, &p0) == KFAC_OK &&
                           solve_raw(B, dt, z, jd, jp, rows, dim, dist, &a1, &m1, &p1) == KFAC_OK &&
                           a0 == a1 && m0 == m1 && p0 == p1;
            check(ok, "[%s] first solve of the step on both twins: identical", dtype_tag(dt));
            st = bad_call(B, solve_raw(B, dt, z, jd, jp, rows, dim, dist, &alpha, &mu, &m));
            extra_ok = alpha == -777 && mu == -777 && m == -777;
            /* Leave both twins as twins_adaptive_agree expects them: directions available. */
            after_bad(&t, st, cases[c].want, cases[c].what, 0, extra_ok);
            const int reported = kfac_adaptive_report_loss_change(t.h[0], 1.0, 0.5, NULL) == KFAC_OK &&
                                 kfac_adaptive_report_loss_change(B, 1.0, 0.5, NULL) == KFAC_OK;
            const int round = twins_round(&t, why, sizeof why);
            check(reported && round && twins_adaptive_agree(&t, why, sizeof why),
                  "[%s]   ... then report, round, solve and report agree on both twins%s%s",
                  dtype_tag(dt), why[0] ? ": " : "", why);
            adaptive_data_free(&d);
            continue;
        } else {
            /* Report cases: both twins solved (case 22: and reported) first. */
            double a0, m0, p0;
            int ok = 1;
            for (int i = 0; i < t.n; i++) {
                ok = ok && solve_raw(t.h[i], dt, z, jd, jp, rows, dim, dist, &a0, &m0, &p0) == KFAC_OK;
                if (which == 22) ok = ok && kfac_adaptive_report_loss_change(t.h[i], 1.0, 0.75, NULL) == KFAC_OK;
            }
            check(ok, "[%s] solve%s on both twins before a bad report", dtype_tag(dt),
                  which == 22 ? " and report" : "");
            const double before = which == 23 ? NAN : 1.0;
            const double after = which == 24 ? NAN : which == 25 ? -INFINITY : 0.5;
            st = bad_call(B, kfac_adaptive_report_loss_change(B, before, after, &rho));
            extra_ok = rho == -777;
            after_bad(&t, st, cases[c].want, cases[c].what, 0, extra_ok);
            /* Case 22 left no prediction; cases 23-25 must have kept it: report it now. */
            if (which != 22) {
                double r0 = 0, r1 = 1;
                const int same = kfac_adaptive_report_loss_change(t.h[0], 1.0, 0.5, &r0) == KFAC_OK &&
                                 kfac_adaptive_report_loss_change(B, 1.0, 0.5, &r1) == KFAC_OK && r0 == r1;
                check(same, "[%s]   ... the prediction is still pending on the bad twin: reports "
                            "agree (ρ %.17g / %.17g)", dtype_tag(dt), r0, r1);
            }
            const int round = twins_round(&t, why, sizeof why);
            check(round && twins_adaptive_agree(&t, why, sizeof why),
                  "[%s]   ... then round, solve and report agree on both twins%s%s", dtype_tag(dt),
                  why[0] ? ": " : "", why);
            adaptive_data_free(&d);
            continue;
        }
        after_bad_adaptive(&t, st, cases[c].want, cases[c].what, extra_ok);
        adaptive_data_free(&d);
    }

    /* Optional outputs: predicted_change and rho may be NULL. */
    {
        adaptive_data_t d = adaptive_data(dt, &t.rng);
        double a[2], m[2];
        int ok = twins_round(&t, why, sizeof why);
        for (int i = 0; ok && i < t.n; i++)
            ok = solve_raw(t.h[i], dt, d.z.p, d.jd.p, d.jp.p, AD_ROWS, AD_DIM, KFAC_DIST_BERNOULLI,
                           &a[i], &m[i], NULL) == KFAC_OK &&
                 kfac_adaptive_report_loss_change(t.h[i], 1.0, 0.9, NULL) == KFAC_OK;
        const double r0 = reduction_ratio(t.h[0]), r1 = reduction_ratio(B);
        check(ok && a[0] == a[1] && m[0] == m[1] && r0 == r1 && isfinite(r0) &&
                  same_state(t.h[0], B),
              "[%s] solve with predicted_change = NULL and report with rho = NULL succeed; "
              "kfac_adaptive_get_reduction_ratio %.6g on both", dtype_tag(dt), r0);
        adaptive_data_free(&d);
    }
    *tp = t;
}

/* The adaptive calls before anything could be solved or reported, on a handle of its own. */
void test_adaptive_call_order(void) {
    section("adaptive mode: call order on a fresh handle, state images");
    rng_t r = {515};
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        kfac_optimizer *h = handle_with_batch(dtype, &r, 1, 1);
        adaptive_data_t d = adaptive_data(dtype, &r);
        size_t size;
        char what[160];
        double alpha = -777, mu = -777, m = -777, rho = -777;
        {
            const int st_rho = kfac_adaptive_get_reduction_ratio(h, &rho);
            check(st_rho == KFAC_ERROR_NO_STEP && rho == -777,
                  "[%s] kfac_adaptive_get_reduction_ratio -> NO_STEP before the first report, *rho "
                  "untouched (got %s)", dtype_tag(dtype), status_name(st_rho));
        }
        unsigned char *img = save_image(h, &size);
        int st = solve_raw(h, dtype, d.z.p, d.jd.p, NULL, AD_ROWS, AD_DIM, KFAC_DIST_CATEGORICAL,
                           &alpha, &mu, &m);
        snprintf(what, sizeof what, "[%s] kfac_adaptive_solve_step_size before any step", dtype_tag(dtype));
        expect_fails_unchanged(h, st, KFAC_ERROR_NO_STEP, img, size, what);
        st = kfac_adaptive_report_loss_change(h, 1.0, 0.5, &rho);
        snprintf(what, sizeof what, "[%s] kfac_adaptive_report_loss_change before any solve", dtype_tag(dtype));
        expect_fails_unchanged(h, st, KFAC_ERROR_NO_STEP, img, size, what);
        check(alpha == -777 && mu == -777 && m == -777 && rho == -777,
              "[%s]   ... outputs untouched", dtype_tag(dtype));
        free(img);

        /* A step, then a state image: directions are not in it, δ₀ and the prediction are. */
        grads_t g = grads_new(dtype, &TWIN_MODEL, &r);
        REQUIRE_OK(h, step(h, &g));
        kfac_optimizer *copy = make_handle(dtype, &TWIN_MODEL);
        img = save_image(h, &size);
        REQUIRE_OK(copy, kfac_state_load(copy, img, size));
        free(img);
        img = save_image(copy, &size);
        st = solve_raw(copy, dtype, d.z.p, d.jd.p, NULL, AD_ROWS, AD_DIM, KFAC_DIST_CATEGORICAL,
                       &alpha, &mu, &m);
        snprintf(what, sizeof what, "[%s] kfac_adaptive_solve_step_size after kfac_state_load (directions "
                 "are not saved)", dtype_tag(dtype));
        expect_fails_unchanged(copy, st, KFAC_ERROR_NO_STEP, img, size, what);
        free(img);
        REQUIRE_OK(h, solve_raw(h, dtype, d.z.p, d.jd.p, NULL, AD_ROWS, AD_DIM,
                                KFAC_DIST_GAUSSIAN, &alpha, &mu, &m));
        img = save_image(h, &size);
        REQUIRE_OK(copy, kfac_state_load(copy, img, size));
        free(img);
        double r0 = 0, r1 = 1;
        st = kfac_adaptive_report_loss_change(copy, 1.0, 0.25, &r1);
        const int st0 = kfac_adaptive_report_loss_change(h, 1.0, 0.25, &r0);
        check(st0 == KFAC_OK && st == KFAC_OK && r0 == r1 && mu == 0.0 && m < 0,
              "[%s] a pending prediction is saved: the loaded copy reports the same ρ = %.6g "
              "(first solve: μ = 0, M(δ) = %.4g < 0)", dtype_tag(dtype), r0, m);
        grads_free(&g);
        adaptive_data_free(&d);
        kfac_optimizer_free(copy);
        kfac_optimizer_free(h);
    }
}

/* The handle-less samplers: errors leave the output buffer alone; basic properties. */
void test_samplers(void) {
    section("target samplers (no handle)");
    enum { R = 5, C = 4 };
    double z[R * C], out[R * C], sentinel[R * C];
    float zf[R * C], outf[R * C];
    rng_t r = {616};
    for (int i = 0; i < R * C; i++) {
        z[i] = (double)(float)(2.0 * rng_sym(&r));
        zf[i] = (float)z[i];
        sentinel[i] = -777.0;
    }
    typedef int (*sampler64)(const double *, int64_t, int64_t, int, uint64_t, double *);
    typedef int (*sampler32)(const float *, int64_t, int64_t, int, uint64_t, float *);
    const sampler64 f64[2] = {kfac_sample_targets_f64, kfac_sample_output_grads_f64};
    const sampler32 f32[2] = {kfac_sample_targets_f32, kfac_sample_output_grads_f32};
    const char *names[2] = {"kfac_sample_targets", "kfac_sample_output_grads"};
    for (int k = 0; k < 2; k++) {
        const struct {
            int which;
            int64_t rows, dim;
            int dist, want;
            const char *what;
        } cases[] = {
            {1, R, C, 0, KFAC_ERROR_NULL_POINTER, "outputs = NULL"},
            {2, R, C, 0, KFAC_ERROR_NULL_POINTER, "output buffer = NULL"},
            {0, 0, C, 0, KFAC_ERROR_INVALID_SIZE, "rows = 0"},
            {0, -1, C, 1, KFAC_ERROR_INVALID_SIZE, "rows = -1"},
            {0, R, 0, 2, KFAC_ERROR_INVALID_SIZE, "output_dim = 0"},
            {0, R, INT64_MIN, 0, KFAC_ERROR_INVALID_SIZE, "output_dim = INT64_MIN"},
            {0, (int64_t)1 << 32, (int64_t)1 << 32, 0, KFAC_ERROR_SIZE_OVERFLOW,
             "rows = output_dim = 2^32"},
            {0, INT64_MAX, 3, 0, KFAC_ERROR_SIZE_OVERFLOW, "rows = INT64_MAX, output_dim = 3"},
            {0, R, C, 3, KFAC_ERROR_INVALID_ARGUMENT, "distribution = 3"},
            {0, R, C, -1, KFAC_ERROR_INVALID_ARGUMENT, "distribution = -1"},
            {3, R, C, 0, KFAC_ERROR_NON_FINITE, "NaN in the outputs (categorical)"},
            {4, R, C, 1, KFAC_ERROR_NON_FINITE, "+Inf in the outputs (bernoulli)"},
            {5, R, C, 2, KFAC_ERROR_NON_FINITE, "-Inf in the outputs (gaussian)"},
        };
        for (size_t c = 0; c < sizeof cases / sizeof cases[0]; c++) {
            for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
                double zz[R * C];
                float zzf[R * C];
                memcpy(zz, z, sizeof zz);
                memcpy(zzf, zf, sizeof zzf);
                const double poison = cases[c].which == 3 ? NAN : cases[c].which == 4 ? INFINITY : -INFINITY;
                if (cases[c].which >= 3) {
                    zz[R * C - 1 - cases[c].which] = poison;
                    zzf[R * C - 1 - cases[c].which] = (float)poison;
                }
                memcpy(out, sentinel, sizeof out);
                for (int i = 0; i < R * C; i++) outf[i] = -777.0f;
                int st;
                if (dtype == KFAC_FLOAT64)
                    st = f64[k](cases[c].which == 1 ? NULL : zz, cases[c].rows, cases[c].dim,
                                cases[c].dist, 42, cases[c].which == 2 ? NULL : out);
                else
                    st = f32[k](cases[c].which == 1 ? NULL : zzf, cases[c].rows, cases[c].dim,
                                cases[c].dist, 42, cases[c].which == 2 ? NULL : outf);
                int untouched = 1;
                for (int i = 0; i < R * C; i++)
                    if (out[i] != -777.0 || outf[i] != -777.0f) untouched = 0;
                check(st == cases[c].want && untouched && nonempty(kfac_status_string(st)),
                      "%s_%s(%s) -> %s%s%s%s", names[k], dtype_tag(dtype), cases[c].what,
                      status_name(cases[c].want), st == cases[c].want ? "" : ", but got ",
                      st == cases[c].want ? "" : status_name(st),
                      untouched ? "" : "; OUTPUT BUFFER MODIFIED");
            }
        }
    }

    /* Valid calls: one-hot categorical rows, identical draws in both precisions and for the
     * same seed, gradients p − y at the targets of the same seed. */
    double targets[R * C], grads[R * C];
    float targetsf[R * C];
    REQUIRE_OK(NULL, kfac_sample_targets_f64(z, R, C, KFAC_DIST_CATEGORICAL, 9, targets));
    REQUIRE_OK(NULL, kfac_sample_targets_f32(zf, R, C, KFAC_DIST_CATEGORICAL, 9, targetsf));
    REQUIRE_OK(NULL, kfac_sample_output_grads_f64(z, R, C, KFAC_DIST_CATEGORICAL, 9, grads));
    int one_hot = 1, same_precision = 1, grads_ok = 1;
    for (int n = 0; n < R; n++) {
        double sum = 0, mx = z[n * C], total = 0;
        for (int c = 0; c < C; c++) mx = fmax(mx, z[n * C + c]);
        for (int c = 0; c < C; c++) total += exp(z[n * C + c] - mx);
        for (int c = 0; c < C; c++) {
            const double t = targets[n * C + c];
            sum += t;
            if (t != 0.0 && t != 1.0) one_hot = 0;
            if ((double)targetsf[n * C + c] != t) same_precision = 0;
            const double p = exp(z[n * C + c] - mx) / total;
            if (fabs(grads[n * C + c] - (p - t)) > 1e-15) grads_ok = 0;
        }
        if (sum != 1.0) one_hot = 0;
    }
    check(one_hot, "kfac_sample_targets(categorical): one-hot rows");
    check(same_precision, "kfac_sample_targets: float32 and float64 draw the same classes for the "
                          "same (exactly representable) logits and seed");
    check(grads_ok, "kfac_sample_output_grads(categorical) = softmax(z) − (the targets of the same seed)");
}

void test_adaptive_numerics(void) {
    section("numerics through the C ABI: the adaptive mode (float64, linear softmax model)");
    rng_t r = {717};
    linear_data_t data;
    for (int n = 0; n < AN; n++) {
        for (int i = 0; i < AI; i++) data.x[n][i] = 2.0 * rng_sym(&r);
        data.y[n] = n % AO;
    }
    double theta[AQ], previous[AQ];
    for (int q = 0; q < AQ; q++) theta[q] = 0.5 * rng_sym(&r);
    const double lambda = 0.05;
    kfac_optimizer *h = NULL;
    int32_t id;
    REQUIRE_OK(h, kfac_optimizer_create(KFAC_FLOAT64, &h));
    REQUIRE_OK(h, add_dense(h, AI, AO, 1, &id));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, 0.0));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 1));

    for (int k = 0; k < 3; k++) {
        /* Statistics (summed-loss output gradients p − y), the mean-loss gradient, the step. */
        double x[AN * AI], g[AN * AO], z[AN * AO], grad[AQ];
        linear_batch(&data, theta, x, g, z, grad);
        REQUIRE_OK(h, kfac_layer_record_inputs_f64(h, 0, x, AN));
        REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, 0, g, AN));
        double dw[AO * AI], db[AO];
        for (int o = 0; o < AO; o++) {
            for (int i = 0; i < AI; i++) dw[o * AI + i] = grad[o * AP + i];
            db[o] = grad[o * AP + AI];
        }
        double *wp[1] = {dw}, *bp[1] = {db};
        REQUIRE_OK(h, kfac_optimizer_step_f64(h, wp, bp, 1));
        double D[AQ];
        for (int o = 0; o < AO; o++) {
            for (int i = 0; i < AI; i++) D[o * AP + i] = dw[o * AI + i];
            D[o * AP + AI] = db[o];
        }

        /* The oracle: the 2×2 (or 1×1) system of M over δ = −αD + μδ₀ from the explicit F. */
        static double Fm[AQ * AQ];
        linear_fisher(&data, theta, Fm);
        const int two = k > 0;
        double alpha_ref, mu_ref;
        const double m_ref = model_minimum(Fm, lambda, grad, D, previous, two, &alpha_ref, &mu_ref);

        double jd[AN * AO], jp[AN * AO];
        linear_products(&data, D, jd);
        if (two) linear_products(&data, previous, jp);
        double alpha = 0, mu = 0, m = 0;
        REQUIRE_OK(h, kfac_adaptive_solve_step_size_f64(h, z, jd, two ? jp : NULL, AN, AO,
                                               KFAC_DIST_CATEGORICAL, &alpha, &mu, &m));
        check(fabs(alpha - alpha_ref) <= 1e-9 * fabs(alpha_ref) &&
                  fabs(mu - mu_ref) <= 1e-9 * fmax(fabs(mu_ref), 1e-3) &&
                  fabs(m - m_ref) <= 1e-9 * fabs(m_ref) && m < 0 && (mu != 0) == two,
              "step %d: kfac_adaptive_solve_step_size_f64 α = %.10g (oracle %.10g), μ = %.10g (%.10g), "
              "M(δ) = %.10g (%.10g) from the explicit %d×%d Fisher", k, alpha, alpha_ref, mu,
              mu_ref, m, m_ref, AQ, AQ);

        /* Apply the library's coefficients (its δ₀ is then exactly ours), report, check ρ. */
        const double before = linear_loss(&data, theta);
        for (int q = 0; q < AQ; q++) {
            previous[q] = -alpha * D[q] + (two ? mu * previous[q] : 0.0);
            theta[q] += previous[q];
        }
        const double after = linear_loss(&data, theta);
        double rho = 0;
        REQUIRE_OK(h, kfac_adaptive_report_loss_change(h, before, after, &rho));
        const double rho_ref = (after - before) / m_ref;
        check(fabs(rho - rho_ref) <= 1e-8 * fabs(rho_ref) && reduction_ratio(h) == rho &&
                  after < before,
              "step %d: ρ = %.10g = (h(θ+δ) − h(θ)) / M(δ) (oracle %.10g); loss %.6f -> %.6f", k,
              rho, rho_ref, before, after);
    }

    kfac_optimizer_free(h);

    /* Levenberg–Marquardt on a fresh handle: every T1 = 2 reports, λ·ω^2 if ρ > 3/4, λ/ω^2 if
     * ρ < 1/4 (ω = 0.5); reports in between never change λ. Losses are chosen to give ρ. */
    kfac_optimizer *lm = NULL;
    REQUIRE_OK(lm, kfac_optimizer_create(KFAC_FLOAT64, &lm));
    h = lm;
    REQUIRE_OK(h, add_dense(h, AI, AO, 1, &id));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_LM_INTERVAL, 2));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_LM_DECAY, 0.5));
    const double ratios[8] = {0.1, 0.9, 0.9, 0.5, 0.9, 0.1, 0.1, 0.8};
    double expected = lambda;
    int lm_ok = 1;
    char seen[256] = "";
    /* The 2nd, 4th, 6th and 8th reports adjust λ. */
    for (int i = 0; i < 8; i++) {
        double x[AN * AI], g[AN * AO], z[AN * AO], jd[AN * AO], dw[AO * AI], db[AO];
        for (int j = 0; j < AN * AI; j++) x[j] = rng_sym(&r);
        for (int j = 0; j < AN * AO; j++) {
            g[j] = rng_sym(&r);
            z[j] = rng_sym(&r);
            jd[j] = rng_sym(&r);
        }
        for (int j = 0; j < AO * AI; j++) dw[j] = rng_sym(&r);
        for (int j = 0; j < AO; j++) db[j] = rng_sym(&r);
        double *wp[1] = {dw}, *bp[1] = {db}, alpha, mu, m, rho;
        REQUIRE_OK(h, kfac_layer_record_inputs_f64(h, 0, x, AN));
        REQUIRE_OK(h, kfac_layer_record_output_grads_f64(h, 0, g, AN));
        REQUIRE_OK(h, kfac_optimizer_step_f64(h, wp, bp, 1));
        REQUIRE_OK(h, kfac_adaptive_solve_step_size_f64(h, z, jd, NULL, AN, AO, KFAC_DIST_CATEGORICAL,
                                               &alpha, &mu, &m));
        REQUIRE_OK(h, kfac_adaptive_report_loss_change(h, 3.0, 3.0 + ratios[i] * m, &rho));
        if (i % 2 == 1) {
            if (ratios[i] > 0.75) expected *= 0.25;
            else if (ratios[i] < 0.25) expected /= 0.25;
        }
        double lam = 0;
        REQUIRE_OK(h, kfac_param_get_double(h, KFAC_PARAM_DAMPING, &lam));
        if (fabs(lam - expected) > 1e-12 * expected || fabs(rho - ratios[i]) > 1e-9) lm_ok = 0;
        snprintf(seen + strlen(seen), sizeof seen - strlen(seen), "%s%.6g", i ? ", " : "", lam);
    }
    kfac_optimizer_free(lm);
    check(lm_ok, "Levenberg–Marquardt with LM interval 2, decay 0.5: λ after each report: %s "
                 "(want ×0.25 / ÷0.25 at every 2nd report by its ρ)", seen);
}

/* Solves on both twins with the same data; 1 if both succeed with identical results. */
static int twins_solve_same(twins_t *t, char *why, size_t why_size) {
    adaptive_data_t d = adaptive_data(t->dtype, &t->rng);
    double res[2][3];
    int st[2];
    for (int i = 0; i < 2; i++)
        st[i] = solve_raw(t->h[i], t->dtype, d.z.p, d.jd.p, NULL, AD_ROWS, AD_DIM,
                          KFAC_DIST_CATEGORICAL, &res[i][0], &res[i][1], &res[i][2]);
    const int ok = st[0] == KFAC_OK && st[1] == KFAC_OK && memcmp(res[0], res[1], sizeof res[0]) == 0;
    snprintf(why, why_size, "untouched twin: %s α = %.10g; other twin: %s α = %.10g%s%s",
             status_name(st[0]), res[0][0], status_name(st[1]), st[1] == KFAC_OK ? res[1][0] : NAN,
             st[1] == KFAC_OK ? "" : ": ", st[1] == KFAC_OK ? "" : kfac_optimizer_last_error(t->h[1]));
    adaptive_data_free(&d);
    return ok;
}

void test_adaptive_pending_solve(void) {
    section("adaptive mode: calls between kfac_optimizer_step and kfac_adaptive_solve_step_size");
    char why[512] = "";
    /* kfac_layer_precondition promises "no change to the handle"; between a step and the solve it
     * must not change the directions the solve uses. */
    {
        twins_t t = twins_new(KFAC_FLOAT64, 818);
        check(twins_round(&t, why, sizeof why), "[f64] a round on fresh twins%s%s", why[0] ? ": " : "", why);
        grads_t g = grads_new(KFAC_FLOAT64, &t.model, &t.rng);
        REQUIRE_OK(t.h[1], precondition(t.h[1], 0, &g.w[0], &g.b[0]));
        check(twins_solve_same(&t, why, sizeof why),
                  "kfac_layer_precondition between kfac_optimizer_step and kfac_adaptive_solve_step_size leaves the step's "
                  "directions to the solve (%s)", why);
        grads_free(&g);
        twins_free(&t);
    }
    /* A failed kfac_optimizer_step must leave everything as it was, including the directions of the last
     * successful step awaiting their solve. The bad step fails with NON_FINITE in layer 1's
     * preconditioned gradient (finite float32 gradients near FLT_MAX), after layer 0's. */
    {
        twins_t t = twins_new(KFAC_FLOAT32, 919);
        why[0] = '\0';
        check(twins_round(&t, why, sizeof why), "[f32] a round on fresh twins%s%s", why[0] ? ": " : "", why);
        grads_t g = grads_new(KFAC_FLOAT32, &t.model, &t.rng);
        for (size_t i = 0; i < g.w[1].n; i++) buf_set(&g.w[1], i, 3e38);
        const int st = step(t.h[1], &g);
        check(st == KFAC_ERROR_NON_FINITE && step_count(t.h[0]) == step_count(t.h[1]) &&
                  same_state(t.h[0], t.h[1]),
              "[f32] a step whose preconditioned gradient overflows fails (%s) and leaves the "
              "state image", status_name(st));
        check(twins_solve_same(&t, why, sizeof why),
                  "[f32] after that failed step, the previous step's directions are solved as "
                  "on the untouched twin (%s)", why);
        grads_free(&g);
        twins_free(&t);
    }
}

/* Loss reports on λ's steps only: with LM interval 3 the 3rd, 6th, ... reports (skips count) are
 * needed, skipping one of them or skipping without a solve is NO_STEP with the handle unchanged,
 * a skip leaves λ alone and makes ρ NaN, and λ follows the reported ρ exactly as if every step had
 * been reported (the in-between ρ are never used). LM interval 0: nothing is needed. */
void test_adaptive_skipped_reports(void) {
    section("adaptive mode: loss reports on λ's steps only (experimental)");
    rng_t r = {929};
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        kfac_optimizer *h = handle_with_batch(dtype, &r, 1, 1);
        adaptive_data_t d = adaptive_data(dtype, &r);
        grads_t g = grads_new(dtype, &TWIN_MODEL, &r);
        const double lambda = 0.05;
        REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, lambda));
        REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, 0.0));
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_LM_INTERVAL, 3));
        REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_LM_DECAY, 0.5));
        char what[200];
        size_t size;
        int32_t needed = -1;
        {
            unsigned char *img = save_image(h, &size);
            snprintf(what, sizeof what, "[%s] kfac_adaptive_skip_loss_report before any solve", dtype_tag(dtype));
            expect_fails_unchanged(h, kfac_adaptive_skip_loss_report(h), KFAC_ERROR_NO_STEP, img, size, what);
            free(img);
        }
        /* The ρ of the needed reports (the 3rd and 6th): > 3/4 (λ·0.125), then < 1/4 (λ/0.125). */
        const double lm_ratios[2] = {0.9, 0.1};
        double expected = lambda;
        int pattern_ok = 1, lambda_ok = 1, nan_ok = 1;
        char seen[200] = "";
        for (int i = 0; i < 7; i++) {
            double alpha, mu, m, rho = -777;
            REQUIRE_OK(h, step(h, &g));
            REQUIRE_OK(h, solve_raw(h, dtype, d.z.p, d.jd.p, NULL, AD_ROWS, AD_DIM, KFAC_DIST_CATEGORICAL,
                                    &alpha, &mu, &m));
            REQUIRE_OK(h, kfac_adaptive_get_report_needed(h, &needed));
            snprintf(seen + strlen(seen), sizeof seen - strlen(seen), "%d", (int)needed);
            if (needed != (i % 3 == 2)) pattern_ok = 0;
            if (needed) {
                unsigned char *img = save_image(h, &size);
                snprintf(what, sizeof what, "[%s] kfac_adaptive_skip_loss_report on a needed report (step %d)",
                         dtype_tag(dtype), i);
                expect_fails_unchanged(h, kfac_adaptive_skip_loss_report(h), KFAC_ERROR_NO_STEP, img, size, what);
                free(img);
                const double ratio = lm_ratios[i / 3];
                REQUIRE_OK(h, kfac_adaptive_report_loss_change(h, 3.0, 3.0 + ratio * m, &rho));
                expected = ratio > 0.75 ? expected * 0.125 : expected / 0.125;
            } else {
                REQUIRE_OK(h, kfac_adaptive_skip_loss_report(h));
                if (!isnan(reduction_ratio(h))) nan_ok = 0;
                unsigned char *img = save_image(h, &size);
                snprintf(what, sizeof what, "[%s] a second kfac_adaptive_skip_loss_report for one solve (step %d)",
                         dtype_tag(dtype), i);
                expect_fails_unchanged(h, kfac_adaptive_skip_loss_report(h), KFAC_ERROR_NO_STEP, img, size, what);
                free(img);
            }
            double lam = 0;
            REQUIRE_OK(h, kfac_param_get_double(h, KFAC_PARAM_DAMPING, &lam));
            if (fabs(lam - expected) > 1e-12 * expected) lambda_ok = 0;
        }
        check(pattern_ok, "[%s] kfac_adaptive_get_report_needed over 7 solves with LM interval 3: %s "
              "(want 0010010: skips count as reports)", dtype_tag(dtype), seen);
        check(nan_ok, "[%s] after a skip kfac_adaptive_get_reduction_ratio is NaN", dtype_tag(dtype));
        check(lambda_ok, "[%s] λ unchanged by skips, ×0.125 / ÷0.125 at the 3rd and 6th reports by their ρ",
              dtype_tag(dtype));

        /* LM interval 0: no report is ever needed, and a skip is allowed. */
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_LM_INTERVAL, 0));
        double alpha, mu, m;
        REQUIRE_OK(h, step(h, &g));
        REQUIRE_OK(h, solve_raw(h, dtype, d.z.p, d.jd.p, NULL, AD_ROWS, AD_DIM, KFAC_DIST_CATEGORICAL,
                                &alpha, &mu, &m));
        needed = -1;
        REQUIRE_OK(h, kfac_adaptive_get_report_needed(h, &needed));
        const int st = kfac_adaptive_skip_loss_report(h);
        check(needed == 0 && st == KFAC_OK, "[%s] LM interval 0: report not needed (%d), skip OK (%s)",
              dtype_tag(dtype), (int)needed, status_name(st));

        /* NULL pointers. */
        needed = -7;
        check(kfac_adaptive_get_report_needed(NULL, &needed) == KFAC_ERROR_NULL_POINTER && needed == -7 &&
                  kfac_adaptive_get_report_needed(h, NULL) == KFAC_ERROR_NULL_POINTER &&
                  kfac_adaptive_skip_loss_report(NULL) == KFAC_ERROR_NULL_POINTER,
              "[%s] NULL handle or out-pointer: NULL_POINTER, *needed untouched", dtype_tag(dtype));
        grads_free(&g);
        adaptive_data_free(&d);
        kfac_optimizer_free(h);
    }
}
