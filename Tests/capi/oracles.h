/*
 * oracles.h — reference computations in plain C (float64) for the numeric tests: a dense linear
 * solve, the two inverse strategies' directions from the factors, and a linear softmax model
 * with its explicit Fisher and quadratic model for the adaptive mode and the γ re-choice.
 */
#ifndef KFAC_CAPI_ORACLES_H
#define KFAC_CAPI_ORACLES_H

#include <stddef.h>

/* Solves M X = R in place (M n×n row-major, R n×m row-major) by Gaussian elimination with
 * partial pivoting. M is destroyed; R receives X. Returns 0 if M is singular. */
int solve(double *M, double *R, int n, int m);

/* max |x - y| / max(max |y|, tiny) */
double rel_diff(const double *x, const double *y, size_t n);

/* Oracle of the eigen strategy: Θ = [W | b] ([out][p], p = in + bias), vec column-major, solve
 * (A ⊗ G + λ I) vec(U) = vec(V) with the explicit (p·out)² Kronecker matrix. */
void kron_solve(const double *A, const double *G, int p, int out, double lambda,
                const double *V, double *U);

/* Oracle of the Cholesky strategy: U = (G + (√λ/π) I)⁻¹ V (A + π√λ I)⁻¹, π from the traces
 * (or 1). V, U are [out][p]. */
void factored_solve(const double *A, const double *G, int p, int out, double lambda,
                    int use_pi, const double *V, double *U);

/* π of factored Tikhonov damping: sqrt((tr A / p) / (tr G / out)), 1 if `use_pi` is 0 or a
 * trace is 0. */
double factored_pi(const double *A, const double *G, int p, int out, int use_pi);

/* The explicit damped curvature block K ((p·out)² row-major) acting on vec(Θ), Θ [out][p],
 * column-major vec (index j·out + i): A ⊗ G + λ I (`factored` 0, the eigen strategy), or
 * (A + π√λ I) ⊗ (G + (√λ/π) I) (`factored` 1, the Cholesky strategy, π from factored_pi). */
void damped_kron(const double *A, const double *G, int p, int out, int factored, double lambda,
                 int use_pi, double *K);

/* U = unvec(K vec(V)) for V, U [out][p] (`inverse` 0), or the solution of K vec(U) = vec(V)
 * (`inverse` 1; returns 0 if K is singular). K is not changed. */
int kron_apply(const double *K, int p, int out, int inverse, const double *V, double *U);

/* A linear softmax classifier z_n = W x_n + b, θ = [W | b] ([AO][AP], vectorised row-major),
 * with the explicit per-example Jacobians J_n = I ⊗ ā_nᵀ and the explicit Fisher of the mean
 * loss F = (1/N) Σ J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n. */
enum { AN = 9, AI = 3, AO = 4, AP = AI + 1, AQ = AO * AP };

typedef struct {
    double x[AN][AI];
    int y[AN];
} linear_data_t;

void linear_logits(const linear_data_t *d, const double *theta, int n, double *z);

void softmax_row(const double *z, double *p);

double linear_loss(const linear_data_t *d, const double *theta);

/* J_n as an [AO][AQ] matrix. */
void linear_jacobian(const linear_data_t *d, int n, double *J);

/* F = (1/N) Σ J_nᵀ B_n J_n, [AQ][AQ]. */
void linear_fisher(const linear_data_t *d, const double *theta, double *Fm);

/* J_n · v for every example, [AN][AO]. */
void linear_products(const linear_data_t *d, const double *v, double *out);

/* uᵀ M v for an [AQ][AQ] matrix M. */
double bilinear(const double *u, const double *M, const double *v);

double dotq(const double *u, const double *v);

/* One batch at θ as a trainer feeds it: the inputs x ([AN][AI]), the summed-loss output gradients
 * p − y (g, [AN][AO]), the logits z ([AN][AO]) and the mean loss's gradient (grad, [AQ]). */
void linear_batch(const linear_data_t *d, const double *theta, double *x, double *g,
                  double *z, double *grad);

/* The oracle of the step size: the minimum of the quadratic model
 *     M(δ) = ½ δᵀ (F + λ I) δ + gradᵀ δ   over   δ = −α D + μ δ₀
 * (over α alone, μ = 0, when `two` is 0), from the explicit Fisher Fm ([AQ][AQ]) by the 2×2 (or
 * 1×1) linear system. Writes α and μ; returns M(δ). */
double model_minimum(const double *Fm, double lambda, const double *grad, const double *D,
                     const double *previous, int two, double *alpha, double *mu);

/* [W | b] of the linear model's layer ([AO][AP], the layout of θ) from weight and bias buffers. */
void linear_theta(const double *w, const double *b, double *theta);

#endif /* KFAC_CAPI_ORACLES_H */
