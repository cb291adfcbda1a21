"""PyTorch integration: K-FAC preconditioning of a model's ``nn.Linear``, ``nn.Conv2d`` and
``nn.Conv1d`` layers.

Usage::

    import torch
    from kfac.torch import KFACPreconditioner

    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(),
        torch.nn.Linear(8 * 28 * 28, 10))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    preconditioner = KFACPreconditioner(model, lr=0.1, damping=1e-2)
    for x, y in loader:
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)   # mean-reduced
        loss.backward()
        preconditioner.step()      # .grad of every preconditioned layer now holds the direction
        optimizer.step()

The preconditioner handles every ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` of the model
whose weight requires a gradient (in ``model.named_modules()`` order; library layer ids follow
that order), with the module's own stride, padding, dilation, groups and bias. It installs on
each a forward-pre hook, which keeps the layer's input, and a full backward hook, which hands the
input and the gradient at the layer's output to the library. Both record only while the model is
in training mode with gradients enabled, and only when the library wants statistics for the
current step. Tensors are passed to the library without a copy when they are contiguous CPU
tensors of the optimizer's dtype (channels-last tensors are copied to NCHW).

Registration of convolutions. The library fixes a convolution's input size (H, W) when the layer
is registered, and all layers must be registered before the first statistics are recorded. The
preconditioner therefore registers its layers (all of them, in module order) either

- at construction, when the model has no convolution or ``input_shapes`` gives the spatial size
  of every convolution's input; or
- after the first *training* forward pass (training mode, gradients enabled): the forward-pre
  hooks note each convolution's input size, and a forward hook on ``model`` registers all layers
  when that pass returns (or, if ``model`` itself is not called, the first backward hook or
  :meth:`KFACPreconditioner.step` does). Forward passes in eval mode or under ``torch.no_grad()``
  before that do not count. A convolution that did not run in that pass needs ``input_shapes``
  (or ``skip_layers``).

Afterwards every training forward pass must feed each convolution inputs of its registered
spatial size (``ValueError`` otherwise); eval-mode and no-grad passes may use any size.
:meth:`KFACPreconditioner.state_dict` stores the input sizes, so a fresh preconditioner can
:meth:`~KFACPreconditioner.load_state_dict` before its first forward pass.

Padding. ``padding`` given as ints or tuples is used as is, ``'valid'`` as 0 and ``'same'`` as
``dilation·(kernel − 1)/2`` when that is a whole number (PyTorch pads odd totals asymmetrically,
which the library's symmetric padding cannot express). Such an asymmetric ``'same'``, and any
``padding_mode`` other than ``'zeros'`` (reflect, replicate, circular: the library models zero
padding), raise ``ValueError`` at construction naming the module: a preconditioner that silently
left layers out would not be the optimizer the caller asked for. Exclude such layers explicitly
with ``skip_layers``.

Inputs of a ``Linear`` with extra leading dimensions (``[N, T, in]``) are flattened into
``N·T`` rows; a convolution records ``N`` examples (an unbatched input counts as one). The
default ``loss_reduction='mean'`` matches PyTorch's mean-reduced losses: the library multiplies
the recorded output gradients by the rows (Linear) or examples (convolutions) of each call. For a
summed loss pass ``loss_reduction='sum'``; with a loss scaler set ``output_grad_scale``.

The true Fisher and the adaptive mode. :meth:`KFACPreconditioner.sampled_fisher_backward`
records a step's statistics from targets sampled from the model (call it between the forward
pass and ``loss.backward()``); :meth:`KFACPreconditioner.adaptive_step` replaces
``optimizer.step()`` by K-FAC's adaptive update (α and μ from the quadratic model with the exact
Fisher, forward-mode products by ``torch.func.jvp``, Levenberg–Marquardt damping, and with
``factor_damping_period`` the periodic re-choice of the factor damping γ).
"""

from __future__ import annotations

import contextlib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import numpy as np
import torch
from torch import nn

from . import _lib
from ._optimizer import KFACError, Optimizer, conv_padding
from ._sampling import distribution_code, sampled_output_grads

__all__ = ["AdaptiveStepResult", "KFACPreconditioner"]

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
    "lm_decay",
    "lm_interval",
    "factor_damping",
    "factor_damping_decay",
    "factor_damping_period",
)

#: The module types the preconditioner handles.
SUPPORTED_MODULES = (nn.Linear, nn.Conv2d, nn.Conv1d)


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
    #: The mean loss after the update.
    loss_after: float
    #: ρ = (loss_after − loss_before) / M(δ).
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


class _AdaptiveBuffers:
    """Buffers the adaptive step reuses across steps, one per preconditioned parameter (weights
    and biases in library order), CPU and contiguous in the library's dtype, with the ctypes
    pointer arrays the library is called with."""

    __slots__ = ("key", "directions", "direction_pointers", "update", "update_pointers")

    def __init__(self, key, optimizer: Optimizer, layers, dtype: torch.dtype):
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
        self.direction_pointers = optimizer._pointer_arrays(*addresses["directions"])
        self.update_pointers = optimizer._pointer_arrays(*addresses["update"])


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
    """A preconditioned module, its registration options and the inputs saved by its
    forward-pre hook."""

    __slots__ = (
        "index",
        "name",
        "module",
        "kind",
        "padding",
        "input_size",
        "approximation",
        "input_group_size",
        "output_group_size",
        "input_values",
        "grad_values",
        "saved_inputs",
        "graph_inputs",
    )

    def __init__(self, index: int, name: str, module: nn.Module):
        self.index = index
        self.name = name
        self.module = module
        if isinstance(module, nn.Linear):
            self.kind = "linear"
        elif isinstance(module, nn.Conv2d):
            self.kind = "conv2d"
        else:
            self.kind = "conv1d"
        self.padding: Tuple[int, ...] = ()
        #: Spatial size of the input: (H, W) for Conv2d, (L,) for Conv1d; None until known.
        self.input_size: Optional[Tuple[int, ...]] = None
        self.approximation = "kfc"
        self.input_group_size = 0
        self.output_group_size = 0
        self.input_values = 0  # convolution: values per example, once registered
        self.grad_values = 0
        self.saved_inputs: List[torch.Tensor] = []
        #: The same inputs, undetached, when they require gradients (for sampled_fisher_backward).
        self.graph_inputs: List[torch.Tensor] = []

    @property
    def is_conv(self) -> bool:
        return self.kind != "linear"

    def spatial_size(self, tensor: torch.Tensor) -> Tuple[int, ...]:
        """The spatial size of an input of this convolution (batched or not)."""
        dims = 2 if self.kind == "conv2d" else 1
        if tensor.dim() not in (dims + 1, dims + 2):
            raise ValueError(
                f"KFACPreconditioner: {self.kind} layer {self.name!r} got an input of shape "
                f"{tuple(tensor.shape)}"
            )
        return tuple(int(d) for d in tensor.shape[-dims:])

    def describe_size(self, size) -> str:
        return "×".join(str(d) for d in size)


def _options_for(value, layer: _Layer, default, what: str):
    """A per-layer option: ``value`` itself, or its entry for the layer when it is a dict keyed by
    module names or module objects (``default`` for layers it does not name)."""
    if not isinstance(value, dict):
        return value
    for key, entry in value.items():
        if key is layer.module or (isinstance(key, str) and key == layer.name):
            return entry
    return default


def _check_option_keys(value, layers: List[_Layer], what: str) -> None:
    if not isinstance(value, dict):
        return
    names = {layer.name for layer in layers}
    modules = [layer.module for layer in layers]
    for key in value:
        if isinstance(key, str):
            if key not in names:
                raise ValueError(f"KFACPreconditioner: {what} names {key!r}, which is not a preconditioned layer")
        elif isinstance(key, nn.Module):
            if not any(key is module for module in modules):
                raise ValueError(f"KFACPreconditioner: {what} has a module that is not a preconditioned layer")
        else:
            raise TypeError(f"KFACPreconditioner: the keys of {what} must be module names or modules, not {key!r}")


class KFACPreconditioner:
    """K-FAC preconditioning of the ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` layers of a
    PyTorch model.

    Call :meth:`step` after ``loss.backward()`` and before ``optimizer.step()``: it rewrites
    each layer's ``weight.grad`` and ``bias.grad`` in place with the preconditioned, KL-clipped
    direction. Other parameters' gradients are left alone. See the module documentation for
    when convolutions are registered with the library.

    Args:
        model: the model; its ``nn.Linear``, ``nn.Conv2d`` and ``nn.Conv1d`` submodules are
            preconditioned.
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
            ``model.named_modules()``; a name also skips its submodules), class names, module
            classes, or module objects.
        conv_approximation: ``'kfc'`` (full patch second moment) or ``'sua'`` (spatially
            uncorrelated activations) for the convolutions; or a dict ``{name or module:
            value}`` (unnamed convolutions use ``'kfc'``).
        input_group_size, output_group_size: channel grouping (channels, or features of a
            Linear, per block of the input-/output-side factor; 0 = none) for every layer, or a
            dict ``{name or module: size}`` (unnamed layers: 0).
        input_shapes: ``{name or module: spatial size}`` of convolution inputs, ``(H, W)`` for a
            Conv2d and ``L`` (or ``(L,)``) for a Conv1d. When every convolution is covered the
            layers are registered at construction; otherwise at the first training forward pass.
        lm_decay, lm_interval: ω₁ and T₁ of the Levenberg–Marquardt adjustment of λ in the
            adaptive mode (see :meth:`adaptive_step`); ``lm_interval=0`` (default) keeps λ fixed.
        factor_damping: γ, the damping of the factor inverses when > 0 (0, the default: λ is
            used for both), so that the Levenberg–Marquardt adjustment of λ only changes the
            quadratic model of the adaptive mode (Martens & Grosse 2015, §6.6).
        factor_damping_period, factor_damping_decay: T₂ and ω₂'s base of the re-choice of γ in
            the adaptive mode: every T₂ steps :meth:`adaptive_step` tries γ, γ·ω₂ and γ/ω₂
            (ω₂ = ``factor_damping_decay ** factor_damping_period``; starting from λ when γ is 0)
            and keeps the one whose update lowers the quadratic model most.
            ``factor_damping_period=0`` (default) keeps γ fixed.
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
        conv_approximation: Union[str, Dict] = "kfc",
        input_group_size: Union[int, Dict] = 0,
        output_group_size: Union[int, Dict] = 0,
        input_shapes: Optional[Dict] = None,
        lm_decay: float = 0.95,
        lm_interval: int = 0,
        factor_damping: float = 0.0,
        factor_damping_period: int = 0,
        factor_damping_decay: float = 0.95,
    ):
        self.model = model
        skip = list(skip_layers)
        self._layers: List[_Layer] = []
        for name, module in model.named_modules():
            if not isinstance(module, SUPPORTED_MODULES) or not module.weight.requires_grad:
                continue
            if self._skipped(name, module, skip):
                continue
            self._layers.append(_Layer(len(self._layers), name, module))
        if not self._layers:
            raise ValueError(
                "KFACPreconditioner: the model has no nn.Linear, nn.Conv2d or nn.Conv1d layer to precondition"
            )

        _check_option_keys(conv_approximation, self._layers, "conv_approximation")
        _check_option_keys(input_group_size, self._layers, "input_group_size")
        _check_option_keys(output_group_size, self._layers, "output_group_size")
        _check_option_keys(input_shapes or {}, self._layers, "input_shapes")
        for layer in self._layers:
            layer.input_group_size = _options_for(input_group_size, layer, 0, "input_group_size")
            layer.output_group_size = _options_for(output_group_size, layer, 0, "output_group_size")
            if layer.is_conv:
                self._check_conv(layer)
                approximation = _options_for(conv_approximation, layer, "kfc", "conv_approximation")
                if str(approximation).lower() not in ("kfc", "sua"):
                    raise ValueError(
                        f"KFACPreconditioner: conv_approximation must be 'kfc' or 'sua', not {approximation!r}"
                    )
                layer.approximation = str(approximation).lower()
                size = _options_for(input_shapes or {}, layer, None, "input_shapes")
                if size is not None:
                    layer.input_size = self._normalised_size(layer, size)
            else:
                for option, what in ((conv_approximation, "conv_approximation"), (input_shapes, "input_shapes")):
                    if isinstance(option, dict) and any(
                        key is layer.module or key == layer.name for key in option
                    ):
                        raise ValueError(f"KFACPreconditioner: {what} names the Linear layer {layer.name!r}")

        param_dtypes = {layer.module.weight.dtype for layer in self._layers}
        if dtype is None:
            if len(param_dtypes) != 1:
                raise TypeError(
                    "KFACPreconditioner: the preconditioned layers have parameters of several dtypes "
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
            lm_decay=lm_decay,
            lm_interval=lm_interval,
            factor_damping=factor_damping,
            factor_damping_period=factor_damping_period,
            factor_damping_decay=factor_damping_decay,
        )
        self.lr = lr
        # Statistics hooks: paused during the adaptive step's own forward passes; once
        # sampled_fisher_backward was used, ordinary backward passes record nothing.
        self._paused = False
        self._sampled_fisher = False
        self._in_sampled_backward = False
        self._loss_backward_recorded = False  # an ordinary backward recorded since the last step
        self._warned_second_backward = False
        self._sample_count = 0
        # Adaptive mode: directions written by step() and not yet used, and δ₀ (the last update
        # adaptive_step applied), one tensor per preconditioned parameter.
        self._directions_ready = False
        self._previous_update: Optional[List[torch.Tensor]] = None
        # Reusable buffers of the adaptive step (built at its first call): the directions of one
        # candidate and the update, per preconditioned parameter, in the library's dtype.
        self._adaptive_buffers: Optional[_AdaptiveBuffers] = None
        self._registered = False
        if not self._missing_sizes():
            self._register()
        self._hooks = []
        for layer in self._layers:
            self._hooks.append(layer.module.register_forward_pre_hook(self._make_forward_pre_hook(layer)))
            self._hooks.append(layer.module.register_full_backward_hook(self._make_backward_hook(layer)))
        if not self._registered:
            self._hooks.append(model.register_forward_hook(self._after_model_forward))

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

    @staticmethod
    def _check_conv(layer: _Layer) -> None:
        """Rejects convolutions the library cannot model exactly; fixes the padding."""
        module = layer.module
        if module.padding_mode != "zeros":
            raise ValueError(
                f"KFACPreconditioner: {type(module).__name__} {layer.name!r} has "
                f"padding_mode={module.padding_mode!r}; only zero padding is supported. Exclude it "
                f"with skip_layers=[{layer.name!r}]"
            )
        try:
            padding = conv_padding(module.padding, module.kernel_size, module.stride, module.dilation)
        except ValueError as error:
            raise ValueError(
                f"KFACPreconditioner: {type(module).__name__} {layer.name!r}: {error}. Exclude it "
                f"with skip_layers=[{layer.name!r}]"
            ) from None
        layer.padding = tuple(int(p) for p in padding)

    @staticmethod
    def _normalised_size(layer: _Layer, size) -> Tuple[int, ...]:
        dims = 2 if layer.kind == "conv2d" else 1
        if isinstance(size, int) and dims == 1:
            size = (size,)
        if isinstance(size, torch.Size):
            size = tuple(size)
        if not isinstance(size, (tuple, list)) or len(size) != dims:
            raise ValueError(
                f"KFACPreconditioner: input_shapes[{layer.name!r}] must be the spatial size of the "
                f"input, {'(H, W)' if dims == 2 else 'L or (L,)'}, not {size!r}"
            )
        return tuple(int(d) for d in size)

    def _missing_sizes(self) -> List[str]:
        return [layer.name for layer in self._layers if layer.is_conv and layer.input_size is None]

    def _register(self) -> None:
        """Registers every layer with the library, in module order."""
        missing = self._missing_sizes()
        if missing:
            raise ValueError(
                "KFACPreconditioner: the input size of convolution(s) "
                f"{', '.join(repr(n) for n in missing)} is unknown: they did not run in the first "
                "training forward pass. Pass input_shapes={name: (H, W)} (Conv1d: L), or exclude them "
                "with skip_layers"
            )
        opt = self.optimizer
        params = opt.params()
        try:
            self._add_layers(opt)
        except BaseException:
            # All or nothing: a library handle cannot drop layers, so a failed registration
            # (e.g. a layer too large for the library) leaves a fresh handle with the same
            # parameters, and the next attempt fails the same way instead of half-registering.
            self.optimizer = Optimizer(opt.dtype, **params)
            opt.close()
            raise
        self._registered = True

    def _add_layers(self, opt: Optimizer) -> None:
        for layer in self._layers:
            module = layer.module
            bias = module.bias is not None
            if layer.kind == "linear":
                index = opt.add_dense(
                    module.in_features,
                    module.out_features,
                    bias=bias,
                    input_group_size=layer.input_group_size,
                    output_group_size=layer.output_group_size,
                )
            else:
                add = opt.add_conv2d if layer.kind == "conv2d" else opt.add_conv1d
                size = layer.input_size if layer.kind == "conv2d" else layer.input_size[0]
                padding = layer.padding if layer.kind == "conv2d" else layer.padding[0]
                index = add(
                    module.in_channels,
                    module.out_channels,
                    module.kernel_size,
                    stride=module.stride,
                    padding=padding,
                    dilation=module.dilation,
                    groups=module.groups,
                    bias=bias,
                    input_size=size,
                    layout="nchw",
                    approximation=layer.approximation,
                    input_group_size=layer.input_group_size,
                    output_group_size=layer.output_group_size,
                )
                shapes = opt._shape_of(index)
                layer.input_values, layer.grad_values = shapes.input_values, shapes.grad_values
            assert index == layer.index

    def _ensure_registered(self) -> None:
        if not self._registered:
            self._register()

    @property
    def layers(self) -> List[Tuple[str, nn.Module]]:
        """The preconditioned layers as ``(name, module)``, in library layer-id order."""
        return [(layer.name, layer.module) for layer in self._layers]

    @property
    def registered(self) -> bool:
        """Whether the layers are registered with the library (see the module documentation)."""
        return self._registered

    @property
    def input_sizes(self) -> Dict[str, Tuple[int, ...]]:
        """The known spatial input sizes of the convolutions, by module name."""
        return {layer.name: layer.input_size for layer in self._layers if layer.input_size is not None}

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
            if self._paused or not args or not (module.training and torch.is_grad_enabled()):
                return None
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
        if not self._registered and not self._paused and module.training and torch.is_grad_enabled():
            self._register()
        return None

    def _make_backward_hook(self, layer: _Layer):
        def backward_hook(module, grad_input, grad_output):
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
            if layer.is_conv:
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
        self.optimizer._record_address(side, index, buffer.data_ptr(), rows)

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
        self.optimizer._record_address(side, layer.index, buffer.data_ptr(), examples)

    # -----------------------------------------------------------------------------------------
    # Step
    # -----------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self) -> None:
        """Replaces each preconditioned layer's ``.grad`` with its K-FAC direction.

        Call after ``loss.backward()`` and before ``optimizer.step()``. A layer that received no
        gradient this step counts as a zero gradient and its ``.grad`` stays ``None``. Raises
        :class:`kfac.KFACError` if the library fails (e.g. no statistics were recorded before
        the first step, or no training forward pass registered the convolutions yet); then no
        gradient is changed.
        """
        if not self._registered:
            missing = self._missing_sizes()
            if missing:
                raise KFACError(
                    _lib.KFAC_ERROR_NO_STATISTICS,
                    "no training forward pass has been seen: the layers are registered with the "
                    "library at the first one (input size of "
                    f"{', '.join(repr(n) for n in missing)} unknown)",
                )
            self._register()
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
                layer.graph_inputs.clear()
            self._loss_backward_recorded = False
        for grad, buffer in write_back:
            grad.copy_(buffer)
        self._directions_ready = True

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
    # The true Fisher: statistics from sampled targets
    # -----------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _hooks_paused(self):
        """Forward passes inside this block neither save inputs nor register layers."""
        previous = self._paused
        self._paused = True
        try:
            yield
        finally:
            self._paused = previous

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

    # -----------------------------------------------------------------------------------------
    # Adaptive mode: step size, momentum and damping from the quadratic model
    # -----------------------------------------------------------------------------------------

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
            buffers = _AdaptiveBuffers(key, self.optimizer, self._layers, self._dtype)
            self._adaptive_buffers = buffers
        return buffers

    def adaptive_step(self, inputs, loss_fn: Callable[[torch.Tensor], torch.Tensor],
                      distribution="categorical", momentum: bool = True) -> AdaptiveStepResult:
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
        parameters are yours to update), evaluates the loss again and reports both losses (ρ,
        λ). The statistics hooks are off during its forward passes.

        Cost: two forward-mode passes (J·D and J·δ₀) and one ordinary forward pass per step,
        plus one more forward-mode pass per extra candidate on γ steps (up to four in all),
        and on those steps the library's two extra preconditionings (with the Cholesky
        strategy, every factor is also inverted for each candidate γ on that step; make
        ``factor_damping_period`` a multiple of ``inverse_update_period`` to share the work).

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
            momentum: ``False`` chooses α alone (μ = 0, no J·δ₀ pass): the update is −α·D.

        The model's forward pass must be a deterministic function of the parameters and the
        batch (no dropout; BatchNorm in eval mode) returning one tensor. Set ``kl_clip=0``
        (α replaces the clip) and keep ``loss_reduction='mean'``. Returns an
        :class:`AdaptiveStepResult` (α, μ, M(δ), the losses, ρ, λ, the chosen candidate and γ).
        ``.grad`` keeps the directions of candidate 0. If the loss after the update is not
        finite, the update is undone and :class:`kfac.KFACError` (``KFAC_ERROR_NON_FINITE``) is
        raised.
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
        # Forward mode needs no autograd graph: no_grad also keeps the backward hooks out.
        with torch.no_grad(), self._hooks_paused(), warnings.catch_warnings():
            # PyTorch's own forward-AD decompositions use torch.jit.script the first time (a
            # FutureWarning about PyTorch internals, not about this code).
            warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*deprecated", category=FutureWarning)
            for k in range(count):
                self.optimizer._candidate_directions_pointers(k, buffers.direction_pointers)
                out, jd = jvp(forward, primals, tangents(buffers.directions))
                if outputs is None:
                    outputs = out
                direction_products.append(jd)
            if previous is not None and momentum:
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
        self.optimizer._get_update_pointers(buffers.update_pointers)
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

    @property
    def last_reduction_ratio(self) -> float:
        """ρ of the last :meth:`adaptive_step` (NaN before the first)."""
        return self.optimizer.last_reduction_ratio

    # -----------------------------------------------------------------------------------------
    # State and cleanup
    # -----------------------------------------------------------------------------------------

    def state_dict(self) -> Dict[str, object]:
        """The library's state image (factors, inverses, counters, parameters, the adaptive
        mode's state), the convolutions' input sizes and the last update of :meth:`adaptive_step`
        (δ₀), in a dict that ``torch.save`` can store. ``lr`` given as a callable is not
        included."""
        if not self._registered and not self._missing_sizes():
            self._register()
        previous = self._previous_update
        return {
            "kfac_state": self.optimizer.state_bytes(),
            "layers": [l.name for l in self._layers],
            "input_sizes": self.input_sizes,
            "previous_update": None if previous is None else [t.detach().cpu().clone() for t in previous],
        }

    def load_state_dict(self, state_dict: Dict[str, object]) -> None:
        """Restores a :meth:`state_dict` taken from a preconditioner of the same layers and
        dtype; before the first forward pass it also takes the convolutions' input sizes from
        it. A callable ``lr`` stays in force."""
        image = state_dict["kfac_state"]
        if isinstance(image, torch.Tensor):  # tolerate images stored as uint8 tensors
            image = image.cpu().numpy().tobytes()
        if not self._registered:
            sizes = state_dict.get("input_sizes") or {}
            for layer in self._layers:
                if layer.is_conv and layer.input_size is None and layer.name in sizes:
                    layer.input_size = self._normalised_size(layer, sizes[layer.name])
            if not self._missing_sizes():
                self._register()
        self.optimizer.load_state(image)
        if self._lr_source is not None:
            self.optimizer.learning_rate = float(self._lr_source())
        # Directions are not part of a state image: the next adaptive_step needs a new step().
        self._directions_ready = False
        previous = state_dict.get("previous_update")
        try:
            params = self._adaptive_parameters()
        except ValueError:  # shared parameters: no adaptive mode
            previous = params = None
        if previous is not None and len(previous) == len(params) and all(
                tuple(t.shape) == tuple(p.shape) for t, p in zip(previous, params)):
            self._previous_update = [t.to(device=p.device, dtype=p.dtype).clone() for t, p in zip(previous, params)]
        else:
            # Without δ₀ the next adaptive step chooses α alone (μ = 0), and the library's copy
            # of δ₀ is then replaced consistently.
            self._previous_update = None

    def remove_hooks(self) -> None:
        """Removes the forward and backward hooks from the model (statistics are no longer
        recorded; :meth:`step` still preconditions with the existing factors)."""
        for handle in self._hooks:
            handle.remove()
        self._hooks = []
        for layer in self._layers:
            layer.saved_inputs.clear()
            layer.graph_inputs.clear()

    def close(self) -> None:
        """Removes the hooks and frees the library handle."""
        self.remove_hooks()
        self.optimizer.close()

    def __repr__(self) -> str:
        kinds = {}
        for layer in self._layers:
            kinds[layer.kind] = kinds.get(layer.kind, 0) + 1
        summary = ", ".join(f"{count} {kind}" for kind, count in kinds.items())
        return (
            f"KFACPreconditioner({summary}, dtype={self._dtype}, "
            f"{'registered' if self._registered else 'not registered yet'}, "
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
