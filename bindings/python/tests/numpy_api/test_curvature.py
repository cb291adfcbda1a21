"""The experimental product with the damped curvature (kfac_curvature_multiply_*, through
libkfac.Optimizer.curvature_multiply), against an explicit np.kron of the library's own copied
factors with the damping (references/dense.py), and +1 then −1 ≈ identity."""

import numpy as np
import pytest

import libkfac as kfac
from libkfac import _lib
from references import dense as ref
from testutil import assert_close, random_batch

pytestmark = pytest.mark.skipif(
    bool({"kfac_curvature_multiply_f32", "kfac_curvature_multiply_f64"} & _lib.MISSING_EXPERIMENTAL),
    reason="the loaded library does not export kfac_curvature_multiply_* yet",
)

LAYERS = [(4, 3, True), (3, 2, False)]  # (in, out, bias)


def _recorded(rng, dtype, **params):
    opt = kfac.Optimizer(dtype, **params)
    for fan_in, fan_out, bias in LAYERS:
        opt.add_dense(fan_in, fan_out, bias=bias)
    for layer, (fan_in, fan_out, _) in enumerate(LAYERS):
        x, g = random_batch(rng, 7, fan_in, fan_out, dtype)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
    opt.update_factors()
    return opt


def _vectors(rng, dtype):
    weights = [rng.standard_normal((fan_out, fan_in)).astype(dtype) for fan_in, fan_out, _ in LAYERS]
    biases = [rng.standard_normal(fan_out).astype(dtype) if bias else None for _, fan_out, bias in LAYERS]
    return weights, biases


def _damped_kron(opt, layer, strategy, damping):
    """The explicit damped block C of a layer from the library's copied factors."""
    A, G = (np.asarray(f, dtype=np.float64) for f in opt.factors(layer))
    if strategy == "eigen":
        kron = np.kron(A, G)
        return kron + damping * np.eye(kron.shape[0])
    pi = ref.pi_factor(A, G, True)
    root = np.sqrt(damping)
    return np.kron(A + pi * root * np.eye(A.shape[0]), G + (root / pi) * np.eye(G.shape[0]))


@pytest.mark.parametrize("strategy", ["eigen", "cholesky"])
@pytest.mark.parametrize("factor_damping", [0.0, 0.3])
def test_power_one_is_the_explicit_damped_kronecker_product(rng, dtype, strategy, factor_damping):
    damping = 0.05
    with _recorded(rng, dtype, damping=damping, factor_damping=factor_damping,
                   inverse_strategy=strategy) as opt:
        weights, biases = _vectors(rng, dtype)
        V = [ref.theta_grad(w, b) for w, b in zip(weights, biases)]
        opt.curvature_multiply(weights, biases, power=1)
        lam = factor_damping if factor_damping > 0 else damping
        for layer, ((_, _, bias), v) in enumerate(zip(LAYERS, V)):
            expected = ref.unvec(_damped_kron(opt, layer, strategy, lam) @ ref.vec(v), v.shape)
            assert_close(ref.theta_grad(weights[layer], biases[layer]), expected, dtype, scale=10)


@pytest.mark.parametrize("strategy", ["eigen", "cholesky", "ekfac"])
def test_power_one_then_minus_one_is_the_identity(rng, dtype, strategy):
    with _recorded(rng, dtype, damping=0.05, inverse_strategy=strategy) as opt:
        opt.update_inverses()
        weights, biases = _vectors(rng, dtype)
        original = [(w.copy(), None if b is None else b.copy()) for w, b in zip(weights, biases)]
        steps = opt.step_count
        opt.curvature_multiply(weights, biases, power=1)
        opt.curvature_multiply(weights, biases, power=-1)
        for (w, b), (w0, b0) in zip(zip(weights, biases), original):
            assert_close(w, w0, dtype, scale=50)
            if b0 is not None:
                assert_close(b, b0, dtype, scale=50)
        assert opt.step_count == steps  # no schedule, no change to the handle


def test_power_minus_one_is_precondition(rng):
    with _recorded(rng, np.float64, damping=0.05) as opt:
        opt.update_inverses()
        weights, biases = _vectors(rng, np.float64)
        expected = [(w.copy(), None if b is None else b.copy()) for w, b in zip(weights, biases)]
        for layer, (w, b) in enumerate(expected):
            opt.precondition(layer, w, b)
        opt.curvature_multiply(weights, biases, power=-1)
        for (w, b), (we, be) in zip(zip(weights, biases), expected):
            np.testing.assert_allclose(w, we, rtol=1e-12, atol=1e-14)
            if be is not None:
                np.testing.assert_allclose(b, be, rtol=1e-12, atol=1e-14)


def test_errors_change_nothing(rng):
    with kfac.Optimizer(np.float64) as opt:
        for fan_in, fan_out, bias in LAYERS:
            opt.add_dense(fan_in, fan_out, bias=bias)
        weights, biases = _vectors(rng, np.float64)
        before = [w.copy() for w in weights]
        # Before any factor both powers lack statistics; power 0 or 2 is no power at all.
        for power, status in ((1, kfac.KFAC_ERROR_NO_STATISTICS), (-1, kfac.KFAC_ERROR_NO_STATISTICS),
                              (0, kfac.KFAC_ERROR_INVALID_ARGUMENT), (2, kfac.KFAC_ERROR_INVALID_ARGUMENT)):
            with pytest.raises(kfac.KFACError) as info:
                opt.curvature_multiply(weights, biases, power=power)
            assert info.value.status == status, power
        # With factors but no inverses yet, −1 has nothing to apply.
        for layer, (fan_in, fan_out, _) in enumerate(LAYERS):
            x, g = random_batch(rng, 5, fan_in, fan_out, np.float64)
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, g)
        opt.update_factors()
        with pytest.raises(kfac.KFACError) as info:
            opt.curvature_multiply(weights, biases, power=-1)
        assert info.value.status == kfac.KFAC_ERROR_NO_INVERSES
        with pytest.raises(kfac.KFACError) as info:
            opt.curvature_multiply(weights, biases, power=2**31)
        assert info.value.status == kfac.KFAC_ERROR_INVALID_ARGUMENT
        with pytest.raises(TypeError):
            opt.curvature_multiply(weights, biases, power=True)
        assert all(np.array_equal(w, w0) for w, w0 in zip(weights, before))
