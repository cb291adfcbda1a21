"""The statistics hooks: a forward-pre hook per layer keeps its input (and notes a
convolution's input size), a backward pre-hook hands the input and the gradient at the layer's
output to the library, and a forward hook on the model registers the layers after the first
training forward pass."""

from __future__ import annotations

import contextlib
import warnings

import torch
from torch import nn

from ._registration import _Layer
from ._traced_jvp import KeptForward


class HooksMixin:
    """Installs, pauses and removes the hooks; records what they see."""

    def _install_hooks(self) -> None:
        self._hooks = []
        for layer in self._layers:
            self._hooks.append(layer.module.register_forward_pre_hook(self._make_forward_pre_hook(layer)))
            self._hooks.append(layer.module.register_full_backward_pre_hook(self._make_backward_hook(layer)))
        if not self._registered:
            # A closure, not the bound method: copy.deepcopy of the model must not copy self.
            self._hooks.append(self.model.register_forward_hook(
                lambda module, args, output: self._after_model_forward(module, args, output)))
        # The adaptive step's use of the training forward pass's values (_adaptive.py).
        before, after = self._make_forward_keeping_hooks()
        self._hooks.append(self.model.register_forward_pre_hook(before))
        self._hooks.append(self.model.register_forward_hook(after))

    def _recording(self, module: nn.Module) -> bool:
        return (
            module.training
            and torch.is_grad_enabled()
            and not self.optimizer.closed
            and self.optimizer.wants_statistics
        )

    def _make_forward_pre_hook(self, layer: _Layer):
        def forward_pre_hook(module, args):
            if self._paused or not args or not (module.training and torch.is_grad_enabled()):
                return None
            pending = self._pending_forward
            if pending is not None:  # kept for the adaptive step; a module called twice is ambiguous
                pending[module] = None if module in pending else args[0].detach()
            if layer.is_conv:
                size = layer.spatial_size(args[0])
                if layer.input_size is None:
                    layer.input_size = size  # the first training forward pass defines it
                elif size != layer.input_size:
                    raise ValueError(
                        f"KFACPreconditioner: {type(module).__name__} {layer.name!r} is registered for "
                        f"{layer.describe_size(layer.input_size)} inputs (the library fixes a "
                        f"convolution's input size), but got {layer.describe_size(size)}. Train "
                        "with one input size, or exclude the layer with skip_layers"
                    )
            if not self._recording(module):
                return None
            # Detached, no copy: the autograd graph keeps the same values alive for the weight
            # gradient anyway.
            layer.saved_inputs.append(args[0].detach())
            if args[0].requires_grad:
                layer.graph_inputs.append(args[0])
            return None

        return forward_pre_hook

    def _after_model_forward(self, module, args, output):
        """Registers the layers when the first training forward pass of the model returns."""
        if (module is self.model and not self._registered and not self._paused and module.training
                and torch.is_grad_enabled()):
            self._register()
        return None

    def _make_forward_keeping_hooks(self):
        """The model's hooks that keep a training forward pass's layer inputs and output, once the
        adaptive step was used (it reads them instead of computing them again). Closures, not
        bound methods, so that copy.deepcopy of the model does not copy the preconditioner; a
        copy's forward passes (``module`` is not this model) keep nothing."""

        def before(module, args):
            if module is not self.model:
                return None
            keep = self._keep_forward_values and not self._paused and module.training and torch.is_grad_enabled()
            self._pending_forward = {} if keep else None
            if keep:
                self._forward_values = None
            return None

        def after(module, args, output):
            if module is not self.model:
                return None
            pending, self._pending_forward = self._pending_forward, None
            if pending is not None and isinstance(output, torch.Tensor):
                self._forward_values = KeptForward(self.model, args, output, pending)
            return None

        return before, after

    def _make_backward_hook(self, layer: _Layer):
        # A backward PRE-hook: it receives the gradient at the module's output, which is all the
        # statistics need, and unlike a full backward hook it fires without PyTorch's warning
        # about modules whose inputs need no gradient (the first layer).
        def backward_hook(module, grad_output):
            # Pairs the gradient with the input of the same forward call: the backward pass
            # visits a module's calls in reverse order, hence pop() from the end.
            if not layer.saved_inputs or grad_output[0] is None:
                if (grad_output[0] is not None and self._loss_backward_recorded and not self._in_sampled_backward
                        and not self._warned_second_backward):
                    # A second backward through a forward pass whose statistics were recorded by
                    # the first (typically a sampled-target pass after loss.backward()): it
                    # records nothing, and the factors hold the first loss's (empirical) Fisher.
                    self._warned_second_backward = True
                    warnings.warn(
                        "KFACPreconditioner: a second backward pass through the same forward pass records "
                        "nothing; this step's statistics came from the first one. For the true Fisher call "
                        "preconditioner.sampled_fisher_backward(outputs) before loss.backward()",
                        UserWarning, stacklevel=2)
                return None
            if self._sampled_fisher and not self._in_sampled_backward:
                return None  # the loss's own backward pass: the sampled one records
            if not self._in_sampled_backward:
                self._loss_backward_recorded = True
            self._ensure_registered()
            inputs = layer.saved_inputs.pop()
            if not layer.saved_inputs:
                layer.graph_inputs.clear()  # only sampled_fisher_backward needs them
            if self._ekfac_pairs():
                self._record_pair(layer, inputs, grad_output[0])
            elif layer.is_conv:
                self._record_examples(layer, 0, inputs, layer.input_values)
                self._record_examples(layer, 1, grad_output[0], layer.grad_values)
            else:
                self._record(layer.index, 0, inputs, module.in_features)
                self._record(layer.index, 1, grad_output[0], module.out_features)
            return None

        return backward_hook

    def _buffer(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` itself when it is a contiguous CPU tensor of the library's dtype, else a
        contiguous CPU copy of that dtype."""
        tensor = tensor.detach()
        if tensor.device.type != "cpu" or tensor.dtype != self._dtype:
            tensor = tensor.to(device="cpu", dtype=self._dtype)
        return tensor.contiguous()

    def _record(self, index: int, side: int, tensor: torch.Tensor, features: int) -> None:
        if tensor.dim() < 1 or tensor.shape[-1] != features:
            raise ValueError(
                f"KFACPreconditioner: layer {self._layers[index].name!r} got a tensor of shape "
                f"{tuple(tensor.shape)}, expected [..., {features}]"
            )
        buffer = self._buffer(tensor)
        rows = buffer.numel() // features
        if rows == 0:
            return
        self.optimizer.handle.record(side, index, buffer.data_ptr(), rows)

    def _record_examples(self, layer: _Layer, side: int, tensor: torch.Tensor, values: int) -> None:
        """Records a convolution's input or output gradient: examples of ``values`` numbers."""
        if tensor.numel() % values:
            raise ValueError(
                f"KFACPreconditioner: {layer.kind} layer {layer.name!r} got "
                f"{'an input' if side == 0 else 'an output gradient'} of shape {tuple(tensor.shape)}, "
                f"not a whole number of examples of {values} values"
            )
        buffer = self._buffer(tensor)
        examples = buffer.numel() // values
        if examples == 0:
            return
        self.optimizer.handle.record(side, layer.index, buffer.data_ptr(), examples)

    def _ekfac_pairs(self) -> bool:
        """Whether the hooks record paired rows (``kfac_layer_record_examples_*``): with the EKFAC
        strategy, whose scaling needs per-example gradients. Otherwise the two unpaired calls."""
        return self.optimizer.inverse_strategy == "ekfac"

    def _record_pair(self, layer: _Layer, inputs: torch.Tensor, grads: torch.Tensor) -> None:
        """Records a layer's input and output gradient of one forward call as paired rows. An
        example is what PyTorch batches over: the first dimension. A ``Linear`` on
        ``[N, T, ..., in]`` records N·T rows in sequences of T (its per-example gradient sums
        over the T rows); a convolution records N examples (its positions from the geometry).
        Whether an example's rows are summed (exact) or counted one by one is the library's
        ``ekfac_mode`` (default exact)."""
        if layer.is_conv:
            values = (layer.input_values, layer.grad_values)
            for side, tensor in enumerate((inputs, grads)):
                if tensor.numel() % values[side]:
                    raise ValueError(
                        f"KFACPreconditioner: {layer.kind} layer {layer.name!r} got "
                        f"{'an input' if side == 0 else 'an output gradient'} of shape {tuple(tensor.shape)}, "
                        f"not a whole number of examples of {values[side]} values"
                    )
            x, g = self._buffer(inputs), self._buffer(grads)
            rows, per_example = x.numel() // values[0], 1
            if g.numel() // values[1] != rows:
                raise ValueError(f"KFACPreconditioner: layer {layer.name!r}: inputs and output gradients "
                                 "hold different numbers of examples")
        else:
            features = (layer.module.in_features, layer.module.out_features)
            for tensor, width in zip((inputs, grads), features):
                if tensor.dim() < 1 or tensor.shape[-1] != width:
                    raise ValueError(
                        f"KFACPreconditioner: layer {layer.name!r} got a tensor of shape "
                        f"{tuple(tensor.shape)}, expected [..., {width}]"
                    )
            x, g = self._buffer(inputs), self._buffer(grads)
            rows = x.numel() // features[0]
            per_example = rows // inputs.shape[0] if inputs.dim() >= 3 and inputs.shape[0] > 0 else 1
        if rows == 0:
            return
        self.optimizer.handle.record_examples(layer.index, x.data_ptr(), g.data_ptr(), rows, per_example)

    @contextlib.contextmanager
    def _hooks_paused(self):
        """Forward passes inside this block neither save inputs nor register layers."""
        previous = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = previous

    def remove_hooks(self) -> None:
        """Removes the forward and backward hooks from the model (statistics are no longer
        recorded; :meth:`step` still preconditions with the existing factors)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        self._pending_forward = self._forward_values = None
        for layer in self._layers:
            layer.saved_inputs.clear()
            layer.graph_inputs.clear()

