/*
 * test_mpi.c — libkfac_mpi under mpirun (make test-mpi: 3 ranks on loopback). Every rank builds
 * a float64 handle of the shared test model (Tests/distributed/dist_model.h), records its own
 * uneven slice of each union batch (equal slices for the lazy reduce), synchronizes with
 * kfac_mpi_synchronize and steps with the union gradient; it also runs one handle on the whole
 * union batch as the single-process reference. Passes when on every rank, for the Cholesky and
 * eigen strategies and both reduce modes, every step's directions are within rtol 1e-12 of the
 * reference's and bit-identical across ranks (the MIN- and MAX-allreduced values agree); and for
 * EKFAC (paired recording, the scaling exchange) and block-tridiagonal links with the eager
 * reduce.
 */
#include "kfac_mpi.h"
#include "../distributed/dist_model.h"

#include <stdio.h>

static int run(int32_t strategy, int32_t reduce, int rank, int size, MPI_Fint comm) {
    kfac_optimizer *ref = NULL, *opt = NULL;
    if (dm_create(&ref, 0, 1, strategy, reduce) || dm_create(&opt, 0, 1, strategy, reduce)) return 1;
    if (kfac_mpi_attach(opt, comm)) return 1;
    static dm_step_data d;
    static double rw[DM_LAYERS][64], rb[DM_LAYERS][8], w[DM_LAYERS][64], b[DM_LAYERS][8];
    static double lo_w[DM_LAYERS][64], hi_w[DM_LAYERS][64];
    uint64_t seed = 11;
    int failures = 0;
    double worst = 0;
    const int lazy = reduce == KFAC_DISTRIBUTED_REDUCE_LAZY;
    const int rows = lazy ? 12 : DM_ROWS;
    for (int k = 0; k < 7; k++) {
        dm_make(&d, &seed);
        int lo, hi;
        dm_slice(rank, size, rows, lazy, &lo, &hi);
        int s1 = dm_record(ref, &d, 0, rows), s2 = dm_record(opt, &d, lo, hi);
        /* Odd steps overlap the statistics exchange (non-blocking) with other work. */
        int s3 = 0;
        if (k % 2) {
            kfac_mpi_request *request = NULL;
            s3 = kfac_mpi_statistics_start(opt, comm, &request);
            double busy = 0;
            MPI_Allreduce(MPI_IN_PLACE, &busy, 1, MPI_DOUBLE, MPI_SUM, MPI_Comm_f2c(comm));
            if (!s3) s3 = kfac_mpi_statistics_finish(opt, request);
        }
        if (!s3) s3 = kfac_mpi_synchronize(opt, comm);
        int s4 = dm_step(ref, &d, rw, rb), s5 = dm_step(opt, &d, w, b);
        if (s1 || s2 || s3 || s4 || s5) {
            printf("rank %d step %d: status %d %d %d %d %d: %s\n", rank, k, s1, s2, s3, s4, s5, kfac_optimizer_last_error(opt));
            failures++;
            break;
        }
        double e = dm_relative_difference(w, b, rw, rb);
        if (e > worst) worst = e;
        MPI_Allreduce(w, lo_w, DM_LAYERS * 64, MPI_DOUBLE, MPI_MIN, MPI_Comm_f2c(comm));
        MPI_Allreduce(w, hi_w, DM_LAYERS * 64, MPI_DOUBLE, MPI_MAX, MPI_Comm_f2c(comm));
        if (memcmp(lo_w, hi_w, sizeof lo_w)) {
            printf("rank %d step %d: the ranks' directions differ\n", rank, k);
            failures++;
        }
    }
    if (worst > 1e-12) {
        printf("rank %d: max relative difference to one process %.3e > 1e-12\n", rank, worst);
        failures++;
    }
    if (rank == 0)
        printf("%s, %s reduce, %d ranks: max relative difference to one process on the union batch %.2e, "
               "directions bit-identical across ranks: %s\n",
               dm_strategy_name(strategy), lazy ? "lazy" : "eager", size, worst,
               failures ? "NO" : "yes");
    kfac_optimizer_free(ref);
    kfac_optimizer_free(opt);
    return failures;
}

/* Block-tridiagonal links (dist_model.h's linked chain): the cross factors travel with the
 * statistics and each linked layer's inverse is one rank's unit; the same checks as run(). */
static int run_linked(int rank, int size, MPI_Fint comm) {
    kfac_optimizer *ref = NULL, *opt = NULL;
    if (lk_create(&ref, 0, 1) || lk_create(&opt, 0, 1) || kfac_mpi_attach(opt, comm)) return 1;
    static double x[LK_LAYERS][LK_ROWS * 8], g[LK_LAYERS][LK_ROWS * 8], gw[LK_LAYERS][32], gb[LK_LAYERS][8];
    static double w[2][LK_LAYERS][32], b[2][LK_LAYERS][8], lo_w[LK_LAYERS][32], hi_w[LK_LAYERS][32];
    uint64_t seed = 41;
    int failures = 0;
    double worst = 0;
    for (int k = 0; k < 7 && !failures; k++) {
        for (int l = 0; l < LK_LAYERS; l++) {
            for (int64_t i = 0; i < LK_ROWS * lk_in[l]; i++) x[l][i] = dm_uniform(&seed);
            for (int64_t i = 0; i < LK_ROWS * lk_out[l]; i++) g[l][i] = 0.5 * dm_uniform(&seed);
            for (int64_t i = 0; i < lk_in[l] * lk_out[l]; i++) gw[l][i] = dm_uniform(&seed);
            for (int64_t i = 0; i < lk_out[l]; i++) gb[l][i] = dm_uniform(&seed);
        }
        int lo, hi, s = 0;
        dm_slice(rank, size, LK_ROWS, 0, &lo, &hi);
        for (int l = 0; l < LK_LAYERS && !s; l++) {
            s = kfac_layer_record_inputs_f64(ref, l, x[l], LK_ROWS) || kfac_layer_record_output_grads_f64(ref, l, g[l], LK_ROWS);
            if (!s && hi > lo)
                s = kfac_layer_record_inputs_f64(opt, l, x[l] + lo * lk_in[l], hi - lo) ||
                    kfac_layer_record_output_grads_f64(opt, l, g[l] + lo * lk_out[l], hi - lo);
        }
        if (!s) s = kfac_mpi_synchronize(opt, comm);
        for (int h = 0; h < 2 && !s; h++) {
            double *wp[LK_LAYERS], *bp[LK_LAYERS];
            for (int l = 0; l < LK_LAYERS; l++) {
                memcpy(w[h][l], gw[l], sizeof gw[l]);
                memcpy(b[h][l], gb[l], sizeof gb[l]);
                wp[l] = w[h][l];
                bp[l] = lk_bias[l] ? b[h][l] : NULL;
            }
            s = kfac_optimizer_step_f64(h ? opt : ref, wp, bp, LK_LAYERS);
        }
        if (s) {
            printf("rank %d step %d (links): status %d: %s\n", rank, k, s, kfac_optimizer_last_error(opt));
            failures++;
            break;
        }
        double diff = 0, scale = 0;
        for (int l = 0; l < LK_LAYERS; l++) {
            for (int64_t i = 0; i < lk_in[l] * lk_out[l]; i++) {
                double e = w[1][l][i] - w[0][l][i], m = w[0][l][i];
                if (e < 0) e = -e;
                if (m < 0) m = -m;
                if (e > diff) diff = e;
                if (m > scale) scale = m;
            }
        }
        if (diff / scale > worst) worst = diff / scale;
        MPI_Allreduce(w[1], lo_w, LK_LAYERS * 32, MPI_DOUBLE, MPI_MIN, MPI_Comm_f2c(comm));
        MPI_Allreduce(w[1], hi_w, LK_LAYERS * 32, MPI_DOUBLE, MPI_MAX, MPI_Comm_f2c(comm));
        if (memcmp(lo_w, hi_w, sizeof lo_w)) {
            printf("rank %d step %d (links): the ranks' directions differ\n", rank, k);
            failures++;
        }
    }
    if (worst > 1e-12) {
        printf("rank %d (links): max relative difference to one process %.3e > 1e-12\n", rank, worst);
        failures++;
    }
    if (rank == 0)
        printf("block-tridiagonal links, eager reduce, %d ranks: max relative difference to one process on the union "
               "batch %.2e, directions bit-identical across ranks: %s\n", size, worst, failures ? "NO" : "yes");
    kfac_optimizer_free(ref);
    kfac_optimizer_free(opt);
    return failures;
}

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    MPI_Fint comm = MPI_Comm_c2f(MPI_COMM_WORLD);
    int failures = 0;
    failures += run(KFAC_INVERSE_EIGEN, KFAC_DISTRIBUTED_REDUCE_EAGER, rank, size, comm);
    failures += run(KFAC_INVERSE_CHOLESKY, KFAC_DISTRIBUTED_REDUCE_EAGER, rank, size, comm);
    failures += run(KFAC_INVERSE_EIGEN, KFAC_DISTRIBUTED_REDUCE_LAZY, rank, size, comm);
    failures += run(KFAC_INVERSE_CHOLESKY, KFAC_DISTRIBUTED_REDUCE_LAZY, rank, size, comm);
    failures += run(KFAC_INVERSE_EKFAC, KFAC_DISTRIBUTED_REDUCE_EAGER, rank, size, comm);
    failures += run_linked(rank, size, comm);
    int total = 0;
    MPI_Allreduce(&failures, &total, 1, MPI_INT, MPI_SUM, MPI_COMM_WORLD);
    if (rank == 0) printf(total ? "test_mpi: FAILED (%d)\n" : "test_mpi: ALL PASSED\n", total);
    MPI_Finalize();
    return total ? 1 : 0;
}
