"""PyTorch's adaptive_step with the periodic re-choice of the factor damping γ, against the
same training driven by hand through the numpy API (a hand-written forward pass, backward pass
and forward-mode (J·v) pass of a two-layer MLP)."""

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import libkfac as kfac
from libkfac.torch import KFACPreconditioner

SENTINEL = 7.0


def _buffers(dtype, layers):
    weights = [np.full((fan_out, fan_in), SENTINEL, dtype=dtype) for fan_in, fan_out, _ in layers]
    biases = [np.full(fan_out, SENTINEL, dtype=dtype) if bias else None for _, fan_out, bias in layers]
    return weights, biases

# ---------------------------------------------------------------------------------------------
# PyTorch: adaptive_step with the re-choice of γ
# ---------------------------------------------------------------------------------------------


def _mlp(seed=1, sizes=(5, 7, 4)):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(sizes[0], sizes[1]), nn.Tanh(), nn.Linear(sizes[1], sizes[2])).double()


def _data(seed=0, n=64, inf=5, classes=4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, inf, generator=generator, dtype=torch.float64)
    y = (x @ torch.randn(inf, classes, generator=generator, dtype=torch.float64)).argmax(1)
    return x, y


class _HandMLP:
    """z = W2 tanh(W1 x + b1) + b2 with the mean cross-entropy, by hand in numpy: forward,
    backward (mean-loss gradients and output gradients) and the forward-mode product J·v."""

    def __init__(self, model, x, y):
        self.params = [p.detach().numpy().copy() for p in model.parameters()]  # W1, b1, W2, b2
        self.x = x.numpy()
        self.y = y.numpy()

    def forward(self, params=None):
        W1, b1, W2, b2 = self.params if params is None else params
        s1 = self.x @ W1.T + b1
        h = np.tanh(s1)
        return h, h @ W2.T + b2

    def loss(self, params=None):
        z = self.forward(params)[1]
        z = z - z.max(axis=1, keepdims=True)
        log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
        return float(-log_p[np.arange(len(self.y)), self.y].mean())

    def backward(self):
        W1, b1, W2, b2 = self.params
        h, z = self.forward()
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        dz = p.copy()
        dz[np.arange(len(self.y)), self.y] -= 1.0
        dz /= len(self.y)
        ds1 = (dz @ W2) * (1.0 - h**2)
        grads = [ds1.T @ self.x, ds1.sum(0), dz.T @ h, dz.sum(0)]
        return h, z, ds1, dz, grads

    def jvp(self, tangent):
        W1, b1, W2, b2 = self.params
        V1, c1, V2, c2 = tangent
        h, _ = self.forward()
        dh = (1.0 - h**2) * (self.x @ V1.T + c1)
        return h @ V2.T + c2 + dh @ W2.T


@pytest.mark.parametrize("strategy", ["eigen", "cholesky"])
def test_adaptive_step_with_gamma_steps_equals_the_numpy_api_driven_by_hand(strategy):
    x, y = _data()
    model = _mlp()
    hand = _HandMLP(model, x, y)
    settings = dict(damping=1e-2, kl_clip=0, inverse_update_period=2, inverse_strategy=strategy,
                    factor_damping=1.0, factor_damping_period=2, factor_damping_decay=0.5,
                    factor_damping_ratio=1e300)  # γ = 100 λ and beyond: no band (not tested here)
    pre = KFACPreconditioner(model, **settings)
    assert (pre.factor_damping, pre.factor_damping_period, pre.factor_damping_decay) == (1.0, 2, 0.5)
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    shapes = [(5, 7, True), (7, 4, True)]
    with kfac.Optimizer(np.float64, loss_reduction="mean", **settings) as opt:
        for fan_in, fan_out, bias in shapes:
            opt.add_dense(fan_in, fan_out, bias=bias)
        previous = None
        gammas, losses, chosen = [], [], []
        for step in range(10):
            # PyTorch.
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            result = pre.adaptive_step(x, loss_fn, every_step_loss=True)
            # By hand.
            h, z, ds1, dz, grads = hand.backward()
            for layer, (inputs, output_grads) in enumerate(((hand.x, ds1), (h, dz))):
                opt.record_inputs(layer, inputs)
                opt.record_output_grads(layer, output_grads)
            loss_before = hand.loss()
            opt.step([grads[0], grads[2]], [grads[1], grads[3]])
            count = opt.candidate_count()
            products = []
            for c in range(count):
                w_out, b_out = _buffers(np.float64, shapes)
                opt.candidate_directions(c, w_out, b_out)
                products.append(hand.jvp([w_out[0], b_out[0], w_out[1], b_out[1]]))
            jp = None if previous is None else hand.jvp(previous)
            c, alpha, mu, m = opt.solve_step_size_candidates(z, products, jp, "categorical")
            w_up, b_up = _buffers(np.float64, shapes)
            opt.get_update(w_up, b_up)
            previous = [w_up[0], b_up[0], w_up[1], b_up[1]]
            hand.params = [p + d for p, d in zip(hand.params, previous)]
            loss_after = hand.loss()
            rho = opt.report_loss_change(loss_before, loss_after)
            # The same step.
            assert (result.candidates, result.chosen) == (count, c), step
            assert result.candidates == (3 if step % 2 == 0 else 1)
            assert result.alpha == pytest.approx(alpha, rel=1e-9)
            assert result.mu == pytest.approx(mu, rel=1e-9, abs=1e-14)
            assert result.predicted_change == pytest.approx(m, rel=1e-9)
            assert result.loss_before == pytest.approx(loss_before, rel=1e-12)
            assert result.loss_after == pytest.approx(loss_after, rel=1e-10)
            assert result.rho == pytest.approx(rho, rel=1e-7)
            assert result.factor_damping == pytest.approx(opt.factor_damping, rel=1e-12)
            assert result.factor_damping == pre.factor_damping
            assert result.damping == opt.damping
            for p, q in zip(model.parameters(), hand.params):
                np.testing.assert_allclose(p.detach().numpy(), q, rtol=1e-9, atol=1e-12)
            # adaptive_step applied exactly the library's update, and keeps it as δ₀.
            w_lib, b_lib = _buffers(np.float64, shapes)
            pre.optimizer.get_update(w_lib, b_lib)
            for kept, lib in zip(pre._previous_update, [w_lib[0], b_lib[0], w_lib[1], b_lib[1]]):
                assert np.array_equal(kept.numpy(), lib)
            gammas.append(result.factor_damping)
            losses.append(result.loss_after)
            chosen.append(result.chosen)
    assert len(set(gammas)) > 1, gammas
    assert gammas[-1] < 1.0 and any(chosen), (gammas, chosen)
    assert losses[-1] < 0.5 * losses[0], losses


def test_adaptive_step_applies_the_library_update_to_float32_parameters():
    """A float32 model with a float64 library: the directions are converted for the JVPs, the
    library's float64 update is rounded once onto the parameters, and δ₀ is that rounded update."""
    x, y = _data(n=48)
    model = _mlp().float()
    x32 = x.float()
    pre = KFACPreconditioner(model, dtype=torch.float64, damping=1e-2, kl_clip=0, inverse_update_period=1,
                             factor_damping=0.5, factor_damping_period=3, factor_damping_ratio=1e300)
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    shapes = [(5, 7, True), (7, 4, True)]
    for step in range(5):
        model.zero_grad()
        F.cross_entropy(model(x32), y).backward()
        pre.step()
        before = [p.detach().clone() for p in model.parameters()]
        result = pre.adaptive_step(x32, loss_fn, every_step_loss=True)
        assert result.candidates == (3 if step % 3 == 0 else 1)
        w_lib, b_lib = _buffers(np.float64, shapes)
        pre.optimizer.get_update(w_lib, b_lib)
        update = [w_lib[0], b_lib[0], w_lib[1], b_lib[1]]
        for p, p0, delta, kept in zip(model.parameters(), before, update, pre._previous_update):
            rounded = torch.from_numpy(delta).float()
            assert kept.dtype == torch.float32 and torch.equal(kept, rounded)
            assert torch.equal(p.detach(), p0 + rounded)
        assert math.isfinite(result.rho) and result.predicted_change < 0


def test_adaptive_step_reuses_its_buffers_and_survives_a_state_round_trip():
    x, y = _data(n=32)
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    settings = dict(kl_clip=0, damping=1e-2, factor_damping=0.3, factor_damping_period=2,
                    factor_damping_decay=0.6, lm_interval=1, factor_damping_ratio=1e300)  # γ = 30 λ: no band

    def run(model, pre, steps):
        results = []
        for _ in range(steps):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            results.append(pre.adaptive_step(x, loss_fn))
        return results

    model = _mlp()
    pre = KFACPreconditioner(model, **settings)
    run(model, pre, 1)
    buffers = pre._adaptive_buffers
    addresses = [t.data_ptr() for t in buffers.directions + buffers.update]
    run(model, pre, 2)
    assert pre._adaptive_buffers is buffers
    assert [t.data_ptr() for t in buffers.directions + buffers.update] == addresses
    state = pre.state_dict()
    clone = copy.deepcopy(model)
    resumed = KFACPreconditioner(clone, kl_clip=0, damping=1e-2, lm_interval=1)
    resumed.load_state_dict(state)
    assert (resumed.factor_damping_period, resumed.factor_damping_decay) == (2, 0.6)
    assert resumed.factor_damping == pre.factor_damping
    a = run(model, pre, 3)
    b = run(clone, resumed, 3)
    assert a == b
    assert [r.candidates for r in a] == [1, 3, 1]


# ---------------------------------------------------------------------------------------------
# Batched forward-mode products: one vmapped jvp against one jvp per tangent
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("strategy", ["eigen", "cholesky"])
def test_batched_products_equal_one_jvp_per_tangent(strategy, dtype):
    """Eight adaptive steps with γ steps every 2 (three candidates and δ₀: four tangents in one
    vmapped jvp) on twin models, one with ``batched_products=False``: the same choices and, to
    rounding, the same α, μ, M(δ), ρ, γ and parameters."""
    x, y = _data()
    x = x.to(dtype)
    twins = [_mlp().to(dtype), _mlp().to(dtype)]
    settings = dict(damping=1e-2, kl_clip=0, inverse_update_period=2, inverse_strategy=strategy, lm_interval=1,
                    factor_damping=1e-2, factor_damping_period=2, factor_damping_decay=0.5,
                    factor_damping_ratio=1e300)  # four tangents at every γ step
    pres = [KFACPreconditioner(m, **settings) for m in twins]
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    for k in range(8):
        results = []
        for model, pre, batched in zip(twins, pres, (True, False)):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            results.append(pre.adaptive_step(x, lambda out: F.cross_entropy(out, y), batched_products=batched))
        a, b = results
        assert (a.chosen, a.candidates) == (b.chosen, b.candidates), k
        assert a.candidates == (3 if k % 2 == 0 else 1), k
        for field in ("alpha", "mu", "predicted_change", "loss_before", "loss_after", "rho", "damping", "factor_damping"):
            u, v = getattr(a, field), getattr(b, field)
            assert abs(u - v) <= tol * max(1.0, abs(v)), (k, field, u, v)
    for p, q in zip(twins[0].parameters(), twins[1].parameters()):
        assert torch.allclose(p, q, rtol=tol, atol=tol)
    for pre in pres:
        pre.close()
