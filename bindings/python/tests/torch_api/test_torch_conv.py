"""PyTorch's Conv2d, Conv1d and Linear layers through KFACPreconditioner, against the
independent references of references/conv.py and references/dense.py."""

import ctypes

import numpy as np
import pytest
import torch
from torch import nn

import libkfac as kfac
from libkfac import _lib
from libkfac.torch import KFACPreconditioner
from references import conv as cr
from references import dense as ref
from testutil import assert_close


# ---------------------------------------------------------------------------------------------
# PyTorch: Conv2d, Conv1d and Linear layers
# ---------------------------------------------------------------------------------------------

class SmallCNN(nn.Module):
    """Conv2d (padding) → Conv2d (stride 2, groups 2) → Conv1d (dilation, no bias) → Linear."""

    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 4, 3, padding=1)
        self.c2 = nn.Conv2d(4, 6, (3, 2), stride=2, padding=(1, 0), groups=2)
        self.c3 = nn.Conv1d(6, 4, 3, padding=2, dilation=2, bias=False)
        self.fc = nn.Linear(4 * 9, 3)

    def forward(self, x):  # x: [N, 3, 6, 7]
        h = torch.tanh(self.c1(x))  # [N, 4, 6, 7]
        h = torch.tanh(self.c2(h))  # [N, 6, 3, 3]
        h = torch.tanh(self.c3(h.flatten(2)))  # [N, 4, 9]
        return self.fc(h.flatten(1))


class CaptureAll:
    """Independent capture of every layer's input and output gradient (forward hooks and
    retain_grad), not the preconditioner's hooks."""

    def __init__(self, model):
        self.inputs, self.outputs = {}, {}
        self.handles = [
            module.register_forward_hook(self._hook(name))
            for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d))
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


def conv_of(module, input_size, approximation="kfc", input_group_size=0, output_group_size=0):
    """The reference description of a torch convolution (numeric padding only)."""
    if isinstance(module, nn.Conv1d):
        return cr.Conv(
            module.in_channels, module.out_channels, (1, module.kernel_size[0]), (1, input_size[-1]),
            stride=(1, module.stride[0]), padding=(0, module.padding[0]),
            dilation=(1, module.dilation[0]), groups=module.groups, bias=module.bias is not None,
            one_d=True, approximation=approximation, input_group_size=input_group_size,
            output_group_size=output_group_size)
    return cr.Conv(
        module.in_channels, module.out_channels, tuple(module.kernel_size), tuple(input_size[-2:]),
        stride=tuple(module.stride), padding=tuple(module.padding), dilation=tuple(module.dilation),
        groups=module.groups, bias=module.bias is not None, approximation=approximation,
        input_group_size=input_group_size, output_group_size=output_group_size)


def reference_directions(model, capture, damping, kl_clip, lr, examples, approximation="kfc",
                         input_group_size=0, output_group_size=0):
    """The first-step directions of every layer from the captured tensors: eigen strategy, first
    factors = batch factors, mean reduction (output gradients times the examples)."""
    directions, gradients, names = [], [], []
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d)):
            continue
        x = capture.inputs[name].double().numpy()
        g = capture.grads(name).double().numpy() * examples
        w = module.weight.grad.double().numpy()
        b = module.bias.grad.double().numpy() if module.bias is not None else None
        if isinstance(module, nn.Linear):
            A, G = ref.batch_factors(x.reshape(-1, module.in_features), g.reshape(-1, module.out_features),
                                     b is not None)
            A = A * cr.mask(cr.block_ids(module.in_features, input_group_size, b is not None))
            G = G * cr.mask(cr.block_ids(module.out_features, output_group_size, False))
            V = ref.theta_grad(w, b)
            uw, ub = ref.split_theta(ref.precondition_eigen(A, G, V, damping), b is not None)
        else:
            conv = conv_of(module, x.shape, approximation, input_group_size, output_group_size)
            uw, ub = cr.precondition(cr.expected_factors(x, g, conv), w, b, conv, damping)
        directions.append(np.concatenate([np.ravel(uw), [] if ub is None else ub]))
        gradients.append(np.concatenate([np.ravel(w), [] if b is None else b]))
        names.append(name)
    nu = ref.kl_scale(directions, gradients, kl_clip, lr)
    return {name: nu * u for name, u in zip(names, directions)}, nu


def flat_grad(module):
    parts = [module.weight.grad.double().numpy().ravel()]
    if module.bias is not None:
        parts.append(module.bias.grad.double().numpy())
    return np.concatenate(parts)


@pytest.mark.parametrize(
    "options",
    [dict(), dict(conv_approximation="sua"), dict(input_group_size=2, output_group_size=2),
     dict(conv_approximation="sua", input_group_size=1, output_group_size=3)],
    ids=["kfc", "sua", "kfc-grouped", "sua-grouped"],
)
@pytest.mark.parametrize("tdtype", ["float64", "float32"])
def test_torch_rewritten_grads_equal_reference(tdtype, options):
    tdtype = getattr(torch, tdtype)
    dtype = np.float64 if tdtype == torch.float64 else np.float32
    torch.manual_seed(0)
    model = SmallCNN().to(tdtype)
    damping, kl_clip, lr = 0.05, 1e-3, 0.1
    pre = KFACPreconditioner(model, damping=damping, kl_clip=kl_clip, lr=lr, **options)
    assert [name for name, _ in pre.layers] == ["c1", "c2", "c3", "fc"]
    assert not pre.registered  # the convolutions' input sizes are not known yet
    capture = CaptureAll(model)
    x = torch.randn(5, 3, 6, 7, dtype=tdtype)
    y = torch.randint(0, 3, (5,))
    loss = nn.functional.cross_entropy(model(x), y)  # mean over the 5 examples
    assert pre.registered
    loss.backward()
    expected, nu = reference_directions(
        model, capture, damping, kl_clip, lr, 5, options.get("conv_approximation", "kfc"),
        options.get("input_group_size", 0), options.get("output_group_size", 0))
    assert nu < 1
    pointers = [m.weight.grad.data_ptr() for _, m in pre.layers]
    pre.step()
    assert [m.weight.grad.data_ptr() for _, m in pre.layers] == pointers  # rewritten in place
    assert_close(pre.last_kl_scale, nu, dtype, scale=5.0)
    for name, module in pre.layers:
        assert_close(flat_grad(module), expected[name], dtype, scale=5.0 if dtype == np.float64 else 20.0)
    info = [pre.optimizer.layer_info(i) for i in range(4)]
    assert [i.kind for i in info] == [kfac.KFAC_LAYER_CONV2D] * 3 + [kfac.KFAC_LAYER_DENSE]
    assert [i.groups for i in info] == [1, 2, 1, 1]
    assert pre.input_sizes == {"c1": (6, 7), "c2": (6, 7), "c3": (9,)}
    capture.remove()
    pre.close()


@pytest.mark.parametrize("strategy", ["eigen", "cholesky"])
def test_torch_cnn_training_reduces_the_loss(strategy):
    torch.manual_seed(1)
    x = torch.randn(64, 3, 6, 7)
    teacher = SmallCNN()
    with torch.no_grad():
        y = teacher(x).argmax(1)
    model = SmallCNN()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = KFACPreconditioner(
        model, lr=lambda: optimizer.param_groups[0]["lr"], damping=0.03, kl_clip=0.01,
        inverse_update_period=3, inverse_strategy=strategy,
    )
    with torch.no_grad():
        initial = nn.functional.cross_entropy(model(x), y).item()
    assert not pre.registered  # no-grad passes do not register
    for _ in range(25):
        optimizer.zero_grad()
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        pre.step()
        optimizer.step()
    with torch.no_grad():
        final = nn.functional.cross_entropy(model(x), y).item()
    assert final < 0.5 * initial, (initial, final)
    assert pre.steps == 25
    pre.close()


def test_torch_input_shapes_register_at_construction():
    torch.manual_seed(2)
    model = SmallCNN().double()
    pre = KFACPreconditioner(model, input_shapes={"c1": (6, 7), model.c2: (6, 7), "c3": 9})
    assert pre.registered and pre.optimizer.num_layers == 4
    lazy = KFACPreconditioner(model, input_shapes={"c1": (6, 7)})
    assert not lazy.registered
    lazy.close()
    capture = CaptureAll(model)
    x = torch.randn(4, 3, 6, 7, dtype=torch.float64)
    model(x).pow(2).mean().backward()
    pre.step()
    assert pre.steps == 1
    capture.remove()
    pre.close()
    with pytest.raises(ValueError, match="spatial size"):
        KFACPreconditioner(model, input_shapes={"c1": 6})
    with pytest.raises(ValueError, match="not a preconditioned layer"):
        KFACPreconditioner(model, input_shapes={"c9": (6, 7)})
    with pytest.raises(ValueError, match="Linear"):
        KFACPreconditioner(model, input_shapes={"fc": (6, 7)})


def test_torch_different_spatial_size_raises_in_training_only():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(3 * 4 * 4, 2)).double()
    pre = KFACPreconditioner(model)
    model(torch.randn(2, 2, 6, 6, dtype=torch.float64)).sum().backward()
    pre.step()
    with torch.no_grad():
        model[0](torch.randn(1, 2, 9, 9, dtype=torch.float64))  # no gradients: any size
    model.eval()
    model[0](torch.randn(1, 2, 9, 9, dtype=torch.float64))
    model.train()
    with pytest.raises(ValueError, match=r"registered for 6×6 inputs.*got 9×9"):
        model[0](torch.randn(1, 2, 9, 9, dtype=torch.float64))
    pre.close()


def test_torch_layers_that_did_not_run_need_input_shapes():
    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv1d(2, 2, 3)
            self.b = nn.Conv1d(2, 2, 3)

        def forward(self, x, use_b=False):
            return (self.b if use_b else self.a)(x)

    model = Branchy().double()
    pre = KFACPreconditioner(model)
    with pytest.raises(ValueError, match=r"'b'.*input_shapes"):
        model(torch.randn(2, 2, 8, dtype=torch.float64))
    assert not pre.registered and pre.optimizer.num_layers == 0
    pre.close()
    pre = KFACPreconditioner(model, input_shapes={"b": 8})
    x = torch.randn(2, 2, 8, dtype=torch.float64)
    (model(x).sum() + model(x, use_b=True).sum()).backward()  # both branches get statistics
    assert pre.registered and pre.input_sizes == {"a": (8,), "b": (8,)}
    pre.step()
    pre.close()


def test_torch_step_before_any_forward_raises():
    model = SmallCNN()
    pre = KFACPreconditioner(model)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(kfac.KFACError) as info:
        pre.step()
    assert info.value.status == kfac.KFAC_ERROR_NO_STATISTICS
    assert all(torch.equal(p.grad, torch.ones_like(p)) for p in model.parameters())
    pre.close()


def test_torch_padding_strings_and_modes():
    torch.manual_seed(4)
    same = nn.Conv2d(2, 3, (3, 5), padding="same", dilation=(1, 2))
    numeric = nn.Conv2d(2, 3, (3, 5), padding=(1, 4), dilation=(1, 2))
    numeric.load_state_dict(same.state_dict())
    results = []
    for module in (same, numeric):
        model = nn.Sequential(module).double()
        pre = KFACPreconditioner(model, kl_clip=0, damping=0.1, input_shapes={"0": (5, 6)})
        torch.manual_seed(5)
        model(torch.randn(3, 2, 5, 6, dtype=torch.float64)).pow(2).mean().backward()
        pre.step()
        results.append(flat_grad(module))
        pre.close()
        module.zero_grad()
    np.testing.assert_array_equal(results[0], results[1])
    valid = nn.Sequential(nn.Conv1d(2, 2, 3, padding="valid"))
    KFACPreconditioner(valid, input_shapes={"0": 5}).close()
    with pytest.raises(ValueError, match="symmetric"):
        KFACPreconditioner(nn.Sequential(nn.Conv2d(2, 2, 2, padding="same")))
    reflect = nn.Sequential(nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), nn.Flatten(),
                            nn.Linear(2 * 4 * 4, 2))
    with pytest.raises(ValueError, match=r"padding_mode='reflect'.*skip_layers"):
        KFACPreconditioner(reflect)
    pre = KFACPreconditioner(reflect, skip_layers=["0"])
    assert [name for name, _ in pre.layers] == ["2"] and pre.registered
    pre.close()


def test_torch_per_module_options():
    torch.manual_seed(6)
    model = SmallCNN().double()
    pre = KFACPreconditioner(
        model, loss_reduction="sum", factor_update_period=0,
        conv_approximation={"c2": "sua"}, input_group_size={model.fc: 5}, output_group_size={"c1": 3},
    )
    capture = CaptureAll(model)
    x = torch.randn(3, 3, 6, 7, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    pre.optimizer.update_factors()
    specs = {
        "c1": dict(output_group_size=3), "c2": dict(approximation="sua"), "c3": dict(),
    }
    for index, (name, module) in enumerate(pre.layers):
        xs = capture.inputs[name].numpy()
        gs = capture.grads(name).numpy()
        if name == "fc":
            A, G = ref.batch_factors(xs, gs, True)
            A_lib, G_lib = pre.optimizer.factors(index)
            assert_close(A_lib, A * cr.mask(cr.block_ids(36, 5, True)), np.float64)
            assert_close(G_lib, G, np.float64)
            continue
        conv = conv_of(module, xs.shape, **specs[name])
        for group, (omega, gamma) in enumerate(cr.expected_factors(xs, gs, conv)):
            A_lib, G_lib = pre.optimizer.factors(index, group)
            assert_close(A_lib, omega, np.float64)
            assert_close(G_lib, gamma, np.float64)
    capture.remove()
    pre.close()
    with pytest.raises(ValueError, match="Linear"):
        KFACPreconditioner(model, conv_approximation={"fc": "sua"})
    with pytest.raises(ValueError, match="'kfc' or 'sua'"):
        KFACPreconditioner(model, conv_approximation="kfra")


def test_torch_state_dict_round_trip_before_the_first_forward():
    torch.manual_seed(7)
    model = SmallCNN().double()
    pre = KFACPreconditioner(model, damping=0.05, inverse_update_period=2)
    data = [(torch.randn(4, 3, 6, 7, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(5)]

    def train(model, pre, batches):
        grads = []
        for x, y in batches:
            model.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            pre.step()
            grads.append([p.grad.clone() for p in model.parameters()])
            with torch.no_grad():
                for p in model.parameters():
                    p -= 0.1 * p.grad
        return grads

    train(model, pre, data[:2])
    state = pre.state_dict()
    assert state["input_sizes"] == {"c1": (6, 7), "c2": (6, 7), "c3": (9,)}
    clone = SmallCNN().double()
    clone.load_state_dict(model.state_dict())
    expected = train(model, pre, data[2:])
    pre.close()
    resumed = KFACPreconditioner(clone)
    assert not resumed.registered
    resumed.load_state_dict(state)  # registers with the stored sizes, then loads
    assert resumed.registered and resumed.steps == 2
    got = train(clone, resumed, data[2:])
    for step_expected, step_got in zip(expected, got):
        for a, b in zip(step_expected, step_got):
            assert torch.equal(a, b)
    resumed.close()


def test_torch_channels_last_and_unbatched_inputs():
    torch.manual_seed(8)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, stride=2)).double()
    reference = KFACPreconditioner(model, kl_clip=0, damping=0.1, loss_reduction="sum")
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    model(x).pow(2).sum().backward()
    reference.step()
    expected = [flat_grad(m) for _, m in reference.layers]
    reference.close()
    model.zero_grad()
    model = model.to(memory_format=torch.channels_last)
    pre = KFACPreconditioner(model, kl_clip=0, damping=0.1, loss_reduction="sum")
    model(x.to(memory_format=torch.channels_last)).pow(2).sum().backward()
    assert not model[0].weight.grad.is_contiguous()
    pre.step()
    for (_, m), want in zip(pre.layers, expected):
        assert_close(flat_grad(m), want, np.float64)
    pre.close()
    # an unbatched [C, H, W] input is one example
    model = nn.Sequential(nn.Conv2d(3, 4, 3)).double()
    pre = KFACPreconditioner(model, factor_update_period=0, loss_reduction="sum")
    x = torch.randn(3, 5, 5, dtype=torch.float64)
    capture = CaptureAll(model)
    model(x).pow(2).sum().backward()
    pre.optimizer.update_factors()
    conv = conv_of(model[0], (5, 5))
    (omega, gamma), = cr.expected_factors(x[None].numpy(), capture.grads("0")[None].numpy(), conv)
    A, G = pre.optimizer.factors(0)
    assert_close(A, omega, np.float64)
    assert_close(G, gamma, np.float64)
    capture.remove()
    pre.close()


def test_torch_failed_registration_leaves_a_clean_handle():
    model = nn.Sequential(nn.Conv2d(2, 2, 3), nn.Flatten(), nn.Linear(8, 46341))
    pre = KFACPreconditioner(model, damping=0.25)
    for _ in range(2):  # the same error each time, nothing half-registered
        with pytest.raises(kfac.KFACError) as info:
            model(torch.randn(1, 2, 4, 4))
        assert info.value.status == kfac.KFAC_ERROR_SIZE_OVERFLOW
        assert not pre.registered and pre.optimizer.num_layers == 0
        assert pre.damping == 0.25
    pre.close()
