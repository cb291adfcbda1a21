"""Forward-mode products of a network of ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers,
elementwise activations, sums and reshapes, for several parameter tangents at once, written out
by hand over the model's ``torch.fx`` trace.

:meth:`KFACPreconditioner.adaptive_step` needs ``J·D_k`` (the derivative of the outputs along
each candidate direction, and along δ₀). ``torch.func.vmap`` over ``torch.func.jvp`` over
``torch.func.functional_call`` computes them for any model, but on the small networks where the
adaptive mode is used its dispatch costs several forward passes (measured on the convergence
benchmark's ae-digits autoencoder at batch 256: about 9 forward passes' time for two tangents).
This module does the same arithmetic directly: one primal pass and, per layer, one batched
product for the tangents,

    Linear  s = x Wᵀ + b:      ṡ_k = ẋ_k Wᵀ + x Ẇ_kᵀ + ḃ_k
    Conv    s = W ⋆ x + b:     ṡ_k = W ⋆ ẋ_k + Ẇ_k ⋆ x + ḃ_k
    tanh    y = tanh(s):       ẏ_k = ṡ_k ⊙ (1 − y²)
    sigmoid y = σ(s):          ẏ_k = ṡ_k ⊙ y ⊙ (1 − y)
    ReLU    y = max(s, 0):     ẏ_k = ṡ_k ⊙ [s > 0]
    sum     y = u ± v (or ± a number):  ẏ_k = u̇_k ± v̇_k
    reshape (Flatten, Unflatten, view, reshape, flatten):  the same reshape of every ẏ_k

(ẋ is zero for the network's input). For a convolution the tangents' W ⋆ ẋ_k run as one
convolution of the N·K stacked inputs, and the Ẇ_k ⋆ x as one convolution of x with the K
kernels stacked along the output channels (group by group, so grouped convolutions keep their
channel mapping).

The graph is the model's ``torch.fx.symbolic_trace`` (``nn.Sequential`` chains and models whose
``forward`` only composes the operations above, e.g. residual connections), traced once per
model and checked once against ``model(*args)``; it is traced again when a module's ``training``
flag changes or a submodule is replaced. The trace assumes what ``torch.fx`` assumes: ``forward`` has no data-dependent
control flow and reads no Python state that changes between calls. :func:`traced_products`
returns ``None`` for anything else (other modules or operations — dropout only in evaluation mode —, a model ``torch.fx`` cannot
trace, padding modes other than zeros, user hooks anywhere in the model, a Linear layer on inputs
that are not ``[N, features]``, a convolution on unbatched inputs, a parameter used outside a
Linear or convolution module), and the caller falls back to ``torch.func``.
"""

from __future__ import annotations

import operator
import weakref
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import fx, nn
from torch.nn.modules import module as _module

_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)
_RESHAPES = (nn.Flatten, nn.Unflatten)
_CONV = {nn.Conv1d: torch.nn.functional.conv1d, nn.Conv2d: torch.nn.functional.conv2d}
_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2}
_F = torch.nn.functional
_ELEMENTWISE = {torch.relu: "relu", _F.relu: "relu", torch.tanh: "tanh", _F.tanh: "tanh",
                torch.sigmoid: "sigmoid", _F.sigmoid: "sigmoid"}
_SUMS = {operator.add: 1, torch.add: 1, operator.sub: -1, torch.sub: -1}
_RESHAPE_FUNCTIONS = (torch.flatten, torch.reshape)
_RESHAPE_METHODS = ("view", "reshape", "flatten", "unflatten")
_ELEMENTWISE_METHODS = ("relu", "tanh", "sigmoid")
_ELEMENTWISE_MODULES = {nn.Tanh: "tanh", nn.Sigmoid: "sigmoid", nn.ReLU: "relu"}


class _Trace:
    """A model's fx graph (its nodes in order), the training flags it was traced under, the
    module each call_module node calls, the ids of the weights and biases of the Linear and
    convolution modules it calls, and whether its output was checked against the model's own
    forward. Worked out once per trace, so that a step only runs the nodes."""

    def __init__(self, graph: Optional[fx.Graph], flags: tuple, model: nn.Module):
        self.flags = flags
        self.checked = False
        self.nodes = None if graph is None else list(graph.nodes)
        named = dict(model.named_modules())
        self.called = {n: named.get(n.target) for n in self.nodes or () if n.op == "call_module"}
        self.layer_params = {id(p) for m in self.called.values()
                             if type(m) is nn.Linear or type(m) in _CONVOLUTIONS
                             for p in (m.weight, m.bias) if p is not None}
        # The values each node is the last user of: dropped once it ran, so that the tangents
        # of a layer are freed as in a plain forward pass (holding every layer's tangents until
        # the end made the products 2.5× slower on the ae-digits autoencoder).
        position = {n: i for i, n in enumerate(self.nodes or ())}
        self.last_uses: Dict[fx.Node, List[fx.Node]] = {}
        for n in self.nodes or ():
            if n.users:
                self.last_uses.setdefault(max(n.users, key=position.__getitem__), []).append(n)


_TRACES: "weakref.WeakKeyDictionary[nn.Module, _Trace]" = weakref.WeakKeyDictionary()


def _trace(model: nn.Module, modules: List[nn.Module]) -> _Trace:
    # Which modules the model holds and their training flags: a replaced submodule or a
    # train()/eval() switch means tracing again.
    flags = tuple((id(m), m.training) for m in modules)
    trace = _TRACES.get(model)
    if trace is None or trace.flags != flags:
        try:
            graph = fx.symbolic_trace(model).graph
        except Exception:  # noqa: BLE001 — anything torch.fx cannot trace goes to torch.func
            graph = None
        trace = _Trace(graph, flags, model)
        _TRACES[model] = trace
    return trace


def _hooks_allow(module: nn.Module, ours: set) -> bool:
    """Whether the module's forward runs no hook but ours (ours only record statistics and are
    paused during the adaptive step's passes, so they do not change what the module computes)."""
    return (all(k in ours for k in module._forward_pre_hooks)
            and all(k in ours for k in module._forward_hooks))


def traced_products(model: nn.Module, args: tuple, params: Sequence[torch.Tensor],
                    tangents: Sequence[torch.Tensor],
                    own_hook_ids: set) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(outputs, products)`` of ``model(*args)`` with ``products[k] = J · tangent_k``, where
    ``tangents[i]`` stacks along its first dimension the tangents of ``params[i]`` (parameters of
    the model's ``nn.Linear`` and convolution layers; its other parameters are held fixed).
    ``None`` when the model is not one this function handles exactly."""
    if not args or not all(isinstance(a, torch.Tensor) for a in args):
        return None
    if _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    modules = list(model.modules())
    if not all(_hooks_allow(m, own_hook_ids) for m in modules):
        return None
    trace = _trace(model, modules)
    if trace.nodes is None:
        return None
    tangent_of: Dict[int, torch.Tensor] = {id(p): t for p, t in zip(params, tangents)}
    if not trace.layer_params.issuperset(tangent_of):
        return None  # a parameter outside the Linear and convolution modules the graph calls
    count = tangents[0].shape[0] if tangents else 0
    result = _interpret(trace, args, tangent_of, count)
    if result is None:
        return None
    outputs, products = result
    if not trace.checked:
        # Once per trace: the graph computes what the model's forward does on these inputs.
        expected = model(*args)
        if not (isinstance(expected, torch.Tensor) and expected.shape == outputs.shape
                and torch.allclose(expected, outputs, rtol=1e-5, atol=1e-6, equal_nan=True)):
            trace.nodes = None
            return None
        trace.checked = True
    return outputs, products


def _interpret(trace: "_Trace", args: tuple, tangent_of: Dict[int, torch.Tensor], count: int):
    """Runs the graph on (value, tangents) pairs; tangents are [count, ...value's shape] or None
    (zero). Returns (outputs, products) or None."""
    env: Dict[fx.Node, tuple] = {}
    placeholders = iter(args)

    def value(a):
        return fx.node.map_arg(a, lambda n: env[n][0])

    for node in trace.nodes:
        op = node.op
        if op == "placeholder":
            given = next(placeholders, None)
            if given is None:
                return None
            env[node] = (given, None)
        elif op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                return None
            z, dz = env[out]
            if not isinstance(z, torch.Tensor):
                return None
            if dz is None:
                dz = torch.zeros((count,) + tuple(z.shape), dtype=z.dtype, device=z.device)
            if next(placeholders, None) is not None:
                return None  # more inputs than the forward takes
            return z, dz
        elif op == "call_module":
            module = trace.called[node]
            if module is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                return None
            z, dz = env[node.args[0]]
            step = _module_step(module, z, dz, tangent_of, count)
            if step is None:
                return None
            env[node] = step
        elif op == "call_function":
            step = _function_step(node, env, value)
            if step is None:
                return None
            env[node] = step
        elif op == "call_method":
            step = _method_step(node, env, value)
            if step is None:
                return None
            env[node] = step
        else:  # get_attr: a parameter or buffer read directly is not a case handled here
            return None
        for used in trace.last_uses.get(node, ()):
            del env[used]
    return None


def _module_step(module, z, dz, tangent_of, count):
    kind = type(module)
    if not isinstance(z, torch.Tensor):
        return None
    if kind is nn.Linear:
        return _linear(module, z, dz, tangent_of, count)
    if kind in _CONVOLUTIONS:
        if module.padding_mode != "zeros" or z.dim() != _SPATIAL_DIMS[kind] + 2:
            return None  # other padding modes, unbatched inputs: torch.func handles them
        return _convolution(module, z, dz, tangent_of, count)
    if kind in _RESHAPES:
        return _reshaped(module(z), dz)
    if kind in _ELEMENTWISE_MODULES:
        return _elementwise(_ELEMENTWISE_MODULES[kind], z, dz)
    if kind is nn.Identity or (kind is nn.Dropout and not module.training):
        return z, dz
    return None


def _function_step(node, env, value):
    target = node.target
    if target in _ELEMENTWISE:
        if (len(node.args) != 1 or not isinstance(node.args[0], fx.Node)
                or (node.kwargs and node.kwargs != {"inplace": False})):
            return None
        z, dz = env[node.args[0]]
        return _elementwise(_ELEMENTWISE[target], z, dz) if isinstance(z, torch.Tensor) else None
    if target in _SUMS:
        if len(node.args) != 2 or node.kwargs:
            return None
        sign = _SUMS[target]
        (u, du), (v, dv) = (env[a] if isinstance(a, fx.Node) else (a, None) for a in node.args)
        if not isinstance(u, (torch.Tensor, int, float)) or not isinstance(v, (torch.Tensor, int, float)):
            return None
        if not isinstance(u, torch.Tensor) and not isinstance(v, torch.Tensor):
            return None
        out = u + v if sign > 0 else u - v
        if any(d is not None and w.shape != out.shape for w, d in ((u, du), (v, dv))):
            return None  # a broadcast operand with tangents
        if du is None:
            return out, None if dv is None else (dv if sign > 0 else -dv)
        if dv is None:
            return out, du
        return out, du + dv if sign > 0 else du - dv
    if (target is getattr and len(node.args) == 2 and node.args[1] == "shape") or target is operator.getitem:
        # Shape queries feed later reshapes; indexing a tensor is not a case handled here.
        base = value(node.args[0])
        if target is operator.getitem and isinstance(base, torch.Tensor):
            return None
        return (base.shape if target is getattr else base[value(node.args[1])]), None
    if target in _RESHAPE_FUNCTIONS:
        z, dz = env[node.args[0]] if isinstance(node.args[0], fx.Node) else (None, None)
        if not isinstance(z, torch.Tensor):
            return None
        return _reshaped(target(z, *value(node.args[1:]), **value(node.kwargs)), dz)
    return None


def _method_step(node, env, value):
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    z, dz = env[node.args[0]]
    if not isinstance(z, torch.Tensor):
        return None
    name = node.target
    if name == "size" or name == "dim":  # shape queries feed later reshapes
        return getattr(z, name)(*value(node.args[1:]), **value(node.kwargs)), None
    if name in _ELEMENTWISE_METHODS and len(node.args) == 1 and not node.kwargs:
        return _elementwise(name, z, dz)
    if name in _RESHAPE_METHODS:
        return _reshaped(getattr(z, name)(*value(node.args[1:]), **value(node.kwargs)), dz)
    return None


def _reshaped(out: torch.Tensor, dz: Optional[torch.Tensor]):
    """A reshape's output and the same reshape of every tangent (behind their leading index)."""
    return out, None if dz is None else dz.reshape((dz.shape[0],) + tuple(out.shape))


def _elementwise(name: str, z: torch.Tensor, dz: Optional[torch.Tensor]):
    aten = torch.ops.aten
    if name == "relu":
        return torch.relu(z), None if dz is None else aten.threshold_backward(dz, z, 0)  # ṡ ⊙ [s > 0]
    if name == "tanh":
        y = torch.tanh(z)
        return y, None if dz is None else aten.tanh_backward(dz, y)  # ṡ ⊙ (1 − y²)
    y = torch.sigmoid(z)
    return y, None if dz is None else aten.sigmoid_backward(dz, y)  # ṡ ⊙ y ⊙ (1 − y)


def _linear(layer: nn.Linear, z: torch.Tensor, dz: Optional[torch.Tensor], tangent_of, count):
    if z.dim() != 2:
        return None
    weight, bias = layer.weight, layer.bias
    dw = tangent_of.get(id(weight))
    db = tangent_of.get(id(bias)) if bias is not None else None
    # Two fused batched products per layer: ṡ = ḃ + ẋ Wᵀ, then ṡ += x Ẇᵀ.
    if dz is not None:
        shift = db.unsqueeze(1) if db is not None else dz.new_zeros(())
        dz = torch.baddbmm(shift, dz, weight.t().expand(count, -1, -1))
    elif db is not None:
        dz = db.unsqueeze(1).expand(count, z.shape[0], db.shape[-1])
    if dw is not None:
        batch = z.expand(count, -1, -1)
        dz = torch.baddbmm(dz, batch, dw.transpose(1, 2)) if dz is not None else torch.bmm(batch, dw.transpose(1, 2))
    return torch.nn.functional.linear(z, weight, bias), dz


def _convolution(conv, z: torch.Tensor, dz: Optional[torch.Tensor], tangent_of: Dict[int, torch.Tensor],
                 count: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The convolution's output and its tangents ``W ⋆ ẋ_k + Ẇ_k ⋆ x + ḃ_k`` ([count, N, ...])."""
    run = _CONV[type(conv)]
    options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    weight, bias = conv.weight, conv.bias
    dw = tangent_of.get(id(weight))
    db = tangent_of.get(id(bias)) if bias is not None else None
    out = run(z, weight, bias, **options)
    n, c_out, spatial = out.shape[0], out.shape[1], tuple(out.shape[2:])
    d_out = None
    if dz is not None:
        d_out = run(dz.flatten(0, 1), weight, None, **options).view(count, n, c_out, *spatial)
    if dw is not None:
        # The K kernel tangents stacked along the output channels, group-major, so that each
        # group's stacked kernels still read that group's input channels.
        g = conv.groups
        kernels = dw.reshape(count, g, c_out // g, *dw.shape[2:]).transpose(0, 1).reshape(count * c_out, *dw.shape[2:])
        product = run(z, kernels, None, **options).view(n, g, count, c_out // g, *spatial)
        product = product.permute(2, 0, 1, 3, *range(4, 4 + len(spatial))).reshape(count, n, c_out, *spatial)
        d_out = product if d_out is None else d_out + product
    if db is not None:
        shift = db.reshape(count, 1, c_out, *([1] * len(spatial)))
        d_out = shift.expand(count, n, c_out, *spatial) if d_out is None else d_out + shift
    return out, d_out
