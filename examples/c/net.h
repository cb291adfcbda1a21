/*
 * net.h — the small fully connected network the C examples train: dense layers with a per-layer
 * activation (tanh, logistic sigmoid or linear), a softmax cross-entropy or Bernoulli
 * cross-entropy output, and the three passes a K-FAC trainer needs, with CBLAS sgemm:
 *
 *   forward   s_l = W_l a_l + b_l,  a_{l+1} = φ_l(s_l)   (a_0 = x; the last layer is linear:
 *             its s are the logits the loss takes);
 *   backward  from the gradient at the logits: ∂/∂s_l for every layer (the output gradients
 *             K-FAC records) and, optionally, the parameter gradients;
 *   R-op      forward mode (Pearlmutter 1994): J·v, the derivative of the logits along a
 *             parameter direction v, at the activations of the last forward pass:
 *             R(a_0) = 0,  R(s_l) = vW_l a_l + W_l R(a_l) + vb_l,  R(a_{l+1}) = φ_l'(s_l) ⊙ R(s_l).
 *
 * Losses (per example n; the training loss is their MEAN over the batch):
 *   LOSS_SOFTMAX_CE    ℓ_n = −log softmax(z_n)[y_n]                 (labels y_n)
 *   LOSS_BERNOULLI_CE  ℓ_n = Σ_j [softplus(z_nj) − t_nj z_nj]       (targets t_nj in [0, 1]):
 *                      binary cross-entropy of σ(z_nj) against t_nj, SUMMED over the outputs.
 * Both have ∂ℓ_n/∂z_n = p_n − t_n (p the softmax or the sigmoids, t one-hot or the targets),
 * which is what kfac.h's KFAC_DIST_CATEGORICAL and KFAC_DIST_BERNOULLI take as outputs.
 *
 * All matrices are row-major; W_l is [out][in] and b_l is [out], as libkfac expects.
 */
#ifndef KFAC_EXAMPLE_NET_H
#define KFAC_EXAMPLE_NET_H

#include "common.h"

#include <stdint.h>

typedef enum { ACT_LINEAR = 0, ACT_TANH = 1, ACT_SIGMOID = 2 } activation_t;
typedef enum { LOSS_SOFTMAX_CE = 0, LOSS_BERNOULLI_CE = 1 } loss_t;

enum { NET_MAX_LAYERS = 12 };

/* The architecture. act[l] is applied to layer l's output; act[n_layers - 1] must be
 * ACT_LINEAR (the loss takes logits). */
typedef struct {
    int n_layers;
    int sizes[NET_MAX_LAYERS + 1]; /* sizes[0] inputs, sizes[l + 1] outputs of layer l */
    activation_t act[NET_MAX_LAYERS];
    loss_t loss;
} net_t;

/* Exits with a message if the description is not usable. */
void net_validate(const net_t *net);
int net_inputs(const net_t *net);
int net_outputs(const net_t *net);
/* "64-128(tanh)-64(tanh)-10" style description into buf. */
void net_describe(const net_t *net, char *buf, size_t size);
const char *activation_name(activation_t a);

/* The libkfac output distribution of the loss: KFAC_DIST_CATEGORICAL or KFAC_DIST_BERNOULLI. */
int net_kfac_distribution(const net_t *net);

/* Parameters, or anything shaped like them (gradients, directions, optimizer state). */
typedef struct {
    float *W[NET_MAX_LAYERS]; /* [out][in] */
    float *b[NET_MAX_LAYERS]; /* [out] */
} params_t;

params_t params_alloc(const net_t *net); /* zeros */
void params_free(const net_t *net, params_t *p);
void params_copy(const net_t *net, params_t *dst, const params_t *src);
void params_zero(const net_t *net, params_t *p);
/* y ← alpha·x + y, layer by layer (CBLAS saxpy). */
void params_axpy(const net_t *net, float alpha, const params_t *x, params_t *y);
/* Glorot-uniform weights U(±sqrt(6 / (in + out))), zero biases. */
void params_init_glorot(const net_t *net, params_t *p, uint64_t seed);
/* Sparse initialisation (Martens 2010): each unit gets min(k, in) nonzero incoming weights
 * drawn from N(0, scale²) at distinct random inputs, the others 0; zero biases. */
void params_init_sparse(const net_t *net, params_t *p, uint64_t seed, int k, double scale);

/* Targets of the loss: labels for LOSS_SOFTMAX_CE, values for LOSS_BERNOULLI_CE. */
typedef struct {
    const uint8_t *labels; /* [rows] */
    const float *values;   /* [rows][outputs] */
} targets_t;

/* Activations, probabilities and output gradients for up to max_rows rows. */
typedef struct {
    int max_rows;
    const float *act[NET_MAX_LAYERS + 1]; /* act[0] = input rows (borrowed), act[l+1] = φ_l(s_l) */
    float *out[NET_MAX_LAYERS];           /* storage of act[1..L]; out[L-1] holds the logits */
    float *probs;                         /* softmax or sigmoids of the logits */
    float *dz[NET_MAX_LAYERS];            /* ∂loss/∂s_l, [rows][out_l] */
} workspace_t;

workspace_t workspace_alloc(const net_t *net, int max_rows);
void workspace_free(const net_t *net, workspace_t *ws);
static inline const float *workspace_logits(const net_t *net, const workspace_t *ws) {
    return ws->out[net->n_layers - 1];
}

/* Forward pass over `rows` input rows x [rows][inputs]. Leaves activations and probabilities in
 * ws; returns the mean loss against t (0 if t is NULL). */
double net_forward(const net_t *net, const params_t *p, workspace_t *ws, const float *x,
                   const targets_t *t, int rows);

/* ws->dz at the logits ← ∂(mean loss)/∂z = (p − t) / rows, after net_forward. */
void net_output_grad(const net_t *net, workspace_t *ws, const targets_t *t, int rows);

/* Draws targets from the model's predictive distribution at the probabilities in ws (a class
 * per row for the softmax, 0/1 per output for the sigmoids), with the example's own generator,
 * into labels ([rows]) or values ([rows][outputs]) as the loss needs (the other may be NULL). */
void net_sample_targets(const net_t *net, const workspace_t *ws, int rows, rng_t *rng,
                        uint8_t *labels, float *values);

/* The backward pass from the gradient at the logits already in ws->dz[L-1]: fills ws->dz[l]
 * for every layer and, if grads is not NULL, the parameter gradients. */
void net_backward(const net_t *net, const params_t *p, workspace_t *ws, int rows, params_t *grads);

/* Forward mode along v at the activations net_forward left in ws. r[l] ([rows][out_l], e.g.
 * from rop_alloc) receives R(a_{l+1}) for hidden layers and r[L-1] = J·v, [rows][outputs]. */
void net_r_op(const net_t *net, const params_t *p, const workspace_t *ws, const params_t *v,
              int rows, float *const *r);

typedef struct { float *r[NET_MAX_LAYERS]; } rop_buffers_t;
rop_buffers_t rop_alloc(const net_t *net, int max_rows);
void rop_free(const net_t *net, rop_buffers_t *b);

/* Checks net_forward, net_backward and net_r_op of `net` (float, CBLAS) against a separate
 * double-precision forward pass and its central finite differences, at random parameters,
 * inputs, targets and directions. Prints the measured relative errors; returns 0 if all are
 * below the tolerances, 1 otherwise (net_check.c). */
int net_check(const net_t *net, uint64_t seed);

#endif
