"""K-FAC's adaptive update of a model (Martens & Grosse 2015, §6–7):
:meth:`KFACPreconditioner.adaptive_step`, with forward-mode products by ``torch.func.jvp``."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable, List, Tuple

import numpy as np
import torch

from .. import _lib
from .._convert import distribution_code
from .._errors import KFACError
from .._handle import Handle
from ._traced_jvp import traced_products

__all__ = ["AdaptiveStepResult"]


@dataclass(frozen=True)
class AdaptiveStepResult:
    """What :meth:`KFACPreconditioner.adaptive_step` did."""

    #: α: the update was ``θ ← θ − α·D + μ·δ₀``.
    alpha: float
    #: μ, the momentum coefficient (0 on the first adaptive step).
    mu: float
    #: M(δ), the change of the mean loss the quadratic model predicted (negative).
    predicted_change: float
    #: The mean loss before the update (at the outputs the products were taken at).
    loss_before: float
    #: The mean loss after the update (NaN when it was not evaluated: see ``loss_evaluated``).
    loss_after: float
    #: ρ = (loss_after − loss_before) / M(δ) (NaN when the loss after was not evaluated).
    rho: float
    #: λ after the report (the Levenberg–Marquardt rule may have changed it).
    damping: float
    #: The index of the direction candidate whose update was applied (0 unless this was a γ step
    #: and another factor damping lowered the quadratic model more).
    chosen: int = 0
    #: The number of direction candidates of the step: 1, or up to 3 on a γ step
    #: (``factor_damping_period``).
    candidates: int = 1
    #: γ after the step: the library's ``factor_damping``, the chosen candidate's γ after a γ
    #: step (0 while λ damps the factors).
    factor_damping: float = 0.0
    #: Whether the loss after the update was evaluated and reported: on every step with
    #: ``every_step_loss=True``, else only when the report adjusts λ (every ``lm_interval``-th).
    loss_evaluated: bool = True


class _AdaptiveBuffers:
    """Buffers the adaptive step reuses across steps, one per preconditioned parameter (weights
    and biases in library order), CPU and contiguous in the library's dtype, with the ctypes
    pointer arrays the library is called with."""

    __slots__ = ("key", "directions", "direction_pointers", "update", "update_pointers")

    def __init__(self, key, handle: Handle, layers, dtype: torch.dtype):
        self.key = key
        self.directions: List[torch.Tensor] = []
        self.update: List[torch.Tensor] = []
        addresses = {"directions": ([], []), "update": ([], [])}
        for layer in layers:
            for name, target in (("directions", self.directions), ("update", self.update)):
                weight = torch.zeros(layer.module.weight.shape, dtype=dtype)
                target.append(weight)
                addresses[name][0].append(weight.data_ptr())
                if layer.module.bias is not None:
                    bias = torch.zeros(layer.module.bias.shape, dtype=dtype)
                    target.append(bias)
                    addresses[name][1].append(bias.data_ptr())
                else:
                    addresses[name][1].append(0)
        self.direction_pointers = handle.pointer_arrays(*addresses["directions"])
        self.update_pointers = handle.pointer_arrays(*addresses["update"])



class AdaptiveMixin:
    """:meth:`adaptive_step` and the buffers it reuses."""

    #: Batched products written out over the model's fx trace by :mod:`._traced_jvp` instead of
    #: ``torch.func`` (the same values to rounding; tests switch it off to compare).
    _use_traced_products = True

    def _adaptive_parameters(self) -> List[torch.Tensor]:
        """The weights and biases of the preconditioned layers, in library order."""
        params: List[torch.Tensor] = []
        seen = set()
        for layer in self._layers:
            for p in (layer.module.weight, layer.module.bias):
                if p is None:
                    continue
                if id(p) in seen:
                    raise ValueError(
                        f"KFACPreconditioner.adaptive_step: layer {layer.name!r} shares a parameter with "
                        "another preconditioned layer; the adaptive step cannot update it once per step"
                    )
                seen.add(id(p))
                params.append(p)
        return params

    def _buffers_for(self, params: List[torch.Tensor]) -> _AdaptiveBuffers:
        """The adaptive step's reusable buffers, rebuilt only if the parameters changed."""
        key = tuple((id(p), tuple(p.shape)) for p in params)
        buffers = self._adaptive_buffers
        if buffers is None or buffers.key != key:
            buffers = _AdaptiveBuffers(key, self.optimizer.handle, self._layers, self._dtype)
            self._adaptive_buffers = buffers
        return buffers

    def adaptive_step(self, inputs, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                      distribution="categorical", momentum: bool = True,
                      batched_products: bool = True, every_step_loss: bool = False) -> AdaptiveStepResult:
        """K-FAC's adaptive update of the preconditioned layers (Martens & Grosse 2015, §6–7):
        step size α and momentum μ from the quadratic model with the exact Fisher,
        Levenberg–Marquardt adjustment of λ (with ``lm_interval > 0``) and, with
        ``factor_damping_period > 0``, the periodic re-choice of the factor damping γ (§6.6).

        Call it after :meth:`step`, INSTEAD of ``optimizer.step()`` for these layers::

            preconditioner = KFACPreconditioner(model, kl_clip=0, damping=1e-2, lm_interval=5,
                                                factor_damping=1e-2, factor_damping_period=20)
            for x, y in loader:
                model.zero_grad()
                loss = F.cross_entropy(model(x), y)         # the MEAN loss
                loss.backward()
                preconditioner.step()                       # .grad now holds the directions D
                result = preconditioner.adaptive_step(x, lambda out: F.cross_entropy(out, y))

        The library prepares one set of directions per candidate factor damping: one (D, what
        :meth:`step` wrote into ``.grad``) on an ordinary step, and on a γ step (every
        ``factor_damping_period`` steps) up to three, D_k for γ, γ·ω₂ and γ/ω₂. For each
        candidate this method fetches D_k from the library into buffers it reuses from step to
        step (:meth:`kfac.Optimizer.candidate_directions`) and computes ``J·D_k``, the
        derivative of the outputs along D_k, with forward-mode differentiation
        (``torch.func.jvp`` over ``torch.func.functional_call``); it also computes ``J·δ₀``
        along δ₀, the update it applied last. The library
        (:meth:`kfac.Optimizer.solve_step_size_candidates`) chooses α_k and μ_k for every
        candidate and keeps the one with the lowest M(δ_k), which on a γ step also becomes the
        new γ. This method then applies ``θ ← θ + δ`` with the update ``δ = −α·D_chosen + μ·δ₀``
        the library returns (:meth:`kfac.Optimizer.get_update`; it is also the next δ₀, the same
        values the library keeps) to the weights and biases of the preconditioned layers (other
        parameters are yours to update). On the steps whose report adjusts λ (every
        ``lm_interval``-th, :attr:`kfac.Optimizer.report_needed`) it evaluates the loss again and
        reports both losses (ρ, λ); on the others it skips that forward pass, as Martens & Grosse
        (§6.5) and kfac-jax do, since λ uses no other ρ (``every_step_loss=True`` evaluates and
        reports every step). The statistics hooks are off during its forward passes.

        Cost: one forward-mode pass for all the products (J·D_k for every candidate and J·δ₀:
        ``torch.func.vmap`` over their tangents, so the network's forward pass is shared and its
        tangent products are batched; for a model whose ``torch.fx`` trace only composes
        ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` layers (zero padding), tanh, sigmoid and
        ReLU, sums (residual connections) and reshapes, without user hooks, the same products are
        written out by hand, ``_traced_jvp``, which avoids ``torch.func``'s per-operation
        dispatch and takes the layers' inputs and the output from the training forward pass on
        the same batch, so that a chain computes no primal pass again — once ``adaptive_step``
        was used, the hooks keep that pass's layer inputs and output until the next step; they
        are used only if ``inputs`` are the same tensors and no parameter, kept value or
        training flag changed since), one ordinary forward pass on the steps whose report
        adjusts λ, and on γ steps the library's two extra preconditionings (with the Cholesky
        strategy, every factor is also inverted for each candidate γ on that step; make
        ``factor_damping_period`` a multiple of ``inverse_update_period`` to share the work).
        Measured by benchmarks/probes/adaptive_cost.py (the convergence benchmark's models at
        batch 256, one thread, an idle 2-core VM, medians of 190 steps, one run): an adaptive
        step costs 1.39× a fixed-damping K-FAC step on ``ae-digits``, 1.43× on the residual
        ``mlp-mnist1d`` and 1.44× on ``cnn-mnist1d`` (1.47×, 1.48×, 1.54× evaluating the loss
        every step; 1.72×, 1.72×, 1.67× with ``torch.func``'s vmapped jvp).

        Args:
            inputs: the batch, as the model takes it: a tensor, or a tuple of positional
                arguments.
            loss_fn: ``loss_fn(outputs)`` returns the loss of the batch from the model's
                outputs, summed over the output dimension and averaged over examples, matching
                ``distribution`` (``F.cross_entropy`` for ``'categorical'``,
                ``F.binary_cross_entropy_with_logits(out, y, reduction="sum") / out.shape[0]``
                for ``'bernoulli'`` — PyTorch's default also averages over the outputs, which
                scales the loss but not the Fisher the library uses, and spoils α and ρ —, and
                ``0.5 * ((out - y) ** 2).sum(-1).mean()`` for ``'gaussian'``).
            distribution: the outputs' predictive distribution, over their last dimension.
            momentum: ``False`` chooses α alone (μ = 0, no J·δ₀ product): the update is −α·D.
            batched_products: ``False`` computes the products one ``jvp`` per tangent, each
                with its own forward pass (the same values to rounding; for models that
                ``torch.func.vmap`` cannot batch).
            every_step_loss: ``True`` evaluates the loss after the update on every step, so
                that every result has ρ and every update is checked for a finite loss; the
                default evaluates it only when the report adjusts λ (the same λ, parameters and
                updates either way). With ``lm_interval=0`` the default never evaluates it.

        The model's forward pass must be a deterministic function of the parameters and the
        batch (no dropout; BatchNorm in eval mode) returning one tensor. Set ``kl_clip=0``
        (α replaces the clip) and keep ``loss_reduction='mean'``. Returns an
        :class:`AdaptiveStepResult` (α, μ, M(δ), the losses, ρ, λ, the chosen candidate and γ).
        ``.grad`` keeps the directions of candidate 0. If the loss after the update is not
        finite, the update is undone and :class:`kfac.KFACError` (``KFAC_ERROR_NON_FINITE``) is
        raised; on a step that skips the evaluation a divergent update shows in the next
        step's gradients instead (the library refuses non-finite gradients).
        """
        from torch.func import functional_call, jvp

        code = distribution_code(distribution)
        if not self._directions_ready:
            raise KFACError(
                _lib.KFAC_ERROR_NO_STEP,
                "adaptive_step uses the directions of the last step(): call preconditioner.step() "
                "first (one adaptive_step per step)",
            )
        if self.optimizer.loss_reduction != "mean":
            raise ValueError(
                "KFACPreconditioner.adaptive_step: the adaptive mode models the MEAN loss; construct "
                "the preconditioner with loss_reduction='mean' and differentiate a mean loss"
            )
        params = self._adaptive_parameters()
        name_of = {id(p): name for name, p in self.model.named_parameters(remove_duplicate=False)}
        names = [name_of[id(p)] for p in params]
        buffers = self._buffers_for(params)
        count = self.optimizer.candidate_count()
        if count < 1:
            self._directions_ready = False
            raise KFACError(
                _lib.KFAC_ERROR_NO_STEP,
                "the library has no directions awaiting a solve: call preconditioner.step() first",
            )
        previous = self._previous_update
        args = inputs if isinstance(inputs, tuple) else (inputs,)

        def forward(*values):
            return functional_call(self.model, dict(zip(names, values)), args)

        def tangents(tensors: List[torch.Tensor]) -> Tuple[torch.Tensor, ...]:
            # No copy when the parameter is a CPU tensor of the library's dtype.
            return tuple(t.to(device=p.device, dtype=p.dtype) for t, p in zip(tensors, params))

        outputs = jp = None
        direction_products: List[torch.Tensor] = []
        primals = tuple(p.detach() for p in params)
        with_previous = previous is not None and momentum
        # Forward mode needs no autograd graph: no_grad also keeps the backward hooks out.
        with torch.no_grad(), self._hooks_paused(), warnings.catch_warnings():
            # PyTorch's own forward-AD decompositions use torch.jit.script the first time (a
            # FutureWarning about PyTorch internals, not about this code).
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
            if batched_products:
                # Every tangent stacked along a new leading dimension: the candidates' D_k, then δ₀.
                n = count + (1 if with_previous else 0)
                stacked = [torch.empty((n,) + tuple(p.shape), dtype=p.dtype, device=p.device) for p in params]
                for k in range(count):
                    self.optimizer.handle.candidate_directions(k, buffers.direction_pointers)
                    for s, d in zip(stacked, buffers.directions):
                        s[k].copy_(d)
                if with_previous:
                    for s, d in zip(stacked, previous):
                        s[count].copy_(d)
                # Linear and convolution layers, activations, sums and reshapes: the same
                # products written out (_traced_jvp), without torch.func's per-operation dispatch.
                traced = None
                if self._use_traced_products:
                    # The layer inputs and outputs of the training forward pass on this batch, when
                    # nothing changed since: the products then compute no primal pass.
                    kept, self._forward_values = self._forward_values, None
                    known = kept.values_for(self.model, args) if kept is not None else None
                    traced = traced_products(self.model, args, params, stacked, {h.id for h in self._hooks}, known)
                    # Keep the next training pass's values only for a model the products handle.
                    self._keep_forward_values = traced is not None
                if traced is not None:
                    outputs, products = traced
                else:
                    # The primal computation does not depend on the tangents: vmap runs it once.
                    out, products = torch.func.vmap(lambda *t: jvp(forward, primals, t))(*stacked)
                    outputs = out[0]
                direction_products = [products[k] for k in range(count)]
                jp = products[count] if with_previous else None
            else:
                for k in range(count):
                    self.optimizer.handle.candidate_directions(k, buffers.direction_pointers)
                    out, jd = jvp(forward, primals, tangents(buffers.directions))
                    if outputs is None:
                        outputs = out
                    direction_products.append(jd)
                if with_previous:
                    jp = jvp(forward, primals, tuple(previous))[1]
        if not isinstance(outputs, torch.Tensor) or outputs.dim() < 1:
            raise TypeError("KFACPreconditioner.adaptive_step: the model must return one tensor of outputs")
        dim = outputs.shape[-1]

        def rows(t: torch.Tensor) -> np.ndarray:
            return t.detach().to(device="cpu", dtype=self._dtype).reshape(-1, dim).numpy()

        with torch.no_grad():
            loss_before = float(loss_fn(outputs))
        chosen, alpha, mu, predicted = self.optimizer.solve_step_size_candidates(
            rows(outputs), [rows(jd) for jd in direction_products], None if jp is None else rows(jp), code)
        self._directions_ready = False
        # δ = −α·D_chosen + μ·δ₀ as the library computed it (its next δ₀).
        self.optimizer.handle.get_update(buffers.update_pointers)
        update = []
        with torch.no_grad():
            for p, delta in zip(params, buffers.update):
                delta = delta.to(device=p.device, dtype=p.dtype)
                p.add_(delta)
                update.append(delta)
        # Our δ₀ is now the library's (also if the update is undone below). When the update
        # buffers are the parameters' dtype and device, δ₀ is those buffers themselves: the next
        # step reads them for J·δ₀ before get_update overwrites them.
        self._previous_update = update
        if not every_step_loss and not self.optimizer.report_needed:
            self.optimizer.skip_loss_report()
            return AdaptiveStepResult(alpha, mu, predicted, loss_before, math.nan, math.nan, self.optimizer.damping,
                                      chosen, count, self.optimizer.factor_damping, loss_evaluated=False)
        with torch.no_grad(), self._hooks_paused():
            loss_after = float(loss_fn(self.model(*args)))
        if not math.isfinite(loss_after):
            with torch.no_grad():
                for p, delta in zip(params, update):
                    p.sub_(delta)
            raise KFACError(
                _lib.KFAC_ERROR_NON_FINITE,
                f"the loss after the adaptive update (α = {alpha:.4g}, μ = {mu:.4g}) is {loss_after}; "
                "the update was undone. Increase the damping",
            )
        rho = self.optimizer.report_loss_change(loss_before, loss_after)
        return AdaptiveStepResult(alpha, mu, predicted, loss_before, loss_after, rho, self.optimizer.damping,
                                  chosen, count, self.optimizer.factor_damping)

