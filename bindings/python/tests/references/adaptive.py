"""An independent numpy reference of the adaptive mode, written from kfac.h's text.

It builds everything explicitly for a tiny linear model z_n = W x_n + b, θ = [W | b]
vectorised row-major: the per-example Jacobians J_n = I_out ⊗ ā_nᵀ ([out][out·(in+1)]), the
output Fisher B_n of the distribution (diag(p) − ppᵀ, diag(p(1 − p)) or I), the full Fisher
F = (1/N) Σ J_nᵀ B_n J_n of the mean loss, and the 2×2 system of
M(δ) = ½ δᵀ(F + λI)δ + ∇hᵀδ over δ = −α D + μ δ₀ — never the output-space shortcut the library
uses. Nothing here calls the library.
"""

import numpy as np


def softmax(z):
    z = np.asarray(z, dtype=np.float64)
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def sigmoid(z):
    return 1.0 / (1.0 + np.exp(-np.asarray(z, dtype=np.float64)))


class LinearModel:
    """z_n = W x_n + b with a mean loss of one of kfac.h's three distributions."""

    def __init__(self, x, y, out, distribution):
        self.x = np.asarray(x, dtype=np.float64)
        self.y = np.asarray(y)
        self.n, self.inf = self.x.shape
        self.out = out
        self.dist = distribution
        self.abar = np.hstack([self.x, np.ones((self.n, 1))])

    def logits(self, theta):
        return self.abar @ theta.T  # theta: [out][in + 1]

    def loss(self, theta):
        z = self.logits(theta)
        if self.dist == "categorical":
            p = softmax(z)
            return float(-np.mean(np.log(p[np.arange(self.n), self.y])))
        if self.dist == "bernoulli":
            # Σ over outputs of the binary cross-entropy, mean over rows (stable form).
            per = np.maximum(z, 0) - z * self.y + np.log1p(np.exp(-np.abs(z)))
            return float(np.mean(per.sum(axis=1)))
        return float(np.mean(0.5 * ((z - self.y) ** 2).sum(axis=1)))

    def output_grads(self, theta):
        """∂ℓ_n/∂z_n of the summed loss, per row."""
        z = self.logits(theta)
        if self.dist == "categorical":
            g = softmax(z)
            g[np.arange(self.n), self.y] -= 1.0
            return g
        if self.dist == "bernoulli":
            return sigmoid(z) - self.y
        return z - self.y

    def gradient(self, theta):
        """∇h of the mean loss as an [out][in + 1] matrix."""
        return self.output_grads(theta).T @ self.abar / self.n

    def jacobian(self, n):
        """J_n = ∂z_n/∂vec(θ), θ vectorised row-major: [out][out·(in+1)]."""
        return np.kron(np.eye(self.out), self.abar[n][None, :])

    def output_fisher(self, z):
        if self.dist == "categorical":
            p = softmax(z)
            return np.diag(p) - np.outer(p, p)
        if self.dist == "bernoulli":
            p = sigmoid(z)
            return np.diag(p * (1 - p))
        return np.eye(self.out)

    def fisher(self, theta):
        """F = (1/N) Σ_n J_nᵀ B_n J_n, explicitly."""
        z = self.logits(theta)
        size = self.out * (self.inf + 1)
        total = np.zeros((size, size))
        for n in range(self.n):
            J = self.jacobian(n)
            total += J.T @ self.output_fisher(z[n]) @ J
        return total / self.n

    def products(self, direction):
        """J_n · vec(direction) per example, [N][out], by the explicit Jacobians."""
        v = direction.reshape(-1)
        return np.stack([self.jacobian(n) @ v for n in range(self.n)])


def reference_solve(model, theta, D, previous, damping):
    """(α, μ, M(δ)) minimising ½ δᵀ(F + λI)δ + ∇hᵀδ over δ = −αD + μδ₀ (α alone if δ₀ is None)."""
    C = model.fisher(theta) + damping * np.eye(D.size)
    grad = model.gradient(theta).reshape(-1)
    basis = [-D.reshape(-1)] + ([] if previous is None else [previous.reshape(-1)])
    Delta = np.stack(basis, axis=1)
    A = Delta.T @ C @ Delta
    b = Delta.T @ grad
    coefficients = -np.linalg.solve(A, b)
    m = 0.5 * coefficients @ A @ coefficients + b @ coefficients
    alpha = float(coefficients[0])
    mu = float(coefficients[1]) if previous is not None else 0.0
    return alpha, mu, float(m)


def make_problem(rng, distribution, n=10, inf=3, out=4):
    x = rng.standard_normal((n, inf))
    if distribution == "categorical":
        y = np.arange(n) % out
    elif distribution == "bernoulli":
        y = (rng.random((n, out)) < 0.5).astype(np.float64)
    else:
        y = rng.standard_normal((n, out))
    theta = 0.5 * rng.standard_normal((out, inf + 1))
    return LinearModel(x, y, out, distribution), theta
