"""The adaptive step's hand-written forward-mode products over the model's fx trace
(``_traced_jvp``: chains, residual and nested models) against ``torch.func.jvp``, one tangent at
a time, and the adaptive step with them against the same step with ``torch.func``'s vmapped
products."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from libkfac.torch import KFACPreconditioner
from libkfac.torch import _adaptive
from libkfac.torch import _traced_jvp
from libkfac.torch._traced_jvp import traced_products

ACTIVATIONS = {"tanh": nn.Tanh, "sigmoid": nn.Sigmoid, "relu": nn.ReLU, "identity": nn.Identity}


def _chain(activation, bias, dtype, seed=3, sizes=(6, 9, 5, 4)):
    torch.manual_seed(seed)
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out, bias=bias))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers).to(dtype)


def _reference(model, x, params, tangents):
    """J·t_k by torch.func.jvp, one tangent per call, with every other parameter held fixed."""
    from torch.func import functional_call, jvp

    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]
    primals = tuple(p.detach() for p in params)
    outputs, products = None, []
    for k in range(tangents[0].shape[0]):
        out, product = jvp(lambda *v: functional_call(model, dict(zip(keys, v)), (x,)), primals,
                           tuple(t[k] for t in tangents))
        outputs = out
        products.append(product)
    return outputs, torch.stack(products)


def _check_against_reference(model, x, skip, dtype):
    """traced_products of 3 random tangents (without those of ``skip``'s parameters, which stay
    zero) against one torch.func.jvp per tangent; returns what the checks used."""
    params = list(model.parameters())
    if skip is not None:
        first = list(skip.parameters())
        params = [p for p in params if all(p is not q for q in first)]
    g = torch.Generator().manual_seed(7)
    tangents = [torch.randn((3,) + tuple(p.shape), dtype=dtype, generator=g) for p in params]
    with torch.no_grad():
        result = traced_products(model, (x,), params, tangents, set())
    assert result is not None
    outputs, products = result
    expected_outputs, expected = _reference(model, x, params, tangents)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert products.shape == expected.shape
    assert torch.allclose(outputs, expected_outputs, rtol=tol, atol=tol)
    scale = expected.abs().max()
    assert scale > 0.1  # the products are not trivially zero
    assert (products - expected).abs().max() <= tol * scale
    return params, tangents, products, expected, tol * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
@pytest.mark.parametrize("skip_first", [False, True], ids=["all", "first-fixed"])
def test_traced_products_equal_one_jvp_per_tangent(activation, bias, dtype, skip_first):
    model = _chain(activation, bias, dtype)
    x = torch.randn(11, 6, dtype=dtype, generator=torch.Generator().manual_seed(5))
    # skip_first: the first layer's parameters not preconditioned (tangent zero)
    _, _, products, _, _ = _check_against_reference(model, x, model[0] if skip_first else None, dtype)
    # A wrong derivative (e.g. of the pre-activation instead of the output) is far off.
    assert not torch.allclose(products, torch.zeros_like(products))


def _conv_chain(kind, bias, dtype, seed=4):
    """Convolutional chains in the shapes of the benchmark's CNNs: flat inputs unflattened, strides,
    padding, dilation, a grouped convolution, activations between, flattened into a Linear."""
    torch.manual_seed(seed)
    if kind == "conv1d":
        layers = [nn.Unflatten(1, (2, 12)),
                  nn.Conv1d(2, 6, 3, stride=2, padding=1, bias=bias), nn.ReLU(),       # [N, 6, 6]
                  nn.Conv1d(6, 4, 2, dilation=2, groups=2, bias=bias), nn.Tanh(),      # [N, 4, 4]
                  nn.Flatten(), nn.Linear(16, 3, bias=bias)]
    else:
        layers = [nn.Unflatten(1, (1, 6, 6)),
                  nn.Conv2d(1, 4, 3, padding=1, bias=bias), nn.Sigmoid(),              # [N, 4, 6, 6]
                  nn.Conv2d(4, 6, (3, 2), stride=(2, 1), groups=2, bias=bias), nn.Tanh(),  # [N, 6, 2, 5]
                  nn.Flatten(), nn.Linear(60, 3, bias=bias)]
    return nn.Sequential(*layers).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
@pytest.mark.parametrize("kind", ["conv1d", "conv2d"])
@pytest.mark.parametrize("skip_first", [False, True], ids=["all", "first-fixed"])
def test_conv_traced_products_equal_one_jvp_per_tangent(kind, bias, dtype, skip_first):
    model = _conv_chain(kind, bias, dtype)
    x = torch.randn(7, 24 if kind == "conv1d" else 36, dtype=dtype, generator=torch.Generator().manual_seed(5))
    # skip_first: the first convolution's parameters not preconditioned (tangent zero)
    params, tangents, _, expected, tol = _check_against_reference(model, x, model[1] if skip_first else None, dtype)
    # Each tangent's own product: swapping two tangents' kernels changes the products.
    swapped = [t.flip(0) for t in tangents]
    with torch.no_grad():
        _, other = traced_products(model, (x,), params, swapped, set())
    assert (other - expected.flip(0)).abs().max() <= tol
    assert (other - expected).abs().max() > 1e-3 * expected.abs().max()


class _Residual(nn.Module):
    """The benchmark's MNIST-1D MLP shape, with the other operations the trace handles: a nested
    module, functional activations, a sum with a number, a difference, view through size(0)."""

    def __init__(self, dtype, bias=True):
        super().__init__()
        torch.manual_seed(6)
        self.first = nn.Linear(6, 8, bias=bias)
        self.block = nn.Sequential(nn.Linear(8, 8, bias=bias), nn.Tanh())
        self.second = nn.Linear(8, 8, bias=bias)
        self.out = nn.Linear(8, 3, bias=bias)
        self.to(dtype)

    def forward(self, x):
        h = torch.relu(self.first(x))
        h = h + self.block(h)
        h = torch.sigmoid(self.second(h)) - 0.5 + h
        h = F.relu(h.view(h.size(0), 2, 4)).flatten(1)
        return self.out(h - torch.tanh(h))


class _ResidualConv(nn.Module):
    """A residual Conv1d block between two convolutions, flattened into a Linear layer."""

    def __init__(self, dtype):
        super().__init__()
        torch.manual_seed(8)
        self.stem = nn.Conv1d(2, 4, 3, stride=2, padding=1)
        self.body = nn.Conv1d(4, 4, 3, padding=1, groups=2)
        self.head = nn.Linear(24, 3)
        self.to(dtype)

    def forward(self, x):
        h = self.stem(x.view(x.shape[0], 2, 12)).relu()
        h = h + torch.tanh(self.body(h))
        return self.head(torch.flatten(h, 1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
@pytest.mark.parametrize("kind", ["residual", "residual-no-bias", "residual-conv"])
def test_graph_products_equal_one_jvp_per_tangent(kind, dtype):
    model = _ResidualConv(dtype) if kind == "residual-conv" else _Residual(dtype, bias=kind == "residual")
    x = torch.randn(9, 24 if kind == "residual-conv" else 6, dtype=dtype, generator=torch.Generator().manual_seed(5))
    params, tangents, products, expected, tol = _check_against_reference(model, x, None, dtype)
    swapped = [t.flip(0) for t in tangents]
    with torch.no_grad():
        _, other = traced_products(model, (x,), params, swapped, set())
    assert (other - expected.flip(0)).abs().max() <= tol
    assert (other - expected).abs().max() > 1e-3 * expected.abs().max()


def test_traced_products_declines_what_it_does_not_handle():
    x = torch.randn(4, 6)
    model = _chain("tanh", True, torch.float32)
    params = list(model.parameters())
    tangents = [torch.zeros((1,) + tuple(p.shape)) for p in params]
    zeros = lambda ps: [torch.zeros((1,) + tuple(p.shape)) for p in ps]

    class Scaled(nn.Module):  # a product of activations is not a case handled here
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            h = self.a(x)
            return h * h

    scaled = Scaled()
    assert traced_products(scaled, (x,), list(scaled.parameters()), zeros(scaled.parameters()), set()) is None

    class Branching(nn.Module):  # data-dependent control flow: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)

        def forward(self, x):
            return self.a(x) if x.sum() > 0 else -self.a(x)

    branching = Branching()
    assert traced_products(branching, (x,), list(branching.parameters()), zeros(branching.parameters()),
                           set()) is None

    class Functional(nn.Module):  # a parameter read outside a Linear module
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.randn(3, 6))

        def forward(self, x):
            return F.linear(x, self.w)

    functional = Functional()
    assert traced_products(functional, (x,), [functional.w], zeros([functional.w]), set()) is None

    class Switch(nn.Module):  # Python state read in forward, changed after the trace
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(6, 3)
            self.negate = False

        def forward(self, x):
            return -self.a(x) if self.negate else self.a(x)

    switch = Switch()
    switch_params = list(switch.parameters())
    _traced_jvp._trace(switch, list(switch.modules()))  # traced with negate = False, not yet checked
    switch.negate = True
    assert traced_products(switch, (x,), switch_params, zeros(switch_params), set()) is None  # the check
    assert traced_products(switch, (x,), switch_params, zeros(switch_params), set()) is None  # kept off

    dropout = nn.Sequential(nn.Linear(6, 5), nn.Dropout(0.5), nn.Linear(5, 2))
    dropout_params = list(dropout.parameters())
    assert traced_products(dropout, (x,), dropout_params, zeros(dropout_params), set()) is None  # training
    dropout.eval()  # traced again: dropout is the identity
    assert traced_products(dropout, (x,), dropout_params, zeros(dropout_params), set()) is not None

    # A submodule replaced after the trace: traced again, and the products are the new model's.
    replaced = _Residual(torch.float64)
    xr = torch.randn(5, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    _check_against_reference(replaced, xr, None, torch.float64)
    replaced.block = nn.Sequential(nn.Linear(8, 8), nn.Sigmoid()).to(torch.float64)
    _check_against_reference(replaced, xr, None, torch.float64)

    assert traced_products(model, (x.unsqueeze(0),), params, tangents, set()) is None  # [1, N, in]
    assert traced_products(model, (x, x), params, tangents, set()) is None
    with_norm = nn.Sequential(nn.Linear(6, 5), nn.LayerNorm(5))
    norm_params = list(with_norm[0].parameters())
    assert traced_products(with_norm, (x,), norm_params, zeros(norm_params), set()) is None
    # A user hook may change what a module computes, on any module of the model.
    handle = model[1].register_forward_hook(lambda m, i, o: o * 2)
    assert traced_products(model, (x,), params, tangents, set()) is None
    handle.remove()
    # ...but hooks the caller names as its own do not (the caller pauses them; here one that
    # changes nothing, since the first use compares the trace with the model's forward).
    handle = model[1].register_forward_hook(lambda m, i, o: None)
    assert traced_products(model, (x,), params, tangents, set()) is None
    assert traced_products(model, (x,), params, tangents, {handle.id}) is not None
    handle.remove()
    residual = _Residual(torch.float32)
    residual_params = list(residual.parameters())
    handle = residual.block.register_forward_pre_hook(lambda m, i: None)
    assert traced_products(residual, (x,), residual_params, zeros(residual_params), set()) is None
    handle.remove()
    assert traced_products(residual, (x,), residual_params, zeros(residual_params), set()) is not None
    # Convolutions with a padding mode other than zeros, and a Linear layer on [N, C, L] inputs.
    circular = nn.Sequential(nn.Conv1d(2, 3, 3, padding=1, padding_mode="circular"))
    circular_params = list(circular.parameters())
    assert traced_products(circular, (torch.randn(4, 2, 5),), circular_params, zeros(circular_params), set()) is None
    plain = nn.Sequential(nn.Conv1d(2, 3, 3))
    plain_params = list(plain.parameters())
    assert traced_products(plain, (torch.randn(4, 2, 5),), plain_params, zeros(plain_params), set()) is not None
    assert traced_products(plain, (torch.randn(2, 5),), plain_params, zeros(plain_params), set()) is None  # [C, L]
    per_position = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Linear(3, 2))
    pp_params = list(per_position.parameters())
    assert traced_products(per_position, (torch.randn(4, 2, 5),), pp_params, zeros(pp_params), set()) is None
    # A parameter outside the model's Linear layers.
    stray = nn.Parameter(torch.zeros(3))
    assert traced_products(model, (x,), params + [stray], tangents + [torch.zeros(1, 3)], set()) is None


@pytest.mark.parametrize("activation", ["sigmoid", "relu", "tanh", "conv1d", "conv2d", "residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_adaptive_step_with_traced_products_equals_torch_func(activation, dtype, monkeypatch):
    """Twin models, the same six adaptive steps with γ steps every 2 (three candidates and δ₀):
    one with the written-out products, one with torch.func's vmapped jvp. The same choices, and
    α, μ, M(δ), the losses, ρ, λ, γ and the parameters to rounding. ``conv1d``/``conv2d``: the
    convolutional chains (preconditioned convolutions and Linear layer); ``residual``: the
    residual model with a nested block."""
    g = torch.Generator().manual_seed(11)
    if activation == "residual":
        x = torch.randn(40, 6, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (40,), generator=g)
        twins = [_Residual(dtype), _Residual(dtype)]
    elif activation.startswith("conv"):
        x = torch.randn(40, 24 if activation == "conv1d" else 36, generator=g, dtype=dtype)
        y = torch.randint(0, 3, (40,), generator=g)
        twins = [_conv_chain(activation, True, dtype), _conv_chain(activation, True, dtype)]
    else:
        x = torch.randn(40, 6, generator=g, dtype=dtype)
        y = torch.randint(0, 4, (40,), generator=g)
        twins = [_chain(activation, True, dtype), _chain(activation, True, dtype)]
    settings = dict(damping=1e-2, kl_clip=0, inverse_update_period=2, lm_interval=1, factor_damping=1e-2,
                    factor_damping_period=2, factor_damping_decay=0.5, factor_damping_ratio=1e300)
    pres = [KFACPreconditioner(m, **settings) for m in twins]
    pres[1]._use_traced_products = False
    used = []

    def counting(*args):
        result = traced_products(*args)
        used.append(result is not None)
        return result

    monkeypatch.setattr(_adaptive, "traced_products", counting)
    tol = 1e-4 if dtype == torch.float32 else 1e-10
    primal = []  # the first twin's primal layer evaluations per step
    for k in range(6):
        results = []
        for model, pre in zip(twins, pres):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            before = _traced_jvp.primal_layer_evaluations
            results.append(pre.adaptive_step(x, lambda out: F.cross_entropy(out, y), every_step_loss=True))
            if pre is pres[0]:
                primal.append(_traced_jvp.primal_layer_evaluations - before)
        a, b = results
        assert (a.chosen, a.candidates) == (b.chosen, b.candidates), k
        assert a.candidates == (3 if k % 2 == 0 else 1), k
        for field in ("alpha", "mu", "predicted_change", "loss_before", "loss_after", "rho", "damping",
                      "factor_damping"):
            u, v = getattr(a, field), getattr(b, field)
            assert abs(u - v) <= tol * max(1.0, abs(v)), (k, field, u, v)
    assert used == [True] * 6  # the first twin's products came from the chain, every step
    # From the second step on, the training forward pass's layer inputs and output are used: a
    # chain computes no primal layer again; the residual model only the layers whose outputs
    # feed a sum before an activation (``block``'s and ``second``'s).
    layers = sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in twins[0].modules())
    assert primal[0] == layers
    assert primal[1:] == [2 if activation == "residual" else 0] * 5, primal
    for p, q in zip(twins[0].parameters(), twins[1].parameters()):
        assert torch.allclose(p, q, rtol=tol, atol=tol)
    for pre in pres:
        pre.close()


def _twin_steps(change, steps=3):
    """Twin conv1d chains, one with the written-out products (and the kept forward values), one
    with torch.func; ``change(model, x)`` runs between each twin's training pass and its adaptive
    step and returns the batch to give it. Returns both twins' results and the first twin's
    primal layer evaluations per step."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(30, 24, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=g)
    twins = [_conv_chain("conv1d", True, torch.float64), _conv_chain("conv1d", True, torch.float64)]
    pres = [KFACPreconditioner(m, damping=1e-2, kl_clip=0, inverse_update_period=1, lm_interval=1) for m in twins]
    pres[1]._use_traced_products = False
    results, primal = ([], []), []
    for _ in range(steps):
        for i, (model, pre) in enumerate(zip(twins, pres)):
            model.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            batch = change(model, x)
            before = _traced_jvp.primal_layer_evaluations
            results[i].append(pre.adaptive_step(batch, lambda out: F.cross_entropy(out, y)))
            if i == 0:
                primal.append(_traced_jvp.primal_layer_evaluations - before)
    return results, primal


def _same(a, b):
    for u, v in zip(a, b):
        for field in ("alpha", "mu", "predicted_change", "loss_before", "loss_after", "rho", "damping"):
            x, y = getattr(u, field), getattr(v, field)
            assert abs(x - y) <= 1e-10 * max(1.0, abs(y)), (field, x, y)


def test_kept_forward_values_are_used_only_while_they_are_current():
    """A parameter changed in place after the training pass, another input tensor (equal values),
    a switch to eval() and back: the kept values are not used (the layers' primal values are
    computed again) and the steps equal torch.func's; untouched, they are used."""
    (a, b), primal = _twin_steps(lambda model, x: x)
    _same(a, b)
    assert primal == [3, 0, 0]

    def nudge(model, x):
        with torch.no_grad():
            model[3].weight.mul_(1.01)
        return x

    (a, b), primal = _twin_steps(nudge)
    _same(a, b)
    assert primal == [3, 3, 3]
    (a, b), primal = _twin_steps(lambda model, x: x.clone())
    _same(a, b)
    assert primal == [3, 3, 3]

    def toggle(model, x):
        model.eval()
        model.train()
        return x

    (a, b), primal = _twin_steps(toggle)  # same flags again: still current
    _same(a, b)
    assert primal == [3, 0, 0]


def test_kept_forward_values_refuse_inputs_changed_in_place_and_copies_keep_nothing():
    import copy

    x = torch.randn(10, 24, dtype=torch.float64)
    model = _conv_chain("conv1d", True, torch.float64)
    pre = KFACPreconditioner(model, kl_clip=0)
    clone = copy.deepcopy(model)  # carries the hooks (closures over pre)
    pre._keep_forward_values = True
    out = model(x)
    kept = pre._forward_values
    assert kept is not None and torch.equal(kept.output, out.detach())
    assert set(kept.inputs) == {model[1], model[3], model[6]}
    assert kept.values_for(model, (x,)) is not None
    with torch.no_grad():
        kept.inputs[model[3]].add_(0.0)  # an in-place change, even of nothing, bumps the version
    assert kept.values_for(model, (x,)) is None
    # The deep copy's forward passes keep nothing here.
    model(x)
    kept = pre._forward_values
    clone(x + 1)
    assert pre._forward_values is kept
    # No grad or eval mode: a pass that is not a training pass keeps nothing (and drops nothing).
    with torch.no_grad():
        model(x)
    assert pre._forward_values is kept
    pre.close()


def test_nothing_is_kept_for_a_model_the_products_decline():
    """A user hook makes the written-out products decline (torch.func computes them): the
    training passes' values are then not kept (they would only hold memory)."""
    g = torch.Generator().manual_seed(13)
    x = torch.randn(20, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (20,), generator=g)
    model = _chain("tanh", True, torch.float64)
    model[1].register_forward_hook(lambda module, args, output: None)
    pre = KFACPreconditioner(model, kl_clip=0, damping=1e-2)
    for _ in range(2):
        model.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        pre.adaptive_step(x, lambda out: F.cross_entropy(out, y))
        assert not pre._keep_forward_values
    model(x)
    assert pre._forward_values is None
    pre.close()
