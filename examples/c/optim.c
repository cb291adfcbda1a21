/*
 * optim.c — see optim.h.
 *
 * The adaptive mode goes through libkfac's candidate API (kfac_candidates_get_count,
 * kfac_candidates_get_directions_f32, kfac_candidates_solve_step_size_f32), then
 * kfac_adaptive_get_update_f32: the loop sketched in kfac.h's "Adaptive mode", where one loop
 * serves every step, a step that is not a γ step (KFAC_PARAM_FACTOR_DAMPING_PERIOD) having one
 * candidate. The candidate calls are in kfac.h's experimental section (since 0.2), so this file
 * opts in before kfac.h is first included (through optim.h and common.h).
 */
#define KFAC_EXPERIMENTAL_API
#include "optim.h"

#include <math.h>
#include <string.h>

optimizer_t optimizer_create(const net_t *net, const optim_config_t *cfg, int max_rows) {
    optimizer_t o;
    memset(&o, 0, sizeof o);
    o.cfg = *cfg;
    o.net = net;
    o.m = params_alloc(net);
    o.v = params_alloc(net);
    if (cfg->method != OPT_KFAC && cfg->method != OPT_KFAC_ADAPTIVE) return o;

    int status = kfac_optimizer_create(KFAC_FLOAT32, &o.kfac);
    if (status != KFAC_OK) {
        fprintf(stderr, "kfac_optimizer_create: %s\n", kfac_status_string(status));
        exit(1);
    }
    kfac_optimizer *k = o.kfac;
    for (int l = 0; l < net->n_layers; l++) {
        const kfac_dense_desc desc = {.struct_size = sizeof desc,
                                      .in_features = net->sizes[l],
                                      .out_features = net->sizes[l + 1],
                                      .has_bias = 1};
        int32_t id;
        KFAC_CHECK(k, kfac_layer_add_dense(k, &desc, &id));
        if (id != l) {
            fprintf(stderr, "unexpected layer id %d for layer %d\n", (int)id, l);
            exit(1);
        }
    }
    /* Our backward pass differentiates the MEAN loss: let the library rescale output grads. */
    KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_LOSS_REDUCTION, KFAC_REDUCTION_MEAN));
    KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_INVERSE_STRATEGY, KFAC_INVERSE_EIGEN));
    KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_FACTOR_UPDATE_PERIOD, 1));
    KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_INVERSE_UPDATE_PERIOD, cfg->inverse_period));
    KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_FACTOR_DECAY, cfg->factor_decay));
    KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_DAMPING, cfg->damping));
    if (cfg->method == OPT_KFAC_ADAPTIVE) {
        /* α replaces the learning rate and the KL clip; λ follows Levenberg–Marquardt. */
        KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_KL_CLIP, 0.0));
        KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_LM_INTERVAL, cfg->lm_interval));
        KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_LM_DECAY, cfg->lm_decay));
        if (cfg->factor_damping > 0)
            KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_FACTOR_DAMPING, cfg->factor_damping));
        KFAC_CHECK(k, kfac_param_set_int(k, KFAC_PARAM_FACTOR_DAMPING_PERIOD,
                                         cfg->factor_damping_period));
        o.previous = params_alloc(net);
        o.candidate = params_alloc(net);
        for (int c = 0; c < MAX_CANDIDATES; c++) o.r_dir[c] = rop_alloc(net, max_rows);
        o.r_prev = rop_alloc(net, max_rows);
        o.sample_seed = cfg->fisher_seed;
        return o;
    }
    KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_KL_CLIP, cfg->kl_clip));
    /* η of the KL clip is the step size actually applied to the direction. */
    KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_LEARNING_RATE, cfg->kfac_lr));
    o.fisher_rng.state = cfg->fisher_seed;
    o.sampled_labels = xcalloc((size_t)max_rows, 1);
    o.sampled_values = xcalloc((size_t)max_rows * net_outputs(net), sizeof(float));
    return o;
}

void optimizer_free(optimizer_t *o) {
    const net_t *net = o->net;
    params_free(net, &o->m);
    params_free(net, &o->v);
    free(o->sampled_labels);
    free(o->sampled_values);
    kfac_optimizer_free(o->kfac);
    if (o->cfg.method == OPT_KFAC_ADAPTIVE) {
        params_free(net, &o->previous);
        params_free(net, &o->candidate);
        for (int c = 0; c < MAX_CANDIDATES; c++) rop_free(net, &o->r_dir[c]);
        rop_free(net, &o->r_prev);
    }
}

static void record_inputs(kfac_optimizer *k, const net_t *net, const workspace_t *ws, int rows) {
    for (int l = 0; l < net->n_layers; l++)
        KFAC_CHECK(k, kfac_layer_record_inputs_f32(k, l, ws->act[l], rows));
}

static void record_output_grads(kfac_optimizer *k, const net_t *net, const workspace_t *ws,
                                int rows) {
    for (int l = net->n_layers - 1; l >= 0; l--)
        KFAC_CHECK(k, kfac_layer_record_output_grads_f32(k, l, ws->dz[l], rows));
}

/* K-FAC: record Fisher statistics when the library wants them, then precondition `grads`
 * in place and apply them. */
static void kfac_update(optimizer_t *o, params_t *p, workspace_t *ws, params_t *grads, int rows) {
    kfac_optimizer *k = o->kfac;
    int32_t wanted = 0;
    KFAC_CHECK(k, kfac_optimizer_wants_statistics(k, &wanted));
    if (wanted) {
        record_inputs(k, o->net, ws, rows);
        /* Output gradients for targets drawn from the model's predictive distribution. The
         * parameter gradients in `grads` were computed already, so ws->dz may be reused. */
        net_sample_targets(o->net, ws, rows, &o->fisher_rng, o->sampled_labels, o->sampled_values);
        const targets_t sampled = {o->sampled_labels, o->sampled_values};
        net_output_grad(o->net, ws, &sampled, rows);
        net_backward(o->net, p, ws, rows, NULL);
        record_output_grads(k, o->net, ws, rows);
    }
    KFAC_CHECK(k, kfac_optimizer_step_f32(k, grads->W, grads->b, o->net->n_layers));
    /* grads now holds the KL-clipped directions. */
    params_axpy(o->net, -(float)o->cfg.kfac_lr, grads, p);
}

/* The quadratic model's α, μ and M(δ) for the directions of the last step, and the update δ
 * into o->previous (which held δ₀). `grads` holds the directions D (candidate 0). The R-op
 * products are taken at the activations of θ, still in ws. */
static void adaptive_solve(optimizer_t *o, const params_t *p, const workspace_t *ws,
                           const params_t *grads, int rows) {
    kfac_optimizer *k = o->kfac;
    const net_t *net = o->net;
    const int last = net->n_layers - 1;
    const float *logits = workspace_logits(net, ws);
    if (o->has_previous) net_r_op(net, p, ws, &o->previous, rows, o->r_prev.r);
    const float *jp = o->has_previous ? o->r_prev.r[last] : NULL; /* μ = 0 without δ₀ */
    /* One candidate per factor damping the step prepared (3 on a γ step, else 1): J·D_k each. */
    int32_t n = 0;
    KFAC_CHECK(k, kfac_candidates_get_count(k, &n));
    if (n < 1 || n > MAX_CANDIDATES) {
        fprintf(stderr, "kfac_candidates_get_count: unexpected count %d\n", (int)n);
        exit(1);
    }
    const float *jd[MAX_CANDIDATES];
    for (int32_t c = 0; c < n; c++) {
        const params_t *dir = grads; /* candidate 0 is what kfac_optimizer_step_f32 wrote */
        if (c > 0) {
            KFAC_CHECK(k, kfac_candidates_get_directions_f32(k, c, o->candidate.W, o->candidate.b,
                                                             net->n_layers, NULL));
            dir = &o->candidate;
        }
        net_r_op(net, p, ws, dir, rows, o->r_dir[c].r);
        jd[c] = o->r_dir[c].r[last];
    }
    KFAC_CHECK(k, kfac_candidates_solve_step_size_f32(k, logits, jd, n, jp, rows, net_outputs(net),
                                                      net_kfac_distribution(net), &o->chosen,
                                                      &o->alpha, &o->mu, &o->predicted));
    o->n_candidates = n;
    if (n > 1) {
        o->gamma_steps++;
        o->gamma_changes += o->chosen != 0;
    }
    /* δ = −α D_chosen + μ δ₀, which the library keeps as the next δ₀ too. */
    KFAC_CHECK(k, kfac_adaptive_get_update_f32(k, o->previous.W, o->previous.b, net->n_layers));
}

/* Adaptive K-FAC: statistics (true Fisher through the library's sampler), directions, α and μ
 * from the quadratic model, the update, and the Levenberg–Marquardt report. */
static void kfac_adaptive_update(optimizer_t *o, params_t *p, workspace_t *ws, params_t *grads,
                                 const float *x, const targets_t *t, int rows, double loss) {
    kfac_optimizer *k = o->kfac;
    const net_t *net = o->net;
    int32_t wanted = 0;
    KFAC_CHECK(k, kfac_optimizer_wants_statistics(k, &wanted));
    if (wanted) {
        record_inputs(k, net, ws, rows);
        /* p − y at sampled targets y (gradients of the summed loss); our backward pass
         * differentiates the mean loss, so divide by the rows (LOSS_REDUCTION is MEAN). */
        float *dz_out = ws->dz[net->n_layers - 1];
        const size_t n_out = (size_t)rows * net_outputs(net);
        KFAC_CHECK(k, kfac_sample_output_grads_f32(workspace_logits(net, ws), rows,
                                                    net_outputs(net), net_kfac_distribution(net),
                                                    o->sample_seed++, dz_out));
        for (size_t i = 0; i < n_out; i++) dz_out[i] /= (float)rows;
        net_backward(net, p, ws, rows, NULL);
        record_output_grads(k, net, ws, rows);
    }
    /* grads now hold D */
    KFAC_CHECK(k, kfac_optimizer_step_f32(k, grads->W, grads->b, net->n_layers));

    adaptive_solve(o, p, ws, grads, rows);
    params_axpy(net, 1.0f, &o->previous, p); /* θ ← θ + δ; δ becomes δ₀ */
    o->has_previous = 1;

    /* The batch loss after the update, for ρ = (h(θ + δ) − h(θ)) / M(δ). */
    const double after = net_forward(net, p, ws, x, t, rows);
    if (!isfinite(after)) {
        /* Not expected with the quadratic model's α; undo and damp more rather than abort.
         * (δ₀ stays δ: that is the library's copy of the previous update too.) */
        params_axpy(net, -1.0f, &o->previous, p);
        double lambda;
        KFAC_CHECK(k, kfac_param_get_double(k, KFAC_PARAM_DAMPING, &lambda));
        KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_DAMPING, 10.0 * lambda));
        o->rho = NAN;
        return;
    }
    KFAC_CHECK(k, kfac_adaptive_report_loss_change(k, loss, after, &o->rho));
    if (o->cfg.min_damping > 0) {
        double lambda;
        KFAC_CHECK(k, kfac_param_get_double(k, KFAC_PARAM_DAMPING, &lambda));
        if (lambda < o->cfg.min_damping)
            KFAC_CHECK(k, kfac_param_set_double(k, KFAC_PARAM_DAMPING, o->cfg.min_damping));
    }
}

static void sgd_update_array(const optim_config_t *c, float *w, float *m, const float *g,
                             size_t n) {
    for (size_t i = 0; i < n; i++) {
        m[i] = c->momentum * m[i] + g[i];
        w[i] -= c->lr * m[i];
    }
}

static void adam_update_array(const optim_config_t *c, float *w, float *m, float *v,
                              const float *g, size_t n, float step_size) {
    for (size_t i = 0; i < n; i++) {
        m[i] = c->beta1 * m[i] + (1.0f - c->beta1) * g[i];
        v[i] = c->beta2 * v[i] + (1.0f - c->beta2) * g[i] * g[i];
        w[i] -= step_size * m[i] / (sqrtf(v[i]) + c->eps);
    }
}

void optimizer_update(optimizer_t *o, params_t *p, workspace_t *ws, params_t *grads,
                      const float *x, const targets_t *t, int rows, double loss) {
    const net_t *net = o->net;
    const optim_config_t *c = &o->cfg;
    switch (c->method) {
    case OPT_KFAC:
        kfac_update(o, p, ws, grads, rows);
        break;
    case OPT_KFAC_ADAPTIVE:
        kfac_adaptive_update(o, p, ws, grads, x, t, rows, loss);
        break;
    case OPT_SGD:
        for (int l = 0; l < net->n_layers; l++) {
            const size_t nb = (size_t)net->sizes[l + 1], nw = nb * (size_t)net->sizes[l];
            sgd_update_array(c, p->W[l], o->m.W[l], grads->W[l], nw);
            sgd_update_array(c, p->b[l], o->m.b[l], grads->b[l], nb);
        }
        break;
    case OPT_ADAM: {
        o->t++;
        /* Bias corrections folded into the step size (Kingma & Ba 2015, §2). */
        const double c1 = 1.0 - pow(c->beta1, (double)o->t);
        const double c2 = 1.0 - pow(c->beta2, (double)o->t);
        const float step_size = (float)(c->lr * sqrt(c2) / c1);
        for (int l = 0; l < net->n_layers; l++) {
            const size_t nb = (size_t)net->sizes[l + 1], nw = nb * (size_t)net->sizes[l];
            adam_update_array(c, p->W[l], o->m.W[l], o->v.W[l], grads->W[l], nw, step_size);
            adam_update_array(c, p->b[l], o->m.b[l], o->v.b[l], grads->b[l], nb, step_size);
        }
        break;
    }
    }
}

void optimizer_check_step_count(const optimizer_t *o, int64_t steps) {
    if (!o->kfac) return;
    int64_t count = -1;
    KFAC_CHECK(o->kfac, kfac_optimizer_get_step_count(o->kfac, &count));
    if (count != steps) {
        fprintf(stderr, "kfac_optimizer_get_step_count = %lld, expected %lld\n", (long long)count,
                (long long)steps);
        exit(1);
    }
}

void optimizer_describe_step(const optimizer_t *o, char *buf, size_t size) {
    buf[0] = '\0';
    if (o->cfg.method == OPT_KFAC) {
        double nu = NAN; /* no step yet: NO_STEP leaves it NaN */
        const int status = kfac_optimizer_get_kl_scale(o->kfac, &nu);
        if (status != KFAC_OK && status != KFAC_ERROR_NO_STEP) KFAC_CHECK(o->kfac, status);
        snprintf(buf, size, "   (KL scale of last step %.3g)", nu);
    } else if (o->cfg.method == OPT_KFAC_ADAPTIVE) {
        double lambda = 0, gamma = 0;
        KFAC_CHECK(o->kfac, kfac_param_get_double(o->kfac, KFAC_PARAM_DAMPING, &lambda));
        KFAC_CHECK(o->kfac, kfac_param_get_double(o->kfac, KFAC_PARAM_FACTOR_DAMPING, &gamma));
        int used = snprintf(buf, size, "   (last step: α %.3g, μ %.3g, ρ %.2f; λ %.3g", o->alpha,
                            o->mu, o->rho, lambda);
        if (used >= 0 && (size_t)used < size && gamma > 0)
            used += snprintf(buf + used, size - used, ", γ %.3g", gamma);
        if (used >= 0 && (size_t)used < size)
            snprintf(buf + used, size - used, ")");
    }
}
