"""Forward-mode products of a plain ``nn.Sequential`` chain of ``nn.Linear`` layers and
elementwise activations, for several parameter tangents at once, written out by hand.

:meth:`KFACPreconditioner.adaptive_step` needs ``J·D_k`` (the derivative of the outputs along
each candidate direction, and along δ₀). ``torch.func.vmap`` over ``torch.func.jvp`` over
``torch.func.functional_call`` computes them for any model, but on the small networks where the
adaptive mode is used its dispatch costs several forward passes (measured on the convergence
benchmark's ae-digits autoencoder at batch 256: about 9 forward passes' time for two tangents).
For the common case of a chain this module does the same arithmetic directly: one primal pass
and, per layer, one batched product for the tangents,

    Linear  s = x Wᵀ + b:   ṡ_k = ẋ_k Wᵀ + x Ẇ_kᵀ + ḃ_k
    tanh    y = tanh(s):    ẏ_k = ṡ_k ⊙ (1 − y²)
    sigmoid y = σ(s):       ẏ_k = ṡ_k ⊙ y ⊙ (1 − y)
    ReLU    y = max(s, 0):  ẏ_k = ṡ_k ⊙ [s > 0]

(ẋ is zero for the chain's input). :func:`chain_products` returns ``None`` for anything else
(other module types, user hooks, inputs that are not one ``[N, features]`` tensor), and the
caller falls back to ``torch.func``.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn
from torch.nn.modules import module as _module

_ACTIVATIONS = (nn.Tanh, nn.Sigmoid, nn.ReLU, nn.Identity)


def _hooks_allow(module: nn.Module, ours: set) -> bool:
    """Whether the module's forward runs no hook but ours (ours only record statistics and are
    paused during the adaptive step's passes, so they do not change what the module computes)."""
    return (all(k in ours for k in module._forward_pre_hooks)
            and all(k in ours for k in module._forward_hooks))


def chain_products(model: nn.Module, args: tuple, params: Sequence[torch.Tensor], tangents: Sequence[torch.Tensor],
                   own_hook_ids: set) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(outputs, products)`` of ``model(*args)`` with ``products[k] = J · tangent_k``, where
    ``tangents[i]`` stacks along its first dimension the tangents of ``params[i]`` (parameters of
    the chain's ``nn.Linear`` layers; the chain's other parameters are held fixed). ``None`` when
    the model is not a chain this function handles exactly."""
    if type(model) is not nn.Sequential or len(args) != 1 or not isinstance(args[0], torch.Tensor):
        return None
    x = args[0]
    if x.dim() != 2 or _module._global_forward_hooks or _module._global_forward_pre_hooks:
        return None
    if not _hooks_allow(model, own_hook_ids):
        return None
    tangent_of: Dict[int, torch.Tensor] = {id(p): t for p, t in zip(params, tangents)}
    children = list(model.children())
    covered = 0
    for child in children:
        if type(child) is nn.Linear:
            covered += sum(1 for p in (child.weight, child.bias) if p is not None and id(p) in tangent_of)
        elif type(child) not in _ACTIVATIONS:
            return None
        if not _hooks_allow(child, own_hook_ids):
            return None
    if covered != len(tangent_of):
        return None  # a parameter outside the chain's Linear layers
    count = tangents[0].shape[0] if tangents else 0
    aten = torch.ops.aten
    z, dz = x, None  # dz: [count, N, features] or None (zero)
    for child in children:
        if type(child) is nn.Linear:
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
