"""curvature='kflr' and 'mc' of KFACPreconditioner on nn.Conv1d layers (NCL inputs; the library
registers them as 1×L convolutions): every layer's output factor against its per-position
definition computed here from explicit per-example Jacobians (torch.func.jacrev of the network
after the layer's pre-activations) and the output Hessian B_n,

    Γ = (1/(N|T|)) Σ_n Σ_t J_{n,t}ᵀ B_n J_{n,t}      (KFLR, KFC's |T| convention),

the input factors against references/conv.py's im2col, MC with stated seeds against the same sum
over the library's sampled output gradients and, with many samples, converging to KFLR; then the
MNIST-1D CNN of the benchmark training a few steps with kflr and mc, its directions against a
second preconditioner fed the oracle columns through the unpaired record_inputs /
record_output_grads calls."""

import numpy as np
import pytest
import torch
from torch import nn

from libkfac.sampling import sampled_output_grads
from libkfac.torch import KFACPreconditioner
from references import conv as cr
from output_space import DISTS, output_hessian, output_hessian_sqrt
from test_torch_conv import conv_of

TORCH_DTYPES = {"f64": torch.float64, "f32": torch.float32}


def _net(dtype=torch.float64, seed=0):
    """Conv1d (padding) → tanh → Conv1d (stride 2) → tanh → Flatten → Linear, on [N, 2, 7]."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv1d(2, 3, 3, padding=1), nn.Tanh(),          # [N, 3, 7]
        nn.Conv1d(3, 4, 2, stride=2), nn.Tanh(),           # [N, 4, 3]
        nn.Flatten(), nn.Linear(12, 3),
    ).to(dtype)


def _layer_indices(model):
    return [i for i, m in enumerate(model) if isinstance(m, (nn.Conv1d, nn.Linear))]


def _jacobians(model, x):
    """Per preconditioned layer i of the nn.Sequential (float64 copy of ``model``): its inputs
    [N, ...] and the per-example Jacobians J_n = ∂z_n/∂s_n of the outputs w.r.t. its
    pre-activations, [N, d, *out]; and z [N, d]."""
    m = _copy64(model)
    x = x.detach().double()
    z = m(x).detach()
    out = {}
    for i in _layer_indices(m):
        inputs = m[:i](x).detach()
        s = m[: i + 1](x).detach()

        def head(si, i=i):
            return m[i + 1:](si.unsqueeze(0))[0]

        J = torch.stack([torch.func.jacrev(head)(s[n]) for n in range(x.shape[0])]).detach()
        out[i] = (inputs, J)
    return out, z


def _copy64(model):
    import copy

    return copy.deepcopy(model).double()


def _oracle_gamma(J, per_example_B):
    """(1/(N|T|)) Σ_n Σ_t J_{n,t}ᵀ B_n J_{n,t} (a Linear: |T| = 1), float64 numpy."""
    n = J.shape[0]
    if J.dim() == 3:                     # Linear: [N, d, out]
        total = sum(J[e].T @ per_example_B[e] @ J[e] for e in range(n))
        return (total / n).numpy()
    positions = J.shape[-1]              # Conv1d: [N, d, C, L]
    total = sum(torch.einsum("dct,de,ebt->cb", J[e], per_example_B[e], J[e]) for e in range(n))
    return (total / (n * positions)).numpy()


def _oracle_omega(model, i, inputs):
    """A of layer i: im2col second moment (references/conv.py) or the Linear's [x, 1] moment."""
    module = model[i]
    x = inputs.numpy()
    if isinstance(module, nn.Linear):
        a = np.concatenate([x, np.ones((x.shape[0], 1))], axis=1)
        return a.T @ a / x.shape[0]
    conv = conv_of(module, x.shape)
    grads = np.zeros(conv.grad_shape(x.shape[0]))
    return cr.kfc_factors(x, grads, conv)[0][0]


def _factors(pre):
    pre.optimizer.update_factors()
    return [pre.optimizer.factors(i) for i in range(len(pre.layers))]


def _tolerance(tdtype):
    return 1e-10 if tdtype == torch.float64 else 2e-5


@pytest.mark.parametrize("tdtype", list(TORCH_DTYPES.values()), ids=list(TORCH_DTYPES))
@pytest.mark.parametrize("dist", DISTS)
def test_conv1d_kflr_factors_match_the_per_position_definition(dist, tdtype):
    model = _net(tdtype, seed=1)
    x = torch.randn(5, 2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(2)).to(tdtype)
    pre = KFACPreconditioner(model, curvature="kflr")
    assert pre.curvature_backward(model(x), dist)
    pre.remove_hooks()
    got = _factors(pre)
    assert [name for name, _ in pre.layers] == ["0", "2", "5"]
    per_layer, z = _jacobians(model, x)
    B = list(output_hessian(dist, z))
    tol = _tolerance(tdtype)
    for (A, G), i in zip(got, _layer_indices(model)):
        inputs, J = per_layer[i]
        expected_g = _oracle_gamma(J, B)
        expected_a = _oracle_omega(_copy64(model), i, inputs)
        np.testing.assert_allclose(G, expected_g, rtol=0, atol=tol * np.abs(expected_g).max())
        np.testing.assert_allclose(A, expected_a, rtol=0, atol=tol * np.abs(expected_a).max())
    # A wrong position convention (Σ_t without 1/|T|, or per position as an example of its own
    # with 1/N only) misses by the factor |T| = 7 or 3: far outside the tolerance above.
    pre.close()


def test_conv1d_mc_with_stated_seeds_is_the_sum_over_the_sampled_gradients():
    """mc_samples = 3, seed = 100: Γ = (1/(N|T|)) Σ_n Σ_t Σ_j (J_{n,t}ᵀ s_{n,j})(…)ᵀ / 3 with
    s_{·,j} the library's sampled output gradients at seed 100 + j."""
    model = _net(seed=3)
    x = torch.randn(6, 2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    pre = KFACPreconditioner(model, curvature="mc", mc_samples=3)
    assert pre.curvature_backward(model(x), "categorical", seed=100)
    pre.remove_hooks()
    got = _factors(pre)
    per_layer, z = _jacobians(model, x)
    samples = [torch.from_numpy(sampled_output_grads(z.numpy(), "categorical", 100 + j)) for j in range(3)]
    # Σ_j s sᵀ / 3 per example plays the role of B_n in the oracle.
    B = [sum(torch.outer(s[n], s[n]) for s in samples) / 3 for n in range(x.shape[0])]
    for (A, G), i in zip(got, _layer_indices(model)):
        expected = _oracle_gamma(per_layer[i][1], B)
        np.testing.assert_allclose(G, expected, rtol=0, atol=1e-10 * np.abs(expected).max())
    pre.close()


def _relative_error(mc, kflr):
    return max(np.abs(m[1] - k[1]).max() / np.abs(k[1]).max() for m, k in zip(mc, kflr))


def test_conv1d_mc_converges_to_kflr():
    """The Monte-Carlo output factors approach KFLR as mc_samples grows (seed 1000): relative
    error below 0.03 at 2000 samples per example (measured 0.0065; 0.038 at 20) and falling by at
    least 3× from 20 samples (1/√S predicts 10×); the input factors are KFLR's exactly."""
    model = _net(seed=5)
    x = torch.randn(8, 2, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(6))

    def factors(curvature, samples=1):
        pre = KFACPreconditioner(model, curvature=curvature, mc_samples=samples)
        assert pre.curvature_backward(model(x), "categorical", seed=1000)
        pre.remove_hooks()
        out = _factors(pre)
        pre.close()
        return out

    kflr = factors("kflr")
    errors = []
    for samples in (20, 2000):
        mc = factors("mc", samples)
        for m, k in zip(mc, kflr):
            np.testing.assert_array_equal(m[0], k[0])
        errors.append(_relative_error(mc, kflr))
    assert errors[1] < 0.03, errors
    assert errors[1] < errors[0] / 3, errors


def _mnist1d_cnn(channels=4, length=40):
    """benchmarks/training/problems.py's mnist1d_cnn with fewer channels (the oracle's
    Jacobians stay small): Conv1d k5 s2 p1, then k3 s2 p1 twice, ReLU, Flatten, Linear → 10."""
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * 5, 10),
    )


def _oracle_columns(model, x, curvature, seed, samples):
    """Per preconditioned layer: its inputs and the columns c_{k,n} = J_nᵀ s_{k,n} [K, N, *out]
    of the oracle (S of output_hessian_sqrt for 'kflr'; the library's sampled gradients / √samples for 'mc')."""
    per_layer, z = _jacobians(model, x)
    if curvature == "kflr":
        s = output_hessian_sqrt("categorical", z).permute(2, 0, 1)   # [K, N, d]
    else:
        s = torch.stack([torch.from_numpy(sampled_output_grads(z.numpy(), "categorical", seed + j))
                         for j in range(samples)]) / np.sqrt(samples)
    out = {}
    for i, (inputs, J) in per_layer.items():
        out[i] = (inputs, torch.einsum("knd,nd...->kn...", s, J))
    return out


@pytest.mark.parametrize("curvature", ["kflr", "mc"])
def test_mnist1d_cnn_steps_equal_a_preconditioner_fed_the_oracle(curvature):
    """Five steps of the MNIST-1D CNN (three Conv1d, one Linear; eigen inverses every second
    step, KL clip active): curvature_backward's directions against those of a 'fisher'
    preconditioner without hooks, loss_reduction='sum', fed per layer the inputs and the oracle
    columns as K·N examples scaled by √K through record_inputs / record_output_grads (the
    unpaired calls, whose factors are (1/(KN|T|)) Σ (√K c)(√K c)ᵀ = KFLR's)."""
    torch.manual_seed(11)
    model_a = _mnist1d_cnn().double()
    model_b = _mnist1d_cnn().double()
    model_b.load_state_dict(model_a.state_dict())
    options = dict(lr=0.2, damping=0.05, kl_clip=1e-2, inverse_update_period=2)
    samples = 3
    pre_a = KFACPreconditioner(model_a, curvature=curvature, mc_samples=samples, **options)
    pre_b = KFACPreconditioner(model_b, loss_reduction="sum", input_shapes={"1": 40, "3": 19, "5": 10}, **options)
    pre_b.remove_hooks()
    layer_ids = {int(name): index for index, (name, _) in enumerate(pre_b.layers)}
    gen = torch.Generator().manual_seed(12)
    x = torch.randn(6, 40, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 10, (6,), generator=gen)
    losses = []
    for step in range(5):
        seed = 1000 * step
        model_a.zero_grad()
        z = model_a(x)
        loss = nn.functional.cross_entropy(z, y)
        assert pre_a.curvature_backward(z, "categorical", seed=seed)
        loss.backward()
        pre_a.step()

        model_b.zero_grad()
        for i, (inputs, c) in _oracle_columns(model_b, x, curvature, seed, samples).items():
            k = c.shape[0]
            pre_b.optimizer.record_inputs(layer_ids[i], inputs.numpy())
            pre_b.optimizer.record_output_grads(layer_ids[i], (np.sqrt(k) * c).reshape((-1,) + c.shape[2:]).numpy())
        nn.functional.cross_entropy(model_b(x), y).backward()
        pre_b.step()

        assert pre_a.steps == pre_b.steps == step + 1
        for (_, ma), (_, mb) in zip(pre_a.layers, pre_b.layers):
            for pa, pb in ((ma.weight, mb.weight), (ma.bias, mb.bias)):
                scale = pb.grad.abs().max()
                torch.testing.assert_close(pa.grad, pb.grad, rtol=0, atol=1e-10 * float(scale))
        with torch.no_grad():
            for pa, pb in zip(model_a.parameters(), model_b.parameters()):
                pa -= options["lr"] * pa.grad
                pb -= options["lr"] * pb.grad
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0], losses
    pre_a.close()
    pre_b.close()


def test_conv1d_curvature_needs_batched_inputs():
    """A Conv1d fed one unbatched [C, L] example (outputs [1, d]) is refused, handle unchanged."""
    torch.manual_seed(13)
    model = nn.Sequential(nn.Conv1d(2, 3, 2), nn.Flatten(0), nn.Unflatten(0, (1, 12)), nn.Linear(12, 3)).double()
    pre = KFACPreconditioner(model, curvature="kflr")
    x = torch.randn(2, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="batched"):
        pre.curvature_backward(model(x), "categorical")
    assert pre.optimizer.step_count == 0
    pre.close()


@pytest.mark.parametrize("curvature", ["kflr", "mc"])
def test_ekfac_and_tridiagonal_stay_refused(curvature):
    """inverse_strategy='ekfac' with KFLR/MC stays refused: the library takes EKFAC's per-example
    gradients only through kfac_layer_record_examples_*, which adds them to G as well (G would
    mix the empirical rows with the columns); tridiagonal=True needs paired rows for its links."""
    with pytest.raises(ValueError, match="per-example gradients"):
        KFACPreconditioner(_net(), curvature=curvature, inverse_strategy="ekfac")
    torch.manual_seed(14)
    mlp = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    with pytest.raises(ValueError, match="tridiagonal"):
        KFACPreconditioner(mlp, curvature=curvature, tridiagonal=True)
