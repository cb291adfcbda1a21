/*
 * train_mlp.c — train a small MLP on the 8×8 handwritten digits with K-FAC (libkfac), SGD with
 * momentum, Adam and adaptive K-FAC, from the same initial weights and the same mini-batches,
 * and compare.
 *
 * The program does its own forward and backward passes with CBLAS (sgemm) and hands libkfac,
 * per dense layer, the layer inputs and the gradients at the layer outputs; libkfac returns
 * preconditioned directions that the program applies with its own learning rate and momentum.
 *
 * Network: 64 → 128 (tanh) → 64 (tanh) → 10 (softmax cross-entropy), biases on every layer.
 * Data:    data/digits.bin (see data/README.md); the first 1500 examples train, the last 297 test.
 *
 * Build (from the repository root, after `swift build -c release --product kfac`):
 *     cc -std=c11 -O2 -Wall -Wextra -I include examples/c/train_mlp.c -o train_mlp \
 *        -L .build/release -lkfac -Wl,-rpath,$PWD/.build/release -lopenblas -lm
 * Run:
 *     ./train_mlp [data/digits.bin [epochs]]
 *
 * Loss convention. The training loss is the MEAN cross-entropy over the mini-batch, so every
 * gradient the backward pass produces is a gradient of (1/B) Σ_n ℓ_n. kfac.h expects output
 * gradients of a SUMMED loss unless KFAC_PARAM_LOSS_REDUCTION is KFAC_REDUCTION_MEAN, in which
 * case it multiplies each recorded row by the call's row count B. We set that parameter and pass
 * the mean-loss output gradients unchanged; the parameter gradients (also of the mean loss) are
 * never rescaled by the library, so the directions are F⁻¹ ∇(mean loss).
 *
 * Fisher statistics. The output-side factor G is estimated with the true Fisher (Martens &
 * Grosse 2015, §5): on statistics steps a second backward pass uses targets sampled from the
 * model's own predictive distribution, instead of the data labels (the "empirical Fisher").
 *
 * Adaptive K-FAC (Martens & Grosse 2015, §6–7), the fourth run: no learning rate and no KL clip.
 * After kfac_step_f32 wrote the directions D, a forward-mode (R-op) pass through the MLP gives
 * J·D, the derivative of the logits along D, and J·δ₀ along the previous update δ₀;
 * kfac_solve_step_size_f32 returns the α and μ that minimise the quadratic model
 * ½ δᵀ(F + λI)δ + ∇hᵀδ over δ = −αD + μδ₀ with the exact Fisher of the softmax, the program
 * applies θ ← θ + δ, evaluates the batch loss again and reports both losses with
 * kfac_report_loss_change, which adjusts λ every KFAC_PARAM_LM_INTERVAL steps
 * (Levenberg–Marquardt; the program keeps λ >= ADAPTIVE_MIN_DAMPING). Its Fisher statistics
 * come from the library's seeded sampler, kfac_sampled_output_grads_f32.
 */
#define _POSIX_C_SOURCE 199309L /* clock_gettime */

#include <cblas.h>
#include <kfac.h>

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

/* ------------------------------------------------------------------------------------------ */
/* Configuration                                                                               */
/* ------------------------------------------------------------------------------------------ */

enum { N_LAYERS = 3 };
static const int LAYER_SIZES[N_LAYERS + 1] = {64, 128, 64, 10};

enum { N_TEST = 297, BATCH = 128, DEFAULT_EPOCHS = 30, PRINT_EVERY = 5, N_CLASSES = 10 };

static const uint64_t INIT_SEED = 42;     /* initial weights (shared by all three runs) */
static const uint64_t SHUFFLE_SEED = 7;   /* mini-batch order (same for all three runs) */
static const uint64_t FISHER_SEED = 2015; /* sampled targets for K-FAC's Fisher statistics */

/* K-FAC: W -= lr * direction, no momentum (the KL clip bounds exactly the step lr * direction;
 * with momentum 0.9 the actual steps are up to 10× larger and training here became unstable). */
static const double KFAC_LR = 0.1;
static const double KFAC_DAMPING = 1e-3;
static const double KFAC_DECAY = 0.95;
static const double KFAC_KL_CLIP = 1e-3;
static const int64_t KFAC_INVERSE_PERIOD = 10;
/* Adaptive K-FAC: the initial λ, then Levenberg–Marquardt every LM_INTERVAL steps (ω₁ = 0.95),
 * never below MIN_DAMPING. The library uses one λ both in the quadratic model and in the factors'
 * inverses; ρ of the batch's own loss is above 3/4 at nearly every step here, so without the
 * floor λ decays geometrically (to ~1e-10 in 30 epochs), the inverses lose their damping and the
 * directions grow until α ~ 1e-4 and training degrades (train loss 0.001 instead of 0.00003). */
static const double ADAPTIVE_DAMPING = 1e-2;
static const int64_t ADAPTIVE_LM_INTERVAL = 5;
static const double ADAPTIVE_LM_DECAY = 0.95;
static const double ADAPTIVE_MIN_DAMPING = 1e-4;
/* SGD with momentum */
static const float SGD_LR = 0.1f;
static const float SGD_MOMENTUM = 0.9f;
/* Adam */
static const float ADAM_LR = 3e-3f;
static const float ADAM_BETA1 = 0.9f, ADAM_BETA2 = 0.999f, ADAM_EPS = 1e-8f;

/* ------------------------------------------------------------------------------------------ */
/* Small utilities                                                                             */
/* ------------------------------------------------------------------------------------------ */

static void *xcalloc(size_t count, size_t size) {
    void *p = calloc(count, size);
    if (!p) {
        fprintf(stderr, "out of memory\n");
        exit(1);
    }
    return p;
}

/* Aborts the program with libkfac's message if a kfac_* call failed. */
#define KFAC_CHECK(opt, call)                                                                  \
    do {                                                                                       \
        int kfac_check_status_ = (call);                                                       \
        if (kfac_check_status_ != KFAC_OK) {                                                   \
            fprintf(stderr, "%s:%d: %s failed: %s (%d): %s\n", __FILE__, __LINE__, #call,      \
                    kfac_status_string(kfac_check_status_), kfac_check_status_,                \
                    kfac_last_error(opt));                                                     \
            exit(1);                                                                           \
        }                                                                                      \
    } while (0)

/* splitmix64: a small, seedable generator (no dependence on the C library's rand()). */
typedef struct { uint64_t state; } rng_t;

static uint64_t rng_next(rng_t *r) {
    uint64_t z = (r->state += 0x9E3779B97F4A7C15ull);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
    return z ^ (z >> 31);
}

/* Uniform in [0, 1) with 24 random bits. */
static float rng_uniform(rng_t *r) { return (float)(rng_next(r) >> 40) * (1.0f / 16777216.0f); }

/* Uniform in [0, n), n > 0 (the modulo bias is irrelevant for n ≤ 2000). */
static int rng_below(rng_t *r, int n) { return (int)(rng_next(r) % (uint64_t)n); }

static double now_seconds(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------------------------------ */
/* Data                                                                                        */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    int n, d;
    float *x;       /* [n][d], pixel / 16 */
    uint8_t *y;     /* [n] */
} dataset_t;

static uint32_t read_u32_le(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

/* Loads data/digits.bin (format in data/README.md). Exits with a message on any problem. */
static dataset_t load_digits(const char *path) {
    FILE *f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot open %s (run from the repository root, or pass the path; "
                        "regenerate with python3 data/export_digits.py)\n", path);
        exit(1);
    }
    unsigned char header[16];
    if (fread(header, 1, sizeof header, f) != sizeof header || memcmp(header, "DIGITS01", 8)) {
        fprintf(stderr, "%s: not a DIGITS01 file\n", path);
        exit(1);
    }
    uint32_t n = read_u32_le(header + 8), d = read_u32_le(header + 12);
    if (n <= N_TEST || n > 1000000 || d != (uint32_t)LAYER_SIZES[0]) {
        fprintf(stderr, "%s: unexpected sizes n=%u d=%u\n", path, n, d);
        exit(1);
    }
    unsigned char *pixels = xcalloc((size_t)n * d, 1);
    dataset_t ds = {(int)n, (int)d, xcalloc((size_t)n * d, sizeof(float)), xcalloc(n, 1)};
    if (fread(pixels, 1, (size_t)n * d, f) != (size_t)n * d || fread(ds.y, 1, n, f) != n) {
        fprintf(stderr, "%s: truncated\n", path);
        exit(1);
    }
    fclose(f);
    for (size_t i = 0; i < (size_t)n * d; i++) {
        if (pixels[i] > 16) {
            fprintf(stderr, "%s: pixel value %u out of range\n", path, pixels[i]);
            exit(1);
        }
        ds.x[i] = (float)pixels[i] / 16.0f;
    }
    for (uint32_t i = 0; i < n; i++) {
        if (ds.y[i] >= N_CLASSES) {
            fprintf(stderr, "%s: label %u out of range\n", path, ds.y[i]);
            exit(1);
        }
    }
    free(pixels);
    return ds;
}

/* ------------------------------------------------------------------------------------------ */
/* The network                                                                                 */
/* ------------------------------------------------------------------------------------------ */

/* Parameters (or anything shaped like them: gradients, optimizer state).
 * W[l] is [out][in] row-major, b[l] is [out]. */
typedef struct {
    float *W[N_LAYERS];
    float *b[N_LAYERS];
} params_t;

static int fan_in(int l) { return LAYER_SIZES[l]; }
static int fan_out(int l) { return LAYER_SIZES[l + 1]; }

static params_t params_alloc(void) {
    params_t p;
    for (int l = 0; l < N_LAYERS; l++) {
        p.W[l] = xcalloc((size_t)fan_out(l) * fan_in(l), sizeof(float));
        p.b[l] = xcalloc((size_t)fan_out(l), sizeof(float));
    }
    return p;
}

static void params_free(params_t *p) {
    for (int l = 0; l < N_LAYERS; l++) {
        free(p->W[l]);
        free(p->b[l]);
    }
}

static void params_copy(params_t *dst, const params_t *src) {
    for (int l = 0; l < N_LAYERS; l++) {
        memcpy(dst->W[l], src->W[l], (size_t)fan_out(l) * fan_in(l) * sizeof(float));
        memcpy(dst->b[l], src->b[l], (size_t)fan_out(l) * sizeof(float));
    }
}

/* Glorot-uniform weights, zero biases. */
static void params_init(params_t *p, uint64_t seed) {
    rng_t rng = {seed};
    for (int l = 0; l < N_LAYERS; l++) {
        float scale = sqrtf(6.0f / (float)(fan_in(l) + fan_out(l)));
        for (int i = 0; i < fan_out(l) * fan_in(l); i++)
            p->W[l][i] = scale * (2.0f * rng_uniform(&rng) - 1.0f);
        memset(p->b[l], 0, (size_t)fan_out(l) * sizeof(float));
    }
}

/* Activations and output gradients for up to max_rows rows. */
typedef struct {
    int max_rows;
    const float *act[N_LAYERS + 1]; /* act[0] = input rows (borrowed), act[l+1] = layer l output */
    float *out[N_LAYERS];           /* storage of act[1..N]: tanh(s) for hidden layers, logits */
    float *probs;                   /* softmax of the logits */
    float *dz[N_LAYERS];            /* ∂loss/∂s_l, [rows][out_l] (s_l = pre-activation) */
} workspace_t;

static workspace_t workspace_alloc(int max_rows) {
    workspace_t ws;
    memset(&ws, 0, sizeof ws);
    ws.max_rows = max_rows;
    for (int l = 0; l < N_LAYERS; l++) {
        ws.out[l] = xcalloc((size_t)max_rows * fan_out(l), sizeof(float));
        ws.dz[l] = xcalloc((size_t)max_rows * fan_out(l), sizeof(float));
        ws.act[l + 1] = ws.out[l];
    }
    ws.probs = xcalloc((size_t)max_rows * N_CLASSES, sizeof(float));
    return ws;
}

static void workspace_free(workspace_t *ws) {
    for (int l = 0; l < N_LAYERS; l++) {
        free(ws->out[l]);
        free(ws->dz[l]);
    }
    free(ws->probs);
}

/* Forward pass over `rows` input rows x [rows][64]; returns the mean cross-entropy against y
 * (if y is not NULL) and leaves activations and softmax probabilities in ws. */
static double forward(const params_t *p, workspace_t *ws, const float *x, const uint8_t *y,
                      int rows) {
    ws->act[0] = x;
    for (int l = 0; l < N_LAYERS; l++) {
        const int in = fan_in(l), out = fan_out(l);
        float *s = ws->out[l];
        /* s = a Wᵀ + b: [rows][in] × [in][out] */
        for (int r = 0; r < rows; r++) memcpy(s + (size_t)r * out, p->b[l], out * sizeof(float));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, ws->act[l], in,
                    p->W[l], in, 1.0f, s, out);
        if (l + 1 < N_LAYERS)
            for (size_t i = 0; i < (size_t)rows * out; i++) s[i] = tanhf(s[i]);
    }
    /* Softmax with the max subtracted, and the cross-entropy in double. */
    double loss = 0.0;
    const float *logits = ws->out[N_LAYERS - 1];
    for (int r = 0; r < rows; r++) {
        const float *z = logits + (size_t)r * N_CLASSES;
        float *pr = ws->probs + (size_t)r * N_CLASSES;
        float zmax = z[0];
        for (int c = 1; c < N_CLASSES; c++) zmax = z[c] > zmax ? z[c] : zmax;
        double sum = 0.0;
        for (int c = 0; c < N_CLASSES; c++) sum += exp((double)(z[c] - zmax));
        for (int c = 0; c < N_CLASSES; c++) pr[c] = (float)(exp((double)(z[c] - zmax)) / sum);
        if (y) loss += log(sum) - (double)(z[y[r]] - zmax);
    }
    return loss / rows;
}

/* Backward pass of the mean cross-entropy (1/rows) Σ_n ℓ(z_n, t_n) for targets t, after
 * forward(). Fills ws->dz[l] for every layer and, if grads is not NULL, the parameter gradients. */
static void backward_from_logits(const params_t *p, workspace_t *ws, int rows, params_t *grads);

static void backward(const params_t *p, workspace_t *ws, const uint8_t *targets, int rows,
                     params_t *grads) {
    const float inv_rows = 1.0f / (float)rows;
    float *dz_out = ws->dz[N_LAYERS - 1];
    for (int r = 0; r < rows; r++)
        for (int c = 0; c < N_CLASSES; c++)
            dz_out[r * N_CLASSES + c] =
                (ws->probs[r * N_CLASSES + c] - (c == targets[r] ? 1.0f : 0.0f)) * inv_rows;
    backward_from_logits(p, ws, rows, grads);
}

/* The backward pass from the gradient at the logits already in ws->dz[N_LAYERS - 1]. */
static void backward_from_logits(const params_t *p, workspace_t *ws, int rows, params_t *grads) {
    for (int l = N_LAYERS - 1; l >= 0; l--) {
        const int in = fan_in(l), out = fan_out(l);
        const float *dz = ws->dz[l];
        if (grads) {
            /* dW = dzᵀ a: [out][rows] × [rows][in];  db = Σ_rows dz */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, out, in, rows, 1.0f, dz, out,
                        ws->act[l], in, 0.0f, grads->W[l], in);
            for (int o = 0; o < out; o++) grads->b[l][o] = 0.0f;
            for (int r = 0; r < rows; r++)
                for (int o = 0; o < out; o++) grads->b[l][o] += dz[(size_t)r * out + o];
        }
        if (l > 0) {
            /* ∂/∂a = dz W: [rows][out] × [out][in]; then through tanh: × (1 − h²) */
            float *dprev = ws->dz[l - 1];
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, in, out, 1.0f, dz, out,
                        p->W[l], in, 0.0f, dprev, in);
            const float *h = ws->act[l];
            for (size_t i = 0; i < (size_t)rows * in; i++) dprev[i] *= 1.0f - h[i] * h[i];
        }
    }
}

/* Mean loss and accuracy (in %) over rows [0, rows) of x/y, in one forward pass. */
static void evaluate(const params_t *p, workspace_t *ws, const float *x, const uint8_t *y,
                     int rows, double *loss, double *accuracy) {
    *loss = forward(p, ws, x, y, rows);
    int correct = 0;
    for (int r = 0; r < rows; r++) {
        const float *pr = ws->probs + (size_t)r * N_CLASSES;
        int best = 0;
        for (int c = 1; c < N_CLASSES; c++)
            if (pr[c] > pr[best]) best = c;
        correct += best == y[r];
    }
    *accuracy = 100.0 * correct / rows;
}

/* Forward mode (the R-op, Pearlmutter 1994): the derivative of the logits along a parameter
 * direction v = (vW, vb), at the activations forward() left in ws:
 *     R(a_0) = 0,  R(s_l) = vW_l a_l + W_l R(a_l) + vb_l,  R(a_{l+1}) = (1 − a_{l+1}²) ⊙ R(s_l),
 * one row per example. r[l] ([rows][out_l]) receives R(s_l) (R(a_{l+1}) for hidden layers);
 * r[N_LAYERS - 1] is J·v, [rows][10]. */
static void r_op(const params_t *p, const workspace_t *ws, const params_t *v, int rows,
                 float *r[N_LAYERS]) {
    for (int l = 0; l < N_LAYERS; l++) {
        const int in = fan_in(l), out = fan_out(l);
        float *rs = r[l];
        for (int i = 0; i < rows; i++) memcpy(rs + (size_t)i * out, v->b[l], out * sizeof(float));
        /* + a vWᵀ */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, ws->act[l], in,
                    v->W[l], in, 1.0f, rs, out);
        /* + R(a) Wᵀ */
        if (l > 0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, r[l - 1], in,
                        p->W[l], in, 1.0f, rs, out);
        if (l + 1 < N_LAYERS) {
            const float *h = ws->act[l + 1];
            for (size_t i = 0; i < (size_t)rows * out; i++) rs[i] *= 1.0f - h[i] * h[i];
        }
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Optimizers                                                                                  */
/* ------------------------------------------------------------------------------------------ */

typedef enum { OPT_KFAC, OPT_SGD, OPT_ADAM, OPT_KFAC_ADAPTIVE, N_METHODS } method_t;
static const char *const METHOD_NAMES[] = {"K-FAC", "SGD+momentum", "Adam", "K-FAC adaptive"};

typedef struct {
    method_t method;
    params_t m, v;           /* SGD's momentum / Adam's first and second moments */
    int64_t t;               /* Adam's step count */
    kfac_optimizer *kfac;    /* K-FAC only */
    rng_t fisher_rng;        /* K-FAC only: sampled targets */
    uint8_t *sampled;        /* K-FAC only: [BATCH] sampled targets */
    /* Adaptive K-FAC only: */
    params_t previous;       /* δ₀, the update applied at the last step */
    int has_previous;
    float *r_dir[N_LAYERS], *r_prev[N_LAYERS]; /* R-op results along D and δ₀ */
    uint64_t sample_seed;    /* seed of kfac_sampled_output_grads_f32, one per call */
    double alpha, mu, rho;   /* of the last step */
} optimizer_t;

static optimizer_t optimizer_create(method_t method) {
    optimizer_t o;
    memset(&o, 0, sizeof o);
    o.method = method;
    o.m = params_alloc();
    o.v = params_alloc();
    if (method != OPT_KFAC && method != OPT_KFAC_ADAPTIVE) return o;

    o.fisher_rng.state = FISHER_SEED;
    o.sampled = xcalloc(BATCH, 1);
    int status = kfac_optimizer_create(KFAC_FLOAT32, &o.kfac);
    if (status != KFAC_OK) {
        fprintf(stderr, "kfac_optimizer_create: %s\n", kfac_status_string(status));
        exit(1);
    }
    kfac_optimizer *k = o.kfac;
    for (int l = 0; l < N_LAYERS; l++) {
        int32_t id;
        KFAC_CHECK(k, kfac_add_dense(k, fan_in(l), fan_out(l), 1, &id));
        if (id != l) {
            fprintf(stderr, "unexpected layer id %d for layer %d\n", (int)id, l);
            exit(1);
        }
    }
    /* Our backward pass differentiates the MEAN loss: let the library rescale output grads. */
    KFAC_CHECK(k, kfac_set_param_int(k, KFAC_PARAM_LOSS_REDUCTION, KFAC_REDUCTION_MEAN));
    KFAC_CHECK(k, kfac_set_param_int(k, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EIGEN));
    KFAC_CHECK(k, kfac_set_param_int(k, KFAC_PARAM_FACTOR_UPDATE_PERIOD, 1));
    KFAC_CHECK(k, kfac_set_param_int(k, KFAC_PARAM_INVERSE_UPDATE_PERIOD, KFAC_INVERSE_PERIOD));
    KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_FACTOR_DECAY, KFAC_DECAY));
    if (method == OPT_KFAC_ADAPTIVE) {
        /* α replaces the learning rate and the KL clip; λ follows Levenberg–Marquardt. */
        KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_DAMPING, ADAPTIVE_DAMPING));
        KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_KL_CLIP, 0.0));
        KFAC_CHECK(k, kfac_set_param_int(k, KFAC_PARAM_LM_INTERVAL, ADAPTIVE_LM_INTERVAL));
        KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_LM_DECAY, ADAPTIVE_LM_DECAY));
        o.previous = params_alloc();
        for (int l = 0; l < N_LAYERS; l++) {
            o.r_dir[l] = xcalloc((size_t)BATCH * fan_out(l), sizeof(float));
            o.r_prev[l] = xcalloc((size_t)BATCH * fan_out(l), sizeof(float));
        }
        o.sample_seed = FISHER_SEED;
        return o;
    }
    KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_DAMPING, KFAC_DAMPING));
    KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_KL_CLIP, KFAC_KL_CLIP));
    /* η of the KL clip is the step size actually applied to the direction. */
    KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_LEARNING_RATE, KFAC_LR));
    return o;
}

static void optimizer_free(optimizer_t *o) {
    params_free(&o->m);
    params_free(&o->v);
    free(o->sampled);
    kfac_optimizer_free(o->kfac);
    if (o->method == OPT_KFAC_ADAPTIVE) {
        params_free(&o->previous);
        for (int l = 0; l < N_LAYERS; l++) {
            free(o->r_dir[l]);
            free(o->r_prev[l]);
        }
    }
}

/* K-FAC: record Fisher statistics when the library wants them, then precondition `grads`
 * in place and apply them. Must be called right after forward() and backward() on the batch. */
static void kfac_update(optimizer_t *o, params_t *p, workspace_t *ws, params_t *grads, int rows) {
    kfac_optimizer *k = o->kfac;
    if (kfac_wants_statistics(k) == 1) {
        /* Inputs of each layer: the batch, then the hidden activations. */
        for (int l = 0; l < N_LAYERS; l++)
            KFAC_CHECK(k, kfac_record_inputs_f32(k, l, ws->act[l], rows));
        /* Output gradients for targets drawn from the model's predictive distribution. The
         * parameter gradients in `grads` were computed already, so ws->dz may be reused. */
        for (int r = 0; r < rows; r++) {
            const float *pr = ws->probs + (size_t)r * N_CLASSES;
            float u = rng_uniform(&o->fisher_rng), cum = 0.0f;
            int c = 0;
            for (; c < N_CLASSES - 1; c++) {
                cum += pr[c];
                if (u < cum) break;
            }
            o->sampled[r] = (uint8_t)c;
        }
        backward(p, ws, o->sampled, rows, NULL);
        for (int l = N_LAYERS - 1; l >= 0; l--)
            KFAC_CHECK(k, kfac_record_output_grads_f32(k, l, ws->dz[l], rows));
    }
    KFAC_CHECK(k, kfac_step_f32(k, grads->W, grads->b, N_LAYERS));

    /* grads now holds the KL-clipped directions. */
    const float lr = (float)KFAC_LR;
    for (int l = 0; l < N_LAYERS; l++) {
        cblas_saxpy(fan_out(l) * fan_in(l), -lr, grads->W[l], 1, p->W[l], 1);
        cblas_saxpy(fan_out(l), -lr, grads->b[l], 1, p->b[l], 1);
    }
}

/* Adaptive K-FAC: statistics (true Fisher through the library's sampler), directions, α and μ
 * from the quadratic model, the update, and the Levenberg–Marquardt report. Must be called right
 * after forward() and backward() on the batch (x, y); `loss` is forward()'s mean loss. */
static void kfac_adaptive_update(optimizer_t *o, params_t *p, workspace_t *ws, params_t *grads,
                                 const float *x, const uint8_t *y, int rows, double loss) {
    kfac_optimizer *k = o->kfac;
    const float *logits = ws->out[N_LAYERS - 1];
    if (kfac_wants_statistics(k) == 1) {
        for (int l = 0; l < N_LAYERS; l++)
            KFAC_CHECK(k, kfac_record_inputs_f32(k, l, ws->act[l], rows));
        /* p − y at sampled targets y (gradients of the summed loss); our backward pass
         * differentiates the mean loss, so divide by the rows (LOSS_REDUCTION is MEAN). */
        float *dz_out = ws->dz[N_LAYERS - 1];
        KFAC_CHECK(k, kfac_sampled_output_grads_f32(logits, rows, N_CLASSES, KFAC_DIST_CATEGORICAL,
                                                    o->sample_seed++, dz_out));
        for (size_t i = 0; i < (size_t)rows * N_CLASSES; i++) dz_out[i] /= (float)rows;
        backward_from_logits(p, ws, rows, NULL);
        for (int l = N_LAYERS - 1; l >= 0; l--)
            KFAC_CHECK(k, kfac_record_output_grads_f32(k, l, ws->dz[l], rows));
    }
    KFAC_CHECK(k, kfac_step_f32(k, grads->W, grads->b, N_LAYERS)); /* grads now hold D */

    /* J·D and J·δ₀ at the activations of θ (still in ws), then α, μ and M(δ). */
    r_op(p, ws, grads, rows, o->r_dir);
    if (o->has_previous) r_op(p, ws, &o->previous, rows, o->r_prev);
    double predicted;
    KFAC_CHECK(k, kfac_solve_step_size_f32(k, logits, o->r_dir[N_LAYERS - 1],
                                           o->has_previous ? o->r_prev[N_LAYERS - 1] : NULL, rows,
                                           N_CLASSES, KFAC_DIST_CATEGORICAL, &o->alpha, &o->mu,
                                           &predicted));

    /* δ = −α D + μ δ₀ (μ = 0 at the first step); θ ← θ + δ; δ becomes δ₀. */
    const float a = (float)o->alpha, m = (float)o->mu;
    for (int l = 0; l < N_LAYERS; l++) {
        const size_t nw = (size_t)fan_out(l) * fan_in(l), nb = (size_t)fan_out(l);
        cblas_sscal((int)nw, m, o->previous.W[l], 1);
        cblas_saxpy((int)nw, -a, grads->W[l], 1, o->previous.W[l], 1);
        cblas_sscal((int)nb, m, o->previous.b[l], 1);
        cblas_saxpy((int)nb, -a, grads->b[l], 1, o->previous.b[l], 1);
        cblas_saxpy((int)nw, 1.0f, o->previous.W[l], 1, p->W[l], 1);
        cblas_saxpy((int)nb, 1.0f, o->previous.b[l], 1, p->b[l], 1);
    }
    o->has_previous = 1;

    /* The batch loss after the update, for ρ = (h(θ + δ) − h(θ)) / M(δ). */
    const double after = forward(p, ws, x, y, rows);
    if (!isfinite(after)) {
        /* Not expected with the quadratic model's α; undo and damp more rather than abort.
         * (δ₀ stays δ: that is the library's copy of the previous update too.) */
        for (int l = 0; l < N_LAYERS; l++) {
            cblas_saxpy(fan_out(l) * fan_in(l), -1.0f, o->previous.W[l], 1, p->W[l], 1);
            cblas_saxpy(fan_out(l), -1.0f, o->previous.b[l], 1, p->b[l], 1);
        }
        double lambda;
        KFAC_CHECK(k, kfac_get_param_double(k, KFAC_PARAM_DAMPING, &lambda));
        KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_DAMPING, 10.0 * lambda));
        o->rho = NAN;
        return;
    }
    KFAC_CHECK(k, kfac_report_loss_change(k, loss, after, &o->rho));
    /* ρ of a mini-batch's own loss is mostly above 3/4, so Levenberg–Marquardt would shrink λ
     * without bound; λ also damps the factors' inverses, which must stay well conditioned
     * (see ADAPTIVE_MIN_DAMPING). */
    double lambda;
    KFAC_CHECK(k, kfac_get_param_double(k, KFAC_PARAM_DAMPING, &lambda));
    if (lambda < ADAPTIVE_MIN_DAMPING)
        KFAC_CHECK(k, kfac_set_param_double(k, KFAC_PARAM_DAMPING, ADAPTIVE_MIN_DAMPING));
}

static void sgd_update_array(float *w, float *m, const float *g, size_t n) {
    for (size_t i = 0; i < n; i++) {
        m[i] = SGD_MOMENTUM * m[i] + g[i];
        w[i] -= SGD_LR * m[i];
    }
}

static void adam_update_array(float *w, float *m, float *v, const float *g, size_t n,
                              float step_size) {
    for (size_t i = 0; i < n; i++) {
        m[i] = ADAM_BETA1 * m[i] + (1.0f - ADAM_BETA1) * g[i];
        v[i] = ADAM_BETA2 * v[i] + (1.0f - ADAM_BETA2) * g[i] * g[i];
        w[i] -= step_size * m[i] / (sqrtf(v[i]) + ADAM_EPS);
    }
}

/* One parameter update from the mean-loss gradients `grads` (which K-FAC overwrites). */
static void optimizer_update(optimizer_t *o, params_t *p, workspace_t *ws, params_t *grads,
                             const float *x, const uint8_t *y, int rows, double loss) {
    switch (o->method) {
    case OPT_KFAC:
        kfac_update(o, p, ws, grads, rows);
        break;
    case OPT_KFAC_ADAPTIVE:
        kfac_adaptive_update(o, p, ws, grads, x, y, rows, loss);
        break;
    case OPT_SGD:
        for (int l = 0; l < N_LAYERS; l++) {
            sgd_update_array(p->W[l], o->m.W[l], grads->W[l], (size_t)fan_out(l) * fan_in(l));
            sgd_update_array(p->b[l], o->m.b[l], grads->b[l], (size_t)fan_out(l));
        }
        break;
    case OPT_ADAM: {
        o->t++;
        /* Bias corrections folded into the step size (Kingma & Ba 2015, §2). */
        const double c1 = 1.0 - pow(ADAM_BETA1, (double)o->t);
        const double c2 = 1.0 - pow(ADAM_BETA2, (double)o->t);
        const float step_size = (float)(ADAM_LR * sqrt(c2) / c1);
        for (int l = 0; l < N_LAYERS; l++) {
            adam_update_array(p->W[l], o->m.W[l], o->v.W[l], grads->W[l],
                              (size_t)fan_out(l) * fan_in(l), step_size);
            adam_update_array(p->b[l], o->m.b[l], o->v.b[l], grads->b[l], (size_t)fan_out(l),
                              step_size);
        }
        break;
    }
    case N_METHODS:
        break;
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Training                                                                                    */
/* ------------------------------------------------------------------------------------------ */

typedef struct {
    double train_loss, train_acc, test_loss, test_acc, seconds;
} result_t;

static result_t train(method_t method, const params_t *initial, const dataset_t *ds, int epochs) {
    const int n_train = ds->n - N_TEST, d = ds->d;
    const float *x_test = ds->x + (size_t)n_train * d;
    const uint8_t *y_test = ds->y + n_train;

    params_t p = params_alloc(), grads = params_alloc();
    params_copy(&p, initial);
    workspace_t ws = workspace_alloc(ds->n); /* large enough for whole-set evaluation */
    optimizer_t opt = optimizer_create(method);

    /* Mini-batch buffers and the shuffled order (same seed for every method). */
    float *xb = xcalloc((size_t)BATCH * d, sizeof(float));
    uint8_t *yb = xcalloc(BATCH, 1);
    int *order = xcalloc((size_t)n_train, sizeof(int));
    for (int i = 0; i < n_train; i++) order[i] = i;
    rng_t shuffle = {SHUFFLE_SEED};

    printf("\n== %s ==\n", METHOD_NAMES[method]);
    printf("%6s %8s %12s %10s %10s\n", "epoch", "steps", "train loss", "train acc", "test acc");
    result_t res = {0};
    int64_t steps = 0;
    for (int epoch = 1; epoch <= epochs; epoch++) {
        const double t0 = now_seconds(); /* only training is timed, not the evaluation */
        /* Fisher–Yates shuffle of the training indices. */
        for (int i = n_train - 1; i > 0; i--) {
            int j = rng_below(&shuffle, i + 1), t = order[i];
            order[i] = order[j];
            order[j] = t;
        }
        /* Every batch has BATCH rows except possibly the last one of the epoch. */
        for (int start = 0; start < n_train; start += BATCH) {
            const int rows = n_train - start < BATCH ? n_train - start : BATCH;
            for (int r = 0; r < rows; r++) {
                memcpy(xb + (size_t)r * d, ds->x + (size_t)order[start + r] * d,
                       (size_t)d * sizeof(float));
                yb[r] = ds->y[order[start + r]];
            }
            const double loss = forward(&p, &ws, xb, yb, rows);
            backward(&p, &ws, yb, rows, &grads);
            optimizer_update(&opt, &p, &ws, &grads, xb, yb, rows, loss);
            steps++;
        }
        res.seconds += now_seconds() - t0;
        if (epoch % PRINT_EVERY == 0 || epoch == epochs) {
            evaluate(&p, &ws, ds->x, ds->y, n_train, &res.train_loss, &res.train_acc);
            evaluate(&p, &ws, x_test, y_test, N_TEST, &res.test_loss, &res.test_acc);
            printf("%6d %8lld %12.5f %9.2f%% %9.2f%%", epoch, (long long)steps, res.train_loss,
                   res.train_acc, res.test_acc);
            if (method == OPT_KFAC)
                printf("   (KL scale of last step %.3g)", kfac_last_kl_scale(opt.kfac));
            if (method == OPT_KFAC_ADAPTIVE) {
                double lambda = 0;
                KFAC_CHECK(opt.kfac, kfac_get_param_double(opt.kfac, KFAC_PARAM_DAMPING, &lambda));
                printf("   (last step: α %.3g, μ %.3g, ρ %.2f; λ %.3g)", opt.alpha, opt.mu,
                       opt.rho, lambda);
            }
            printf("\n");
        }
    }
    if ((method == OPT_KFAC || method == OPT_KFAC_ADAPTIVE) && kfac_step_count(opt.kfac) != steps) {
        fprintf(stderr, "kfac_step_count = %lld, expected %lld\n",
                (long long)kfac_step_count(opt.kfac), (long long)steps);
        exit(1);
    }

    free(order);
    free(yb);
    free(xb);
    optimizer_free(&opt);
    workspace_free(&ws);
    params_free(&grads);
    params_free(&p);
    return res;
}

int main(int argc, char **argv) {
    const char *path = argc > 1 ? argv[1] : "data/digits.bin";
    const int epochs = argc > 2 ? atoi(argv[2]) : DEFAULT_EPOCHS;
    if (epochs < 1) {
        fprintf(stderr, "usage: %s [digits.bin [epochs >= 1]]\n", argv[0]);
        return 2;
    }
    if (kfac_version_number() != KFAC_VERSION_NUMBER) {
        fprintf(stderr, "libkfac %s does not match kfac.h %d\n", kfac_version_string(),
                KFAC_VERSION_NUMBER);
        return 1;
    }

    dataset_t ds = load_digits(path);
    printf("libkfac %s; %d examples (%d train, %d test), MLP 64-128-64-10, batch %d, "
           "%d epochs\n", kfac_version_string(), ds.n, ds.n - N_TEST, N_TEST, BATCH, epochs);

    params_t initial = params_alloc();
    params_init(&initial, INIT_SEED);

    result_t results[N_METHODS];
    for (int m = 0; m < N_METHODS; m++) results[m] = train((method_t)m, &initial, &ds, epochs);

    printf("\n== summary after %d epochs (same initial weights and batches) ==\n", epochs);
    printf("%-14s %12s %10s %10s %9s\n", "optimizer", "train loss", "train acc", "test acc",
           "time");
    for (int m = 0; m < N_METHODS; m++)
        printf("%-14s %12.5f %9.2f%% %9.2f%% %8.2fs\n", METHOD_NAMES[m], results[m].train_loss,
               results[m].train_acc, results[m].test_acc, results[m].seconds);

    params_free(&initial);
    free(ds.x);
    free(ds.y);
    return 0;
}
