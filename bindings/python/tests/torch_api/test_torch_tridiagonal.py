"""KFACPreconditioner(tridiagonal=True) on an nn.Sequential of Linear layers: every consecutive
pair is linked, and the step writes F̂⁻¹ ∇ from the library's own factors and cross factors
(references/tridiagonal.py)."""

import numpy as np
import pytest

import torch
from torch import nn

from libkfac import _lib
from libkfac.torch import KFACPreconditioner
from libkfac.torch._registration import tridiagonal_links
from references import tridiagonal as tri
from testutil import assert_close

pytestmark = pytest.mark.skipif("kfac_layer_link" in _lib.MISSING_EXPERIMENTAL, reason="no kfac_layer_link")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sequential_chain_step_is_the_tridiagonal_direction(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).to(dtype)
    pre = KFACPreconditioner(model, tridiagonal=True, damping=0.05, kl_clip=0.0, pi_damping=True,
                             factor_update_period=1, inverse_update_period=1)
    x, y = torch.randn(16, 4, dtype=dtype), torch.randint(0, 3, (16,))
    nn.functional.cross_entropy(model(x), y).backward()
    linears = [m for m in model if isinstance(m, nn.Linear)]
    v = np.concatenate([tri.vec(torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).double().numpy()) for m in linears])
    pre.step()
    u = np.concatenate([tri.vec(torch.cat([m.weight.grad, m.bias.grad[:, None]], 1).double().numpy()) for m in linears])
    opt = pre.optimizer
    factors = [tuple(np.asarray(a, np.float64) for a in opt.factors(l)) for l in range(3)]
    cross = [tuple(np.asarray(a, np.float64) for a in opt.cross_factors(l)) for l in range(2)]
    inverse, _, _ = tri.inverse_matrix(factors, cross, 0.05)
    np_dtype = np.float32 if dtype == torch.float32 else np.float64
    assert_close(u, inverse @ v, np_dtype, 1.0 if dtype == torch.float64 else 5.0)
    # A short training run stays finite and lowers the loss.
    sgd = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(15):
        sgd.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        sgd.step()
        losses.append(loss.item())
    assert np.isfinite(losses).all() and losses[-1] < losses[0]


def test_skips_pairs_that_do_not_chain():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 5), nn.Linear(7, 2))
    pre = KFACPreconditioner(model, tridiagonal=True)
    assert [(lower.index, upper.index) for lower, upper in tridiagonal_links(pre._layers)] == [(0, 1)]
