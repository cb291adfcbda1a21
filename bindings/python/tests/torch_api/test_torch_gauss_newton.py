"""EXPERIMENTAL libkfac.torch.ColumnRecorder: curvature_product against the explicit
(1/N) Σ_n J_nᵀ B_n J_n v built here with torch.func.jacrev per example and B written out, for a
grouped Conv2d net, an MLP and a Conv1d net (NCL), the three distributions, float64 and float32; the loss conventions
(cross-entropy mean, MSELoss mean with loss_scale 2/d) against torch's own Hessian-vector product
on a linear model (where GGN = Hessian)."""

import pytest
import torch
from torch import nn
from torch.func import functional_call, jacrev

from libkfac.torch import ColumnRecorder
from output_space import DISTS, output_hessian


def _explicit(model, params, x, dist, v):
    names = [n for n, _ in model.named_parameters()]
    flat = {n: p.detach() for n, p in model.named_parameters()}
    order = [names.index(n) for n in params]

    def f(ps, xn):
        return functional_call(model, {**flat, **dict(zip(params, ps))}, (xn[None],))[0]

    z = model(x).detach()
    b = output_hessian(dist, z)
    out = [torch.zeros_like(t) for t in v]
    for n in range(x.shape[0]):
        jac = jacrev(f)([flat[p] for p in params], x[n])           # per param [d, *shape]
        jv = sum((j.reshape(j.shape[0], -1) @ t.reshape(-1)) for j, t in zip(jac, v))
        bjv = b[n] @ jv
        for i, j in enumerate(jac):
            out[i] += (j.reshape(j.shape[0], -1).T @ bjv).reshape(v[i].shape) / x.shape[0]
    del order
    return out


def _models(dtype):
    torch.manual_seed(0)
    conv = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Conv2d(4, 2, 2, stride=2, bias=False),
                         nn.Flatten(), nn.Linear(2 * 2 * 2, 3)).to(dtype)
    mlp = nn.Sequential(nn.Linear(5, 6), nn.ReLU(), nn.Linear(6, 4, bias=False), nn.Tanh(), nn.Linear(4, 3)).to(dtype)
    conv1d = nn.Sequential(nn.Conv1d(2, 4, 3, padding=1, groups=2), nn.Tanh(),
                           nn.Conv1d(4, 3, 2, stride=2, dilation=2, bias=False), nn.Tanh(),
                           nn.Flatten(), nn.Linear(3 * 3, 3)).to(dtype)        # [N, 2, 7] → [N, 4, 7] → [N, 3, 3]
    return [(conv, torch.randn(4, 2, 4, 4, dtype=dtype)), (mlp, torch.randn(6, 5, dtype=dtype)),
            (conv1d, torch.randn(5, 2, 7, dtype=dtype))]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("dist", DISTS)
def test_curvature_product_matches_explicit_ggn(dtype, dist):
    for model, x in _models(dtype):
        rec = ColumnRecorder(model, dist)
        rec.record(x)
        params = rec.parameters()
        assert len(params) == len(list(model.parameters()))    # every layer recorded (Conv1d too)
        names = {id(p): n for n, p in model.named_parameters()}
        v = [torch.randn_like(p) for p in params]
        got = rec.curvature_product(v)
        expected = _explicit(model, [names[id(p)] for p in params], x, dist, v)
        scale = max(e.abs().max().item() for e in expected)
        err = max((g - e).abs().max().item() for g, e in zip(got, expected)) / scale
        assert err < (1e-5 if dtype == torch.float32 else 1e-11), (type(model[0]).__name__, err)
        assert all(g.shape == t.shape and g.dtype == t.dtype for g, t in zip(got, v))


def test_loss_conventions_against_torch_hessian():
    """Linear model: GGN = Hessian of the loss. cross_entropy (mean) with loss_scale 1 and
    MSELoss (mean over N·d) with distribution 'gaussian', loss_scale 2/d."""
    torch.manual_seed(1)
    model = nn.Linear(4, 3).double()
    x, y = torch.randn(7, 4, dtype=torch.float64), torch.randint(0, 3, (7,))
    t = torch.randn(7, 3, dtype=torch.float64)
    v = [torch.randn_like(p) for p in (model.weight, model.bias)]
    for loss_fn, dist, scale in [(lambda z: nn.functional.cross_entropy(z, y), "categorical", 1.0),
                                 (lambda z: nn.functional.mse_loss(z, t), "gaussian", 2.0 / 3)]:
        rec = ColumnRecorder(model, dist, loss_scale=scale)
        rec.record(x)
        got = rec.curvature_product(v)

        def loss(w, b):
            return loss_fn(functional_call(model, {"weight": w, "bias": b}, (x,)))

        _, hv = torch.autograd.functional.hvp(loss, (model.weight.detach(), model.bias.detach()), tuple(v))
        for g, h in zip(got, hv):
            torch.testing.assert_close(g, h, rtol=1e-10, atol=1e-12)


def test_errors():
    model = nn.Sequential(nn.Linear(3, 2))
    rec = ColumnRecorder(model)
    with pytest.raises(RuntimeError):
        rec.curvature_product([torch.zeros(2, 3), torch.zeros(2)])
    rec.record(torch.randn(4, 3))
    with pytest.raises(ValueError):
        rec.curvature_product([torch.zeros(2, 3)])
    with pytest.raises(ValueError):
        ColumnRecorder(nn.Sequential(nn.ReLU()))
    # A convolution fed one unbatched example (outputs [1, d]) is refused before anything is kept.
    unbatched = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Flatten(0), nn.Unflatten(0, (1, 12)), nn.Linear(12, 3))
    rec = ColumnRecorder(unbatched)
    with pytest.raises(ValueError, match="batched"):
        rec.record(torch.randn(2, 5))
    with pytest.raises(RuntimeError):
        rec.curvature_product([torch.zeros_like(p) for p in rec.parameters()])


def test_model_parameter_order_with_an_extra_parameter():
    """Vectors in model.parameters() order (the NewtonCG layout): a parameter outside the
    recorded layers gets a zero product; the layers' products equal those in parameters() order."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.temperature = nn.Parameter(torch.ones((), dtype=torch.float64))
            self.a = nn.Linear(3, 4).double()
            self.b = nn.Linear(4, 2, bias=False).double()

        def forward(self, x):
            return self.b(torch.tanh(self.a(x))) * 1.0

    torch.manual_seed(3)
    model = Net()
    rec = ColumnRecorder(model, "categorical")
    rec.record(torch.randn(5, 3, dtype=torch.float64))
    trainable = list(model.parameters())
    v = [torch.randn_like(p) for p in trainable]
    got = rec.curvature_product(v)
    assert torch.count_nonzero(got[0]) == 0
    ours = rec.curvature_product(v[1:])
    for g, o in zip(got[1:], ours):
        torch.testing.assert_close(g, o)
