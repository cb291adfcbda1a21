"""A deliberately naive numpy reference of the K-FAC mathematics in ``include/kfac.h``.

Written from the header's formulas, independently of the library: factors by a per-example loop
of outer products, preconditioning by dense solves with the explicit Kronecker matrix
(``np.kron``), never by the eigen/Cholesky shortcuts the library uses.
"""

import numpy as np


def extend(inputs, bias):
    """ā = [a; 1] per row when the layer has a bias."""
    inputs = np.asarray(inputs, dtype=np.float64)
    if not bias:
        return inputs
    return np.hstack([inputs, np.ones((inputs.shape[0], 1))])


def outer_mean(rows):
    """(1/N) Σ_n r_n r_nᵀ by an explicit loop over rows."""
    rows = np.asarray(rows, dtype=np.float64)
    total = np.zeros((rows.shape[1], rows.shape[1]))
    for r in rows:
        total += np.outer(r, r)
    return total / rows.shape[0]


def batch_factors(inputs, output_grads, bias):
    """(A, G) of one factor update from the rows recorded for it (gradients of a summed loss)."""
    return outer_mean(extend(inputs, bias)), outer_mean(output_grads)


def ema(previous, batch, decay):
    """The running-average rule; ``previous`` None means the first update."""
    if previous is None:
        return batch
    return decay * previous + (1.0 - decay) * batch


def vec(matrix):
    """Column-major vectorisation."""
    return np.asarray(matrix).flatten(order="F")


def unvec(vector, shape):
    return np.asarray(vector).reshape(shape, order="F")


def theta_grad(weight_grad, bias_grad):
    """V = [dW | db] (bias as the last column), always a new float64 array (never a view of
    the caller's buffers, which the library overwrites)."""
    if bias_grad is None:
        return np.array(weight_grad, dtype=np.float64, copy=True)
    return np.hstack([weight_grad, np.asarray(bias_grad).reshape(-1, 1)]).astype(np.float64)


def split_theta(theta, bias):
    if bias:
        return theta[:, :-1], theta[:, -1]
    return theta, None


def precondition_eigen(A, G, V, damping):
    """(A ⊗ G + λ I)⁻¹ vec(V) by a dense solve, reshaped to V's shape."""
    A = np.asarray(A, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    kron = np.kron(A, G)
    matrix = kron + damping * np.eye(kron.shape[0])
    return unvec(np.linalg.solve(matrix, vec(V)), V.shape)


def pi_factor(A, G, use_pi=True):
    """π = sqrt((tr A / dim A) / (tr G / dim G)), or 1."""
    if not use_pi:
        return 1.0
    return float(np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0])))


def precondition_cholesky(A, G, V, damping, use_pi=True):
    """((A + π√λ I)⁻¹ ⊗ (G + √λ/π I)⁻¹) vec(V), with the explicit Kronecker matrix."""
    A = np.asarray(A, dtype=np.float64)
    G = np.asarray(G, dtype=np.float64)
    pi = pi_factor(A, G, use_pi)
    root = np.sqrt(damping)
    a_inv = np.linalg.inv(A + pi * root * np.eye(A.shape[0]))
    g_inv = np.linalg.inv(G + (root / pi) * np.eye(G.shape[0]))
    return unvec(np.kron(a_inv, g_inv) @ vec(V), V.shape)


def kl_scale(directions, gradients, kl_clip, learning_rate):
    """ν = min(1, sqrt(κ / (η² Σ_l |⟨U_l, V_l⟩|))); 1 when clipping is off."""
    if kl_clip == 0:
        return 1.0
    total = sum(abs(float(np.sum(u * v))) for u, v in zip(directions, gradients))
    if total == 0:
        return 1.0
    return min(1.0, float(np.sqrt(kl_clip / (learning_rate**2 * total))))
