/*
 * train_newton_cg.c — subsampled Newton-CG with Levenberg–Marquardt damping (Martens 2010;
 * simpleNN) on the 8×8 digits MLP of train_mlp.c, with libkfac's reverse-communication conjugate
 * gradient (experimental kfac_cg_*), three preconditioners from the same initial weights:
 *   none       M = I;
 *   diagonal   M = (d + λ)^0.75, d the mean squared per-example gradient of the curvature batch;
 *   K-FAC      the K-FAC inverses of the handle (statistics from targets sampled from the model on
 *              the curvature batch, eigen strategy, damped by the same λ).
 *
 * Each Newton iteration (simpleNN's loop):
 *   1. the mean loss h and its gradient g on the whole training set (1500 examples);
 *   2. a curvature batch of 5% (75 examples), a new slice of a shuffled order each iteration;
 *   3. CG on (G + λI) s = −g, stopping at ‖r‖ ≤ 0.1‖g‖ (at most 250 iterations), G·v by the
 *      program: the R-op (J·v at the curvature batch's forward pass, net.c), the softmax
 *      cross-entropy Hessian per example (diag(p) − ppᵀ)/rows, then the backward pass (Jᵀ·u);
 *   4. Armijo backtracking: α = 1, ½, … until h(θ + αs) − h(θ) ≤ 1e-4·α·gᵀs;
 *   5. kfac_cg_report_loss_change(α, h before, h after): ρ against the CG model without λ, and
 *      λ ← 3/2·λ if ρ < 1/4, 2/3·λ if ρ > 3/4 (KFAC_PARAM_LM_DECAY 2/3, LM_INTERVAL 1), λ₀ = 1.
 *
 * Build and run (from the repository root):
 *     make build/train_newton_cg
 *     ./build/train_newton_cg [data/digits.bin [iterations]]     default 40 Newton iterations
 *     ./build/train_newton_cg --check
 * --check: the network's passes against double-precision finite differences (net_check.c), then
 * the Gauss-Newton product G·v against Jᵀ H (J v) with J v by central differences of the logits
 * (Richardson-extrapolated, ε = 1e-2 and 5e-3)
 * and H = diag(p) − ppᵀ written out as a matrix, its symmetry wᵀGv = vᵀGw, and the C product-
 * function wrapper kfac_cg_solve_f32 against the reverse-communication loop (bitwise).
 */
#define KFAC_EXPERIMENTAL_API
#include "common.h"
#include "net.h"

#include <cblas.h>
#include <math.h>
#include <string.h>

enum { N_TEST = 297, DEFAULT_ITERATIONS = 40, CURVATURE_PERCENT = 5, PRINT_EVERY = 5, MAX_HALVINGS = 20 };

static const net_t MLP = {
    .n_layers = 3,
    .sizes = {64, 128, 64, 10},
    .act = {ACT_TANH, ACT_TANH, ACT_LINEAR},
    .loss = LOSS_SOFTMAX_CE,
};

static const uint64_t INIT_SEED = 42, SUBSAMPLE_SEED = 7, FISHER_SEED = 2015, CHECK_SEED = 1;

typedef struct {
    const char *name;
    int32_t preconditioner; /* kfac_cg_preconditioner */
} method_t;

static const method_t METHODS[] = {
    {"Newton-CG", KFAC_CG_PRECONDITIONER_NONE},
    {"Newton-CG diag", KFAC_CG_PRECONDITIONER_DIAGONAL},
    {"Newton-CG K-FAC", KFAC_CG_PRECONDITIONER_KFAC},
};
enum { N_METHODS = sizeof METHODS / sizeof METHODS[0] };

/* The Gauss-Newton product on a curvature batch whose forward pass is in ws (at params p). */
typedef struct {
    const net_t *net;
    const params_t *p;
    workspace_t *ws;
    rop_buffers_t rop;
    int rows;
    int products;
} gn_t;

/* out ← G v = (1/rows) Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n v. */
static void gn_product(gn_t *g, const params_t *v, params_t *out) {
    const net_t *net = g->net;
    const int L = net->n_layers, k = net_outputs(net);
    net_r_op(net, g->p, g->ws, v, g->rows, g->rop.r);
    const float *jv = g->rop.r[L - 1];
    float *dz = g->ws->dz[L - 1];
    for (int r = 0; r < g->rows; r++) {
        const float *pr = g->ws->probs + (size_t)r * k, *q = jv + (size_t)r * k;
        float s = 0.0f;
        for (int c = 0; c < k; c++) s += pr[c] * q[c];
        for (int c = 0; c < k; c++) dz[(size_t)r * k + c] = pr[c] * (q[c] - s) / (float)g->rows;
    }
    net_backward(net, g->p, g->ws, g->rows, out);
    g->products++;
}

/* The product function of kfac_cg_solve_f32 (the C convenience wrapper). */
static int gn_callback(void *user, const float *const *vw, const float *const *vb, float *const *pw,
                       float *const *pb, int32_t n_layers) {
    gn_t *g = user;
    params_t v, out;
    for (int l = 0; l < n_layers; l++) {
        v.W[l] = (float *)vw[l];
        v.b[l] = (float *)vb[l];
        out.W[l] = pw[l];
        out.b[l] = pb[l];
    }
    gn_product(g, &v, &out);
    return 0;
}

static kfac_optimizer *make_handle(const net_t *net) {
    kfac_optimizer *h = NULL;
    KFAC_CHECK(h, kfac_optimizer_create(KFAC_FLOAT32, &h));
    for (int l = 0; l < net->n_layers; l++) {
        kfac_dense_desc d = {.struct_size = sizeof d, .in_features = net->sizes[l], .out_features = net->sizes[l + 1],
                             .has_bias = 1};
        int32_t id;
        KFAC_CHECK(h, kfac_layer_add_dense(h, &d, &id));
    }
    KFAC_CHECK(h, kfac_param_set_double(h, KFAC_PARAM_DAMPING, 1.0));
    KFAC_CHECK(h, kfac_param_set_double(h, KFAC_PARAM_LM_DECAY, 2.0 / 3.0));
    KFAC_CHECK(h, kfac_param_set_int(h, KFAC_PARAM_LM_INTERVAL, 1));
    KFAC_CHECK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EIGEN));
    KFAC_CHECK(h, kfac_param_set_int(h, KFAC_PARAM_LOSS_REDUCTION, KFAC_REDUCTION_MEAN));
    KFAC_CHECK(h, kfac_param_set_int(h, KFAC_PARAM_FACTOR_UPDATE_PERIOD, 0));
    KFAC_CHECK(h, kfac_param_set_int(h, KFAC_PARAM_INVERSE_UPDATE_PERIOD, 0));
    return h;
}

static double accuracy(const net_t *net, const params_t *p, workspace_t *ws, const float *x, const uint8_t *y,
                       int rows) {
    const targets_t t = {y, NULL};
    net_forward(net, p, ws, x, &t, rows);
    const int k = net_outputs(net);
    int correct = 0;
    for (int r = 0; r < rows; r++) {
        int best = 0;
        for (int c = 1; c < k; c++)
            if (ws->probs[(size_t)r * k + c] > ws->probs[(size_t)r * k + best]) best = c;
        correct += best == y[r];
    }
    return 100.0 * correct / rows;
}

static double dotp(const net_t *net, const params_t *a, const params_t *b) {
    double s = 0;
    for (int l = 0; l < net->n_layers; l++) {
        const int in = net->sizes[l], out = net->sizes[l + 1];
        for (int i = 0; i < in * out; i++) s += (double)a->W[l][i] * b->W[l][i];
        for (int i = 0; i < out; i++) s += (double)a->b[l][i] * b->b[l][i];
    }
    return s;
}

typedef struct {
    double train_loss, test_acc, seconds, mean_cg, final_damping;
    long cg_total, products;
} result_t;

static result_t train(const method_t *m, const params_t *initial, const dataset_t *ds, int iterations) {
    const net_t *net = &MLP;
    const int n_train = ds->n - N_TEST, d = ds->d, L = net->n_layers;
    const int S = n_train * CURVATURE_PERCENT / 100;
    params_t p = params_alloc(net), grad = params_alloc(net), step = params_alloc(net), v = params_alloc(net),
             gv = params_alloc(net), trial = params_alloc(net), diag = params_alloc(net), g1 = params_alloc(net);
    workspace_t ws = workspace_alloc(net, ds->n), wc = workspace_alloc(net, S), w1 = workspace_alloc(net, 1);
    gn_t gn = {net, &p, &wc, rop_alloc(net, S), S, 0};
    params_copy(net, &p, initial);
    kfac_optimizer *h = make_handle(net);
    float *xc = xcalloc((size_t)S * d, sizeof(float));
    uint8_t *yc = xcalloc((size_t)S, 1), *sampled = xcalloc((size_t)S, 1);
    int *order = xcalloc((size_t)n_train, sizeof(int));
    for (int i = 0; i < n_train; i++) order[i] = i;
    rng_t subsample = {SUBSAMPLE_SEED}, fisher = {FISHER_SEED};
    const targets_t train_t = {ds->y, NULL}, curv_t = {yc, NULL}, sampled_t = {sampled, NULL};
    const int slices = n_train / S;

    printf("\n== %s ==\n%6s %12s %9s %10s %6s %8s %9s\n", m->name, "iter", "train loss", "test acc", "lambda",
           "CG", "alpha", "rho");
    result_t res = {0};
    double t0 = now_seconds();
    for (int it = 1; it <= iterations; it++) {
        /* 1. Loss and gradient on the whole training set. */
        const double loss = net_forward(net, &p, &ws, ds->x, &train_t, n_train);
        net_output_grad(net, &ws, &train_t, n_train);
        net_backward(net, &p, &ws, n_train, &grad);
        /* 2. The curvature batch: the next slice of a shuffled order. */
        const int slice = (it - 1) % slices;
        if (slice == 0) rng_shuffle(&subsample, order, n_train);
        for (int r = 0; r < S; r++) {
            const int e = order[slice * S + r];
            memcpy(xc + (size_t)r * d, ds->x + (size_t)e * d, (size_t)d * sizeof(float));
            yc[r] = ds->y[e];
        }
        net_forward(net, &p, &wc, xc, &curv_t, S);
        if (m->preconditioner == KFAC_CG_PRECONDITIONER_KFAC) {
            /* K-FAC statistics from targets sampled from the model on the curvature batch. */
            net_sample_targets(net, &wc, S, &fisher, sampled, NULL);
            net_output_grad(net, &wc, &sampled_t, S);
            net_backward(net, &p, &wc, S, NULL);
            for (int l = 0; l < L; l++) {
                KFAC_CHECK(h, kfac_layer_record_inputs_f32(h, l, wc.act[l], S));
                KFAC_CHECK(h, kfac_layer_record_output_grads_f32(h, l, wc.dz[l], S));
            }
            KFAC_CHECK(h, kfac_optimizer_update_factors(h));
            KFAC_CHECK(h, kfac_optimizer_update_inverses(h));
        }
        const float *const *diag_w = NULL, *const *diag_b = NULL;
        if (m->preconditioner == KFAC_CG_PRECONDITIONER_DIAGONAL) {
            /* d = mean over the curvature batch of the squared per-example gradients. */
            params_zero(net, &diag);
            for (int r = 0; r < S; r++) {
                const targets_t one = {yc + r, NULL};
                net_forward(net, &p, &w1, xc + (size_t)r * d, &one, 1);
                net_output_grad(net, &w1, &one, 1);
                net_backward(net, &p, &w1, 1, &g1);
                for (int l = 0; l < L; l++) {
                    const int in = net->sizes[l], out = net->sizes[l + 1];
                    for (int i = 0; i < in * out; i++) diag.W[l][i] += g1.W[l][i] * g1.W[l][i] / (float)S;
                    for (int i = 0; i < out; i++) diag.b[l][i] += g1.b[l][i] * g1.b[l][i] / (float)S;
                }
            }
            diag_w = (const float *const *)diag.W;
            diag_b = (const float *const *)diag.b;
        }
        /* 3. CG by reverse communication: the library asks for G·v, the program computes it. */
        kfac_cg_desc desc = {.struct_size = sizeof desc, .preconditioner = m->preconditioner};
        int32_t request = 0;
        KFAC_CHECK(h, kfac_cg_begin_f32(h, &desc, (const float *const *)grad.W, (const float *const *)grad.b, diag_w,
                                        diag_b, L, &request));
        while (request == KFAC_CG_NEED_PRODUCT) {
            KFAC_CHECK(h, kfac_cg_get_vector_f32(h, v.W, v.b, L));
            gn_product(&gn, &v, &gv);
            KFAC_CHECK(h, kfac_cg_supply_product_f32(h, (const float *const *)gv.W, (const float *const *)gv.b, L,
                                                     &request));
        }
        kfac_cg_result cg = {.struct_size = sizeof cg};
        KFAC_CHECK(h, kfac_cg_finish_f32(h, step.W, step.b, L, &cg));
        /* 4. Armijo backtracking on the step. */
        double alpha = 1.0, after = 0.0;
        for (int halving = 0;; halving++) {
            params_copy(net, &trial, &p);
            params_axpy(net, (float)alpha, &step, &trial);
            after = net_forward(net, &trial, &ws, ds->x, &train_t, n_train);
            if (after - loss <= 1e-4 * alpha * cg.grad_dot_step || halving == MAX_HALVINGS) break;
            alpha *= 0.5;
        }
        params_copy(net, &p, &trial);
        /* 5. ρ against the model without λ; the Levenberg–Marquardt update of λ. */
        double rho = 0, lambda = 0;
        KFAC_CHECK(h, kfac_cg_report_loss_change(h, alpha, loss, after, &rho));
        KFAC_CHECK(h, kfac_param_get_double(h, KFAC_PARAM_DAMPING, &lambda));
        res.cg_total += cg.iterations;
        if (it % PRINT_EVERY == 0 || it == iterations || it == 1) {
            const double elapsed = now_seconds() - t0;
            const double acc = accuracy(net, &p, &ws, ds->x + (size_t)n_train * d, ds->y + n_train, N_TEST);
            printf("%6d %12.5f %8.2f%% %10.3g %6d %8.4f %9.3f\n", it, after, acc, lambda, cg.iterations, alpha, rho);
            t0 = now_seconds() - elapsed; /* evaluation is not timed */
            res.test_acc = acc;
        }
        res.train_loss = after;
        res.final_damping = lambda;
    }
    res.seconds = now_seconds() - t0;
    res.mean_cg = (double)res.cg_total / iterations;
    res.products = gn.products;
    kfac_optimizer_free(h);
    free(order);
    free(sampled);
    free(yc);
    free(xc);
    rop_free(net, &gn.rop);
    workspace_free(net, &w1);
    workspace_free(net, &wc);
    workspace_free(net, &ws);
    params_t *all[] = {&p, &grad, &step, &v, &gv, &trial, &diag, &g1};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) params_free(net, all[i]);
    return res;
}

/* --check: the Gauss-Newton product against Jᵀ H (J v) with finite-difference J v and H written
 * out, its symmetry, and kfac_cg_solve_f32 against the reverse-communication loop. */
static int check_products(void) {
    const net_t *net = &MLP;
    enum { ROWS = 6 };
    const int L = net->n_layers, k = net_outputs(net), d = net_inputs(net);
    rng_t r = {CHECK_SEED};
    params_t p = params_alloc(net), v = params_alloc(net), w = params_alloc(net), gv = params_alloc(net),
             gw = params_alloc(net), ref = params_alloc(net), tp = params_alloc(net);
    params_init_glorot(net, &p, 3);
    for (int l = 0; l < L; l++) {
        const int n = net->sizes[l] * net->sizes[l + 1];
        for (int i = 0; i < n; i++) { v.W[l][i] = (float)rng_normal(&r); w.W[l][i] = (float)rng_normal(&r); }
        for (int i = 0; i < net->sizes[l + 1]; i++) {
            p.b[l][i] = 0.1f * (float)rng_normal(&r);
            v.b[l][i] = (float)rng_normal(&r);
            w.b[l][i] = (float)rng_normal(&r);
        }
    }
    float x[ROWS * 64];
    uint8_t y[ROWS];
    for (int i = 0; i < ROWS * d; i++) x[i] = rng_uniform(&r);
    for (int i = 0; i < ROWS; i++) y[i] = (uint8_t)rng_below(&r, k);
    const targets_t t = {y, NULL};
    workspace_t ws = workspace_alloc(net, ROWS), wf = workspace_alloc(net, ROWS);
    gn_t gn = {net, &p, &ws, rop_alloc(net, ROWS), ROWS, 0};
    net_forward(net, &p, &ws, x, &t, ROWS);
    gn_product(&gn, &v, &gv);
    /* Reference: J v by central differences of the logits (accumulated in double), then the
     * explicit H_n = diag(p_n) − p_n p_nᵀ, then the backward pass. */
    double jv[ROWS * 10] = {0};
    for (int level = 0; level < 2; level++) { /* Richardson: (4 D(ε/2) − D(ε)) / 3, ε = 1e-2 */
        const double eps = level ? 5e-3 : 1e-2, weight = level ? 4.0 / 3.0 : -1.0 / 3.0;
        for (int sign = -1; sign <= 1; sign += 2) {
            params_copy(net, &tp, &p);
            params_axpy(net, (float)(sign * eps), &v, &tp);
            net_forward(net, &tp, &wf, x, &t, ROWS);
            const float *z = workspace_logits(net, &wf);
            for (int i = 0; i < ROWS * k; i++) jv[i] += weight * sign * (double)z[i] / (2 * eps);
        }
    }
    net_forward(net, &p, &ws, x, &t, ROWS);
    float *dz = ws.dz[L - 1];
    for (int n = 0; n < ROWS; n++) {
        const float *pn = ws.probs + (size_t)n * k;
        for (int a = 0; a < k; a++) {
            double s = 0;
            for (int b = 0; b < k; b++) s += ((a == b ? pn[a] : 0.0) - (double)pn[a] * pn[b]) * jv[n * k + b];
            dz[n * k + a] = (float)(s / ROWS);
        }
    }
    net_backward(net, &p, &ws, ROWS, &ref);
    double diff = 0, norm = 0;
    for (int l = 0; l < L; l++) {
        const int in = net->sizes[l], out = net->sizes[l + 1];
        for (int i = 0; i < in * out; i++) {
            diff += pow(gv.W[l][i] - ref.W[l][i], 2);
            norm += pow(ref.W[l][i], 2);
        }
        for (int i = 0; i < out; i++) {
            diff += pow(gv.b[l][i] - ref.b[l][i], 2);
            norm += pow(ref.b[l][i], 2);
        }
    }
    const double err = sqrt(diff / norm);
    net_forward(net, &p, &ws, x, &t, ROWS);
    gn_product(&gn, &w, &gw);
    const double wgv = dotp(net, &w, &gv), vgw = dotp(net, &v, &gw);
    const double sym = fabs(wgv - vgw) / fabs(wgv);
    printf("Gauss-Newton product G·v vs Jᵀ H (J v)_finite-differences: relative error %.2e (tolerance 1e-3)\n", err);
    printf("symmetry |wᵀGv − vᵀGw| / |wᵀGv| = %.2e (tolerance 1e-5)\n", sym);
    /* The product-function wrapper against the reverse-communication loop. */
    kfac_optimizer *h1 = make_handle(net), *h2 = make_handle(net);
    params_t g = params_alloc(net), s1 = params_alloc(net), s2 = params_alloc(net), vec = params_alloc(net),
             prod = params_alloc(net);
    net_forward(net, &p, &ws, x, &t, ROWS);
    net_output_grad(net, &ws, &t, ROWS);
    net_backward(net, &p, &ws, ROWS, &g);
    kfac_cg_desc desc = {.struct_size = sizeof desc, .tolerance = 1e-3};
    kfac_cg_result r1 = {.struct_size = sizeof r1}, r2 = {.struct_size = sizeof r2};
    int32_t request = 0;
    KFAC_CHECK(h1, kfac_cg_begin_f32(h1, &desc, (const float *const *)g.W, (const float *const *)g.b, NULL, NULL, L,
                                     &request));
    while (request == KFAC_CG_NEED_PRODUCT) {
        KFAC_CHECK(h1, kfac_cg_get_vector_f32(h1, vec.W, vec.b, L));
        gn_product(&gn, &vec, &prod);
        KFAC_CHECK(h1, kfac_cg_supply_product_f32(h1, (const float *const *)prod.W, (const float *const *)prod.b, L,
                                                  &request));
    }
    KFAC_CHECK(h1, kfac_cg_finish_f32(h1, s1.W, s1.b, L, &r1));
    KFAC_CHECK(h2, kfac_cg_solve_f32(h2, &desc, (const float *const *)g.W, (const float *const *)g.b, NULL, NULL,
                                     gn_callback, &gn, s2.W, s2.b, L, &r2));
    int same = memcmp(&r1, &r2, sizeof r1) == 0;
    for (int l = 0; l < L; l++) {
        same &= memcmp(s1.W[l], s2.W[l], sizeof(float) * (size_t)net->sizes[l] * net->sizes[l + 1]) == 0;
        same &= memcmp(s1.b[l], s2.b[l], sizeof(float) * (size_t)net->sizes[l + 1]) == 0;
    }
    printf("kfac_cg_solve_f32 (product function) = the reverse-communication loop, bitwise: %s (%d iterations)\n",
           same ? "yes" : "NO", r1.iterations);
    kfac_optimizer_free(h1);
    kfac_optimizer_free(h2);
    params_t *all[] = {&p, &v, &w, &gv, &gw, &ref, &tp, &g, &s1, &s2, &vec, &prod};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++) params_free(net, all[i]);
    rop_free(net, &gn.rop);
    workspace_free(net, &ws);
    workspace_free(net, &wf);
    return (err < 1e-3 && sym < 1e-5 && same) ? 0 : 1;
}

int main(int argc, char **argv) {
    net_validate(&MLP);
    if (argc > 1 && strcmp(argv[1], "--check") == 0) {
        const int passes = net_check(&MLP, CHECK_SEED);
        const int products = check_products();
        printf("%s\n", passes || products ? "CHECK FAILED" : "all checks passed");
        return passes || products;
    }
    const char *path = argc > 1 ? argv[1] : "data/digits.bin";
    const int iterations = argc > 2 ? atoi(argv[2]) : DEFAULT_ITERATIONS;
    if (iterations < 1) {
        fprintf(stderr, "usage: %s [digits.bin [iterations >= 1]] | --check\n", argv[0]);
        return 2;
    }
    check_library_version();
    dataset_t ds = load_digits(path, N_TEST + 100);
    printf("libkfac %s; %d examples (%d train, %d test), MLP 64-128-64-10, Newton-CG: gradient on all %d training "
           "examples, G on %d%%, %d iterations\n", kfac_version_string(), ds.n, ds.n - N_TEST, N_TEST, ds.n - N_TEST,
           CURVATURE_PERCENT, iterations);
    params_t initial = params_alloc(&MLP);
    params_init_glorot(&MLP, &initial, INIT_SEED);
    result_t results[N_METHODS];
    for (int m = 0; m < N_METHODS; m++) results[m] = train(&METHODS[m], &initial, &ds, iterations);
    printf("\n== summary after %d Newton iterations (same initial weights and curvature batches) ==\n", iterations);
    printf("%-16s %12s %9s %10s %12s %9s\n", "method", "train loss", "test acc", "CG total", "CG / Newton", "time");
    for (int m = 0; m < N_METHODS; m++)
        printf("%-16s %12.5f %8.2f%% %10ld %12.1f %8.2fs\n", METHODS[m].name, results[m].train_loss,
               results[m].test_acc, results[m].cg_total, results[m].mean_cg, results[m].seconds);
    params_free(&MLP, &initial);
    dataset_free(&ds);
    return 0;
}
