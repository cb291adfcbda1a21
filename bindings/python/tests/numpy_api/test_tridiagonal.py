"""Block-tridiagonal K-FAC (experimental kfac_layer_link, kfac_layer_get_cross_factors_*): cross
factors against a per-example loop with the moving average, F̂⁻¹ v against the dense Ξᵀ Λ Ξ
built from the library's own factors (references/tridiagonal.py), F̂'s blocks, the step, errors."""

import numpy as np
import pytest

import libkfac as kfac
from libkfac import _lib
from references import tridiagonal as tri
from testutil import assert_close

pytestmark = pytest.mark.skipif(
    bool({"kfac_layer_link", "kfac_layer_get_cross_factors_f64"} & _lib.MISSING_EXPERIMENTAL),
    reason="the loaded library does not export the block-tridiagonal functions yet",
)

LAYERS = [(4, 5, True), (5, 3, True), (3, 2, False)]  # (in, out, bias): a chain
DAMPING = 0.05


def _optimizer(dtype, link=True, **params):
    opt = kfac.Optimizer(dtype, damping=DAMPING, pi_damping=True, inverse_strategy="cholesky", kl_clip=0.0, **params)
    for fan_in, fan_out, bias in LAYERS:
        opt.add_dense(fan_in, fan_out, bias=bias)
    if link:
        for l in range(len(LAYERS) - 1):
            opt.link_layers(l, l + 1)
    return opt


def _batch(rng, rows, dtype):
    x = rng.standard_normal((rows, LAYERS[0][0]))
    xs, gs = [], []
    for fan_in, fan_out, bias in LAYERS:
        xs.append(x.astype(dtype))
        x = np.tanh(x @ rng.standard_normal((fan_in, fan_out)))
        gs.append(rng.standard_normal((rows, fan_out)).astype(dtype))
    for l in range(len(LAYERS) - 2, -1, -1):  # correlate consecutive output gradients
        gs[l] = (gs[l] + 0.7 * np.resize(gs[l + 1], gs[l].shape)).astype(dtype)
    return xs, gs


def _record(opt, xs, gs):
    for l, x in enumerate(xs):
        opt.record_inputs(l, x)
    for l in reversed(range(len(gs))):
        opt.record_output_grads(l, gs[l])


def _ext(x, bias):
    x = np.asarray(x, dtype=np.float64)
    return np.hstack([x, np.ones((x.shape[0], 1))]) if bias else x


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cross_factors_match_per_example_loop_with_moving_average(dtype):
    rng = np.random.default_rng(1)
    opt = _optimizer(dtype, factor_decay=0.75)
    expected = None
    for _ in range(3):
        xs, gs = _batch(rng, 6, dtype)
        _record(opt, xs, gs)
        opt.update_factors()
        batch = []
        for l in range(len(LAYERS) - 1):
            a = sum(np.outer(p, q) for p, q in zip(_ext(xs[l], LAYERS[l][2]), _ext(xs[l + 1], LAYERS[l + 1][2]))) / 6
            g = sum(np.outer(p, q) for p, q in zip(np.asarray(gs[l], np.float64), np.asarray(gs[l + 1], np.float64))) / 6
            batch.append((a, g))
        expected = batch if expected is None else [
            (0.75 * ea + 0.25 * a, 0.75 * eg + 0.25 * g) for (ea, eg), (a, g) in zip(expected, batch)]
        for l, (ea, eg) in enumerate(expected):
            a, g = opt.cross_factors(l)
            assert a.dtype == dtype and a.shape == ea.shape and g.shape == eg.shape
            assert_close(a, ea, dtype)
            assert_close(g, eg, dtype)


def _flatten(weights, biases):
    return np.concatenate([tri.vec(np.hstack([w, b[:, None]]) if b is not None else w)
                           for w, b in zip(weights, biases)]).astype(np.float64)


def _vectors(rng, dtype):
    weights = [rng.standard_normal((o, i)).astype(dtype) for i, o, _ in LAYERS]
    biases = [rng.standard_normal(o).astype(dtype) if b else None for _, o, b in LAYERS]
    return weights, biases


def _model(opt):
    factors = [tuple(np.asarray(m, np.float64) for m in opt.factors(l)) for l in range(len(LAYERS))]
    cross = [tuple(np.asarray(m, np.float64) for m in opt.cross_factors(l)) for l in range(len(LAYERS) - 1)]
    return tri.inverse_matrix(factors, cross, DAMPING)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_inverse_product_is_the_dense_gaussian_graphical_model(dtype):
    rng = np.random.default_rng(2)
    opt = _optimizer(dtype, factor_decay=0.5)
    for _ in range(2):
        _record(opt, *_batch(rng, 9, dtype))
        opt.update_factors()
    opt.update_inverses()
    inverse, diag, off = _model(opt)
    scale = 1.0 if dtype == np.float64 else 5.0
    for _ in range(3):
        weights, biases = _vectors(rng, dtype)
        v = _flatten(weights, biases)
        opt.curvature_multiply(weights, biases, power=-1)
        assert_close(_flatten(weights, biases), inverse @ v, dtype, scale)
        opt.curvature_multiply(weights, biases, power=1)
        assert_close(_flatten(weights, biases), v, dtype, scale)
    # F̂ = (Ξᵀ Λ Ξ)⁻¹ agrees with the damped Kronecker blocks on the diagonal and first
    # off-diagonal; F̂⁻¹ is zero beyond it.
    forward = np.linalg.inv(inverse)
    starts = np.concatenate([[0], np.cumsum([d.shape[0] for d in diag])])
    block = lambda m, i, j: m[starts[i]:starts[i + 1], starts[j]:starts[j + 1]]
    for i in range(len(LAYERS)):
        np.testing.assert_allclose(block(forward, i, i), diag[i], atol=1e-9 * np.abs(diag[i]).max())
        if i + 1 < len(LAYERS):
            np.testing.assert_allclose(block(forward, i, i + 1), off[i], atol=1e-9 * np.abs(diag[i]).max())
    assert np.abs(block(inverse, 0, 2)).max() < 1e-12 * np.abs(inverse).max()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_step_writes_the_tridiagonal_directions(dtype):
    rng = np.random.default_rng(3)
    opt = _optimizer(dtype, factor_decay=0.5, factor_update_period=1, inverse_update_period=1)
    _record(opt, *_batch(rng, 8, dtype))
    weights, biases = _vectors(rng, dtype)
    v = _flatten(weights, biases)
    opt.step(weights, biases)
    inverse, _, _ = _model(opt)
    assert_close(_flatten(weights, biases), inverse @ v, dtype, 1.0 if dtype == np.float64 else 5.0)


def test_errors():
    opt = _optimizer(np.float64, link=False)
    with pytest.raises(kfac.KFACError) as e:
        opt.link_layers(0, 2)
    assert e.value.status == kfac.KFAC_ERROR_INVALID_ARGUMENT
    with pytest.raises(kfac.KFACError) as e:
        opt.link_layers(2, 3)
    assert e.value.status == kfac.KFAC_ERROR_UNKNOWN_LAYER
    with pytest.raises(TypeError):
        opt.link_layers(True, 1)
    opt.link_layers(0, 1)
    with pytest.raises(kfac.KFACError) as e:
        opt.cross_factors(0)
    assert e.value.status == kfac.KFAC_ERROR_NO_STATISTICS
    with pytest.raises(kfac.KFACError) as e:
        opt.cross_factors(1)
    assert e.value.status == kfac.KFAC_ERROR_INVALID_ARGUMENT
    with pytest.raises(kfac.KFACError) as e:
        opt.cross_factors(5)
    assert e.value.status == kfac.KFAC_ERROR_UNKNOWN_LAYER
    rng = np.random.default_rng(4)
    xs, gs = _batch(rng, 5, np.float64)
    opt.record_inputs(0, xs[0])
    opt.record_inputs(1, xs[1][:4])
    opt.record_inputs(2, xs[2])
    for l in reversed(range(3)):
        opt.record_output_grads(l, gs[l])
    image = opt.state_bytes()
    with pytest.raises(kfac.KFACError) as e:
        opt.update_factors()
    assert e.value.status == kfac.KFAC_ERROR_INVALID_SIZE
    assert opt.state_bytes() == image
    with pytest.raises(kfac.KFACError) as e:
        opt.link_layers(1, 2)
    assert e.value.status == kfac.KFAC_ERROR_LAYERS_FROZEN
    opt.record_inputs(1, xs[1][4:])
    opt.update_factors()
    opt.update_inverses()
    weights, biases = _vectors(rng, np.float64)
    with pytest.raises(kfac.KFACError) as e:
        opt.precondition(0, weights[0], biases[0])
    assert e.value.status == kfac.KFAC_ERROR_UNSUPPORTED
    opt.precondition(2, weights[2])  # unlinked: the Cholesky strategy
    # Resume: the image carries the cross factors.
    other = _optimizer(np.float64, link=False)
    other.link_layers(0, 1)
    other.load_state(opt.state_bytes())
    assert all((a == b).all() for a, b in zip(other.cross_factors(0), opt.cross_factors(0)))
    unlinked = _optimizer(np.float64, link=False)
    with pytest.raises(kfac.KFACError) as e:
        unlinked.load_state(opt.state_bytes())
    assert e.value.status == kfac.KFAC_ERROR_STATE_MISMATCH
