/* net.c — see net.h. */
#include "net.h"

#include <cblas.h>

#include <math.h>
#include <string.h>

static int fan_in(const net_t *net, int l) { return net->sizes[l]; }
static int fan_out(const net_t *net, int l) { return net->sizes[l + 1]; }

void net_validate(const net_t *net) {
    int ok = net->n_layers >= 1 && net->n_layers <= NET_MAX_LAYERS &&
             net->act[net->n_layers - 1] == ACT_LINEAR &&
             (net->loss == LOSS_SOFTMAX_CE || net->loss == LOSS_BERNOULLI_CE);
    for (int l = 0; ok && l <= net->n_layers; l++) ok = net->sizes[l] >= 1;
    for (int l = 0; ok && l < net->n_layers; l++)
        ok = net->act[l] == ACT_LINEAR || net->act[l] == ACT_TANH || net->act[l] == ACT_SIGMOID;
    if (!ok) {
        fprintf(stderr, "invalid network description\n");
        exit(1);
    }
}

int net_inputs(const net_t *net) { return net->sizes[0]; }
int net_outputs(const net_t *net) { return net->sizes[net->n_layers]; }

const char *activation_name(activation_t a) {
    switch (a) {
    case ACT_TANH: return "tanh";
    case ACT_SIGMOID: return "sigmoid";
    case ACT_LINEAR: break;
    }
    return "linear";
}

void net_describe(const net_t *net, char *buf, size_t size) {
    size_t used = (size_t)snprintf(buf, size, "%d", net->sizes[0]);
    for (int l = 0; l < net->n_layers && used < size; l++) {
        if (l + 1 < net->n_layers)
            used += (size_t)snprintf(buf + used, size - used, "-%d(%s)", net->sizes[l + 1],
                                     activation_name(net->act[l]));
        else
            used += (size_t)snprintf(buf + used, size - used, "-%d", net->sizes[l + 1]);
    }
}

int net_kfac_distribution(const net_t *net) {
    return net->loss == LOSS_SOFTMAX_CE ? KFAC_DIST_CATEGORICAL : KFAC_DIST_BERNOULLI;
}

/* ------------------------------------------------------------------------------------------ */
/* Parameters                                                                                  */
/* ------------------------------------------------------------------------------------------ */

params_t params_alloc(const net_t *net) {
    params_t p;
    memset(&p, 0, sizeof p);
    for (int l = 0; l < net->n_layers; l++) {
        p.W[l] = xcalloc((size_t)fan_out(net, l) * fan_in(net, l), sizeof(float));
        p.b[l] = xcalloc((size_t)fan_out(net, l), sizeof(float));
    }
    return p;
}

void params_free(const net_t *net, params_t *p) {
    for (int l = 0; l < net->n_layers; l++) {
        free(p->W[l]);
        free(p->b[l]);
        p->W[l] = p->b[l] = NULL;
    }
}

void params_copy(const net_t *net, params_t *dst, const params_t *src) {
    for (int l = 0; l < net->n_layers; l++) {
        memcpy(dst->W[l], src->W[l], (size_t)fan_out(net, l) * fan_in(net, l) * sizeof(float));
        memcpy(dst->b[l], src->b[l], (size_t)fan_out(net, l) * sizeof(float));
    }
}

void params_zero(const net_t *net, params_t *p) {
    for (int l = 0; l < net->n_layers; l++) {
        memset(p->W[l], 0, (size_t)fan_out(net, l) * fan_in(net, l) * sizeof(float));
        memset(p->b[l], 0, (size_t)fan_out(net, l) * sizeof(float));
    }
}

void params_axpy(const net_t *net, float alpha, const params_t *x, params_t *y) {
    for (int l = 0; l < net->n_layers; l++) {
        cblas_saxpy(fan_out(net, l) * fan_in(net, l), alpha, x->W[l], 1, y->W[l], 1);
        cblas_saxpy(fan_out(net, l), alpha, x->b[l], 1, y->b[l], 1);
    }
}

void params_init_glorot(const net_t *net, params_t *p, uint64_t seed) {
    rng_t rng = {seed};
    for (int l = 0; l < net->n_layers; l++) {
        const int in = fan_in(net, l), out = fan_out(net, l);
        float scale = sqrtf(6.0f / (float)(in + out));
        for (int i = 0; i < out * in; i++) p->W[l][i] = scale * (2.0f * rng_uniform(&rng) - 1.0f);
        memset(p->b[l], 0, (size_t)out * sizeof(float));
    }
}

void params_init_sparse(const net_t *net, params_t *p, uint64_t seed, int k, double scale) {
    rng_t rng = {seed};
    for (int l = 0; l < net->n_layers; l++) {
        const int in = fan_in(net, l), out = fan_out(net, l), nonzero = k < in ? k : in;
        int *inputs = xcalloc((size_t)in, sizeof(int));
        for (int o = 0; o < out; o++) {
            float *row = p->W[l] + (size_t)o * in;
            memset(row, 0, (size_t)in * sizeof(float));
            /* The first `nonzero` entries of a partial Fisher–Yates shuffle of the inputs. */
            for (int i = 0; i < in; i++) inputs[i] = i;
            for (int i = 0; i < nonzero; i++) {
                int j = i + rng_below(&rng, in - i), t = inputs[i];
                inputs[i] = inputs[j];
                inputs[j] = t;
                row[inputs[i]] = (float)(scale * rng_normal(&rng));
            }
        }
        free(inputs);
        memset(p->b[l], 0, (size_t)out * sizeof(float));
    }
}

/* ------------------------------------------------------------------------------------------ */
/* Passes                                                                                      */
/* ------------------------------------------------------------------------------------------ */

workspace_t workspace_alloc(const net_t *net, int max_rows) {
    workspace_t ws;
    memset(&ws, 0, sizeof ws);
    ws.max_rows = max_rows;
    for (int l = 0; l < net->n_layers; l++) {
        ws.out[l] = xcalloc((size_t)max_rows * fan_out(net, l), sizeof(float));
        ws.dz[l] = xcalloc((size_t)max_rows * fan_out(net, l), sizeof(float));
        ws.act[l + 1] = ws.out[l];
    }
    ws.probs = xcalloc((size_t)max_rows * net_outputs(net), sizeof(float));
    return ws;
}

void workspace_free(const net_t *net, workspace_t *ws) {
    for (int l = 0; l < net->n_layers; l++) {
        free(ws->out[l]);
        free(ws->dz[l]);
    }
    free(ws->probs);
    memset(ws, 0, sizeof *ws);
}

rop_buffers_t rop_alloc(const net_t *net, int max_rows) {
    rop_buffers_t b;
    memset(&b, 0, sizeof b);
    for (int l = 0; l < net->n_layers; l++)
        b.r[l] = xcalloc((size_t)max_rows * fan_out(net, l), sizeof(float));
    return b;
}

void rop_free(const net_t *net, rop_buffers_t *b) {
    for (int l = 0; l < net->n_layers; l++) {
        free(b->r[l]);
        b->r[l] = NULL;
    }
}

static void apply_activation(activation_t a, float *s, size_t n) {
    switch (a) {
    case ACT_TANH:
        for (size_t i = 0; i < n; i++) s[i] = tanhf(s[i]);
        break;
    case ACT_SIGMOID:
        for (size_t i = 0; i < n; i++) s[i] = 1.0f / (1.0f + expf(-s[i]));
        break;
    case ACT_LINEAR:
        break;
    }
}

/* x ← φ'(s) ⊙ x, with φ' written through the activation's value h = φ(s). */
static void times_activation_derivative(activation_t a, const float *h, float *x, size_t n) {
    switch (a) {
    case ACT_TANH:
        for (size_t i = 0; i < n; i++) x[i] *= 1.0f - h[i] * h[i];
        break;
    case ACT_SIGMOID:
        for (size_t i = 0; i < n; i++) x[i] *= h[i] * (1.0f - h[i]);
        break;
    case ACT_LINEAR:
        break;
    }
}

/* Softmax of each row (max subtracted) into probs; the summed cross-entropy in double. */
static double softmax_cross_entropy(const float *logits, int rows, int classes,
                                    const uint8_t *labels, float *probs) {
    double loss = 0.0;
    for (int r = 0; r < rows; r++) {
        const float *z = logits + (size_t)r * classes;
        float *pr = probs + (size_t)r * classes;
        float zmax = z[0];
        for (int c = 1; c < classes; c++) zmax = z[c] > zmax ? z[c] : zmax;
        double sum = 0.0;
        for (int c = 0; c < classes; c++) sum += exp((double)(z[c] - zmax));
        for (int c = 0; c < classes; c++) pr[c] = (float)(exp((double)(z[c] - zmax)) / sum);
        if (labels) loss += log(sum) - (double)(z[labels[r]] - zmax);
    }
    return loss;
}

/* Sigmoids of the logits into probs; Σ softplus(z) − t z over all entries, summed in double
 * (softplus(z) = max(z, 0) + log1p(e^−|z|), the e^−|z| of the sigmoid reused). */
static double bernoulli_cross_entropy(const float *logits, size_t n, const float *targets,
                                      float *probs) {
    double loss = 0.0;
    for (size_t i = 0; i < n; i++) {
        const float z = logits[i];
        const float e = expf(-fabsf(z)); /* in (0, 1]: no overflow for either sign */
        probs[i] = z >= 0.0f ? 1.0f / (1.0f + e) : e / (1.0f + e);
        if (targets) loss += (double)((z > 0.0f ? z : 0.0f) - targets[i] * z + log1pf(e));
    }
    return loss;
}

double net_forward(const net_t *net, const params_t *p, workspace_t *ws, const float *x,
                   const targets_t *t, int rows) {
    ws->act[0] = x;
    for (int l = 0; l < net->n_layers; l++) {
        const int in = fan_in(net, l), out = fan_out(net, l);
        float *s = ws->out[l];
        /* s = a Wᵀ + b: [rows][in] × [in][out] */
        for (int r = 0; r < rows; r++) memcpy(s + (size_t)r * out, p->b[l], out * sizeof(float));
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, ws->act[l], in,
                    p->W[l], in, 1.0f, s, out);
        apply_activation(net->act[l], s, (size_t)rows * out);
    }
    const float *logits = workspace_logits(net, ws);
    const int outputs = net_outputs(net);
    double loss;
    if (net->loss == LOSS_SOFTMAX_CE)
        loss = softmax_cross_entropy(logits, rows, outputs, t ? t->labels : NULL, ws->probs);
    else
        loss = bernoulli_cross_entropy(logits, (size_t)rows * outputs, t ? t->values : NULL,
                                       ws->probs);
    return loss / rows;
}

void net_output_grad(const net_t *net, workspace_t *ws, const targets_t *t, int rows) {
    const int outputs = net_outputs(net);
    const float inv_rows = 1.0f / (float)rows;
    float *dz = ws->dz[net->n_layers - 1];
    if (net->loss == LOSS_SOFTMAX_CE) {
        for (int r = 0; r < rows; r++)
            for (int c = 0; c < outputs; c++)
                dz[r * outputs + c] =
                    (ws->probs[r * outputs + c] - (c == t->labels[r] ? 1.0f : 0.0f)) * inv_rows;
    } else {
        for (size_t i = 0; i < (size_t)rows * outputs; i++)
            dz[i] = (ws->probs[i] - t->values[i]) * inv_rows;
    }
}

void net_sample_targets(const net_t *net, const workspace_t *ws, int rows, rng_t *rng,
                        uint8_t *labels, float *values) {
    const int outputs = net_outputs(net);
    if (net->loss == LOSS_SOFTMAX_CE) {
        for (int r = 0; r < rows; r++) {
            const float *pr = ws->probs + (size_t)r * outputs;
            float u = rng_uniform(rng), cum = 0.0f;
            int c = 0;
            for (; c < outputs - 1; c++) {
                cum += pr[c];
                if (u < cum) break;
            }
            labels[r] = (uint8_t)c;
        }
    } else {
        for (size_t i = 0; i < (size_t)rows * outputs; i++)
            values[i] = rng_uniform(rng) < ws->probs[i] ? 1.0f : 0.0f;
    }
}

void net_backward(const net_t *net, const params_t *p, workspace_t *ws, int rows, params_t *grads) {
    for (int l = net->n_layers - 1; l >= 0; l--) {
        const int in = fan_in(net, l), out = fan_out(net, l);
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
            /* ∂/∂a = dz W: [rows][out] × [out][in]; then through the activation of layer l−1 */
            float *dprev = ws->dz[l - 1];
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, rows, in, out, 1.0f, dz, out,
                        p->W[l], in, 0.0f, dprev, in);
            times_activation_derivative(net->act[l - 1], ws->act[l], dprev, (size_t)rows * in);
        }
    }
}

void net_r_op(const net_t *net, const params_t *p, const workspace_t *ws, const params_t *v,
              int rows, float *const *r) {
    for (int l = 0; l < net->n_layers; l++) {
        const int in = fan_in(net, l), out = fan_out(net, l);
        float *rs = r[l];
        for (int i = 0; i < rows; i++) memcpy(rs + (size_t)i * out, v->b[l], out * sizeof(float));
        /* + a vWᵀ */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, ws->act[l], in,
                    v->W[l], in, 1.0f, rs, out);
        /* + R(a) Wᵀ */
        if (l > 0)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, rows, out, in, 1.0f, r[l - 1], in,
                        p->W[l], in, 1.0f, rs, out);
        times_activation_derivative(net->act[l], ws->act[l + 1], rs, (size_t)rows * out);
    }
}
