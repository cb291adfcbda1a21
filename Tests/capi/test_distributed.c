/*
 * test_distributed.c — the experimental "Distributed" section (kfac_distributed_*) in an
 * in-process fake world: P = 1..4 float64 handles, a SUM-allreduce over their packed buffers,
 * each handle recording a disjoint uneven slice of a union batch (equal slices for the lazy
 * reduce), the same union gradient given to every rank. Every rank's directions must be
 * bit-identical (memcmp) and equal to one handle's on the union batch to rtol 1e-12, for the
 * Cholesky and eigen strategies and both reduce modes. Also: error paths change nothing, a
 * failed inverse pack poisons the exchange on every rank alike.
 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"
#include "../distributed/dist_model.h"

#include <math.h>

#define MAXP 4

/* Packs `what` on every rank, sums the buffers in rank order, unpacks on every rank. */
static int fake_exchange(kfac_optimizer **ranks, int p, int32_t what) {
    int32_t due = 0;
    int s = kfac_distributed_get_due(ranks[0], what, &due);
    if (s || !due) return s;
    int64_t n = 0;
    if ((s = kfac_distributed_get_count(ranks[0], what, &n))) return s;
    double *buf[MAXP], *sum = calloc((size_t)n + 1, sizeof(double));
    for (int r = 0; r < p; r++) {
        buf[r] = calloc((size_t)n + 1, sizeof(double));
        s = what == KFAC_DISTRIBUTED_STATISTICS ? kfac_distributed_pack_statistics_f64(ranks[r], buf[r], n)
                                                : kfac_distributed_pack_inverses_f64(ranks[r], buf[r], n);
        if (s) printf("  pack failed on rank %d: %s\n", r, kfac_optimizer_last_error(ranks[r]));
        for (int64_t i = 0; i < n; i++) sum[i] += buf[r][i];
    }
    int first = 0;
    for (int r = 0; r < p; r++) {
        s = what == KFAC_DISTRIBUTED_STATISTICS ? kfac_distributed_unpack_statistics_f64(ranks[r], sum, n)
                                                : kfac_distributed_unpack_inverses_f64(ranks[r], sum, n);
        if (s && !first) first = s;
        free(buf[r]);
    }
    free(sum);
    return first;
}

static void fake_world(int p, int32_t strategy, int32_t reduce) {
    kfac_optimizer *ref = NULL, *ranks[MAXP] = {0};
    REQUIRE_OK(ref, dm_create(&ref, 0, 1, strategy, reduce));
    for (int r = 0; r < p; r++) REQUIRE_OK(ranks[r], dm_create(&ranks[r], r, p, strategy, reduce));
    static dm_step_data d;
    static double rw[DM_LAYERS][64], rb[DM_LAYERS][8], w[MAXP][DM_LAYERS][64], b[MAXP][DM_LAYERS][8];
    uint64_t seed = 77;
    double worst = 0;
    int identical = 1, ok = 1;
    for (int k = 0; k < 7 && ok; k++) {
        dm_make(&d, &seed);
        /* The lazy reduce is exact for equal local batches: 12 rows (divisible by 1–4). */
        const int lazy = reduce == KFAC_DISTRIBUTED_REDUCE_LAZY, rows = lazy ? 12 : DM_ROWS;
        ok = ok && dm_record(ref, &d, 0, rows) == 0;
        for (int r = 0; r < p; r++) {
            int lo, hi;
            dm_slice(r, p, rows, lazy, &lo, &hi);
            ok = ok && dm_record(ranks[r], &d, lo, hi) == 0;
        }
        ok = ok && fake_exchange(ranks, p, KFAC_DISTRIBUTED_STATISTICS) == 0;
        ok = ok && fake_exchange(ranks, p, KFAC_DISTRIBUTED_INVERSES) == 0;
        ok = ok && dm_step(ref, &d, rw, rb) == 0;
        for (int r = 0; r < p; r++) {
            ok = ok && dm_step(ranks[r], &d, w[r], b[r]) == 0;
            if (r > 0 && (memcmp(w[r], w[0], sizeof w[0]) || memcmp(b[r], b[0], sizeof b[0]))) identical = 0;
        }
        double e = dm_relative_difference(w[0], b[0], rw, rb);
        if (e > worst) worst = e;
    }
    check(ok, "P = %d, %s, %s: every call succeeds", p, strategy == KFAC_INVERSE_EIGEN ? "eigen" : "Cholesky",
          reduce ? "lazy" : "eager");
    check(identical, "P = %d: every rank's directions are bit-identical", p);
    check(worst <= 1e-12, "P = %d: directions equal the union batch's (max rel. difference %.2e <= 1e-12)", p, worst);
    kfac_optimizer_free(ref);
    for (int r = 0; r < p; r++) kfac_optimizer_free(ranks[r]);
}

static void distributed_errors(void) {
    section("distributed: error paths change nothing");
    kfac_optimizer *a = NULL, *b = NULL, *f = NULL;
    REQUIRE_OK(a, dm_create(&a, 0, 2, KFAC_INVERSE_CHOLESKY, 0));
    REQUIRE_OK(b, dm_create(&b, 0, 2, KFAC_INVERSE_CHOLESKY, 0));
    REQUIRE_OK(f, kfac_optimizer_create(KFAC_FLOAT32, &f));
    int32_t rank = -1, size = -1;
    check(kfac_distributed_set_world(a, 2, 2) == KFAC_ERROR_INVALID_ARGUMENT, "set_world rank >= size: INVALID_ARGUMENT");
    check(kfac_distributed_set_world(a, 0, 0) == KFAC_ERROR_INVALID_ARGUMENT, "set_world size 0: INVALID_ARGUMENT");
    check(kfac_distributed_get_world(a, &rank, &size) == 0 && rank == 0 && size == 2, "the world is unchanged (0 of 2)");
    check(kfac_distributed_set_world(NULL, 0, 1) == KFAC_ERROR_NULL_POINTER, "NULL handle");
    int64_t n = 0;
    check(kfac_distributed_get_count(a, 7, &n) == KFAC_ERROR_INVALID_ARGUMENT, "get_count: bad what");
    check(kfac_distributed_get_count(a, KFAC_DISTRIBUTED_STATISTICS, NULL) == KFAC_ERROR_NULL_POINTER, "get_count: NULL count");
    int32_t due = -1, owner = -1;
    check(kfac_distributed_get_due(a, KFAC_DISTRIBUTED_INVERSES, &due) == 0 && due == 1, "the first step's inverses are due");
    check(kfac_distributed_get_owner(a, 0, 0, 0, 0, &owner) == 0 && owner >= 0 && owner < 2, "owner of a block is a rank");
    check(kfac_distributed_get_owner(a, 0, 0, 2, 0, &owner) == KFAC_ERROR_INVALID_ARGUMENT, "owner: bad side");
    check(kfac_distributed_get_owner(a, 9, 0, 0, 0, &owner) == KFAC_ERROR_UNKNOWN_LAYER, "owner: unknown layer");
    static dm_step_data d;
    uint64_t seed = 5;
    dm_make(&d, &seed);
    REQUIRE_OK(a, dm_record(a, &d, 0, 4));
    REQUIRE_OK(b, dm_record(b, &d, 0, 4));
    REQUIRE_OK(a, kfac_distributed_get_count(a, KFAC_DISTRIBUTED_STATISTICS, &n));
    double *buf = calloc((size_t)n, sizeof(double));
    float fbuf[4];
    check(kfac_distributed_pack_statistics_f64(a, buf, n - 1) == KFAC_ERROR_INVALID_SIZE, "pack: wrong count");
    check(kfac_distributed_pack_statistics_f32(a, fbuf, 4) == KFAC_ERROR_DTYPE_MISMATCH, "pack: dtype mismatch");
    check(kfac_distributed_pack_statistics_f64(a, NULL, n) == KFAC_ERROR_NULL_POINTER, "pack: NULL buffer");
    REQUIRE_OK(a, kfac_distributed_pack_statistics_f64(a, buf, n));
    double keep = buf[0];
    buf[0] = NAN;
    check(kfac_distributed_unpack_statistics_f64(a, buf, n) == KFAC_ERROR_NON_FINITE, "unpack: NaN");
    buf[0] = keep;
    keep = buf[n - 1];
    buf[n - 1] = 0.5;
    check(kfac_distributed_unpack_statistics_f64(a, buf, n) == KFAC_ERROR_INVALID_ARGUMENT, "unpack: a fractional row count");
    buf[n - 1] = keep;
    free(buf);
    /* A reduced inverse pack that is not finite (what a rank whose pack failed contributes)
     * is refused and changes nothing. */
    REQUIRE_OK(a, kfac_distributed_get_count(a, KFAC_DISTRIBUTED_INVERSES, &n));
    buf = calloc((size_t)n, sizeof(double));
    REQUIRE_OK(a, kfac_distributed_pack_inverses_f64(a, buf, n));
    buf[n / 2] = INFINITY;
    check(kfac_distributed_unpack_inverses_f64(a, buf, n) == KFAC_ERROR_NON_FINITE, "unpack inverses: Inf");
    free(buf);
    size_t sa = 0, sb = 0;
    REQUIRE_OK(a, kfac_state_get_size(a, &sa));
    REQUIRE_OK(b, kfac_state_get_size(b, &sb));
    unsigned char *ia = malloc(sa), *ib = malloc(sb);
    size_t wa = 0, wb = 0;
    REQUIRE_OK(a, kfac_state_save(a, ia, sa, &wa));
    REQUIRE_OK(b, kfac_state_save(b, ib, sb, &wb));
    check(wa == wb && memcmp(ia, ib, wa) == 0, "after the failed calls the state equals an untouched twin's");
    free(ia); free(ib);
    static double w1[DM_LAYERS][64], b1[DM_LAYERS][8], w2[DM_LAYERS][64], b2[DM_LAYERS][8];
    check(dm_step(a, &d, w1, b1) == 0 && dm_step(b, &d, w2, b2) == 0 && !memcmp(w1, w2, sizeof w1) && !memcmp(b1, b2, sizeof b1),
          "the next step works and agrees with the twin's bitwise");
    kfac_optimizer_free(a); kfac_optimizer_free(b); kfac_optimizer_free(f);
}

void test_distributed(void) {
    section("distributed: fake world of 1-4 handles against one handle on the union batch");
    for (int p = 1; p <= MAXP; p++) {
        fake_world(p, KFAC_INVERSE_EIGEN, KFAC_DISTRIBUTED_REDUCE_EAGER);
        fake_world(p, KFAC_INVERSE_CHOLESKY, KFAC_DISTRIBUTED_REDUCE_EAGER);
        fake_world(p, KFAC_INVERSE_EIGEN, KFAC_DISTRIBUTED_REDUCE_LAZY);
        fake_world(p, KFAC_INVERSE_CHOLESKY, KFAC_DISTRIBUTED_REDUCE_LAZY);
    }
    distributed_errors();
}
