/*
 * test_distributed.c — the experimental "Distributed" section (kfac_distributed_*) in an
 * in-process fake world: P = 1..4 float64 handles, a SUM-allreduce over their packed buffers,
 * each handle recording a disjoint uneven slice of a union batch (equal slices for the lazy
 * reduce), the same union gradient given to every rank. Every rank's directions must be
 * bit-identical (memcmp) and equal to one handle's on the union batch to rtol 1e-12, for the
 * Cholesky and eigen strategies and both reduce modes, and EKFAC (paired recording, the scaling
 * exchange) with the eager reduce. Also: error paths change nothing, a
 * failed inverse pack poisons the exchange on every rank alike.
 */
#define _POSIX_C_SOURCE 200809L /* pthread barriers under -std=c11 */
#define KFAC_EXPERIMENTAL_API
#include "harness.h"
#include "../distributed/dist_model.h"

#include <math.h>
#include <pthread.h>

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
            : what == KFAC_DISTRIBUTED_INVERSES ? kfac_distributed_pack_inverses_f64(ranks[r], buf[r], n)
                                                : kfac_distributed_pack_scalings_f64(ranks[r], buf[r], n);
        if (s) printf("  pack failed on rank %d: %s\n", r, kfac_optimizer_last_error(ranks[r]));
        for (int64_t i = 0; i < n; i++) sum[i] += buf[r][i];
    }
    int first = 0;
    for (int r = 0; r < p; r++) {
        s = what == KFAC_DISTRIBUTED_STATISTICS ? kfac_distributed_unpack_statistics_f64(ranks[r], sum, n)
            : what == KFAC_DISTRIBUTED_INVERSES ? kfac_distributed_unpack_inverses_f64(ranks[r], sum, n)
                                                : kfac_distributed_unpack_scalings_f64(ranks[r], sum, n);
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
        ok = ok && fake_exchange(ranks, p, KFAC_DISTRIBUTED_SCALINGS) == 0;
        ok = ok && dm_step(ref, &d, rw, rb) == 0;
        for (int r = 0; r < p; r++) {
            ok = ok && dm_step(ranks[r], &d, w[r], b[r]) == 0;
            if (r > 0 && (memcmp(w[r], w[0], sizeof w[0]) || memcmp(b[r], b[0], sizeof b[0]))) identical = 0;
        }
        double e = dm_relative_difference(w[0], b[0], rw, rb);
        if (e > worst) worst = e;
    }
    check(ok, "P = %d, %s, %s: every call succeeds", p, dm_strategy_name(strategy),
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


/* ---- kfac_distributed_synchronize through a collective on threads ----
 * P ranks on P threads; the collective is a SUM-allreduce over a barrier: every rank publishes
 * its buffer, sums all of them in rank order (the same bits everywhere), and waits until all
 * have read before overwriting its own. It fails on every rank at call `failing_call`, as an
 * engine reporting an error to the whole group. */
#define SYNC_STEPS 7
typedef struct {
    int p, failing_call;
    pthread_barrier_t barrier;
    double *published[MAXP];
    int calls[MAXP];
    int64_t counts[MAXP][2 * SYNC_STEPS];
} thread_world;

typedef struct {
    thread_world *world;
    kfac_optimizer *opt;
    int rank, lo, hi, steps, status, gather;
    const dm_step_data *data;
    double (*w)[DM_LAYERS][64], (*b)[DM_LAYERS][8];
} rank_thread;

static int thread_allreduce(double *buffer, int64_t count, void *user) {
    rank_thread *t = user;
    thread_world *w = t->world;
    int call = w->calls[t->rank]++;
    if (call < 2 * SYNC_STEPS) w->counts[t->rank][call] = count;
    if (call == w->failing_call) return 5;
    w->published[t->rank] = buffer;
    pthread_barrier_wait(&w->barrier);
    double *sum = calloc((size_t)count + 1, sizeof(double));
    for (int r = 0; r < w->p; r++)
        for (int64_t i = 0; i < count; i++) sum[i] += w->published[r][i];
    pthread_barrier_wait(&w->barrier);
    memcpy(buffer, sum, (size_t)count * sizeof(double));
    free(sum);
    return 0;
}

static int thread_allgatherv(const double *send, double *receive, const int64_t *counts, const int64_t *displacements,
                             void *user) {
    rank_thread *t = user;
    thread_world *w = t->world;
    int call = w->calls[t->rank]++;
    if (call < 2 * SYNC_STEPS) w->counts[t->rank][call] = displacements[w->p - 1] + counts[w->p - 1];  /* the total */
    if (call == w->failing_call) return 5;
    w->published[t->rank] = (double *)send;
    pthread_barrier_wait(&w->barrier);
    for (int r = 0; r < w->p; r++) memcpy(receive + displacements[r], w->published[r], (size_t)counts[r] * sizeof(double));
    pthread_barrier_wait(&w->barrier);
    return 0;
}

/* One rank's run: per step, record its slice, synchronize, step (directions into w[k], b[k]). */
static void *rank_main(void *arg) {
    rank_thread *t = arg;
    kfac_collectives c = {sizeof(kfac_collectives), t, NULL, thread_allreduce, NULL, t->gather ? thread_allgatherv : NULL};
    for (int k = 0; k < t->steps && !t->status; k++) {
        if ((t->status = dm_record(t->opt, &t->data[k], t->lo, t->hi))) break;
        if ((t->status = kfac_distributed_synchronize(t->opt, &c))) break;
        if (t->w && (t->status = dm_step(t->opt, &t->data[k], t->w[k], t->b[k]))) break;
    }
    return NULL;
}

static void run_threads(rank_thread *t, int p) {
    pthread_t id[MAXP];
    for (int r = 0; r < p; r++) pthread_create(&id[r], NULL, rank_main, &t[r]);
    for (int r = 0; r < p; r++) pthread_join(id[r], NULL);
}

static void synchronize_world(int p, int32_t strategy, int gather) {
    static dm_step_data d[SYNC_STEPS];
    static double rw[SYNC_STEPS][DM_LAYERS][64], rb[SYNC_STEPS][DM_LAYERS][8];
    static double w[MAXP][SYNC_STEPS][DM_LAYERS][64], b[MAXP][SYNC_STEPS][DM_LAYERS][8];
    uint64_t seed = 99;
    for (int k = 0; k < SYNC_STEPS; k++) dm_make(&d[k], &seed);
    kfac_optimizer *ref = NULL;
    REQUIRE_OK(ref, dm_create(&ref, 0, 1, strategy, KFAC_DISTRIBUTED_REDUCE_EAGER));
    int ok = 1;
    for (int k = 0; k < SYNC_STEPS; k++) ok = ok && !dm_record(ref, &d[k], 0, DM_ROWS) && !dm_step(ref, &d[k], rw[k], rb[k]);
    static thread_world world;
    memset(&world, 0, sizeof world);
    world.p = p;
    world.failing_call = -1;
    pthread_barrier_init(&world.barrier, NULL, (unsigned)p);
    rank_thread t[MAXP];
    for (int r = 0; r < p; r++) {
        t[r] = (rank_thread){&world, NULL, r, 0, 0, SYNC_STEPS, 0, gather, d, w[r], b[r]};
        dm_slice(r, p, DM_ROWS, 0, &t[r].lo, &t[r].hi);
        REQUIRE_OK(t[r].opt, dm_create(&t[r].opt, r, p, strategy, KFAC_DISTRIBUTED_REDUCE_EAGER));
    }
    run_threads(t, p);
    double worst = 0;
    int identical = 1, counts_agree = 1;
    for (int r = 0; r < p; r++) {
        ok = ok && t[r].status == 0;
        if (t[r].status) printf("  rank %d: %s\n", r, kfac_optimizer_last_error(t[r].opt));
        counts_agree = counts_agree && world.calls[r] == world.calls[0] &&
                       !memcmp(world.counts[r], world.counts[0], sizeof world.counts[0]);
    }
    for (int k = 0; k < SYNC_STEPS && ok; k++) {
        for (int r = 1; r < p; r++)
            if (memcmp(w[r][k], w[0][k], sizeof w[0][k]) || memcmp(b[r][k], b[0][k], sizeof b[0][k])) identical = 0;
        double e = dm_relative_difference(w[0][k], b[0][k], rw[k], rb[k]);
        if (e > worst) worst = e;
    }
    const char *name = dm_strategy_name(strategy);
    check(ok, "synchronize%s, P = %d, %s: every call succeeds on every thread", gather ? " with allgatherv" : "", p, name);
    check(counts_agree && world.calls[0] >= SYNC_STEPS + 3,
          "P = %d: every rank called the collective as often (%d times), with the same counts", p, world.calls[0]);
    check(identical, "P = %d: every rank's directions are bit-identical", p);
    check(worst <= 1e-12, "P = %d: directions equal the union batch's (max rel. difference %.2e <= 1e-12)", p, worst);
    pthread_barrier_destroy(&world.barrier);
    kfac_optimizer_free(ref);
    for (int r = 0; r < p; r++) kfac_optimizer_free(t[r].opt);
}

/* A collective failing on every rank at its first (statistics) or second (inverse) call: every
 * rank gets CALLBACK and its state equals an untouched twin's; the retry and step then agree
 * with one handle on the union batch. Also the argument checks. */
static void synchronize_failures(void) {
    section("distributed: kfac_distributed_synchronize with a failing collective");
    enum { P = 3 };
    static dm_step_data d[2];
    uint64_t seed = 123;
    dm_make(&d[0], &seed);
    dm_make(&d[1], &seed);
    for (int failing = 0; failing < 5; failing++) {  /* 2: the inverse allgatherv; 3, 4: EKFAC's scalings */
        const int32_t strategy = failing >= 3 ? KFAC_INVERSE_EKFAC : KFAC_INVERSE_EIGEN;
        kfac_optimizer *ref = NULL, *twin[P];
        REQUIRE_OK(ref, dm_create(&ref, 0, 1, strategy, 0));
        static thread_world world;
        memset(&world, 0, sizeof world);
        world.p = P;
        world.failing_call = failing == 2 ? 1 : failing >= 3 ? 2 : failing;
        pthread_barrier_init(&world.barrier, NULL, P);
        rank_thread t[P];
        for (int r = 0; r < P; r++) {
            t[r] = (rank_thread){&world, NULL, r, 0, 0, 1, 0, failing == 2 || failing == 4, d, NULL, NULL};
            dm_slice(r, P, DM_ROWS, 0, &t[r].lo, &t[r].hi);
            REQUIRE_OK(t[r].opt, dm_create(&t[r].opt, r, P, strategy, 0));
            REQUIRE_OK(twin[r], dm_create(&twin[r], r, P, strategy, 0));
            REQUIRE_OK(twin[r], dm_record(twin[r], &d[0], t[r].lo, t[r].hi));
        }
        run_threads(t, P);
        int all_callback = 1, unchanged = 1;
        for (int r = 0; r < P; r++) {
            all_callback = all_callback && t[r].status == KFAC_ERROR_CALLBACK;
            unchanged = unchanged && same_state(t[r].opt, twin[r]);
        }
        check(all_callback, "collective failing at call %d: CALLBACK on every rank", failing);
        check(unchanged, "collective failing at call %d: every handle equals its untouched twin", failing);
        /* The retry (nothing recorded again) and the step. */
        static double rw[1][DM_LAYERS][64], rb[1][DM_LAYERS][8], w[P][1][DM_LAYERS][64], b[P][1][DM_LAYERS][8];
        int ok = !dm_record(ref, &d[0], 0, DM_ROWS) && !dm_step(ref, &d[0], rw[0], rb[0]);
        world.failing_call = -1;
        for (int r = 0; r < P; r++) { t[r].lo = t[r].hi = 0; t[r].status = 0; t[r].w = w[r]; t[r].b = b[r]; }
        run_threads(t, P);
        double worst = 0;
        for (int r = 0; r < P; r++) {
            ok = ok && t[r].status == 0;
            if (t[r].status) printf("  rank %d: %s\n", r, kfac_optimizer_last_error(t[r].opt));
            double e = dm_relative_difference(w[r][0], b[r][0], rw[0], rb[0]);
            if (e > worst) worst = e;
        }
        check(ok && worst <= 1e-12, "retry after failing call %d: the union batch's directions (%.2e)", failing, worst);
        pthread_barrier_destroy(&world.barrier);
        kfac_optimizer_free(ref);
        for (int r = 0; r < P; r++) { kfac_optimizer_free(t[r].opt); kfac_optimizer_free(twin[r]); }
    }
    kfac_optimizer *o = NULL;
    REQUIRE_OK(o, dm_create(&o, 0, 2, KFAC_INVERSE_CHOLESKY, 0));
    kfac_collectives none = {sizeof(kfac_collectives), NULL, NULL, NULL, NULL, NULL};
    kfac_collectives small = {sizeof(size_t), NULL, NULL, thread_allreduce, NULL, NULL};
    /* The gathered layout: per rank counts and their prefix sums; together one full inverse pack
     * on the first step (every block inverted), split between the ranks. */
    int64_t counts[2] = {-1, -1}, displacements[2] = {-1, -1}, full = 0;
    static dm_step_data e;
    uint64_t s2 = 4;
    dm_make(&e, &s2);
    REQUIRE_OK(o, dm_record(o, &e, 0, DM_ROWS));
    REQUIRE_OK(o, kfac_distributed_get_count(o, KFAC_DISTRIBUTED_INVERSES, &full));
    int layout_status = kfac_distributed_get_inverse_layout(o, counts, displacements, 2);
    check(layout_status == 0 && counts[0] > 0 && counts[1] > 0 &&
          counts[0] + counts[1] == full && displacements[0] == 0 && displacements[1] == counts[0],
          "inverse layout: counts %lld + %lld = one full pack %lld, displacements their prefix sums",
          (long long)counts[0], (long long)counts[1], (long long)full);
    check(kfac_distributed_get_inverse_layout(o, counts, NULL, 3) == KFAC_ERROR_INVALID_SIZE, "inverse layout: n_ranks != world size");
    check(kfac_distributed_get_inverse_layout(o, NULL, NULL, 2) == KFAC_ERROR_NULL_POINTER, "inverse layout: NULL counts");
    double *mine = calloc((size_t)full, sizeof(double)), *all = calloc((size_t)full, sizeof(double));
    check(kfac_distributed_pack_owned_inverses_f64(o, mine, counts[0] + 1) == KFAC_ERROR_INVALID_SIZE, "pack owned: wrong count");
    check(kfac_distributed_pack_owned_inverses_f32(o, (float *)mine, counts[0]) == KFAC_ERROR_DTYPE_MISMATCH, "pack owned: dtype");
    REQUIRE_OK(o, kfac_distributed_pack_owned_inverses_f64(o, mine, counts[0]));
    all[0] = NAN;
    check(kfac_distributed_unpack_gathered_inverses_f64(o, all, full) == KFAC_ERROR_NON_FINITE, "unpack gathered: NaN");
    check(kfac_distributed_unpack_gathered_inverses_f64(o, all, full - 1) == KFAC_ERROR_INVALID_SIZE, "unpack gathered: wrong count");
    free(mine); free(all);
    check(kfac_distributed_synchronize(o, NULL) == KFAC_ERROR_NULL_POINTER, "synchronize: NULL collectives");
    check(kfac_distributed_synchronize(NULL, &none) == KFAC_ERROR_NULL_POINTER, "synchronize: NULL handle");
    check(kfac_distributed_synchronize(o, &none) == KFAC_ERROR_NULL_POINTER &&
          strstr(kfac_optimizer_last_error(o), "allreduce_sum_f64") != NULL,
          "synchronize: a float64 handle without allreduce_sum_f64: NULL_POINTER naming it");
    check(kfac_distributed_synchronize(o, &small) == KFAC_ERROR_INVALID_SIZE, "synchronize: struct_size too small");
    kfac_optimizer_free(o);
}

/* Block-tridiagonal links: a chain 6 → 5 → 4 → 3 of linked dense layers (biases on the first
 * two), P = 1..4 float64 handles with uneven slices against one handle on the union batch: every
 * rank's directions bit-identical and within rtol 1e-12 of the union's (the cross factors travel
 * with the statistics, each linked layer's inverse is one rank's unit). */
static void linked_world(int p) {
    kfac_optimizer *ref = NULL, *ranks[MAXP] = {0};
    REQUIRE_OK(ref, lk_create(&ref, 0, 1));
    for (int r = 0; r < p; r++) REQUIRE_OK(ranks[r], lk_create(&ranks[r], r, p));
    static double x[LK_LAYERS][LK_ROWS * 8], g[LK_LAYERS][LK_ROWS * 8], gw[LK_LAYERS][32], gb[LK_LAYERS][8];
    static double w[MAXP + 1][LK_LAYERS][32], b[MAXP + 1][LK_LAYERS][8];
    uint64_t seed = 31;
    double worst = 0, scale = 0;
    int ok = 1, identical = 1;
    for (int k = 0; k < 7 && ok; k++) {
        for (int l = 0; l < LK_LAYERS; l++) {
            for (int64_t i = 0; i < LK_ROWS * lk_in[l]; i++) x[l][i] = dm_uniform(&seed);
            for (int64_t i = 0; i < LK_ROWS * lk_out[l]; i++) g[l][i] = 0.5 * dm_uniform(&seed);
            for (int64_t i = 0; i < lk_in[l] * lk_out[l]; i++) gw[l][i] = dm_uniform(&seed);
            for (int64_t i = 0; i < lk_out[l]; i++) gb[l][i] = dm_uniform(&seed);
        }
        for (int r = 0; r <= p; r++) {  /* r == p: the reference on every row */
            kfac_optimizer *o = r == p ? ref : ranks[r];
            int lo = 0, hi = LK_ROWS;
            if (r < p) dm_slice(r, p, LK_ROWS, 0, &lo, &hi);
            for (int l = 0; l < LK_LAYERS && hi > lo; l++) {
                ok = ok && !kfac_layer_record_inputs_f64(o, l, x[l] + lo * lk_in[l], hi - lo);
                ok = ok && !kfac_layer_record_output_grads_f64(o, l, g[l] + lo * lk_out[l], hi - lo);
            }
        }
        ok = ok && fake_exchange(ranks, p, KFAC_DISTRIBUTED_STATISTICS) == 0;
        ok = ok && fake_exchange(ranks, p, KFAC_DISTRIBUTED_INVERSES) == 0;
        for (int r = 0; r <= p && ok; r++) {
            double *wp[LK_LAYERS], *bp[LK_LAYERS];
            for (int l = 0; l < LK_LAYERS; l++) {
                memcpy(w[r][l], gw[l], sizeof gw[l]);
                memcpy(b[r][l], gb[l], sizeof gb[l]);
                wp[l] = w[r][l];
                bp[l] = lk_bias[l] ? b[r][l] : NULL;
            }
            ok = ok && !kfac_optimizer_step_f64(r == p ? ref : ranks[r], wp, bp, LK_LAYERS);
            if (r > 0 && r < p && (memcmp(w[r], w[0], sizeof w[0]) || memcmp(b[r], b[0], sizeof b[0]))) identical = 0;
        }
        for (int l = 0; l < LK_LAYERS; l++) {
            for (int64_t i = 0; i < lk_in[l] * lk_out[l]; i++) {
                double e = fabs(w[0][l][i] - w[p][l][i]); if (e > worst) worst = e;
                if (fabs(w[p][l][i]) > scale) scale = fabs(w[p][l][i]);
            }
            for (int64_t i = 0; i < lk_out[l] * lk_bias[l]; i++) {
                double e = fabs(b[0][l][i] - b[p][l][i]); if (e > worst) worst = e;
                if (fabs(b[p][l][i]) > scale) scale = fabs(b[p][l][i]);
            }
        }
    }
    check(ok, "links, P = %d: every call succeeds", p);
    check(identical, "links, P = %d: every rank's directions are bit-identical", p);
    check(worst <= 1e-12 * scale, "links, P = %d: directions equal the union batch's (max rel. difference %.2e <= 1e-12)", p,
          worst / (scale > 0 ? scale : 1));
    kfac_optimizer_free(ref);
    for (int r = 0; r < p; r++) kfac_optimizer_free(ranks[r]);
}

void test_distributed(void) {
    section("distributed: fake world of 1-4 handles against one handle on the union batch");
    for (int p = 1; p <= MAXP; p++) {
        fake_world(p, KFAC_INVERSE_EIGEN, KFAC_DISTRIBUTED_REDUCE_EAGER);
        fake_world(p, KFAC_INVERSE_CHOLESKY, KFAC_DISTRIBUTED_REDUCE_EAGER);
        fake_world(p, KFAC_INVERSE_EIGEN, KFAC_DISTRIBUTED_REDUCE_LAZY);
        fake_world(p, KFAC_INVERSE_CHOLESKY, KFAC_DISTRIBUTED_REDUCE_LAZY);
        fake_world(p, KFAC_INVERSE_EKFAC, KFAC_DISTRIBUTED_REDUCE_EAGER);
    }
    section("distributed: block-tridiagonal links, fake world of 1-4 handles against one handle on the union batch");
    for (int p = 1; p <= MAXP; p++) linked_world(p);
    distributed_errors();
    section("distributed: kfac_distributed_synchronize on threads against one handle on the union batch");
    for (int p = 1; p <= MAXP; p++) {
        synchronize_world(p, KFAC_INVERSE_EIGEN, 0);
        synchronize_world(p, KFAC_INVERSE_CHOLESKY, 0);
        synchronize_world(p, KFAC_INVERSE_EIGEN, 1);
        synchronize_world(p, KFAC_INVERSE_CHOLESKY, 1);
        synchronize_world(p, KFAC_INVERSE_EKFAC, 0);
        synchronize_world(p, KFAC_INVERSE_EKFAC, 1);
    }
    synchronize_failures();
}
