"""The periodic re-choice of the factor damping γ (Martens & Grosse 2015, §6.6;
KFAC_PARAM_FACTOR_DAMPING_PERIOD): direction candidates, the candidate solve, the update, their
errors, and PyTorch's adaptive_step with it.

The oracles are written from kfac.h's text, independently of the library:
- candidate directions: dense solves with the explicit Kronecker matrix (kfac_reference) — the
  eigen strategy's (A ⊗ G + γ_k I)⁻¹ vec(V), the Cholesky strategy's
  (G + √γ_k/π I)⁻¹ V (A + π√γ_k I)⁻¹ — for γ_k = γ, γ·ω₂, γ/ω₂ with ω₂ = decay^T₂ (from λ when
  γ = 0), each KL-clipped with its own ν;
- the choice: M(δ_k) of every candidate from the explicit Fisher (1/N) Σ J_nᵀ B_n J_n of a
  linear softmax model (test_adaptive's reference), the lowest wins, and γ becomes its γ;
- the update: −α·D_chosen + μ·δ₀ with the oracle's own δ₀;
- PyTorch: the same training driven by hand through the numpy API, with a hand-written forward
  pass, backward pass and forward-mode (J·v) pass of a two-layer MLP.
"""

import copy
import ctypes
import math

import numpy as np
import pytest

import libkfac as kfac
from references import dense as ref
from libkfac import _lib
from references.adaptive import make_problem, reference_solve
from testutil import TOLERANCE, assert_close, kfac_step, random_batch

SENTINEL = 7.0


def _expect(status, function, *args, **kwargs):
    with pytest.raises(kfac.KFACError) as info:
        function(*args, **kwargs)
    error = info.value
    assert error.status == status, (error.status_name, error.message)
    assert error.status_name == kfac.status_name(status)
    assert isinstance(error.message, str) and error.message
    return error


def _candidate_gammas(gamma, damping, decay, period):
    """(γ, γ·ω₂, γ/ω₂), ω₂ = decay^T₂; the candidates start from λ when γ is 0."""
    base = gamma if gamma > 0 else damping
    omega = decay**period
    return [base, base * omega, base / omega]


# ---------------------------------------------------------------------------------------------
# Candidate directions against the explicit Kronecker solves
# ---------------------------------------------------------------------------------------------

LAYERS = [(3, 4, True), (4, 2, False)]  # (in, out, bias)


def _buffers(dtype, layers=LAYERS):
    weights = [np.full((fan_out, fan_in), SENTINEL, dtype=dtype) for fan_in, fan_out, _ in layers]
    biases = [np.full(fan_out, SENTINEL, dtype=dtype) if bias else None for _, fan_out, bias in layers]
    return weights, biases


def _thetas(weights, biases):
    return [ref.theta_grad(w, b) for w, b in zip(weights, biases)]


def _oracle_directions(factors, gradients, gamma, strategy, use_pi, kl_clip, learning_rate):
    """ν_k U_k per layer for the factor damping γ_k."""
    if strategy == "eigen":
        U = [ref.precondition_eigen(A, G, V, gamma) for (A, G), V in zip(factors, gradients)]
    else:
        U = [ref.precondition_cholesky(A, G, V, gamma, use_pi) for (A, G), V in zip(factors, gradients)]
    nu = ref.kl_scale(U, gradients, kl_clip, learning_rate)
    return [nu * u for u in U]


def _relative_difference(a, b):
    return max(float(np.max(np.abs(x - y))) / float(np.max(np.abs(y))) for x, y in zip(a, b))


@pytest.mark.parametrize("kl_clip", [0.0, 2e-2], ids=["noclip", "clip"])
@pytest.mark.parametrize("gamma", [0.3, 0.0], ids=["gamma", "lambda"])
@pytest.mark.parametrize("strategy, use_pi", [("eigen", True), ("cholesky", True), ("cholesky", False)],
                         ids=["eigen", "cholesky-pi", "cholesky-nopi"])
def test_candidate_directions_equal_the_damped_kronecker_solves(rng, dtype, strategy, use_pi, gamma, kl_clip):
    damping, decay, period, beta, lr = 0.05, 0.5, 2, 0.6, 0.5
    gammas = _candidate_gammas(gamma, damping, decay, period)
    # Float32 solves amplify the factors' rounding by up to 1/γ.
    scale = 1.0 if dtype == np.float64 else max(1.0, 0.1 / min(gammas))
    params = dict(damping=damping, factor_damping=gamma, factor_damping_period=period,
                  factor_damping_decay=decay, kl_clip=kl_clip, learning_rate=lr, factor_decay=beta,
                  inverse_update_period=1, inverse_strategy=strategy, pi_damping=use_pi,
                  factor_damping_ratio=1e300)  # γ = 30 λ: no band (tested in the library's tests)
    with kfac.Optimizer(dtype, **params) as opt:
        for fan_in, fan_out, bias in LAYERS:
            opt.add_dense(fan_in, fan_out, bias=bias)
        assert (opt.factor_damping_period, opt.factor_damping_decay) == (period, decay)
        running = [(None, None) for _ in LAYERS]
        for step in range(4):
            for index, (fan_in, fan_out, bias) in enumerate(LAYERS):
                x, g = random_batch(rng, 6, fan_in, fan_out, dtype)
                opt.record_inputs(index, x)
                opt.record_output_grads(index, g)
                A, G = ref.batch_factors(x, g, bias)
                running[index] = (ref.ema(running[index][0], A, beta), ref.ema(running[index][1], G, beta))
            weights = [rng.standard_normal((o, i)).astype(dtype) for i, o, _ in LAYERS]
            biases = [rng.standard_normal(o).astype(dtype) if b else None for _, o, b in LAYERS]
            V = _thetas(weights, biases)
            opt.step(weights, biases)
            count = opt.candidate_count()
            assert count == (3 if step % period == 0 else 1), step
            expected = []
            for k in range(count):
                w_out, b_out = _buffers(dtype)
                returned = opt.candidate_directions(k, w_out, b_out)
                assert returned == pytest.approx(gammas[k], rel=1e-12), (step, k)
                D = _oracle_directions(running, V, gammas[k], strategy, use_pi, kl_clip, lr)
                for layer, (got, want) in enumerate(zip(_thetas(w_out, b_out), D)):
                    assert_close(got, want, dtype, scale=scale)
                if k == 0:  # candidate 0 is exactly what the step wrote
                    for got, wrote in zip(w_out + b_out, weights + biases):
                        assert (got is None and wrote is None) or np.array_equal(got, wrote)
                expected.append(D)
            for D in expected[1:]:  # the oracle tells the candidates apart far beyond the tolerance
                assert _relative_difference(D, expected[0]) > 0.05
            if kl_clip and count == 3:
                norms = [sum(float(np.sum(d * d)) for d in D) for D in expected]
                assert len({round(n, 12) for n in norms}) == 3
            assert opt.factor_damping == gamma, "no solve: γ unchanged"
            assert opt.candidate_count() == count, "fetching candidates changes nothing"


# ---------------------------------------------------------------------------------------------
# The candidate solve, γ and the update against the explicit Fisher of a linear softmax model
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("gamma0", [1.0, 0.0], ids=["gamma", "lambda"])
@pytest.mark.parametrize("inverse_period", [1, 3])
@pytest.mark.parametrize("strategy", ["eigen", "cholesky"])
def test_candidate_solve_keeps_the_damping_with_the_lowest_model_value(rng, dtype, strategy, inverse_period,
                                                                        gamma0):
    """Seven steps, γ steps at k = 0, 2, 4, 6: every candidate's directions, the choice, α, μ,
    M(δ), the update and γ afterwards. The oracle tracks which factors and damping the current
    inverses were computed from: eigen decompositions come from the last inverse update and take
    the damping when preconditioning; Cholesky inverses bake it in, and a γ step inverts the
    current factors for each γ ("every factor is also inverted for each γ on that step" — also
    for candidate 0's γ when the step is not an inverse-update step), and the chosen candidate's
    inverses become the current ones."""
    model, theta = make_problem(rng, "categorical", n=12)
    damping, decay, period, beta = 1e-2, 0.5, 2, 0.5
    omega = decay**period
    tol = TOLERANCE[dtype]
    opt = kfac.Optimizer(dtype, damping=damping, kl_clip=0, factor_decay=beta, inverse_strategy=strategy,
                         inverse_update_period=inverse_period, factor_damping=gamma0,
                         factor_damping_period=period, factor_damping_decay=decay,
                         factor_damping_ratio=1e300)  # γ up to 1600 λ: no band (not tested here)
    with opt:
        opt.add_dense(model.inf, model.out)
        A = G = None
        gamma = gamma0  # the oracle's KFAC_PARAM_FACTOR_DAMPING
        current = None  # (A, G, damping) the current inverses were computed from
        previous = None  # the oracle's δ₀
        chosen_history = []
        for k in range(7):
            base = gamma if gamma > 0 else damping
            x = model.x.astype(dtype)
            g = model.output_grads(theta).astype(dtype)
            A_batch, G_batch = ref.batch_factors(x, g, True)
            A, G = ref.ema(A, A_batch, beta), ref.ema(G, G_batch, beta)
            if k % inverse_period == 0:
                current = (A, G, base)
            D0 = kfac_step(opt, model, theta, dtype)
            V = model.gradient(theta).astype(dtype).astype(np.float64)  # what the step received
            count = opt.candidate_count()
            assert count == (3 if k % period == 0 else 1), k
            gammas = [base, base * omega, base / omega][:count]
            wants = []
            for c in range(count):
                if strategy == "eigen":
                    wants.append(ref.precondition_eigen(current[0], current[1], V, gammas[c]))
                elif count == 1:
                    wants.append(ref.precondition_cholesky(*current[:2], V, current[2]))
                else:
                    wants.append(ref.precondition_cholesky(A, G, V, gammas[c]))
            directions = []
            for c in range(count):
                w_out, b_out = _buffers(dtype, [(model.inf, model.out, True)])
                assert opt.candidate_directions(c, w_out, b_out) == pytest.approx(gammas[c], rel=1e-12)
                D = ref.theta_grad(w_out[0], b_out[0])
                scale = 1.0 if dtype == np.float64 else max(1.0, 0.1 / gammas[c])
                assert_close(D, wants[c], dtype, scale=scale)
                # ... and far closer to its own oracle than to any other candidate's.
                error = _relative_difference([D], [wants[c]])
                for j in range(count):
                    if j != c:
                        assert error < 0.1 * _relative_difference([wants[j]], [wants[c]]), (k, c, j)
                if c == 0:
                    assert np.array_equal(D, D0)
                directions.append(D)
            # The caller's products are J·D_k of the directions it received.
            expected = [reference_solve(model, theta, D, previous, damping) for D in directions]
            outputs = model.logits(theta).astype(dtype)
            products = [model.products(D).astype(dtype) for D in directions]
            jp = None if previous is None else model.products(previous).astype(dtype)
            chosen, alpha, mu, m = opt.solve_step_size_candidates(outputs, products, jp, "categorical")
            values = [e[2] for e in expected]
            best = min(values)
            assert 0 <= chosen < count
            assert values[chosen] <= best + tol * abs(best), (k, chosen, values)
            alpha_ref, mu_ref, m_ref = expected[chosen]
            assert alpha == pytest.approx(alpha_ref, rel=tol), (k, alpha, alpha_ref)
            assert mu == pytest.approx(mu_ref, rel=tol, abs=tol * 1e-2), (k, mu, mu_ref)
            assert m == pytest.approx(m_ref, rel=tol), (k, m, m_ref)
            assert (mu == 0.0) == (previous is None)
            # The update: −α·D_chosen + μ·δ₀ with the oracle's δ₀.
            update = -alpha * directions[chosen] + (0.0 if previous is None else mu * previous)
            w_up, b_up = _buffers(dtype, [(model.inf, model.out, True)])
            opt.get_update(w_up, b_up)
            assert_close(ref.theta_grad(w_up[0], b_up[0]), update, dtype)
            # γ: the chosen candidate's on a γ step (its Cholesky inverses become current).
            if count > 1:
                gamma = gammas[chosen]
                if strategy == "cholesky":
                    current = (A, G, gamma)
            assert opt.factor_damping == pytest.approx(gamma, rel=1e-12), (k, chosen)
            assert opt.candidate_count() == 0
            chosen_history.append(chosen)
            before = model.loss(theta)
            theta = theta + update
            rho = opt.report_loss_change(before, model.loss(theta))
            assert rho > 0, (k, rho)
            previous = update
        if gamma0 == 1.0:
            # γ = 1 is far too large for these factors: a smaller candidate must win at least once.
            assert any(chosen_history), chosen_history
            assert opt.factor_damping < 1.0


def test_with_gamma_zero_the_chosen_first_candidate_makes_lambda_the_factor_damping():
    """γ = 0 (λ damps the factors): the candidates are λ, λ·ω₂, λ/ω₂, and when the first wins,
    its γ — λ — becomes KFAC_PARAM_FACTOR_DAMPING (kfac.h: "the chosen candidate's γ becomes
    KFAC_PARAM_FACTOR_DAMPING"). A problem where the explicit model prefers candidate 0 at the
    first γ step (k = 4), found by the oracle."""
    rng = np.random.default_rng(10)
    model, theta = make_problem(rng, "categorical", n=12)
    damping = 0.01
    with kfac.Optimizer(np.float64, damping=damping, kl_clip=0, inverse_update_period=1,
                        factor_damping_decay=0.7) as opt:
        opt.add_dense(model.inf, model.out)
        previous = None
        for k in range(5):
            if k == 4:
                opt.factor_damping_period = 4
            kfac_step(opt, model, theta, np.float64)
            directions = _fetch_all(opt, model)
            expected = [reference_solve(model, theta, D, previous, damping) for D in directions]
            jp = None if previous is None else model.products(previous)
            chosen, alpha, mu, m = opt.solve_step_size_candidates(
                model.logits(theta), [model.products(D) for D in directions], jp)
            values = [e[2] for e in expected]
            assert chosen == int(np.argmin(values)) and m == pytest.approx(min(values), rel=1e-9)
            w_up, b_up = _buffers(np.float64, [(model.inf, model.out, True)])
            opt.get_update(w_up, b_up)
            previous = ref.theta_grad(w_up[0], b_up[0])
            theta = theta + previous
            opt.report_loss_change(1.0, 0.9)
            if k < 4:
                assert len(directions) == 1 and opt.factor_damping == 0.0
        assert len(directions) == 3
        assert values[0] < min(values[1:]), "the scenario: candidate 0 (γ = λ) wins"
        assert chosen == 0
        assert opt.factor_damping == damping


@pytest.mark.parametrize("strategy", ["eigen", "cholesky"])
def test_candidates_with_extreme_dampings_are_dropped_or_finite(rng, strategy):
    """ω₂ = 0.5^1000 ≈ 9e-302: γ·ω₂ is next to nothing for factors with a singular G (softmax
    gradients sum to 0), γ/ω₂ ≈ 5e300. Whatever the library keeps is finite, in the order
    γ, γ·ω₂, γ/ω₂ with candidate 0 = γ; a dropped candidate shifts the indices; the solve
    takes one product per kept candidate."""
    model, theta = make_problem(rng, "categorical", n=12)
    gamma = 0.5
    with kfac.Optimizer(np.float64, damping=0.01, kl_clip=0, inverse_update_period=1, inverse_strategy=strategy,
                        factor_damping=gamma, factor_damping_period=1000, factor_damping_decay=0.5,
                        factor_damping_ratio=1e300) as opt:  # extreme γ: no band
        opt.add_dense(model.inf, model.out)
        V = model.gradient(theta)
        kfac_step(opt, model, theta, np.float64)
        A, G = ref.batch_factors(model.x, model.output_grads(theta), True)
        assert np.linalg.matrix_rank(G) < G.shape[0]
        count = opt.candidate_count()
        assert 1 <= count <= 3
        all_gammas = _candidate_gammas(gamma, 0.01, 0.5, 1000)
        directions, gammas = [], []
        for c in range(count):
            w, b = _buffers(np.float64, [(model.inf, model.out, True)])
            gammas.append(opt.candidate_directions(c, w, b))
            directions.append(ref.theta_grad(w[0], b[0]))
            assert np.all(np.isfinite(directions[-1]))
        assert gammas[0] == gamma
        positions = [min(range(3), key=lambda i: abs(all_gammas[i] / g - 1)) for g in gammas]
        assert positions == sorted(set(positions)), (gammas, all_gammas)
        for g, i in zip(gammas, positions):
            assert g == pytest.approx(all_gammas[i], rel=1e-12)
        # The huge damping's directions are the damped solve's, ≈ V/γ.
        if 2 in positions:
            D = directions[positions.index(2)]
            if strategy == "eigen":
                want = ref.precondition_eigen(A, G, V, all_gammas[2])
            else:
                want = ref.precondition_cholesky(A, G, V, all_gammas[2])
            np.testing.assert_allclose(D, want, rtol=1e-9, atol=0)
        w, b = _buffers(np.float64, [(model.inf, model.out, True)])
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, opt.candidate_directions, count, w, b)
        products = [model.products(D) for D in directions]
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, opt.solve_step_size_candidates, model.logits(theta),
                products + products[:1])
        chosen, alpha, mu, m = opt.solve_step_size_candidates(model.logits(theta), products)
        # M(δ) does not depend on the scale of D (α absorbs it): the oracle normalises.
        expected = [reference_solve(model, theta, D / np.abs(D).max(), None, 0.01) for D in directions]
        assert chosen == int(np.argmin([e[2] for e in expected]))
        assert m == pytest.approx(expected[chosen][2], rel=1e-9)
        assert opt.factor_damping == gammas[chosen]


def test_one_candidate_solve_is_the_plain_solve(rng):
    """With one candidate (no γ step), the candidate solve is kfac_solve_step_size_*, and the
    update is −α·D + μ·δ₀ of the plain solve."""
    model, theta = make_problem(rng, "categorical")
    handles = [kfac.Optimizer(np.float64, damping=0.05, kl_clip=0, inverse_update_period=1) for _ in range(2)]
    a, b = handles
    with a, b:
        previous = None
        for opt in handles:
            opt.add_dense(model.inf, model.out)
        for k in range(3):
            Ds = [kfac_step(opt, model, theta, np.float64) for opt in handles]
            assert a.candidate_count() == b.candidate_count() == 1
            z = model.logits(theta)
            jd = model.products(Ds[0])
            jp = None if previous is None else model.products(previous)
            plain = a.solve_step_size(z, jd, jp)
            chosen, *candidates = b.solve_step_size_candidates(z, [jd], jp)
            assert chosen == 0 and tuple(candidates) == plain
            w_up, b_up = _buffers(np.float64, [(model.inf, model.out, True)])
            b.get_update(w_up, b_up)
            update = ref.theta_grad(w_up[0], b_up[0])
            expected = -plain[0] * Ds[0] + (0 if previous is None else plain[1] * previous)
            np.testing.assert_allclose(update, expected, rtol=1e-12, atol=1e-15)
            assert a.state_bytes() == b.state_bytes()
            before = model.loss(theta)
            theta = theta + update
            for opt in handles:
                opt.report_loss_change(before, model.loss(theta))
            previous = update


def test_learning_rate_zero_means_no_kl_clip(rng):
    """KFAC_PARAM_LEARNING_RATE accepts 0 (>= 0), and then ν = 1 whatever κ is."""
    results = []
    for kl_clip, lr in ((0.0, 0.1), (1e-6, 0.0)):
        with kfac.Optimizer(np.float64, kl_clip=kl_clip, learning_rate=lr, inverse_update_period=1) as opt:
            assert opt.learning_rate == lr
            opt.add_dense(3, 2)
            generator = np.random.default_rng(5)
            x, g = random_batch(generator, 6, 3, 2, np.float64)
            opt.record_inputs(0, x)
            opt.record_output_grads(0, g)
            w, b = generator.standard_normal((2, 3)), generator.standard_normal(2)
            opt.step([w], [b])
            assert opt.last_kl_scale == 1.0
            results.append((w, b))
    assert np.array_equal(results[0][0], results[1][0]) and np.array_equal(results[0][1], results[1][1])


@pytest.mark.parametrize("name, value", [("factor_damping_decay", 0.0), ("factor_damping_decay", 1.0),
                                         ("factor_damping_decay", -0.5), ("factor_damping_decay", math.nan),
                                         ("factor_damping_decay", math.inf), ("factor_damping_period", -1),
                                         ("factor_damping_period", 2**31), ("learning_rate", -1e-3),
                                         ("learning_rate", math.inf)])
def test_new_parameter_ranges(name, value):
    with kfac.Optimizer(np.float64) as opt:
        before = opt.get_param(name)
        _expect(kfac.KFAC_ERROR_PARAMETER_RANGE, opt.set_param, name, value)
        assert opt.get_param(name) == before
        opt.factor_damping_decay = 1e-6
        opt.factor_damping_period = 2**31 - 1
        opt.learning_rate = 0
        assert (opt.factor_damping_decay, opt.factor_damping_period, opt.learning_rate) == (1e-6, 2**31 - 1, 0.0)
        value_type = ctypes.c_int64()
        assert _lib.kfac_param_get_int(opt.handle.pointer, kfac.KFAC_PARAM_FACTOR_DAMPING_DECAY,
                                       ctypes.byref(value_type)) == kfac.KFAC_ERROR_PARAMETER_TYPE
        assert _lib.kfac_param_set_double(opt.handle.pointer, kfac.KFAC_PARAM_FACTOR_DAMPING_PERIOD,
                                          2.0) == kfac.KFAC_ERROR_PARAMETER_TYPE


# ---------------------------------------------------------------------------------------------
# Errors: call order, arguments, dtypes; failed calls change nothing
# ---------------------------------------------------------------------------------------------


def _gamma_twins(model, **params):
    handles = []
    settings = dict(damping=0.05, kl_clip=0, inverse_update_period=1, factor_damping=0.1,
                    factor_damping_period=2, factor_damping_decay=0.8)
    settings.update(params)
    for _ in range(2):
        opt = kfac.Optimizer(np.float64, **settings)
        opt.add_dense(model.inf, model.out)
        handles.append(opt)
    return handles


def _fetch_all(opt, model):
    directions = []
    for c in range(opt.candidate_count()):
        w, b = _buffers(np.float64, [(model.inf, model.out, True)])
        opt.candidate_directions(c, w, b)
        directions.append(ref.theta_grad(w[0], b[0]))
    return directions


def _untouched(weights, biases):
    return all(a is None or np.all(a == SENTINEL) for a in weights + biases)


def test_call_order_errors_are_no_step_and_change_nothing(rng):
    model, theta = make_problem(rng, "categorical")
    a, b = _gamma_twins(model)
    layer = [(model.inf, model.out, True)]
    with a, b:
        z = model.logits(theta)
        # Before any step.
        assert b.candidate_count() == 0
        w, bias = _buffers(np.float64, layer)
        _expect(kfac.KFAC_ERROR_NO_STEP, b.candidate_directions, 0, w, bias)
        _expect(kfac.KFAC_ERROR_NO_STEP, b.solve_step_size_candidates, z, [z])
        _expect(kfac.KFAC_ERROR_NO_STEP, b.get_update, w, bias)
        assert _untouched(w, bias)
        assert a.state_bytes() == b.state_bytes()
        for opt in (a, b):
            kfac_step(opt, model, theta, np.float64)
        assert a.candidate_count() == b.candidate_count() == 3
        # A step awaits its solve: no update yet.
        _expect(kfac.KFAC_ERROR_NO_STEP, b.get_update, w, bias)
        assert _untouched(w, bias)
        # A failed step keeps the candidates of the last successful one.
        bad_w = np.full((model.out, model.inf), np.nan)
        _expect(kfac.KFAC_ERROR_NON_FINITE, b.step, [bad_w], [np.zeros(model.out)])
        assert b.candidate_count() == 3
        directions = _fetch_all(a, model)
        assert all(np.array_equal(x, y) for x, y in zip(directions, _fetch_all(b, model)))
        assert a.state_bytes() == b.state_bytes()
        products = [model.products(D) for D in directions]
        results = [opt.solve_step_size_candidates(z, products) for opt in (a, b)]
        assert results[0] == results[1]
        # After the solve: no candidates, no second solve.
        assert b.candidate_count() == 0
        _expect(kfac.KFAC_ERROR_NO_STEP, b.candidate_directions, 0, w, bias)
        _expect(kfac.KFAC_ERROR_NO_STEP, b.solve_step_size_candidates, z, products)
        _expect(kfac.KFAC_ERROR_NO_STEP, b.solve_step_size, z, products[0])
        assert _untouched(w, bias)
        assert a.state_bytes() == b.state_bytes()
        updates = []
        for opt in (a, b):
            w_up, b_up = _buffers(np.float64, layer)
            opt.get_update(w_up, b_up)
            opt.get_update(w_up, b_up)  # changes nothing: may be read again
            updates.append(ref.theta_grad(w_up[0], b_up[0]))
        assert np.array_equal(updates[0], updates[1])
        assert a.state_bytes() == b.state_bytes()
        assert a.factor_damping == b.factor_damping
        assert a.factor_damping == pytest.approx(_candidate_gammas(0.1, 0.05, 0.8, 2)[results[0][0]], rel=1e-12)
        # The update is that of the last solve (the library's δ₀), also once the next step is made.
        kfac_step(b, model, theta + updates[0], np.float64)
        w_up, b_up = _buffers(np.float64, layer)
        b.get_update(w_up, b_up)
        assert np.array_equal(ref.theta_grad(w_up[0], b_up[0]), updates[0])


def test_argument_errors_raise_and_change_nothing(rng):
    model, theta = make_problem(rng, "categorical")
    a, b = _gamma_twins(model)
    layer = [(model.inf, model.out, True)]
    with a, b:
        for opt in (a, b):
            kfac_step(opt, model, theta, np.float64)
        directions = _fetch_all(a, model)
        z = model.logits(theta)
        products = [model.products(D) for D in directions]
        w, bias = _buffers(np.float64, layer)
        # Candidates out of range.
        for candidate in (3, -1, 2**31 - 1):
            _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, b.candidate_directions, candidate, w, bias)
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, b.candidate_directions, 2**40, w, bias)
        with pytest.raises(TypeError):
            b.candidate_directions(1.0, w, bias)
        with pytest.raises(TypeError):
            b.candidate_directions(True, w, bias)
        # Buffers: dtype, shape, count, bias rules, layout.
        w32, bias32 = _buffers(np.float32, layer)
        with pytest.raises(TypeError):
            b.candidate_directions(0, w32, bias32)
        with pytest.raises(TypeError):
            b.get_update(w32, bias32)
        with pytest.raises(ValueError):
            b.candidate_directions(0, [w[0].T.copy()], bias)
        with pytest.raises(ValueError):
            b.candidate_directions(0, [np.asfortranarray(w[0])], bias)
        with pytest.raises(ValueError):
            b.candidate_directions(0, w + w, bias + bias)
        with pytest.raises(ValueError):
            b.candidate_directions(0, w, None)  # the layer has a bias
        assert _untouched(w, bias)
        # The number of products must be the candidate count.
        for wrong in (products[:2], products + products[:1], []):
            _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, b.solve_step_size_candidates, z, wrong)
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, b.solve_step_size_candidates, z, products, distribution=7)
        nan_products = [p.copy() for p in products]
        nan_products[2][3, 1] = np.nan
        _expect(kfac.KFAC_ERROR_NON_FINITE, b.solve_step_size_candidates, z, nan_products)
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, b.solve_step_size_candidates, z[:0], [p[:0] for p in products])
        with pytest.raises(ValueError):
            b.solve_step_size_candidates(z, [products[0], products[1][:-1], products[2]])  # rows
        with pytest.raises(ValueError):
            b.solve_step_size_candidates(z, [p[:, :-1] for p in products])  # output_dim
        with pytest.raises(ValueError):
            b.solve_step_size_candidates(z, products[0])  # one 2-D array is not a list of candidates
        with kfac.Optimizer(np.float32) as narrow:
            with pytest.raises(TypeError):  # float64 data into a float32 handle: never narrowed
                narrow.solve_step_size_candidates(z, products)
        assert b.candidate_count() == 3
        assert a.state_bytes() == b.state_bytes()
        assert all(np.array_equal(x, y) for x, y in zip(directions, _fetch_all(b, model)))
        # The valid calls agree; a stacked [n, rows, dim] array is accepted too.
        results = [a.solve_step_size_candidates(z, products), b.solve_step_size_candidates(z, np.stack(products))]
        assert results[0] == results[1]
        assert a.state_bytes() == b.state_bytes()


def test_raw_calls_null_pointers_sizes_and_dtype_mismatch(rng):
    model, theta = make_problem(rng, "categorical")
    dp, fp = ctypes.POINTER(ctypes.c_double), ctypes.POINTER(ctypes.c_float)
    with kfac.Optimizer(np.float64, kl_clip=0, inverse_update_period=1, factor_damping_period=1) as opt, \
            kfac.Optimizer(np.float64, kl_clip=0, inverse_update_period=1) as nobias:
        opt.add_dense(model.inf, model.out)
        nobias.add_dense(model.inf, model.out, bias=False)
        h = opt.handle.pointer
        count = ctypes.c_int32(-5)
        assert _lib.kfac_candidates_get_count(None, ctypes.byref(count)) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_candidates_get_count(h, None) == kfac.KFAC_ERROR_NULL_POINTER
        assert _lib.kfac_candidates_get_count(h, ctypes.byref(count)) == kfac.KFAC_OK and count.value == 0
        kfac_step(opt, model, theta, np.float64)
        assert _lib.kfac_candidates_get_count(h, ctypes.byref(count)) == kfac.KFAC_OK and count.value == 3

        w = np.full((model.out, model.inf), SENTINEL)
        b = np.full(model.out, SENTINEL)
        wp = (dp * 1)(w.ctypes.data_as(dp))
        bp = (dp * 1)(b.ctypes.data_as(dp))
        w32 = np.full((model.out, model.inf), SENTINEL, dtype=np.float32)
        b32 = np.full(model.out, SENTINEL, dtype=np.float32)
        wp32 = (fp * 1)(w32.ctypes.data_as(fp))
        bp32 = (fp * 1)(b32.ctypes.data_as(fp))
        gamma = ctypes.c_double(SENTINEL)
        directions = _lib.kfac_candidates_get_directions_f64
        assert directions(None, 0, wp, bp, 1, ctypes.byref(gamma)) == kfac.KFAC_ERROR_NULL_POINTER
        assert directions(h, 0, None, bp, 1, ctypes.byref(gamma)) == kfac.KFAC_ERROR_NULL_POINTER
        assert directions(h, 0, wp, None, 1, ctypes.byref(gamma)) == kfac.KFAC_ERROR_NULL_POINTER
        assert directions(h, 0, (dp * 1)(), bp, 1, ctypes.byref(gamma)) == kfac.KFAC_ERROR_NULL_POINTER
        assert directions(h, 0, wp, bp, 2, ctypes.byref(gamma)) == kfac.KFAC_ERROR_INVALID_SIZE
        assert directions(h, 0, wp, bp, 0, ctypes.byref(gamma)) == kfac.KFAC_ERROR_INVALID_SIZE
        assert directions(h, 3, wp, bp, 1, ctypes.byref(gamma)) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        assert _lib.kfac_candidates_get_directions_f32(h, 0, wp32, bp32, 1, None) == kfac.KFAC_ERROR_DTYPE_MISMATCH
        assert np.all(w == SENTINEL) and np.all(b == SENTINEL) and gamma.value == SENTINEL
        assert np.all(w32 == SENTINEL) and np.all(b32 == SENTINEL)
        assert directions(h, 1, wp, bp, 1, None) == kfac.KFAC_OK, "factor_damping may be NULL"
        assert not np.any(w == SENTINEL)
        D = [ref.theta_grad(*_candidate_raw(opt, c, model)) for c in range(3)]

        # A bias buffer for a layer without bias.
        kfac_step_nobias(nobias, model, theta)
        hn = nobias.handle.pointer
        assert directions(hn, 0, wp, bp, 1, None) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        assert directions(hn, 0, wp, None, 1, None) == kfac.KFAC_OK

        z = np.ascontiguousarray(model.logits(theta))
        jd = [np.ascontiguousarray(model.products(d)) for d in D]
        products = (dp * 3)(*[p.ctypes.data_as(dp) for p in jd])
        with_null = (dp * 3)(products[0], None, products[2])
        chosen, alpha, mu, m = ctypes.c_int32(-7), ctypes.c_double(SENTINEL), ctypes.c_double(SENTINEL), \
            ctypes.c_double(SENTINEL)
        outs = (ctypes.byref(chosen), ctypes.byref(alpha), ctypes.byref(mu), ctypes.byref(m))
        solve = _lib.kfac_candidates_solve_step_size_f64
        rows, dim = z.shape
        zp = z.ctypes.data_as(dp)
        assert solve(None, zp, products, 3, None, rows, dim, 0, *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert solve(h, None, products, 3, None, rows, dim, 0, *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert solve(h, zp, None, 3, None, rows, dim, 0, *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert solve(h, zp, with_null, 3, None, rows, dim, 0, *outs) == kfac.KFAC_ERROR_NULL_POINTER
        assert solve(h, zp, products, 3, None, rows, dim, 0, outs[0], None, outs[2], outs[3]) == \
            kfac.KFAC_ERROR_NULL_POINTER
        assert solve(h, zp, products, 2, None, rows, dim, 0, *outs) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        assert solve(h, zp, products, -1, None, rows, dim, 0, *outs) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        assert solve(h, zp, products, 3, None, 0, dim, 0, *outs) == kfac.KFAC_ERROR_INVALID_SIZE
        assert solve(h, zp, products, 3, None, 2**40, 2**40, 0, *outs) == kfac.KFAC_ERROR_SIZE_OVERFLOW
        assert solve(h, zp, products, 3, None, rows, dim, 5, *outs) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        z32 = z.astype(np.float32)
        jd32 = [p.astype(np.float32) for p in jd]
        products32 = (fp * 3)(*[p.ctypes.data_as(fp) for p in jd32])
        assert _lib.kfac_candidates_solve_step_size_f32(h, z32.ctypes.data_as(fp), products32, 3, None, rows,
                                                        dim, 0, *outs) == kfac.KFAC_ERROR_DTYPE_MISMATCH
        assert (chosen.value, alpha.value, mu.value, m.value) == (-7, SENTINEL, SENTINEL, SENTINEL)
        assert _lib.kfac_candidates_get_count(h, ctypes.byref(count)) == kfac.KFAC_OK and count.value == 3
        assert solve(h, zp, products, 3, None, rows, dim, 0, *outs) == kfac.KFAC_OK
        assert 0 <= chosen.value < 3 and m.value < 0 and mu.value == 0

        update = _lib.kfac_adaptive_get_update_f64
        w[:] = SENTINEL
        b[:] = SENTINEL
        assert update(None, wp, bp, 1) == kfac.KFAC_ERROR_NULL_POINTER
        assert update(h, None, bp, 1) == kfac.KFAC_ERROR_NULL_POINTER
        assert update(h, wp, None, 1) == kfac.KFAC_ERROR_NULL_POINTER
        assert update(h, wp, bp, 2) == kfac.KFAC_ERROR_INVALID_SIZE
        assert _lib.kfac_adaptive_get_update_f32(h, wp32, bp32, 1) == kfac.KFAC_ERROR_DTYPE_MISMATCH
        assert np.all(w == SENTINEL) and np.all(b == SENTINEL)
        assert np.all(w32 == SENTINEL) and np.all(b32 == SENTINEL)
        assert update(h, wp, bp, 1) == kfac.KFAC_OK
        np.testing.assert_allclose(ref.theta_grad(w, b), -alpha.value * D[chosen.value], rtol=1e-12, atol=1e-15)


def _candidate_raw(opt, candidate, model):
    w, b = _buffers(np.float64, [(model.inf, model.out, True)])
    opt.candidate_directions(candidate, w, b)
    return w[0], b[0]


def kfac_step_nobias(opt, model, theta):
    opt.record_inputs(0, model.x)
    opt.record_output_grads(0, model.output_grads(theta))
    opt.step([np.ascontiguousarray(model.gradient(theta)[:, :-1])])


def test_state_keeps_the_parameters_and_not_the_candidates(rng):
    model, theta = make_problem(rng, "categorical")
    a, b = _gamma_twins(model, factor_damping_period=3, factor_damping_decay=0.7)
    with a, b:
        b.factor_damping_period = 0
        b.factor_damping_decay = 0.95
        kfac_step(a, model, theta, np.float64)
        assert a.candidate_count() == 3
        b.load_state(a.state_bytes())
        assert (b.factor_damping_period, b.factor_damping_decay, b.factor_damping) == (3, 0.7, 0.1)
        assert b.candidate_count() == 0, "candidates are not saved"
        w, bias = _buffers(np.float64, [(model.inf, model.out, True)])
        _expect(kfac.KFAC_ERROR_NO_STEP, b.candidate_directions, 0, w, bias)
        # The step counter is restored: k = 1, 2 are not γ steps, k = 3 is, on both.
        counts = []
        for _ in range(3):
            for opt in (a, b):
                D = kfac_step(opt, model, theta, np.float64)
            counts.append((a.candidate_count(), b.candidate_count()))
            assert all(np.array_equal(x, y) for x, y in zip(_fetch_all(a, model), _fetch_all(b, model)))
        assert counts == [(1, 1), (1, 1), (3, 3)]
