"""PyTorch integration: K-FAC preconditioning of a model's ``nn.Linear`` layers.

Usage::

    import torch
    from kfac.torch import KFACPreconditioner

    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.Tanh(), torch.nn.Linear(128, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    preconditioner = KFACPreconditioner(model, lr=0.1, damping=1e-2)
    for x, y in loader:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)   # mean-reduced
        loss.backward()
        preconditioner.step()      # .grad of every Linear now holds the K-FAC direction
        optimizer.step()

The preconditioner registers every ``nn.Linear`` of the model whose weight requires a gradient
(in ``model.named_modules()`` order) with a :class:`kfac.Optimizer`, and installs on each a
forward-pre hook, which keeps the layer's input, and a full backward hook, which hands the input
and the gradient at the layer's output to the library. Both record only while the model is in
training mode with gradients enabled, and only when the library wants statistics for the
current step. Tensors are passed to the library without a copy when they are contiguous CPU
tensors of the optimizer's dtype.

Inputs with extra leading dimensions (``[N, T, in]``) are flattened into ``N·T`` rows. The
default ``loss_reduction='mean'`` matches PyTorch's mean-reduced losses (the mean over all
those rows): the library multiplies the recorded output gradients by the rows of each call.
For a summed loss pass ``loss_reduction='sum'``; with a loss scaler set ``output_grad_scale``.
"""

from __future__ import annotations

import re
import warnings
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from ._optimizer import Optimizer

__all__ = ["KFACPreconditioner"]

_TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}

# The first layer of a network usually receives inputs that do not require gradients; PyTorch
# then warns at every backward pass that its full backward hook fires for the output gradients
# only, which is exactly what the preconditioner needs.
warnings.filterwarnings(
    "ignore",
    message=re.escape("Full backward hook is firing when gradients are computed with respect to module outputs"),
    category=UserWarning,
)

_PARAMETER_ATTRIBUTES = (
    "damping",
    "factor_decay",
    "kl_clip",
    "output_grad_scale",
    "factor_update_period",
    "inverse_update_period",
    "inverse_strategy",
    "pi_damping",
    "loss_reduction",
    "num_threads",
)


def _torch_dtype(dtype) -> torch.dtype:
    """A torch float dtype from a torch dtype, numpy dtype or type; float32/float64 only."""
    if isinstance(dtype, torch.dtype):
        result = dtype
    else:
        result = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}.get(
            np.dtype(dtype)
        )
    if result not in _TORCH_TO_NUMPY:
        raise TypeError(f"KFACPreconditioner: dtype must be float32 or float64, not {dtype}")
    return result


class _Layer:
    """A registered ``nn.Linear`` and the inputs saved by its forward-pre hook."""

    __slots__ = ("index", "name", "module", "saved_inputs")

    def __init__(self, index: int, name: str, module: nn.Linear):
        self.index = index
        self.name = name
        self.module = module
        self.saved_inputs: List[torch.Tensor] = []


class KFACPreconditioner:
    """K-FAC preconditioning of the ``nn.Linear`` layers of a PyTorch model.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``: it rewrites
    each layer's ``weight.grad`` and ``bias.grad`` in place with the preconditioned, KL-clipped
    direction. Other parameters' gradients are left alone.

    Args:
        model: the model; its ``nn.Linear`` submodules are preconditioned.
        damping: λ (see ``kfac.h``).
        factor_decay: β of the factors' moving average.
        kl_clip: κ of the KL clip; 0 disables it.
        lr: the learning rate the update will be applied with (used only by the KL clip). A float,
            or a callable returning the current learning rate, evaluated at every :meth:`step`
            (e.g. ``lambda: optimizer.param_groups[0]["lr"]``).
        factor_update_period: fold statistics into the factors every this many steps.
        inverse_update_period: recompute the inverses every this many steps.
        inverse_strategy: ``'eigen'`` (exact damping) or ``'cholesky'`` (factored damping).
        loss_reduction: ``'mean'`` (PyTorch's default for losses) or ``'sum'``.
        pi_damping: use π in factored damping (Cholesky strategy).
        output_grad_scale: the loss scale of mixed-precision training (1 otherwise).
        num_threads: threads the library uses for inversions (0 = all CPUs).
        dtype: precision of the library's state; ``None`` follows the layers' parameters (all
            preconditioned layers must then share one dtype). A different dtype works through
            copies.
        skip_layers: layers not to precondition, given as module names (as in
            ``model.named_modules()``; a name also skips its submodules), class names, or module
            objects.
    """

    def __init__(
        self,
        model: nn.Module,
        damping: float = 1e-3,
        factor_decay: float = 0.95,
        kl_clip: float = 1e-3,
        lr: Union[float, Callable[[], float]] = 0.1,
        factor_update_period: int = 1,
        inverse_update_period: int = 10,
        inverse_strategy: Union[str, int] = "eigen",
        loss_reduction: Union[str, int] = "mean",
        pi_damping: bool = True,
        output_grad_scale: float = 1.0,
        num_threads: int = 0,
        dtype=None,
        skip_layers: Iterable = (),
    ):
        self.model = model
        skip = list(skip_layers)
        self._layers: List[_Layer] = []
        for name, module in model.named_modules():
            if not isinstance(module, nn.Linear) or not module.weight.requires_grad:
                continue
            if self._skipped(name, module, skip):
                continue
            self._layers.append(_Layer(len(self._layers), name, module))
        if not self._layers:
            raise ValueError("KFACPreconditioner: the model has no nn.Linear layer to precondition")

        param_dtypes = {layer.module.weight.dtype for layer in self._layers}
        if dtype is None:
            if len(param_dtypes) != 1:
                raise TypeError(
                    "KFACPreconditioner: the Linear layers have parameters of several dtypes "
                    f"({sorted(str(d) for d in param_dtypes)}); pass dtype= explicitly"
                )
            dtype = param_dtypes.pop()
        self._dtype = _torch_dtype(dtype)

        self._lr_source: Optional[Callable[[], float]] = None
        self.optimizer = Optimizer(
            _TORCH_TO_NUMPY[self._dtype],
            damping=damping,
            factor_decay=factor_decay,
            kl_clip=kl_clip,
            factor_update_period=factor_update_period,
            inverse_update_period=inverse_update_period,
            inverse_strategy=inverse_strategy,
            loss_reduction=loss_reduction,
            pi_damping=pi_damping,
            output_grad_scale=output_grad_scale,
            num_threads=num_threads,
        )
        self.lr = lr
        for layer in self._layers:
            module = layer.module
            index = self.optimizer.add_dense(
                module.in_features, module.out_features, bias=module.bias is not None
            )
            assert index == layer.index
        self._hooks = []
        for layer in self._layers:
            self._hooks.append(layer.module.register_forward_pre_hook(self._make_forward_pre_hook(layer)))
            self._hooks.append(layer.module.register_full_backward_hook(self._make_backward_hook(layer)))

    # -----------------------------------------------------------------------------------------
    # Layers
    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _skipped(name: str, module: nn.Module, skip: list) -> bool:
        for entry in skip:
            if isinstance(entry, nn.Module):
                if entry is module:
                    return True
            elif isinstance(entry, str):
                if entry == type(module).__name__ or name == entry or name.startswith(entry + "."):
                    return True
            elif isinstance(entry, type) and isinstance(module, entry):
                return True
        return False

    @property
    def layers(self) -> List[Tuple[str, nn.Linear]]:
        """The preconditioned layers as ``(name, module)``, in library layer-id order."""
        return [(layer.name, layer.module) for layer in self._layers]

    @property
    def dtype(self) -> torch.dtype:
        """The precision of the library's state and buffers."""
        return self._dtype

    # -----------------------------------------------------------------------------------------
    # Hooks
    # -----------------------------------------------------------------------------------------

    def _recording(self, module: nn.Module) -> bool:
        return (
            module.training
            and torch.is_grad_enabled()
            and not self.optimizer.closed
            and self.optimizer.wants_statistics
        )

    def _make_forward_pre_hook(self, layer: _Layer):
        def forward_pre_hook(module, args):
            if not args or not self._recording(module):
                return None
            # Detached, no copy: the autograd graph keeps the same values alive for the weight
            # gradient anyway.
            layer.saved_inputs.append(args[0].detach())
            return None

        return forward_pre_hook

    def _make_backward_hook(self, layer: _Layer):
        def backward_hook(module, grad_input, grad_output):
            # Pairs the gradient with the input of the same forward call: the backward pass
            # visits a module's calls in reverse order, hence pop() from the end.
            if not layer.saved_inputs or grad_output[0] is None:
                return None
            inputs = layer.saved_inputs.pop()
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
        self.optimizer._record_address(side, index, buffer.data_ptr(), rows)

    # -----------------------------------------------------------------------------------------
    # Step
    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Replaces each preconditioned layer's ``.grad`` with its K-FAC direction.

        Call after ``loss.backward()`` and before ``optimizer.step()``. A layer that received no
        gradient this step counts as a zero gradient and its ``.grad`` stays ``None``. Raises
        :class:`kfac.KFACError` if the library fails (e.g. no statistics were recorded before
        the first step); then no gradient is changed.
        """
        if self._lr_source is not None:
            self.optimizer.learning_rate = float(self._lr_source())
        keep: List[torch.Tensor] = []  # buffers that must stay alive during the call
        write_back: List[Tuple[torch.Tensor, torch.Tensor]] = []  # (grad, buffer) to copy back
        weight_addresses, bias_addresses = [], []
        for layer in self._layers:
            module = layer.module
            weight_addresses.append(self._grad_buffer(module.weight, keep, write_back))
            bias_addresses.append(
                self._grad_buffer(module.bias, keep, write_back) if module.bias is not None else 0
            )
        try:
            self.optimizer._step_addresses(weight_addresses, bias_addresses)
        finally:
            for layer in self._layers:
                layer.saved_inputs.clear()
        for grad, buffer in write_back:
            grad.copy_(buffer)

    def _grad_buffer(self, parameter: torch.Tensor, keep: list, write_back: list) -> int:
        """The address of a buffer holding ``parameter.grad`` that the library may overwrite:
        the gradient itself when possible, else a copy registered for writing back."""
        grad = parameter.grad
        if grad is None:
            buffer = torch.zeros(parameter.shape, dtype=self._dtype)
        elif grad.is_sparse:
            raise TypeError("KFACPreconditioner: sparse gradients are not supported")
        else:
            buffer = self._buffer(grad)
            if buffer.data_ptr() != grad.data_ptr():  # a copy: write the result back
                write_back.append((grad, buffer))
        keep.append(buffer)
        return buffer.data_ptr()

    # -----------------------------------------------------------------------------------------
    # Parameters (settable attributes, e.g. for schedulers)
    # -----------------------------------------------------------------------------------------

    @property
    def lr(self) -> float:
        """η of the KL clip: the learning rate the caller applies the directions with. May be
        set to a float or to a callable evaluated at each :meth:`step`."""
        if self._lr_source is not None:
            return float(self._lr_source())
        return self.optimizer.learning_rate

    @lr.setter
    def lr(self, value: Union[float, Callable[[], float]]) -> None:
        if callable(value):
            self._lr_source = value
            self.optimizer.learning_rate = float(value())
        else:
            self._lr_source = None
            self.optimizer.learning_rate = value

    @property
    def steps(self) -> int:
        """Number of completed :meth:`step` calls (the library's step counter)."""
        return self.optimizer.step_count

    @property
    def last_kl_scale(self) -> float:
        """ν of the last step (1.0 when the KL clip did not shrink the update)."""
        return self.optimizer.last_kl_scale

    # -----------------------------------------------------------------------------------------
    # State and cleanup
    # -----------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, object]:
        """The library's state image (factors, inverses, counters, parameters) in a dict that
        ``torch.save`` can store. ``lr`` given as a callable is not included."""
        return {"kfac_state": self.optimizer.state_bytes(), "layers": [l.name for l in self._layers]}

    def load_state_dict(self, state_dict: Dict[str, object]) -> None:
        """Restores a :meth:`state_dict` taken from a preconditioner of the same layers and
        dtype. A callable ``lr`` stays in force."""
        image = state_dict["kfac_state"]
        if isinstance(image, torch.Tensor):  # tolerate images stored as uint8 tensors
            image = image.cpu().numpy().tobytes()
        self.optimizer.load_state(image)
        if self._lr_source is not None:
            self.optimizer.learning_rate = float(self._lr_source())

    def remove_hooks(self) -> None:
        """Removes the forward and backward hooks from the model (statistics are no longer
        recorded; :meth:`step` still preconditions with the existing factors)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for layer in self._layers:
            layer.saved_inputs.clear()

    def close(self) -> None:
        """Removes the hooks and frees the library handle."""
        self.remove_hooks()
        self.optimizer.close()

    def __repr__(self) -> str:
        return (
            f"KFACPreconditioner({len(self._layers)} Linear layer(s), dtype={self._dtype}, "
            f"steps={self.steps if not self.optimizer.closed else 'closed'})"
        )


def _attribute(name: str):
    def getter(self):
        return self.optimizer.get_param(name)

    def setter(self, value):
        self.optimizer.set_param(name, value)

    return property(getter, setter, doc=f"The library's ``{name}`` parameter (settable).")


for _name in _PARAMETER_ATTRIBUTES:
    setattr(KFACPreconditioner, _name, _attribute(_name))
del _name
