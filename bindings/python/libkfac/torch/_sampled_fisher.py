"""The true Fisher: a step's output-gradient statistics from targets sampled from the model
(:meth:`KFACPreconditioner.sampled_fisher_backward`)."""

from __future__ import annotations

from typing import Optional

import torch

from .._convert import distribution_code
from ..sampling import sampled_output_grads


class SampledFisherMixin:
    """:meth:`sampled_fisher_backward`, on top of the hooks of :class:`HooksMixin`."""

    def sampled_fisher_backward(self, outputs: torch.Tensor, distribution="categorical",
                                seed: Optional[int] = None) -> bool:
        """Records this step's output-gradient statistics from targets sampled from the model
        (the true Fisher), instead of from the loss's gradients (the empirical Fisher).

        Call it after the forward pass and BEFORE ``loss.backward()``::

            outputs = model(x)
            loss = F.cross_entropy(outputs, y)
            preconditioner.sampled_fisher_backward(outputs, "categorical")
            loss.backward()            # records nothing: only the gradients for the update
            preconditioner.step()

        It draws targets from the predictive distribution at ``outputs``
        (:func:`kfac.sampled_output_grads`: ``p − y`` for sampled ``y``), scales them like the
        gradient of a loss reduced as ``loss_reduction`` says (``'mean'``: over all rows of
        ``outputs``) and by ``output_grad_scale``, and back-propagates them with
        ``torch.autograd.grad`` (``retain_graph=True``): the layers' backward hooks record
        them, and no parameter's ``.grad`` changes. From the first call on, the hooks record
        only inside this method, so the loss's own backward passes add nothing. When the
        library wants no statistics this step (``factor_update_period``), in eval mode or under
        ``torch.no_grad()``, nothing was saved by the forward pass and it returns ``False``
        without a backward pass; otherwise ``True``.

        Args:
            outputs: the model's outputs of this step's forward pass, ``[..., output_dim]``
                with the distribution over the last dimension (move a class dimension last,
                e.g. ``outputs.movedim(1, -1)``, for ``[N, C, H, W]`` logits).
            distribution: ``'categorical'`` (softmax cross-entropy), ``'bernoulli'``
                (sigmoid binary cross-entropy) or ``'gaussian'`` (squared error).
            seed: the sampler's seed; ``None`` uses a counter of this preconditioner's calls.
                Use a different seed for every call (draws depend only on seed, row and
                coordinate).

        Raises ``RuntimeError`` if ``loss.backward()`` already recorded statistics this step
        (call this first), ``ValueError`` if ``outputs`` does not require gradients.
        """
        if not isinstance(outputs, torch.Tensor):
            raise TypeError(f"KFACPreconditioner: outputs must be a tensor, not {type(outputs).__name__}")
        code = distribution_code(distribution)
        if self._loss_backward_recorded:
            raise RuntimeError(
                "KFACPreconditioner.sampled_fisher_backward: loss.backward() already recorded this "
                "step's statistics (from the data's targets); call sampled_fisher_backward(outputs) "
                "after the forward pass and before loss.backward()"
            )
        self._sampled_fisher = True
        if not any(layer.saved_inputs for layer in self._layers):
            return False
        if outputs.dim() < 1 or outputs.shape[-1] == 0:
            raise ValueError(f"KFACPreconditioner: outputs of shape {tuple(outputs.shape)} have no output dimension")
        if not outputs.requires_grad:
            raise ValueError(
                "KFACPreconditioner.sampled_fisher_backward: outputs do not require gradients; pass "
                "the outputs of this step's training forward pass"
            )
        dim = outputs.shape[-1]
        rows = outputs.numel() // dim
        if seed is None:
            seed = self._sample_count
        self._sample_count += 1
        z = outputs.detach().to(device="cpu", dtype=self._dtype).contiguous().numpy()
        grad = torch.from_numpy(sampled_output_grads(z, code, seed))
        grad = grad.to(device=outputs.device, dtype=outputs.dtype)
        scale = self.optimizer.output_grad_scale
        if self.optimizer.loss_reduction == "mean":
            scale /= rows
        if scale != 1.0:
            grad = grad * scale
        # The gradients needed for every layer's backward hook to fire, and no more: a layer's
        # inputs where they require gradients (its hook fires when they are computed), else its
        # weight (a first layer's hook fires with its output gradient). The other layers' weight
        # gradients — half of a backward pass's work — are not computed. They are discarded.
        targets = [layer.module.weight for layer in self._layers if not layer.graph_inputs]
        targets += [t for layer in self._layers for t in layer.graph_inputs]
        self._in_sampled_backward = True
        try:
            torch.autograd.grad(outputs, targets, grad_outputs=grad, retain_graph=True, allow_unused=True)
        finally:
            self._in_sampled_backward = False
            # Inputs of layers the sampled gradients did not reach must not pair with a later pass.
            for layer in self._layers:
                layer.saved_inputs.clear()
                layer.graph_inputs.clear()
        return True

