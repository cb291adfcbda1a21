"""EXPERIMENTAL curvature= options of KFACPreconditioner ('kflr', 'mc', 'kfra'): the KFLR factors
at N = 1 against torch.func's per-example Gauss-Newton blocks Jᵀ B J, the Monte-Carlo Fisher
converging to KFLR as mc_samples grows (stated seeds), KFRA = KFLR at N = 1 and against the
recursion in numpy at N = 40, conv KFLR, misuse, and the default path unchanged."""

import numpy as np
import pytest
import torch
from torch import nn

from libkfac.torch import KFACPreconditioner
from output_space import DISTS, output_hessian


def _mlp(seed=0, act=nn.Tanh):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 5), act(), nn.Linear(5, 4), act(), nn.Linear(4, 3)).double()


def _factors(pre, curvature_calls):
    pre.optimizer.update_factors()
    return [pre.optimizer.factors(i) for i in range(len(pre._layers))]


def _record(model, x, curvature, dist, mc_samples=1, seed=None):
    pre = KFACPreconditioner(model, curvature=curvature, mc_samples=mc_samples)
    z = model(x)
    assert pre.curvature_backward(z, dist, seed=seed)
    pre.remove_hooks()   # (the tests' torch.func references run the same modules)
    return _factors(pre, None)


@pytest.mark.parametrize("dist", DISTS)
def test_kflr_at_one_example_is_the_per_example_ggn_block(dist):
    """A ⊗ G_KFLR = Jᵀ B J of every Linear (weight and bias) at N = 1, J by torch.func."""
    model = _mlp(1)
    x = torch.randn(1, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    factors = _record(model, x, "kflr", dist)
    params = dict(model.named_parameters())
    z = model(x)[0]
    B = output_hessian(dist, z.detach())
    for i, name in enumerate(["0", "2", "4"]):
        w, b = params[name + ".weight"], params[name + ".bias"]

        def f(wb, w=w, b=b, name=name):
            ps = dict(params)
            o, n = w.shape
            ps[name + ".weight"] = wb[: o * n].reshape(o, n)
            ps[name + ".bias"] = wb[o * n:]
            return torch.func.functional_call(model, ps, (x,))[0]

        wb = torch.cat([w.detach().reshape(-1), b.detach()])
        J = torch.func.jacrev(f)(wb)                       # [d, o·n + o]
        ggn = (J.T @ B @ J).detach().numpy()
        A, G = factors[i]
        o, n = w.shape
        # [W | b] row-major: parameter (r, c) ↔ G[r] A[c]; the weight index r·n + c, the bias o·n + r.
        index = [(r, c) for r in range(o) for c in range(n)] + [(r, n) for r in range(o)]
        kron = np.array([[G[r1, r2] * A[c1, c2] for (r2, c2) in index] for (r1, c1) in index])
        np.testing.assert_allclose(kron, ggn, atol=1e-12 * max(1, np.abs(ggn).max()))


def test_mc_converges_to_kflr():
    """curvature='mc' with S samples per example (seeds 1000 + j) → KFLR: the error at S = 2000
    is within 4 standard errors of the entries' sampling noise, and below that at S = 4."""
    model = _mlp(3)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    kflr = _record(model, x, "kflr", "categorical")
    errors = []
    for samples in (4, 2000):
        mc = _record(model, x, "mc", "categorical", mc_samples=samples, seed=1000)
        errors.append(max(np.abs(m[1] - k[1]).max() / np.abs(k[1]).max() for m, k in zip(mc, kflr)))
        for m, k in zip(mc, kflr):
            np.testing.assert_allclose(m[0], k[0], rtol=0, atol=1e-14)   # A is the same
    assert errors[1] < 0.1, errors
    assert errors[1] < errors[0], errors


def _kfra_numpy(model, x, dist):
    layers = [m for m in model if isinstance(m, nn.Linear)]
    a, pre = x.numpy(), []
    for i, m in enumerate(layers):
        s = a @ m.weight.detach().numpy().T + m.bias.detach().numpy()
        pre.append(s)
        a = np.tanh(s)
    G = np.mean([output_hessian(dist, torch.from_numpy(z)).numpy() for z in pre[-1]], axis=0)
    out = [G]
    for i in range(len(layers) - 1, 0, -1):
        w, t = layers[i].weight.detach().numpy(), np.tanh(pre[i - 1])
        d = 1 - t * t
        G = (w.T @ G @ w) * (d.T @ d / x.shape[0])
        out.insert(0, G)
    return out


@pytest.mark.parametrize("dist", DISTS)
def test_kfra_equals_kflr_at_one_example_and_the_recursion_at_forty(dist):
    model = _mlp(5)
    gen = torch.Generator().manual_seed(6)
    x1 = torch.randn(1, 3, dtype=torch.float64, generator=gen)
    for (a1, g1), (a2, g2) in zip(_record(model, x1, "kfra", dist), _record(model, x1, "kflr", dist)):
        np.testing.assert_allclose(g1, g2, atol=1e-13 * max(1, np.abs(g2).max()))
        np.testing.assert_allclose(a1, a2, atol=1e-13)
    x = torch.randn(40, 3, dtype=torch.float64, generator=gen)
    got = _record(model, x, "kfra", dist)
    for (a, g), e in zip(got, _kfra_numpy(model, x, dist)):
        np.testing.assert_allclose(g, e, atol=1e-12 * np.abs(e).max())
    kflr = _record(model, x, "kflr", dist)
    assert np.abs(kflr[0][1] - got[0][1]).max() > 1e-4 * np.abs(got[0][1]).max()


def test_conv_kflr_matches_the_per_position_definition():
    """A conv net's KFLR Γ = (1/(N|T|)) Σ_n Σ_t Σ_k c cᵀ from columns computed here by torch.func."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Conv2d(2, 3, 2), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 2 * 2, 3)).double()
    x = torch.randn(4, 2, 3, 3, dtype=torch.float64)
    factors = _record(model, x, "kflr", "categorical")
    conv = model[0]

    def head(s):   # z from the conv's output of one example
        return model[3](model[2](model[1](s.unsqueeze(0))))[0]

    s_all = conv(x).detach()
    total = np.zeros((3, 3))
    for n in range(4):
        J = torch.func.jacrev(head)(s_all[n])             # [d, C, H, W]
        z = head(s_all[n]).detach()
        p = torch.softmax(z, -1)
        S = torch.diag(p.sqrt()) - torch.outer(p, p.sqrt())
        c = torch.einsum("dchw,dk->kchw", J, S)            # columns at the conv output
        total += torch.einsum("kchw,kehw->ce", c, c).detach().numpy()
    expected = total / (4 * 4)
    np.testing.assert_allclose(factors[0][1], expected, atol=1e-12 * np.abs(expected).max())


def test_training_and_misuse():
    model = _mlp(8, act=nn.ReLU)
    x = torch.randn(32, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(9))
    y = torch.randint(0, 3, (32,), generator=torch.Generator().manual_seed(10))
    losses = {}
    for curvature in ("kflr", "mc", "kfra"):
        m = _mlp(8, act=nn.ReLU)
        pre = KFACPreconditioner(m, curvature=curvature, mc_samples=4, lr=0.1, damping=1e-2)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        for _ in range(15):
            opt.zero_grad()
            z = m(x)
            loss = torch.nn.functional.cross_entropy(z, y)
            pre.curvature_backward(z, "categorical")
            loss.backward()
            pre.step()
            opt.step()
        losses[curvature] = (float(torch.nn.functional.cross_entropy(_mlp(8, act=nn.ReLU)(x), y).detach()), float(loss.detach()))
        assert losses[curvature][1] < losses[curvature][0], losses
    with pytest.raises(ValueError):
        KFACPreconditioner(model, curvature="exact")
    with pytest.raises(ValueError):
        KFACPreconditioner(model, curvature="mc", mc_samples=0)
    with pytest.raises(ValueError):   # KFRA needs an nn.Sequential dense chain
        KFACPreconditioner(nn.Sequential(nn.Conv2d(1, 2, 2), nn.Flatten(), nn.Linear(2, 2)).double(), curvature="kfra")
    with pytest.raises(ValueError):
        KFACPreconditioner(nn.Sequential(nn.Linear(2, 2), nn.Softmax(-1), nn.Linear(2, 2)).double(), curvature="kfra")
    pre = KFACPreconditioner(model)
    with pytest.raises(RuntimeError):
        pre.curvature_backward(model(x), "categorical")
    pre = KFACPreconditioner(model, curvature="kflr")
    z = model(x)
    torch.nn.functional.cross_entropy(z, y).backward()
    with pytest.raises(RuntimeError):   # after loss.backward() recorded
        pre.curvature_backward(z, "categorical")


def test_default_curvature_is_the_fisher_path_bit_for_bit():
    """curvature='fisher' (explicit) and the default give bit-identical directions."""
    out = []
    for kwargs in ({}, {"curvature": "fisher"}):
        m = _mlp(11)
        pre = KFACPreconditioner(m, lr=0.1, damping=1e-2, **kwargs)
        x = torch.randn(16, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(12))
        y = torch.randint(0, 3, (16,), generator=torch.Generator().manual_seed(13))
        torch.nn.functional.cross_entropy(m(x), y).backward()
        pre.step()
        out.append([p.grad.clone() for p in m.parameters()])
    for a, b in zip(*out):
        assert torch.equal(a, b)


@pytest.mark.parametrize("curvature", ["kflr", "mc", "kfra"])
def test_output_grad_scale_does_not_change_the_factors(curvature):
    """A loss scaler (output_grad_scale) leaves the KFLR, MC and KFRA factors as they are."""
    x = torch.randn(6, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(14))
    out = []
    for scale in (1.0, 8.0):
        model = _mlp(15)
        pre = KFACPreconditioner(model, curvature=curvature, mc_samples=3, output_grad_scale=scale)
        assert pre.curvature_backward(model(x), "categorical", seed=5)
        out.append(_factors(pre, None))
    for (a1, g1), (a2, g2) in zip(*out):
        np.testing.assert_allclose(g2, g1, rtol=1e-12, atol=0)
        np.testing.assert_array_equal(a2, a1)
