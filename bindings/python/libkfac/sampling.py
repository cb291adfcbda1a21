"""Output distributions of the adaptive mode, and the library's seeded target samplers.

``kfac.h`` knows three predictive distributions at a network's outputs (one row of
``output_dim`` values per example):

- ``'categorical'``: logits of a softmax (cross-entropy); output Fisher ``diag(p) − p pᵀ``;
- ``'bernoulli'``: logits of independent sigmoids (binary cross-entropy); ``diag(p (1 − p))``;
- ``'gaussian'``: means of unit-variance Gaussians (the squared error ``½‖y − μ‖²``); ``I``.

:func:`sample_targets` draws targets from that distribution and :func:`sampled_output_grads`
returns the gradients of the summed loss at such targets (``p − y`` or ``μ − y``), whose second
moment is the output Fisher: recorded as output gradients (after back-propagation through the
network) they make the factors estimate the true Fisher instead of the empirical one.
"""

from __future__ import annotations

import ctypes

import numpy as np

from . import _lib
from ._convert import DISTRIBUTIONS, distribution_code, seed as _seed
from ._errors import check

__all__ = ["DISTRIBUTIONS", "distribution_code", "sample_targets", "sampled_output_grads"]


def _rows(outputs):
    """``outputs`` as a C-contiguous float32 or float64 array: float32 (and float16) data in
    float32, other real data in float64. The last axis is the output dimension."""
    array = np.asarray(outputs)
    if array.dtype == np.float32 or array.dtype == np.float16:
        dtype = np.dtype(np.float32)
    elif array.dtype == np.float64 or (
        array.dtype.kind in "biuf" and np.can_cast(array.dtype, np.float64, casting="safe")
    ):
        dtype = np.dtype(np.float64)
    else:
        raise TypeError(f"libkfac: outputs must be real numbers (float32 or float64), not {array.dtype}")
    if array.ndim < 1:
        raise ValueError("libkfac: outputs must have at least one dimension (the last is output_dim)")
    return np.ascontiguousarray(array, dtype=dtype)


def _sample(name: str, outputs, distribution, seed) -> np.ndarray:
    code = distribution_code(distribution)
    seed = _seed(seed)
    z = _rows(outputs)
    dim = z.shape[-1]
    rows = z.size // dim if dim else 0
    out = np.empty_like(z)
    suffix = "f32" if z.dtype == np.float32 else "f64"
    function = getattr(_lib, f"{name}_{suffix}")
    pointer = ctypes.POINTER(ctypes.c_float if suffix == "f32" else ctypes.c_double)
    status = function(z.ctypes.data_as(pointer), rows, dim, code, seed, out.ctypes.data_as(pointer))
    check(status, None, f"{name}_{suffix}(rows={rows}, output_dim={dim}, distribution={code})")
    return out


def sample_targets(outputs, distribution, seed) -> np.ndarray:
    """Targets drawn from the model's predictive distribution at ``outputs``.

    Args:
        outputs: ``[..., output_dim]`` logits (``'categorical'``, ``'bernoulli'``) or means
            (``'gaussian'``); leading dimensions are rows.
        distribution: ``'categorical'``, ``'bernoulli'``, ``'gaussian'`` or a ``KFAC_DIST_*``.
        seed: an integer in ``[0, 2^64)``. Each draw depends only on (seed, row index within
            this call, coordinate): use a new seed for every batch.

    Returns an array of the shape of ``outputs``: one-hot rows (categorical), 0/1 values
    (bernoulli) or ``μ + N(0, 1)`` noise (gaussian). float32 inputs give float32 results
    (``kfac_sample_targets_f32``), float64 and other real inputs float64 ones. Raises
    :class:`libkfac.KFACError` (e.g. ``KFAC_ERROR_NON_FINITE`` for NaN or Inf outputs)."""
    return _sample("kfac_sample_targets", outputs, distribution, seed)


def sampled_output_grads(outputs, distribution, seed) -> np.ndarray:
    """Gradients of the SUMMED loss with respect to ``outputs`` at targets sampled as
    :func:`sample_targets` does with the same seed: ``p − y`` (categorical, bernoulli) or
    ``μ − y`` (gaussian). Their second moment is the output Fisher, so back-propagated and
    recorded as output gradients they give the true Fisher's statistics. Divide by the number
    of rows for the gradient of a mean loss. Arguments and dtypes as :func:`sample_targets`."""
    return _sample("kfac_sample_output_grads", outputs, distribution, seed)
