"""The experimental EKFAC section through libkfac.Optimizer: inverse_strategy='ekfac',
record_examples (paired rows) and ekfac_scaling, against numpy oracles written here from the
header's definitions — per-example gradients summed from the rows (or im2col patches of
references/conv.py), the eigenbases of the library's own copied factors (np.linalg.eigh,
ascending like LAPACK), S = (1/D) Σ_n (Q_Gᵀ G_n Q_A)², and dense solves with
Ũ diag(S) Ũᵀ + λI."""

import numpy as np
import pytest

import libkfac as kfac
from libkfac import _lib
from references import conv as cr
from references import dense as ref
from testutil import assert_close

pytestmark = pytest.mark.skipif(
    bool({"kfac_layer_record_examples_f64", "kfac_layer_get_ekfac_scaling_f64"} & _lib.MISSING_EXPERIMENTAL),
    reason="the loaded library does not export the EKFAC functions",
)


def _rotated(gradients, divisor, qa, qg):
    """(1/D) Σ_n (Q_Gᵀ G_n Q_A)^∘2."""
    return sum((qg.T @ gn @ qa) ** 2 for gn in gradients) / divisor


def _bases(opt, layer, group=0):
    a, g = opt.factors(layer, group)
    return np.linalg.eigh(a.astype(np.float64))[1], np.linalg.eigh(g.astype(np.float64))[1]


def _ekfac_matrix(qa, qg, s):
    u = np.kron(qa, qg)  # column j·o + i ↔ S[i, j]
    return u @ np.diag(ref.vec(s)) @ u.T


def _dense_gradients(x, g, bias, t):
    """Per-example gradients G_n = Σ_t g_t ā_tᵀ of consecutive runs of t rows."""
    xb = ref.extend(x.astype(np.float64), bias)
    g = g.astype(np.float64)
    return [g[i:i + t].T @ xb[i:i + t] for i in range(0, len(x), t)]


@pytest.mark.parametrize("mode, t", [("per_example", 1), ("per_example", 3), ("per_row", 3)])
def test_dense_scaling_is_the_rotated_per_example_second_moment(rng, dtype, mode, t):
    n, fan_in, fan_out = 4, 5, 3
    x = rng.standard_normal((n, t, fan_in)).astype(dtype)
    g = (2 * rng.standard_normal((n, t, fan_out))).astype(dtype)
    with kfac.Optimizer(dtype, inverse_strategy="ekfac", ekfac_mode=mode, loss_reduction="mean") as opt:
        opt.add_dense(fan_in, fan_out)
        opt.record_examples(0, x, g)  # [N, T, features]: T rows per example
        opt.update_factors()
        opt.update_inverses()
        qa, qg = _bases(opt, 0)
        rows = n * t
        gradients = _dense_gradients(x.reshape(rows, fan_in), rows * g.reshape(rows, fan_out).astype(np.float64),
                                     True, t if mode == "per_example" else 1)
        assert_close(opt.ekfac_scaling(0), _rotated(gradients, rows, qa, qg), dtype, scale=5)
        # Not K-FAC's d_G d_Aᵀ.
        da, dg = np.linalg.eigvalsh(opt.factors(0)[0].astype(np.float64)), np.linalg.eigvalsh(opt.factors(0)[1].astype(np.float64))
        assert np.max(np.abs(opt.ekfac_scaling(0) - np.outer(dg, da))) > 1e-3 * np.max(np.abs(np.outer(dg, da)))


@pytest.mark.parametrize("conv", [
    cr.Conv(2, 4, (3, 2), (5, 4), stride=(2, 1), padding=(1, 1), groups=2, label="groups"),
    cr.Conv(3, 2, (2, 2), (4, 3), padding=(1, 0), bias=False, layout="nhwc", label="nhwc"),
], ids=lambda c: c.label)
def test_conv_scaling_matches_per_example_loop(rng, dtype, conv):
    n = 3
    x = rng.standard_normal(conv.input_shape(n)).astype(dtype)
    g = rng.standard_normal(conv.grad_shape(n)).astype(dtype)
    with kfac.Optimizer(dtype, inverse_strategy="ekfac") as opt:
        layer = conv.add_to(opt)
        opt.record_examples(layer, x, g)
        opt.update_factors()
        opt.update_inverses()
        for group, (p, gr) in enumerate(zip(cr.patches(x, conv), cr.grad_rows(g, conv))):
            qa, qg = _bases(opt, layer, group)
            gradients = [gr[e].T @ (np.hstack([p[e], np.ones((p.shape[1], 1))]) if conv.bias else p[e])
                         for e in range(n)]
            assert_close(opt.ekfac_scaling(layer, group), _rotated(gradients, n, qa, qg), dtype, scale=5)


def test_directions_and_forward_product_are_the_dense_ekfac_matrix(rng, dtype):
    fan_in, fan_out, rows, damping = 4, 3, 8, 0.05
    x, g = rng.standard_normal((rows, fan_in)).astype(dtype), rng.standard_normal((rows, fan_out)).astype(dtype)
    with kfac.Optimizer(dtype, inverse_strategy="ekfac", damping=damping) as opt:
        opt.add_dense(fan_in, fan_out)
        opt.record_examples(0, x, g, rows_per_example=2)
        opt.update_factors()
        opt.update_inverses()
        qa, qg = _bases(opt, 0)
        s = opt.ekfac_scaling(0).astype(np.float64)
        m = _ekfac_matrix(qa, qg, s) + damping * np.eye(qa.shape[0] * qg.shape[0])
        w = rng.standard_normal((fan_out, fan_in)).astype(dtype)
        b = rng.standard_normal(fan_out).astype(dtype)
        v = ref.theta_grad(w.astype(np.float64), b.astype(np.float64))
        pw, pb = w.copy(), b.copy()
        opt.precondition(0, pw, pb)
        assert_close(ref.theta_grad(pw, pb), ref.unvec(np.linalg.solve(m, ref.vec(v)), v.shape), dtype, scale=5)
        fw, fb = w.copy(), b.copy()
        opt.curvature_multiply([fw], [fb], power=1)
        assert_close(ref.theta_grad(fw, fb), ref.unvec(m @ ref.vec(v), v.shape), dtype, scale=5)
        # Never farther from the empirical Fisher than K-FAC (same batch).
        gradients = _dense_gradients(x, g, True, 2)
        f = sum(np.outer(ref.vec(gn), ref.vec(gn)) for gn in gradients) / rows
        a, gf = (factor.astype(np.float64) for factor in opt.factors(0))
        assert np.linalg.norm(f - _ekfac_matrix(qa, qg, s)) <= np.linalg.norm(f - np.kron(a, gf)) * (1 + 1e-6)


def test_one_example_gives_the_eigen_strategy_s_directions(rng, dtype):
    x, g = rng.standard_normal((1, 4)).astype(dtype), rng.standard_normal((1, 3)).astype(dtype)
    w0, b0 = rng.standard_normal((3, 4)).astype(dtype), rng.standard_normal(3).astype(dtype)
    directions = []
    for strategy in ("eigen", "ekfac"):
        with kfac.Optimizer(dtype, inverse_strategy=strategy, kl_clip=0, damping=0.01) as opt:
            opt.add_dense(4, 3)
            opt.record_examples(0, x, g)
            w, b = w0.copy(), b0.copy()
            opt.step([w], [b])
            directions.append(ref.theta_grad(w, b))
    assert_close(directions[1], directions[0], dtype, scale=10)


def test_moving_average_and_state_round_trip(rng):
    dtype = np.float64
    beta = 0.6
    opt = kfac.Optimizer(dtype, inverse_strategy="ekfac", ekfac_decay=beta, inverse_update_period=5, kl_clip=0)
    opt.add_dense(3, 2)
    batches = [(rng.standard_normal((6, 3)), rng.standard_normal((6, 2))) for _ in range(3)]
    w0 = rng.standard_normal((2, 3))
    opt.record_examples(0, *batches[0])
    opt.step([w0.copy()], [np.zeros(2)])
    qa, qg = _bases(opt, 0)
    s0 = opt.ekfac_scaling(0)
    assert_close(s0, _rotated(_dense_gradients(*batches[0], True, 1), 6, qa, qg), dtype)
    opt.record_examples(0, *batches[1])
    image = opt.state_bytes()
    opt.step([w0.copy()], [np.zeros(2)])
    # Same bases (Ti = 5): S ← β S + (1 − β) S_batch.
    assert_close(opt.ekfac_scaling(0), beta * s0 + (1 - beta) * _rotated(_dense_gradients(*batches[1], True, 1), 6, qa, qg),
                 dtype)
    # The image held the pending paired rows: a fresh optimizer continues bit for bit.
    other = kfac.Optimizer(dtype)
    other.add_dense(3, 2)
    other.load_state(image)
    w1, w2 = w0.copy(), w0.copy()
    other.step([w1], [np.zeros(2)])
    assert np.array_equal(other.ekfac_scaling(0), opt.ekfac_scaling(0))
    opt.record_examples(0, *batches[2])
    other.record_examples(0, *batches[2])
    w1, w2 = w0.copy(), w0.copy()
    opt.step([w1], [np.zeros(2)])
    other.step([w2], [np.zeros(2)])
    assert np.array_equal(w1, w2)
    opt.close()
    other.close()


def test_parameters_and_errors(rng):
    with kfac.Optimizer(np.float64, inverse_strategy="ekfac", ekfac_mode="per_row") as opt:
        assert opt.inverse_strategy == "ekfac" and opt.ekfac_mode == "per_row" and opt.ekfac_decay == 0.95
        opt.ekfac_mode = kfac.KFAC_EKFAC_PER_EXAMPLE
        assert opt.ekfac_mode == "per_example"
        opt.add_dense(3, 2)
        x, g = rng.standard_normal((4, 3)), rng.standard_normal((4, 2))
        with pytest.raises(kfac.KFACError) as error:
            opt.ekfac_scaling(0)
        assert error.value.status == kfac.KFAC_ERROR_NO_INVERSES
        with pytest.raises(kfac.KFACError) as error:
            opt.record_examples(0, x, g, rows_per_example=3)
        assert error.value.status == kfac.KFAC_ERROR_INVALID_SIZE
        with pytest.raises(ValueError):
            opt.record_examples(0, x, g[:3])
        with pytest.raises(kfac.KFACError) as error:
            opt.record_examples(5, x, g)
        assert error.value.status == kfac.KFAC_ERROR_UNKNOWN_LAYER
        bad = g.copy()
        bad[1, 1] = np.nan
        with pytest.raises(kfac.KFACError) as error:
            opt.record_examples(0, x, bad)
        assert error.value.status == kfac.KFAC_ERROR_NON_FINITE
        with pytest.raises(kfac.KFACError):
            opt.ekfac_mode = 2
        opt.record_examples(0, x, g)
        opt.update_factors()
        opt.update_inverses()
        assert opt.ekfac_scaling(0).shape == (2, 4)
        with pytest.raises(kfac.KFACError) as error:
            opt.ekfac_scaling(0, 1)
        assert error.value.status == kfac.KFAC_ERROR_INVALID_ARGUMENT
