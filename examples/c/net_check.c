/*
 * net_check.c — checks the example network's passes (net.c: float, CBLAS) against a reference
 * written separately here: a plain-loop forward pass in double precision, and central finite
 * differences of it (ε = 1e-5, accurate to ~1e-9 in double).
 *
 * At random parameters θ (biases included), inputs and targets, for random directions v — three
 * on all parameters, then one on each layer's weights alone and one on each layer's biases alone,
 * so that a mistake in one layer's term is not diluted by the others:
 *   forward    the float logits and mean loss against the double reference at θ;
 *   R-op       J·v from net_r_op against (f(θ + εv) − f(θ − εv)) / 2ε of the double logits,
 *              error ‖a − b‖ / ‖b‖ over all rows and outputs;
 *   backward   ⟨∇L, v⟩ from net_backward's parameter gradients (dW_l = dz_lᵀ a_l, db_l = Σ dz_l:
 *              so also the output gradients dz_l K-FAC records) against the difference of the
 *              double mean loss, error |a − b| / Σ_i |∇L_i v_i| (a dot product's rounding scale,
 *              immune to accidental cancellation).
 * The float passes are right to ~1e-6; a wrong derivative, a missing term or a transposed
 * product gives errors of 1e-2 and more. The tolerance is 1e-4.
 */
#include "net.h"

#include <math.h>
#include <string.h>

enum { CHECK_ROWS = 9, CHECK_POINTS = 2, CHECK_DIRECTIONS = 3 };
static const double CHECK_EPSILON = 1e-5;
static const double CHECK_TOLERANCE = 1e-4;

/* Parameters in double, one contiguous [W | b] block per layer: W [out][in] then b [out]. */
typedef struct { double *layer[NET_MAX_LAYERS]; } dparams_t;

static size_t layer_values(const net_t *net, int l) {
    return (size_t)net->sizes[l + 1] * (size_t)(net->sizes[l] + 1);
}

static dparams_t dparams_alloc(const net_t *net) {
    dparams_t d;
    memset(&d, 0, sizeof d);
    for (int l = 0; l < net->n_layers; l++) d.layer[l] = xcalloc(layer_values(net, l), sizeof(double));
    return d;
}

static void dparams_free(const net_t *net, dparams_t *d) {
    for (int l = 0; l < net->n_layers; l++) free(d->layer[l]);
}

/* d = θ + h·v (v may be NULL for d = θ). */
static void dparams_point(const net_t *net, const params_t *theta, const params_t *v, double h,
                          dparams_t *d) {
    for (int l = 0; l < net->n_layers; l++) {
        const size_t nw = (size_t)net->sizes[l + 1] * net->sizes[l], nb = net->sizes[l + 1];
        for (size_t i = 0; i < nw; i++)
            d->layer[l][i] = (double)theta->W[l][i] + (v ? h * (double)v->W[l][i] : 0.0);
        for (size_t i = 0; i < nb; i++)
            d->layer[l][nw + i] = (double)theta->b[l][i] + (v ? h * (double)v->b[l][i] : 0.0);
    }
}

/* The reference forward pass: logits [rows][outputs] and, if mean_loss is not NULL, the mean
 * loss against the targets. Plain loops, double throughout. */
static void reference_forward(const net_t *net, const dparams_t *d, const float *x,
                              const targets_t *t, int rows, double *logits, double *mean_loss) {
    int width = 0;
    for (int l = 0; l <= net->n_layers; l++) width = net->sizes[l] > width ? net->sizes[l] : width;
    double *a = xcalloc((size_t)width, sizeof(double)), *s = xcalloc((size_t)width, sizeof(double));
    const int outputs = net_outputs(net);
    double loss = 0.0;
    for (int r = 0; r < rows; r++) {
        for (int i = 0; i < net->sizes[0]; i++) a[i] = (double)x[(size_t)r * net->sizes[0] + i];
        for (int l = 0; l < net->n_layers; l++) {
            const int in = net->sizes[l], out = net->sizes[l + 1];
            const double *W = d->layer[l], *b = d->layer[l] + (size_t)out * in;
            for (int o = 0; o < out; o++) {
                double sum = b[o];
                for (int i = 0; i < in; i++) sum += W[(size_t)o * in + i] * a[i];
                s[o] = sum;
            }
            for (int o = 0; o < out; o++) {
                if (net->act[l] == ACT_TANH) a[o] = tanh(s[o]);
                else if (net->act[l] == ACT_SIGMOID) a[o] = 1.0 / (1.0 + exp(-s[o]));
                else a[o] = s[o];
            }
        }
        memcpy(logits + (size_t)r * outputs, a, (size_t)outputs * sizeof(double));
        if (net->loss == LOSS_SOFTMAX_CE) {
            double zmax = a[0], sum = 0.0;
            for (int c = 1; c < outputs; c++) zmax = fmax(zmax, a[c]);
            for (int c = 0; c < outputs; c++) sum += exp(a[c] - zmax);
            if (t) loss += zmax + log(sum) - a[t->labels[r]];
        } else if (t) {
            for (int j = 0; j < outputs; j++) {
                const double z = a[j], y = (double)t->values[(size_t)r * outputs + j];
                /* −y log σ(z) − (1 − y) log(1 − σ(z)) */
                loss += y * log1p(exp(-z)) + (1.0 - y) * log1p(exp(z));
            }
        }
    }
    if (mean_loss) *mean_loss = loss / rows;
    free(a);
    free(s);
}

static double relative_error(const double *approx, const double *exact, size_t n) {
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < n; i++) {
        diff += (approx[i] - exact[i]) * (approx[i] - exact[i]);
        norm += exact[i] * exact[i];
    }
    return norm > 0.0 ? sqrt(diff / norm) : sqrt(diff);
}

static void fill_uniform(float *x, size_t n, rng_t *rng, float lo, float hi) {
    for (size_t i = 0; i < n; i++) x[i] = lo + (hi - lo) * rng_uniform(rng);
}

/* Σ_i a_i b_i and Σ_i |a_i b_i| over all parameters (the latter scales the rounding error of
 * the former: a dot product's natural normalisation, immune to accidental cancellation). */
static void params_dot(const net_t *net, const params_t *a, const params_t *b, double *dot,
                       double *abs_dot) {
    *dot = *abs_dot = 0.0;
    for (int l = 0; l < net->n_layers; l++) {
        const size_t nw = (size_t)net->sizes[l + 1] * net->sizes[l], nb = net->sizes[l + 1];
        for (size_t i = 0; i < nw + nb; i++) {
            const double term = i < nw ? (double)a->W[l][i] * (double)b->W[l][i]
                                       : (double)a->b[l][i - nw] * (double)b->b[l][i - nw];
            *dot += term;
            *abs_dot += fabs(term);
        }
    }
}

/* A random direction: case < 0 on every parameter; otherwise only the weights (case even) or
 * only the biases (case odd) of layer case / 2, zero elsewhere. */
static void random_direction(const net_t *net, int which, rng_t *rng, params_t *v) {
    params_zero(net, v);
    for (int l = 0; l < net->n_layers; l++) {
        if (which < 0 || (which / 2 == l && which % 2 == 0))
            fill_uniform(v->W[l], (size_t)net->sizes[l + 1] * net->sizes[l], rng, -1.0f, 1.0f);
        if (which < 0 || (which / 2 == l && which % 2 == 1))
            fill_uniform(v->b[l], (size_t)net->sizes[l + 1], rng, -1.0f, 1.0f);
    }
}

int net_check(const net_t *net, uint64_t seed) {
    net_validate(net);
    const int rows = CHECK_ROWS, inputs = net_inputs(net), outputs = net_outputs(net);
    const size_t n_out = (size_t)rows * outputs;
    rng_t rng = {seed};
    char name[256];
    net_describe(net, name, sizeof name);

    params_t theta = params_alloc(net), v = params_alloc(net), grads = params_alloc(net);
    workspace_t ws = workspace_alloc(net, rows);
    rop_buffers_t rop = rop_alloc(net, rows);
    dparams_t dp = dparams_alloc(net);
    float *x = xcalloc((size_t)rows * inputs, sizeof(float));
    float *values = xcalloc(n_out, sizeof(float));
    uint8_t *labels = xcalloc((size_t)rows, 1);
    double *ref = xcalloc(n_out, sizeof(double)), *plus = xcalloc(n_out, sizeof(double));
    double *minus = xcalloc(n_out, sizeof(double)), *got = xcalloc(n_out, sizeof(double));
    double worst_forward = 0.0, worst_loss = 0.0, worst_rop = 0.0, worst_grad = 0.0;
    int directions = 0;

    for (int point = 0; point < CHECK_POINTS; point++) {
        /* Weights of the size of Glorot's, biases up to ±0.5: units away from saturation and
         * from the linear regime, so each activation's derivative matters. */
        for (int l = 0; l < net->n_layers; l++) {
            const float scale = 1.5f / sqrtf((float)net->sizes[l]);
            fill_uniform(theta.W[l], (size_t)net->sizes[l + 1] * net->sizes[l], &rng, -scale, scale);
            fill_uniform(theta.b[l], (size_t)net->sizes[l + 1], &rng, -0.5f, 0.5f);
        }
        fill_uniform(x, (size_t)rows * inputs, &rng, 0.0f, 1.0f);
        fill_uniform(values, n_out, &rng, 0.0f, 1.0f);
        for (int r = 0; r < rows; r++) labels[r] = (uint8_t)rng_below(&rng, outputs);
        const targets_t t = {labels, values};

        const double loss = net_forward(net, &theta, &ws, x, &t, rows);
        double ref_loss;
        dparams_point(net, &theta, NULL, 0.0, &dp);
        reference_forward(net, &dp, x, &t, rows, ref, &ref_loss);
        const float *logits = workspace_logits(net, &ws);
        for (size_t i = 0; i < n_out; i++) got[i] = (double)logits[i];
        worst_forward = fmax(worst_forward, relative_error(got, ref, n_out));
        worst_loss = fmax(worst_loss, fabs(loss - ref_loss) / fabs(ref_loss));

        net_output_grad(net, &ws, &t, rows);
        net_backward(net, &theta, &ws, rows, &grads);

        /* Directions on every parameter, then on each layer's weights and biases alone (so that
         * a mistake in one layer's term is not diluted by the others). */
        for (int which = -CHECK_DIRECTIONS; which < 2 * net->n_layers; which++) {
            random_direction(net, which < 0 ? -1 : which, &rng, &v);
            directions++;
            /* J·v against the central difference of the reference logits. */
            double loss_plus, loss_minus;
            dparams_point(net, &theta, &v, CHECK_EPSILON, &dp);
            reference_forward(net, &dp, x, &t, rows, plus, &loss_plus);
            dparams_point(net, &theta, &v, -CHECK_EPSILON, &dp);
            reference_forward(net, &dp, x, &t, rows, minus, &loss_minus);
            for (size_t i = 0; i < n_out; i++) plus[i] = (plus[i] - minus[i]) / (2.0 * CHECK_EPSILON);
            net_r_op(net, &theta, &ws, &v, rows, rop.r);
            const float *jv = rop.r[net->n_layers - 1];
            for (size_t i = 0; i < n_out; i++) got[i] = (double)jv[i];
            worst_rop = fmax(worst_rop, relative_error(got, plus, n_out));

            /* ⟨∇L, v⟩ against the central difference of the reference loss. */
            const double fd = (loss_plus - loss_minus) / (2.0 * CHECK_EPSILON);
            double dot, abs_dot;
            params_dot(net, &grads, &v, &dot, &abs_dot);
            worst_grad = fmax(worst_grad, fabs(dot - fd) / abs_dot);
        }
    }

    const int ok = worst_forward < CHECK_TOLERANCE && worst_loss < CHECK_TOLERANCE &&
                   worst_rop < CHECK_TOLERANCE && worst_grad < CHECK_TOLERANCE;
    printf("check %s, %s: largest relative errors against a double-precision reference\n"
           "  (%d random points, %d directions, %d rows; tolerance %.0e):\n"
           "  forward logits %.2e, mean loss %.2e; R-op J·v vs central differences %.2e;\n"
           "  backward <grad, v> vs central differences %.2e  -> %s\n",
           name, net->loss == LOSS_SOFTMAX_CE ? "softmax cross-entropy" : "Bernoulli cross-entropy",
           CHECK_POINTS, directions, rows, CHECK_TOLERANCE, worst_forward, worst_loss, worst_rop,
           worst_grad, ok ? "ok" : "FAILED");
    if (!ok) fprintf(stderr, "net_check: %s: a pass disagrees with finite differences\n", name);

    free(got);
    free(minus);
    free(plus);
    free(ref);
    free(labels);
    free(values);
    free(x);
    dparams_free(net, &dp);
    rop_free(net, &rop);
    workspace_free(net, &ws);
    params_free(net, &grads);
    params_free(net, &v);
    params_free(net, &theta);
    return ok ? 0 : 1;
}
