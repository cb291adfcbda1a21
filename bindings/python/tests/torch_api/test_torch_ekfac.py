"""KFACPreconditioner(inverse_strategy='ekfac'): the hooks record paired rows, and the library's
scaling S equals (1/D) Σ_n (Q_Gᵀ G_n Q_A)² with the per-example gradients G_n computed here by
torch.func (vmap of grad over examples, on a copy of the model made before the hooks), Q from
the library's own factors."""

import copy

import numpy as np
import pytest

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

from libkfac import _lib
from libkfac.torch import KFACPreconditioner

pytestmark = pytest.mark.skipif(
    bool({"kfac_layer_record_examples_f64"} & _lib.MISSING_EXPERIMENTAL),
    reason="the loaded library does not export the EKFAC functions",
)


def _per_example_gradients(model, loss_one, *data):
    """{parameter name: [N, ...] per-example gradients of the example's summed loss}."""
    params = {k: v.detach() for k, v in model.named_parameters()}
    return vmap(grad(lambda p, *d: loss_one(functional_call(model, p, tuple(d[:1])), *d[1:])),
                in_dims=(None,) + (0,) * len(data))(params, *data)


def _expected_scaling(preconditioner, layer, weight, bias, divisor, group=0, groups=1):
    """S from per-example [W | b] gradients of one layer (a conv group's rows when groups > 1)."""
    a, g = preconditioner.optimizer.factors(layer, group)
    qa, qg = np.linalg.eigh(a)[1], np.linalg.eigh(g)[1]
    n = weight.shape[0]
    w = weight.reshape(n, weight.shape[1], -1).numpy()
    rows = w.shape[1] // groups
    w = w[:, group * rows:(group + 1) * rows]
    theta = np.concatenate([w, bias.numpy()[:, group * rows:(group + 1) * rows, None]], axis=2) if bias is not None else w
    return sum((qg.T @ theta[e] @ qa) ** 2 for e in range(n)) / divisor


def _one_step(model, preconditioner, loss):
    model.zero_grad()
    loss.backward()
    preconditioner.step()


def test_linear_model_scaling_is_the_per_example_fisher_diagonal():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    oracle = copy.deepcopy(model)
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    per = _per_example_gradients(
        oracle, lambda out, t: nn.functional.cross_entropy(out.unsqueeze(0), t.unsqueeze(0), reduction="sum"),
        x, y)
    pre = KFACPreconditioner(model, inverse_strategy="ekfac", kl_clip=0, inverse_update_period=1)
    _one_step(model, pre, nn.functional.cross_entropy(model(x), y))
    for layer, name in enumerate(["0", "2"]):
        expected = _expected_scaling(pre, layer, per[f"{name}.weight"], per[f"{name}.bias"], divisor=6)
        np.testing.assert_allclose(pre.optimizer.ekfac_scaling(layer), expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())


def test_sequence_linear_sums_each_sequence_s_rows():
    torch.manual_seed(1)
    n, t = 4, 3
    model = nn.Sequential(nn.Linear(4, 3)).double()
    oracle = copy.deepcopy(model)
    x, target = torch.randn(n, t, 4, dtype=torch.float64), torch.randn(n, t, 3, dtype=torch.float64)

    def token_mean_loss(out, y):  # the loss per token, summed over the example's tokens
        return ((out - y) ** 2).sum()

    per = _per_example_gradients(oracle, token_mean_loss, x, target)
    pre = KFACPreconditioner(model, inverse_strategy="ekfac", kl_clip=0)
    _one_step(model, pre, ((model(x) - target) ** 2).sum(-1).mean())  # mean over the N·T tokens
    expected = _expected_scaling(pre, 0, per["0.weight"], per["0.bias"], divisor=n * t)
    np.testing.assert_allclose(pre.optimizer.ekfac_scaling(0), expected, rtol=1e-8, atol=1e-12 * np.abs(expected).max())


def test_grouped_convolution_scaling_per_example():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, stride=2, groups=2), nn.Flatten(-3), nn.Linear(4 * 3 * 3, 2)).double()
    oracle = copy.deepcopy(model)
    x, y = torch.randn(5, 2, 5, 5, dtype=torch.float64), torch.randint(0, 2, (5,))
    per = _per_example_gradients(
        oracle, lambda out, t: nn.functional.cross_entropy(out.unsqueeze(0), t.unsqueeze(0), reduction="sum"), x, y)
    pre = KFACPreconditioner(model, inverse_strategy="ekfac", kl_clip=0, input_shapes={"0": (5, 5)})
    _one_step(model, pre, nn.functional.cross_entropy(model(x), y))
    for group in range(2):
        expected = _expected_scaling(pre, 0, per["0.weight"], per["0.bias"], divisor=5, group=group, groups=2)
        np.testing.assert_allclose(pre.optimizer.ekfac_scaling(0, group), expected, rtol=1e-8,
                                   atol=1e-12 * np.abs(expected).max())


def test_ekfac_training_runs_and_the_other_strategies_are_unchanged():
    """A few EKFAC steps lower the loss; with the eigen strategy the hooks still make the two
    unpaired calls (same factors as before)."""
    torch.manual_seed(3)
    x, y = torch.randn(32, 6), torch.randint(0, 3, (32,))
    for strategy in ("ekfac", "eigen"):
        model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        pre = KFACPreconditioner(model, inverse_strategy=strategy, damping=1e-2, ekfac_mode="per_row")
        losses = []
        for _ in range(10):
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            pre.step()
            optimizer.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < losses[0], (strategy, losses)
        assert pre.optimizer.ekfac_mode == "per_row"
