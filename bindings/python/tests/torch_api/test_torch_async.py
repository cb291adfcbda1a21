"""KFACPreconditioner(async_inversion=...): the keyword reaches the library, and in the
deterministic mode the rewritten gradients of step k are the dense eigen-strategy directions
with the factors the library held after step s(k) = 0 for k < 2·Ti, Ti·(⌊k/Ti⌋ − 1) after."""

import numpy as np
import torch
from torch import nn

from references import dense as ref
from libkfac.torch import KFACPreconditioner

PERIOD, DAMPING = 2, 0.05


def _theta(module):
    return ref.theta_grad(module.weight.grad.double().numpy(),
                          module.bias.grad.double().numpy() if module.bias is not None else None)


def test_keyword_sets_the_library_parameter():
    model = nn.Sequential(nn.Linear(4, 3), nn.Tanh(), nn.Linear(3, 2)).double()
    for value, name in [(True, "newest"), ("deterministic", "deterministic"), (False, "off")]:
        pre = KFACPreconditioner(model, async_inversion=value)
        assert pre.optimizer.async_inversion == name
        pre.close()


def test_deterministic_mode_uses_the_factors_of_the_predicted_step():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    pre = KFACPreconditioner(model, async_inversion="deterministic", inverse_update_period=PERIOD,
                             kl_clip=0, damping=DAMPING, factor_decay=0.7)
    factors = []
    for k in range(8):
        x, y = torch.randn(12, 5, dtype=torch.float64), torch.randn(12, 3, dtype=torch.float64)
        model.zero_grad()
        nn.functional.mse_loss(model(x), y).backward()
        given = [_theta(m) for _, m in pre.layers]
        pre.step()
        factors.append([pre.optimizer.factors(i) for i in range(len(pre.layers))])
        source = 0 if k < 2 * PERIOD else PERIOD * (k // PERIOD - 1)
        for i, (_, module) in enumerate(pre.layers):
            A, G = factors[source][i]
            expected = ref.precondition_eigen(A, G, given[i], DAMPING)
            np.testing.assert_allclose(_theta(module), expected, atol=1e-10 * max(1.0, np.abs(expected).max()),
                                       err_msg=f"step {k} layer {i} (inverse of step {source})")
    pre.close()
