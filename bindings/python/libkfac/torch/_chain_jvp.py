"""Forward-mode products of a plain ``nn.Sequential`` chain of ``nn.Linear``, ``nn.Conv1d`` and
``nn.Conv2d`` layers, elementwise activations and reshapes, for several parameter tangents at
once, written out by hand.

:meth:`KFACPreconditioner.adaptive_step` needs ``J·D_k`` (the derivative of the outputs along
each candidate direction, and along δ₀). ``torch.func.vmap`` over ``torch.func.jvp`` over
``torch.func.functional_call`` computes them for any model, but on the small networks where the
adaptive mode is used its dispatch costs several forward passes (measured on the convergence
benchmark's ae-digits autoencoder at batch 256: about 9 forward passes' time for two tangents).
For the common case of a chain this module does the same arithmetic directly: one primal pass
and, per layer, one batched product for the tangents,

    Linear  s = x Wᵀ + b:      ṡ_k = ẋ_k Wᵀ + x Ẇ_kᵀ + ḃ_k
    Conv    s = W ⋆ x + b:     ṡ_k = W ⋆ ẋ_k + Ẇ_k ⋆ x + ḃ_k
    tanh    y = tanh(s):       ẏ_k = ṡ_k ⊙ (1 − y²)
    sigmoid y = σ(s):          ẏ_k = ṡ_k ⊙ y ⊙ (1 − y)
    ReLU    y = max(s, 0):     ẏ_k = ṡ_k ⊙ [s > 0]
    Flatten / Unflatten:       the same reshape of every ẏ_k

(ẋ is zero for the chain's input). For a convolution the tangents' W ⋆ ẋ_k run as one
convolution of the N·K stacked inputs, and the Ẇ_k ⋆ x as one convolution of x with the K
kernels stacked along the output channels (group by group, so grouped convolutions keep their
channel mapping). :func:`chain_products` returns ``None`` for anything else (other module types,
padding modes other than zeros, user hooks, a Linear layer on inputs that are not ``[N,
features]``, a convolution on unbatched inputs, more than one input tensor), and the caller falls back to ``torch.func``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module

_ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.Identity)
_CONVOLUTIONS = (nn.Conv1d, nn.Conv2d)
_RESHAPES = (nn.Flatten, nn.Unflatten)
_CONV = {nn.Conv1d: torch.nn.functional.conv1d, nn.Conv2d: torch.nn.functional.conv2d}
_SPATIAL_DIMS = {nn.Conv1d: 1, nn.Conv2d: 2}


def _hooks_allow(module: nn.Module, ours: set) -> bool:
    """Whether the module's forward runs no hook but ours (ours only record statistics and are
    paused during the adaptive step's passes, so they do not change what the module computes)."""
    return (all(k in ours for k in module._forward_pre_hooks)
            and all(k in ours for k in module._forward_hooks))


def chain_products(model: nn.Module, args: tuple, params: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
                   own_hook_ids: set) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(outputs, products)`` of ``model(*args)`` with ``products[k] = J · tangent_k``, where
    ``tangents[i]`` stacks along its first dimension the tangents of ``params[i]`` (parameters of
    the chain's ``nn.Linear`` and convolution layers; the chain's other parameters are held
    fixed). ``None`` when the model is not a chain this function handles exactly."""
    if type(model) is not nn.Sequential or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if x.dim() < 2 or _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    if not _hooks_allow(model, own_hook_ids):
        return None
    tangent_of: Dict[int, torch.Tensor] = {id(p): t for p, t in zip(params, tangents)}
    children = list(model.children())
    covered = 0
    for child in children:
        if type(child) is nn.Linear or type(child) in _CONVOLUTIONS:
            if type(child) in _CONVOLUTIONS and child.padding_mode != "zeros":
                return None
            covered += sum(1 for p in (child.weight, child.bias) if p is not None and id(p) in tangent_of)
        elif type(child) not in _ACTIVATIONS and type(child) not in _RESHAPES:
            return None
        if not _hooks_allow(child, own_hook_ids):
            return None
    if covered != len(tangent_of):
        return None  # a parameter outside the chain's Linear and convolution layers
    count = tangents[0].shape[0] if tangents else 0
    aten = torch.ops.aten
    z, dz = x, None  # dz: [count, N, ...] (z's shape behind the tangents' index) or None (zero)
    for child in children:
        if type(child) in _CONVOLUTIONS:
            if z.dim() != _SPATIAL_DIMS[type(child)] + 2:
                return None  # unbatched input (torch.func handles it)
            z, dz = _convolution(child, z, dz, tangent_of, count)
        elif type(child) is nn.Flatten:
            z = child(z)
            if dz is not None:  # the tangents carry one more leading dimension
                dz = dz.flatten(_shifted(child.start_dim), _shifted(child.end_dim))
        elif type(child) is nn.Unflatten:
            z = child(z)
            if dz is not None:
                dz = dz.unflatten(_shifted(child.dim), child.unflattened_size)
        elif type(child) is nn.Linear:
            if z.dim() != 2:
                return None
            weight, bias = child.weight, child.bias
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
                dz = (torch.baddbmm(dz, batch, dw.transpose(1, 2)) if dz is not None
                      else torch.bmm(batch, dw.transpose(1, 2)))
            z = torch.nn.functional.linear(z, weight, bias)
        elif type(child) is nn.Tanh:
            z = torch.tanh(z)
            if dz is not None:
                dz = aten.tanh_backward(dz, z)  # ṡ ⊙ (1 − y²)
        elif type(child) is nn.Sigmoid:
            z = torch.sigmoid(z)
            if dz is not None:
                dz = aten.sigmoid_backward(dz, z)  # ṡ ⊙ y ⊙ (1 − y)
        elif type(child) is nn.ReLU:
            if dz is not None:
                dz = aten.threshold_backward(dz, z, 0)  # ṡ ⊙ [s > 0]
            z = torch.relu(z)
        # nn.Identity: nothing
    if dz is None:
        dz = torch.zeros((count,) + tuple(z.shape), dtype=z.dtype, device=z.device)
    return z, dz


def _shifted(dim: int) -> int:
    """A dimension of the activations as a dimension of their stacked tangents."""
    return dim + 1 if dim >= 0 else dim


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
