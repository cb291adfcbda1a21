"""The adaptive mode (step size α, momentum μ, Levenberg–Marquardt damping) and the seeded target
samplers, against an independent numpy reference written from kfac.h's text.

The reference builds everything explicitly for a tiny linear model z_n = W x_n + b, θ = [W | b]
vectorised row-major: the per-example Jacobians J_n = I_out ⊗ ā_nᵀ ([out][out·(in+1)]), the
output Fisher B_n of the distribution (diag(p) − ppᵀ, diag(p(1 − p)) or I), the full Fisher
F = (1/N) Σ J_nᵀ B_n J_n of the mean loss, and the 2×2 system of
M(δ) = ½ δᵀ(F + λI)δ + ∇hᵀδ over δ = −α D + μ δ₀ — never the output-space shortcut the library
uses. The PyTorch helpers are checked at the end.
"""

import ctypes

import warnings

import numpy as np
import pytest

import kfac
from kfac import _lib

try:
    import torch
    from torch import nn
    import torch.nn.functional as F
    from kfac.torch import AdaptiveStepResult, KFACPreconditioner
except ImportError:  # the numpy tests run without PyTorch
    torch = None

needs_torch = pytest.mark.skipif(torch is None, reason="needs torch")

# ---------------------------------------------------------------------------------------------
# The reference
# ---------------------------------------------------------------------------------------------


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


TOLERANCE = {np.float64: 1e-8, np.float32: 3e-3}

# ---------------------------------------------------------------------------------------------
# α, μ, M(δ) and ρ against the explicit 2×2 system
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["categorical", "bernoulli", "gaussian"])
def test_step_size_momentum_and_prediction_match_the_explicit_fisher(rng, dtype, distribution):
    model, theta = make_problem(rng, distribution)
    damping = 0.05
    tol = TOLERANCE[dtype]
    with kfac.Optimizer(dtype, damping=damping, kl_clip=0, inverse_update_period=1) as opt:
        opt.add_dense(model.inf, model.out)
        previous = None
        for k in range(4):
            D = kfac_step(opt, model, theta, dtype)
            alpha_ref, mu_ref, m_ref = reference_solve(model, theta, D, previous, damping)
            outputs = model.logits(theta).astype(dtype)
            jd = model.products(D).astype(dtype)
            jp = None if previous is None else model.products(previous).astype(dtype)
            alpha, mu, m = opt.solve_step_size(outputs, jd, jp, distribution=distribution)
            assert alpha == pytest.approx(alpha_ref, rel=tol), (k, alpha, alpha_ref)
            assert mu == pytest.approx(mu_ref, rel=tol, abs=tol * 1e-2), (k, mu, mu_ref)
            assert m == pytest.approx(m_ref, rel=tol), (k, m, m_ref)
            assert m < 0
            if k == 0:
                assert mu == 0.0
            else:
                assert mu != 0.0
            # Apply the library's coefficients so that its δ₀ and ours are the same update.
            update = -alpha * D + (0.0 if previous is None else mu * previous)
            before = model.loss(theta)
            theta = theta + update
            after = model.loss(theta)
            rho = opt.report_loss_change(before, after)
            assert rho == pytest.approx((after - before) / m, rel=1e-12)
            assert rho == pytest.approx((after - before) / m_ref, rel=20 * tol)
            assert opt.last_reduction_ratio == rho
            assert rho > 0.2, "the quadratic model of a linear model is good"
            previous = update
        assert opt.damping == damping, "lm_interval 0 keeps λ"


def test_alpha_alone_when_previous_products_are_omitted(rng):
    model, theta = make_problem(rng, "categorical")
    with kfac.Optimizer(np.float64, damping=0.1, kl_clip=0, inverse_update_period=1) as opt:
        opt.add_dense(model.inf, model.out)
        D = kfac_step(opt, model, theta, np.float64)
        alpha, _, _ = opt.solve_step_size(model.logits(theta), model.products(D))
        theta = theta - alpha * D
        opt.report_loss_change(1.0, 0.9)
        D = kfac_step(opt, model, theta, np.float64)
        alpha_ref, _, m_ref = reference_solve(model, theta, D, None, 0.1)
        alpha, mu, m = opt.solve_step_size(model.logits(theta), model.products(D), None)
        assert mu == 0.0
        assert alpha == pytest.approx(alpha_ref, rel=1e-9)
        assert m == pytest.approx(m_ref, rel=1e-9)


def test_kl_clipped_directions_are_what_alpha_scales(rng):
    """With the KL clip on, the step writes D = νU; α refers to the D the caller received."""
    model, theta = make_problem(rng, "categorical")
    with kfac.Optimizer(np.float64, damping=0.05, kl_clip=1e-6, learning_rate=1.0,
                        inverse_update_period=1) as opt:
        opt.add_dense(model.inf, model.out)
        D = kfac_step(opt, model, theta, np.float64)
        assert opt.last_kl_scale < 1
        alpha_ref, _, m_ref = reference_solve(model, theta, D, None, 0.05)
        alpha, _, m = opt.solve_step_size(model.logits(theta), model.products(D))
        assert alpha == pytest.approx(alpha_ref, rel=1e-9)
        assert m == pytest.approx(m_ref, rel=1e-9)


def test_rows_may_have_leading_dimensions(rng):
    model, theta = make_problem(rng, "gaussian", n=12)
    with kfac.Optimizer(np.float64, kl_clip=0, inverse_update_period=1) as a, \
            kfac.Optimizer(np.float64, kl_clip=0, inverse_update_period=1) as b:
        for opt in (a, b):
            opt.add_dense(model.inf, model.out)
            D = kfac_step(opt, model, theta, np.float64)
        z, jd = model.logits(theta), model.products(D)
        flat = a.solve_step_size(z, jd, distribution="gaussian")
        shaped = b.solve_step_size(z.reshape(3, 4, -1), jd.reshape(3, 4, -1), distribution="GAUSSIAN")
        assert flat == shaped


# ---------------------------------------------------------------------------------------------
# Levenberg–Marquardt
# ---------------------------------------------------------------------------------------------


def _solve_and_report(opt, model, theta, ratio):
    """One step, solve and a report whose losses give exactly ρ = ratio."""
    D = kfac_step(opt, model, theta, np.float64)
    _, _, m = opt.solve_step_size(model.logits(theta), model.products(D), distribution="categorical")
    return opt.report_loss_change(2.0, 2.0 + ratio * m)


def test_levenberg_marquardt_adjusts_damping_every_interval(rng):
    model, theta = make_problem(rng, "categorical")
    omega = 0.8**3
    with kfac.Optimizer(np.float64, damping=1.0, kl_clip=0, lm_decay=0.8, lm_interval=3) as opt:
        assert (opt.lm_decay, opt.lm_interval) == (0.8, 3)
        opt.add_dense(model.inf, model.out)
        expected = 1.0
        # ρ of the 3rd, 6th, ... report decides; the others never change λ.
        schedule = [0.1, 0.1, 0.9,  # ρ > 3/4 at report 3: λ·ω
                    0.9, 0.9, 0.5,  # 1/4 <= ρ <= 3/4: unchanged
                    0.9, 0.9, 0.1,  # ρ < 1/4: λ/ω
                    0.5, 0.5, 0.8]  # λ·ω
        for report, ratio in enumerate(schedule, start=1):
            rho = _solve_and_report(opt, model, theta, ratio)
            assert rho == pytest.approx(ratio, rel=1e-12)
            if report % 3 == 0:
                if ratio > 0.75:
                    expected *= omega
                elif ratio < 0.25:
                    expected /= omega
            assert opt.damping == pytest.approx(expected, rel=1e-12), report
        assert opt.damping == pytest.approx(omega, rel=1e-12)


def test_levenberg_marquardt_off_by_default_and_interval_one(rng):
    model, theta = make_problem(rng, "categorical")
    with kfac.Optimizer(np.float64, damping=0.5, kl_clip=0) as opt:
        assert opt.lm_interval == 0 and opt.lm_decay == 0.95
        opt.add_dense(model.inf, model.out)
        for ratio in (0.01, 2.0, 0.01):
            _solve_and_report(opt, model, theta, ratio)
        assert opt.damping == 0.5
        opt.lm_interval = 1
        _solve_and_report(opt, model, theta, 0.01)
        assert opt.damping == pytest.approx(0.5 / 0.95, rel=1e-12)
        _solve_and_report(opt, model, theta, 1.0)
        assert opt.damping == pytest.approx(0.5, rel=1e-12)


@pytest.mark.parametrize("name, value", [("lm_decay", 0.0), ("lm_decay", 1.0), ("lm_decay", -0.5),
                                         ("lm_decay", 1.5), ("lm_decay", np.nan), ("lm_decay", np.inf),
                                         ("lm_interval", -1), ("lm_interval", 2**31)])
def test_lm_parameter_ranges(name, value):
    with kfac.Optimizer(np.float64) as opt:
        before = opt.get_param(name)
        with pytest.raises(kfac.KFACError) as info:
            opt.set_param(name, value)
        assert info.value.status == kfac.KFAC_ERROR_PARAMETER_RANGE
        assert opt.get_param(name) == before
        opt.lm_decay = 1e-6
        opt.lm_interval = 2**31 - 1
        assert (opt.lm_decay, opt.lm_interval) == (1e-6, 2**31 - 1)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------


def _expect(status, function, *args, **kwargs):
    with pytest.raises(kfac.KFACError) as info:
        function(*args, **kwargs)
    assert info.value.status == status, info.value
    assert info.value.message
    return info.value


def _twins(model):
    handles = []
    for _ in range(2):
        opt = kfac.Optimizer(np.float64, damping=0.05, kl_clip=0, inverse_update_period=1)
        opt.add_dense(model.inf, model.out)
        handles.append(opt)
    return handles


def test_call_order_errors_are_no_step(rng):
    model, theta = make_problem(rng, "categorical")
    a, b = _twins(model)
    with a, b:
        z = model.logits(theta)
        _expect(kfac.KFAC_ERROR_NO_STEP, b.solve_step_size, z, z)  # before any step
        _expect(kfac.KFAC_ERROR_NO_STEP, b.report_loss_change, 1.0, 0.5)  # before any solve
        assert np.isnan(b.last_reduction_ratio)
        results = []
        for opt in (a, b):
            D = kfac_step(opt, model, theta, np.float64)
            results.append(opt.solve_step_size(z, model.products(D)))
        assert results[0] == results[1]
        _expect(kfac.KFAC_ERROR_NO_STEP, b.solve_step_size, z, model.products(D))  # twice
        assert a.state_bytes() == b.state_bytes()
        for opt in (a, b):
            opt.report_loss_change(1.0, 0.9)
        _expect(kfac.KFAC_ERROR_NO_STEP, b.report_loss_change, 1.0, 0.9)  # twice
        assert a.state_bytes() == b.state_bytes()
        assert a.last_reduction_ratio == b.last_reduction_ratio


def test_bad_arguments_change_nothing(rng):
    """Each failed solve or report leaves the handle as its twin; the next valid call agrees."""
    model, theta = make_problem(rng, "categorical")
    a, b = _twins(model)
    with a, b:
        for opt in (a, b):
            D = kfac_step(opt, model, theta, np.float64)
        z, jd = model.logits(theta), model.products(D)
        nan_z = z.copy()
        nan_z[2, 1] = np.nan
        inf_jd = jd.copy()
        inf_jd[-1, -1] = np.inf
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, b.solve_step_size, z, jd, distribution=3)
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, b.solve_step_size, z, jd, distribution=-1)
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, b.solve_step_size, z, jd, distribution=2**40)
        with pytest.raises(ValueError):
            b.solve_step_size(z, jd, distribution="poisson")
        with pytest.raises(TypeError):
            b.solve_step_size(z, jd, distribution=1.0)
        _expect(kfac.KFAC_ERROR_NON_FINITE, b.solve_step_size, nan_z, jd)
        _expect(kfac.KFAC_ERROR_NON_FINITE, b.solve_step_size, z, inf_jd)
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, b.solve_step_size, z[:0], jd[:0])
        with pytest.raises(ValueError):
            b.solve_step_size(z, jd[:-1])  # rows differ
        with pytest.raises(ValueError):
            b.solve_step_size(z, jd[:, :-1])  # output_dim differs
        with pytest.raises(ValueError):
            b.solve_step_size(z, jd, jd[:-1])
        with pytest.raises(ValueError):
            b.solve_step_size(z[0], jd[0])  # one row must still be 2-D
        with kfac.Optimizer(np.float32) as narrow:
            with pytest.raises(TypeError):  # float64 data into a float32 handle: never narrowed
                narrow.solve_step_size(z, jd)
        assert a.state_bytes() == b.state_bytes()
        results = [opt.solve_step_size(z, jd) for opt in (a, b)]
        assert results[0] == results[1]
        _expect(kfac.KFAC_ERROR_NON_FINITE, b.report_loss_change, np.nan, 1.0)
        _expect(kfac.KFAC_ERROR_NON_FINITE, b.report_loss_change, 1.0, np.nan)
        assert a.state_bytes() == b.state_bytes()
        assert [opt.report_loss_change(1.0, 0.95) for opt in (a, b)] == [a.last_reduction_ratio] * 2


def test_previous_products_with_nan_after_a_first_solve(rng):
    model, theta = make_problem(rng, "categorical")
    with kfac.Optimizer(np.float64, kl_clip=0, inverse_update_period=1) as opt:
        opt.add_dense(model.inf, model.out)
        D = kfac_step(opt, model, theta, np.float64)
        alpha, _, _ = opt.solve_step_size(model.logits(theta), model.products(D))
        opt.report_loss_change(1.0, 0.9)
        theta = theta - alpha * D
        D2 = kfac_step(opt, model, theta, np.float64)
        jp = model.products(-alpha * D)
        jp[0, 0] = np.nan
        _expect(kfac.KFAC_ERROR_NON_FINITE, opt.solve_step_size, model.logits(theta), model.products(D2), jp)


def test_raw_calls_null_pointers_and_dtype_mismatch(rng):
    model, theta = make_problem(rng, "categorical")
    with kfac.Optimizer(np.float64, kl_clip=0) as opt:
        opt.add_dense(model.inf, model.out)
        D = kfac_step(opt, model, theta, np.float64)
        z = np.ascontiguousarray(model.logits(theta))
        jd = np.ascontiguousarray(model.products(D))
        dp = ctypes.POINTER(ctypes.c_double)
        fp = ctypes.POINTER(ctypes.c_float)
        alpha, mu, m = ctypes.c_double(7), ctypes.c_double(7), ctypes.c_double(7)
        h = opt._handle
        args = (z.ctypes.data_as(dp), jd.ctypes.data_as(dp), None, z.shape[0], z.shape[1], 0)
        outs = (ctypes.byref(alpha), ctypes.byref(mu), ctypes.byref(m))
        assert _lib.kfac_solve_step_size_f64(None, *args, *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_solve_step_size_f64(h, None, *args[1:], *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_solve_step_size_f64(h, args[0], None, *args[2:], *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_solve_step_size_f64(h, *args, None, outs[1], outs[2]) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_solve_step_size_f64(h, *args, outs[0], None, outs[2]) == kfac.KFAC_ERROR_NULL_POINTER
        z32, jd32 = z.astype(np.float32), jd.astype(np.float32)
        assert _lib.kfac_solve_step_size_f32(h, z32.ctypes.data_as(fp), jd32.ctypes.data_as(fp), None,
                                             z.shape[0], z.shape[1], 0, *outs) == kfac.KFAC_ERROR_DTYPE_MISMATCH
        for rows, dim, status in [(0, 4, kfac.KFAC_ERROR_INVALID_SIZE), (10, 0, kfac.KFAC_ERROR_INVALID_SIZE),
                                  (-1, 4, kfac.KFAC_ERROR_INVALID_SIZE),
                                  (2**40, 2**40, kfac.KFAC_ERROR_SIZE_OVERFLOW)]:
            assert _lib.kfac_solve_step_size_f64(h, args[0], args[1], None, rows, dim, 0, *outs) == status
        assert (alpha.value, mu.value, m.value) == (7, 7, 7), "failed calls leave the outputs"
        # predicted_change may be NULL.
        assert _lib.kfac_solve_step_size_f64(h, *args, outs[0], outs[1], None) == kfac.KFAC_OK
        assert alpha.value != 7 and mu.value == 0 and m.value == 7
        # rho may be NULL; the report still counts.
        assert _lib.kfac_report_loss_change(h, 1.0, 0.9, None) == kfac.KFAC_OK
        assert np.isfinite(opt.last_reduction_ratio)
        assert _lib.kfac_report_loss_change(None, 1.0, 0.9, None) == kfac.KFAC_ERROR_NULL_POINTER
        assert np.isnan(_lib.kfac_last_reduction_ratio(None))


def test_state_keeps_the_previous_update_and_the_pending_prediction(rng):
    """A resumed handle forms the same model (δ₀ and the pending M(δ) are in the image); the
    directions awaiting a solve are not saved."""
    model, theta = make_problem(rng, "categorical")
    handles = [kfac.Optimizer(np.float64, kl_clip=0, damping=0.05, inverse_update_period=1) for _ in range(3)]
    a, b, c = handles
    try:
        for opt in handles:
            opt.add_dense(model.inf, model.out)
        D = kfac_step(a, model, theta, np.float64)
        alpha, _, _ = a.solve_step_size(model.logits(theta), model.products(D))
        b.load_state(a.state_bytes())  # a prediction is pending
        assert a.report_loss_change(1.0, 0.9) == b.report_loss_change(1.0, 0.9)
        c.load_state(a.state_bytes())  # δ₀ is kept, nothing is pending
        _expect(kfac.KFAC_ERROR_NO_STEP, c.report_loss_change, 1.0, 0.9)
        theta = theta - alpha * D
        z = model.logits(theta)
        D2 = kfac_step(b, model, theta, np.float64)
        _expect(kfac.KFAC_ERROR_NO_STEP, c.solve_step_size, z, model.products(D2))
        c.load_state(b.state_bytes())  # the image of a handle with directions: they are not in it
        _expect(kfac.KFAC_ERROR_NO_STEP, c.solve_step_size, z, model.products(D2))
        c.load_state(a.state_bytes())  # as b was before its step
        for opt in (a, c):
            assert np.array_equal(kfac_step(opt, model, theta, np.float64), D2)
        jp = model.products(-alpha * D)
        results = [opt.solve_step_size(z, model.products(D2), jp) for opt in (a, b, c)]
        assert results[0][1] != 0
        assert results[0] == results[1] == results[2]
    finally:
        for opt in handles:
            opt.close()


# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

ROWS = 40_000


@pytest.mark.parametrize("sample_dtype", [np.float64, np.float32])
def test_categorical_frequencies(sample_dtype):
    logits = np.array([0.5, -1.0, 2.0, 0.0])
    z = np.tile(logits, (ROWS, 1)).astype(sample_dtype)
    targets = kfac.sample_targets(z, "categorical", seed=7)
    assert targets.dtype == sample_dtype and targets.shape == z.shape
    assert set(np.unique(targets)) <= {0.0, 1.0}
    assert np.all(targets.sum(axis=1) == 1)
    p = softmax(logits)
    frequency = targets.mean(axis=0)
    sigma = np.sqrt(p * (1 - p) / ROWS)
    assert np.all(np.abs(frequency - p) < 5 * sigma), (frequency, p)


def test_bernoulli_means_and_gaussian_moments():
    logits = np.array([0.5, -1.0, 2.0, 0.0])
    z = np.tile(logits, (ROWS, 1))
    targets = kfac.sample_targets(z, "bernoulli", seed=8)
    assert set(np.unique(targets)) == {0.0, 1.0}
    q = sigmoid(logits)
    assert np.all(np.abs(targets.mean(axis=0) - q) < 5 * np.sqrt(q * (1 - q) / ROWS))
    noise = kfac.sample_targets(z, kfac.KFAC_DIST_GAUSSIAN, seed=9) - z
    mean = noise.mean(axis=0)
    variance = noise.var(axis=0, ddof=1)
    assert np.all(np.abs(mean) < 5 / np.sqrt(ROWS)), mean
    assert np.all(np.abs(variance - 1) < 5 * np.sqrt(2 / ROWS)), variance
    # Coordinates and rows are independent: near-zero correlations.
    corr = np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]
    assert abs(corr) < 5 / np.sqrt(ROWS)
    lag = np.corrcoef(noise[:-1, 0], noise[1:, 0])[0, 1]
    assert abs(lag) < 5 / np.sqrt(ROWS)


@pytest.mark.parametrize("distribution", ["categorical", "bernoulli", "gaussian"])
def test_sampled_output_grads_have_the_output_fisher_as_second_moment(distribution):
    logits = np.array([1.0, -0.5, 0.2])
    z = np.tile(logits, (ROWS, 1))
    g = kfac.sampled_output_grads(z, distribution, seed=3)
    moment = g.T @ g / ROWS
    if distribution == "categorical":
        p = softmax(logits)
        fisher = np.diag(p) - np.outer(p, p)
    elif distribution == "bernoulli":
        p = sigmoid(logits)
        fisher = np.diag(p * (1 - p))
    else:
        fisher = np.eye(3)
    # Per-entry standard error of a mean of products of bounded (or Gaussian) values.
    per_entry = np.sqrt(np.mean((g[:, :, None] * g[:, None, :]) ** 2, axis=0) / ROWS)
    assert np.all(np.abs(moment - fisher) < 5 * per_entry + 1e-12), (moment, fisher)
    assert np.all(np.abs(g.mean(axis=0)) < 5 * np.sqrt(np.diag(fisher) / ROWS) + 1e-12)


@pytest.mark.parametrize("distribution", ["categorical", "bernoulli", "gaussian"])
def test_sampled_grads_are_the_loss_gradient_at_the_sampled_targets(rng, distribution):
    z = rng.standard_normal((50, 5))
    y = kfac.sample_targets(z, distribution, seed=11)
    g = kfac.sampled_output_grads(z, distribution, seed=11)
    mean = {"categorical": softmax(z), "bernoulli": sigmoid(z), "gaussian": z}[distribution]
    np.testing.assert_allclose(g, mean - y, rtol=1e-12, atol=1e-12)


def test_samplers_are_reproducible_and_precision_independent(rng):
    z = rng.standard_normal((64, 6)).astype(np.float32)  # exactly representable in both
    first = kfac.sample_targets(z, "categorical", 5)
    for distribution in ("categorical", "bernoulli"):
        a = kfac.sample_targets(z, distribution, 5)
        assert np.array_equal(a, kfac.sample_targets(z, distribution, 5))
        assert np.array_equal(a, kfac.sample_targets(z.astype(np.float64), distribution, 5))
        assert not np.array_equal(a, kfac.sample_targets(z, distribution, 6))
        # Draws depend on the row index within the call: the first rows of a larger batch.
        assert np.array_equal(a[:10], kfac.sample_targets(z[:10], distribution, 5))
    g = kfac.sample_targets(z.astype(np.float64), "gaussian", 5)
    np.testing.assert_allclose(kfac.sample_targets(z, "gaussian", 5), g, rtol=1e-6, atol=1e-6)
    assert kfac.sample_targets(z.reshape(8, 8, 6), "gaussian", 5).shape == (8, 8, 6)
    assert np.array_equal(kfac.sample_targets(z[0], "categorical", 5), first[0])  # 1-D: one row
    assert kfac.sample_targets(np.zeros((2, 3), dtype=np.int64), "bernoulli", 1).dtype == np.float64
    assert kfac.sample_targets(np.zeros((2, 3), dtype=np.float16), "bernoulli", 1).dtype == np.float32
    assert kfac.sample_targets(z, "gaussian", 2**64 - 1).shape == z.shape


def test_sampler_errors():
    z = np.zeros((4, 3))
    for function in (kfac.sample_targets, kfac.sampled_output_grads):
        bad = z.copy()
        bad[1, 2] = np.nan
        _expect(kfac.KFAC_ERROR_NON_FINITE, function, bad, "categorical", 0)
        bad[1, 2] = -np.inf
        _expect(kfac.KFAC_ERROR_NON_FINITE, function, bad.astype(np.float32), "gaussian", 0)
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, function, z, 3, 0)
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, function, z, -1, 0)
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, function, z[:0], "categorical", 0)
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, function, np.zeros((4, 0)), "categorical", 0)
        with pytest.raises(ValueError):
            function(z, "multinomial", 0)
        with pytest.raises(ValueError):
            function(z, "categorical", -1)
        with pytest.raises(ValueError):
            function(z, "categorical", 2**64)
        with pytest.raises(TypeError):
            function(z, "categorical", 1.5)
        with pytest.raises(TypeError):
            function(z.astype(np.complex128), "categorical", 0)
        with pytest.raises(ValueError):
            function(np.float64(1.0), "categorical", 0)
    # The raw functions: NULL pointers, sizes.
    dp = ctypes.POINTER(ctypes.c_double)
    out = np.full((4, 3), 7.0)
    zp, op = z.ctypes.data_as(dp), out.ctypes.data_as(dp)
    for name in ("kfac_sample_targets_f64", "kfac_sampled_output_grads_f64"):
        function = getattr(_lib, name)
        assert function(None, 4, 3, 0, 1, op) == kfac.KFAC_ERROR_NULL_POINTER
        assert function(zp, 4, 3, 0, 1, None) == kfac.KFAC_ERROR_NULL_POINTER
        assert function(zp, -4, 3, 0, 1, op) == kfac.KFAC_ERROR_INVALID_SIZE
        assert function(zp, 2**40, 2**40, 0, 1, op) == kfac.KFAC_ERROR_SIZE_OVERFLOW
        assert function(zp, 4, 3, 7, 1, op) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        assert np.all(out == 7.0), "failed calls leave the output buffer"


# ---------------------------------------------------------------------------------------------
# PyTorch: sampled_fisher_backward
# ---------------------------------------------------------------------------------------------


def _torch_mlp(seed=0, sizes=(5, 7, 4)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])).double()


def _batch(seed=1, n=32, inf=5, classes=4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inf, generator=generator, dtype=torch.float64)
    y = torch.randint(0, classes, (n,), generator=generator)
    return x, y


def _second_moment(rows):
    rows = np.asarray(rows, dtype=np.float64)
    return rows.T @ rows / rows.shape[0]


@needs_torch
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_sampled_fisher_backward_records_the_sampled_gradients(reduction):
    """G of every layer is the second moment of the back-propagated sampled gradients (summed
    loss), A the inputs'; the loss's backward only produces the ordinary .grad."""
    model = _torch_mlp()
    reference = _torch_mlp()
    x, y = _batch()
    pre = KFACPreconditioner(model, loss_reduction=reduction, kl_clip=0, inverse_update_period=1)
    outputs = model(x)
    loss = F.cross_entropy(outputs, y, reduction=reduction)
    assert pre.sampled_fisher_backward(outputs, "categorical", seed=3) is True
    assert all(p.grad is None for p in model.parameters()), "no .grad from the sampled pass"
    loss.backward()
    # The reference: the same network, by hand.
    s0 = reference[0](x)
    h = torch.tanh(s0)
    z = reference[2](h)
    g = torch.from_numpy(kfac.sampled_output_grads(z.detach().numpy(), "categorical", 3))
    (gs0,) = torch.autograd.grad(z, s0, g, retain_graph=True)
    F.cross_entropy(z, y, reduction=reduction).backward()
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.equal(p.grad, q.grad)
    pre.step()
    A0, G0 = pre.optimizer.factors(0)
    A1, G1 = pre.optimizer.factors(1)
    ones = np.ones((x.shape[0], 1))
    np.testing.assert_allclose(A0, _second_moment(np.hstack([x.numpy(), ones])), rtol=1e-12)
    np.testing.assert_allclose(A1, _second_moment(np.hstack([h.detach().numpy(), ones])), rtol=1e-12)
    np.testing.assert_allclose(G1, _second_moment(g.numpy()), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(G0, _second_moment(gs0.numpy()), rtol=1e-10, atol=1e-14)


@needs_torch
def test_after_the_first_call_the_loss_backward_never_records():
    """Once sampled_fisher_backward was used, the order of the two backward passes does not
    matter; before, calling it after loss.backward() is refused."""
    x, y = _batch()
    factors = []
    for order in ("sampled first", "loss first"):
        model = _torch_mlp()
        pre = KFACPreconditioner(model, kl_clip=0, inverse_update_period=1)
        for step in range(3):
            model.zero_grad()
            outputs = model(x)
            loss = F.cross_entropy(outputs, y)
            if order == "loss first" and step > 0:
                loss.backward(retain_graph=True)  # the sampled pass needs the graph afterwards
                assert pre.sampled_fisher_backward(outputs, "categorical", seed=step)
            else:
                assert pre.sampled_fisher_backward(outputs, "categorical", seed=step)
                loss.backward()
            pre.step()
        factors.append([pre.optimizer.factors(i) for i in range(2)])
    for (a0, g0), (a1, g1) in zip(*factors):
        assert np.array_equal(a0, a1) and np.array_equal(g0, g1)

    model = _torch_mlp()
    pre = KFACPreconditioner(model)
    outputs = model(x)
    F.cross_entropy(outputs, y).backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="before loss.backward"):
        pre.sampled_fisher_backward(outputs, "categorical")


@needs_torch
@pytest.mark.parametrize("case", ["layernorm first", "inputs require grad"])
def test_sampled_fisher_backward_reaches_layers_whose_inputs_require_grad(case):
    """A preconditioned layer after a non-preconditioned module with parameters (or fed a batch
    that requires gradients) still records: its input's gradient is requested too."""
    torch.manual_seed(0)
    if case == "layernorm first":
        model = nn.Sequential(nn.LayerNorm(5), nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4)).double()
    else:
        model = _torch_mlp()
    x, y = _batch()
    if case == "inputs require grad":
        x.requires_grad_(True)
    pre = KFACPreconditioner(model, kl_clip=0)
    outputs = model(x)
    assert pre.sampled_fisher_backward(outputs, "categorical", seed=1)
    assert x.grad is None and all(p.grad is None for p in model.parameters())
    F.cross_entropy(outputs, y).backward()
    pre.step()  # NO_STATISTICS if a layer had not recorded
    assert all(pre.optimizer.layer_info(i).has_factors for i in range(2))


@needs_torch
def test_sampled_fisher_backward_does_nothing_when_no_statistics_are_due():
    x, y = _batch()
    model = _torch_mlp()
    pre = KFACPreconditioner(model, factor_update_period=2, kl_clip=0)
    seen = []
    for step in range(4):
        model.zero_grad()
        outputs = model(x)
        seen.append(pre.sampled_fisher_backward(outputs, "categorical"))
        F.cross_entropy(outputs, y).backward()
        pre.step()
    assert seen == [True, False, True, False]
    model.eval()
    assert pre.sampled_fisher_backward(model(x), "categorical") is False
    model.train()
    with torch.no_grad():
        assert pre.sampled_fisher_backward(model(x), "categorical") is False
    outputs = model(x)
    with pytest.raises(ValueError):
        pre.sampled_fisher_backward(outputs.detach(), "categorical")
    with pytest.raises(ValueError):
        pre.sampled_fisher_backward(model(x), "poisson")
    with pytest.raises(TypeError):
        pre.sampled_fisher_backward(outputs.detach().numpy(), "categorical")


@needs_torch
def test_sampled_fisher_backward_scales_by_output_grad_scale():
    """With a loss scale S the sampled gradients are multiplied by S, which the library divides
    out: the factors equal those of an unscaled preconditioner."""
    x, y = _batch()
    results = []
    for scale in (1.0, 1024.0):
        model = _torch_mlp()
        pre = KFACPreconditioner(model, output_grad_scale=scale, kl_clip=0)
        outputs = model(x)
        pre.sampled_fisher_backward(outputs, "categorical", seed=5)
        (scale * F.cross_entropy(outputs, y)).backward()
        pre.step()
        results.append(pre.optimizer.factors(1)[1])
    np.testing.assert_allclose(results[0], results[1], rtol=1e-12)


# ---------------------------------------------------------------------------------------------
# PyTorch: adaptive_step
# ---------------------------------------------------------------------------------------------


def _grad_theta(layer):
    return np.hstack([layer.weight.grad.numpy(), layer.bias.grad.numpy()[:, None]])


def _theta(layer):
    return np.hstack([layer.weight.detach().numpy(), layer.bias.detach().numpy()[:, None]])


@needs_torch
def test_adaptive_step_alpha_and_mu_equal_the_explicit_solution_on_a_linear_model():
    torch.manual_seed(3)
    layer = nn.Linear(3, 4).double()
    x, y = _batch(seed=4, n=12, inf=3, classes=4)
    reference = LinearModel(x.numpy(), y.numpy(), 4, "categorical")
    damping = 0.05
    pre = KFACPreconditioner(layer, damping=damping, kl_clip=0, inverse_update_period=1)
    previous = None
    for k in range(3):
        layer.zero_grad()
        theta = _theta(layer)
        F.cross_entropy(layer(x), y).backward()
        np.testing.assert_allclose(_grad_theta(layer), reference.gradient(theta), rtol=1e-10, atol=1e-14)
        pre.step()
        D = _grad_theta(layer)
        alpha_ref, mu_ref, m_ref = reference_solve(reference, theta, D, previous, damping)
        result = pre.adaptive_step(x, lambda out: F.cross_entropy(out, y))
        assert isinstance(result, AdaptiveStepResult)
        assert result.alpha == pytest.approx(alpha_ref, rel=1e-8)
        assert result.mu == pytest.approx(mu_ref, rel=1e-8, abs=1e-12)
        assert result.predicted_change == pytest.approx(m_ref, rel=1e-8)
        assert (result.mu != 0) == (k > 0)
        update = -result.alpha * D + (0 if previous is None else result.mu * previous)
        np.testing.assert_allclose(_theta(layer), theta + update, rtol=1e-12, atol=1e-14)
        assert result.loss_before == pytest.approx(reference.loss(theta), rel=1e-12)
        assert result.loss_after == pytest.approx(reference.loss(theta + update), rel=1e-12)
        assert result.rho == pytest.approx((result.loss_after - result.loss_before) / m_ref, rel=1e-8)
        assert pre.last_reduction_ratio == result.rho
        previous = update


@needs_torch
def test_a_second_backward_after_the_recording_one_warns_once():
    torch.manual_seed(0)
    model = _torch_mlp()
    x, y = _batch()
    pre = KFACPreconditioner(model)
    outputs = model(x)
    F.cross_entropy(outputs, y).backward(retain_graph=True)  # records the empirical Fisher
    sampled = torch.distributions.Categorical(logits=outputs.detach()).sample()
    with pytest.warns(UserWarning, match="sampled_fisher_backward"):
        torch.autograd.grad(F.cross_entropy(outputs, sampled), list(model.parameters()), retain_graph=True)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="KFACPreconditioner: a second backward")  # only once
        torch.autograd.grad(F.cross_entropy(outputs, sampled), list(model.parameters()))
        pre.step()
        # The documented order warns about nothing.
        outputs = model(x)
        pre.sampled_fisher_backward(outputs, "categorical")
        F.cross_entropy(outputs, y).backward()
        pre.step()


@needs_torch
def test_adaptive_step_without_momentum_chooses_alpha_alone():
    torch.manual_seed(3)
    layer = nn.Linear(3, 4).double()
    x, y = _batch(seed=5, n=12, inf=3, classes=4)
    reference = LinearModel(x.numpy(), y.numpy(), 4, "categorical")
    damping = 0.05
    pre = KFACPreconditioner(layer, damping=damping, kl_clip=0, inverse_update_period=1)
    for k in range(3):
        layer.zero_grad()
        theta = _theta(layer)
        F.cross_entropy(layer(x), y).backward()
        pre.step()
        D = _grad_theta(layer)
        alpha_ref, _, m_ref = reference_solve(reference, theta, D, None, damping)
        result = pre.adaptive_step(x, lambda out: F.cross_entropy(out, y), momentum=False)
        assert result.mu == 0
        assert result.alpha == pytest.approx(alpha_ref, rel=1e-8)
        assert result.predicted_change == pytest.approx(m_ref, rel=1e-8)
        np.testing.assert_allclose(_theta(layer), theta - result.alpha * D, rtol=1e-12, atol=1e-14)


@needs_torch
@pytest.mark.parametrize("sampled", [False, True], ids=["empirical", "sampled"])
def test_adaptive_step_trains_a_small_mlp(sampled):
    torch.manual_seed(0)
    x = torch.randn(128, 5, dtype=torch.float64)
    y = (x @ torch.randn(5, 4, dtype=torch.float64)).argmax(1)
    model = _torch_mlp(seed=1)
    pre = KFACPreconditioner(model, damping=1e-2, kl_clip=0, inverse_update_period=2,
                             lm_interval=2, lm_decay=0.9)
    losses, dampings = [], []
    for step in range(12):
        model.zero_grad()
        outputs = model(x)
        loss = F.cross_entropy(outputs, y)
        if sampled:
            pre.sampled_fisher_backward(outputs, "categorical")
        loss.backward()
        pre.step()
        result = pre.adaptive_step(x, lambda out: F.cross_entropy(out, y))
        assert result.loss_before == pytest.approx(loss.item(), rel=1e-12)
        assert result.predicted_change < 0 and np.isfinite(result.rho)
        assert all(not layer.saved_inputs for layer in pre._layers), "no statistics from its passes"
        losses.append(result.loss_after)
        dampings.append(result.damping)
    assert losses[-1] < 0.3 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert len(set(dampings)) > 1, "Levenberg–Marquardt moved λ"
    assert pre.steps == 12


@needs_torch
def test_adaptive_step_misuse():
    x, y = _batch()
    model = _torch_mlp()
    pre = KFACPreconditioner(model, kl_clip=0)
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    with pytest.raises(kfac.KFACError) as info:
        pre.adaptive_step(x, loss_fn)  # before any step
    assert info.value.status == kfac.KFAC_ERROR_NO_STEP
    F.cross_entropy(model(x), y).backward()
    pre.step()
    pre.adaptive_step(x, loss_fn)
    with pytest.raises(kfac.KFACError) as info:
        pre.adaptive_step(x, loss_fn)  # twice for one step
    assert info.value.status == kfac.KFAC_ERROR_NO_STEP
    with pytest.raises(ValueError):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        pre.adaptive_step(x, loss_fn, distribution="poisson")
    summed = KFACPreconditioner(_torch_mlp(), loss_reduction="sum")
    with pytest.raises(ValueError, match="mean"):
        summed._directions_ready = True
        summed.adaptive_step(x, loss_fn)


@needs_torch
def test_adaptive_step_undoes_a_non_finite_update():
    x, y = _batch()
    model = _torch_mlp()
    pre = KFACPreconditioner(model, kl_clip=0)
    F.cross_entropy(model(x), y).backward()
    pre.step()
    before = [p.detach().clone() for p in model.parameters()]
    calls = []

    def loss_fn(out):
        calls.append(1)
        loss = F.cross_entropy(out, y)
        return loss if len(calls) == 1 else loss * float("inf")

    with pytest.raises(kfac.KFACError) as info:
        pre.adaptive_step(x, loss_fn)
    assert info.value.status == kfac.KFAC_ERROR_NON_FINITE
    for p, q in zip(model.parameters(), before):
        assert torch.allclose(p, q, rtol=0, atol=1e-15)


@needs_torch
def test_adaptive_state_dict_round_trip_gives_identical_steps():
    x, y = _batch()
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731

    def run(model, pre, steps):
        results = []
        for _ in range(steps):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            results.append(pre.adaptive_step(x, loss_fn))
        return results

    model = _torch_mlp()
    pre = KFACPreconditioner(model, kl_clip=0, damping=1e-2, lm_interval=1)
    run(model, pre, 2)
    state = pre.state_dict()
    assert state["previous_update"] is not None
    import copy

    clone = copy.deepcopy(model)
    resumed = KFACPreconditioner(clone, kl_clip=0, damping=1e-2, lm_interval=1)
    resumed.load_state_dict(state)
    a = run(model, pre, 2)
    b = run(clone, resumed, 2)
    assert a == b and a[0].mu != 0
