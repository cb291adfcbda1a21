"""libkfac.torch.NewtonCG with a KFACPreconditioner of a convolutional model, constructed BEFORE
any forward pass (the convolutions' input sizes, and so the library registration, unknown yet):
its steps against those of a NewtonCG constructed after the first forward pass (same seeds; the
parameters, losses, ρ, λ and CG iterations bit-identical), for Conv2d and Conv1d models; the
first step registering from its own batch when the caller ran no forward pass; and the coverage
check still made at construction."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libkfac import _lib
from libkfac._errors import KFACError
from libkfac.torch import KFACPreconditioner, NewtonCG

pytestmark = pytest.mark.skipif(
    any(name.startswith("kfac_cg_") for name in _lib.MISSING_EXPERIMENTAL),
    reason="the loaded library does not export kfac_cg_* yet",
)


def _conv2d_model():
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv2d(3, 2, 2, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(2 * 2 * 2, 3))


def _conv1d_model():
    return nn.Sequential(nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(), nn.Conv1d(3, 2, 2, stride=2), nn.Tanh(),
                         nn.Flatten(), nn.Linear(2 * 3, 3))


MODELS = {"conv2d": (_conv2d_model, (2, 4, 4), {"0": (4, 4), "2": (4, 4)}),
          "conv1d": (_conv1d_model, (2, 7), {"0": (7,), "2": (7,)})}


def _data(kind, n=12, dtype=torch.float64):
    gen = torch.Generator().manual_seed(21)
    x = torch.randn((n,) + MODELS[kind][1], dtype=torch.float64, generator=gen).to(dtype)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, y


def _run(kind, construct_first, dtype, steps=4):
    torch.manual_seed(20)
    model = MODELS[kind][0]().to(dtype)
    x, y = _data(kind, dtype=dtype)
    kp = KFACPreconditioner(model, damping=0.1, inverse_update_period=1)
    ncg = NewtonCG(model, preconditioner=kp, damping=1.0) if construct_first else None
    if construct_first:
        assert not kp.registered
    trace = []
    for step in range(steps):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        kp.step()
        if ncg is None:
            ncg = NewtonCG(model, preconditioner=kp, damping=1.0)
        r = ncg.step(x, y, F.cross_entropy, curvature_indices=torch.arange(0, 12, 2))
        trace.append((r.loss_before, r.loss_after, r.rho, r.damping, r.step_scale, r.cg.iterations,
                      [p.detach().clone() for p in model.parameters()]))
    assert kp.input_sizes == MODELS[kind][2]
    kp.close()
    return trace


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_constructed_before_the_first_forward_pass_steps_as_after(kind, dtype):
    before, after = _run(kind, True, dtype), _run(kind, False, dtype)
    for b, a in zip(before, after):
        assert b[:6] == a[:6]
        for pb, pa in zip(b[6], a[6]):
            assert torch.equal(pb, pa)
    assert before[-1][1] < before[0][0]          # and it trains
    assert all(t[5] >= 1 for t in before)


@pytest.mark.parametrize("kind", list(MODELS))
def test_first_step_without_a_forward_pass_registers_from_its_batch(kind):
    """No forward pass by the caller: the step registers the layers from its batch's sizes, then
    fails with the library's NO_STATISTICS (no K-FAC inverses yet), the parameters unchanged;
    after the caller's statistics and kp.step() the same solver steps."""
    torch.manual_seed(22)
    model = MODELS[kind][0]().double()
    x, y = _data(kind)
    kp = KFACPreconditioner(model, damping=0.1, inverse_update_period=1)
    ncg = NewtonCG(model, preconditioner=kp)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(KFACError) as error:
        ncg.step(x, y, F.cross_entropy)
    assert error.value.status == _lib.KFAC_ERROR_NO_STATISTICS
    assert kp.registered and kp.input_sizes == MODELS[kind][2]
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    F.cross_entropy(model(x), y).backward()
    kp.step()
    result = ncg.step(x, y, F.cross_entropy)
    assert result.loss_after < result.loss_before
    kp.close()


def test_coverage_is_checked_before_registration():
    """A parameter outside the K-FAC layers (GroupNorm's) is refused at construction, before any
    forward pass registered the convolutions."""
    torch.manual_seed(23)
    model = nn.Sequential(nn.Conv1d(2, 2, 3), nn.GroupNorm(1, 2), nn.Flatten(), nn.Linear(10, 3)).double()
    kp = KFACPreconditioner(model)
    assert not kp.registered
    with pytest.raises(ValueError, match="1.weight"):
        NewtonCG(model, preconditioner=kp)
    kp.close()
