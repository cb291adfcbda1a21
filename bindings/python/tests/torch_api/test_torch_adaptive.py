"""PyTorch's sampled_fisher_backward and adaptive_step, against the numpy API and the
independent reference of references/adaptive.py."""

import copy
import ctypes
import math
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import libkfac as kfac
from libkfac import _lib
from libkfac.torch import AdaptiveStepResult, KFACPreconditioner
from references.adaptive import LinearModel, make_problem, reference_solve, sigmoid, softmax
from testutil import TOLERANCE, kfac_step


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
        result = pre.adaptive_step(x, lambda out: F.cross_entropy(out, y), every_step_loss=True)
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
        result = pre.adaptive_step(x, lambda out: F.cross_entropy(out, y), every_step_loss=True)
        assert result.loss_before == pytest.approx(loss.item(), rel=1e-12)
        assert result.predicted_change < 0 and np.isfinite(result.rho)
        assert all(not layer.saved_inputs for layer in pre._layers), "no statistics from its passes"
        losses.append(result.loss_after)
        dampings.append(result.damping)
    assert losses[-1] < 0.3 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert len(set(dampings)) > 1, "Levenberg–Marquardt moved λ"
    assert pre.steps == 12


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
        pre.adaptive_step(x, loss_fn, every_step_loss=True)
    assert info.value.status == kfac.KFAC_ERROR_NON_FINITE
    for p, q in zip(model.parameters(), before):
        assert torch.allclose(p, q, rtol=0, atol=1e-15)


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


@pytest.mark.parametrize("lm_interval", [0, 3])
def test_adaptive_step_evaluates_the_loss_only_for_the_reports_that_adjust_lambda(lm_interval):
    """By default the loss after the update is evaluated only when the report adjusts λ (every
    lm_interval-th): parameters, λ, α and μ are those of a twin that evaluates and reports every
    step, and the evaluated steps' losses and ρ are the twin's."""
    x, y = _batch(seed=5, n=64)
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    runs = {}
    for every in (False, True):
        model = _torch_mlp(seed=2)
        pre = KFACPreconditioner(model, damping=1e-2, kl_clip=0, inverse_update_period=2,
                                 lm_interval=lm_interval, lm_decay=0.8)
        evaluations = []
        counted = lambda out: (evaluations.append(1), loss_fn(out))[1]  # noqa: E731
        results = []
        for _ in range(10):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            results.append(pre.adaptive_step(x, counted, every_step_loss=every))
        runs[every] = (results, [p.detach().clone() for p in model.parameters()], len(evaluations))
    (skipping, params_skipping, calls_skipping), (every_step, params_every, calls_every) = runs[False], runs[True]
    evaluated = [r.loss_evaluated for r in skipping]
    assert evaluated == [lm_interval > 0 and (k + 1) % lm_interval == 0 for k in range(10)]
    assert all(r.loss_evaluated for r in every_step)
    # loss_fn is called once for the loss before, and once more per evaluated step.
    assert (calls_skipping, calls_every) == (10 + sum(evaluated), 20)
    for a, b in zip(skipping, every_step):
        assert (a.alpha, a.mu, a.predicted_change, a.loss_before, a.damping) == \
            (b.alpha, b.mu, b.predicted_change, b.loss_before, b.damping)
        if a.loss_evaluated:
            assert (a.loss_after, a.rho) == (b.loss_after, b.rho)
        else:
            assert math.isnan(a.loss_after) and math.isnan(a.rho)
    for p, q in zip(params_skipping, params_every):
        assert torch.equal(p, q)
    if lm_interval:
        assert len({r.damping for r in skipping}) > 1, "Levenberg–Marquardt moved λ on the evaluated steps"
