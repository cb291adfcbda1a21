/*
 * oracles.c — reference computations of the numeric tests; see oracles.h.
 */
#include "harness.h"
#include "oracles.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

int solve(double *M, double *R, int n, int m) {
    for (int c = 0; c < n; c++) {
        int p = c;
        for (int i = c + 1; i < n; i++)
            if (fabs(M[i * n + c]) > fabs(M[p * n + c])) p = i;
        if (M[p * n + c] == 0.0) return 0;
        if (p != c) {
            for (int j = 0; j < n; j++) {
                double tmp = M[c * n + j];
                M[c * n + j] = M[p * n + j];
                M[p * n + j] = tmp;
            }
            for (int j = 0; j < m; j++) {
                double tmp = R[c * m + j];
                R[c * m + j] = R[p * m + j];
                R[p * m + j] = tmp;
            }
        }
        for (int i = c + 1; i < n; i++) {
            const double f = M[i * n + c] / M[c * n + c];
            for (int j = c; j < n; j++) M[i * n + j] -= f * M[c * n + j];
            for (int j = 0; j < m; j++) R[i * m + j] -= f * R[c * m + j];
        }
    }
    for (int c = n - 1; c >= 0; c--) {
        for (int j = 0; j < m; j++) {
            double s = R[c * m + j];
            for (int k = c + 1; k < n; k++) s -= M[c * n + k] * R[k * m + j];
            R[c * m + j] = s / M[c * n + c];
        }
    }
    return 1;
}

double rel_diff(const double *x, const double *y, size_t n) {
    double num = 0, den = 1e-300;
    for (size_t i = 0; i < n; i++) {
        num = fmax(num, fabs(x[i] - y[i]));
        den = fmax(den, fabs(y[i]));
    }
    return num / den;
}

void kron_solve(const double *A, const double *G, int p, int out, double lambda,
                const double *V, double *U) {
    const int n = p * out;
    double *K = calloc((size_t)n * n, sizeof(double)), *x = calloc((size_t)n, sizeof(double));
    for (int j = 0; j < p; j++)
        for (int i = 0; i < out; i++)
            for (int jj = 0; jj < p; jj++)
                for (int ii = 0; ii < out; ii++)
                    K[(j * out + i) * n + (jj * out + ii)] =
                        A[j * p + jj] * G[i * out + ii] + (j == jj && i == ii ? lambda : 0.0);
    for (int j = 0; j < p; j++)
        for (int i = 0; i < out; i++) x[j * out + i] = V[i * p + j];
    if (!solve(K, x, n, 1)) check(0, "oracle: singular Kronecker matrix");
    for (int j = 0; j < p; j++)
        for (int i = 0; i < out; i++) U[i * p + j] = x[j * out + i];
    free(K);
    free(x);
}

void factored_solve(const double *A, const double *G, int p, int out, double lambda,
                    int use_pi, const double *V, double *U) {
    double trA = 0, trG = 0;
    for (int i = 0; i < p; i++) trA += A[i * p + i];
    for (int i = 0; i < out; i++) trG += G[i * out + i];
    const double pi = use_pi ? sqrt((trA / p) / (trG / out)) : 1.0;
    double *Gd = malloc(sizeof(double) * out * out), *Ad = malloc(sizeof(double) * p * p);
    double *X = malloc(sizeof(double) * out * p), *Xt = malloc(sizeof(double) * out * p);
    memcpy(Gd, G, sizeof(double) * out * out);
    memcpy(Ad, A, sizeof(double) * p * p);
    for (int i = 0; i < out; i++) Gd[i * out + i] += sqrt(lambda) / pi;
    for (int i = 0; i < p; i++) Ad[i * p + i] += pi * sqrt(lambda);
    memcpy(X, V, sizeof(double) * out * p);
    solve(Gd, X, out, p); /* X = G_d⁻¹ V */
    for (int i = 0; i < out; i++)
        for (int j = 0; j < p; j++) Xt[j * out + i] = X[i * p + j];
    solve(Ad, Xt, p, out); /* Xᵀ ← A_d⁻¹ Xᵀ  (A_d symmetric), i.e. X A_d⁻¹ */
    for (int i = 0; i < out; i++)
        for (int j = 0; j < p; j++) U[i * p + j] = Xt[j * out + i];
    free(Gd);
    free(Ad);
    free(X);
    free(Xt);
}

double factored_pi(const double *A, const double *G, int p, int out, int use_pi) {
    double trA = 0, trG = 0;
    for (int i = 0; i < p; i++) trA += A[i * p + i];
    for (int i = 0; i < out; i++) trG += G[i * out + i];
    if (!use_pi || trA == 0 || trG == 0) return 1.0;
    return sqrt((trA / p) / (trG / out));
}

void damped_kron(const double *A, const double *G, int p, int out, int factored, double lambda,
                 int use_pi, double *K) {
    const int n = p * out;
    const double pi = factored_pi(A, G, p, out, use_pi);
    /* Exact damping adds λ to the diagonal of A ⊗ G; factored damping shifts A by π√λ and G
     * by √λ/π before the product. */
    const double shift_a = factored ? pi * sqrt(lambda) : 0.0;
    const double shift_g = factored ? sqrt(lambda) / pi : 0.0;
    for (int j = 0; j < p; j++)
        for (int i = 0; i < out; i++)
            for (int jj = 0; jj < p; jj++)
                for (int ii = 0; ii < out; ii++) {
                    const double a = A[j * p + jj] + (j == jj ? shift_a : 0.0);
                    const double g = G[i * out + ii] + (i == ii ? shift_g : 0.0);
                    K[(j * out + i) * n + (jj * out + ii)] =
                        a * g + (!factored && j == jj && i == ii ? lambda : 0.0);
                }
}

int kron_apply(const double *K, int p, int out, int inverse, const double *V, double *U) {
    const int n = p * out;
    double *x = malloc(sizeof(double) * n), *y = malloc(sizeof(double) * n);
    double *M = inverse ? malloc(sizeof(double) * n * n) : NULL;
    int ok = 1;
    for (int j = 0; j < p; j++)
        for (int i = 0; i < out; i++) x[j * out + i] = V[i * p + j];
    if (inverse) {
        memcpy(M, K, sizeof(double) * n * n);
        memcpy(y, x, sizeof(double) * n);
        ok = solve(M, y, n, 1);
    } else {
        for (int r = 0; r < n; r++) {
            double s = 0;
            for (int c = 0; c < n; c++) s += K[r * n + c] * x[c];
            y[r] = s;
        }
    }
    for (int j = 0; j < p; j++)
        for (int i = 0; i < out; i++) U[i * p + j] = y[j * out + i];
    free(x);
    free(y);
    free(M);
    return ok;
}

void linear_logits(const linear_data_t *d, const double *theta, int n, double *z) {
    for (int o = 0; o < AO; o++) {
        z[o] = theta[o * AP + AI];
        for (int i = 0; i < AI; i++) z[o] += theta[o * AP + i] * d->x[n][i];
    }
}

void softmax_row(const double *z, double *p) {
    double m = z[0], total = 0;
    for (int o = 1; o < AO; o++) m = fmax(m, z[o]);
    for (int o = 0; o < AO; o++) total += exp(z[o] - m);
    for (int o = 0; o < AO; o++) p[o] = exp(z[o] - m) / total;
}

double linear_loss(const linear_data_t *d, const double *theta) {
    double total = 0, z[AO], p[AO];
    for (int n = 0; n < AN; n++) {
        linear_logits(d, theta, n, z);
        softmax_row(z, p);
        total -= log(p[d->y[n]]);
    }
    return total / AN;
}

void linear_jacobian(const linear_data_t *d, int n, double *J) {
    memset(J, 0, sizeof(double) * AO * AQ);
    for (int o = 0; o < AO; o++) {
        for (int i = 0; i < AI; i++) J[o * AQ + o * AP + i] = d->x[n][i];
        J[o * AQ + o * AP + AI] = 1.0;
    }
}

void linear_fisher(const linear_data_t *d, const double *theta, double *Fm) {
    double J[AO * AQ], z[AO], p[AO], B[AO][AO], BJ[AO * AQ];
    memset(Fm, 0, sizeof(double) * AQ * AQ);
    for (int n = 0; n < AN; n++) {
        linear_logits(d, theta, n, z);
        softmax_row(z, p);
        for (int a = 0; a < AO; a++)
            for (int b = 0; b < AO; b++) B[a][b] = (a == b ? p[a] : 0.0) - p[a] * p[b];
        linear_jacobian(d, n, J);
        for (int a = 0; a < AO; a++)
            for (int q = 0; q < AQ; q++) {
                BJ[a * AQ + q] = 0;
                for (int b = 0; b < AO; b++) BJ[a * AQ + q] += B[a][b] * J[b * AQ + q];
            }
        for (int q = 0; q < AQ; q++)
            for (int r = 0; r < AQ; r++)
                for (int a = 0; a < AO; a++) Fm[q * AQ + r] += J[a * AQ + q] * BJ[a * AQ + r] / AN;
    }
}

void linear_products(const linear_data_t *d, const double *v, double *out) {
    double J[AO * AQ];
    for (int n = 0; n < AN; n++) {
        linear_jacobian(d, n, J);
        for (int o = 0; o < AO; o++) {
            out[n * AO + o] = 0;
            for (int q = 0; q < AQ; q++) out[n * AO + o] += J[o * AQ + q] * v[q];
        }
    }
}

double bilinear(const double *u, const double *M, const double *v) {
    double s = 0;
    for (int q = 0; q < AQ; q++)
        for (int r = 0; r < AQ; r++) s += u[q] * M[q * AQ + r] * v[r];
    return s;
}

double dotq(const double *u, const double *v) {
    double s = 0;
    for (int q = 0; q < AQ; q++) s += u[q] * v[q];
    return s;
}

void linear_batch(const linear_data_t *d, const double *theta, double *x, double *g,
                  double *z, double *grad) {
    double p[AO];
    memset(grad, 0, sizeof(double) * AQ);
    for (int n = 0; n < AN; n++) {
        linear_logits(d, theta, n, z + n * AO);
        softmax_row(z + n * AO, p);
        for (int o = 0; o < AO; o++) {
            g[n * AO + o] = p[o] - (o == d->y[n] ? 1.0 : 0.0);
            for (int i = 0; i < AI; i++) grad[o * AP + i] += g[n * AO + o] * d->x[n][i] / AN;
            grad[o * AP + AI] += g[n * AO + o] / AN;
        }
        for (int i = 0; i < AI; i++) x[n * AI + i] = d->x[n][i];
    }
}

double model_minimum(const double *Fm, double lambda, const double *grad, const double *D,
                     const double *previous, int two, double *alpha, double *mu) {
    double minusD[AQ], M2[4], rhs[2];
    for (int q = 0; q < AQ; q++) minusD[q] = -D[q];
    M2[0] = bilinear(minusD, Fm, minusD) + lambda * dotq(minusD, minusD);
    rhs[0] = -dotq(grad, minusD);
    if (two) {
        M2[1] = M2[2] = bilinear(minusD, Fm, previous) + lambda * dotq(minusD, previous);
        M2[3] = bilinear(previous, Fm, previous) + lambda * dotq(previous, previous);
        rhs[1] = -dotq(grad, previous);
    } else {
        M2[1] = 0;
    }
    double A2[4];
    memcpy(A2, M2, sizeof A2);
    double sol[2] = {rhs[0], two ? rhs[1] : 0};
    if (two) {
        if (!solve(A2, sol, 2, 1)) check(0, "oracle: singular 2×2 system");
    } else {
        sol[0] = rhs[0] / M2[0];
    }
    *alpha = sol[0];
    *mu = two ? sol[1] : 0.0;
    /* M(δ) = ½ cᵀ A c + bᵀ c with b = −rhs. */
    double m = -rhs[0] * *alpha - (two ? rhs[1] * *mu : 0.0);
    m += 0.5 * (M2[0] * *alpha * *alpha +
                (two ? 2 * M2[1] * *alpha * *mu + M2[3] * *mu * *mu : 0.0));
    return m;
}

void linear_theta(const double *w, const double *b, double *theta) {
    for (int o = 0; o < AO; o++) {
        for (int i = 0; i < AI; i++) theta[o * AP + i] = w[o * AI + i];
        theta[o * AP + AI] = b[o];
    }
}
