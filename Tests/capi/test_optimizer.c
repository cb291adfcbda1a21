/*
 * test_optimizer.c — call order and the schedule (NO_STATISTICS, NO_INVERSES, LAYERS_FROZEN,
 * kfac_optimizer_wants_statistics, overflowing finite statistics), and distinct handles used on
 * concurrent threads.
 */
#include "harness.h"

#include <dlfcn.h>
#include <math.h>
#include <pthread.h>

void test_call_order(void) {
    section("call order and schedule");
    rng_t r = {303};
    size_t size;

    for (int dtype = KFAC_FLOAT32; dtype <= KFAC_FLOAT64; dtype++) {
        /* Only the input side recorded: the step has no G and must not fold A either. */
        kfac_optimizer *h = handle_with_batch(dtype, &r, 1, 0);
        grads_t g = grads_new(dtype, &TWIN_MODEL, &r), g0 = grads_clone(&g);
        unsigned char *img = save_image(h, &size);
        int st = step(h, &g);
        char what[128];
        snprintf(what, sizeof what, "[%s] kfac_optimizer_step with only inputs recorded", dtype_tag(dtype));
        expect_fails_unchanged(h, st, KFAC_ERROR_NO_STATISTICS, img, size, what);
        check(grads_same(&g, &g0) && step_count(h) == 0,
              "[%s]   ... gradients untouched, step count still 0", dtype_tag(dtype));
        free(img);
        kfac_optimizer_free(h);

        /* Inverse period 0: stepping without kfac_optimizer_update_inverses fails. */
        h = handle_with_batch(dtype, &r, 1, 1);
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 0));
        img = save_image(h, &size);
        st = step(h, &g);
        snprintf(what, sizeof what, "[%s] kfac_optimizer_step with inverse period 0, never inverted",
                 dtype_tag(dtype));
        expect_fails_unchanged(h, st, KFAC_ERROR_NO_INVERSES, img, size, what);
        check(grads_same(&g, &g0) && step_count(h) == 0,
              "[%s]   ... gradients untouched, step count still 0", dtype_tag(dtype));
        free(img);
        kfac_layer_info info;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        REQUIRE_OK(h, kfac_optimizer_update_factors(h));
        REQUIRE_OK(h, kfac_layer_get_info(h, 0, &info));
        check(info.has_factors == 1 && info.has_inverses == 0,
              "[%s] after kfac_optimizer_update_factors: has_factors 1, has_inverses 0", dtype_tag(dtype));
        img = save_image(h, &size);
        st = step(h, &g);
        snprintf(what, sizeof what, "[%s] kfac_optimizer_step with factors but inverse period 0",
                 dtype_tag(dtype));
        expect_fails_unchanged(h, st, KFAC_ERROR_NO_INVERSES, img, size, what);
        st = precondition(h, 0, &g.w[0], &g.b[0]);
        snprintf(what, sizeof what, "[%s] kfac_layer_precondition before kfac_optimizer_update_inverses",
                 dtype_tag(dtype));
        expect_fails_unchanged(h, st, KFAC_ERROR_NO_INVERSES, img, size, what);
        free(img);
        REQUIRE_OK(h, kfac_optimizer_update_inverses(h));
        REQUIRE_OK(h, kfac_layer_get_info(h, 1, &info));
        st = step(h, &g);
        check(info.has_inverses == 1 && st == KFAC_OK && step_count(h) == 1 &&
                  !grads_same(&g, &g0) && kfac_optimizer_last_error(h)[0] == '\0',
              "[%s] after kfac_optimizer_update_inverses the step succeeds (k = 1, last_error \"\")",
              dtype_tag(dtype));
        kfac_optimizer_free(h);
        grads_free(&g);
        grads_free(&g0);
    }

    /* Changing the inverse strategy discards the inverses; with Ti > 0 the next step inverts
     * again even when k is not a multiple of Ti; with Ti = 0 it fails until asked. */
    {
        kfac_optimizer *h = handle_with_batch(KFAC_FLOAT64, &r, 1, 1);
        grads_t g = grads_new(KFAC_FLOAT64, &TWIN_MODEL, &r);
        kfac_layer_info info;
        memset(&info, 0, sizeof info);
        info.struct_size = sizeof info;
        REQUIRE_OK(h, step(h, &g)); /* k = 0: factors and inverses */
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_CHOLESKY));
        REQUIRE_OK(h, kfac_layer_get_info(h, 0, &info));
        const int discarded = info.has_factors == 1 && info.has_inverses == 0;
        int st = step(h, &g); /* k = 1, not a multiple of Ti = 10 */
        REQUIRE_OK(h, kfac_layer_get_info(h, 0, &info));
        check(discarded && st == KFAC_OK && info.has_inverses == 1,
              "changing the strategy discards the inverses; the next step (k = 1, Ti = 10) "
              "inverts again (got %s)", status_name(st));
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 0));
        REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EIGEN));
        unsigned char *img = save_image(h, &size);
        st = step(h, &g);
        expect_fails_unchanged(h, st, KFAC_ERROR_NO_INVERSES, img, size,
                               "[f64] strategy changed with Ti = 0: kfac_optimizer_step");
        free(img);
        grads_free(&g);
        kfac_optimizer_free(h);
    }

    /* kfac_optimizer_wants_statistics follows the factor-update period. */
    kfac_optimizer *h = handle_with_batch(KFAC_FLOAT64, &r, 1, 1);
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_FACTOR_UPDATE_PERIOD, 3));
    grads_t g = grads_new(KFAC_FLOAT64, &TWIN_MODEL, &r);
    int pattern_ok = 1;
    char seen[16] = "";
    for (int k = 0; k < 7; k++) {
        int w = wants_statistics(h);
        seen[k] = (char)('0' + w);
        if (w != (k % 3 == 0)) pattern_ok = 0;
        if (step(h, &g) != KFAC_OK) pattern_ok = 0;
    }
    check(pattern_ok, "kfac_optimizer_wants_statistics with factor period 3 over k = 0..6: %s (want 1001001)",
          seen);
    REQUIRE_OK(h, kfac_param_set_int(h, KFAC_PARAM_FACTOR_UPDATE_PERIOD, 0));
    check(wants_statistics(h) == 1, "kfac_optimizer_wants_statistics with factor period 0 is 1");
    grads_free(&g);
    kfac_optimizer_free(h);

    /* Statistics overflowing to Inf although every recorded value is finite (float32): either
     * the record call or the factor update must fail with NON_FINITE, leaving the handle as it
     * was; the step must then fail the same way without touching the gradients. */
    h = make_handle(KFAC_FLOAT32, &TWIN_MODEL);
    buf_t x = buf_new(KFAC_FLOAT32, 20), y = buf_new(KFAC_FLOAT32, 16);
    buf_t x1 = buf_new(KFAC_FLOAT32, 16), y1 = buf_new(KFAC_FLOAT32, 12);
    for (size_t i = 0; i < 20; i++) buf_set(&x, i, 3e38);
    buf_random(&y, &r);
    buf_random(&x1, &r);
    buf_random(&y1, &r);
    REQUIRE_OK(h, record_grads(h, 0, &y, 4));
    REQUIRE_OK(h, record_inputs(h, 1, &x1, 4));
    REQUIRE_OK(h, record_grads(h, 1, &y1, 4));
    unsigned char *img = save_image(h, &size);
    int st = record_inputs(h, 0, &x, 4);
    if (st != KFAC_OK) {
        expect_fails_unchanged(h, st, KFAC_ERROR_NON_FINITE, img, size,
                               "[f32] kfac_layer_record_inputs of finite values whose squares overflow");
    } else {
        check(1, "[f32] kfac_layer_record_inputs of finite values whose squares overflow: accepted");
        free(img);
        img = save_image(h, &size);
        st = kfac_optimizer_update_factors(h);
        expect_fails_unchanged(h, st, KFAC_ERROR_NON_FINITE, img, size,
                               "[f32] kfac_optimizer_update_factors whose factor overflows to Inf");
        grads_t gf = grads_new(KFAC_FLOAT32, &TWIN_MODEL, &r), gf0 = grads_clone(&gf);
        st = step(h, &gf);
        expect_fails_unchanged(h, st, KFAC_ERROR_NON_FINITE, img, size,
                               "[f32] kfac_optimizer_step whose factor overflows to Inf");
        check(grads_same(&gf, &gf0), "[f32]   ... gradients untouched");
        /* Not a check: the header offers no way to discard pending statistics, so report
         * whether the handle can make progress again after more (valid) statistics. */
        buf_random(&x, &r); /* 20 ordinary values for layer 0's 4 rows of 5 inputs */
        REQUIRE_OK(h, record_inputs(h, 0, &x, 4));
        REQUIRE_OK(h, record_grads(h, 0, &y, 4));
        st = step(h, &gf);
        printf("note [f32] after the overflow, recording valid statistics and stepping gives %s: "
               "%s\n", status_name(st), st == KFAC_OK ? "recovered" :
               "the handle stays stuck until kfac_state_load (no API discards pending statistics)");
        grads_free(&gf);
        grads_free(&gf0);
    }
    free(img);
    buf_free(&x);
    buf_free(&y);
    buf_free(&x1);
    buf_free(&y1);
    kfac_optimizer_free(h);
}


typedef struct {
    int index;
    int ok;
    uint64_t hash; /* FNV-1a over the bytes of every direction */
} worker_t;

/* 40 record + step rounds on a private float32 handle with seeded data; no check() calls here
 * (not thread-safe): failures are reported through w->ok. */
static void *worker_run(void *arg) {
    worker_t *w = arg;
    w->ok = 0;
    w->hash = 1469598103934665603ull;
    kfac_optimizer *h = NULL;
    if (kfac_optimizer_create(KFAC_FLOAT32, &h) != KFAC_OK) return NULL;
    int32_t id;
    int ok = add_dense(h, 16, 12, 1, &id) == KFAC_OK && add_dense(h, 12, 8, 0, &id) == KFAC_OK &&
             kfac_param_set_int(h, KFAC_PARAM_NUM_THREADS, 2) == KFAC_OK &&
             kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 3) == KFAC_OK;
    const model_t m = {2, {{16, 12, 1, NULL}, {12, 8, 0, NULL}}};
    rng_t r = {5000 + (uint64_t)w->index};
    for (int round = 0; ok && round < 40; round++) {
        for (int l = 0; l < 2; l++) {
            buf_t x = buf_new(KFAC_FLOAT32, (size_t)(8 * m.l[l].in));
            buf_t g = buf_new(KFAC_FLOAT32, (size_t)(8 * m.l[l].out));
            buf_random(&x, &r);
            buf_random(&g, &r);
            ok = ok && record_inputs(h, l, &x, 8) == KFAC_OK && record_grads(h, l, &g, 8) == KFAC_OK;
            buf_free(&x);
            buf_free(&g);
        }
        grads_t gr = grads_new(KFAC_FLOAT32, &m, &r);
        ok = ok && step(h, &gr) == KFAC_OK;
        for (int l = 0; l < 2; l++) {
            const buf_t *parts[2] = {&gr.w[l], &gr.b[l]};
            for (int k = 0; k < 2; k++) {
                if (!parts[k]->p) continue;
                const unsigned char *bytes = parts[k]->p;
                for (size_t i = 0; i < parts[k]->n * sizeof(float); i++)
                    w->hash = (w->hash ^ bytes[i]) * 1099511628211ull;
            }
        }
        grads_free(&gr);
    }
    kfac_optimizer_free(h);
    w->ok = ok;
    return NULL;
}

/* OpenBLAS's process-wide thread count, if OpenBLAS is loaded (libkfac links it); -1 if not. */
static int openblas_threads(void) {
    void *sym = dlsym(RTLD_DEFAULT, "openblas_get_num_threads");
    if (!sym) return -1;
    int (*get)(void);
    memcpy(&get, &sym, sizeof get);
    return get();
}

void test_concurrency(void) {
    section("distinct handles on concurrent threads");
    enum { N_WORKERS = 4, N_REPEATS = 5 };
    const int blas_before = openblas_threads();
    worker_t seq[N_WORKERS];
    for (int i = 0; i < N_WORKERS; i++) {
        seq[i].index = i;
        worker_run(&seq[i]);
    }
    int same = 1, mismatches = 0;
    for (int rep = 0; rep < N_REPEATS; rep++) {
        worker_t par[N_WORKERS];
        pthread_t threads[N_WORKERS];
        int started[N_WORKERS];
        for (int i = 0; i < N_WORKERS; i++) {
            par[i].index = i;
            started[i] = pthread_create(&threads[i], NULL, worker_run, &par[i]) == 0;
        }
        for (int i = 0; i < N_WORKERS; i++) {
            if (!started[i]) {
                same = 0;
                continue;
            }
            pthread_join(threads[i], NULL);
            if (!seq[i].ok || !par[i].ok) same = 0;
            if (seq[i].hash != par[i].hash) mismatches++;
        }
    }
    check(same && mismatches == 0,
          "%d handles stepped concurrently (NUM_THREADS 2 each), %d times: directions bitwise "
          "equal to sequential runs (%d of %d runs differ)", N_WORKERS, N_REPEATS, mismatches,
          N_WORKERS * N_REPEATS);
    const int blas_after = openblas_threads();
    check(blas_after == blas_before,
          "OpenBLAS's process-wide thread count is the same after concurrent use (%d before, %d "
          "after)", blas_before, blas_after);
}
