"""The adaptive mode (step size α, momentum μ, Levenberg–Marquardt damping) of the numpy API,
against the independent reference of references/adaptive.py (explicit Jacobians and Fisher of a
linear model, the explicit 2×2 system)."""

import ctypes
import math

import numpy as np
import pytest

import libkfac as kfac
from libkfac import _lib
from references.adaptive import LinearModel, make_problem, reference_solve, sigmoid, softmax
from testutil import TOLERANCE, kfac_step


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


def test_skipped_reports_count_and_leave_damping_to_the_reports_that_adjust_it(rng):
    """report_needed / skip_loss_report (experimental): a skip counts as a report, leaves λ and
    makes ρ NaN; the 3rd, 6th, ... reports are needed and cannot be skipped, and λ follows their ρ
    as in the test above."""
    model, theta = make_problem(rng, "categorical")
    omega = 0.8**3
    with kfac.Optimizer(np.float64, damping=1.0, kl_clip=0, lm_decay=0.8, lm_interval=3) as opt:
        opt.add_dense(model.inf, model.out)
        with pytest.raises(kfac.KFACError) as info:
            opt.skip_loss_report()  # no solve yet
        assert info.value.status == kfac.KFAC_ERROR_NO_STEP
        expected, needed = 1.0, []
        for report, ratio in enumerate([None, None, 0.9, None, None, 0.1], start=1):
            D = kfac_step(opt, model, theta, np.float64)
            _, _, m = opt.solve_step_size(model.logits(theta), model.products(D), distribution="categorical")
            needed.append(opt.report_needed)
            if ratio is None:
                opt.skip_loss_report()
                assert math.isnan(opt.last_reduction_ratio)
                with pytest.raises(kfac.KFACError) as info:
                    opt.skip_loss_report()  # once per solve
                assert info.value.status == kfac.KFAC_ERROR_NO_STEP
            else:
                with pytest.raises(kfac.KFACError) as info:
                    opt.skip_loss_report()
                assert info.value.status == kfac.KFAC_ERROR_NO_STEP and "adjusts" in str(info.value)
                assert opt.report_loss_change(2.0, 2.0 + ratio * m) == pytest.approx(ratio, rel=1e-12)
                expected = expected * omega if ratio > 0.75 else expected / omega
            assert opt.damping == pytest.approx(expected, rel=1e-12), report
        assert needed == [False, False, True, False, False, True]
        opt.lm_interval = 0
        assert not opt.report_needed


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
        assert b.last_reduction_ratio is None
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
        h = opt.handle.pointer
        args = (z.ctypes.data_as(dp), jd.ctypes.data_as(dp), None, z.shape[0], z.shape[1], 0)
        outs = (ctypes.byref(alpha), ctypes.byref(mu), ctypes.byref(m))
        assert _lib.kfac_adaptive_solve_step_size_f64(None, *args, *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_adaptive_solve_step_size_f64(h, None, *args[1:], *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_adaptive_solve_step_size_f64(h, args[0], None, *args[2:], *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_adaptive_solve_step_size_f64(h, *args, None, outs[1], outs[2]) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_adaptive_solve_step_size_f64(h, *args, outs[0], None, outs[2]) == kfac.KFAC_ERROR_NULL_POINTER
        z32, jd32 = z.astype(np.float32), jd.astype(np.float32)
        assert _lib.kfac_adaptive_solve_step_size_f32(h, z32.ctypes.data_as(fp), jd32.ctypes.data_as(fp), None,
                                             z.shape[0], z.shape[1], 0, *outs) == kfac.KFAC_ERROR_DTYPE_MISMATCH
        for rows, dim, status in [(0, 4, kfac.KFAC_ERROR_INVALID_SIZE), (10, 0, kfac.KFAC_ERROR_INVALID_SIZE),
                                  (-1, 4, kfac.KFAC_ERROR_INVALID_SIZE),
                                  (2**40, 2**40, kfac.KFAC_ERROR_SIZE_OVERFLOW)]:
            assert _lib.kfac_adaptive_solve_step_size_f64(h, args[0], args[1], None, rows, dim, 0, *outs) == status
        assert (alpha.value, mu.value, m.value) == (7, 7, 7), "failed calls leave the outputs"
        # predicted_change may be NULL.
        assert _lib.kfac_adaptive_solve_step_size_f64(h, *args, outs[0], outs[1], None) == kfac.KFAC_OK
        assert alpha.value != 7 and mu.value == 0 and m.value == 7
        # rho may be NULL; the report still counts.
        assert _lib.kfac_adaptive_report_loss_change(h, 1.0, 0.9, None) == kfac.KFAC_OK
        assert np.isfinite(opt.last_reduction_ratio)
        assert _lib.kfac_adaptive_report_loss_change(None, 1.0, 0.9, None) == kfac.KFAC_ERROR_NULL_POINTER
        rho = ctypes.c_double(7.0)
        assert _lib.kfac_adaptive_get_reduction_ratio(None, ctypes.byref(rho)) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_adaptive_get_reduction_ratio(h, None) == kfac.KFAC_ERROR_NULL_POINTER
        assert rho.value == 7.0


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
