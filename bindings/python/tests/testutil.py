"""Helpers shared by the libkfac binding tests (imported by the test modules)."""

import os

import numpy as np

#: The repository root (the directory holding Package.swift), or None outside a checkout.
REPO_ROOT = None
_directory = os.path.dirname(os.path.abspath(__file__))
while True:
    if os.path.isfile(os.path.join(_directory, "Package.swift")):
        REPO_ROOT = _directory
        break
    _parent = os.path.dirname(_directory)
    if _parent == _directory:
        break
    _directory = _parent

#: Relative and absolute tolerances per dtype: float64 compares tightly; float32 arithmetic
#: (the library computes in the handle's precision) against a float64 reference loosely.
TOLERANCES = {
    np.float64: dict(rtol=1e-9, atol=1e-11),
    np.float32: dict(rtol=2e-3, atol=2e-4),
}


def assert_close(actual, expected, dtype, scale=1.0):
    """``actual`` ≈ ``expected`` within the dtype's tolerances (``scale`` loosens them). The
    absolute tolerance is relative to the largest magnitude in ``expected``."""
    tol = TOLERANCES[np.dtype(dtype).type]
    expected = np.asarray(expected, dtype=np.float64)
    magnitude = max(1.0, float(np.max(np.abs(expected)))) if expected.size else 1.0
    np.testing.assert_allclose(
        np.asarray(actual, dtype=np.float64),
        expected,
        rtol=tol["rtol"] * scale,
        atol=tol["atol"] * scale * magnitude,
    )


def random_batch(rng, rows, in_features, out_features, dtype):
    """Random inputs [rows][in] and output gradients [rows][out] of ``dtype``."""
    inputs = rng.standard_normal((rows, in_features)).astype(dtype)
    grads = rng.standard_normal((rows, out_features)).astype(dtype)
    return inputs, grads


def kfac_step(opt, model, theta, dtype):
    """Records the statistics of the batch and steps on the mean-loss gradient; returns the
    directions D = [dW | db] as float64."""
    opt.record_inputs(0, model.x.astype(dtype))
    opt.record_output_grads(0, model.output_grads(theta).astype(dtype))
    grad = model.gradient(theta)
    dw = np.ascontiguousarray(grad[:, :-1], dtype=dtype)
    db = np.ascontiguousarray(grad[:, -1], dtype=dtype)
    opt.step([dw], [db])
    return np.hstack([dw, db[:, None]]).astype(np.float64)


#: Tolerances of the adaptive-mode comparisons with references.adaptive, per dtype.
TOLERANCE = {np.float64: 1e-8, np.float32: 3e-3}
