"""The output-space matrices of include/kfac.h's distribution table, written out for the torch
tests from the formulas (not taken from the library): B = ∂²ℓ/∂z² per example and a square root
S with S Sᵀ = B, for z of shape [..., d] (one example or a batch); results [..., d, d] in z's
dtype."""

import torch

DISTS = ["categorical", "bernoulli", "gaussian"]


def output_hessian(dist, z):
    """B: I (gaussian, ℓ = ½‖z − y‖²), diag(p(1 − p)) (bernoulli, p = σ(z)),
    diag(p) − p pᵀ (categorical, p = softmax(z))."""
    if dist == "gaussian":
        return torch.eye(z.shape[-1], dtype=z.dtype).expand(*z.shape, z.shape[-1])
    if dist == "bernoulli":
        p = torch.sigmoid(z)
        return torch.diag_embed(p * (1 - p))
    p = torch.softmax(z, -1)
    return torch.diag_embed(p) - p[..., :, None] * p[..., None, :]


def output_hessian_sqrt(dist, z):
    """One S with S Sᵀ = B (its columns are the backward seeds): I, diag(√(p(1 − p))), and
    diag(√p) − p √pᵀ for the categorical (S Sᵀ = diag(p) − p pᵀ because Σ p = 1)."""
    if dist == "gaussian":
        return output_hessian(dist, z)
    if dist == "bernoulli":
        p = torch.sigmoid(z)
        return torch.diag_embed(torch.sqrt(p * (1 - p)))
    p = torch.softmax(z, -1)
    return torch.diag_embed(p.sqrt()) - p[..., :, None] * p.sqrt()[..., None, :]
