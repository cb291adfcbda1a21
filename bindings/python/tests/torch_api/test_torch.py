"""The PyTorch integration against the numpy reference, and a short training run."""

import copy

import numpy as np
import pytest

import torch
from torch import nn

import libkfac as kfac
from references import dense as ref
from libkfac.torch import KFACPreconditioner
from testutil import assert_close

TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


class Capture:
    """Independent capture of every Linear's input and output gradient (forward hooks and
    retain_grad, not the preconditioner's hooks)."""

    def __init__(self, model):
        self.inputs, self.outputs = {}, {}
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if isinstance(module, nn.Linear)
        ]

    def _hook(self, name):
        def hook(module, args, output):
            self.inputs[name] = args[0].detach().clone()
            output.retain_grad()
            self.outputs[name] = output

        return hook

    def grads(self, name):
        return self.outputs[name].grad.detach().clone()

    def remove(self):
        for handle in self.handles:
            handle.remove()


def _mlp(dtype, seed=0, bias=True):
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(5, 7, bias=bias), nn.Tanh(), nn.Linear(7, 6), nn.Tanh(), nn.Linear(6, 3)
    ).to(dtype)


def _reference_directions(model, capture, damping, kl_clip, lr, reduction_rows):
    """The first-step K-FAC directions of every Linear from the captured tensors (eigen
    strategy: first factors = batch factors; mean reduction: gradients times the rows)."""
    directions, gradients = [], []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        bias = module.bias is not None
        x = capture.inputs[name].double().numpy().reshape(-1, module.in_features)
        g = capture.grads(name).double().numpy().reshape(-1, module.out_features) * reduction_rows
        A, G = ref.batch_factors(x, g, bias)
        V = ref.theta_grad(
            module.weight.grad.double().numpy(),
            module.bias.grad.double().numpy() if bias else None,
        )
        directions.append(ref.precondition_eigen(A, G, V, damping))
        gradients.append(V)
    nu = ref.kl_scale(directions, gradients, kl_clip, lr)
    return [nu * u for u in directions], nu


@pytest.mark.parametrize("tdtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_rewritten_grads_equal_reference(tdtype, bias):
    dtype = TORCH_TO_NUMPY[tdtype]
    model = _mlp(tdtype, bias=bias)
    damping, kl_clip, lr = 0.05, 1e-3, 0.1
    pre = KFACPreconditioner(model, damping=damping, kl_clip=kl_clip, lr=lr)
    assert pre.optimizer.dtype == np.dtype(dtype)
    assert [name for name, _ in pre.layers] == ["0", "2", "4"]
    capture = Capture(model)
    torch.manual_seed(1)
    x = torch.randn(16, 5, dtype=tdtype)
    y = torch.randn(16, 3, dtype=tdtype)
    loss = nn.functional.mse_loss(model(x), y)  # mean over 16·3 elements: rows = 16
    loss.backward()
    expected, nu = _reference_directions(model, capture, damping, kl_clip, lr, 16)
    grad_ids = [module.weight.grad.data_ptr() for _, module in pre.layers]
    pre.step()
    assert [module.weight.grad.data_ptr() for _, module in pre.layers] == grad_ids  # in place
    assert_close(pre.last_kl_scale, nu, dtype)
    for (name, module), u in zip(pre.layers, expected):
        got = ref.theta_grad(
            module.weight.grad.double().numpy(),
            module.bias.grad.double().numpy() if module.bias is not None else None,
        )
        assert_close(got, u, dtype, scale=5.0)
    assert pre.steps == 1
    capture.remove()
    pre.close()


def test_sequence_inputs_are_flattened_to_rows():
    """[N, T, in] inputs: N·T rows, and a mean over all of them."""
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 2)).double()
    pre = KFACPreconditioner(model, damping=0.1, kl_clip=0)
    capture = Capture(model)
    x = torch.randn(3, 6, 4, dtype=torch.float64)
    loss = model(x).pow(2).mean() * 2  # a mean over N·T·2 elements
    loss.backward()
    expected, _ = _reference_directions(model, capture, 0.1, 0, 0.1, 18)
    pre.step()
    for (name, module), u in zip(pre.layers, expected):
        got = ref.theta_grad(module.weight.grad.numpy(), module.bias.grad.numpy())
        assert_close(got, u, np.float64)
    pre.close()


def test_factors_seen_by_the_library_match_captured_tensors():
    model = _mlp(torch.float64)
    pre = KFACPreconditioner(model, loss_reduction="sum", factor_update_period=0)
    capture = Capture(model)
    x = torch.randn(10, 5, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    pre.optimizer.update_factors()
    for index, (name, module) in enumerate(pre.layers):
        A, G = pre.optimizer.factors(index)
        A_ref, G_ref = ref.batch_factors(
            capture.inputs[name].numpy(), capture.grads(name).numpy(), True)
        assert_close(A, A_ref, np.float64)
        assert_close(G, G_ref, np.float64)
    pre.close()


def test_no_recording_in_eval_mode_or_without_grad():
    model = _mlp(torch.float64)
    pre = KFACPreconditioner(model, factor_update_period=0)
    x = torch.randn(4, 5, dtype=torch.float64)
    with torch.no_grad():
        model(x)
    model.eval()
    model(x).sum().backward()
    model.train()
    with pytest.raises(kfac.KFACError) as info:
        pre.optimizer.update_inverses()  # nothing was recorded, so nothing to invert
    assert info.value.status == kfac.KFAC_ERROR_NO_STATISTICS
    pre.optimizer.update_factors()
    with pytest.raises(kfac.KFACError) as info:
        pre.optimizer.factors(0)
    assert info.value.status == kfac.KFAC_ERROR_NO_STATISTICS
    pre.close()


def test_recording_follows_wants_statistics():
    """With Tf = 2 nothing is recorded on step 1: afterwards nothing is pending."""
    model = _mlp(torch.float64)
    pre = KFACPreconditioner(model, factor_update_period=2, factor_decay=0.5)
    model(torch.randn(8, 5, dtype=torch.float64)).pow(2).mean().backward()
    pre.step()  # k = 0: folds
    A0, G0 = pre.optimizer.factors(0)
    model.zero_grad()
    assert not pre.optimizer.wants_statistics
    model(torch.randn(8, 5, dtype=torch.float64)).pow(2).mean().backward()
    pre.step()  # k = 1: not a factor-update step
    pre.optimizer.update_factors()  # folds whatever is pending: nothing
    A1, G1 = pre.optimizer.factors(0)
    np.testing.assert_array_equal(A0, A1)
    np.testing.assert_array_equal(G0, G1)
    pre.close()


def test_step_before_backward_raises_and_keeps_grads():
    model = _mlp(torch.float64)
    pre = KFACPreconditioner(model)
    for _, module in pre.layers:
        module.weight.grad = torch.ones_like(module.weight)
    with pytest.raises(kfac.KFACError) as info:
        pre.step()
    assert info.value.status == kfac.KFAC_ERROR_NO_STATISTICS
    for _, module in pre.layers:
        assert torch.equal(module.weight.grad, torch.ones_like(module.weight))
    pre.close()


def test_non_contiguous_grads_are_rewritten():
    model = _mlp(torch.float64)
    pre = KFACPreconditioner(model, kl_clip=0, damping=0.1)
    capture = Capture(model)
    x = torch.randn(12, 5, dtype=torch.float64)
    model(x).pow(2).mean().backward()
    expected, _ = _reference_directions(model, capture, 0.1, 0, 0.1, 12)
    module = pre.layers[1][1]
    module.weight.grad = module.weight.grad.t().contiguous().t()  # same values, column-major
    assert not module.weight.grad.is_contiguous()
    pre.step()
    for (name, m), u in zip(pre.layers, expected):
        got = ref.theta_grad(m.weight.grad.numpy(), m.bias.grad.numpy())
        assert_close(got, u, np.float64)
    pre.close()


def test_skip_layers_and_settable_parameters():
    model = _mlp(torch.float32)
    pre = KFACPreconditioner(model, skip_layers=["2"])
    assert [name for name, _ in pre.layers] == ["0", "4"]
    pre.close()
    pre = KFACPreconditioner(model, skip_layers=[model[4]])
    assert [name for name, _ in pre.layers] == ["0", "2"]
    pre.lr = 0.5
    assert pre.lr == 0.5 and pre.optimizer.learning_rate == 0.5
    pre.damping = 0.02
    pre.inverse_strategy = "cholesky"
    pre.kl_clip = 0.0
    assert pre.optimizer.damping == 0.02 and pre.optimizer.inverse_strategy == "cholesky"
    assert pre.loss_reduction == "mean"
    rate = {"lr": 0.25}
    pre.lr = lambda: rate["lr"]
    assert pre.optimizer.learning_rate == 0.25
    rate["lr"] = 0.125
    model(torch.randn(4, 5)).sum().backward()
    pre.step()
    assert pre.optimizer.learning_rate == 0.125
    pre.close()
    with pytest.raises(ValueError):
        KFACPreconditioner(nn.Sequential(nn.Tanh()))


def test_state_dict_round_trip_gives_identical_steps():
    model = _mlp(torch.float64)
    pre = KFACPreconditioner(model, damping=0.05, inverse_update_period=2)
    torch.manual_seed(5)
    data = [(torch.randn(8, 5, dtype=torch.float64), torch.randn(8, 3, dtype=torch.float64))
            for _ in range(6)]

    def train(model, pre, batches):
        grads = []
        for x, y in batches:
            model.zero_grad()
            nn.functional.mse_loss(model(x), y).backward()
            pre.step()
            grads.append([p.grad.clone() for p in model.parameters()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        return grads

    train(model, pre, data[:3])
    state = pre.state_dict()
    clone = _mlp(torch.float64, seed=123)
    clone.load_state_dict(copy.deepcopy(model.state_dict()))
    expected = train(model, pre, data[3:])
    pre.close()

    # a fresh preconditioner on a copy of the model, resumed from the state
    resumed = KFACPreconditioner(clone)
    resumed.load_state_dict(state)
    assert resumed.damping == 0.05 and resumed.steps == 3
    got = train(clone, resumed, data[3:])
    for step_expected, step_got in zip(expected, got):
        for a, b in zip(step_expected, step_got):
            assert torch.equal(a, b)
    resumed.close()


def test_remove_hooks_stops_recording():
    model = _mlp(torch.float64)
    pre = KFACPreconditioner(model, factor_update_period=0)
    pre.remove_hooks()
    model(torch.randn(4, 5, dtype=torch.float64)).sum().backward()
    pre.optimizer.update_factors()
    with pytest.raises(kfac.KFACError):
        pre.optimizer.factors(0)
    pre.close()


def test_mixed_dtypes_need_an_explicit_dtype():
    """float32 and float64 layers in one model: dtype=float64 works through copies."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(3, 4), nn.Linear(4, 2).double())
    with pytest.raises(TypeError):
        KFACPreconditioner(model)
    pre = KFACPreconditioner(model, dtype=torch.float64, kl_clip=0, damping=0.1)
    capture = Capture(model)
    x = torch.randn(6, 3)
    model[1](model[0](x).double()).pow(2).mean().backward()
    expected, _ = _reference_directions(model, capture, 0.1, 0, 0.1, 6)
    pre.step()
    assert model[0].weight.grad.dtype == torch.float32
    for (name, module), u in zip(pre.layers, expected):
        got = ref.theta_grad(module.weight.grad.double().numpy(), module.bias.grad.double().numpy())
        assert_close(got, u, np.float32)
    pre.close()


@pytest.mark.parametrize("strategy", ["eigen", "cholesky"])
def test_training_reduces_the_loss(strategy):
    """A few K-FAC + SGD steps on a toy regression reduce the loss substantially."""
    torch.manual_seed(0)
    x = torch.randn(256, 5)
    true_w = torch.randn(5, 3)
    y = torch.tanh(x @ true_w) + 0.01 * torch.randn(256, 3)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.2)
    pre = KFACPreconditioner(
        model, lr=lambda: optimizer.param_groups[0]["lr"], damping=0.01, kl_clip=0.01,
        inverse_update_period=5, inverse_strategy=strategy,
    )
    with torch.no_grad():
        initial = nn.functional.mse_loss(model(x), y).item()
    for _ in range(40):
        optimizer.zero_grad()
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        pre.step()
        optimizer.step()
    with torch.no_grad():
        final = nn.functional.mse_loss(model(x), y).item()
    assert final < 0.2 * initial, (initial, final)
    assert pre.steps == 40
    pre.close()


def test_recorded_tensors_are_passed_without_copies():
    """Contiguous tensors of the optimizer's dtype reach the library by their own address."""
    model = _mlp(torch.float32)
    pre = KFACPreconditioner(model)
    seen = []
    original = pre.optimizer.handle.record

    def spy(side, layer, address, rows):
        seen.append((side, layer, address, rows))
        original(side, layer, address, rows)

    pre.optimizer.handle.record = spy
    grads = {}
    model[4].register_full_backward_hook(lambda m, gi, go: grads.update(out=go[0].data_ptr()))
    x = torch.randn(9, 5)
    model(x).pow(2).mean().backward()
    assert (0, 0, x.data_ptr(), 9) in seen  # the first layer's input: the caller's tensor
    assert (1, 2, grads["out"], 9) in seen  # the last layer's output gradient
    assert sorted((side, layer) for side, layer, _, _ in seen) == [
        (0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    pre.close()
