"""EXPERIMENTAL curvature sources of the output-side factors other than the recorded gradients
(``curvature=`` of :class:`KFACPreconditioner`; ``kfac.h``, "Gauss-Newton products"):

- ``'kflr'``: G = (1/N) Σ_n Σ_k c c ᵀ from the K = output_dim columns of the output Hessian's
  square root S (``kfac_gn_output_hessian_sqrt``), back-propagated to every layer's output in one
  vmapped backward pass (``autograd.grad`` with ``is_grads_batched``; a loop of K passes where vmap
  fails) and recorded with ``uses=FACTOR``: the exact expectation of the per-example
  Gauss-Newton blocks (Botev et al. 2017).
- ``'mc'``: the same with ``mc_samples`` = S sampled output gradients per example
  (``kfac_sample_output_grads``, ``p − y`` at targets drawn from the model) divided by √S as the
  columns: the Monte-Carlo Fisher with S samples (S → ∞ gives KFLR).
- ``'kfra'``: for an ``nn.Sequential`` of ``nn.Linear`` layers and elementwise activations
  (``nn.ReLU``, ``nn.Tanh``, ``nn.Sigmoid``, ``nn.Identity``) ending with a Linear, the library's
  dense chain (``kfac_gn_chain_define`` / ``_forward`` on the weights and inputs of this step)
  runs KFRA's batch-averaged recursion (``kfac_gn_chain_record_kfra``, Gauss-Newton variant).

The input factors A come from the same forward pass's inputs. All three are recorded by
:meth:`KFACPreconditioner.curvature_backward`, called between the forward pass and
``loss.backward()`` (which then records nothing); no parameter's ``.grad`` changes.

Loss conventions. The factors are those of the MEAN over the examples of the per-example negative
log-likelihood ℓ_n — softmax cross-entropy (``'categorical'``), binary cross-entropy with logits
(``'bernoulli'``) or ½‖y − z‖² (``'gaussian'``) — whatever ``loss_reduction`` says (it applies
only to the recorded gradients of ``curvature='fisher'``): the columns are those of the summed
loss, S_n with S_n S_nᵀ = ∂²ℓ_n/∂z_n², and the library counts each example once. A mean-reduced
loss's own square roots would be S/√N, not S/N; they are not used here. ``F.cross_entropy`` and
``F.binary_cross_entropy_with_logits`` with ``reduction='mean'`` therefore match, as K-FAC's
default Fisher does; ``MSELoss`` (no ½, mean over N·d values) has 2/d times these curvatures,
which only rescales the damping. ``output_grad_scale`` is applied to the columns (the library
divides them by it), so a loss scaler needs no other change. Linear layers must see 2-D
``[N, in]`` inputs (one row per example) for ``'kflr'`` and ``'mc'``; convolutions batched NCHW
(``nn.Conv2d``) or NCL (``nn.Conv1d``, which the library registers as a 1×L convolution, so its
columns ``[K, N, C_out, L_out]`` are those of a ``[K, N, C_out, 1, L_out]`` conv2d) inputs; their
output factor is KFC's Γ = (1/(N|T|)) Σ_n Σ_t Σ_k c cᵀ over the |T| output positions. KFRA takes
``nn.Linear`` layers only.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from .._convert import distribution_code
from ..gauss_newton import GaussNewton, output_hessian_sqrt
from ..sampling import sampled_output_grads

CURVATURES = ("fisher", "kflr", "mc", "kfra")

_ACTIVATIONS = {nn.ReLU: "relu", nn.Tanh: "tanh", nn.Sigmoid: "logistic", nn.Identity: "identity"}


class CurvatureMixin:
    """``curvature=`` other than ``'fisher'``: :meth:`curvature_backward`."""

    def _init_curvature(self, curvature: str, mc_samples: int) -> None:
        if curvature not in CURVATURES:
            raise ValueError(f"KFACPreconditioner: curvature must be one of {CURVATURES}, got {curvature!r}")
        if int(mc_samples) < 1:
            raise ValueError(f"KFACPreconditioner: mc_samples must be >= 1, got {mc_samples}")
        self.curvature = curvature
        self.mc_samples = int(mc_samples)
        self._layer_outputs = {}
        self._chain = None       # KFRA: (GaussNewton, activations) once defined
        if curvature == "fisher":
            return               # the default path: no extra hooks
        if getattr(self, "_tridiagonal", False):
            raise ValueError(f"KFACPreconditioner: curvature={curvature!r} records output factors only; it does "
                             "not combine with tridiagonal=True (the links' cross factors need the hooks' paired "
                             "gradients)")
        if self.optimizer.inverse_strategy == "ekfac":
            # EKFAC's scaling S needs the real per-example gradients, which the library takes only
            # from kfac_layer_record_examples_*; that call also adds the same rows to G (exactly as
            # kfac_layer_record_output_grads_* would), so G would mix the empirical Fisher's rows
            # with the KFLR / MC columns. kfac.h has no paired recording for S alone.
            raise ValueError(f"KFACPreconditioner: curvature={curvature!r} does not combine with "
                             "inverse_strategy='ekfac': its scaling needs per-example gradients, which the "
                             "library records only together with the output factor's statistics "
                             "(kfac_layer_record_examples_* adds them to G as well), so G would no longer be "
                             f"{curvature!r}'s")
        for layer in self._layers:
            if curvature == "kfra" and layer.kind != "linear":
                raise ValueError(f"KFACPreconditioner: curvature={curvature!r} does not support "
                                 f"{layer.kind} layer {layer.name!r} (KFRA is for dense chains only)")
        if curvature == "kfra":
            self._kfra_activations = self._sequential_chain()
        for layer in self._layers:
            self._hooks.append(layer.module.register_forward_hook(self._make_output_hook(layer)))

    def _sequential_chain(self):
        """The activations between the preconditioned Linear layers of an nn.Sequential model."""
        if not isinstance(self.model, nn.Sequential):
            raise ValueError("KFACPreconditioner: curvature='kfra' needs an nn.Sequential of Linear layers and "
                             "elementwise activations")
        modules = list(self.model.children())
        linear = [layer.module for layer in self._layers]
        acts, previous_linear = [], None
        for m in modules:
            if isinstance(m, nn.Linear):
                if previous_linear:
                    acts.append("identity")   # two Linear layers in a row
                previous_linear = True
                continue
            kind = next((name for cls, name in _ACTIVATIONS.items() if isinstance(m, cls)), None)
            if kind is None or not previous_linear:
                raise ValueError(f"KFACPreconditioner: curvature='kfra' cannot chain {type(m).__name__} here "
                                 "(Linear layers with one ReLU/Tanh/Sigmoid/Identity between two of them only)")
            acts.append(kind)
            previous_linear = False
        chain = [m for m in modules if isinstance(m, nn.Linear)]
        if not previous_linear or len(chain) != len(linear) or any(a is not b for a, b in zip(chain, linear)):
            raise ValueError("KFACPreconditioner: curvature='kfra' needs an nn.Sequential that starts and ends with "
                             "a Linear, every Linear preconditioned, one elementwise activation between two of them")
        return acts + ["identity"]

    def _make_output_hook(self, layer):
        def output_hook(module, args, output):
            if self._paused or not self._recording(module):
                return None
            self._layer_outputs.setdefault(layer.index, []).append(output)
            return None

        return output_hook

    def curvature_backward(self, outputs: torch.Tensor, distribution="categorical", seed: Optional[int] = None) -> bool:
        """Records this step's statistics from the curvature chosen by ``curvature=`` (see
        ``_curvature``): call it after the forward pass and BEFORE ``loss.backward()``::

            outputs = model(x)
            loss = F.cross_entropy(outputs, y)
            preconditioner.curvature_backward(outputs, "categorical")
            loss.backward()            # records nothing: only the gradients for the update
            preconditioner.step()

        ``outputs`` ``[N, output_dim]`` are the forward pass's (the distribution over the last
        dimension). ``seed`` (``'mc'``): the sampler's seed, sample j of this call uses
        ``seed + j`` (``None``: a counter of this preconditioner's draws). Returns ``False``
        without recording when the library wants no statistics this step (nothing was saved by
        the forward pass), else ``True``. Raises ``RuntimeError`` with ``curvature='fisher'`` or
        after ``loss.backward()`` already recorded this step."""
        if self.curvature == "fisher":
            raise RuntimeError("KFACPreconditioner.curvature_backward: curvature='fisher' records the loss's "
                               "gradients in loss.backward(); choose curvature='kflr', 'mc' or 'kfra'")
        if self._loss_backward_recorded:
            raise RuntimeError("KFACPreconditioner.curvature_backward: loss.backward() already recorded this step; "
                               "call curvature_backward(outputs) before loss.backward()")
        code = distribution_code(distribution)
        self._sampled_fisher = True   # from now on the loss's backward passes record nothing
        try:
            if not any(layer.saved_inputs for layer in self._layers):
                return False
            if outputs.dim() != 2:
                raise ValueError(f"KFACPreconditioner: outputs must be [N, output_dim], got {tuple(outputs.shape)}")
            self._ensure_registered()
            if self.curvature == "kfra":
                self._record_kfra(code)
            else:
                self._record_columns(outputs, code, seed)
            return True
        finally:
            self._layer_outputs = {}
            for layer in self._layers:
                layer.saved_inputs.clear()
                layer.graph_inputs.clear()

    def _np_dtype(self):
        return np.float64 if self._dtype == torch.float64 else np.float32

    def _record_columns(self, outputs: torch.Tensor, code: int, seed: Optional[int]) -> None:
        z = outputs.detach().to(device="cpu", dtype=self._dtype).contiguous().numpy()
        if self.curvature == "kflr":
            s = output_hessian_sqrt(z, code)                                    # [K, N, d]
        else:
            k = self.mc_samples
            if seed is None:
                seed = self._sample_count
                self._sample_count += k
            s = np.stack([sampled_output_grads(z, code, seed + j) for j in range(k)]) / np.sqrt(k)
        s = torch.from_numpy(np.ascontiguousarray(s)).to(device=outputs.device, dtype=outputs.dtype)
        scale = self.optimizer.output_grad_scale
        if scale != 1.0:
            s = s * scale
        present = [layer for layer in self._layers if self._layer_outputs.get(layer.index) and layer.saved_inputs]
        for layer in present:
            if len(layer.saved_inputs) != 1 or len(self._layer_outputs[layer.index]) != 1:
                raise ValueError(f"KFACPreconditioner: layer {layer.name!r} ran more than once in the forward pass; "
                                 f"curvature={self.curvature!r} needs one call per layer")
            if layer.kind == "linear" and layer.saved_inputs[0].dim() != 2:
                raise ValueError(f"KFACPreconditioner: layer {layer.name!r} saw inputs of shape "
                                 f"{tuple(layer.saved_inputs[0].shape)}: one row per example")
            if layer.is_conv:
                # The columns are recorded as [K, N, C_out, *out]: a batched input whose first
                # dimension is the outputs' N (an unbatched [C, *size] input would make the
                # library read C_out examples of a single one's values).
                dims = 3 if layer.kind == "conv1d" else 4
                shape = tuple(layer.saved_inputs[0].shape)
                if len(shape) != dims or shape[0] != outputs.shape[0]:
                    raise ValueError(f"KFACPreconditioner: {layer.kind} layer {layer.name!r} saw inputs of shape "
                                     f"{shape}: curvature={self.curvature!r} needs batched "
                                     f"{'[N, C, L]' if dims == 3 else '[N, C, H, W]'} inputs with the outputs' "
                                     f"N = {outputs.shape[0]}")
        targets = [self._layer_outputs[layer.index][0] for layer in present]
        with torch.enable_grad():
            try:
                columns = torch.autograd.grad(outputs, targets, grad_outputs=s, is_grads_batched=True,
                                              retain_graph=True, allow_unused=True)
            except RuntimeError:
                per_k = [torch.autograd.grad(outputs, targets, grad_outputs=s[k], retain_graph=True, allow_unused=True)
                         for k in range(s.shape[0])]
                columns = [torch.stack([c[i] if c[i] is not None else torch.zeros_like(targets[i]) for c in per_k])
                           for i in range(len(targets))]
        gn = GaussNewton(self.optimizer)
        for layer, c in zip(present, columns):
            x = layer.saved_inputs[0]
            if layer.kind == "linear":
                self._record(layer.index, 0, x, layer.module.in_features)
            else:
                self._record_examples(layer, 0, x, layer.input_values)
            if c is None:
                c = torch.zeros((s.shape[0],) + tuple(targets[present.index(layer)].shape), dtype=outputs.dtype)
            gn.record_columns(layer.index, c.detach().to(device="cpu", dtype=self._dtype).contiguous().numpy(),
                              uses="factor")

    def _record_kfra(self, code: int) -> None:
        if self._chain is None or self._chain[1] != code:
            gn = GaussNewton(self.optimizer)
            gn.define_chain([layer.index for layer in self._layers], self._kfra_activations, code)
            self._chain = (gn, code)
        gn = self._chain[0]
        for layer in self._layers:
            if len(layer.saved_inputs) != 1:
                raise ValueError(f"KFACPreconditioner: curvature='kfra' needs one call of every chain layer per "
                                 f"forward pass; layer {layer.name!r} ran {len(layer.saved_inputs)} times")
        dt = self._np_dtype()

        def arr(t):
            return None if t is None else t.detach().to(device="cpu", dtype=self._dtype).contiguous().numpy().astype(dt, copy=False)

        modules = [layer.module for layer in self._layers]
        x = arr(self._layers[0].saved_inputs[0])
        if x.ndim != 2:
            raise ValueError(f"KFACPreconditioner: curvature='kfra' needs [N, in] inputs, got {x.shape}")
        gn.chain_forward([arr(m.weight) for m in modules], [arr(m.bias) for m in modules],
                         [x] + [arr(layer.saved_inputs[0]) for layer in self._layers[1:]])
        # The library divides Ḡ by output_grad_scale² (as it does the chain's own columns); the
        # chain's Ḡ involves no loss scaler here, so record it with the scale at 1.
        scale = self.optimizer.output_grad_scale
        if scale != 1.0:
            self.optimizer.output_grad_scale = 1.0
        try:
            gn.chain_record_kfra("ggn", record_inputs=True)
        finally:
            if scale != 1.0:
                self.optimizer.output_grad_scale = scale
