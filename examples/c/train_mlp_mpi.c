/*
 * train_mlp_mpi.c — data-parallel K-FAC with Open MPI (libkfac_mpi): train_mlp's network on the
 * digits, each mini-batch of 128 split over the ranks (uneven slices when 128 is not a multiple
 * of the rank count), as one process would train on the whole batch.
 *
 * Per step every rank: forward and backward on its slice; records its slice's K-FAC statistics
 * (the empirical Fisher: output gradients at the data's labels); scales its gradient of the slice's
 * mean loss by slice/batch rows and MPI_Allreduce-s it (the gradient of the batch's mean loss);
 * kfac_mpi_synchronize (the batch's statistics, then the inverses, each block inverted by one
 * rank); kfac_optimizer_step_f32; W -= 0.1 · direction. Rank 0 also feeds a second, single-process
 * handle the whole batch's statistics and the same gradient and prints how far the distributed
 * directions are from it; every rank's parameters are checked to stay bit-identical.
 *
 *     make build/train_mlp_mpi
 *     mpirun -np 4 ./build/train_mlp_mpi [data/digits.bin [epochs]]
 *     (as root: mpirun --allow-run-as-root --oversubscribe -np 4 …)
 * Exits non-zero if the ranks' parameters differ or the directions are further than 1e-2
 * (relative, float32) from the single process's.
 */
#include "common.h"
#include "net.h"

#include <kfac_mpi.h>
#include <math.h>
#include <string.h>

enum { N_TEST = 297, BATCH = 128, DEFAULT_EPOCHS = 10 };

static const net_t MLP = {
    .n_layers = 3,
    .sizes = {64, 128, 64, 10},
    .act = {ACT_TANH, ACT_TANH, ACT_LINEAR},
    .loss = LOSS_SOFTMAX_CE,
};

static kfac_optimizer *make_kfac(void) {
    kfac_optimizer *k = NULL;
    if (kfac_optimizer_create(KFAC_FLOAT32, &k) != KFAC_OK) exit(1);
    for (int l = 0; l < MLP.n_layers; l++) {
        const kfac_dense_desc desc = {.struct_size = sizeof desc, .in_features = MLP.sizes[l],
                                      .out_features = MLP.sizes[l + 1], .has_bias = 1};
        int32_t id;
        KFAC_CHECK(k, kfac_layer_add_dense(k, &desc, &id));
    }
    KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_LOSS_REDUCTION, KFAC_REDUCTION_MEAN));
    KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 10));
    KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_NUM_THREADS, 1));
    KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_LEARNING_RATE, 0.1));
    return k;
}

static void record(kfac_optimizer *k, const workspace_t *ws, int rows) {
    if (rows == 0) return;
    for (int l = 0; l < MLP.n_layers; l++) {
        KFAC_CHECK(k, kfac_layer_record_inputs_f32(k, l, ws->act[l], rows));
        KFAC_CHECK(k, kfac_layer_record_output_grads_f32(k, l, ws->dz[l], rows));
    }
}

static size_t layer_weights(int l) { return (size_t)MLP.sizes[l] * MLP.sizes[l + 1]; }

int main(int argc, char **argv) {
    MPI_Init(&argc, &argv);
    int rank = 0, size = 1;
    MPI_Comm_rank(MPI_COMM_WORLD, &rank);
    MPI_Comm_size(MPI_COMM_WORLD, &size);
    const MPI_Fint comm = MPI_Comm_c2f(MPI_COMM_WORLD);
    const char *path = argc > 1 ? argv[1] : "data/digits.bin";
    const int epochs = argc > 2 ? atoi(argv[2]) : DEFAULT_EPOCHS;
    dataset_t ds = load_digits(path, N_TEST + 1);
    const int n_train = ds.n - N_TEST, d = ds.d;

    params_t p = params_alloc(&MLP), grads = params_alloc(&MLP), ref_dir = params_alloc(&MLP);
    params_init_glorot(&MLP, &p, 42);
    workspace_t ws = workspace_alloc(&MLP, ds.n), whole = workspace_alloc(&MLP, BATCH);
    kfac_optimizer *k = make_kfac(), *reference = rank == 0 ? make_kfac() : NULL;
    KFAC_CHECK(k, kfac_mpi_attach(k, comm));

    float *xb = xcalloc((size_t)BATCH * d, sizeof(float));
    uint8_t *yb = xcalloc(BATCH, 1);
    int *order = xcalloc((size_t)n_train, sizeof(int));
    for (int i = 0; i < n_train; i++) order[i] = i;
    rng_t shuffle = {7};
    double worst = 0;
    int64_t steps = 0;
    if (rank == 0)
        printf("libkfac %s, libkfac_mpi: %d ranks, MLP 64-128-64-10, batch %d split over the ranks, %d epochs\n",
               kfac_version_string(), size, BATCH, epochs);
    for (int epoch = 1; epoch <= epochs; epoch++) {
        rng_shuffle(&shuffle, order, n_train);
        double epoch_loss = 0;
        int batches = 0;
        for (int start = 0; start < n_train; start += BATCH, batches++, steps++) {
            const int rows = n_train - start < BATCH ? n_train - start : BATCH;
            for (int r = 0; r < rows; r++) {
                memcpy(xb + (size_t)r * d, ds.x + (size_t)order[start + r] * d, (size_t)d * sizeof(float));
                yb[r] = ds.y[order[start + r]];
            }
            const int lo = rows * rank / size, hi = rows * (rank + 1) / size, local = hi - lo;
            const targets_t mine = {yb + lo, NULL}, all = {yb, NULL};
            /* This rank's slice: its mean loss's gradient, weighted by its share of the batch. */
            params_zero(&MLP, &grads);
            double loss = 0;
            if (local > 0) {
                loss = net_forward(&MLP, &p, &ws, xb + (size_t)lo * d, &mine, local) * local / rows;
                net_output_grad(&MLP, &ws, &mine, local);
                net_backward(&MLP, &p, &ws, local, &grads);
                for (int l = 0; l < MLP.n_layers; l++) {
                    for (size_t i = 0; i < layer_weights(l); i++) grads.W[l][i] *= (float)local / rows;
                    for (int i = 0; i < MLP.sizes[l + 1]; i++) grads.b[l][i] *= (float)local / rows;
                }
            }
            int32_t wanted = 0;
            KFAC_CHECK(k, kfac_optimizer_wants_statistics(k, &wanted));
            if (wanted) record(k, &ws, local);
            for (int l = 0; l < MLP.n_layers; l++) {
                MPI_Allreduce(MPI_IN_PLACE, grads.W[l], (int)layer_weights(l), MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
                MPI_Allreduce(MPI_IN_PLACE, grads.b[l], MLP.sizes[l + 1], MPI_FLOAT, MPI_SUM, MPI_COMM_WORLD);
            }
            MPI_Allreduce(MPI_IN_PLACE, &loss, 1, MPI_DOUBLE, MPI_SUM, MPI_COMM_WORLD);
            epoch_loss += loss;
            if (reference) {  /* the whole batch in one handle, the same gradient and parameters */
                net_forward(&MLP, &p, &whole, xb, &all, rows);
                net_output_grad(&MLP, &whole, &all, rows);
                net_backward(&MLP, &p, &whole, rows, NULL);
                int32_t w2 = 0;
                KFAC_CHECK(reference, kfac_optimizer_wants_statistics(reference, &w2));
                if (w2) record(reference, &whole, rows);
                params_copy(&MLP, &ref_dir, &grads);
                KFAC_CHECK(reference, kfac_optimizer_step_f32(reference, ref_dir.W, ref_dir.b, MLP.n_layers));
            }
            KFAC_CHECK(k, kfac_mpi_synchronize(k, comm));
            KFAC_CHECK(k, kfac_optimizer_step_f32(k, grads.W, grads.b, MLP.n_layers));
            if (reference) {
                double diff = 0, scale = 0;
                for (int l = 0; l < MLP.n_layers; l++)
                    for (size_t i = 0; i < layer_weights(l); i++) {
                        diff = fmax(diff, fabs((double)grads.W[l][i] - ref_dir.W[l][i]));
                        scale = fmax(scale, fabs((double)ref_dir.W[l][i]));
                    }
                worst = fmax(worst, diff / scale);
            }
            params_axpy(&MLP, -0.1f, &grads, &p);
        }
        if (rank == 0) printf("epoch %3d  steps %5lld  train loss (batch means) %.5f\n", epoch, (long long)steps,
                              epoch_loss / batches);
    }
    /* Every rank must hold the same parameters: compare MIN and MAX over the ranks. */
    int differ = 0;
    for (int l = 0; l < MLP.n_layers; l++) {
        const int n = (int)layer_weights(l);
        float *lo = xcalloc((size_t)n, sizeof(float)), *hi = xcalloc((size_t)n, sizeof(float));
        MPI_Allreduce(p.W[l], lo, n, MPI_FLOAT, MPI_MIN, MPI_COMM_WORLD);
        MPI_Allreduce(p.W[l], hi, n, MPI_FLOAT, MPI_MAX, MPI_COMM_WORLD);
        differ |= memcmp(lo, hi, (size_t)n * sizeof(float)) != 0;
        free(lo);
        free(hi);
    }
    int failed = 0;
    if (rank == 0) {
        const targets_t test = {ds.y + n_train, NULL};
        const double test_loss = net_forward(&MLP, &p, &ws, ds.x + (size_t)n_train * d, &test, N_TEST);
        printf("test loss %.5f; parameters identical on all ranks: %s; directions against one process on the "
               "whole batch: max relative difference %.2e\n", test_loss, differ ? "NO" : "yes", worst);
        failed = differ || !(worst <= 1e-2);
    }
    MPI_Bcast(&failed, 1, MPI_INT, 0, MPI_COMM_WORLD);
    free(order);
    free(yb);
    free(xb);
    kfac_optimizer_free(k);
    if (reference) kfac_optimizer_free(reference);
    workspace_free(&MLP, &whole);
    workspace_free(&MLP, &ws);
    params_free(&MLP, &ref_dir);
    params_free(&MLP, &grads);
    params_free(&MLP, &p);
    dataset_free(&ds);
    MPI_Finalize();
    return failed;
}
