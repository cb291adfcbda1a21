"""Newton-CG with Levenberg–Marquardt damping for any ``nn.Module`` (Martens 2010; simpleNN),
on the library's reverse-communication conjugate gradient (experimental ``kfac_cg_*``).

Each :meth:`NewtonCG.step`:

1. the mean loss h and its gradient g on the whole batch (plus ``½η‖θ‖²`` with ``l2 = η``);
2. CG on ``(G + (λ + η) I) s = −g`` with G the Gauss-Newton matrix of the curvature batch (a
   subsample of the batch, the caller's choice: ``curvature_indices``):
   ``G·v = Jᵀ (∇²_z ℓ) J v`` by ``torch.func`` — one ``linearize`` (forward-mode, J·v) and one
   ``vjp`` (Jᵀ·u) sharing a single forward pass of the curvature batch per Newton step, the
   loss's Hessian in the outputs by forward-over-reverse. ``curvature_product=`` replaces this
   by any callable ``f(vectors) -> products`` (lists of tensors shaped like the parameters),
   e.g. stored Jacobian columns;
3. an optional Armijo backtracking line search on α (halving, ``h(θ + αs) − h(θ) ≤ 1e-4·α·gᵀs``);
4. ρ of the actual change against the CG model without λ, ``m(α) = α gᵀs + ½α² sᵀ(G + ηI)s``,
   and the library's Levenberg–Marquardt rule on λ (``lm_decay = 2/3``, ``lm_interval = 1``:
   λ·3/2 if ρ < 1/4, λ·2/3 if ρ > 3/4).

Preconditioners: ``None``, ``"diagonal"`` (Martens 2010: ``(d + λ + η)^0.75`` with d the mean
of the squared per-example gradients of the curvature batch, by ``torch.func.vmap``), or a
:class:`~libkfac.torch.KFACPreconditioner` of the same model (its current K-FAC inverses; it
must cover every trainable parameter, since its layers are the solver's layout; the solver may
be built before any forward pass, and binds to the layers once the preconditioner registers
them). Without K-FAC the solver runs on a private float64 handle holding one pseudo-layer over
all parameters.

The model must be a deterministic function of its parameters and inputs (no dropout; BatchNorm
in eval mode) returning one tensor.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

import numpy as np
import torch

from .. import _lib
from .._errors import KFACError
from ..newton_cg import CGResult
from ..newton_cg import NewtonCG as _NumpyNewtonCG
from ..optimizer import Optimizer

__all__ = ["NewtonCG", "NewtonCGStepResult"]


@dataclass(frozen=True)
class NewtonCGStepResult:
    loss_before: float
    loss_after: float
    step_scale: float          #: α of the line search (1 without it)
    rho: float                 #: (loss_after − loss_before) / m(α)
    damping: float             #: λ after the Levenberg–Marquardt update
    cg: CGResult               #: the solve (iterations, reason, model values)


class _Layout:
    """Maps the parameters to and from the solver's layer buffers (numpy, the handle's dtype)."""

    def __init__(self, params: List[torch.Tensor], optimizer: Optimizer, kfac_layers=None):
        self.params = params
        self.optimizer = optimizer
        self.dtype = optimizer.dtype
        self.kfac_layers = kfac_layers
        self.n = sum(p.numel() for p in params)

    def to_buffers(self, tensors: Sequence[torch.Tensor]):
        ws, bs = [], []
        if self.kfac_layers is None:
            shape = self.optimizer._layers[0].weight_shapes[0]
            flat = np.zeros(shape[0] * shape[1], self.dtype)
            flat[:self.n] = torch.cat([t.detach().reshape(-1).to("cpu", torch.float64) for t in tensors]).numpy()
            return [flat.reshape(shape)], [None]
        it = iter(tensors)
        for layer, shapes in zip(self.kfac_layers, self.optimizer._layers):
            ws.append(next(it).detach().to("cpu").numpy().astype(self.dtype).reshape(shapes.weight_shapes[0]))
            bs.append(next(it).detach().to("cpu").numpy().astype(self.dtype) if shapes.has_bias else None)
        return ws, bs

    def from_buffers(self, ws, bs) -> List[torch.Tensor]:
        out = []
        if self.kfac_layers is None:
            flat = torch.from_numpy(np.ascontiguousarray(ws[0]).reshape(-1)[:self.n])
            offset = 0
            for p in self.params:
                out.append(flat[offset:offset + p.numel()].reshape(p.shape).to(device=p.device, dtype=p.dtype))
                offset += p.numel()
            return out
        it = iter(self.params)
        for w, b in zip(ws, bs):
            p = next(it)
            out.append(torch.from_numpy(np.ascontiguousarray(w)).reshape(p.shape).to(device=p.device, dtype=p.dtype))
            if b is not None:
                p = next(it)
                out.append(torch.from_numpy(np.ascontiguousarray(b)).to(device=p.device, dtype=p.dtype))
        return out


class NewtonCG:
    """Subsampled Newton-CG with Levenberg–Marquardt damping for an ``nn.Module``.

    Args:
        model: the module; every parameter with ``requires_grad`` is trained.
        preconditioner: ``None``, ``"diagonal"`` or a ``KFACPreconditioner`` of ``model`` (its
            statistics and inverses are the caller's to keep current: record them with its hooks
            and call its ``step()`` or ``optimizer.update_inverses()``). It may be constructed
            before any forward pass, with convolutions whose input size is not known yet: the
            solver binds to its layers when they are registered (by the caller's first training
            forward pass, or at the first :meth:`step`, which then takes the unknown sizes from
            its batch). Every trainable parameter must belong to one of its layers
            (``ValueError`` here, checked again at that binding).
        damping: λ₀ (simpleNN: 1). With a KFACPreconditioner, λ is its ``damping`` parameter.
        lm_decay, lm_interval: the Levenberg–Marquardt rule (2/3 and 1: simpleNN's schedule).
        stop_rule, tolerance, max_iterations, warm_start, warm_start_decay, diagonal_exponent:
            the CG options (:class:`libkfac.newton_cg.NewtonCG`).
        l2: η; ``½η‖θ‖²`` is added to the loss and η to the curvature.
        line_search: Armijo backtracking on α (otherwise α = 1).
        curvature_product: ``f(vectors) -> products`` (lists of tensors shaped like
            :attr:`parameters`, in that order) replacing the ``torch.func`` Gauss-Newton product,
            e.g. ``ColumnRecorder(model, ...).curvature_product`` after ``record`` on the
            curvature batch.
    """

    def __init__(self, model: torch.nn.Module, *, preconditioner=None, damping: float = 1.0,
                 lm_decay: float = 2 / 3, lm_interval: int = 1, stop_rule: str = "residual",
                 tolerance: Optional[float] = None, max_iterations: int = 250, warm_start: bool = False,
                 warm_start_decay: float = 0.95, diagonal_exponent: float = 0.75, l2: float = 0.0,
                 line_search: bool = True, curvature_product: Optional[Callable] = None):
        self.model = model
        self._hooked_modules = []
        self._kfac = None
        self.l2 = float(l2)
        self.line_search = line_search
        self.curvature_product = curvature_product
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        kind = "none"
        if preconditioner is None or preconditioner == "none":
            params = [p for _, p in named]
            n = sum(p.numel() for p in params)
            cols = max(1, math.isqrt(max(n - 1, 0)) + 1)
            rows = -(-n // cols)
            self._owner = Optimizer(np.float64, damping=damping, lm_decay=lm_decay, lm_interval=lm_interval)
            self._owner.add_dense(cols, rows, bias=False)
            layout = _Layout(params, self._owner)
        elif preconditioner == "diagonal":
            params = [p for _, p in named]
            n = sum(p.numel() for p in params)
            cols = max(1, math.isqrt(max(n - 1, 0)) + 1)
            rows = -(-n // cols)
            self._owner = Optimizer(np.float64, damping=damping, lm_decay=lm_decay, lm_interval=lm_interval)
            self._owner.add_dense(cols, rows, bias=False)
            layout = _Layout(params, self._owner)
            kind = "diagonal"
        else:
            kfac = preconditioner
            if not hasattr(kfac, "_adaptive_parameters"):
                raise TypeError("NewtonCG: preconditioner must be None, 'diagonal' or a KFACPreconditioner")
            # The preconditioner's layers (and so the parameters and their order) are fixed at its
            # construction; their library registration may come later (a convolution's input size
            # is known only at the first training forward pass): the layout is bound then, lazily.
            params = kfac._adaptive_parameters()
            self._check_covered(model, params)
            self._owner = kfac.optimizer
            self._owner.set_param("lm_decay", lm_decay)
            self._owner.set_param("lm_interval", lm_interval)
            self._kfac = kfac
            layout = None
            kind = "kfac"
            self._hooked_modules = [layer.module for layer in kfac._layers]
        name_of = {id(p): name for name, p in model.named_parameters(remove_duplicate=False)}
        self._names = [name_of[id(p)] for p in params]
        self._params = params
        self._layout = layout
        self._kind = kind
        self._cg = _NumpyNewtonCG(self._owner, preconditioner=kind, stop_rule=stop_rule, tolerance=tolerance,
                                  max_iterations=max_iterations, warm_start=warm_start,
                                  warm_start_decay=warm_start_decay, diagonal_exponent=diagonal_exponent, l2=l2)
        if self._kfac is not None and self._kfac._registered:
            self._bind_kfac(())

    @staticmethod
    def _check_covered(model: torch.nn.Module, params: List[torch.Tensor]) -> None:
        covered = {id(p) for p in params}
        missing = [name for name, p in model.named_parameters() if p.requires_grad and id(p) not in covered]
        if missing:
            raise ValueError(
                "NewtonCG: with K-FAC preconditioning every trainable parameter must belong to a layer "
                f"of the KFACPreconditioner; not covered: {', '.join(missing)}")

    def _bind_kfac(self, args: tuple) -> None:
        """With a KFACPreconditioner: registers its layers if nothing did yet — convolutions of
        unknown input size take it from this step's batch (one forward pass without statistics)
        — checks again that it covers every trainable parameter, and binds the solver's layout
        to its (registered) layers. Nothing to do once bound, unless the preconditioner's handle
        changed (a failed registration replaces it)."""
        kfac = self._kfac
        if not kfac._registered:
            missing = [layer for layer in kfac._layers if layer.is_conv and layer.input_size is None]
            if missing:
                seen = {}

                def hook_for(layer):
                    def pre(module, inputs):
                        if inputs and layer.index not in seen:
                            seen[layer.index] = layer.spatial_size(inputs[0])
                    return pre

                handles = [layer.module.register_forward_pre_hook(hook_for(layer)) for layer in missing]
                try:
                    with torch.no_grad(), kfac._hooks_paused():
                        self.model(*args)
                finally:
                    for h in handles:
                        h.remove()
                for layer in missing:
                    if layer.index in seen:
                        layer.input_size = seen[layer.index]
            kfac._register()   # ValueError naming any convolution still of unknown size
        self._check_covered(self.model, self._params)
        if self._layout is None or self._owner is not kfac.optimizer:
            self._owner = kfac.optimizer
            self._layout = _Layout(self._params, self._owner, kfac._layers)
            self._cg.optimizer = self._owner

    @property
    def parameters(self) -> List[torch.Tensor]:
        """The trained parameters in the solver's order: the model's trainable parameters, or with
        a KFACPreconditioner its layers' weights and biases (the order ``curvature_product``
        receives and returns; ``libkfac.torch.ColumnRecorder.curvature_product`` accepts both)."""
        return list(self._params)

    @property
    def damping(self) -> float:
        """λ (the library's ``damping`` parameter of the solver's handle)."""
        owner = self._kfac.optimizer if self._kfac is not None else self._owner
        return float(owner.get_param("damping"))

    @contextlib.contextmanager
    def _hooks_suspended(self):
        """The KFACPreconditioner's module hooks are off during a step (torch.func transforms
        cannot run through them; statistics are recorded by the caller's own passes)."""
        saved = []
        for m in self._hooked_modules:
            saved.append((m, m._forward_pre_hooks, m._forward_hooks, m._backward_pre_hooks, m._backward_hooks))
            m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
            m._backward_pre_hooks, m._backward_hooks = OrderedDict(), OrderedDict()
        try:
            yield
        finally:
            for m, fp, f, bp, b in saved:
                m._forward_pre_hooks, m._forward_hooks, m._backward_pre_hooks, m._backward_hooks = fp, f, bp, b

    def _loss(self, loss_fn, args, targets, values=None):
        if values is None:
            out = self.model(*args)
        else:
            out = torch.func.functional_call(self.model, dict(zip(self._names, values)), args)
        loss = loss_fn(out, targets)
        if self.l2:
            ps = self._params if values is None else values
            loss = loss + 0.5 * self.l2 * sum((p * p).sum() for p in ps)
        return loss

    def _gauss_newton(self, args, targets, loss_fn):
        """G·v on a batch by torch.func: one forward pass (linearize + vjp share it)."""
        from torch.func import functional_call, grad, jvp, linearize, vjp

        primals = tuple(p.detach() for p in self._params)

        def forward(*values):
            return functional_call(self.model, dict(zip(self._names, values)), args)

        with warnings.catch_warnings():
            # torch.func.linearize's graph constant folding warns about PyTorch internals (and
            # its forward-AD decompositions about torch.jit.script), not about this code.
            warnings.filterwarnings("ignore", message=r".*get_attr Node with no underlying reference.*")
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
            out, jvp_fn = linearize(forward, *primals)
        _, vjp_fn = vjp(forward, *primals)
        out = out.detach()
        loss_grad = grad(lambda o: loss_fn(o, targets))

        def product(vectors: List[torch.Tensor]) -> List[torch.Tensor]:
            jv = jvp_fn(*vectors)
            hjv = jvp(loss_grad, (out,), (jv,))[1]
            return list(vjp_fn(hjv))

        return product

    def _squared_gradients(self, args, targets, loss_fn) -> List[torch.Tensor]:
        """d = mean over the examples of the squared per-example gradients (vmap)."""
        from torch.func import functional_call, grad, vmap

        primals = tuple(p.detach() for p in self._params)

        def one(values, target, *example):
            batch = tuple(e.unsqueeze(0) for e in example)
            return loss_fn(functional_call(self.model, dict(zip(self._names, values)), batch), target.unsqueeze(0))

        per_example = vmap(grad(one), in_dims=(None, 0) + (0,) * len(args))(primals, targets, *args)
        return [(g * g).mean(0) for g in per_example]

    def step(self, inputs, targets, loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
             curvature_indices=None) -> NewtonCGStepResult:
        """One Newton-CG iteration: updates the parameters in place.

        Args:
            inputs: the batch (a tensor, or a tuple of tensors indexed along dimension 0).
            targets: its targets (a tensor indexed along dimension 0).
            loss_fn: ``loss_fn(outputs, targets)``, the MEAN loss (e.g. ``F.cross_entropy``;
                ``0.5 * ((out - y) ** 2).sum(-1).mean()`` for squared error).
            curvature_indices: the examples of the curvature batch (default: all), e.g.
                ``torch.randperm(n)[: n // 20]`` for simpleNN's 5%: the gradient is always
                taken on the whole batch, G on this subsample.
        """
        args = inputs if isinstance(inputs, tuple) else (inputs,)
        if curvature_indices is None:
            cargs, ctargets = args, targets
        else:
            cargs = tuple(a[curvature_indices] for a in args)
            ctargets = targets[curvature_indices]
        if self._kfac is not None:
            self._bind_kfac(args)
        with self._hooks_suspended():
            return self._step(args, targets, loss_fn, cargs, ctargets)

    def _step(self, args, targets, loss_fn, cargs, ctargets) -> NewtonCGStepResult:
        loss = self._loss(loss_fn, args, targets)
        grads = torch.autograd.grad(loss, self._params)
        loss_before = float(loss.detach())
        product = self.curvature_product
        if product is None:
            with torch.no_grad():
                product = self._gauss_newton(cargs, ctargets, loss_fn)
        layout = self._layout
        gw, gb = layout.to_buffers(grads)
        diag = {}
        if self._kind == "diagonal":
            with torch.no_grad():
                dw, db = layout.to_buffers(self._squared_gradients(cargs, ctargets, loss_fn))
            diag = dict(diagonal_weights=dw, diagonal_biases=db)

        def numpy_product(vw, vb):
            with torch.no_grad():
                out = product(layout.from_buffers(vw, vb))
            return layout.to_buffers(out)

        sw, sb, res = self._cg.solve(gw, gb, numpy_product, **diag)
        step = layout.from_buffers(sw, sb)
        originals = [p.detach().clone() for p in self._params]

        def loss_at(alpha: float) -> float:
            with torch.no_grad():
                for p, p0, s in zip(self._params, originals, step):
                    p.copy_(p0 + alpha * s)
                return float(self._loss(loss_fn, args, targets))

        alpha, loss_after = 1.0, loss_at(1.0)
        if self.line_search:
            while not loss_after - loss_before <= 1e-4 * alpha * res.grad_dot_step and alpha > 2 ** -30:
                alpha *= 0.5
                loss_after = loss_at(alpha)
        if not math.isfinite(loss_after):
            loss_at(0.0)
            self._cg.report_loss_change(loss_before, math.inf, step_scale=alpha)
            raise KFACError(_lib.KFAC_ERROR_NON_FINITE,
                            f"the loss after the Newton-CG step is {loss_after}; the step was undone and λ increased")
        rho = self._cg.report_loss_change(loss_before, loss_after, step_scale=alpha)
        return NewtonCGStepResult(loss_before, loss_after, alpha, rho, self.damping, res)
