"""EXPERIMENTAL: exact Gauss-Newton products G·v of a PyTorch model from stored Jacobian columns
(``kfac_gn_*`` of ``kfac.h``, "Gauss-Newton products"; may change in any minor release).

:class:`ColumnRecorder` runs the model once on a curvature batch with hooks on its ``nn.Linear``,
``nn.Conv2d`` and ``nn.Conv1d`` layers (``named_modules()`` order, the order of
:class:`~libkfac.torch.KFACPreconditioner`), takes the output Hessian's square root S
(``kfac_gn_output_hessian_sqrt``, K = output_dim columns) at the outputs, back-propagates its K
columns to every layer's output in one vmapped backward pass (``autograd.grad`` with
``is_grads_batched``; a loop of K passes if vmap does not support the model) and records them
with the layers' inputs in a libkfac handle of its own. :meth:`ColumnRecorder.curvature_product`
is then the exact

    G v = (1/N) Σ_n J_nᵀ B_n J_n v

of the mean of the per-example losses (softmax cross-entropy, binary cross-entropy with logits, or
½‖y − z‖²), times ``loss_scale`` — a callable taking a list of parameter-shaped tensors (for every
recorded layer in order: its weight, then its bias if it has one) and returning the product in the
same layout — the model's trainable parameters in ``model.parameters()`` order (zero products for
parameters outside the recorded layers), or :meth:`ColumnRecorder.parameters` — suitable as the
``curvature_product=`` of :class:`libkfac.torch.NewtonCG`. Layers without a recorded input (not
reached by the forward pass) give zero products.

Loss conventions: PyTorch's ``cross_entropy`` and ``binary_cross_entropy_with_logits`` with
``reduction='mean'`` (over examples) match ``loss_scale=1``; ``reduction='sum'`` is ``N`` times
it; ``MSELoss(reduction='mean')`` over ``N·d`` values is ``distribution='gaussian'`` with
``loss_scale = 2/d``. Memory: N·(K·Σ_l (output values of l) + Σ_l (input values of l)) numbers.
Linear layers must see 2-D ``[N, in]`` inputs (one row per example); convolutions batched NCHW
(Conv2d) or NCL (Conv1d, registered as the library's 1×L convolution) inputs.
"""

from __future__ import annotations

from typing import Callable, List, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..gauss_newton import GaussNewton, output_hessian_sqrt
from ..optimizer import Optimizer

__all__ = ["ColumnRecorder"]


def _is_conv(module) -> bool:
    return isinstance(module, (nn.Conv2d, nn.Conv1d))


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


class ColumnRecorder:
    """Stored-column Gauss-Newton products of ``model``'s ``nn.Linear``, ``nn.Conv2d`` and
    ``nn.Conv1d`` layers.

    Args:
        model: the network; its output for a batch must be ``[N, output_dim]``.
        distribution: ``'categorical'`` (logits of a softmax), ``'bernoulli'`` (logits of
            independent sigmoids) or ``'gaussian'`` (means, ``½‖y − z‖²``).
        loss_scale: multiplies every product (see the module documentation).
        skip_layers: modules (objects) not to include.
    """

    def __init__(self, model: nn.Module, distribution: str = "categorical", *, loss_scale: float = 1.0,
                 skip_layers: Sequence[nn.Module] = ()):
        self.model = model
        self.distribution = distribution
        self.loss_scale = float(loss_scale)
        skip = {id(m) for m in skip_layers}
        self.modules: List[nn.Module] = [m for _, m in model.named_modules()
                                         if isinstance(m, (nn.Linear, nn.Conv2d, nn.Conv1d)) and id(m) not in skip
                                         and m.weight.requires_grad]
        if not self.modules:
            raise ValueError("libkfac: the model has no nn.Linear, nn.Conv2d or nn.Conv1d layer")
        for m in self.modules:
            if _is_conv(m) and (m.padding_mode != "zeros" or isinstance(m.padding, str)):
                raise ValueError(f"libkfac: {m}: only numeric zero padding is supported")
        self._optimizer: Optional[Optimizer] = None
        self._gn: Optional[GaussNewton] = None
        self._input_sizes = None

    @property
    def dtype(self) -> torch.dtype:
        return self.modules[0].weight.dtype

    def _ensure_registered(self, inputs: dict) -> None:
        """Registers the layers with a handle of their own at the first record (a convolution's
        input size is known only then)."""
        sizes = [tuple(inputs[id(m)].shape[2:]) if _is_conv(m) and id(m) in inputs else None
                 for m in self.modules]
        if self._optimizer is not None:
            for m, old, new in zip(self.modules, self._input_sizes, sizes):
                if new is not None and new != old:
                    raise ValueError(f"libkfac: {m}: input size {new} differs from the first record's {old}")
            return
        missing = [m for m, size in zip(self.modules, sizes) if _is_conv(m) and size is None]
        if missing:
            raise ValueError(f"libkfac: the first record must reach every convolution (or skip it): {missing}")
        opt = Optimizer(np.float64 if self.dtype == torch.float64 else np.float32)
        for m, size in zip(self.modules, sizes):
            if isinstance(m, nn.Linear):
                opt.add_dense(m.in_features, m.out_features, bias=m.bias is not None)
            elif isinstance(m, nn.Conv1d):
                opt.add_conv1d(m.in_channels, m.out_channels, m.kernel_size[0], stride=m.stride[0],
                               padding=m.padding[0], dilation=m.dilation[0], groups=m.groups,
                               bias=m.bias is not None, input_size=size[0])
            else:
                opt.add_conv2d(m.in_channels, m.out_channels, _pair(m.kernel_size), stride=_pair(m.stride),
                               padding=_pair(m.padding), dilation=_pair(m.dilation), groups=m.groups,
                               bias=m.bias is not None, input_size=size)
        self._optimizer, self._gn, self._input_sizes = opt, GaussNewton(opt), sizes

    def record(self, x, *args, **kwargs) -> torch.Tensor:
        """Runs ``model(x, *args, **kwargs)`` on a curvature batch, records its columns (replacing
        the previous batch's) and returns the outputs (detached)."""
        inputs, outputs = {}, {}

        def pre(module, args_):
            inputs[id(module)] = args_[0].detach()

        def post(module, args_, out):
            outputs[id(module)] = out

        handles = [m.register_forward_pre_hook(pre) for m in self.modules]
        handles += [m.register_forward_hook(post) for m in self.modules]
        try:
            with torch.enable_grad():
                z = self.model(x, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()
        present = [m for m in self.modules if id(m) in outputs]
        if not present:
            raise ValueError("libkfac: the forward pass reached none of the recorded layers")
        if z.dim() != 2:
            raise ValueError(f"libkfac: the model's output must be [N, output_dim], got {tuple(z.shape)}")
        for m in present:
            if isinstance(m, nn.Linear) and inputs[id(m)].dim() != 2:
                raise ValueError(f"libkfac: {m} saw inputs of shape {tuple(inputs[id(m)].shape)}: one row per example")
            if _is_conv(m):
                # Columns are recorded as [K, N, C_out, *out]: a batched input with the outputs' N.
                dims = 3 if isinstance(m, nn.Conv1d) else 4
                shape = tuple(inputs[id(m)].shape)
                if len(shape) != dims or shape[0] != z.shape[0]:
                    raise ValueError(f"libkfac: {m} saw inputs of shape {shape}: it needs batched "
                                     f"{'[N, C, L]' if dims == 3 else '[N, C, H, W]'} inputs with the outputs' "
                                     f"N = {z.shape[0]}")
        self._ensure_registered(inputs)
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32
        s = torch.from_numpy(output_hessian_sqrt(z.detach().cpu().numpy().astype(np_dtype), self.distribution))
        s = s.to(device=z.device, dtype=z.dtype)                                 # [K, N, d]
        targets = [outputs[id(m)] for m in present]
        try:
            columns = torch.autograd.grad(z, targets, grad_outputs=s, is_grads_batched=True, allow_unused=True)
        except RuntimeError:
            per_k = [torch.autograd.grad(z, targets, grad_outputs=s[k], retain_graph=True, allow_unused=True)
                     for k in range(s.shape[0])]
            columns = [torch.stack([c[i] if c[i] is not None else torch.zeros_like(targets[i]) for c in per_k])
                       for i in range(len(targets))]
        self._gn.clear_columns()
        for m, c in zip(present, columns):
            layer = self.modules.index(m)
            if c is None:
                c = torch.zeros((s.shape[0],) + tuple(outputs[id(m)].shape), dtype=z.dtype)
            self._gn.record_columns(layer, c.detach().cpu().contiguous().numpy(),
                                    inputs=inputs[id(m)].cpu().contiguous().numpy(), uses="product")
        return z.detach()

    def curvature_product(self, vectors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        """G·v (times ``loss_scale``) for a list of parameter-shaped tensors, in either order:

        - the model's trainable parameters (``[p for p in model.parameters() if
          p.requires_grad]``, the layout of :class:`libkfac.torch.NewtonCG`); parameters outside
          the recorded layers get zero products (G has no curvature for them here);
        - :meth:`parameters` (every recorded layer's weight, then its bias).

        Returns new tensors of the same shapes, dtypes and devices."""
        if self._gn is None:
            raise RuntimeError("libkfac: call record(x) on a curvature batch first")
        vectors = list(vectors)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        ours = self.parameters()
        if len(vectors) == len(trainable):
            order = trainable
        elif len(vectors) == len(ours):
            order = ours
        else:
            raise ValueError(f"libkfac: expected {len(trainable)} tensors (the model's trainable parameters) "
                             f"or {len(ours)} (the recorded layers' weights and biases), got {len(vectors)}")
        position = {id(p): i for i, p in enumerate(order)}
        for v, p in zip(vectors, order):
            if tuple(v.shape) != tuple(p.shape):
                raise ValueError(f"libkfac: a vector of shape {tuple(v.shape)} for a parameter of shape {tuple(p.shape)}")
        np_dtype = np.float64 if self.dtype == torch.float64 else np.float32

        def array(p):
            i = position.get(id(p))
            return vectors[i].detach().cpu().numpy().astype(np_dtype, copy=False) if i is not None else np.zeros(tuple(p.shape), np_dtype)

        weights = [array(m.weight) for m in self.modules]
        biases = [array(m.bias) if m.bias is not None else None for m in self.modules]
        pw, pb = self._gn.columns_multiply(weights, biases)
        products = {}
        for m, w, b in zip(self.modules, pw, pb):
            products[id(m.weight)] = w
            if m.bias is not None:
                products[id(m.bias)] = b
        out = []
        for v, p in zip(vectors, order):
            value = products.get(id(p))
            out.append(torch.zeros_like(v) if value is None else
                       torch.from_numpy(self.loss_scale * value).to(device=v.device, dtype=v.dtype))
        return out

    def __call__(self, vectors: Sequence[torch.Tensor]) -> List[torch.Tensor]:
        return self.curvature_product(vectors)

    def parameters(self) -> List[torch.Tensor]:
        """The parameters in :meth:`curvature_product`'s order."""
        return [p for m in self.modules for p in ([m.weight] + ([m.bias] if m.bias is not None else []))]
