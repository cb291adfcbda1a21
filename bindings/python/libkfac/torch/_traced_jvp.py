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

(ẋ is zero for the network's input). The rules need only each layer's input x and each
activation's output y, which are the inputs of the next layer in a chain: given the training
forward pass's layer inputs and output (:class:`ForwardValues`), values are computed only where
a rule needs one that they do not give (e.g. an activation whose output feeds a sum), and a
chain runs no primal pass. For a convolution the tangents' W ⋆ ẋ_k run as one
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
        # Which node's value each Linear or convolution module receives (modules called once),
        # and which nodes are reshaped into one of those: a forward pass's layer inputs give them.
        calls: Dict[nn.Module, int] = {}
        for m in self.called.values():
            calls[m] = calls.get(m, 0) + 1
        self.feeds: Dict[fx.Node, nn.Module] = {}
        for n, m in self.called.items():
            if (type(m) is nn.Linear or type(m) in _CONVOLUTIONS) and calls[m] == 1 and len(n.args) == 1 \
                    and isinstance(n.args[0], fx.Node):
                self.feeds.setdefault(n.args[0], m)
        self.reshaped_feeds: Dict[fx.Node, fx.Node] = {}
        for n in self.feeds:
            if n.args and isinstance(n.args[0], fx.Node) and _is_reshape(n, self.called):
                self.reshaped_feeds.setdefault(n.args[0], n)
        # The values each node is the last user of: dropped once it ran, so that the tangents
        # of a layer are freed as in a plain forward pass (holding every layer's tangents until
        # the end made the products 2.5× slower on the ae-digits autoencoder).
        position = {n: i for i, n in enumerate(self.nodes or ())}
        self.last_uses: Dict[fx.Node, List[fx.Node]] = {}
        for n in self.nodes or ():
            if n.users:
                self.last_uses.setdefault(max(n.users, key=position.__getitem__), []).append(n)


def _is_reshape(node: fx.Node, called: Dict[fx.Node, Optional[nn.Module]]) -> bool:
    """Whether the node reshapes its first argument (keeping the order of its elements)."""
    if node.op == "call_module":
        return type(called.get(node)) in _RESHAPES
    if node.op == "call_function":
        return node.target in _RESHAPE_FUNCTIONS
    return node.op == "call_method" and node.target in _RESHAPE_METHODS


_TRACES: "weakref.WeakKeyDictionary[nn.Module, _Trace]" = weakref.WeakKeyDictionary()


def _trace(model: nn.Module, modules: List[nn.Module]) -> _Trace:
    # Which modules the model holds and their training flags: a replaced submodule or a
    # train()/eval() switch means tracing again.
    flags = _module_flags(modules)
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


class KeptForward:
    """What a training forward pass computed, kept for the adaptive step that follows it: the
    inputs it was called with, its output, each hooked layer's input, and the version counters
    of all of them and of the model's parameters, with the modules' training flags, so that
    :meth:`values_for` can tell whether they are still the values at the current parameters."""

    __slots__ = ("args", "output", "inputs", "versions", "state")

    def __init__(self, model: nn.Module, args: tuple, output: torch.Tensor, inputs: Dict[nn.Module, Optional[torch.Tensor]]):
        self.args = args
        self.output = output.detach()
        self.inputs = {m: t for m, t in inputs.items() if t is not None}
        self.versions = self._kept_versions()
        self.state = _model_state(model)

    def _kept_versions(self) -> tuple:
        return tuple(t._version for t in (self.output, *self.inputs.values()))

    def values_for(self, model: nn.Module, args: tuple) -> Optional["ForwardValues"]:
        """The kept values if ``model(*args)`` would compute them now: the same input tensors,
        nothing changed in place since, the same parameters and training flags; else None."""
        if len(args) != len(self.args) or any(a is not b for a, b in zip(args, self.args)):
            return None
        if self._kept_versions() != self.versions:
            return None
        if _model_state(model) != self.state:
            return None
        return ForwardValues(self.inputs, self.output)


def _module_flags(modules) -> tuple:
    """The modules' ids and training flags (what a trace and kept values are valid for)."""
    return tuple((id(m), m.training) for m in modules)


def _model_state(model: nn.Module) -> tuple:
    """The version counters of the model's parameters and its modules' training flags and ids."""
    return tuple(p._version for p in model.parameters()), _module_flags(model.modules())


class ForwardValues:
    """Values of the caller's training forward pass at the parameters the products are taken at:
    each Linear or convolution module's input (``inputs``, keyed by module) and the model's output.
    With them a graph needs no primal pass where its values are layer inputs (or reshapes of
    them) and the output: a chain's tangents need only each layer's input and each activation's
    output. The caller vouches that they are this forward's (same inputs and parameters)."""

    __slots__ = ("inputs", "output")

    def __init__(self, inputs: Dict[nn.Module, torch.Tensor], output: torch.Tensor):
        self.inputs = inputs
        self.output = output


def traced_products(model: nn.Module, args: tuple, params: Sequence[torch.Tensor],
                    tangents: Sequence[torch.Tensor], own_hook_ids: set,
                    known: Optional[ForwardValues] = None) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(outputs, products)`` of ``model(*args)`` with ``products[k] = J · tangent_k``, where
    ``tangents[i]`` stacks along its first dimension the tangents of ``params[i]`` (parameters of
    the model's ``nn.Linear`` and convolution layers; its other parameters are held fixed).
    ``known``: the values of a forward pass on these inputs at these parameters, so that only the
    primal values nothing gives are computed. ``None`` when the model is not one this function
    handles exactly."""
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
    if not trace.checked:
        known = None  # the first products of a trace are computed whole, to check the graph
    result = _interpret(trace, args, tangent_of, count, known)
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


#: How many primal values of Linear and convolution layers the interpreter computed (tests read
#: it to see that given forward values spared them).
primal_layer_evaluations = 0


class _Value:
    """A node's primal value: given, or computed at the first ``get()`` by ``compute`` (which then
    is dropped, with the references it held)."""

    __slots__ = ("value", "compute")

    def __init__(self, value=None, compute=None):
        self.value, self.compute = value, compute

    def get(self):
        if self.compute is not None:
            self.value = self.compute()
            self.compute = None
        return self.value


class _Own:
    """What ``known`` gives of a node's own value: ``value`` itself, or (``reshaped``) the input of
    a reshape whose output a layer received, to be shaped back to the node's shape."""

    __slots__ = ("value", "reshaped")

    def __init__(self, value: torch.Tensor, reshaped: bool):
        self.value, self.reshaped = value, reshaped

    def shaped(self, shape) -> torch.Tensor:
        return self.value.reshape(shape) if self.reshaped else self.value


def _interpret(trace: "_Trace", args: tuple, tangent_of: Dict[int, torch.Tensor], count: int,
               known: Optional[ForwardValues]):
    """Runs the graph on (value, tangents) pairs; tangents are [count, ...value's shape] or None
    (zero). Without ``known`` every value is computed as its node runs; with it, a value is
    computed only when a tangent rule or the output needs it and ``known`` does not give it.
    Returns (outputs, products) or None."""
    env: Dict[fx.Node, Tuple[_Value, Optional[torch.Tensor]]] = {}
    placeholders = iter(args)
    owns: Dict[fx.Node, _Own] = {}
    if known is not None:
        for node, module in trace.feeds.items():
            if module in known.inputs:
                owns[node] = _Own(known.inputs[module], False)
        for node, reshape in trace.reshaped_feeds.items():
            if reshape in owns and node not in owns:
                owns[node] = _Own(owns[reshape].value, True)

    def value(a):
        return fx.node.map_arg(a, lambda n: env[n][0].get())

    for node in trace.nodes:
        op = node.op
        if op == "placeholder":
            data = next(placeholders, None)
            if data is None:
                return None
            env[node] = (_Value(data), None)
        elif op == "output":
            out = node.args[0]
            if not isinstance(out, fx.Node):
                return None
            slot, dz = env[out]
            z = known.output if known is not None else slot.get()
            if not isinstance(z, torch.Tensor):
                return None
            if dz is None:
                dz = torch.zeros((count,) + tuple(z.shape), dtype=z.dtype, device=z.device)
            if next(placeholders, None) is not None:
                return None  # more inputs than the forward takes
            return z, dz
        else:
            own = owns.get(node)
            if op == "call_module":
                module = trace.called[node]
                if module is None or len(node.args) != 1 or node.kwargs or not isinstance(node.args[0], fx.Node):
                    return None
                step = _module_step(module, env[node.args[0]], tangent_of, count, own)
            elif op == "call_function":
                step = _function_step(node, env, value, own)
            elif op == "call_method":
                step = _method_step(node, env, value, own)
            else:  # get_attr: a parameter or buffer read directly is not a case handled here
                return None
            if step is None:
                return None
            slot, dz = step
            if own is not None and (not own.reshaped or dz is not None):
                slot = _Value(own.shaped(None if dz is None else dz.shape[1:]))
            elif known is None:
                slot.get()
            env[node] = (slot, dz)
        for used in trace.last_uses.get(node, ()):
            del env[used]
    return None


def _module_step(module, entry, tangent_of, count, own):
    kind = type(module)
    slot, dz = entry
    if kind is nn.Linear:
        z = slot.get()
        return _linear(module, z, dz, tangent_of, count) if isinstance(z, torch.Tensor) else None
    if kind in _CONVOLUTIONS:
        z = slot.get()
        if not isinstance(z, torch.Tensor) or module.padding_mode != "zeros" or z.dim() != _SPATIAL_DIMS[kind] + 2:
            return None  # other padding modes, unbatched inputs: torch.func handles them
        return _convolution(module, z, dz, tangent_of, count)
    if kind in _RESHAPES:
        return _reshaped(_Value(compute=lambda: module(slot.get())), dz, own)
    if kind in _ELEMENTWISE_MODULES:
        return _elementwise(_ELEMENTWISE_MODULES[kind], slot, dz, own)
    if kind is nn.Identity or (kind is nn.Dropout and not module.training):
        return slot, dz
    return None


def _function_step(node, env, value, own):
    target = node.target
    if target in _ELEMENTWISE:
        if (len(node.args) != 1 or not isinstance(node.args[0], fx.Node)
                or (node.kwargs and node.kwargs != {"inplace": False})):
            return None
        return _elementwise(_ELEMENTWISE[target], *env[node.args[0]], own)
    if target in _SUMS:
        if len(node.args) != 2 or node.kwargs:
            return None
        sign = _SUMS[target]
        (u, du), (v, dv) = (env[a] if isinstance(a, fx.Node) else (_Value(a), None) for a in node.args)
        shapes, tensors = [], 0
        for operand, tangent in ((u, du), (v, dv)):
            if tangent is not None:
                shapes.append(tuple(tangent.shape[1:]))
                tensors += 1
                continue
            w = operand.get()  # no tangent: a number, or a value that does not depend on the parameters
            if not isinstance(w, (torch.Tensor, int, float)):
                return None
            shapes.append(tuple(w.shape) if isinstance(w, torch.Tensor) else ())
            tensors += isinstance(w, torch.Tensor)
        if tensors == 0:
            return None
        out_shape = tuple(torch.broadcast_shapes(*shapes))
        if any(d is not None and tuple(d.shape[1:]) != out_shape for d in (du, dv)):
            return None  # a broadcast operand with tangents
        out = _Value(compute=lambda: u.get() + v.get() if sign > 0 else u.get() - v.get())
        if du is None:
            return out, None if dv is None else (dv if sign > 0 else -dv)
        if dv is None:
            return out, du
        return out, du + dv if sign > 0 else du - dv
    if target is getattr and len(node.args) == 2 and node.args[1] == "shape" and isinstance(node.args[0], fx.Node):
        shape = _shape_of(*env[node.args[0]])  # shape queries feed later reshapes
        return None if shape is None else (_Value(shape), None)
    if target is operator.getitem:
        base = value(node.args[0])
        if isinstance(base, torch.Tensor):
            return None  # indexing a tensor is not a case handled here
        return _Value(base[value(node.args[1])]), None
    if target in _RESHAPE_FUNCTIONS:
        if not node.args or not isinstance(node.args[0], fx.Node):
            return None
        slot, dz = env[node.args[0]]
        rest, kwargs = value(node.args[1:]), value(node.kwargs)
        return _reshaped(_Value(compute=lambda: target(slot.get(), *rest, **kwargs)), dz, own)
    return None


def _method_step(node, env, value, own):
    if not node.args or not isinstance(node.args[0], fx.Node):
        return None
    slot, dz = env[node.args[0]]
    name = node.target
    if name == "size" or name == "dim":  # shape queries feed later reshapes
        shape = _shape_of(slot, dz)
        if shape is None or node.kwargs or len(node.args) > (1 if name == "dim" else 2):
            return None
        if name == "dim":
            return _Value(len(shape)), None
        return _Value(shape if len(node.args) == 1 else shape[value(node.args[1])]), None
    if name in _ELEMENTWISE_METHODS and len(node.args) == 1 and not node.kwargs:
        return _elementwise(name, slot, dz, own)
    if name in _RESHAPE_METHODS:
        rest, kwargs = value(node.args[1:]), value(node.kwargs)
        return _reshaped(_Value(compute=lambda: getattr(slot.get(), name)(*rest, **kwargs)), dz, own)
    return None


def _shape_of(slot: _Value, dz: Optional[torch.Tensor]) -> Optional[torch.Size]:
    """A value's shape, from its tangents when it has them (without computing the value)."""
    if dz is not None:
        return dz.shape[1:]
    z = slot.get()
    return z.shape if isinstance(z, torch.Tensor) else None


def _reshaped(out: _Value, dz: Optional[torch.Tensor], own: Optional[_Own]):
    """A reshape's output and the same reshape of every tangent (behind their leading index)."""
    if own is not None and not own.reshaped:
        out = _Value(own.value)  # the input of a layer: its shape without computing the reshape
    if dz is None:
        return out, None
    z = out.get()
    if not isinstance(z, torch.Tensor):
        return None
    return out, dz.reshape((dz.shape[0],) + tuple(z.shape))


_ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "sigmoid": torch.sigmoid}


def _elementwise(name: str, slot: _Value, dz: Optional[torch.Tensor], own: Optional[_Own]):
    """The activation's output and its tangents, written with the output y (for ReLU, y > 0
    exactly where s > 0), which ``own`` may give without computing the activation's input."""
    act = _ACTIVATIONS[name]
    if own is not None and dz is not None:
        out = _Value(own.shaped(dz.shape[1:]))
    else:
        out = _Value(compute=lambda: act(slot.get()))
    if dz is None:
        return out, None
    y = out.get()
    if not isinstance(y, torch.Tensor):
        return None
    aten = torch.ops.aten
    if name == "relu":
        return out, aten.threshold_backward(dz, y, 0)  # ṡ ⊙ [y > 0]
    if name == "tanh":
        return out, aten.tanh_backward(dz, y)  # ṡ ⊙ (1 − y²)
    return out, aten.sigmoid_backward(dz, y)  # ṡ ⊙ y ⊙ (1 − y)


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
    return _Value(compute=lambda: _primal(torch.nn.functional.linear, z, weight, bias)), dz


def _primal(run, *args, **options):
    global primal_layer_evaluations
    primal_layer_evaluations += 1
    return run(*args, **options)


def _convolution(conv, z: torch.Tensor, dz: Optional[torch.Tensor], tangent_of: Dict[int, torch.Tensor],
                 count: int):
    """The convolution's output (computed when needed) and its tangents ``W ⋆ ẋ_k + Ẇ_k ⋆ x + ḃ_k``
    ([count, N, ...]), accumulated in place into the first product (a fresh tensor)."""
    run = _CONV[type(conv)]
    options = dict(stride=conv.stride, padding=conv.padding, dilation=conv.dilation, groups=conv.groups)
    weight, bias = conv.weight, conv.bias
    out = _Value(compute=lambda: _primal(run, z, weight, bias, **options))
    dw = tangent_of.get(id(weight))
    db = tangent_of.get(id(bias)) if bias is not None else None
    n = z.shape[0]
    d_out = None
    if dz is not None:
        d_out = run(dz.flatten(0, 1), weight, None, **options)
        d_out = d_out.view(count, n, *d_out.shape[1:])
    if dw is not None:
        # The K kernel tangents stacked along the output channels, group-major, so that each
        # group's stacked kernels still read that group's input channels.
        g = conv.groups
        c_out = dw.shape[1]
        kernels = dw.reshape(count, g, c_out // g, *dw.shape[2:]).transpose(0, 1).reshape(count * c_out, *dw.shape[2:])
        product = run(z, kernels, None, **options)
        spatial = tuple(product.shape[2:])
        product = product.view(n, g, count, c_out // g, *spatial).permute(2, 0, 1, 3, *range(4, 4 + len(spatial)))
        if d_out is None:
            d_out = product.reshape(count, n, c_out, *spatial)
        else:
            d_out.view(count, n, g, c_out // g, *spatial).add_(product)
    if db is not None:
        if d_out is None:
            y = out.get()
            shift = db.reshape(count, 1, y.shape[1], *([1] * (y.dim() - 2)))
            return out, shift.expand(count, *y.shape)
        d_out.add_(db.reshape(count, 1, d_out.shape[2], *([1] * (d_out.dim() - 3))))
    return out, d_out
