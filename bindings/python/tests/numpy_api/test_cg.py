"""Conjugate gradient and Newton-CG (experimental kfac_cg_*, through libkfac.newton_cg.NewtonCG)
against an explicit SPD G and the independent numpy PCG of references/cg.py: exact solutions,
the iteration where each stopping rule stops, the model value and ρ, the Levenberg–Marquardt
schedule, warm starts, and misuse on twin optimizers."""

import ctypes

import numpy as np
import pytest

import libkfac as kfac
from libkfac import _lib
from libkfac.newton_cg import CGResult, NewtonCG, armijo_backtracking
from references import cg as ref

pytestmark = pytest.mark.skipif(
    any(name.startswith("kfac_cg_") for name in _lib.MISSING_EXPERIMENTAL),
    reason="the loaded library does not export kfac_cg_* yet",
)

TWO = [(5, 4, True), (4, 3, False)]  # 36 parameters
ONE = [(24, 8, True)]  # 200 parameters


def _optimizer(dtype, layers, **params):
    opt = kfac.Optimizer(dtype, **params)
    for fan_in, fan_out, bias in layers:
        opt.add_dense(fan_in, fan_out, bias=bias)
    return opt


def _flat(ws, bs):
    parts = []
    for w, b in zip(ws, bs):
        parts.append(np.asarray(w, np.float64).ravel())
        if b is not None:
            parts.append(np.asarray(b, np.float64))
    return np.concatenate(parts)


def _unflat(x, layers, dtype):
    ws, bs, o = [], [], 0
    for fan_in, fan_out, bias in layers:
        ws.append(x[o:o + fan_in * fan_out].reshape(fan_out, fan_in).astype(dtype))
        o += fan_in * fan_out
        if bias:
            bs.append(x[o:o + fan_out].astype(dtype))
            o += fan_out
        else:
            bs.append(None)
    return ws, bs


def _size(layers):
    return sum(i * o + (o if b else 0) for i, o, b in layers)


def _product(G, layers, dtype):
    return lambda vw, vb: _unflat(G @ _flat(vw, vb), layers, dtype)


def _solve(cg, G, g, layers, dtype, **kw):
    gw, gb = _unflat(g, layers, dtype)
    sw, sb, res = cg.solve(gw, gb, _product(G, layers, dtype), **kw)
    return _flat(sw, sb), res


def _tol(dtype):
    return 1e-4 if dtype == np.float32 else 1e-10


def test_three_distinct_eigenvalues_take_three_iterations(rng, dtype):
    n = _size(TWO)
    G = ref.spd([(1.0, 4.0, 16.0)[i % 3] for i in range(n)], 5)
    g = rng.standard_normal(n)
    cg = NewtonCG(_optimizer(dtype, TWO, damping=1e-3), tolerance=1e-11 if dtype == np.float64 else 1e-5)
    x, res = _solve(cg, G, g, TWO, dtype)
    exact = np.linalg.solve(G + 1e-3 * np.eye(n), -g)
    assert np.max(np.abs(x - exact)) < _tol(dtype) * np.max(np.abs(exact))
    assert res.reason == "residual"
    if dtype == np.float64:
        assert res.iterations == 3
    else:
        assert res.iterations <= 6


@pytest.mark.parametrize("rule, tol", [("residual", 0.1), ("residual", 1e-3),
                                       ("relative_progress", 5e-4), ("relative_progress", 1e-6)])
@pytest.mark.parametrize("diagonal", [False, True], ids=["none", "diagonal"])
def test_stopping_rules_stop_where_the_reference_stops(rule, tol, diagonal):
    """float64: the same iteration and reason as references/cg.py, and the same solution."""
    n = _size(ONE)
    rng = np.random.default_rng(11)
    G = ref.spd(0.1 * 100.0 ** (np.arange(n) / (n - 1)), 12)
    g = rng.standard_normal(n)
    d = np.diag(G) * (1 + 0.5 * rng.uniform(-1, 1, n))
    lam = 1e-3
    cg = NewtonCG(_optimizer(np.float64, ONE, damping=lam), stop_rule=rule, tolerance=tol,
                  preconditioner="diagonal" if diagonal else "none")
    kw = {}
    if diagonal:
        kw = dict(zip(("diagonal_weights", "diagonal_biases"), _unflat(d, ONE, np.float64)))
    x, res = _solve(cg, G, g, ONE, np.float64, **kw)
    minv = (d + lam) ** -0.75 if diagonal else None
    xr, iterations, reason, _ = ref.pcg(G, lam, g, minv=minv, rule=rule, tol=tol)
    assert (res.iterations, res.reason) == (iterations, reason)
    assert np.max(np.abs(x - xr)) < 1e-8 * np.max(np.abs(xr))
    assert iterations > 3


def test_relative_progress_window_grows_past_100_iterations():
    """A slower problem (spectrum 1e-2 … 1e1, ε = 1e-8) whose progress rule fires after 100
    iterations, where the window k = ⌊i/10⌋ exceeds 10. Past ~100 iterations two correct CGs drift
    apart by rounding, so the reference here (references/cg.py: pcg_in_order) takes its sums in
    the header's order, left to right: the library then stops at exactly its iteration, with a
    bitwise equal step."""
    n = _size(ONE)
    G = ref.spd(0.01 * 1e3 ** (np.arange(n) / (n - 1)), 12)
    g = np.random.default_rng(11).standard_normal(n)
    cg = NewtonCG(_optimizer(np.float64, ONE, damping=1e-3), stop_rule="relative_progress", tolerance=1e-8,
                  max_iterations=400)
    x, res = _solve(cg, G, g, ONE, np.float64)
    xr, iterations, reason = ref.pcg_in_order(G, 1e-3, g, rule="relative_progress", tol=1e-8, max_iterations=400)
    assert iterations > 110 and reason == "relative_progress"
    assert (res.iterations, res.reason) == (iterations, reason)
    np.testing.assert_array_equal(x, xr)


def test_the_stopping_iterations_differ_between_cases():
    """The oracle above is not vacuous: the eight cases stop at several different iterations."""
    n = _size(ONE)
    rng = np.random.default_rng(11)
    G = ref.spd(0.1 * 100.0 ** (np.arange(n) / (n - 1)), 12)
    g = rng.standard_normal(n)
    stops = {ref.pcg(G, 1e-3, g, rule=r, tol=t)[1]
             for r, t in [("residual", 0.1), ("residual", 1e-3), ("relative_progress", 5e-4),
                          ("relative_progress", 1e-6)]}
    assert len(stops) == 4


def test_iteration_limit(rng):
    n = _size(TWO)
    G = ref.spd(1 + np.arange(n), 3)
    cg = NewtonCG(_optimizer(np.float64, TWO), max_iterations=5, tolerance=1e-12)
    _, res = _solve(cg, G, rng.standard_normal(n), TWO, np.float64)
    assert (res.iterations, res.reason, res.products) == (5, "max_iterations", 5)


def test_exact_diagonal_preconditioner_converges_in_one_iteration(rng, dtype):
    n = _size(TWO)
    d = 0.5 + 4 * rng.uniform(size=n)
    g = rng.standard_normal(n)
    cg = NewtonCG(_optimizer(dtype, TWO, damping=0.1), preconditioner="diagonal", diagonal_exponent=1.0,
                  tolerance=1e-3)
    dw, db = _unflat(d, TWO, dtype)
    x, res = _solve(cg, np.diag(d), g, TWO, dtype, diagonal_weights=dw, diagonal_biases=db)
    assert res.iterations == 1
    exact = -g / (d + 0.1)
    assert np.max(np.abs(x - exact)) < _tol(dtype) * np.max(np.abs(exact))


def test_kfac_preconditioner_is_exact_for_one_example_on_one_layer(dtype):
    """One dense layer 3→2 with bias fed one example: A = āāᵀ, and output gradients whose
    second moment is B, so the Gauss-Newton matrix āāᵀ ⊗ B is the K-FAC block itself and CG
    preconditioned by its (eigen, λ-damped) inverse converges in one iteration."""
    opt = _optimizer(dtype, [(3, 2, True)], damping=0.05, inverse_strategy="eigen")
    a = np.array([[0.7, -1.2, 0.4]])
    S = np.array([[1.1, 0.0], [-0.4, 0.8]])
    B = S @ S.T
    opt.record_inputs(0, a.astype(dtype))
    opt.record_output_grads(0, (np.sqrt(2) * S.T).astype(dtype))  # rows √2·(columns of S): G = B
    opt.update_factors()
    opt.update_inverses()
    abar = np.append(a[0], 1.0)

    def product(vw, vb):
        theta = np.concatenate([vw[0], vb[0][:, None]], axis=1).astype(np.float64)
        out = B @ theta @ np.outer(abar, abar)
        return [out[:, :3].astype(dtype)], [out[:, 3].astype(dtype)]

    g = np.random.default_rng(3).standard_normal(8)
    gw, gb = _unflat(g, [(3, 2, True)], dtype)
    sw, sb, res = NewtonCG(opt, preconditioner="kfac", tolerance=1e-4).solve(gw, gb, product)
    assert res.iterations == 1
    K = np.zeros((8, 8))
    for k in range(8):
        e = np.zeros(8)
        e[k] = 1
        pw, pb = product(*_unflat(e, [(3, 2, True)], np.float64))
        K[:, k] = _flat(pw, pb)
    exact = np.linalg.solve(K + 0.05 * np.eye(8), -g)
    assert np.max(np.abs(_flat(sw, sb) - exact)) < _tol(dtype) * np.max(np.abs(exact))


def test_model_value_and_reduction_ratio(rng, dtype):
    n = _size(TWO)
    G = ref.spd(0.5 + np.arange(n) % 7, 21)
    g = rng.standard_normal(n)
    lam, eta = 0.3, 0.05
    opt = _optimizer(dtype, TWO, damping=lam, lm_interval=1, lm_decay=2 / 3)
    cg = NewtonCG(opt, max_iterations=4, tolerance=1e-9, l2=eta)
    s, res = _solve(cg, G, g, TWO, dtype)
    gs, sGs = g @ s, s @ G @ s + eta * s @ s
    rtol = 1e-4 if dtype == np.float32 else 1e-10
    np.testing.assert_allclose(
        [res.grad_dot_step, res.step_curvature, res.model_value, res.quadratic_value, res.damping_term],
        [gs, sGs, gs + 0.5 * sGs, gs + 0.5 * sGs + 0.5 * lam * s @ s, lam * s @ s], rtol=rtol)
    assert res.damping == lam
    m = 0.5 * gs + 0.125 * sGs
    assert res.predicted_change(0.5) == pytest.approx(m, rel=rtol)
    rho = cg.report_loss_change(2.0, 2.0 + 0.9 * m, step_scale=0.5)
    assert rho == pytest.approx(0.9, rel=rtol)
    assert opt.get_param("damping") == pytest.approx(lam * 2 / 3, rel=1e-15)
    with pytest.raises(kfac.KFACError) as error:
        cg.report_loss_change(2.0, 1.0)
    assert error.value.status == kfac.KFAC_ERROR_NO_SOLVE


def test_levenberg_marquardt_schedule_on_scripted_losses():
    n = _size(TWO)
    G = ref.spd(1 + np.arange(n) % 5, 31)
    opt = _optimizer(np.float64, TWO, damping=1.0, lm_interval=1, lm_decay=2 / 3)
    cg = NewtonCG(opt)
    targets = [0.9, 0.5, 0.1, -2.0, 0.76, 0.74, 0.26, 0.24, np.inf]
    rhos, lambdas = [], []
    for k, target in enumerate(targets):
        _, res = _solve(cg, G, np.random.default_rng(40 + k).standard_normal(n), TWO, np.float64)
        after = np.inf if np.isinf(target) else 3.0 + target * res.model_value
        rhos.append(cg.report_loss_change(3.0, after))
        lambdas.append(opt.get_param("damping"))
    np.testing.assert_allclose(rhos[:-1], targets[:-1], rtol=1e-12)
    assert rhos[-1] == -np.inf
    np.testing.assert_allclose(lambdas, ref.lm_schedule(1.0, rhos), rtol=1e-12)


def test_warm_start_asks_for_the_decayed_previous_solution(rng):
    n = _size(TWO)
    G = ref.spd(1 + np.arange(n) % 9, 51)
    g = rng.standard_normal(n)
    cg = NewtonCG(_optimizer(np.float64, TWO, damping=0.1), tolerance=1e-3)
    first, _ = _solve(cg, G, g, TWO, np.float64)
    gw, gb = _unflat(g, TWO, np.float64)
    assert cg.begin(gw, gb, warm_start=True, warm_start_decay=0.5, tolerance=1e-8)
    v = _flat(*cg.vector())
    np.testing.assert_array_equal(v, 0.5 * first)
    while cg.supply(*_unflat(G @ _flat(*cg.vector()), TWO, np.float64)):
        pass
    sw, sb, res = cg.finish()
    assert res.products == res.iterations + 1
    exact = np.linalg.solve(G + 0.1 * np.eye(n), -g)
    assert np.max(np.abs(_flat(sw, sb) - exact)) < 1e-6 * np.max(np.abs(exact))


def test_armijo_backtracking_halves_until_sufficient_decrease():
    losses = {1.0: 5.0, 0.5: 2.0, 0.25: 0.5}
    alpha, loss = armijo_backtracking(lambda a: losses[a], 1.0, -2.0)
    assert (alpha, loss) == (0.25, 0.5)
    assert armijo_backtracking(lambda a: 0.9, 1.0, -2.0) == (1.0, 0.9)


def _expect(status, call):
    with pytest.raises(kfac.KFACError) as error:
        call()
    assert error.value.status == status
    assert error.value.message


def test_misuse_leaves_the_solve_unchanged(rng, dtype):
    """Every misuse fails with its status, and the solve goes on exactly as on a twin that never
    saw the bad calls."""
    n = _size(TWO)
    G = ref.spd(1 + np.arange(n) % 6, 61)
    g = rng.standard_normal(n)
    bad, twin = (NewtonCG(_optimizer(dtype, TWO, damping=0.1), tolerance=1e-8) for _ in range(2))
    zw, zb = _unflat(np.zeros(n), TWO, dtype)
    _expect(kfac.KFAC_ERROR_NO_SOLVE, bad.vector)
    _expect(kfac.KFAC_ERROR_NO_SOLVE, lambda: bad.supply(zw, zb))
    _expect(kfac.KFAC_ERROR_NO_SOLVE, bad.finish)
    _expect(kfac.KFAC_ERROR_NO_SOLVE, lambda: bad.report_loss_change(1, 0))
    nan = g.copy()
    nan[30] = np.nan
    _expect(kfac.KFAC_ERROR_NON_FINITE, lambda: bad.begin(*_unflat(nan, TWO, dtype)))
    _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, lambda: bad.begin(zw, zb, max_iterations=-1))
    _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, lambda: bad.begin(zw, zb, tolerance=2.0))
    _expect(kfac.KFAC_ERROR_NULL_POINTER, lambda: bad.begin(zw, zb, preconditioner="diagonal"))
    _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, lambda: bad.begin(zw, zb, diagonal_weights=zw, diagonal_biases=zb))
    _expect(kfac.KFAC_ERROR_NO_STATISTICS, lambda: bad.begin(zw, zb, preconditioner="kfac"))
    with pytest.raises(ValueError):
        bad.begin(zw, zb, preconditioner="exact")
    with pytest.raises(ValueError):
        bad.begin(zw[:1], zb[:1])
    gw, gb = _unflat(g, TWO, dtype)
    more_b, more_t = bad.begin(gw, gb), twin.begin(gw, gb)
    rounds = 0
    while more_t:
        assert more_b == more_t
        vb_, vt_ = _flat(*bad.vector()), _flat(*twin.vector())
        np.testing.assert_array_equal(vb_, vt_)
        pw, pb = _unflat(G @ vt_, TWO, dtype)
        if rounds == 1:
            inf_w = [w.copy() for w in pw]
            inf_w[1][0, 2] = np.inf
            _expect(kfac.KFAC_ERROR_NON_FINITE, lambda: bad.supply(inf_w, pb))
            with pytest.raises(ValueError):
                bad.supply(pw, [None, None])
            _expect(kfac.KFAC_ERROR_NO_SOLVE, lambda: bad.report_loss_change(1, 0))
            np.testing.assert_array_equal(_flat(*bad.vector()), vt_)
        more_b, more_t = bad.supply(pw, pb), twin.supply(pw, pb)
        rounds += 1
    assert not more_b
    _expect(kfac.KFAC_ERROR_NO_SOLVE, bad.vector)
    _expect(kfac.KFAC_ERROR_NO_SOLVE, lambda: bad.supply(zw, zb))
    sb_w, sb_b, rb = bad.finish()
    st_w, st_b, rt = twin.finish()
    np.testing.assert_array_equal(_flat(sb_w, sb_b), _flat(st_w, st_b))
    assert rb == rt and rb.iterations > 3


def test_exception_in_the_product_leaves_the_solve_open(rng):
    n = _size(TWO)
    G = ref.spd(1 + np.arange(n), 71)
    g = rng.standard_normal(n)
    cg = NewtonCG(_optimizer(np.float64, TWO), tolerance=1e-10)
    calls = []

    def product(vw, vb):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return _unflat(G @ _flat(vw, vb), TWO, np.float64)

    gw, gb = _unflat(g, TWO, np.float64)
    with pytest.raises(RuntimeError):
        cg.solve(gw, gb, product)
    _, _, res = cg.finish()
    assert (res.iterations, res.reason) == (2, "caller")


def test_c_product_function_wrapper_through_ctypes(rng):
    """kfac_cg_solve_f64 (the C convenience) with a ctypes callback equals the numpy loop; a
    non-zero return gives KFAC_ERROR_CALLBACK. (Python front-ends do not use it.)"""
    n = _size(ONE)
    G = ref.spd(1 + np.arange(n) % 4, 81)
    g = rng.standard_normal(n)
    opt = _optimizer(np.float64, ONE)
    x_loop, res_loop = _solve(NewtonCG(opt, tolerance=1e-9), G, g, ONE, np.float64)
    state = {"calls": 0, "fail": 0}

    @_lib.kfac_cg_product_fn_f64
    def product(user, vw, vb, pw, pb, count):
        state["calls"] += 1
        if state["calls"] == state["fail"]:
            return 5
        v = np.concatenate([np.ctypeslib.as_array(vw[0], (192,)), np.ctypeslib.as_array(vb[0], (8,))])
        p = G @ v
        np.ctypeslib.as_array(pw[0], (192,))[:] = p[:192]
        np.ctypeslib.as_array(pb[0], (8,))[:] = p[192:]
        return 0

    gw, gb = _unflat(g, ONE, np.float64)
    sw, sb = np.zeros((8, 24)), np.zeros(8)
    P = _lib.c_double_p
    arr = lambda *a: (P * 1)(*[x.ctypes.data_as(P) for x in a])  # noqa: E731
    desc = _lib.kfac_cg_desc.new(tolerance=1e-9)
    result = _lib.kfac_cg_result.new()
    status = _lib.kfac_cg_solve_f64(opt._handle.pointer, ctypes.byref(desc), arr(gw[0]), arr(gb[0]), None, None,
                                    product, None, arr(sw), arr(sb), 1, ctypes.byref(result))
    assert status == 0
    np.testing.assert_array_equal(np.concatenate([sw.ravel(), sb]), x_loop)
    assert CGResult._from_c(result) == res_loop
    state.update(calls=0, fail=2)
    status = _lib.kfac_cg_solve_f64(opt._handle.pointer, ctypes.byref(desc), arr(gw[0]), arr(gb[0]), None, None,
                                    product, None, arr(sw), arr(sb), 1, ctypes.byref(result))
    assert status == kfac.KFAC_ERROR_CALLBACK
