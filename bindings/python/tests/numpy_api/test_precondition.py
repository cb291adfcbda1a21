"""Preconditioned gradients against dense solves with the explicit Kronecker matrix."""

import numpy as np
import pytest

import libkfac as kfac
from references import dense as ref
from testutil import assert_close, random_batch

IN, OUT = 4, 3


def _recorded_optimizer(rng, dtype, bias=True, rows=6, **params):
    """An optimizer with one layer whose factors were folded from one random batch; returns
    (opt, A_ref, G_ref) with the reference factors in float64 from the same (rounded) data."""
    opt = kfac.Optimizer(dtype, **params)
    layer = opt.add_dense(IN, OUT, bias=bias)
    x, g = random_batch(rng, rows, IN, OUT, dtype)
    opt.record_inputs(layer, x)
    opt.record_output_grads(layer, g)
    opt.update_factors()
    A, G = ref.batch_factors(x, g, bias)
    return opt, A, G


def _gradient(rng, dtype, bias=True):
    w = rng.standard_normal((OUT, IN)).astype(dtype)
    b = rng.standard_normal(OUT).astype(dtype) if bias else None
    return w, b


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("damping", [1e-3, 0.1, 2.0])
def test_eigen_precondition_equals_damped_kronecker_solve(rng, dtype, bias, damping):
    opt, A, G = _recorded_optimizer(rng, dtype, bias, damping=damping, inverse_strategy="eigen")
    with opt:
        opt.update_inverses()
        assert opt.layer_info(0).has_inverses
        w, b = _gradient(rng, dtype, bias)
        V = ref.theta_grad(w, b)
        opt.precondition(0, w, b)
        expected = ref.precondition_eigen(A, G, V, damping)
        # the solve amplifies rounding of the factors by up to 1/λ in float32
        scale = 1.0 if dtype == np.float64 else max(1.0, 0.1 / damping)
        assert_close(ref.theta_grad(w, b), expected, dtype, scale=scale)


@pytest.mark.parametrize("use_pi", [True, False], ids=["pi", "nopi"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_cholesky_precondition_equals_factored_damping(rng, dtype, use_pi, bias):
    damping = 0.05
    opt, A, G = _recorded_optimizer(
        rng, dtype, bias, damping=damping, inverse_strategy="cholesky", pi_damping=use_pi
    )
    with opt:
        assert opt.inverse_strategy == "cholesky" and opt.pi_damping is use_pi
        opt.update_inverses()
        w, b = _gradient(rng, dtype, bias)
        V = ref.theta_grad(w, b)
        opt.precondition(0, w, b)
        expected = ref.precondition_cholesky(A, G, V, damping, use_pi)
        assert_close(ref.theta_grad(w, b), expected, dtype, scale=5.0)


def test_pi_damping_changes_the_cholesky_result(rng):
    """Guards the test above against factors for which π happens to be 1."""
    opt, A, G = _recorded_optimizer(rng, np.float64, inverse_strategy="cholesky")
    with opt:
        assert abs(ref.pi_factor(A, G) - 1.0) > 0.05
        V = rng.standard_normal((OUT, IN + 1))
        assert not np.allclose(
            ref.precondition_cholesky(A, G, V, 0.05, True),
            ref.precondition_cholesky(A, G, V, 0.05, False),
        )


def test_step_without_clip_equals_reference(rng, dtype):
    """kfac_step with κ = 0 writes (A⊗G + λI)⁻¹ vec(V) into both gradient buffers."""
    damping = 0.1
    with kfac.Optimizer(dtype, damping=damping, kl_clip=0) as opt:
        opt.add_dense(IN, OUT)
        opt.add_dense(OUT, 2, bias=False)
        x0, g0 = random_batch(rng, 7, IN, OUT, dtype)
        x1, g1 = random_batch(rng, 7, OUT, 2, dtype)
        for layer, x, g in ((0, x0, g0), (1, x1, g1)):
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, g)
        w0, b0 = _gradient(rng, dtype)
        w1 = rng.standard_normal((2, OUT)).astype(dtype)
        V0, V1 = ref.theta_grad(w0, b0), ref.theta_grad(w1, None)
        w0_id = id(w0)
        opt.step([w0, w1], [b0, None])
        assert id(w0) == w0_id and w0.dtype == np.dtype(dtype)
        A0, G0 = ref.batch_factors(x0, g0, True)
        A1, G1 = ref.batch_factors(x1, g1, False)
        assert_close(ref.theta_grad(w0, b0), ref.precondition_eigen(A0, G0, V0, damping), dtype)
        assert_close(w1, ref.precondition_eigen(A1, G1, V1, damping), dtype)
        assert opt.step_count == 1
        assert opt.last_kl_scale == 1.0


def test_kl_clip_scales_all_layers(rng, dtype):
    damping, kl_clip, lr = 0.1, 1e-4, 0.5
    with kfac.Optimizer(dtype, damping=damping, kl_clip=kl_clip, learning_rate=lr) as opt:
        opt.add_dense(IN, OUT)
        opt.add_dense(OUT, 2)
        batches = [random_batch(rng, 6, IN, OUT, dtype), random_batch(rng, 6, OUT, 2, dtype)]
        for layer, (x, g) in enumerate(batches):
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, g)
        w0, b0 = _gradient(rng, dtype)
        w1 = rng.standard_normal((2, OUT)).astype(dtype)
        b1 = rng.standard_normal(2).astype(dtype)
        V = [ref.theta_grad(w0, b0), ref.theta_grad(w1, b1)]
        assert opt.last_kl_scale is None
        opt.step([w0, w1], [b0, b1])
        U = [
            ref.precondition_eigen(*ref.batch_factors(x, g, True), v, damping)
            for (x, g), v in zip(batches, V)
        ]
        nu = ref.kl_scale(U, V, kl_clip, lr)
        assert nu < 0.5  # the clip is active
        assert_close(opt.last_kl_scale, nu, dtype)
        assert_close(ref.theta_grad(w0, b0), nu * U[0], dtype)
        assert_close(ref.theta_grad(w1, b1), nu * U[1], dtype)


def test_kl_clip_inactive_for_small_updates(rng):
    with kfac.Optimizer(np.float64, damping=0.1, kl_clip=1e6, learning_rate=1e-3) as opt:
        opt.add_dense(IN, OUT)
        x, g = random_batch(rng, 6, IN, OUT, np.float64)
        opt.record_inputs(0, x)
        opt.record_output_grads(0, g)
        w, b = _gradient(rng, np.float64)
        V = ref.theta_grad(w, b)
        opt.step([w], [b])
        assert opt.last_kl_scale == 1.0
        expected = ref.precondition_eigen(*ref.batch_factors(x, g, True), V, 0.1)
        assert_close(ref.theta_grad(w, b), expected, np.float64)


def test_damping_change_timing(rng):
    """Eigen: a new λ applies at the next preconditioning. Cholesky: at the next inversion."""
    opt, A, G = _recorded_optimizer(rng, np.float64, damping=0.1, inverse_strategy="eigen")
    with opt:
        opt.update_inverses()
        opt.damping = 0.5
        w, b = _gradient(rng, np.float64)
        V = ref.theta_grad(w, b)
        opt.precondition(0, w, b)
        assert_close(ref.theta_grad(w, b), ref.precondition_eigen(A, G, V, 0.5), np.float64)

    opt, A, G = _recorded_optimizer(rng, np.float64, damping=0.1, inverse_strategy="cholesky")
    with opt:
        opt.update_inverses()
        opt.damping = 0.5
        w, b = _gradient(rng, np.float64)
        V = ref.theta_grad(w, b)
        opt.precondition(0, w, b)
        assert_close(ref.theta_grad(w, b), ref.precondition_cholesky(A, G, V, 0.1), np.float64)
        opt.update_inverses()
        w, b = _gradient(rng, np.float64)
        V = ref.theta_grad(w, b)
        opt.precondition(0, w, b)
        assert_close(ref.theta_grad(w, b), ref.precondition_cholesky(A, G, V, 0.5), np.float64)


def test_strategy_change_recomputes_inverses_at_next_step(rng):
    with kfac.Optimizer(np.float64, damping=0.2, kl_clip=0, inverse_update_period=100) as opt:
        opt.add_dense(IN, OUT)
        x, g = random_batch(rng, 6, IN, OUT, np.float64)
        opt.record_inputs(0, x)
        opt.record_output_grads(0, g)
        opt.step([np.zeros((OUT, IN))], [np.zeros(OUT)])  # k=0: fold, invert (eigen)
        A, G = ref.batch_factors(x, g, True)
        opt.inverse_strategy = kfac.KFAC_INVERSE_CHOLESKY
        assert opt.inverse_strategy == "cholesky"
        assert not opt.layer_info(0).has_inverses
        w, b = _gradient(rng, np.float64)
        V = ref.theta_grad(w, b)
        opt.step([w], [b])  # k=1: not an inverse step, but there are no Cholesky inverses
        assert_close(ref.theta_grad(w, b), ref.precondition_cholesky(A, G, V, 0.2), np.float64)


def test_inverses_follow_the_inverse_update_period(rng):
    """Ti = 3: steps 1 and 2 precondition with the inverses of step 0's factors."""
    damping, decay = 0.1, 0.5
    with kfac.Optimizer(np.float64, damping=damping, kl_clip=0, factor_decay=decay,
                        inverse_update_period=3, inverse_strategy="cholesky") as opt:
        opt.add_dense(IN, OUT)
        A_run = G_run = None
        A_inv = G_inv = None
        for k in range(5):
            x, g = random_batch(rng, 6, IN, OUT, np.float64)
            opt.record_inputs(0, x)
            opt.record_output_grads(0, g)
            A_batch, G_batch = ref.batch_factors(x, g, True)
            A_run, G_run = ref.ema(A_run, A_batch, decay), ref.ema(G_run, G_batch, decay)
            if k % 3 == 0:
                A_inv, G_inv = A_run, G_run
            w, b = _gradient(rng, np.float64)
            V = ref.theta_grad(w, b)
            opt.step([w], [b])
            expected = ref.precondition_cholesky(A_inv, G_inv, V, damping)
            assert_close(ref.theta_grad(w, b), expected, np.float64)


def test_precondition_leaves_the_handle_unchanged(rng):
    opt, A, G = _recorded_optimizer(rng, np.float64, damping=0.1)
    with opt:
        opt.update_inverses()
        image = opt.state_bytes()
        w, b = _gradient(rng, np.float64)
        opt.precondition(0, w, b)
        assert opt.step_count == 0
        assert opt.state_bytes() == image


def test_step_requires_exact_numpy_buffers(rng):
    with kfac.Optimizer(np.float32, kl_clip=0) as opt:
        opt.add_dense(IN, OUT)
        x, g = random_batch(rng, 6, IN, OUT, np.float32)
        opt.record_inputs(0, x)
        opt.record_output_grads(0, g)
        w, b = _gradient(rng, np.float32)
        with pytest.raises(TypeError):
            opt.step([w.astype(np.float64)], [b])
        with pytest.raises(TypeError):
            opt.step([w.tolist()], [b])
        with pytest.raises(ValueError):
            opt.step([np.asfortranarray(w)], [b])
        with pytest.raises(ValueError):
            opt.step([w.T.copy()], [b])  # wrong shape
        with pytest.raises(ValueError):
            opt.step([w], [None])  # missing bias
        with pytest.raises(ValueError):
            opt.step([w, w], [b, b])  # wrong count
        read_only = w.copy()
        read_only.flags.writeable = False
        with pytest.raises(ValueError):
            opt.step([read_only], [b])
        with pytest.raises(ValueError):
            opt.precondition(0, w, None)
        assert opt.step_count == 0
        opt.step([w], [b])
        assert opt.step_count == 1


def test_step_without_any_bias_needs_no_bias_list(rng):
    with kfac.Optimizer(np.float64, damping=0.1, kl_clip=0) as opt:
        opt.add_dense(IN, OUT, bias=False)
        x, g = random_batch(rng, 6, IN, OUT, np.float64)
        opt.record_inputs(0, x)
        opt.record_output_grads(0, g)
        w = rng.standard_normal((OUT, IN))
        V = ref.theta_grad(w, None)
        opt.step([w])
        A, G = ref.batch_factors(x, g, False)
        assert_close(w, ref.precondition_eigen(A, G, V, 0.1), np.float64)
