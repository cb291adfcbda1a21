"""Which modules the preconditioner handles and how they are registered with the library:
module discovery (``skip_layers``), per-layer options, the convolutions' padding rules and input
sizes, and the all-or-nothing registration."""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

from .. import _convert
from ..optimizer import Optimizer

#: The module types the preconditioner handles.
SUPPORTED_MODULES = (nn.Linear, nn.Conv2d, nn.Conv1d)

TORCH_TO_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def _torch_dtype(dtype) -> torch.dtype:
    """A torch float dtype from a torch dtype, numpy dtype or type; float32/float64 only."""
    if isinstance(dtype, torch.dtype):
        result = dtype
    else:
        result = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}.get(
            np.dtype(dtype)
        )
    if result not in TORCH_TO_NUMPY:
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



def skipped(name: str, module: nn.Module, skip: list) -> bool:
    """Whether ``skip_layers`` names the module (by object, class name, module name or prefix,
    or class)."""
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


def check_conv(layer: _Layer) -> None:
    """Rejects convolutions the library cannot model exactly; fixes the padding."""
    module = layer.module
    if module.padding_mode != "zeros":
        raise ValueError(
            f"KFACPreconditioner: {type(module).__name__} {layer.name!r} has "
            f"padding_mode={module.padding_mode!r}; only zero padding is supported. Exclude it "
            f"with skip_layers=[{layer.name!r}]"
        )
    try:
        padding = _convert.conv_padding(module.padding, module.kernel_size, module.stride, module.dilation)
    except ValueError as error:
        raise ValueError(
            f"KFACPreconditioner: {type(module).__name__} {layer.name!r}: {error}. Exclude it "
            f"with skip_layers=[{layer.name!r}]"
        ) from None
    layer.padding = tuple(int(p) for p in padding)


def normalised_size(layer: _Layer, size) -> Tuple[int, ...]:
    """A convolution's spatial input size from ``input_shapes`` or a state dict."""
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


def discover_layers(model: nn.Module, skip_layers) -> List[_Layer]:
    """The preconditioned layers of ``model``, in ``named_modules()`` order."""
    skip = list(skip_layers)
    layers: List[_Layer] = []
    for name, module in model.named_modules():
        if not isinstance(module, SUPPORTED_MODULES) or not module.weight.requires_grad:
            continue
        if skipped(name, module, skip):
            continue
        layers.append(_Layer(len(layers), name, module))
    if not layers:
        raise ValueError(
            "KFACPreconditioner: the model has no nn.Linear, nn.Conv2d or nn.Conv1d layer to precondition"
        )
    return layers


def tridiagonal_links(layers: List[_Layer]) -> List[Tuple[_Layer, _Layer]]:
    """The pairs ``tridiagonal=True`` links: consecutive preconditioned layers (module order)
    that are both ungrouped ``nn.Linear`` with ``upper.in_features == lower.out_features`` —
    the consecutive Linear layers of an ``nn.Sequential``-style chain (activations between them
    are fine; the caller asserts that the upper layer consumes the lower one's output)."""
    links = []
    for lower, upper in zip(layers, layers[1:]):
        if (lower.kind == "linear" and upper.kind == "linear"
                and upper.module.in_features == lower.module.out_features
                and not (lower.input_group_size or lower.output_group_size
                         or upper.input_group_size or upper.output_group_size)):
            links.append((lower, upper))
    return links


def configure_layers(layers: List[_Layer], conv_approximation, input_group_size, output_group_size,
                     input_shapes) -> None:
    """Applies the per-layer options (one value for all layers, or a dict by name or module)."""
    _check_option_keys(conv_approximation, layers, "conv_approximation")
    _check_option_keys(input_group_size, layers, "input_group_size")
    _check_option_keys(output_group_size, layers, "output_group_size")
    _check_option_keys(input_shapes or {}, layers, "input_shapes")
    for layer in layers:
        layer.input_group_size = _options_for(input_group_size, layer, 0, "input_group_size")
        layer.output_group_size = _options_for(output_group_size, layer, 0, "output_group_size")
        if layer.is_conv:
            check_conv(layer)
            approximation = _options_for(conv_approximation, layer, "kfc", "conv_approximation")
            if str(approximation).lower() not in ("kfc", "sua"):
                raise ValueError(
                    f"KFACPreconditioner: conv_approximation must be 'kfc' or 'sua', not {approximation!r}"
                )
            layer.approximation = str(approximation).lower()
            size = _options_for(input_shapes or {}, layer, None, "input_shapes")
            if size is not None:
                layer.input_size = normalised_size(layer, size)
        else:
            for option, what in ((conv_approximation, "conv_approximation"), (input_shapes, "input_shapes")):
                if isinstance(option, dict) and any(
                    key is layer.module or key == layer.name for key in option
                ):
                    raise ValueError(f"KFACPreconditioner: {what} names the Linear layer {layer.name!r}")


def layer_dtype(layers: List[_Layer], dtype) -> torch.dtype:
    """The library's precision: ``dtype``, or the one dtype of the layers' weights."""
    param_dtypes = {layer.module.weight.dtype for layer in layers}
    if dtype is None:
        if len(param_dtypes) != 1:
            raise TypeError(
                "KFACPreconditioner: the preconditioned layers have parameters of several dtypes "
                f"({sorted(str(d) for d in param_dtypes)}); pass dtype= explicitly"
            )
        dtype = param_dtypes.pop()
    return _torch_dtype(dtype)


def conv_values(layer: _Layer) -> Tuple[int, int]:
    """(input values, output-gradient values) per example of a convolution of known input size."""
    module = layer.module
    values_in = module.in_channels
    values_out = module.out_channels
    for d in range(len(layer.input_size)):
        values_in *= layer.input_size[d]
        values_out *= _convert.conv_output_length(layer.input_size[d], module.kernel_size[d], module.stride[d],
                                                  layer.padding[d], module.dilation[d])
    return values_in, values_out


class RegistrationMixin:
    """Registration of the layers with the library, at construction or after the first training
    forward pass (see the package documentation), and what the preconditioner knows of them."""

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
                layer.input_values, layer.grad_values = conv_values(layer)
            assert index == layer.index
        if getattr(self, "_tridiagonal", False):
            for lower, upper in tridiagonal_links(self._layers):
                opt.link_layers(lower.index, upper.index)

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
