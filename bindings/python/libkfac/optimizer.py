"""The numpy front-end: :class:`Optimizer`, a K-FAC handle whose buffers are numpy arrays.

It checks and converts arrays (shapes, dtypes, layouts) and hands their addresses to the
address-level :class:`~libkfac._handle.Handle`; the adaptive mode's methods come from
:class:`~libkfac.adaptive.AdaptiveMethods`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _convert, _lib, _params
from ._convert import INT64_MAX, INT64_MIN
from ._errors import KFACError
from ._handle import Handle, LayerPointers
from .adaptive import AdaptiveMethods

__all__ = ["LayerInfo", "Optimizer"]


@dataclass(frozen=True)
class LayerInfo:
    """A registered layer, as described by ``kfac_layer_get_info``."""

    kind: int
    has_bias: bool
    in_features: int
    out_features: int
    a_dim: int
    g_dim: int
    has_factors: bool
    has_inverses: bool
    #: Independent Kronecker blocks: the convolution's ``groups``, 1 for dense layers.
    groups: int = 1


@dataclass(frozen=True)
class _LayerShapes:
    """What the wrapper checks buffers against, per registered layer.

    Dense layers record ``[..., in]``/``[..., out]`` rows (leading dimensions flattened);
    convolutions record examples: ``rows`` is the first dimension and every example holds
    ``input_values``/``grad_values`` numbers.
    """

    kind: int
    in_features: int  # dense: in; convolution: in_channels
    out_features: int  # dense: out; convolution: out_channels
    has_bias: bool
    weight_shapes: Tuple[Tuple[int, ...], ...]  # accepted weight-gradient shapes, canonical first
    input_values: int = 0  # convolution: values per example
    grad_values: int = 0
    input_shape: Tuple[int, ...] = ()  # convolution: one example's input, in the layer's layout
    grad_shape: Tuple[int, ...] = ()

    @property
    def is_dense(self) -> bool:
        return self.kind == _lib.KFAC_LAYER_DENSE


class Optimizer(AdaptiveMethods):
    """A K-FAC optimizer handle (``kfac_optimizer``) with numpy buffers.

    Args:
        dtype: ``np.float32`` or ``np.float64``; the precision of every buffer, factor and
            computation of this handle.
        **params: initial parameter values, by name (see :data:`PARAMETERS` and the
            properties below), e.g. ``Optimizer(np.float64, damping=1e-2, kl_clip=0)``.

    Every call whose library status is not ``KFAC_OK`` raises :class:`KFACError`; a failed call
    leaves the handle as it was. Arrays of a wrong shape or layout raise ``ValueError``, of a
    dtype that would have to be narrowed ``TypeError``, before the library is called.

    A handle is not meant to be shared between threads; calls on it are serialised by a lock.
    Use :meth:`close` (or a ``with`` block) to release it early.
    """


    def __init__(self, dtype=np.float32, **params):
        self._handle: Optional[Handle] = None
        self._handle = Handle(dtype)
        self._layers: list = []  # _LayerShapes per registered layer
        try:
            for name, value in params.items():
                self.set_param(name, value)
        except BaseException:
            self.close()
            raise

    # -----------------------------------------------------------------------------------------
    # Lifetime
    # -----------------------------------------------------------------------------------------

    @property
    def handle(self) -> Handle:
        """The address-level :class:`~libkfac._handle.Handle` under this optimizer: calls on raw
        buffer addresses without shape or dtype checks (what :mod:`libkfac.torch` uses)."""
        return self._handle

    def close(self) -> None:
        """Frees the handle. Further calls raise ``ValueError``; closing twice is harmless."""
        handle = getattr(self, "_handle", None)
        if handle is not None:
            handle.close()

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._handle.closed

    def __enter__(self) -> "Optimizer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __repr__(self) -> str:
        if self.closed:
            return "<libkfac.Optimizer (closed)>"
        return (
            f"<libkfac.Optimizer {self.dtype.name}, {len(self._layers)} layer(s), "
            f"step {self.step_count}>"
        )

    # -----------------------------------------------------------------------------------------
    # Basic queries
    # -----------------------------------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        """The handle's precision, ``np.dtype('float32')`` or ``np.dtype('float64')``."""
        return self._handle.dtype

    @property
    def num_layers(self) -> int:
        """Number of registered layers (``kfac_layer_count``)."""
        return self._handle.layer_count()

    def __len__(self) -> int:
        return self.num_layers

    @property
    def wants_statistics(self) -> bool:
        """Whether statistics recorded now would be folded at the next :meth:`step`."""
        return self._handle.wants_statistics()

    @property
    def step_count(self) -> int:
        """The step counter k: the number of successful :meth:`step` calls."""
        return self._handle.step_count()

    @property
    def last_kl_scale(self) -> Optional[float]:
        """ν of the last successful :meth:`step` (1.0 if no clipping), ``None`` before the first
        (``kfac_optimizer_get_kl_scale`` fails with ``KFAC_ERROR_NO_STEP`` then)."""
        return self._handle.kl_scale()

    # -----------------------------------------------------------------------------------------
    # Parameters
    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_param(param) -> Tuple[int, Optional[str], Optional[str]]:
        """(kfac_param value, name or None, "double"/"int"/None) for a name or an enum value."""
        if isinstance(param, str):
            try:
                entry = _params.PARAMETERS[param]
            except KeyError:
                raise ValueError(
                    f"libkfac: unknown parameter {param!r}; known: {', '.join(_params.PARAMETERS)}"
                ) from None
            return entry.id, param, entry.type
        if isinstance(param, bool):
            raise TypeError("parameter ids are integers, not bool")
        value = _convert.integer(param, "a parameter id")
        entry = _params.BY_ID.get(value)
        return (value, None, None) if entry is None else (value, entry.name, entry.type)

    def set_param(self, param, value) -> None:
        """Sets a parameter by name (``"damping"``) or enum value (``libkfac.KFAC_PARAM_DAMPING``).

        Double parameters take real numbers; integer parameters take integers (``pi_damping``
        also a bool); ``inverse_strategy`` also takes ``"cholesky"``/``"eigen"`` and
        ``loss_reduction`` ``"sum"``/``"mean"``. Out-of-range values raise :class:`KFACError`
        with status ``KFAC_ERROR_PARAMETER_RANGE``.
        """
        number, name, kind = self._resolve_param(param)
        if name in _convert.ENUM_PARAMETERS and isinstance(value, str):
            value = _convert.symbol(_convert.ENUM_PARAMETERS[name], value, name)
        if kind is None:
            # A parameter these bindings do not know: choose the setter by the value's type and
            # let the library judge it.
            kind = "int" if isinstance(value, (int, np.integer)) else "double"
        if kind == "double":
            if _convert.is_bool(value) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"libkfac: parameter {name or number} takes a real number, not {value!r}")
            self._handle.set_double(number, float(value))
        else:
            if _convert.is_bool(value):
                value = int(value)
            try:
                value = _convert.integer(value, f"parameter {name or number}")
            except TypeError:
                raise TypeError(
                    f"libkfac: parameter {name or number} takes an integer, not {value!r}"
                ) from None
            if not INT64_MIN <= value <= INT64_MAX:
                raise KFACError(
                    _lib.KFAC_ERROR_PARAMETER_RANGE,
                    f"value {value} of parameter {name or number} does not fit in int64",
                )
            self._handle.set_int(number, value)

    def get_param(self, param):
        """Reads a parameter by name or enum value. Double parameters are returned as float,
        integer ones as int, except ``pi_damping`` (bool), ``inverse_strategy``
        (``"cholesky"``/``"eigen"``) and ``loss_reduction`` (``"sum"``/``"mean"``)."""
        number, name, kind = self._resolve_param(param)
        if kind == "double":
            return self._handle.get_double(number)
        if kind is None:  # unknown to the bindings: ask the library as an int first
            try:
                return self._handle.get_int(number)
            except KFACError as error:
                if error.status != _lib.KFAC_ERROR_PARAMETER_TYPE:
                    raise
                return self._handle.get_double(number)
        return _params.to_python(name, self._handle.get_int(number))

    def params(self) -> dict:
        """All known parameters as a ``{name: value}`` dict."""
        return {name: self.get_param(name) for name in _params.PARAMETERS}

    # -----------------------------------------------------------------------------------------
    # Layers
    # -----------------------------------------------------------------------------------------

    def add_dense(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        input_group_size: int = 0,
        output_group_size: int = 0,
    ) -> int:
        """Registers a dense layer ``s = W a (+ b)``, ``W`` of shape ``[out][in]``; returns its
        id (0, 1, ... in order). All layers must be added before statistics are recorded.

        ``input_group_size``/``output_group_size`` > 0 restrict A/G to their block diagonal over
        groups of that many consecutive features (channel grouping; the bias becomes its own
        block of A); 0 means no grouping."""
        in_features = _convert.size(in_features, "in_features")
        out_features = _convert.size(out_features, "out_features")
        input_group_size = _convert.size(input_group_size, "input_group_size")
        output_group_size = _convert.size(output_group_size, "output_group_size")
        with self._handle.lock:
            layer = self._handle.add_dense(in_features, out_features, bool(bias), input_group_size,
                                           output_group_size)
            self._layers.append(
                _LayerShapes(
                    kind=_lib.KFAC_LAYER_DENSE,
                    in_features=in_features,
                    out_features=out_features,
                    has_bias=bool(bias),
                    weight_shapes=((out_features, in_features),),
                )
            )
        return layer

    def add_conv2d(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        input_size=None,
        layout: str = "nchw",
        approximation: str = "kfc",
        input_group_size: int = 0,
        output_group_size: int = 0,
    ) -> int:
        """Registers a 2-D convolution, as PyTorch's ``nn.Conv2d``, with a fixed input size;
        returns its id.

        Args:
            in_channels, out_channels, groups, bias: as ``nn.Conv2d``.
            kernel_size, stride, padding, dilation: an int or an ``(h, w)`` pair; ``padding``
                also ``'valid'``, or ``'same'`` when it is symmetric (see :func:`libkfac._convert.conv_padding`).
            input_size: ``(H, W)`` of the layer's input (required; fixed for the layer).
            layout: ``'nchw'`` (inputs ``[N][C][H][W]``, PyTorch) or ``'nhwc'``
                (``[N][H][W][C]``); the weight is ``[C_out][C_in/groups][kh][kw]`` either way.
            approximation: ``'kfc'`` (full patch second moment) or ``'sua'`` (spatially
                uncorrelated activations).
            input_group_size, output_group_size: channels per block of Ω / Γ (0 = no grouping).

        Inputs are recorded as ``[N, C, H, W]`` (or ``[N, H, W, C]``) arrays and output
        gradients as ``[N, C_out, H_out, W_out]`` (or channels-last), ``N`` examples per call.
        """
        if input_size is None:
            raise TypeError("libkfac: add_conv2d needs input_size=(H, W), the input's spatial size")
        kernel = _convert.pair(kernel_size, "kernel_size")
        stride = _convert.pair(stride, "stride")
        dilation = _convert.pair(dilation, "dilation")
        padding = _convert.pair(_convert.conv_padding(padding, kernel, stride, dilation)
                                if isinstance(padding, str) else padding, "padding")
        size = _convert.pair(input_size, "input_size")
        return self._add_conv(in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, size,
                              layout, approximation, input_group_size, output_group_size, one_d=False)

    def add_conv1d(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size,
        stride=1,
        padding=0,
        dilation=1,
        groups: int = 1,
        bias: bool = True,
        input_size=None,
        layout: str = "nchw",
        approximation: str = "kfc",
        input_group_size: int = 0,
        output_group_size: int = 0,
    ) -> int:
        """Registers a 1-D convolution, as PyTorch's ``nn.Conv1d``, over inputs of length
        ``input_size`` (an int, required); returns its id. The library sees it as a 1×L 2-D
        convolution. ``layout`` ``'nchw'`` means inputs ``[N][C][L]`` (PyTorch), ``'nhwc'``
        ``[N][L][C]``; the weight is ``[C_out][C_in/groups][k]``. Other arguments as
        :meth:`add_conv2d` (ints or 1-tuples)."""
        if input_size is None:
            raise TypeError("libkfac: add_conv1d needs input_size=L, the input's length")
        kernel = _convert.single(kernel_size, "kernel_size")
        stride = _convert.single(stride, "stride")
        dilation = _convert.single(dilation, "dilation")
        if isinstance(padding, str):
            (padding,) = _convert.conv_padding(padding, (kernel,), (stride,), (dilation,))
        padding = _convert.single(padding, "padding")
        length = _convert.single(input_size, "input_size")
        return self._add_conv(in_channels, out_channels, (1, kernel), (1, stride), (0, padding), (1, dilation),
                              groups, bias, (1, length), layout, approximation, input_group_size,
                              output_group_size, one_d=True)

    def _add_conv(self, in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, size,
                  layout, approximation, input_group_size, output_group_size, one_d: bool) -> int:
        in_channels = _convert.size(in_channels, "in_channels")
        out_channels = _convert.size(out_channels, "out_channels")
        groups = _convert.size(groups, "groups")
        layout_code = _convert.symbol(_convert.LAYOUTS, layout, "layout")
        approximation_code = _convert.symbol(_convert.APPROXIMATIONS, approximation, "approximation")
        desc = _lib.kfac_conv2d_desc.new(
            in_channels=in_channels,
            out_channels=out_channels,
            kernel_h=kernel[0],
            kernel_w=kernel[1],
            stride_h=stride[0],
            stride_w=stride[1],
            padding_h=padding[0],
            padding_w=padding[1],
            dilation_h=dilation[0],
            dilation_w=dilation[1],
            groups=groups,
            input_h=size[0],
            input_w=size[1],
            has_bias=1 if bias else 0,
            layout=layout_code,
            approximation=approximation_code,
            input_group_size=_convert.size(input_group_size, "input_group_size"),
            output_group_size=_convert.size(output_group_size, "output_group_size"),
        )
        with self._handle.lock:
            # The library validates everything (sizes, groups, kernel fitting the padded input).
            layer = self._handle.add_conv2d(desc)
            out_h, out_w = (_convert.conv_output_length(size[d], kernel[d], stride[d], padding[d], dilation[d])
                            for d in (0, 1))
            per_group = in_channels // groups
            full = (out_channels, per_group, kernel[0], kernel[1])
            flat = (out_channels, per_group * kernel[0] * kernel[1])
            channels_last = layout_code == _lib.KFAC_LAYOUT_NHWC
            if one_d:
                shapes = ((out_channels, per_group, kernel[1]), full, flat)
                input_shape = (size[1], in_channels) if channels_last else (in_channels, size[1])
                grad_shape = (out_w, out_channels) if channels_last else (out_channels, out_w)
            else:
                shapes = (full, flat)
                input_shape = (size[0], size[1], in_channels) if channels_last else (in_channels, size[0], size[1])
                grad_shape = (out_h, out_w, out_channels) if channels_last else (out_channels, out_h, out_w)
            self._layers.append(
                _LayerShapes(
                    kind=_lib.KFAC_LAYER_CONV2D,
                    in_features=in_channels,
                    out_features=out_channels,
                    has_bias=bool(bias),
                    weight_shapes=shapes,
                    input_values=in_channels * size[0] * size[1],
                    grad_values=out_channels * out_h * out_w,
                    input_shape=input_shape,
                    grad_shape=grad_shape,
                )
            )
        return layer

    def layer_info(self, layer: int) -> LayerInfo:
        """The library's description of layer ``layer`` (sizes, whether factors and inverses
        exist)."""
        info = self._handle.layer_info(self._checked_layer_id(layer))
        return LayerInfo(
            kind=int(info.kind),
            has_bias=bool(info.has_bias),
            in_features=int(info.in_features),
            out_features=int(info.out_features),
            a_dim=int(info.a_dim),
            g_dim=int(info.g_dim),
            has_factors=bool(info.has_factors),
            has_inverses=bool(info.has_inverses),
            groups=int(info.groups),
        )

    @staticmethod
    def _checked_layer_id(layer) -> int:
        """A layer id as an int32 (ids outside int32 cannot name a layer)."""
        if isinstance(layer, bool):
            raise TypeError("layer ids are integers, not bool")
        return _convert.int32(layer, "layer id", _lib.KFAC_ERROR_UNKNOWN_LAYER)

    def _shape_of(self, layer: int) -> Optional[_LayerShapes]:
        """The shapes of a registered layer, or None for an id the library will reject."""
        if 0 <= layer < len(self._layers):
            return self._layers[layer]
        return None

    # -----------------------------------------------------------------------------------------
    # Buffers
    # -----------------------------------------------------------------------------------------

    def _converted(self, array, what: str) -> np.ndarray:
        """``array`` as a C-contiguous array of the handle's dtype, without a copy when it
        already is one; ``TypeError`` if converting would narrow."""
        array = np.asarray(array)
        dtype = self.dtype
        if array.dtype != dtype and not np.can_cast(array.dtype, dtype, casting="safe"):
            raise TypeError(
                f"libkfac: {what} of dtype {array.dtype} would be narrowed to the optimizer's "
                f"{dtype}; convert it explicitly"
            )
        return np.ascontiguousarray(array, dtype=dtype)

    def _input_rows(self, array, features: Optional[int], what: str) -> np.ndarray:
        """A C-contiguous 2-D array of the handle's dtype viewing (or, if needed, converting)
        ``array``; leading dimensions beyond the last are flattened into rows."""
        array = self._converted(array, what)
        if array.ndim < 2:
            raise ValueError(f"libkfac: {what} must be 2-D [rows][features], got shape {array.shape}")
        if features is not None and array.shape[-1] != features:
            raise ValueError(
                f"libkfac: {what} have {array.shape[-1]} features per row, the layer has {features}"
            )
        if array.ndim > 2:
            array = array.reshape(-1, array.shape[-1])
        return array

    def _example_rows(self, array, values: int, example_shape, what: str) -> np.ndarray:
        """A C-contiguous array of the handle's dtype holding ``N`` examples of ``values``
        numbers each, ``N`` being the first dimension of ``array``."""
        array = self._converted(array, what)
        if array.ndim < 1:
            raise ValueError(f"libkfac: {what} must have a leading examples dimension, got a scalar")
        per_example = int(np.prod(array.shape[1:], dtype=np.int64)) if array.ndim > 1 else 1
        if per_example != values:
            raise ValueError(
                f"libkfac: {what} of shape {array.shape} hold {per_example} values per example "
                f"(first dimension = examples); the layer expects {values}, e.g. shape "
                f"[N, {', '.join(str(d) for d in example_shape)}]"
            )
        return array

    def _output_rows(self, array, dim: Optional[int], what: str) -> np.ndarray:
        """A C-contiguous ``[rows][dim]`` array of the handle's dtype from ``[..., dim]`` data
        (leading dimensions flattened into rows; converted without narrowing)."""
        array = self._converted(array, what)
        if array.ndim < 2:
            raise ValueError(f"libkfac: {what} must be [rows][output_dim] (2-D or more), got shape {array.shape}")
        if dim is not None and array.shape[-1] != dim:
            raise ValueError(f"libkfac: {what} have {array.shape[-1]} values per row, the outputs {dim}")
        return array.reshape(-1, array.shape[-1])

    def _inout_buffer(self, array, shape, what: str) -> int:
        """The address of an array the library will overwrite, after checking it: ndarray,
        handle's dtype, C-contiguous, writeable, of the expected shape (or one of a list)."""
        if not isinstance(array, np.ndarray):
            raise TypeError(f"libkfac: {what} must be a numpy.ndarray, not {type(array).__name__}")
        if array.dtype != self.dtype:
            raise TypeError(f"libkfac: {what} has dtype {array.dtype}, the optimizer {self.dtype}")
        shapes = shape if isinstance(shape, list) else [shape]
        if array.shape not in shapes:
            expected = " or ".join(str(s) for s in shapes)
            raise ValueError(f"libkfac: {what} has shape {array.shape}, expected {expected}")
        if not array.flags.c_contiguous:
            raise ValueError(f"libkfac: {what} must be C-contiguous (it is modified in place)")
        if not array.flags.writeable:
            raise ValueError(f"libkfac: {what} is read-only (it is modified in place)")
        return array.ctypes.data

    def _layer_buffers(self, weights, biases, weight_name: str, bias_name: str) -> LayerPointers:
        """:class:`LayerPointers` for arrays the library writes with the layout and bias rules
        of :meth:`step`: one C-contiguous, writeable array of the handle's dtype per layer
        (``None`` for the bias of a layer without one; ``biases`` may be ``None`` when no layer
        has a bias). The arrays must stay alive while the pointers are used."""
        self._handle.pointer  # a closed optimizer raises ValueError before any argument error
        n = len(self._layers)
        weights = list(weights)
        if len(weights) != n:
            raise ValueError(f"libkfac: got {len(weights)} arrays in {weight_name} for {n} layers")
        biases = [None] * n if biases is None else list(biases)
        if len(biases) != n:
            raise ValueError(f"libkfac: got {len(biases)} arrays in {bias_name} for {n} layers")
        weight_addresses, bias_addresses = [], []
        for index, (shape, w, b) in enumerate(zip(self._layers, weights, biases)):
            weight_addresses.append(self._inout_buffer(w, list(shape.weight_shapes), f"{weight_name}[{index}]"))
            if shape.has_bias:
                if b is None:
                    raise ValueError(f"libkfac: layer {index} has a bias but {bias_name}[{index}] is None")
                bias_addresses.append(self._inout_buffer(b, (shape.out_features,), f"{bias_name}[{index}]"))
            elif b is not None:
                raise ValueError(f"libkfac: layer {index} has no bias; {bias_name}[{index}] must be None")
            else:
                bias_addresses.append(0)
        return self._handle.pointer_arrays(weight_addresses, bias_addresses)

    # -----------------------------------------------------------------------------------------
    # Statistics
    # -----------------------------------------------------------------------------------------

    def record_inputs(self, layer: int, inputs) -> None:
        """Adds layer inputs to layer ``layer``'s input statistics.

        Dense layers: the rows of ``inputs`` (``[rows][in_features]``, or
        ``[..., in_features]``, leading dimensions flattened into rows). Convolutions: ``N``
        examples ``[N, C, H, W]`` (``[N, H, W, C]`` for ``layout='nhwc'``; ``[N, C, L]`` for a
        1-D convolution); the first dimension is ``N`` and the rest must hold exactly one
        example's values. C-contiguous arrays of the handle's dtype are passed without a copy;
        others are converted if that does not narrow (``TypeError`` if it would)."""
        self._record(0, layer, inputs, "inputs")

    def record_output_grads(self, layer: int, output_grads) -> None:
        """Adds output gradients to layer ``layer``'s gradient statistics, after the
        ``loss_reduction`` and ``output_grad_scale`` adjustments: dense ``[rows][out_features]``,
        convolutions ``[N, C_out, H_out, W_out]`` (or channels-last), as in
        :meth:`record_inputs`."""
        self._record(1, layer, output_grads, "output gradients")

    def _record(self, side: int, layer, array, what: str) -> None:
        layer = self._checked_layer_id(layer)
        shape = self._shape_of(layer)
        if shape is None or shape.is_dense:
            features = None if shape is None else (shape.in_features, shape.out_features)[side]
            rows = self._input_rows(array, features, what)
        else:
            rows = self._example_rows(
                array,
                (shape.input_values, shape.grad_values)[side],
                (shape.input_shape, shape.grad_shape)[side],
                what,
            )
        self._handle.record(side, layer, rows.ctypes.data, rows.shape[0])

    def record_examples(self, layer: int, inputs, output_grads, rows_per_example: Optional[int] = None) -> None:
        """EXPERIMENTAL (``kfac_layer_record_examples_*``; may change in any minor release).
        Records inputs and the output gradients of the same rows: what :meth:`record_inputs` and
        :meth:`record_output_grads` add to the factors, and — with ``inverse_strategy='ekfac'`` —
        the per-example gradients EKFAC's scaling S is estimated from (use it instead of those
        two calls).

        Dense layers: ``inputs`` ``[rows][in_features]`` and ``output_grads``
        ``[rows][out_features]`` (or ``[..., features]``); an example is ``rows_per_example``
        consecutive rows (a sequence of T tokens). ``None`` means T = the second dimension of
        3-D ``[N, T, features]`` arrays, else 1. Convolutions: ``N`` examples of each, as in
        :meth:`record_inputs`; ``rows_per_example`` must be ``None`` or 1."""
        layer = self._checked_layer_id(layer)
        shape = self._shape_of(layer)
        if shape is None or shape.is_dense:
            features = (None, None) if shape is None else (shape.in_features, shape.out_features)
            if rows_per_example is None:
                rows_per_example = np.shape(inputs)[1] if np.ndim(inputs) == 3 else 1
            x = self._input_rows(inputs, features[0], "inputs")
            g = self._input_rows(output_grads, features[1], "output gradients")
        else:
            rows_per_example = 1 if rows_per_example is None else rows_per_example
            x = self._example_rows(inputs, shape.input_values, shape.input_shape, "inputs")
            g = self._example_rows(output_grads, shape.grad_values, shape.grad_shape, "output gradients")
        if x.shape[0] != g.shape[0]:
            raise ValueError(f"libkfac: inputs hold {x.shape[0]} rows, output gradients {g.shape[0]}: they must pair")
        rows_per_example = _convert.size(rows_per_example, "rows_per_example")
        self._handle.record_examples(layer, x.ctypes.data, g.ctypes.data, x.shape[0], rows_per_example)

    def ekfac_scaling(self, layer: int, group: int = 0) -> np.ndarray:
        """EXPERIMENTAL (``kfac_layer_get_ekfac_scaling_*``). A copy of EKFAC's scaling S of group
        ``group`` of layer ``layer``, ``[g_dim][a_dim]``: S[i, j] belongs to the i-th eigenvector
        of G and the j-th of A, eigenvalues ascending (block by block for grouped and SUA
        factors). ``KFACError`` ``KFAC_ERROR_NO_INVERSES`` without an EKFAC inverse."""
        info = self.layer_info(layer)
        if _convert.is_bool(group):
            raise TypeError("libkfac: group must be an integer, not bool")
        group = _convert.int32(group, "group", _lib.KFAC_ERROR_INVALID_ARGUMENT)
        s = np.empty((info.g_dim, info.a_dim), dtype=self.dtype)
        self._handle.get_ekfac_scaling(int(layer), group, s.ctypes.data)
        return s

    def update_factors(self) -> None:
        """Folds all pending statistics into the running factors now."""
        self._handle.update_factors()

    def update_inverses(self) -> None:
        """Recomputes the inverses of every layer that has factors now."""
        self._handle.update_inverses()

    def discard_statistics(self) -> None:
        """Drops the statistics recorded since the last factor update (running factors,
        inverses and counters stay): the way out of pending statistics every step refuses."""
        self._handle.discard_statistics()

    def factors(self, layer: int, group: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """Copies of the running factors of group ``group`` of layer ``layer``: ``(A, G)`` of a
        dense layer (group 0), ``(Ω_g, Γ_g)`` of a convolution group, of shapes
        ``[a_dim][a_dim]`` and ``[g_dim][g_dim]``, full matrices in the weight's order with
        zeros off the blocks of channel grouping (SUA: the expanded ``C_g ⊗ I`` and the bias
        block). ``0 <= group < layer_info(layer).groups``."""
        info = self.layer_info(layer)
        if _convert.is_bool(group):
            raise TypeError("libkfac: group must be an integer, not bool")
        group = _convert.int32(group, "group", _lib.KFAC_ERROR_INVALID_ARGUMENT)
        a = np.empty((info.a_dim, info.a_dim), dtype=self.dtype)
        g = np.empty((info.g_dim, info.g_dim), dtype=self.dtype)
        self._handle.get_factors(int(layer), group, a.ctypes.data, g.ctypes.data)
        return a, g

    # -----------------------------------------------------------------------------------------
    # Block-tridiagonal links (experimental)
    # -----------------------------------------------------------------------------------------

    def link_layers(self, lower: int, upper: int) -> None:
        """EXPERIMENTAL (``kfac_layer_link``; may change in any minor release). Links dense
        layer ``lower`` with ``upper = lower + 1`` (which consumes its activation) for
        block-tridiagonal K-FAC (Martens & Grosse 2015, §4.3): the step and
        :meth:`curvature_multiply` then use the chain's F̂⁻¹ = Ξᵀ Λ Ξ for linked layers, with
        factored (π) damping of their diagonal factors whatever the inverse strategy. Link
        before recording statistics; record the same examples, in the same order, for both
        layers of a link. :meth:`precondition` on a linked layer raises ``KFAC_ERROR_UNSUPPORTED``."""
        for name, value in (("lower", lower), ("upper", upper)):
            if _convert.is_bool(value):
                raise TypeError(f"libkfac: {name} must be an integer, not bool")
        lower = _convert.int32(lower, "lower", _lib.KFAC_ERROR_UNKNOWN_LAYER)
        upper = _convert.int32(upper, "upper", _lib.KFAC_ERROR_UNKNOWN_LAYER)
        self._handle.link(lower, upper)

    def cross_factors(self, lower: int) -> Tuple[np.ndarray, np.ndarray]:
        """EXPERIMENTAL (``kfac_layer_get_cross_factors_*``). Copies of the running cross
        factors of the link from ``lower`` to ``lower + 1``: ``A_{l,l+1} = E[ā_l ā_{l+1}ᵀ]`` of
        shape ``[a_dim(lower)][a_dim(lower + 1)]`` and ``G_{l,l+1} = E[g_l g_{l+1}ᵀ]`` of shape
        ``[out(lower)][out(lower + 1)]``."""
        lower = self._checked_layer_id(lower)
        if lower < 0 or lower + 1 >= self.num_layers:
            # Let the library report the unknown layer or the missing link.
            self._handle.get_cross_factors(lower, 0, 0)
            raise AssertionError("unreachable")  # pragma: no cover
        lo, up = self.layer_info(lower), self.layer_info(lower + 1)
        a = np.empty((lo.a_dim, up.a_dim), dtype=self.dtype)
        g = np.empty((lo.g_dim, up.g_dim), dtype=self.dtype)
        self._handle.get_cross_factors(lower, a.ctypes.data, g.ctypes.data)
        return a, g

    # -----------------------------------------------------------------------------------------
    # Preconditioning
    # -----------------------------------------------------------------------------------------

    def step(
        self,
        weight_grads: Sequence[np.ndarray],
        bias_grads: Optional[Sequence[Optional[np.ndarray]]] = None,
    ) -> None:
        """One optimizer step over all layers; overwrites the gradients in place.

        Args:
            weight_grads: one array per layer: ``[out][in]`` for a dense layer,
                ``[C_out][C_in/groups][kh][kw]`` for a 2-D convolution, ``[C_out][C_in/groups][k]``
                for a 1-D one (the flattened ``[C_out][(C_in/groups)·kh·kw]`` is accepted too).
            bias_grads: one array ``[out]`` per layer, ``None`` for layers without bias; may be
                ``None`` altogether when no layer has a bias.

        Every array must be a C-contiguous, writeable ``np.ndarray`` of the handle's dtype.
        """
        with self._handle.lock:
            self._handle.step(self._layer_buffers(weight_grads, bias_grads, "weight_grads", "bias_grads"))

    def precondition(self, layer: int, weight_grad: np.ndarray, bias_grad: Optional[np.ndarray] = None) -> None:
        """Preconditions one layer's gradient in place with the current inverses (no schedule,
        no KL clip, no change to the handle). ``bias_grad`` must be given exactly when the layer
        has a bias. Array requirements as in :meth:`step`."""
        layer = self._checked_layer_id(layer)
        shape = self._shape_of(layer)
        if shape is None:
            # Unknown id: let the library report it. It must not read the buffers; pass valid
            # dummies so that the only thing wrong with the call is the id.
            dummy_w = np.zeros(1, dtype=self.dtype)
            dummy_b = np.zeros(1, dtype=self.dtype)
            self._handle.precondition(layer, dummy_w.ctypes.data, dummy_b.ctypes.data)
            return
        w_address = self._inout_buffer(weight_grad, list(shape.weight_shapes), "weight_grad")
        if shape.has_bias and bias_grad is None:
            raise ValueError(f"libkfac: layer {layer} has a bias; bias_grad is required")
        if not shape.has_bias and bias_grad is not None:
            raise ValueError(f"libkfac: layer {layer} has no bias; bias_grad must be None")
        b_address = self._inout_buffer(bias_grad, (shape.out_features,), "bias_grad") if shape.has_bias else 0
        self._handle.precondition(layer, w_address, b_address)

    def curvature_multiply(
        self,
        weights: Sequence[np.ndarray],
        biases: Optional[Sequence[Optional[np.ndarray]]] = None,
        power: int = 1,
    ) -> None:
        """EXPERIMENTAL (``kfac_curvature_multiply_*``; may change in any minor release).
        Overwrites every layer's arrays V with ``C^power · V``, C being the damped curvature
        block the current inverse strategy inverts (eigen: ``A ⊗ G + λI``; Cholesky:
        ``(A + π√λ I) ⊗ (G + √λ/π I)``; λ = ``factor_damping`` if > 0, else ``damping``).
        ``power`` +1 uses the running factors (``KFAC_ERROR_NO_STATISTICS`` before they exist),
        −1 the current inverses (``KFAC_ERROR_NO_INVERSES``). The arrays follow :meth:`step`'s
        layout and rules. No schedule, no KL clip, no change to the handle."""
        if _convert.is_bool(power):
            raise TypeError("libkfac: power must be an integer, not bool")
        power = _convert.int32(power, "power", _lib.KFAC_ERROR_INVALID_ARGUMENT)
        with self._handle.lock:
            self._handle.curvature_multiply(power, self._layer_buffers(weights, biases, "weights", "biases"))

    # -----------------------------------------------------------------------------------------
    # Distributed runs (experimental: kfac_distributed_*)
    # -----------------------------------------------------------------------------------------

    _EXCHANGES = {"statistics": _lib.KFAC_DISTRIBUTED_STATISTICS, "inverses": _lib.KFAC_DISTRIBUTED_INVERSES,
                  "scalings": _lib.KFAC_DISTRIBUTED_SCALINGS}

    def _exchange_code(self, what) -> int:
        if isinstance(what, str):
            if what not in self._EXCHANGES:
                raise ValueError(f"libkfac: what must be 'statistics', 'inverses' or 'scalings', not {what!r}")
            return self._EXCHANGES[what]
        return _convert.int32(what, "what", _lib.KFAC_ERROR_INVALID_ARGUMENT)

    def set_world(self, rank: int, size: int) -> None:
        """EXPERIMENTAL (``kfac_distributed_set_world``). Makes this handle rank ``rank`` of
        ``size`` processes of a data-parallel run (not saved in states: set it after a load)."""
        self._handle.set_world(_convert.int32(rank, "rank", _lib.KFAC_ERROR_INVALID_ARGUMENT),
                               _convert.int32(size, "size", _lib.KFAC_ERROR_INVALID_ARGUMENT))

    @property
    def world(self) -> Tuple[int, int]:
        """EXPERIMENTAL. ``(rank, size)`` (``kfac_distributed_get_world``)."""
        return self._handle.get_world()

    def exchange_size(self, what) -> int:
        """EXPERIMENTAL. Values of a pack of ``what`` (``"statistics"``, ``"inverses"`` or EKFAC's
        ``"scalings"``)."""
        return self._handle.exchange_count(self._exchange_code(what))

    def exchange_due(self, what) -> bool:
        """EXPERIMENTAL. Whether the next :meth:`step` needs the exchange ``what`` (the same
        answer on every rank)."""
        return self._handle.exchange_due(self._exchange_code(what))

    def inverse_owner(self, layer: int, group: int = 0, side: int = 0, block: int = 0) -> int:
        """EXPERIMENTAL. The rank that inverts block ``block`` of the input (side 0) or output
        (side 1) factor of group ``group`` of ``layer``."""
        return self._handle.inverse_owner(layer, group, side, block)

    def _pack(self, name: str, what: str) -> np.ndarray:
        with self._handle.lock:
            out = np.zeros(self.exchange_size(what), dtype=self.dtype)
            self._handle.exchange(name, out.ctypes.data, out.size)
            return out

    def _unpack(self, name: str, what: str, buffer: np.ndarray) -> None:
        buffer = np.ascontiguousarray(buffer)
        if buffer.dtype != self.dtype or buffer.ndim != 1:
            raise TypeError(f"libkfac: the {what} buffer must be a 1-D {self.dtype} array")
        self._handle.exchange(name, buffer.ctypes.data, buffer.size)

    def pack_statistics(self) -> np.ndarray:
        """EXPERIMENTAL. This rank's statistics for a SUM-allreduce (see include/kfac.h,
        "Distributed"). Changes nothing."""
        return self._pack("pack_statistics", "statistics")

    def unpack_statistics(self, buffer: np.ndarray) -> None:
        """EXPERIMENTAL. Takes the SUM-allreduced statistics pack."""
        self._unpack("unpack_statistics", "statistics", buffer)

    def pack_inverses(self) -> np.ndarray:
        """EXPERIMENTAL. The inverses the next step needs, for the blocks this rank owns (zeros
        elsewhere; NaN everywhere if an inversion failed, after which the error is raised)."""
        with self._handle.lock:
            out = np.zeros(self.exchange_size("inverses"), dtype=self.dtype)
            try:
                self._handle.exchange("pack_inverses", out.ctypes.data, out.size)
            except KFACError:
                out[:] = np.nan
                raise
            return out

    def unpack_inverses(self, buffer: np.ndarray) -> None:
        """EXPERIMENTAL. Takes the SUM-allreduced inverse pack: the next step uses it."""
        self._unpack("unpack_inverses", "inverses", buffer)

    def pack_scalings(self) -> np.ndarray:
        """EXPERIMENTAL. EKFAC: this rank's per-example sums of S for the next step (in the bases
        that step uses: after :meth:`unpack_inverses` when it inverts) and their counts, for a
        SUM-allreduce (``kfac_distributed_pack_scalings_*``; NaN everywhere if the pack failed,
        after which the error is raised). Changes nothing."""
        with self._handle.lock:
            out = np.zeros(self.exchange_size("scalings"), dtype=self.dtype)
            try:
                self._handle.exchange("pack_scalings", out.ctypes.data, out.size)
            except KFACError:
                out[:] = np.nan
                raise
            return out

    def unpack_scalings(self, buffer: np.ndarray) -> None:
        """EXPERIMENTAL. EKFAC: takes the SUM-allreduced scaling pack: the next step forms S from
        the union's examples (``kfac_distributed_unpack_scalings_*``)."""
        self._unpack("unpack_scalings", "scalings", buffer)

    def inverse_layout(self) -> Tuple[list, list]:
        """EXPERIMENTAL. (counts, displacements) per rank of the gathered inverse exchange the
        next step needs (``kfac_distributed_get_inverse_layout``)."""
        return self._handle.inverse_layout(self.world[1])

    def pack_owned_inverses(self) -> np.ndarray:
        """EXPERIMENTAL. Only the inverse units this rank owns, for an allgatherv (NaN if an
        inversion failed, after which the error is raised)."""
        with self._handle.lock:
            counts, _ = self.inverse_layout()
            out = np.zeros(counts[self.world[0]], dtype=self.dtype)
            self._handle.exchange("pack_owned_inverses", out.ctypes.data, out.size)
            return out

    def unpack_gathered_inverses(self, buffer: np.ndarray) -> None:
        """EXPERIMENTAL. Takes every rank's segment (rank order) as the next step's inverses."""
        self._unpack("unpack_gathered_inverses", "gathered inverse", buffer)

    def synchronize(self, allreduce_sum, allgatherv=None) -> None:
        """EXPERIMENTAL. The exchanges the next :meth:`step` needs, each through
        ``allreduce_sum(array)``, which must return the element-wise sum over all ranks (or
        ``None`` after summing in place); every rank calls it for the same exchanges, in the
        same order. ``allgatherv(mine, counts, displacements)``, if given, exchanges the
        inverses instead: it must return the concatenation of every rank's ``mine`` (rank r's
        ``counts[r]`` values at ``displacements[r]``), without zero padding. Runs ``kfac_distributed_synchronize``: the array wraps a buffer the library
        owns, valid only during the call. An inverse pack that fails still takes part in the
        allreduce (as NaN), so that every rank raises alike. If ``allreduce_sum`` raises, that
        exception propagates and the handle is as before the call (also when the statistics
        were already unpacked: the library puts them back)."""
        failures = []

        def reduce(pointer, count):
            try:
                buffer = np.ctypeslib.as_array(pointer, shape=(count,))
                reduced = allreduce_sum(buffer)
                if reduced is not None and reduced is not buffer:
                    buffer[...] = np.asarray(reduced, dtype=self.dtype).reshape(-1)
                return 0
            except BaseException as error:  # an exception cannot cross the C frames
                failures.append(error)
                return 1

        def gather(send, receive, counts, displacements):
            try:
                size = self.world[1]
                c = [int(counts[r]) for r in range(size)]
                d = [int(displacements[r]) for r in range(size)]
                rank = self.world[0]
                mine = np.ctypeslib.as_array(send, shape=(max(c[rank], 1),))[:c[rank]]
                out = np.ctypeslib.as_array(receive, shape=(max(d[-1] + c[-1], 1),))[:d[-1] + c[-1]]
                result = allgatherv(mine, c, d)
                if result is not None:
                    out[...] = np.asarray(result, dtype=self.dtype).reshape(-1)
                return 0
            except BaseException as error:
                failures.append(error)
                return 1

        try:
            self._handle.synchronize(reduce, gather if allgatherv is not None else None)
        except KFACError as error:
            if failures:
                raise failures[0] from error
            raise

    # -----------------------------------------------------------------------------------------
    # State
    # -----------------------------------------------------------------------------------------

    def state_bytes(self) -> bytes:
        """The complete state image (parameters, counters, factors, pending statistics,
        inverses) as bytes; :meth:`load_state` restores it bit for bit."""
        return self._handle.state_bytes()

    def load_state(self, image: Union[bytes, bytearray, memoryview]) -> None:
        """Replaces the handle's state with an image from :meth:`state_bytes` (same precision
        and layers). On error the handle is unchanged."""
        self._handle.load_state(bytes(image))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the state image to ``path`` atomically."""
        self._handle.save_file(os.fsencode(path))

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Loads a state image written by :meth:`save`."""
        self._handle.load_file(os.fsencode(path))


# What each parameter means; its type, bounds, default, family and when it takes effect come
# from the library's table (_params) and are appended to the property's documentation.
_MEANINGS = {
    "learning_rate": "η of the KL clip (0: ν = 1). Used for nothing else.",
    "damping": "λ, the damping of the curvature (and of the quadratic model of the adaptive mode).",
    "factor_decay": "β of the factors' moving average.",
    "kl_clip": "κ of the KL clip; 0 disables it.",
    "output_grad_scale": "Recorded output gradients are divided by it (a loss scale).",
    "factor_update_period": "Tf: fold statistics every Tf steps; 0 = only update_factors().",
    "inverse_update_period": "Ti: recompute inverses every Ti steps; 0 = only update_inverses().",
    "inverse_strategy": "'cholesky', 'eigen' or 'ekfac' (experimental); set with a name or a KFAC_INVERSE_* int.",
    "pi_damping": "Use π in factored (Cholesky) damping (bool).",
    "loss_reduction": "'sum' or 'mean': how the caller's loss was reduced.",
    "num_threads": "Threads for parallel inversion (0 = all CPUs).",
    "inverse_spread": (
        "Spread the inversions of a period over its steps, block by block (bool): each block is "
        "re-inverted once per inverse_update_period, at the step of its phase, from that step's "
        "factors; an inverse is at most one period old."
    ),
    "async_inversion": (
        "'off', 'newest' (or True) or 'deterministic': invert in the background. A due step hands "
        "the inversion of its factors to a library thread and a later step commits it: 'newest' "
        "the first step that finds it finished, 'deterministic' exactly the next due step (a "
        "synchronous run lagging one inverse_update_period). Inverses are at most one period "
        "staler than without it; not with 'ekfac', inverse_spread or factor_damping_period."
    ),
    "lm_interval": "T₁: adjust λ every T₁ report_loss_change() calls (0 = off).",
    "lm_decay": "ω₁ of the Levenberg–Marquardt adjustment of λ.",
    "factor_damping": "γ: damping of the factor inverses instead of λ when > 0.",
    "factor_damping_period": (
        "T₂: every T₂ steps (k ≡ 0 mod T₂) the step prepares direction candidates for the factor "
        "dampings γ, γ·ω₂, γ/ω₂ and solve_step_size_candidates() keeps the best γ (0 = off)."
    ),
    "ekfac_decay": "β_S of the moving average of EKFAC's scaling S between eigenbasis refreshes.",
    "ekfac_mode": (
        "'per_example' (exact: an example's rows or positions summed before squaring) or 'per_row' "
        "(each row or position its own example): how record_examples() forms EKFAC's per-example gradients."
    ),
    "factor_damping_decay": (
        "ω₂'s base: the candidates of a γ step are γ, γ·ω₂ and γ/ω₂ with "
        "ω₂ = factor_damping_decay ** factor_damping_period."
    ),
    "damping_min": "λ_min: the Levenberg–Marquardt adjustment never decreases λ below it (0 = no floor).",
    "factor_damping_ratio": (
        "r: the re-choice of γ keeps γ within [λ/r, λ·r] (a γ step clamps γ into it and drops "
        "candidates outside it; 1e300 = no band)."
    ),
    "distributed_reduce": (
        "'eager' (union-batch statistics at every factor update) or 'lazy' (moving averages "
        "averaged only before an inverse update; exact for equal local batches)."
    ),
}


def _make_property(parameter: "_params.Parameter"):
    name = parameter.name

    def getter(self):
        return self.get_param(name)

    def setter(self, value):
        self.set_param(name, value)

    meaning = _MEANINGS.get(name, f"The library's {name} parameter.")
    return property(getter, setter, doc=f"{meaning} ({parameter.describe()}.)")


# One property per parameter the loaded library knows.
for _parameter in _params.PARAMETERS.values():
    setattr(Optimizer, _parameter.name, _make_property(_parameter))
del _parameter
