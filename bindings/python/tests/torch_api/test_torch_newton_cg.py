"""libkfac.torch.NewtonCG: the torch.func Gauss-Newton product against an explicit JᵀHJ built
from per-example Jacobians, one Newton step against the dense solve of (G + λI) s = −g, ρ against
the explicit model, and training with no, diagonal and K-FAC preconditioning."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from libkfac import _lib
from libkfac.torch import KFACPreconditioner, NewtonCG

pytestmark = pytest.mark.skipif(
    any(name.startswith("kfac_cg_") for name in _lib.MISSING_EXPERIMENTAL),
    reason="the loaded library does not export kfac_cg_* yet",
)


def _data(n=24, d=5, k=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (n,), generator=g)
    return x, y


def _mlp(seed=0, d=5, h=6, k=3):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(d, h), torch.nn.Tanh(), torch.nn.Linear(h, k)).double()


def _flat(ts):
    return torch.cat([t.reshape(-1) for t in ts])


def _explicit_gauss_newton(model, x, y):
    """(1/N) Σ_n J_nᵀ (diag(p_n) − p_n p_nᵀ) J_n from per-example Jacobians of the logits."""
    params = [p for p in model.parameters()]
    names = [n for n, _ in model.named_parameters()]
    flat0 = _flat([p.detach() for p in params])

    def logits(flat, xi):
        values, o = {}, 0
        for name, p in zip(names, params):
            values[name] = flat[o:o + p.numel()].reshape(p.shape)
            o += p.numel()
        return torch.func.functional_call(model, values, (xi[None],))[0]

    n = x.shape[0]
    G = torch.zeros(flat0.numel(), flat0.numel(), dtype=torch.float64)
    for i in range(n):
        J = torch.autograd.functional.jacobian(lambda f: logits(f, x[i]), flat0)
        p = torch.softmax(logits(flat0, x[i]), 0)
        H = torch.diag(p) - torch.outer(p, p)
        G += J.T @ H @ J
    return G / n


def test_gauss_newton_product_equals_explicit_jacobians():
    x, y = _data()
    model = _mlp()
    ncg = NewtonCG(model)
    product = ncg._gauss_newton((x,), y, F.cross_entropy)
    G = _explicit_gauss_newton(model, x, y)
    gen = torch.Generator().manual_seed(1)
    for _ in range(3):
        v = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in model.parameters()]
        got = _flat(product(v))
        want = G @ _flat(v)
        assert torch.max(torch.abs(got - want)) < 1e-12 * torch.max(torch.abs(want))


def test_one_step_is_the_damped_newton_step_and_rho_is_against_the_model_without_lambda():
    x, y = _data()
    model = _mlp()
    lam = 0.5
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    ncg = NewtonCG(model, damping=lam, tolerance=1e-12, line_search=False)
    theta0 = _flat([p.detach().clone() for p in model.parameters()])
    loss = loss_fn(model(x))
    g = _flat(torch.autograd.grad(loss, list(model.parameters())))
    G = _explicit_gauss_newton(model, x, y)
    s = torch.linalg.solve(G + lam * torch.eye(G.shape[0], dtype=torch.float64), -g)
    result = ncg.step(x, y, F.cross_entropy)
    got = _flat([p.detach() for p in model.parameters()]) - theta0
    assert torch.max(torch.abs(got - s)) < 1e-9 * torch.max(torch.abs(s))
    assert result.step_scale == 1.0
    model_value = float(g @ s + 0.5 * s @ G @ s)
    assert result.cg.model_value == pytest.approx(model_value, rel=1e-9)
    assert result.rho == pytest.approx((result.loss_after - result.loss_before) / model_value, rel=1e-9)
    expected = lam * 2 / 3 if result.rho > 0.75 else lam * 1.5 if result.rho < 0.25 else lam
    assert ncg.damping == pytest.approx(expected, rel=1e-15)


def test_curvature_product_argument_replaces_torch_func():
    x, y = _data()
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    m1, m2 = _mlp(), _mlp()
    G = _explicit_gauss_newton(m2, x, y)
    shapes = [p.shape for p in m2.parameters()]
    calls = []

    def explicit(vectors):
        calls.append(1)
        out = G @ _flat(vectors)
        res, o = [], 0
        for s in shapes:
            n = int(np.prod(s))
            res.append(out[o:o + n].reshape(s))
            o += n
        return res

    r1 = NewtonCG(m1, tolerance=1e-10, line_search=False).step(x, y, F.cross_entropy)
    r2 = NewtonCG(m2, tolerance=1e-10, line_search=False, curvature_product=explicit).step(x, y, F.cross_entropy)
    assert len(calls) == r2.cg.products
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("kind", ["none", "diagonal", "kfac"])
def test_training_decreases_the_loss(kind):
    x, _ = _data(n=64, seed=3)
    y = torch.argmax(x @ torch.randn(5, 3, generator=torch.Generator().manual_seed(9), dtype=torch.float64), 1)
    model = _mlp(seed=3)
    loss_fn = lambda out: F.cross_entropy(out, y)  # noqa: E731
    kp = None
    if kind == "kfac":
        kp = KFACPreconditioner(model, damping=1e-1, inverse_update_period=1, dtype=torch.float64)
        model.zero_grad()
        loss_fn(model(x)).backward()
        kp.step()
    ncg = NewtonCG(model, preconditioner=kp if kind == "kfac" else (None if kind == "none" else "diagonal"),
                   damping=1.0)
    first = float(loss_fn(model(x)).detach())
    subset = torch.arange(0, 64, 4)
    for _ in range(8):
        if kp is not None:
            model.zero_grad()
            loss_fn(model(x)).backward()
            kp.step()
        result = ncg.step(x, y, F.cross_entropy, curvature_indices=subset)
        assert result.loss_after <= result.loss_before
        assert result.cg.iterations >= 1
    last = float(loss_fn(model(x)).detach())
    assert last < 0.5 * first


def test_kfac_preconditioner_must_cover_every_parameter():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4), torch.nn.Linear(4, 2)).double()
    kp = KFACPreconditioner(model, dtype=torch.float64)
    with pytest.raises(ValueError, match="1.weight"):
        NewtonCG(model, preconditioner=kp)


def test_stored_columns_plug_into_curvature_product():
    """The other product source: libkfac.torch.ColumnRecorder's stored-column G·v as
    ``curvature_product`` gives the same Newton step as the torch.func product."""
    from libkfac.torch import ColumnRecorder

    x, y = _data()
    m1, m2 = _mlp(), _mlp()
    r1 = NewtonCG(m1, tolerance=1e-10, line_search=False).step(x, y, F.cross_entropy)
    recorder = ColumnRecorder(m2, "categorical")
    recorder.record(x)
    r2 = NewtonCG(m2, tolerance=1e-10, line_search=False, curvature_product=recorder.curvature_product).step(
        x, y, F.cross_entropy)
    assert r1.cg.iterations == r2.cg.iterations
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1, p2, rtol=1e-8, atol=1e-10)
