/*
 * optim.h — the optimizers the C examples compare, on a net.h network:
 *
 *   OPT_KFAC           K-FAC through libkfac with fixed damping λ and the KL clip:
 *                      θ ← θ − lr · direction (no momentum: the KL clip bounds exactly the
 *                      step lr · direction). Fisher statistics from targets the program samples
 *                      itself from the model (net_sample_targets), back-propagated.
 *   OPT_KFAC_ADAPTIVE  K-FAC's adaptive mode (Martens & Grosse 2015, §6–7): no learning rate and
 *                      no KL clip; α and μ from the quadratic model with the exact Fisher of the
 *                      output distribution (the caller's R-op gives J·D and J·δ₀),
 *                      Levenberg–Marquardt λ from the reported loss change, optionally a
 *                      separate factor damping γ and its re-choice every T₂ steps. Fisher
 *                      statistics from the library's seeded sampler (kfac_sample_output_grads_f32).
 *   OPT_SGD            SGD with momentum: m ← momentum·m + g, θ ← θ − lr·m.
 *   OPT_ADAM           Adam (Kingma & Ba 2015).
 *
 * The training loss is the MEAN over the batch, so every gradient the backward pass produces is
 * a gradient of (1/B) Σ_n ℓ_n. kfac.h expects output gradients of a SUMMED loss unless
 * KFAC_PARAM_LOSS_REDUCTION is KFAC_REDUCTION_MEAN, in which case it multiplies each recorded
 * row by the call's row count B. The K-FAC methods set that parameter and pass the mean-loss
 * output gradients unchanged; the parameter gradients (also of the mean loss) are never rescaled
 * by the library, so the directions are F⁻¹ ∇(mean loss), and the adaptive mode's quadratic
 * model is that of the mean loss, as kfac.h requires.
 */
#ifndef KFAC_EXAMPLE_OPTIM_H
#define KFAC_EXAMPLE_OPTIM_H

#include "net.h"

typedef enum { OPT_KFAC, OPT_SGD, OPT_ADAM, OPT_KFAC_ADAPTIVE } method_t;

typedef struct {
    method_t method;
    const char *name;
    /* SGD and Adam (applied in float) */
    float lr, momentum;
    float beta1, beta2, eps;
    /* K-FAC (both modes) */
    double kfac_lr;          /* OPT_KFAC: step size, also η of the KL clip */
    double damping;          /* λ (the initial λ in the adaptive mode) */
    double factor_decay;     /* β of the factors' moving average */
    double kl_clip;          /* κ (OPT_KFAC) */
    int64_t inverse_period;  /* Ti */
    uint64_t fisher_seed;    /* sampled targets of the Fisher statistics */
    /* adaptive mode */
    int64_t lm_interval;     /* T₁ */
    double lm_decay;         /* ω₁ */
    double min_damping;      /* a floor the program keeps λ above (0: none) */
    double factor_damping;   /* γ (0: λ damps the factors too) */
    int64_t factor_damping_period; /* T₂ (0: γ fixed) */
} optim_config_t;

enum { MAX_CANDIDATES = 3 };

typedef struct {
    optim_config_t cfg;
    const net_t *net;
    params_t m, v;           /* SGD's momentum / Adam's first and second moments */
    int64_t t;               /* Adam's step count */
    kfac_optimizer *kfac;    /* K-FAC only */
    rng_t fisher_rng;        /* OPT_KFAC: sampled targets */
    uint8_t *sampled_labels; /* OPT_KFAC: [max_rows] */
    float *sampled_values;   /* OPT_KFAC: [max_rows][outputs] */
    /* OPT_KFAC_ADAPTIVE only: */
    params_t previous;       /* δ₀, the update applied at the last step */
    params_t candidate;      /* directions of one γ candidate */
    int has_previous;
    rop_buffers_t r_dir[MAX_CANDIDATES], r_prev; /* R-op results along D_k and δ₀ */
    uint64_t sample_seed;    /* seed of kfac_sample_output_grads_f32, one per call */
    /* of the last step: */
    double alpha, mu, rho, predicted;
    int32_t n_candidates, chosen;
    int64_t gamma_steps, gamma_changes; /* steps with γ candidates, and how often γ changed */
} optimizer_t;

optimizer_t optimizer_create(const net_t *net, const optim_config_t *cfg, int max_rows);
void optimizer_free(optimizer_t *o);

/* One update of p from the batch (x, t) of `rows` rows, right after net_forward (which
 * returned `loss`) and net_output_grad + net_backward filled `grads` (which K-FAC overwrites).
 * The adaptive mode evaluates the loss of the batch again after its update. */
void optimizer_update(optimizer_t *o, params_t *p, workspace_t *ws, params_t *grads,
                      const float *x, const targets_t *t, int rows, double loss);

/* Exits with a message unless a K-FAC optimizer's step counter is `steps` (no-op otherwise). */
void optimizer_check_step_count(const optimizer_t *o, int64_t steps);

/* A short description of the last step ("KL scale …", "α …, μ …, ρ …; λ …"), into buf. */
void optimizer_describe_step(const optimizer_t *o, char *buf, size_t size);

#endif
