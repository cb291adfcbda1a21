"""The numpy-friendly wrapper around a ``kfac_optimizer`` handle."""

from __future__ import annotations

import ctypes
import operator
import os
import threading
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple, Union

import numpy as np

from . import _lib
from ._sampling import distribution_code

__all__ = ["KFACError", "LayerInfo", "Optimizer", "PARAMETERS"]

_INT32_MIN, _INT32_MAX = -(2**31), 2**31 - 1
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


class KFACError(Exception):
    """A libkfac call returned a non-zero status.

    Attributes:
        status: the negative status code (e.g. ``kfac.KFAC_ERROR_NO_STATISTICS``).
        status_name: the constant's name (e.g. ``"KFAC_ERROR_NO_STATISTICS"``).
        message: the library's description of the failure (``kfac_last_error``).
    """

    def __init__(self, status: int, message: str = ""):
        self.status = int(status)
        self.status_name = _lib.status_name(self.status)
        self.message = message or _lib.status_string(self.status)
        super().__init__(f"{self.status_name} ({self.status}): {self.message}")

    def __reduce__(self):
        return (type(self), (self.status, self.message))


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


_LAYOUTS = {"nchw": _lib.KFAC_LAYOUT_NCHW, "nhwc": _lib.KFAC_LAYOUT_NHWC}
_APPROXIMATIONS = {"kfc": _lib.KFAC_CONV_KFC, "sua": _lib.KFAC_CONV_SUA}


def _size(value, what: str) -> int:
    """An integer size argument (not bool, not float), range-checked for int64."""
    if isinstance(value, (bool, np.bool_)):
        raise TypeError(f"kfac: {what} must be an integer, not bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"kfac: {what} must be an integer, not {value!r}") from None
    if not _INT64_MIN <= value <= _INT64_MAX:
        raise KFACError(_lib.KFAC_ERROR_SIZE_OVERFLOW, f"{what} = {value} does not fit in int64")
    return value


def _pair(value, what: str) -> Tuple[int, int]:
    """An int or a pair of ints (PyTorch's ``int or tuple``) as a (height, width) pair."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2:
            raise ValueError(f"kfac: {what} must be an int or a pair of ints, got {value!r}")
        return _size(value[0], what), _size(value[1], what)
    value = _size(value, what)
    return value, value


def _single(value, what: str) -> int:
    """An int or a 1-tuple of an int (PyTorch's ``_single``)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ValueError(f"kfac: {what} of a 1-D convolution must be an int or a 1-tuple, got {value!r}")
        value = value[0]
    return _size(value, what)


def conv_padding(padding, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tuple[int, ...]:
    """Symmetric zero padding, per spatial dimension, equivalent to PyTorch's ``padding``
    argument: ints pass through; ``'valid'`` is 0; ``'same'`` is ``dilation·(kernel − 1) / 2``
    when that is a whole number and the stride is 1 (PyTorch pads the extra element on one side
    only when it is odd, which the library's symmetric padding cannot express: ValueError)."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return tuple(0 for _ in kernel)
        if mode == "same":
            result = []
            for k, s, d in zip(kernel, stride, dilation):
                total = d * (k - 1)
                if s != 1:
                    raise ValueError("kfac: padding='same' requires stride 1 (as in PyTorch)")
                if total % 2:
                    raise ValueError(
                        f"kfac: padding='same' with kernel {k} and dilation {d} pads {total} "
                        "zeros, one side more than the other; the library supports symmetric "
                        "padding only"
                    )
                result.append(total // 2)
            return tuple(result)
        raise ValueError(f"kfac: padding must be an int, a tuple, 'valid' or 'same', not {padding!r}")
    return tuple(padding)


# Parameter name -> (kfac_param value, "double" or "int").
PARAMETERS = {
    "learning_rate": (_lib.KFAC_PARAM_LEARNING_RATE, "double"),
    "damping": (_lib.KFAC_PARAM_DAMPING, "double"),
    "factor_decay": (_lib.KFAC_PARAM_FACTOR_DECAY, "double"),
    "kl_clip": (_lib.KFAC_PARAM_KL_CLIP, "double"),
    "output_grad_scale": (_lib.KFAC_PARAM_OUTPUT_GRAD_SCALE, "double"),
    "lm_decay": (_lib.KFAC_PARAM_LM_DECAY, "double"),
    "factor_damping": (_lib.KFAC_PARAM_FACTOR_DAMPING, "double"),
    "factor_damping_decay": (_lib.KFAC_PARAM_FACTOR_DAMPING_DECAY, "double"),
    "factor_update_period": (_lib.KFAC_PARAM_FACTOR_UPDATE_PERIOD, "int"),
    "inverse_update_period": (_lib.KFAC_PARAM_INVERSE_UPDATE_PERIOD, "int"),
    "inverse_strategy": (_lib.KFAC_PARAM_INVERSE_STRATEGY, "int"),
    "pi_damping": (_lib.KFAC_PARAM_PI_DAMPING, "int"),
    "loss_reduction": (_lib.KFAC_PARAM_LOSS_REDUCTION, "int"),
    "num_threads": (_lib.KFAC_PARAM_NUM_THREADS, "int"),
    "lm_interval": (_lib.KFAC_PARAM_LM_INTERVAL, "int"),
    "factor_damping_period": (_lib.KFAC_PARAM_FACTOR_DAMPING_PERIOD, "int"),
}
_PARAM_BY_VALUE = {value: (name, kind) for name, (value, kind) in PARAMETERS.items()}

# Symbolic values accepted (and returned) for the enum-valued parameters.
_ENUM_VALUES = {
    "inverse_strategy": {"cholesky": _lib.KFAC_INVERSE_CHOLESKY, "eigen": _lib.KFAC_INVERSE_EIGEN},
    "loss_reduction": {"sum": _lib.KFAC_REDUCTION_SUM, "mean": _lib.KFAC_REDUCTION_MEAN},
}

_DTYPES = {np.dtype(np.float32): _lib.KFAC_FLOAT32, np.dtype(np.float64): _lib.KFAC_FLOAT64}


def _layer_index(layer) -> int:
    """A layer id as a Python int (rejecting floats, bools and other non-integers)."""
    if isinstance(layer, bool):
        raise TypeError("layer ids are integers, not bool")
    return operator.index(layer)


class Optimizer:
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
        dtype = np.dtype(dtype)
        if dtype not in _DTYPES:
            raise TypeError(f"kfac.Optimizer: dtype must be float32 or float64, not {dtype}")
        self._dtype = dtype
        self._ctype = ctypes.c_float if dtype == np.float32 else ctypes.c_double
        self._ptr_type = ctypes.POINTER(self._ctype)
        suffix = "f32" if dtype == np.float32 else "f64"
        self._record_inputs_fn = getattr(_lib, f"kfac_record_inputs_{suffix}")
        self._record_grads_fn = getattr(_lib, f"kfac_record_output_grads_{suffix}")
        self._get_factors_fn = getattr(_lib, f"kfac_get_factors_{suffix}")
        self._get_group_factors_fn = getattr(_lib, f"kfac_get_group_factors_{suffix}")
        self._step_fn = getattr(_lib, f"kfac_step_{suffix}")
        self._precondition_fn = getattr(_lib, f"kfac_precondition_{suffix}")
        self._solve_fn = getattr(_lib, f"kfac_solve_step_size_{suffix}")
        self._candidate_directions_fn = getattr(_lib, f"kfac_candidate_directions_{suffix}")
        self._solve_candidates_fn = getattr(_lib, f"kfac_solve_step_size_candidates_{suffix}")
        self._get_update_fn = getattr(_lib, f"kfac_get_update_{suffix}")
        self._lock = threading.RLock()
        self._free = _lib.kfac_optimizer_free  # kept so __del__ works during interpreter exit
        self._layers: list = []  # _LayerShapes per registered layer
        self._handle = None
        handle = _lib.kfac_optimizer_p()
        status = _lib.kfac_optimizer_create(_DTYPES[dtype], ctypes.byref(handle))
        if status != _lib.KFAC_OK:
            raise KFACError(status, _lib.kfac_last_error(None).decode("utf-8", "replace"))
        self._handle = handle
        try:
            for name, value in params.items():
                self.set_param(name, value)
        except BaseException:
            self.close()
            raise

    # -----------------------------------------------------------------------------------------
    # Lifetime
    # -----------------------------------------------------------------------------------------

    def close(self) -> None:
        """Frees the handle. Further calls raise ``ValueError``; closing twice is harmless."""
        lock = getattr(self, "_lock", None)
        if lock is None:
            return
        with lock:
            handle, self._handle = self._handle, None
            if handle is not None:
                self._free(handle)

    @property
    def closed(self) -> bool:
        """True once :meth:`close` was called."""
        return self._handle is None

    def __enter__(self) -> "Optimizer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def __repr__(self) -> str:
        if self.closed:
            return "<kfac.Optimizer (closed)>"
        return (
            f"<kfac.Optimizer {self._dtype.name}, {len(self._layers)} layer(s), "
            f"step {self.step_count}>"
        )

    # -----------------------------------------------------------------------------------------
    # Calling the library
    # -----------------------------------------------------------------------------------------

    def _live_handle(self):
        handle = self._handle
        if handle is None:
            raise ValueError("kfac.Optimizer: the optimizer is closed")
        return handle

    def _call(self, function, *args) -> int:
        """Calls ``function(handle, *args)``; raises :class:`KFACError` for a negative result."""
        with self._lock:
            handle = self._live_handle()
            result = function(handle, *args)
            if result < 0:
                message = _lib.kfac_last_error(handle).decode("utf-8", "replace")
                raise KFACError(result, message)
            return result

    # -----------------------------------------------------------------------------------------
    # Basic queries
    # -----------------------------------------------------------------------------------------

    @property
    def dtype(self) -> np.dtype:
        """The handle's precision, ``np.dtype('float32')`` or ``np.dtype('float64')``."""
        return self._dtype

    @property
    def num_layers(self) -> int:
        """Number of registered layers (``kfac_layer_count``)."""
        return self._call(_lib.kfac_layer_count)

    def __len__(self) -> int:
        return self.num_layers

    @property
    def wants_statistics(self) -> bool:
        """Whether statistics recorded now would be folded at the next :meth:`step`."""
        return bool(self._call(_lib.kfac_wants_statistics))

    @property
    def step_count(self) -> int:
        """The step counter k: the number of successful :meth:`step` calls."""
        return self._call(_lib.kfac_step_count)

    @property
    def last_kl_scale(self) -> float:
        """ν of the last successful :meth:`step` (1.0 if no clipping), NaN before the first."""
        with self._lock:
            return float(_lib.kfac_last_kl_scale(self._live_handle()))

    # -----------------------------------------------------------------------------------------
    # Parameters
    # -----------------------------------------------------------------------------------------

    @staticmethod
    def _resolve_param(param) -> Tuple[int, Optional[str], Optional[str]]:
        """(kfac_param value, name or None, "double"/"int"/None) for a name or an enum value."""
        if isinstance(param, str):
            try:
                value, kind = PARAMETERS[param]
            except KeyError:
                raise ValueError(
                    f"kfac: unknown parameter {param!r}; known: {', '.join(PARAMETERS)}"
                ) from None
            return value, param, kind
        value = _layer_index(param)
        name, kind = _PARAM_BY_VALUE.get(value, (None, None))
        return value, name, kind

    def set_param(self, param, value) -> None:
        """Sets a parameter by name (``"damping"``) or enum value (``kfac.KFAC_PARAM_DAMPING``).

        Double parameters take real numbers; integer parameters take integers (``pi_damping``
        also a bool); ``inverse_strategy`` also takes ``"cholesky"``/``"eigen"`` and
        ``loss_reduction`` ``"sum"``/``"mean"``. Out-of-range values raise :class:`KFACError`
        with status ``KFAC_ERROR_PARAMETER_RANGE``.
        """
        number, name, kind = self._resolve_param(param)
        if name in _ENUM_VALUES and isinstance(value, str):
            try:
                value = _ENUM_VALUES[name][value.lower()]
            except KeyError:
                choices = ", ".join(repr(key) for key in _ENUM_VALUES[name])
                raise ValueError(f"kfac: {name} must be one of {choices}, not {value!r}") from None
        if kind is None:
            # A parameter these bindings do not know: choose the setter by the value's type and
            # let the library judge it.
            kind = "int" if isinstance(value, (int, np.integer)) else "double"
        if kind == "double":
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.number)):
                raise TypeError(f"kfac: parameter {name or number} takes a real number, not {value!r}")
            self._call(_lib.kfac_set_param_double, number, float(value))
        else:
            if isinstance(value, (bool, np.bool_)):
                value = int(value)
            try:
                value = operator.index(value)
            except TypeError:
                raise TypeError(
                    f"kfac: parameter {name or number} takes an integer, not {value!r}"
                ) from None
            if not _INT64_MIN <= value <= _INT64_MAX:
                raise KFACError(
                    _lib.KFAC_ERROR_PARAMETER_RANGE,
                    f"value {value} of parameter {name or number} does not fit in int64",
                )
            self._call(_lib.kfac_set_param_int, number, value)

    def get_param(self, param):
        """Reads a parameter by name or enum value. Double parameters are returned as float,
        integer ones as int, except ``pi_damping`` (bool), ``inverse_strategy``
        (``"cholesky"``/``"eigen"``) and ``loss_reduction`` (``"sum"``/``"mean"``)."""
        number, name, kind = self._resolve_param(param)
        if kind == "double":
            out = ctypes.c_double()
            self._call(_lib.kfac_get_param_double, number, ctypes.byref(out))
            return float(out.value)
        if kind is None:  # unknown to the bindings: ask the library as an int first
            out = ctypes.c_int64()
            try:
                self._call(_lib.kfac_get_param_int, number, ctypes.byref(out))
            except KFACError as error:
                if error.status != _lib.KFAC_ERROR_PARAMETER_TYPE:
                    raise
                dout = ctypes.c_double()
                self._call(_lib.kfac_get_param_double, number, ctypes.byref(dout))
                return float(dout.value)
            return int(out.value)
        out = ctypes.c_int64()
        self._call(_lib.kfac_get_param_int, number, ctypes.byref(out))
        value = int(out.value)
        if name == "pi_damping":
            return bool(value)
        if name in _ENUM_VALUES:
            for symbol, code in _ENUM_VALUES[name].items():
                if code == value:
                    return symbol
        return value

    def params(self) -> dict:
        """All known parameters as a ``{name: value}`` dict."""
        return {name: self.get_param(name) for name in PARAMETERS}

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
        groups of that many consecutive features (channel grouping, ``kfac_add_dense_grouped``;
        the bias becomes its own block of A); 0 means no grouping."""
        in_features = _size(in_features, "in_features")
        out_features = _size(out_features, "out_features")
        input_group_size = _size(input_group_size, "input_group_size")
        output_group_size = _size(output_group_size, "output_group_size")
        layer_id = ctypes.c_int32()
        with self._lock:
            if input_group_size or output_group_size:
                self._call(
                    _lib.kfac_add_dense_grouped,
                    in_features,
                    out_features,
                    1 if bias else 0,
                    input_group_size,
                    output_group_size,
                    ctypes.byref(layer_id),
                )
            else:
                self._call(
                    _lib.kfac_add_dense,
                    in_features,
                    out_features,
                    1 if bias else 0,
                    ctypes.byref(layer_id),
                )
            self._layers.append(
                _LayerShapes(
                    kind=_lib.KFAC_LAYER_DENSE,
                    in_features=in_features,
                    out_features=out_features,
                    has_bias=bool(bias),
                    weight_shapes=((out_features, in_features),),
                )
            )
        return int(layer_id.value)

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
                also ``'valid'``, or ``'same'`` when it is symmetric (see :func:`conv_padding`).
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
            raise TypeError("kfac: add_conv2d needs input_size=(H, W), the input's spatial size")
        kernel = _pair(kernel_size, "kernel_size")
        stride = _pair(stride, "stride")
        dilation = _pair(dilation, "dilation")
        padding = _pair(conv_padding(padding, kernel, stride, dilation)
                        if isinstance(padding, str) else padding, "padding")
        size = _pair(input_size, "input_size")
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
            raise TypeError("kfac: add_conv1d needs input_size=L, the input's length")
        kernel = _single(kernel_size, "kernel_size")
        stride = _single(stride, "stride")
        dilation = _single(dilation, "dilation")
        if isinstance(padding, str):
            (padding,) = conv_padding(padding, (kernel,), (stride,), (dilation,))
        padding = _single(padding, "padding")
        length = _single(input_size, "input_size")
        return self._add_conv(in_channels, out_channels, (1, kernel), (1, stride), (0, padding), (1, dilation),
                              groups, bias, (1, length), layout, approximation, input_group_size,
                              output_group_size, one_d=True)

    def _add_conv(self, in_channels, out_channels, kernel, stride, padding, dilation, groups, bias, size,
                  layout, approximation, input_group_size, output_group_size, one_d: bool) -> int:
        in_channels = _size(in_channels, "in_channels")
        out_channels = _size(out_channels, "out_channels")
        groups = _size(groups, "groups")
        try:
            layout_code = _LAYOUTS[str(layout).lower()]
        except KeyError:
            raise ValueError(f"kfac: layout must be 'nchw' or 'nhwc', not {layout!r}") from None
        try:
            approximation_code = _APPROXIMATIONS[str(approximation).lower()]
        except KeyError:
            raise ValueError(f"kfac: approximation must be 'kfc' or 'sua', not {approximation!r}") from None
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
            input_group_size=_size(input_group_size, "input_group_size"),
            output_group_size=_size(output_group_size, "output_group_size"),
        )
        layer_id = ctypes.c_int32()
        with self._lock:
            # The library validates everything (sizes, groups, kernel fitting the padded input).
            self._call(_lib.kfac_add_conv2d, ctypes.byref(desc), ctypes.byref(layer_id))
            out_h = (size[0] + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
            out_w = (size[1] + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
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
        return int(layer_id.value)

    def layer_info(self, layer: int) -> LayerInfo:
        """The library's description of layer ``layer`` (sizes, whether factors and inverses
        exist)."""
        layer = self._checked_layer_id(layer)
        info = _lib.kfac_layer_info.new()
        self._call(_lib.kfac_layer_get_info, layer, ctypes.byref(info))
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

    def _checked_layer_id(self, layer) -> int:
        """A layer id as an int32 (ids outside int32 cannot name a layer)."""
        layer = _layer_index(layer)
        if not _INT32_MIN <= layer <= _INT32_MAX:
            raise KFACError(_lib.KFAC_ERROR_UNKNOWN_LAYER, f"layer id {layer} is out of range")
        return layer

    def _shape_of(self, layer: int) -> Optional[_LayerShapes]:
        """The shapes of a registered layer, or None for an id the library will reject."""
        if 0 <= layer < len(self._layers):
            return self._layers[layer]
        return None

    # -----------------------------------------------------------------------------------------
    # Buffers
    # -----------------------------------------------------------------------------------------

    def _input_rows(self, array, features: Optional[int], what: str) -> np.ndarray:
        """A C-contiguous 2-D array of the handle's dtype viewing (or, if needed, converting)
        ``array``; leading dimensions beyond the last are flattened into rows."""
        array = self._converted(array, what)
        if array.ndim < 2:
            raise ValueError(f"kfac: {what} must be 2-D [rows][features], got shape {array.shape}")
        if features is not None and array.shape[-1] != features:
            raise ValueError(
                f"kfac: {what} have {array.shape[-1]} features per row, the layer has {features}"
            )
        if array.ndim > 2:
            array = array.reshape(-1, array.shape[-1])
        return array

    def _pointer(self, array: np.ndarray):
        return array.ctypes.data_as(self._ptr_type)

    def _inout_buffer(self, array, shape, what: str):
        """Checks an array the library will overwrite: ndarray, handle's dtype, C-contiguous,
        writeable, of the expected shape."""
        if not isinstance(array, np.ndarray):
            raise TypeError(f"kfac: {what} must be a numpy.ndarray, not {type(array).__name__}")
        if array.dtype != self._dtype:
            raise TypeError(f"kfac: {what} has dtype {array.dtype}, the optimizer {self._dtype}")
        shapes = shape if isinstance(shape, list) else [shape]
        if array.shape not in shapes:
            expected = " or ".join(str(s) for s in shapes)
            raise ValueError(f"kfac: {what} has shape {array.shape}, expected {expected}")
        if not array.flags.c_contiguous:
            raise ValueError(f"kfac: {what} must be C-contiguous (it is modified in place)")
        if not array.flags.writeable:
            raise ValueError(f"kfac: {what} is read-only (it is modified in place)")
        return self._pointer(array)

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
        self._record(self._record_inputs_fn, layer, inputs, 0, "inputs")

    def record_output_grads(self, layer: int, output_grads) -> None:
        """Adds output gradients to layer ``layer``'s gradient statistics, after the
        ``loss_reduction`` and ``output_grad_scale`` adjustments: dense ``[rows][out_features]``,
        convolutions ``[N, C_out, H_out, W_out]`` (or channels-last), as in
        :meth:`record_inputs`."""
        self._record(self._record_grads_fn, layer, output_grads, 1, "output gradients")

    def _record(self, function, layer, array, side: int, what: str) -> None:
        layer = self._checked_layer_id(layer)
        shape = self._shape_of(layer)
        if shape is None or shape.is_dense:
            features = None if shape is None else (shape.in_features, shape.out_features)[side]
            rows = self._input_rows(array, features, what)
            count = rows.shape[0]
        else:
            rows = self._example_rows(
                array,
                (shape.input_values, shape.grad_values)[side],
                (shape.input_shape, shape.grad_shape)[side],
                what,
            )
            count = rows.shape[0]
        self._call(function, layer, self._pointer(rows), count)

    def _example_rows(self, array, values: int, example_shape, what: str) -> np.ndarray:
        """A C-contiguous array of the handle's dtype holding ``N`` examples of ``values``
        numbers each, ``N`` being the first dimension of ``array``."""
        array = self._converted(array, what)
        if array.ndim < 1:
            raise ValueError(f"kfac: {what} must have a leading examples dimension, got a scalar")
        examples = array.shape[0]
        per_example = int(np.prod(array.shape[1:], dtype=np.int64)) if array.ndim > 1 else 1
        if per_example != values:
            raise ValueError(
                f"kfac: {what} of shape {array.shape} hold {per_example} values per example "
                f"(first dimension = examples); the layer expects {values}, e.g. shape "
                f"[N, {', '.join(str(d) for d in example_shape)}]"
            )
        return array

    def _converted(self, array, what: str) -> np.ndarray:
        """``array`` as a C-contiguous array of the handle's dtype, without a copy when it
        already is one; ``TypeError`` if converting would narrow."""
        array = np.asarray(array)
        if array.dtype != self._dtype:
            if not np.can_cast(array.dtype, self._dtype, casting="safe"):
                raise TypeError(
                    f"kfac: {what} of dtype {array.dtype} would be narrowed to the optimizer's "
                    f"{self._dtype}; convert it explicitly"
                )
        return np.ascontiguousarray(array, dtype=self._dtype)

    def _record_address(self, side: int, layer: int, address: int, rows: int) -> None:
        """Records ``rows`` rows at raw ``address`` (a buffer of the handle's dtype, laid out
        row-major with the layer's width). For integrations that own the memory (torch)."""
        function = self._record_inputs_fn if side == 0 else self._record_grads_fn
        self._call(function, layer, ctypes.cast(address, self._ptr_type), rows)

    def update_factors(self) -> None:
        """Folds all pending statistics into the running factors now."""
        self._call(_lib.kfac_update_factors)

    def update_inverses(self) -> None:
        """Recomputes the inverses of every layer that has factors now."""
        self._call(_lib.kfac_update_inverses)

    def factors(self, layer: int, group: int = 0) -> Tuple[np.ndarray, np.ndarray]:
        """Copies of the running factors of group ``group`` of layer ``layer``: ``(A, G)`` of a
        dense layer (group 0), ``(Ω_g, Γ_g)`` of a convolution group, of shapes
        ``[a_dim][a_dim]`` and ``[g_dim][g_dim]``, full matrices in the weight's order with
        zeros off the blocks of channel grouping (SUA: the expanded ``C_g ⊗ I`` and the bias
        block). ``0 <= group < layer_info(layer).groups``."""
        info = self.layer_info(layer)
        if isinstance(group, (bool, np.bool_)):
            raise TypeError("kfac: group must be an integer, not bool")
        group = operator.index(group)
        if not _INT32_MIN <= group <= _INT32_MAX:
            raise KFACError(
                _lib.KFAC_ERROR_INVALID_ARGUMENT,
                f"group {group} is out of range (the layer has {info.groups} group(s))",
            )
        a = np.empty((info.a_dim, info.a_dim), dtype=self._dtype)
        g = np.empty((info.g_dim, info.g_dim), dtype=self._dtype)
        self._call(self._get_group_factors_fn, int(layer), group, self._pointer(a), self._pointer(g))
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
        with self._lock:
            w_pointers, b_pointers, n = self._layer_buffers(weight_grads, bias_grads, "weight_grads", "bias_grads")
            self._call(self._step_fn, w_pointers, b_pointers, n)

    def _layer_buffers(self, weights, biases, weight_name: str, bias_name: str):
        """``(weight pointers, bias pointers or None, n_layers)`` for arrays the library writes
        with the layout and bias rules of :meth:`step`: one C-contiguous, writeable array of the
        handle's dtype per layer (``None`` for the bias of a layer without one; ``biases`` may be
        ``None`` when no layer has a bias). Call with the lock held."""
        self._live_handle()
        n = len(self._layers)
        weights = list(weights)
        if len(weights) != n:
            raise ValueError(f"kfac: got {len(weights)} arrays in {weight_name} for {n} layers")
        if biases is None:
            biases = [None] * n
        biases = list(biases)
        if len(biases) != n:
            raise ValueError(f"kfac: got {len(biases)} arrays in {bias_name} for {n} layers")
        w_pointers = (self._ptr_type * max(n, 1))()
        b_pointers = (self._ptr_type * max(n, 1))()
        any_bias = False
        for index, (shape, w, b) in enumerate(zip(self._layers, weights, biases)):
            w_pointers[index] = self._inout_buffer(w, list(shape.weight_shapes), f"{weight_name}[{index}]")
            if shape.has_bias:
                if b is None:
                    raise ValueError(f"kfac: layer {index} has a bias but {bias_name}[{index}] is None")
                b_pointers[index] = self._inout_buffer(b, (shape.out_features,), f"{bias_name}[{index}]")
                any_bias = True
            elif b is not None:
                raise ValueError(f"kfac: layer {index} has no bias; {bias_name}[{index}] must be None")
        return w_pointers, (b_pointers if any_bias else None), n

    def _pointer_arrays(self, weight_addresses: Sequence[int], bias_addresses: Sequence[int]):
        """``(weight pointers, bias pointers or None, n_layers)`` from raw buffer addresses (0
        for an absent bias), for integrations that own the memory (torch); they may keep the
        result and pass it to the ``_*_pointers`` methods as long as the buffers live."""
        n = len(weight_addresses)
        w_pointers = (self._ptr_type * max(n, 1))(
            *[ctypes.cast(address, self._ptr_type) for address in weight_addresses]
        )
        any_bias = any(bias_addresses)
        b_pointers = (self._ptr_type * max(n, 1))(
            *[ctypes.cast(address or None, self._ptr_type) for address in bias_addresses]
        )
        return w_pointers, (b_pointers if any_bias else None), n

    def _step_addresses(self, weight_addresses: Sequence[int], bias_addresses: Sequence[int]) -> None:
        """:meth:`step` on raw buffer addresses (0 for an absent bias), for integrations that
        own the memory (torch). Shapes and dtypes are the caller's responsibility."""
        self._call(self._step_fn, *self._pointer_arrays(weight_addresses, bias_addresses))

    def precondition(self, layer: int, weight_grad: np.ndarray, bias_grad: Optional[np.ndarray] = None) -> None:
        """Preconditions one layer's gradient in place with the current inverses (no schedule,
        no KL clip, no change to the handle). ``bias_grad`` must be given exactly when the layer
        has a bias. Array requirements as in :meth:`step`."""
        layer = self._checked_layer_id(layer)
        shape = self._shape_of(layer)
        if shape is None:
            # Unknown id: let the library report it. It must not read the buffers; pass valid
            # dummies so that the only thing wrong with the call is the id.
            dummy_w = np.zeros(1, dtype=self._dtype)
            dummy_b = np.zeros(1, dtype=self._dtype)
            self._call(self._precondition_fn, layer, self._pointer(dummy_w), self._pointer(dummy_b))
            return
        has_bias = shape.has_bias
        w_pointer = self._inout_buffer(weight_grad, list(shape.weight_shapes), "weight_grad")
        if has_bias and bias_grad is None:
            raise ValueError(f"kfac: layer {layer} has a bias; bias_grad is required")
        if not has_bias and bias_grad is not None:
            raise ValueError(f"kfac: layer {layer} has no bias; bias_grad must be None")
        b_pointer = self._inout_buffer(bias_grad, (shape.out_features,), "bias_grad") if has_bias else None
        self._call(self._precondition_fn, layer, w_pointer, b_pointer)

    # -----------------------------------------------------------------------------------------
    # Adaptive mode
    # -----------------------------------------------------------------------------------------

    def _output_rows(self, array, dim: Optional[int], what: str) -> np.ndarray:
        """A C-contiguous ``[rows][dim]`` array of the handle's dtype from ``[..., dim]`` data
        (leading dimensions flattened into rows; converted without narrowing)."""
        array = self._converted(array, what)
        if array.ndim < 2:
            raise ValueError(f"kfac: {what} must be [rows][output_dim] (2-D or more), got shape {array.shape}")
        if dim is not None and array.shape[-1] != dim:
            raise ValueError(f"kfac: {what} have {array.shape[-1]} values per row, the outputs {dim}")
        return array.reshape(-1, array.shape[-1])

    def solve_step_size(
        self,
        outputs,
        direction_products,
        previous_products=None,
        distribution="categorical",
    ) -> Tuple[float, float, float]:
        """Chooses the step size α and momentum μ of the adaptive mode for the directions the
        last :meth:`step` wrote (``kfac_solve_step_size_*``).

        Minimises the quadratic model ``M(δ) = ½ δᵀ(F + λI)δ + ∇hᵀδ`` over
        ``δ = −α·D + μ·δ₀``, F being the exact Fisher of the mean loss h over the batch.

        Args:
            outputs: the network's outputs on the batch at the parameters the step's gradients
                were taken at, ``[rows][output_dim]`` (or ``[..., output_dim]``): logits, or
                means for ``'gaussian'``.
            direction_products: ``J·D`` per row, the forward-mode derivative of the outputs
                along the directions the step wrote (same shape).
            previous_products: ``J·δ₀`` along the previously applied update, or ``None`` to
                choose α alone (μ is 0 then, and on the first solve).
            distribution: ``'categorical'`` (softmax cross-entropy), ``'bernoulli'`` (sigmoid
                binary cross-entropy) or ``'gaussian'`` (``½‖y − μ‖²``), or a ``KFAC_DIST_*``.

        Returns ``(alpha, mu, predicted_change)``: apply ``θ ← θ − α·D + μ·δ₀``, evaluate the
        mean loss and call :meth:`report_loss_change`. ``predicted_change`` is M(δ) (negative).
        Set ``kl_clip=0`` in this mode (α replaces the clip); the gradients given to
        :meth:`step` must be those of the mean loss. One solve per step
        (``KFAC_ERROR_NO_STEP`` otherwise). With ``factor_damping_period`` > 0, use
        :meth:`solve_step_size_candidates`, which also serves the steps with one candidate.
        """
        code = distribution_code(distribution)
        z = self._output_rows(outputs, None, "outputs")
        rows, dim = z.shape
        jd = self._output_rows(direction_products, dim, "direction_products")
        if jd.shape != z.shape:
            raise ValueError(f"kfac: direction_products have {jd.shape[0]} rows, the outputs {rows}")
        jp = None
        if previous_products is not None:
            jp = self._output_rows(previous_products, dim, "previous_products")
            if jp.shape != z.shape:
                raise ValueError(f"kfac: previous_products have {jp.shape[0]} rows, the outputs {rows}")
        alpha, mu, predicted = ctypes.c_double(), ctypes.c_double(), ctypes.c_double()
        self._call(
            self._solve_fn,
            self._pointer(z),
            self._pointer(jd),
            None if jp is None else self._pointer(jp),
            rows,
            dim,
            code,
            ctypes.byref(alpha),
            ctypes.byref(mu),
            ctypes.byref(predicted),
        )
        return float(alpha.value), float(mu.value), float(predicted.value)

    def candidate_count(self) -> int:
        """The number of direction candidates the last successful :meth:`step` prepared
        (``kfac_candidate_count``): 1 on an ordinary step; on a γ step (every
        ``factor_damping_period`` steps) up to 3, one per factor damping γ, γ·ω₂, γ/ω₂ whose
        directions were finite (candidate 0, the current γ, is always there: it is what
        :meth:`step` wrote). 0 once the step was solved, and before the first step."""
        count = ctypes.c_int32()
        self._call(_lib.kfac_candidate_count, ctypes.byref(count))
        return int(count.value)

    def _candidate_index(self, candidate) -> int:
        if isinstance(candidate, (bool, np.bool_)):
            raise TypeError("kfac: candidate must be an integer, not bool")
        try:
            candidate = operator.index(candidate)
        except TypeError:
            raise TypeError(f"kfac: candidate must be an integer, not {candidate!r}") from None
        if not _INT32_MIN <= candidate <= _INT32_MAX:
            raise KFACError(_lib.KFAC_ERROR_INVALID_ARGUMENT, f"candidate {candidate} is out of range")
        return candidate

    def candidate_directions(
        self,
        candidate: int,
        weight_dirs: Sequence[np.ndarray],
        bias_dirs: Optional[Sequence[Optional[np.ndarray]]] = None,
    ) -> float:
        """Writes the directions of candidate ``candidate`` (``0 <= candidate <
        candidate_count()``) of the last step into the arrays, and returns that candidate's
        factor damping γ (``kfac_candidate_directions_*``).

        The arrays follow :meth:`step`'s layout and rules (one C-contiguous, writeable array of
        the handle's dtype per layer, ``None`` for the bias of a layer without one). The
        directions are KL-clipped with the candidate's own ν; candidate 0 is what :meth:`step`
        wrote. Use them for the forward-mode products ``J·D_k`` that
        :meth:`solve_step_size_candidates` takes. Changes nothing in the handle; raises
        ``KFAC_ERROR_NO_STEP`` when no step awaits a solve and ``KFAC_ERROR_INVALID_ARGUMENT``
        for a candidate out of range."""
        candidate = self._candidate_index(candidate)
        damping = ctypes.c_double()
        with self._lock:
            w_pointers, b_pointers, n = self._layer_buffers(weight_dirs, bias_dirs, "weight_dirs", "bias_dirs")
            self._call(self._candidate_directions_fn, candidate, w_pointers, b_pointers, n, ctypes.byref(damping))
        return float(damping.value)

    def _candidate_directions_pointers(self, candidate: int, pointers) -> float:
        """:meth:`candidate_directions` into the buffers of ``pointers``, a result of
        :meth:`_pointer_arrays` (torch). Shapes and dtypes are the caller's responsibility."""
        candidate = self._candidate_index(candidate)
        damping = ctypes.c_double()
        self._call(self._candidate_directions_fn, candidate, pointers[0], pointers[1], pointers[2],
                   ctypes.byref(damping))
        return float(damping.value)

    def solve_step_size_candidates(
        self,
        outputs,
        direction_products,
        previous_products=None,
        distribution="categorical",
    ) -> Tuple[int, float, float, float]:
        """:meth:`solve_step_size` over all direction candidates of the last step
        (``kfac_solve_step_size_candidates_*``), the re-choice of the factor damping γ of
        Martens & Grosse 2015, §6.6.

        For each candidate k the library chooses α_k and μ_k as :meth:`solve_step_size` does and
        keeps the candidate whose update ``δ_k = −α_k·D_k + μ_k·δ₀`` has the lowest
        ``M(δ_k) = ½ δ_kᵀ(F + λI)δ_k + ∇hᵀδ_k``. On a γ step the chosen candidate's γ becomes
        ``factor_damping`` (with the Cholesky strategy its inverses become the current ones).

        Args:
            outputs: the network's outputs on the batch, ``[rows][output_dim]`` (or
                ``[..., output_dim]``), as for :meth:`solve_step_size`.
            direction_products: one array ``J·D_k`` per candidate, in candidate order, each of
                the shape of ``outputs`` (a sequence of arrays, or one array
                ``[n_candidates, ...]``); their number must be :meth:`candidate_count`
                (``KFAC_ERROR_INVALID_ARGUMENT`` otherwise).
            previous_products: ``J·δ₀``, or ``None`` to choose α alone (μ = 0).
            distribution: as for :meth:`solve_step_size`.

        Returns ``(chosen, alpha, mu, predicted_change)``: the chosen candidate's index, its α,
        μ and M(δ) (negative). Apply the update with :meth:`get_update` (``θ ← θ + δ``), then
        call :meth:`report_loss_change`. With one candidate this is :meth:`solve_step_size`.
        On error nothing changes.
        """
        code = distribution_code(distribution)
        z = self._output_rows(outputs, None, "outputs")
        rows, dim = z.shape
        if isinstance(direction_products, np.ndarray) and direction_products.ndim < 3:
            raise ValueError(
                "kfac: direction_products must hold one [rows][output_dim] array per candidate "
                f"(a sequence of arrays or an [n_candidates, rows, output_dim] array), got shape "
                f"{direction_products.shape}"
            )
        products = []
        for k, product in enumerate(direction_products):
            jd = self._output_rows(product, dim, f"direction_products[{k}]")
            if jd.shape != z.shape:
                raise ValueError(
                    f"kfac: direction_products[{k}] have {jd.shape[0]} rows, the outputs {rows}"
                )
            products.append(jd)
        if len(products) > _INT32_MAX:
            raise KFACError(_lib.KFAC_ERROR_INVALID_ARGUMENT, f"{len(products)} candidates")
        jp = None
        if previous_products is not None:
            jp = self._output_rows(previous_products, dim, "previous_products")
            if jp.shape != z.shape:
                raise ValueError(f"kfac: previous_products have {jp.shape[0]} rows, the outputs {rows}")
        pointers = (self._ptr_type * max(len(products), 1))(*[self._pointer(jd) for jd in products])
        chosen = ctypes.c_int32()
        alpha, mu, predicted = ctypes.c_double(), ctypes.c_double(), ctypes.c_double()
        self._call(
            self._solve_candidates_fn,
            self._pointer(z),
            pointers,
            len(products),
            None if jp is None else self._pointer(jp),
            rows,
            dim,
            code,
            ctypes.byref(chosen),
            ctypes.byref(alpha),
            ctypes.byref(mu),
            ctypes.byref(predicted),
        )
        return int(chosen.value), float(alpha.value), float(mu.value), float(predicted.value)

    def get_update(
        self,
        weight_updates: Sequence[np.ndarray],
        bias_updates: Optional[Sequence[Optional[np.ndarray]]] = None,
    ) -> None:
        """Writes the update ``δ = −α·D_chosen + μ·δ₀`` of the last solve into the arrays
        (``kfac_get_update_*``; the library keeps it as the next δ₀): apply ``θ ← θ + δ``.

        The arrays follow :meth:`step`'s layout and rules. Raises ``KFAC_ERROR_NO_STEP`` before
        the first solve. Changes nothing in the handle."""
        with self._lock:
            w_pointers, b_pointers, n = self._layer_buffers(
                weight_updates, bias_updates, "weight_updates", "bias_updates")
            self._call(self._get_update_fn, w_pointers, b_pointers, n)

    def _get_update_pointers(self, pointers) -> None:
        """:meth:`get_update` into the buffers of ``pointers`` (:meth:`_pointer_arrays`)."""
        self._call(self._get_update_fn, pointers[0], pointers[1], pointers[2])

    def report_loss_change(self, loss_before, loss_after) -> float:
        """Reports the mean loss before and after applying the last solved update
        (``kfac_report_loss_change``); returns the reduction ratio
        ``ρ = (after − before) / M(δ)`` (NaN if M(δ) was not negative). Every ``lm_interval``
        reports, λ (``damping``) is multiplied by ``lm_decay ** lm_interval`` if ρ > 3/4 and
        divided by it if ρ < 1/4. One report per solve (``KFAC_ERROR_NO_STEP`` otherwise)."""
        rho = ctypes.c_double()
        self._call(_lib.kfac_report_loss_change, float(loss_before), float(loss_after), ctypes.byref(rho))
        return float(rho.value)

    @property
    def last_reduction_ratio(self) -> float:
        """ρ of the last :meth:`report_loss_change` (NaN before the first)."""
        with self._lock:
            return float(_lib.kfac_last_reduction_ratio(self._live_handle()))

    # -----------------------------------------------------------------------------------------
    # State
    # -----------------------------------------------------------------------------------------

    def state_bytes(self) -> bytes:
        """The complete state image (parameters, counters, factors, pending statistics,
        inverses) as bytes; :meth:`load_state` restores it bit for bit."""
        with self._lock:
            size = ctypes.c_size_t()
            self._call(_lib.kfac_state_size, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(max(size.value, 1))
            written = ctypes.c_size_t()
            self._call(_lib.kfac_save_state, buffer, size.value, ctypes.byref(written))
            return buffer.raw[: written.value]

    def load_state(self, image: Union[bytes, bytearray, memoryview]) -> None:
        """Replaces the handle's state with an image from :meth:`state_bytes` (same precision
        and layers). On error the handle is unchanged."""
        data = bytes(image)
        self._call(_lib.kfac_load_state, data, len(data))

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Writes the state image to ``path`` atomically."""
        self._call(_lib.kfac_save_state_file, os.fsencode(path))

    def load(self, path: Union[str, os.PathLike]) -> None:
        """Loads a state image written by :meth:`save`."""
        self._call(_lib.kfac_load_state_file, os.fsencode(path))


def _make_property(name: str, kind: str):
    def getter(self):
        return self.get_param(name)

    def setter(self, value):
        self.set_param(name, value)

    doc = {
        "learning_rate": "η of the KL clip (float, >= 0; default 0.1; 0: ν = 1). Used for nothing else.",
        "damping": "λ (float, > 0; default 1e-3).",
        "factor_decay": "β of the factors' moving average (float in [0, 1); default 0.95).",
        "kl_clip": "κ of the KL clip (float, >= 0; 0 disables; default 1e-3).",
        "output_grad_scale": "Recorded output gradients are divided by it (float, > 0; default 1).",
        "factor_update_period": "Tf: fold statistics every Tf steps; 0 = only update_factors().",
        "inverse_update_period": "Ti: recompute inverses every Ti steps; 0 = only update_inverses().",
        "inverse_strategy": "'cholesky' or 'eigen' (default); set with a name or a KFAC_INVERSE_* int.",
        "pi_damping": "Use π in factored (Cholesky) damping (bool; default True).",
        "loss_reduction": "'sum' (default) or 'mean': how the caller's loss was reduced.",
        "num_threads": "Threads for parallel inversion (int in [0, 256]; 0 = all CPUs).",
        "lm_decay": "ω₁ of the Levenberg–Marquardt adjustment of λ (float in (0, 1); default 0.95).",
        "factor_damping": "γ: damping of the factor inverses instead of λ when > 0 (float >= 0; default 0).",
        "lm_interval": "T₁: adjust λ every T₁ report_loss_change() calls (int >= 0; 0 = off, default).",
        "factor_damping_decay": (
            "ω₂'s base (float in (0, 1); default 0.95): the candidates of a γ step are γ, γ·ω₂ and "
            "γ/ω₂ with ω₂ = factor_damping_decay ** factor_damping_period."
        ),
        "factor_damping_period": (
            "T₂: every T₂ steps (k ≡ 0 mod T₂) the step prepares direction candidates for the factor "
            "dampings γ, γ·ω₂, γ/ω₂ and solve_step_size_candidates() keeps the best γ "
            "(int >= 0; 0 = off, default)."
        ),
    }[name]
    return property(getter, setter, doc=doc)


for _name, (_value, _kind) in PARAMETERS.items():
    setattr(Optimizer, _name, _make_property(_name, _kind))
del _name, _value, _kind
