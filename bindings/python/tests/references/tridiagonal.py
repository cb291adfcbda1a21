"""Block-tridiagonal K-FAC written densely (float64): F̂⁻¹ = Ξᵀ Λ Ξ from the diagonal factors
(A_l, G_l), the cross factors (A_{l,l+1}, G_{l,l+1}) and the factored (π) damping, with explicit
Kronecker products and dense inverses. Vectors are per-layer [W | b] matrices, vec column-major
(A ⊗ G acting as V ↦ G V A)."""

import numpy as np


def damped(A, G, damping, use_pi=True):
    pi = np.sqrt((np.trace(A) / A.shape[0]) / (np.trace(G) / G.shape[0])) if use_pi else 1.0
    s = np.sqrt(damping)
    return A + pi * s * np.eye(A.shape[0]), G + (s / pi) * np.eye(G.shape[0])


def vec(m):
    return np.asarray(m, dtype=np.float64).reshape(m.shape).T.reshape(-1)


def unvec(v, shape):
    return v.reshape(shape[1], shape[0]).T


def inverse_matrix(factors, cross, damping, use_pi=True):
    """(F̂⁻¹, [F̃_{l,l}], [F̃_{l,l+1}]) for a chain: factors = [(A_l, G_l)], cross = [(A_x, G_x)]."""
    diag = [np.kron(*damped(A, G, damping, use_pi)) for A, G in factors]
    off = [np.kron(Ax, Gx) for Ax, Gx in cross]
    sizes = [d.shape[0] for d in diag]
    starts = np.concatenate([[0], np.cumsum(sizes)])
    n = starts[-1]
    xi, lam = np.eye(n), np.zeros((n, n))
    for l, d in enumerate(diag):
        s = slice(starts[l], starts[l + 1])
        if l + 1 < len(diag):
            u = slice(starts[l + 1], starts[l + 2])
            psi = off[l] @ np.linalg.inv(diag[l + 1])
            xi[s, u] = -psi
            sigma = d - psi @ diag[l + 1] @ psi.T
        else:
            sigma = d
        lam[s, s] = np.linalg.inv(sigma)
    return xi.T @ lam @ xi, diag, off
