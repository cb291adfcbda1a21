/*
 * train_mlp.c — train a small MLP on the 8×8 handwritten digits with K-FAC (libkfac), SGD with
 * momentum, Adam and adaptive K-FAC, from the same initial weights and the same mini-batches,
 * and compare.
 *
 * The program does its own forward, backward and forward-mode (R-op) passes with CBLAS (sgemm,
 * net.c) and hands libkfac, per dense layer, the layer inputs and the gradients at the layer
 * outputs; libkfac returns preconditioned directions that the program applies (optim.c).
 *
 * Network: 64 → 128 (tanh) → 64 (tanh) → 10 (softmax cross-entropy), biases on every layer,
 *          Glorot-uniform initial weights.
 * Data:    data/digits.bin (see data/README.md); the first 1500 examples train, the last 297 test.
 *
 * Build and run (from the repository root; see examples/c/README.md):
 *     make build/train_mlp
 *     ./build/train_mlp [data/digits.bin [epochs]]
 *     ./build/train_mlp --check      checks the passes against finite differences, then exits
 *
 * The four runs (optim.h has the details):
 *   K-FAC           eigen strategy, λ 1e-3, inverses every 10 steps, KL clip 1e-3,
 *                   W -= 0.1 · direction; Fisher statistics from targets the program samples;
 *   SGD+momentum    lr 0.1, momentum 0.9;
 *   Adam            lr 3e-3;
 *   K-FAC adaptive  α, μ from the quadratic model with the exact softmax Fisher, λ from 1e-2 by
 *                   Levenberg–Marquardt every 5 steps (ω₁ = 0.95), kept >= 1e-4 (see below).
 */
#include "common.h"
#include "net.h"
#include "optim.h"

#include <string.h>

enum { N_TEST = 297, BATCH = 128, DEFAULT_EPOCHS = 30, PRINT_EVERY = 5 };

static const net_t MLP = {
    .n_layers = 3,
    .sizes = {64, 128, 64, 10},
    .act = {ACT_TANH, ACT_TANH, ACT_LINEAR},
    .loss = LOSS_SOFTMAX_CE,
};

static const uint64_t INIT_SEED = 42;     /* initial weights (shared by all runs) */
static const uint64_t SHUFFLE_SEED = 7;   /* mini-batch order (same for all runs) */
static const uint64_t FISHER_SEED = 2015; /* sampled targets for K-FAC's Fisher statistics */
static const uint64_t CHECK_SEED = 1;     /* --check */

/* The adaptive run uses one λ both in the quadratic model and in the factors' inverses
 * (KFAC_PARAM_FACTOR_DAMPING 0). ρ of the batch's own loss is above 3/4 at nearly every step
 * here, so without a floor λ decays geometrically (to ~1e-10 in 30 epochs), the inverses lose
 * their damping and the directions grow until α ~ 1e-4 and training degrades (train loss 0.001
 * instead of 0.00003): the program keeps λ >= 1e-4. */
static const optim_config_t METHODS[] = {
    {.method = OPT_KFAC, .name = "K-FAC", .kfac_lr = 0.1, .damping = 1e-3, .factor_decay = 0.95,
     .kl_clip = 1e-3, .inverse_period = 10, .fisher_seed = FISHER_SEED},
    {.method = OPT_SGD, .name = "SGD+momentum", .lr = 0.1f, .momentum = 0.9f},
    {.method = OPT_ADAM, .name = "Adam", .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.999f,
     .eps = 1e-8f},
    {.method = OPT_KFAC_ADAPTIVE, .name = "K-FAC adaptive", .damping = 1e-2,
     .factor_decay = 0.95, .inverse_period = 10, .fisher_seed = FISHER_SEED, .lm_interval = 5,
     .lm_decay = 0.95, .min_damping = 1e-4},
};
enum { N_METHODS = sizeof METHODS / sizeof METHODS[0] };

/* Mean loss and accuracy (in %) over rows [0, rows) of x/y, in one forward pass. */
static void evaluate(const params_t *p, workspace_t *ws, const float *x, const uint8_t *y,
                     int rows, double *loss, double *accuracy) {
    const targets_t t = {y, NULL};
    *loss = net_forward(&MLP, p, ws, x, &t, rows);
    const int classes = net_outputs(&MLP);
    int correct = 0;
    for (int r = 0; r < rows; r++) {
        const float *pr = ws->probs + (size_t)r * classes;
        int best = 0;
        for (int c = 1; c < classes; c++)
            if (pr[c] > pr[best]) best = c;
        correct += best == y[r];
    }
    *accuracy = 100.0 * correct / rows;
}

typedef struct {
    double train_loss, train_acc, test_loss, test_acc, seconds;
} result_t;

static result_t train(const optim_config_t *cfg, const params_t *initial, const dataset_t *ds,
                      int epochs) {
    const int n_train = ds->n - N_TEST, d = ds->d;
    const float *x_test = ds->x + (size_t)n_train * d;
    const uint8_t *y_test = ds->y + n_train;

    params_t p = params_alloc(&MLP), grads = params_alloc(&MLP);
    params_copy(&MLP, &p, initial);
    workspace_t ws = workspace_alloc(&MLP, ds->n); /* large enough for whole-set evaluation */
    optimizer_t opt = optimizer_create(&MLP, cfg, BATCH);

    /* Mini-batch buffers and the shuffled order (same seed for every method). */
    float *xb = xcalloc((size_t)BATCH * d, sizeof(float));
    uint8_t *yb = xcalloc(BATCH, 1);
    int *order = xcalloc((size_t)n_train, sizeof(int));
    for (int i = 0; i < n_train; i++) order[i] = i;
    rng_t shuffle = {SHUFFLE_SEED};
    const targets_t tb = {yb, NULL};

    printf("\n== %s ==\n", cfg->name);
    printf("%6s %8s %12s %10s %10s\n", "epoch", "steps", "train loss", "train acc", "test acc");
    result_t res = {0};
    int64_t steps = 0;
    for (int epoch = 1; epoch <= epochs; epoch++) {
        const double t0 = now_seconds(); /* only training is timed, not the evaluation */
        rng_shuffle(&shuffle, order, n_train);
        /* Every batch has BATCH rows except possibly the last one of the epoch. */
        for (int start = 0; start < n_train; start += BATCH) {
            const int rows = n_train - start < BATCH ? n_train - start : BATCH;
            for (int r = 0; r < rows; r++) {
                memcpy(xb + (size_t)r * d, ds->x + (size_t)order[start + r] * d,
                       (size_t)d * sizeof(float));
                yb[r] = ds->y[order[start + r]];
            }
            const double loss = net_forward(&MLP, &p, &ws, xb, &tb, rows);
            net_output_grad(&MLP, &ws, &tb, rows);
            net_backward(&MLP, &p, &ws, rows, &grads);
            optimizer_update(&opt, &p, &ws, &grads, xb, &tb, rows, loss);
            steps++;
        }
        res.seconds += now_seconds() - t0;
        if (epoch % PRINT_EVERY == 0 || epoch == epochs) {
            evaluate(&p, &ws, ds->x, ds->y, n_train, &res.train_loss, &res.train_acc);
            evaluate(&p, &ws, x_test, y_test, N_TEST, &res.test_loss, &res.test_acc);
            char step_info[160];
            optimizer_describe_step(&opt, step_info, sizeof step_info);
            printf("%6d %8lld %12.5f %9.2f%% %9.2f%%%s\n", epoch, (long long)steps, res.train_loss,
                   res.train_acc, res.test_acc, step_info);
        }
    }
    optimizer_check_step_count(&opt, steps);

    free(order);
    free(yb);
    free(xb);
    optimizer_free(&opt);
    workspace_free(&MLP, &ws);
    params_free(&MLP, &grads);
    params_free(&MLP, &p);
    return res;
}

int main(int argc, char **argv) {
    net_validate(&MLP);
    if (argc > 1 && strcmp(argv[1], "--check") == 0) return net_check(&MLP, CHECK_SEED);
    const char *path = argc > 1 ? argv[1] : "data/digits.bin";
    const int epochs = argc > 2 ? atoi(argv[2]) : DEFAULT_EPOCHS;
    if (epochs < 1) {
        fprintf(stderr, "usage: %s [digits.bin [epochs >= 1]] | --check\n", argv[0]);
        return 2;
    }
    check_library_version();

    dataset_t ds = load_digits(path, N_TEST + 1);
    printf("libkfac %s; %d examples (%d train, %d test), MLP 64-128-64-10, batch %d, "
           "%d epochs\n", kfac_version_string(), ds.n, ds.n - N_TEST, N_TEST, BATCH, epochs);

    params_t initial = params_alloc(&MLP);
    params_init_glorot(&MLP, &initial, INIT_SEED);

    result_t results[N_METHODS];
    for (int m = 0; m < N_METHODS; m++) results[m] = train(&METHODS[m], &initial, &ds, epochs);

    printf("\n== summary after %d epochs (same initial weights and batches) ==\n", epochs);
    printf("%-14s %12s %10s %10s %9s\n", "optimizer", "train loss", "train acc", "test acc",
           "time");
    for (int m = 0; m < N_METHODS; m++)
        printf("%-14s %12.5f %9.2f%% %9.2f%% %8.2fs\n", METHODS[m].name, results[m].train_loss,
               results[m].train_acc, results[m].test_acc, results[m].seconds);

    params_free(&MLP, &initial);
    dataset_free(&ds);
    return 0;
}
