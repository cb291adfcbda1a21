/*
 * test_async.c — KFAC_PARAM_ASYNC_INVERSION through the C ABI.
 *
 * Oracle: the deterministic mode is a synchronous run lagging one period. A synchronous handle
 * (same parameters, mode off) is fed the same statistics; right after its due step s it
 * preconditions (kfac_layer_precondition: its current inverses, those of the factors of step s)
 * the gradient of every later step k whose inverses the header says come from step s, i.e.
 * s = 0 for k < 2·Ti and s = Ti·(⌊k/Ti⌋ − 1) after. The asynchronous handle's step k must give
 * those directions (KL clip off). Also: the parameter's values, the combinations refused with
 * KFAC_ERROR_UNSUPPORTED (handle unchanged), freeing a handle with work pending.
 */
#include "harness.h"

#include <math.h>

enum { ASYNC_STEPS = 11, ASYNC_PERIOD = 3, ASYNC_ROWS = 5 };

static kfac_optimizer *async_handle(int dtype, int strategy, int mode) {
    kfac_optimizer *h = make_handle(dtype, &TWIN_MODEL);
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, ASYNC_PERIOD));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, strategy));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_KL_CLIP, 0.0));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, 0.05));
    REQUIRE_OK(h, kfac_param_set_double(h, KFAC_PARAM_FACTOR_DECAY, 0.6));
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_ASYNC_INVERSION, mode));
    return h;
}

static int record_step_batch(kfac_optimizer *h, int dtype, uint64_t seed) {
    rng_t r = {seed};
    for (int l = 0; l < TWIN_MODEL.n; l++) {
        buf_t x = buf_new(dtype, (size_t)(ASYNC_ROWS * TWIN_MODEL.l[l].in));
        buf_t g = buf_new(dtype, (size_t)(ASYNC_ROWS * TWIN_MODEL.l[l].out));
        buf_random(&x, &r);
        buf_random(&g, &r);
        int st = record_inputs(h, l, &x, ASYNC_ROWS);
        if (st == KFAC_OK) st = record_grads(h, l, &g, ASYNC_ROWS);
        buf_free(&x);
        buf_free(&g);
        if (st != KFAC_OK) return st;
    }
    return KFAC_OK;
}

static double buf_at(const buf_t *b, size_t i) {
    return b->dtype == KFAC_FLOAT32 ? (double)((const float *)b->p)[i] : ((const double *)b->p)[i];
}

/* Largest |a − e| relative to max(1, max |e|) over every layer's weight and bias. */
static double grads_relative_error(const grads_t *a, const grads_t *e) {
    double err = 0, scale = 1;
    for (int l = 0; l < e->n; l++) {
        for (int part = 0; part < 2; part++) {
            const buf_t *x = part ? &a->b[l] : &a->w[l], *y = part ? &e->b[l] : &e->w[l];
            if (!y->p) continue;
            for (size_t i = 0; i < y->n; i++) {
                double d = buf_at(x, i) - buf_at(y, i);
                if (d < 0) d = -d;
                if (d > err) err = d;
                double v = buf_at(y, i) < 0 ? -buf_at(y, i) : buf_at(y, i);
                if (v > scale) scale = v;
            }
        }
    }
    return err / scale;
}

static int source_step(int k) {
    return k < 2 * ASYNC_PERIOD ? 0 : ASYNC_PERIOD * (k / ASYNC_PERIOD - 1);
}

static void deterministic_equals_lagged_synchronous(int dtype, int strategy) {
    rng_t r = {911};
    grads_t given[ASYNC_STEPS], expected[ASYNC_STEPS];
    for (int k = 0; k < ASYNC_STEPS; k++) {
        given[k] = grads_new(dtype, &TWIN_MODEL, &r);
        expected[k] = grads_clone(&given[k]);
    }
    /* The synchronous oracle. */
    kfac_optimizer *sync = async_handle(dtype, strategy, KFAC_ASYNC_INVERSION_OFF);
    for (int s = 0; s < ASYNC_STEPS; s++) {
        REQUIRE_OK(sync, record_step_batch(sync, dtype, 1000 + (uint64_t)s));
        grads_t g = grads_clone(&given[s]);
        REQUIRE_OK(sync, step(sync, &g));
        grads_free(&g);
        for (int k = s; k < ASYNC_STEPS; k++) {
            if (source_step(k) != s) continue;
            for (int l = 0; l < TWIN_MODEL.n; l++)
                REQUIRE_OK(sync, precondition(sync, l, &expected[k].w[l], expected[k].b[l].p ? &expected[k].b[l] : NULL));
        }
    }
    kfac_optimizer_free(sync);

    kfac_optimizer *h = async_handle(dtype, strategy, KFAC_ASYNC_INVERSION_DETERMINISTIC);
    double tol = dtype == KFAC_FLOAT32 ? 1e-5 : 1e-12, worst = 0;
    int ok = 1;
    for (int k = 0; k < ASYNC_STEPS; k++) {
        REQUIRE_OK(h, record_step_batch(h, dtype, 1000 + (uint64_t)k));
        if (k == 6) { /* a due step that fails: it neither commits nor launches */
            size_t size;
            unsigned char *img = save_image(h, &size);
            grads_t bad = grads_clone(&given[k]);
            buf_set(&bad.w[1], 2, NAN);
            char what[160];
            snprintf(what, sizeof what, "[%s %s] a failing due step with background work pending",
                     dtype_tag(dtype), strategy == KFAC_INVERSE_EIGEN ? "eigen" : "cholesky");
            expect_fails_unchanged(h, step(h, &bad), KFAC_ERROR_NON_FINITE, img, size, what);
            grads_free(&bad);
            free(img);
        }
        grads_t g = grads_clone(&given[k]);
        REQUIRE_OK(h, step(h, &g));
        double e = grads_relative_error(&g, &expected[k]);
        if (e > worst) worst = e;
        if (!(e < tol)) ok = 0;
        grads_free(&g);
    }
    check(ok, "[%s %s] deterministic async steps 0..%d equal the synchronous run's inverses of "
              "the predicted step (worst relative error %.2e < %.0e)",
          dtype_tag(dtype), strategy == KFAC_INVERSE_EIGEN ? "eigen" : "cholesky", ASYNC_STEPS - 1,
          worst, tol);
    /* Freed with work pending (step 9 launched): the free waits and joins. */
    kfac_optimizer_free(h);
    for (int k = 0; k < ASYNC_STEPS; k++) {
        grads_free(&given[k]);
        grads_free(&expected[k]);
    }
}

static void unsupported_combinations(int dtype) {
    const struct {
        int param;
        int64_t value;
        const char *what;
    } conflicts[] = {{KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EKFAC, "the EKFAC strategy"},
                     {KFAC_PARAM_INVERSE_SPREAD, 1, "inverse_spread"},
                     {KFAC_PARAM_FACTOR_DAMPING_PERIOD, 2, "factor_damping_period 2"}};
    for (size_t i = 0; i < sizeof conflicts / sizeof conflicts[0]; i++) {
        kfac_optimizer *h = async_handle(dtype, KFAC_INVERSE_EIGEN, KFAC_ASYNC_INVERSION_NEWEST);
        REQUIRE_OK(h, kfac_param_set_int(h, conflicts[i].param, conflicts[i].value));
        REQUIRE_OK(h, record_step_batch(h, dtype, 5));
        rng_t r = {6};
        grads_t g = grads_new(dtype, &TWIN_MODEL, &r), g0 = grads_clone(&g);
        size_t size;
        unsigned char *img = save_image(h, &size);
        char what[160];
        snprintf(what, sizeof what, "[%s] step with async_inversion and %s", dtype_tag(dtype), conflicts[i].what);
        expect_fails_unchanged(h, bad_call(h, step(h, &g)), KFAC_ERROR_UNSUPPORTED, img, size, what);
        check(grads_same(&g, &g0) && step_count(h) == 0 && strstr(g_last_error, "async_inversion") != NULL,
              "[%s]   ... gradients untouched, step count 0, the message names async_inversion", dtype_tag(dtype));
        free(img);
        grads_free(&g);
        grads_free(&g0);
        kfac_optimizer_free(h);
    }
}

void test_async_inversion(void) {
    section("asynchronous inversion (KFAC_PARAM_ASYNC_INVERSION)");
    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        deterministic_equals_lagged_synchronous(dtype, KFAC_INVERSE_EIGEN);
        deterministic_equals_lagged_synchronous(dtype, KFAC_INVERSE_CHOLESKY);
        unsupported_combinations(dtype);
    }
}
