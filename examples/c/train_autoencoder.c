/*
 * train_autoencoder.c — the deep autoencoder of Martens & Grosse 2015 (after Hinton &
 * Salakhutdinov 2006), scaled to the 8×8 digits, trained with adaptive K-FAC, K-FAC with fixed
 * damping and the KL clip, SGD with momentum and Adam, from the same initial weights and the
 * same mini-batches.
 *
 * Network: 64-128-64-32-8-32-64-128-64, logistic sigmoid hidden units except the 8-unit code
 *          layer, which is linear (as in the paper); the output layer gives logits of
 *          independent sigmoids (Bernoulli cross-entropy against the pixels scaled to [0, 1]),
 *          the loss SUMMED over the 64 outputs and averaged over the batch. Sparse initial
 *          weights (Martens 2010: 15 nonzero N(0, 1) incoming weights per unit, zero biases).
 * Data:    data/digits.bin (pixel / 16); the first 1500 images train, the last 297 are held out.
 *
 * The passes (forward, backward, R-op) are net.c's, the optimizers optim.c's; see
 * examples/c/README.md for the settings and a sample of the output.
 *
 *     make build/train_autoencoder
 *     ./build/train_autoencoder [data/digits.bin [iterations]]
 *     ./build/train_autoencoder --check   checks the passes against finite differences, exits
 */
#include "common.h"
#include "net.h"
#include "optim.h"

#include <string.h>

enum { N_TEST = 297, BATCH = 256, DEFAULT_ITERATIONS = 300, EVAL_EVERY = 10, PRINT_EVERY = 50 };

static const net_t AUTOENCODER = {
    .n_layers = 8,
    .sizes = {64, 128, 64, 32, 8, 32, 64, 128, 64},
    .act = {ACT_SIGMOID, ACT_SIGMOID, ACT_SIGMOID, ACT_LINEAR, ACT_SIGMOID, ACT_SIGMOID,
            ACT_SIGMOID, ACT_LINEAR},
    .loss = LOSS_BERNOULLI_CE,
};

static const uint64_t INIT_SEED = 42;
static const uint64_t SHUFFLE_SEED = 7;
static const uint64_t FISHER_SEED = 2015;
static const uint64_t CHECK_SEED = 2;
static const int SPARSE_CONNECTIONS = 15;

/* Settings. The adaptive run is the paper's algorithm with its schedule (T₁ = 5, T₂ = T₃ = 20):
 * λ starts at 1 and follows Levenberg–Marquardt every 5 steps (ω₁ = 0.95); the factor damping
 * γ starts at λ (the paper starts γ from λ, in this library's units of a Tikhonov damping) and
 * is re-chosen every 20 steps among γ, γ·ω₂, γ/ω₂ (ω₂ = 0.95^20) by the quadratic model; no
 * learning rate, no KL clip, no floor on λ. Its results hardly depend on the starting γ (1, 1e-2
 * and 1e-3 end within 0.1 of each other after 300 steps): the re-choice brings γ to 1e-5–1e-4.
 * The others were tuned once on a small grid at 300 iterations (final training loss): K-FAC
 * λ ∈ {1e-2, 1e-3}, κ ∈ {1e-3, 1e-2, 1e-1} (lr 0.1; with the clip active the step is set by κ,
 * lr 0.1 and 1 give the same run); SGD lr ∈ {0.003, 0.01, 0.02, 0.03, 0.05, 0.1} with momentum
 * 0.9; Adam lr ∈ {0.003, 0.01, 0.03}. */
static const optim_config_t METHODS[] = {
    {.method = OPT_KFAC_ADAPTIVE, .name = "K-FAC adaptive", .damping = 1.0,
     .factor_damping = 1.0, .factor_damping_period = 20, .factor_decay = 0.95,
     .inverse_period = 20, .lm_interval = 5, .lm_decay = 0.95, .fisher_seed = FISHER_SEED},
    {.method = OPT_KFAC, .name = "K-FAC", .kfac_lr = 0.1, .damping = 1e-3, .factor_decay = 0.95,
     .kl_clip = 1e-2, .inverse_period = 20, .fisher_seed = FISHER_SEED},
    {.method = OPT_SGD, .name = "SGD+momentum", .lr = 0.03f, .momentum = 0.9f},
    {.method = OPT_ADAM, .name = "Adam", .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.999f,
     .eps = 1e-8f},
};
enum { N_METHODS = sizeof METHODS / sizeof METHODS[0] };

/* The training-set loss every EVAL_EVERY iterations, with the training seconds up to there. */
typedef struct {
    int points;
    int *iteration;
    double *loss, *seconds;
    double test_loss;
} result_t;

/* The first evaluated iteration (and its seconds) whose training loss is at most `target`;
 * 0 if none. */
static int iterations_to(const result_t *r, double target, double *seconds) {
    for (int i = 0; i < r->points; i++)
        if (r->loss[i] <= target) {
            *seconds = r->seconds[i];
            return r->iteration[i];
        }
    return 0;
}

static result_t train(const optim_config_t *cfg, const params_t *initial, const dataset_t *ds,
                      int iterations) {
    const net_t *net = &AUTOENCODER;
    const int n_train = ds->n - N_TEST, d = ds->d;
    const float *x_test = ds->x + (size_t)n_train * d;

    params_t p = params_alloc(net), grads = params_alloc(net);
    params_copy(net, &p, initial);
    workspace_t ws = workspace_alloc(net, ds->n); /* large enough for whole-set evaluation */
    optimizer_t opt = optimizer_create(net, cfg, BATCH);

    float *xb = xcalloc((size_t)BATCH * d, sizeof(float));
    int *order = xcalloc((size_t)n_train, sizeof(int));
    for (int i = 0; i < n_train; i++) order[i] = i;
    rng_t shuffle = {SHUFFLE_SEED};
    int next = n_train; /* position in the current shuffled order: reshuffle first */
    const targets_t tb = {NULL, xb};              /* the batch is its own target */
    const targets_t t_train = {NULL, ds->x}, t_test = {NULL, x_test};

    printf("\n== %s ==\n", cfg->name);
    printf("%10s %12s %12s\n", "iteration", "train loss", "batch loss");
    result_t res = {0};
    const int max_points = iterations / EVAL_EVERY + 1;
    res.iteration = xcalloc((size_t)max_points, sizeof(int));
    res.loss = xcalloc((size_t)max_points, sizeof(double));
    res.seconds = xcalloc((size_t)max_points, sizeof(double));
    double seconds = 0.0;
    for (int it = 1; it <= iterations; it++) {
        const double t0 = now_seconds(); /* only training is timed, not the evaluation */
        /* Batches of BATCH rows from a shuffled order; a new permutation when fewer than BATCH
         * examples are left (those are dropped), so every batch has BATCH rows. */
        if (next + BATCH > n_train) {
            rng_shuffle(&shuffle, order, n_train);
            next = 0;
        }
        for (int r = 0; r < BATCH; r++)
            memcpy(xb + (size_t)r * d, ds->x + (size_t)order[next + r] * d, (size_t)d * sizeof(float));
        next += BATCH;

        const double loss = net_forward(net, &p, &ws, xb, &tb, BATCH);
        net_output_grad(net, &ws, &tb, BATCH);
        net_backward(net, &p, &ws, BATCH, &grads);
        optimizer_update(&opt, &p, &ws, &grads, xb, &tb, BATCH, loss);
        seconds += now_seconds() - t0;
        if (it % EVAL_EVERY == 0 || it == iterations) {
            const double train_loss = net_forward(net, &p, &ws, ds->x, &t_train, n_train);
            res.iteration[res.points] = it;
            res.loss[res.points] = train_loss;
            res.seconds[res.points++] = seconds;
            if (it % PRINT_EVERY == 0 || it == iterations) {
                char step_info[200];
                optimizer_describe_step(&opt, step_info, sizeof step_info);
                printf("%10d %12.4f %12.4f%s\n", it, train_loss, loss, step_info);
            }
        }
    }
    res.test_loss = net_forward(net, &p, &ws, x_test, &t_test, N_TEST);
    optimizer_check_step_count(&opt, iterations);
    if (cfg->factor_damping_period > 0)
        printf("γ re-chosen on %lld steps, changed on %lld\n", (long long)opt.gamma_steps,
               (long long)opt.gamma_changes);

    free(order);
    free(xb);
    optimizer_free(&opt);
    workspace_free(net, &ws);
    params_free(net, &grads);
    params_free(net, &p);
    return res;
}

int main(int argc, char **argv) {
    const net_t *net = &AUTOENCODER;
    net_validate(net);
    if (argc > 1 && strcmp(argv[1], "--check") == 0) return net_check(net, CHECK_SEED);
    const char *path = argc > 1 ? argv[1] : "data/digits.bin";
    const int iterations = argc > 2 ? atoi(argv[2]) : DEFAULT_ITERATIONS;
    if (iterations < 1) {
        fprintf(stderr, "usage: %s [digits.bin [iterations >= 1]] | --check\n", argv[0]);
        return 2;
    }
    check_library_version();

    dataset_t ds = load_digits(path, N_TEST + BATCH);
    char name[256];
    net_describe(net, name, sizeof name);
    printf("libkfac %s; %d images (%d train, %d held out), autoencoder %s,\n"
           "Bernoulli cross-entropy summed over pixels, batch %d, %d iterations\n",
           kfac_version_string(), ds.n, ds.n - N_TEST, N_TEST, name, BATCH, iterations);

    params_t initial = params_alloc(net);
    params_init_sparse(net, &initial, INIT_SEED, SPARSE_CONNECTIONS, 1.0);

    result_t results[N_METHODS];
    for (int m = 0; m < N_METHODS; m++) results[m] = train(&METHODS[m], &initial, &ds, iterations);

    /* L*: SGD-momentum's final training loss; who reaches it when (evaluated every
     * EVAL_EVERY iterations; seconds are training time only). */
    int reference = 0;
    while (reference < N_METHODS && METHODS[reference].method != OPT_SGD) reference++;
    const double target = results[reference].loss[results[reference].points - 1];
    printf("\n== summary after %d iterations (same initial weights and batches) ==\n", iterations);
    printf("%-14s %11s %10s %9s %8s   %s\n", "optimizer", "train loss", "held-out", "time",
           "ms/iter", "iterations (seconds) to SGD+momentum's final train loss");
    for (int m = 0; m < N_METHODS; m++) {
        const result_t *r = &results[m];
        double to_seconds = 0.0;
        const int to = iterations_to(r, target, &to_seconds);
        printf("%-14s %11.4f %10.4f %8.2fs %8.2f   ", METHODS[m].name, r->loss[r->points - 1],
               r->test_loss, r->seconds[r->points - 1],
               1e3 * r->seconds[r->points - 1] / iterations);
        if (to > 0) printf("%d (%.2fs)\n", to, to_seconds);
        else printf("not reached\n");
    }
    for (int m = 0; m < N_METHODS; m++) {
        free(results[m].iteration);
        free(results[m].loss);
        free(results[m].seconds);
    }

    params_free(net, &initial);
    dataset_free(&ds);
    return 0;
}
