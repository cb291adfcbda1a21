"""Argument conversion shared by the numpy API, the samplers and torch: integer sizes and index
arguments with their C ranges, PyTorch's ``int or tuple`` arguments, the dtype tables, the
symbolic names of enum arguments and the convolution geometry. Nothing here calls the library.
"""

from __future__ import annotations

import ctypes
import operator
from typing import Sequence, Tuple

import numpy as np

from . import _lib
from ._errors import KFACError

INT32_MIN, INT32_MAX = -(2**31), 2**31 - 1
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1

#: numpy dtype -> ``kfac_dtype`` value.
DTYPES = {np.dtype(np.float32): _lib.KFAC_FLOAT32, np.dtype(np.float64): _lib.KFAC_FLOAT64}
#: numpy dtype -> (ctypes scalar, function-name suffix).
CTYPES = {np.dtype(np.float32): (ctypes.c_float, "f32"), np.dtype(np.float64): (ctypes.c_double, "f64")}

#: Distribution name -> ``kfac_distribution`` value.
DISTRIBUTIONS = {
    "categorical": _lib.KFAC_DIST_CATEGORICAL,
    "bernoulli": _lib.KFAC_DIST_BERNOULLI,
    "gaussian": _lib.KFAC_DIST_GAUSSIAN,
}
LAYOUTS = {"nchw": _lib.KFAC_LAYOUT_NCHW, "nhwc": _lib.KFAC_LAYOUT_NHWC}
APPROXIMATIONS = {"kfc": _lib.KFAC_CONV_KFC, "sua": _lib.KFAC_CONV_SUA}
#: Symbolic values accepted (and returned) for the enum-valued parameters.
ENUM_PARAMETERS = {
    "inverse_strategy": {"cholesky": _lib.KFAC_INVERSE_CHOLESKY, "eigen": _lib.KFAC_INVERSE_EIGEN,
                         "ekfac": _lib.KFAC_INVERSE_EKFAC},
    "ekfac_mode": {"per_example": _lib.KFAC_EKFAC_PER_EXAMPLE, "per_row": _lib.KFAC_EKFAC_PER_ROW},
    "loss_reduction": {"sum": _lib.KFAC_REDUCTION_SUM, "mean": _lib.KFAC_REDUCTION_MEAN},
    "distributed_reduce": {"eager": _lib.KFAC_DISTRIBUTED_REDUCE_EAGER, "lazy": _lib.KFAC_DISTRIBUTED_REDUCE_LAZY},
    "async_inversion": {"off": _lib.KFAC_ASYNC_INVERSION_OFF, "newest": _lib.KFAC_ASYNC_INVERSION_NEWEST,
                        "deterministic": _lib.KFAC_ASYNC_INVERSION_DETERMINISTIC},
}
#: Integer parameters read back as bool.
BOOL_PARAMETERS = frozenset({"pi_damping", "inverse_spread"})


def is_bool(value) -> bool:
    return isinstance(value, (bool, np.bool_))


def integer(value, what: str) -> int:
    """An integer argument (not bool, not float) as a Python int, unchecked range."""
    if is_bool(value):
        raise TypeError(f"libkfac: {what} must be an integer, not bool")
    try:
        return operator.index(value)
    except TypeError:
        raise TypeError(f"libkfac: {what} must be an integer, not {value!r}") from None


def size(value, what: str) -> int:
    """An integer size argument, range-checked for int64."""
    value = integer(value, what)
    if not INT64_MIN <= value <= INT64_MAX:
        raise KFACError(_lib.KFAC_ERROR_SIZE_OVERFLOW, f"{what} = {value} does not fit in int64")
    return value


def int32(value, what: str, status: int) -> int:
    """An integer argument the library takes as ``int32_t`` (a layer id, a group, a candidate);
    a value outside int32 raises :class:`KFACError` with ``status``, the status the library
    gives such a value."""
    value = integer(value, what)
    if not INT32_MIN <= value <= INT32_MAX:
        raise KFACError(status, f"{what} {value} is out of range")
    return value


def pair(value, what: str) -> Tuple[int, int]:
    """An int or a pair of ints (PyTorch's ``int or tuple``) as a (height, width) pair."""
    if isinstance(value, (tuple, list)):
        if len(value) == 1:
            value = (value[0], value[0])
        if len(value) != 2:
            raise ValueError(f"libkfac: {what} must be an int or a pair of ints, got {value!r}")
        return size(value[0], what), size(value[1], what)
    value = size(value, what)
    return value, value


def single(value, what: str) -> int:
    """An int or a 1-tuple of an int (PyTorch's ``_single``)."""
    if isinstance(value, (tuple, list)):
        if len(value) != 1:
            raise ValueError(f"libkfac: {what} of a 1-D convolution must be an int or a 1-tuple, got {value!r}")
        value = value[0]
    return size(value, what)


def symbol(table: dict, value, what: str) -> int:
    """The code of a case-insensitive name in ``table`` (ValueError for an unknown one)."""
    try:
        return table[str(value).lower()]
    except KeyError:
        choices = " or ".join(repr(key) for key in table)
        raise ValueError(f"libkfac: {what} must be {choices}, not {value!r}") from None


def distribution_code(distribution) -> int:
    """The ``kfac_distribution`` value of a distribution given by name (``'categorical'``,
    ``'bernoulli'``, ``'gaussian'``; case-insensitive) or as a ``KFAC_DIST_*`` integer.

    An unknown name raises ``ValueError``; an integer is passed through unchecked (if it fits
    int32), so that the library reports an unknown one as ``KFAC_ERROR_INVALID_ARGUMENT``."""
    if isinstance(distribution, str):
        try:
            return DISTRIBUTIONS[distribution.lower()]
        except KeyError:
            raise ValueError(
                f"libkfac: distribution must be one of {', '.join(repr(d) for d in DISTRIBUTIONS)} "
                f"(or a KFAC_DIST_* value), not {distribution!r}"
            ) from None
    if is_bool(distribution):
        raise TypeError("libkfac: distribution must be a name or a KFAC_DIST_* integer, not bool")
    try:
        code = operator.index(distribution)
    except TypeError:
        raise TypeError(
            f"libkfac: distribution must be a name or a KFAC_DIST_* integer, not {distribution!r}"
        ) from None
    if not INT32_MIN <= code <= INT32_MAX:
        # Cannot be passed as int32_t; it names no distribution either.
        raise KFACError(_lib.KFAC_ERROR_INVALID_ARGUMENT, f"unknown distribution {code}")
    return code


def seed(value) -> int:
    """A sampler seed in ``[0, 2^64)``."""
    if is_bool(value):
        raise TypeError("libkfac: seed must be an integer, not bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"libkfac: seed must be an integer, not {value!r}") from None
    if not 0 <= value <= UINT64_MAX:
        raise ValueError(f"libkfac: seed must be in [0, 2^64), got {value}")
    return value


def conv_padding(padding, kernel: Sequence[int], stride: Sequence[int], dilation: Sequence[int]) -> Tuple[int, ...]:
    """Symmetric zero padding, per spatial dimension, equivalent to PyTorch's ``padding``
    argument: ints pass through; ``'valid'`` is 0; ``'same'`` is ``dilation·(kernel − 1) / 2``
    when that is a whole number and the stride is 1 (PyTorch pads the extra element on one side
    only when it is odd, which the library's symmetric padding cannot express: ValueError).

    Used by both :meth:`libkfac.Optimizer.add_conv2d` (which takes PyTorch's conventions) and
    :mod:`libkfac.torch`, hence here rather than in the torch package."""
    if isinstance(padding, str):
        mode = padding.lower()
        if mode == "valid":
            return tuple(0 for _ in kernel)
        if mode == "same":
            result = []
            for k, s, d in zip(kernel, stride, dilation):
                total = d * (k - 1)
                if s != 1:
                    raise ValueError("libkfac: padding='same' requires stride 1 (as in PyTorch)")
                if total % 2:
                    raise ValueError(
                        f"libkfac: padding='same' with kernel {k} and dilation {d} pads {total} "
                        "zeros, one side more than the other; the library supports symmetric "
                        "padding only"
                    )
                result.append(total // 2)
            return tuple(result)
        raise ValueError(f"libkfac: padding must be an int, a tuple, 'valid' or 'same', not {padding!r}")
    return tuple(padding)


def conv_output_length(length: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """The output length of a convolution along one dimension (PyTorch's formula)."""
    return (length + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1
