"""EXPERIMENTAL: exact Gauss-Newton products (``kfac_gn_*`` of ``kfac.h``, "Gauss-Newton
products"; may change in any minor release).

G·v = (1/N) Σ_n J_nᵀ B_n J_n v over the registered layers of an :class:`libkfac.Optimizer`, with
B the output Hessian of the distribution (``'categorical'``: ``diag(p) − ppᵀ``, ``'bernoulli'``:
``diag(p(1 − p))``, ``'gaussian'``: ``I``), in two settings:

- stored Jacobian columns: back-propagate the K columns of :func:`output_hessian_sqrt` (one
  backward pass per column, or one vmapped pass) and record them per layer with
  :meth:`GaussNewton.record_columns`; then :meth:`GaussNewton.columns_multiply` is a few gemms.
  The same recording with ``uses='factor'`` feeds the layer's output factor as KFLR
  (``G = (1/N) Σ_n Σ_k c cᵀ``), or the Monte-Carlo Fisher with sampled gradients / √S.
- the R operator on a chain of dense and conv2d layers: :meth:`GaussNewton.define_chain`,
  :meth:`GaussNewton.chain_forward` (copies the weights), :meth:`GaussNewton.chain_multiply`.

Columns are those of the SUMMED loss; ``loss_reduction`` does not apply to them (square roots
of a mean-reduced loss's Hessian are S/√N: multiply by √N, not N); ``output_grad_scale``
divides them. Products are G without damping.
"""

from __future__ import annotations

import ctypes
from typing import List, Optional, Sequence, Tuple

import numpy as np

from . import _lib
from ._convert import CTYPES, distribution_code
from ._errors import check

__all__ = ["ACTIVATIONS", "KFRA_VARIANTS", "GaussNewton", "output_hessian_multiply", "output_hessian_sqrt"]

#: Activation name -> ``kfac_activation`` value.
ACTIVATIONS = {
    "identity": _lib.KFAC_ACTIVATION_IDENTITY,
    "relu": _lib.KFAC_ACTIVATION_RELU,
    "tanh": _lib.KFAC_ACTIVATION_TANH,
    "logistic": _lib.KFAC_ACTIVATION_LOGISTIC,
    "sigmoid": _lib.KFAC_ACTIVATION_LOGISTIC,
    "custom": _lib.KFAC_ACTIVATION_CUSTOM,
}

#: KFRA variant name -> ``kfac_kfra_variant`` value.
KFRA_VARIANTS = {"ggn": _lib.KFAC_KFRA_GGN, "hessian": _lib.KFAC_KFRA_HESSIAN}

_USES = {"factor": _lib.KFAC_COLUMNS_FACTOR, "product": _lib.KFAC_COLUMNS_PRODUCT}


def _real(array, what: str) -> np.ndarray:
    a = np.asarray(array)
    if a.dtype == np.float32 or a.dtype == np.float16:
        dtype = np.float32
    elif a.dtype.kind in "biuf" and np.can_cast(a.dtype, np.float64, casting="safe"):
        dtype = np.float64
    else:
        raise TypeError(f"libkfac: {what} must be real numbers (float32 or float64), not {a.dtype}")
    if a.ndim < 1:
        raise ValueError(f"libkfac: {what} must have at least one dimension (the last is output_dim)")
    return np.ascontiguousarray(a, dtype=dtype)


def _function(name: str, dtype) -> Tuple[object, object]:
    ctype, suffix = CTYPES[np.dtype(dtype)]
    return getattr(_lib, f"{name}_{suffix}"), ctypes.POINTER(ctype)


def output_hessian_multiply(outputs, vectors, distribution) -> np.ndarray:
    """``u = B q`` for every row (``kfac_gn_output_hessian_multiply_*``): ``outputs`` and
    ``vectors`` ``[..., output_dim]`` (leading dimensions are rows); the result has their shape
    and the outputs' precision (float32 stays float32)."""
    code = distribution_code(distribution)
    z = _real(outputs, "outputs")
    q = np.ascontiguousarray(np.asarray(vectors), dtype=z.dtype)
    if q.shape != z.shape:
        raise ValueError(f"libkfac: vectors have shape {q.shape}, the outputs {z.shape}")
    dim = z.shape[-1]
    rows = z.size // dim if dim else 0
    out = np.empty_like(z)
    fn, p = _function("kfac_gn_output_hessian_multiply", z.dtype)
    check(fn(z.ctypes.data_as(p), q.ctypes.data_as(p), rows, dim, code, out.ctypes.data_as(p)), None,
          f"kfac_gn_output_hessian_multiply(rows={rows}, output_dim={dim}, distribution={code})")
    return out


def output_hessian_sqrt(outputs, distribution) -> np.ndarray:
    """The K = output_dim columns of S (S Sᵀ = B) per row (``kfac_gn_output_hessian_sqrt_*``):
    ``outputs`` ``[rows, output_dim]`` gives ``[K, rows, output_dim]``; block ``[k]`` is a batch
    of output gradients to back-propagate."""
    code = distribution_code(distribution)
    z = _real(outputs, "outputs")
    dim = z.shape[-1]
    rows = z.size // dim if dim else 0
    out = np.empty((dim, rows, dim), dtype=z.dtype)
    fn, p = _function("kfac_gn_output_hessian_sqrt", z.dtype)
    check(fn(z.ctypes.data_as(p), rows, dim, code, out.ctypes.data_as(p)), None,
          f"kfac_gn_output_hessian_sqrt(rows={rows}, output_dim={dim}, distribution={code})")
    return out


def _uses_code(uses) -> int:
    if isinstance(uses, (int, np.integer)) and not isinstance(uses, bool):
        return int(uses)
    names = [uses] if isinstance(uses, str) else list(uses)
    code = 0
    for name in names:
        if name not in _USES:
            raise ValueError(f"libkfac: uses must be 'factor', 'product' or both, not {name!r}")
        code |= _USES[name]
    return code


class GaussNewton:
    """The Gauss-Newton products of an :class:`libkfac.Optimizer`'s layers (its handle holds the
    kept columns and the chain)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer
        self._handle = optimizer._handle
        self._keep = []  # arrays whose addresses a call uses

    @property
    def dtype(self) -> np.dtype:
        return self._handle.dtype

    def _array(self, value, what: str) -> np.ndarray:
        return np.ascontiguousarray(np.asarray(value), dtype=self.dtype) if value is not None else None

    def _fn(self, name: str):
        return _function(name, self.dtype)[0]

    # -- columns ----------------------------------------------------------------------------

    def record_columns(self, layer: int, columns, inputs=None, uses=("factor", "product")) -> None:
        """Records K back-propagated columns per example of ``layer``
        (``kfac_layer_record_output_grad_columns_*``): ``columns`` ``[K, rows, *out]`` (dense
        ``[K, rows, out]``, conv ``[K, N, C_out, H_out, W_out]`` or channels-last); ``inputs`` the
        layer's inputs as :meth:`~libkfac.Optimizer.record_inputs` takes them (required with
        ``'product'``; not added to A). ``uses``: ``'factor'`` (KFLR / MC Fisher output factor,
        examples counted once), ``'product'`` (kept for :meth:`columns_multiply`) or both."""
        c = self._array(columns, "columns")
        if c.ndim < 3:
            raise ValueError("libkfac: columns must be [K, rows, *out]")
        k, rows = c.shape[0], c.shape[1]
        x = self._array(inputs, "inputs")
        self._check_column_shapes(layer, c, x)
        h = self._handle
        h.call(self._fn("kfac_layer_record_output_grad_columns"), int(layer),
               h.cast(x.ctypes.data if x is not None else 0), h.cast(c.ctypes.data), rows, k, _uses_code(uses))

    def _check_column_shapes(self, layer, c: np.ndarray, x: Optional[np.ndarray]) -> None:
        """The library reads rows·K·(values per row) from the buffers it is given: check them
        against the registered layer here, where the arrays' sizes are known (an unknown layer id
        is left to the library, which refuses it before reading)."""
        opt = self.optimizer
        shape = opt._shape_of(opt._checked_layer_id(layer))
        if shape is None:
            return
        rows = c.shape[1]
        if shape.is_dense:
            column_values, input_values = shape.out_features, shape.in_features
            if c.ndim != 3 or c.shape[2] != column_values:
                raise ValueError(f"libkfac: columns of dense layer {layer} must be [K, rows, {column_values}], "
                                 f"got shape {c.shape}")
            if x is not None and (x.ndim != 2 or x.shape != (rows, input_values)):
                raise ValueError(f"libkfac: inputs of dense layer {layer} must be [{rows}, {input_values}] "
                                 f"(one row per column row), got shape {x.shape}")
            return
        per_example = int(np.prod(c.shape[2:], dtype=np.int64))
        if per_example != shape.grad_values:
            raise ValueError(f"libkfac: columns of convolution {layer} hold {per_example} values per example; the "
                             f"layer's outputs have {shape.grad_values} ([K, N, {', '.join(map(str, shape.grad_shape))}])")
        if x is not None:
            inputs_per_example = int(np.prod(x.shape[1:], dtype=np.int64)) if x.ndim > 1 else 1
            if x.ndim < 1 or x.shape[0] != rows or inputs_per_example != shape.input_values:
                raise ValueError(f"libkfac: inputs of convolution {layer} must be [{rows}, "
                                 f"{', '.join(map(str, shape.input_shape))}] (or channels-last), got shape {x.shape}")

    def columns_info(self) -> Tuple[int, int, int]:
        """(examples N, columns K, values stored) of the kept columns."""
        e, k, v = ctypes.c_int64(), ctypes.c_int32(), ctypes.c_int64()
        self._handle.call(_lib.kfac_gn_columns_get_info, ctypes.byref(e), ctypes.byref(k), ctypes.byref(v))
        return e.value, k.value, v.value

    def clear_columns(self) -> None:
        """Drops the kept columns and releases their memory."""
        self._handle.call(_lib.kfac_gn_columns_clear)

    def _product(self, name: str, weights: Sequence, biases: Optional[Sequence]) -> Tuple[List[np.ndarray], List[Optional[np.ndarray]]]:
        layers = self.optimizer._layers
        n = len(layers)
        weights = list(weights)
        biases = [None] * n if biases is None else list(biases)
        if len(weights) != n or len(biases) != n:
            raise ValueError(f"libkfac: got {len(weights)} weights and {len(biases)} biases for {n} layers")
        vw = [self._array(w, "weights") for w in weights]
        vb = [self._array(b, "biases") if s.has_bias else None for b, s in zip(biases, layers)]
        for index, (s, w, b) in enumerate(zip(layers, vw, vb)):
            if w.shape not in s.weight_shapes:
                raise ValueError(f"libkfac: weights[{index}] has shape {w.shape}, expected {s.weight_shapes[0]}")
            if s.has_bias and (b is None or b.shape != (s.out_features,)):
                raise ValueError(f"libkfac: layer {index} has a bias of {s.out_features} values")
        pw = [np.zeros_like(w) for w in vw]
        pb = [np.zeros_like(b) if b is not None else None for b in vb]
        h = self._handle
        vin = h.pointer_arrays([w.ctypes.data for w in vw], [b.ctypes.data if b is not None else 0 for b in vb])
        out = h.pointer_arrays([w.ctypes.data for w in pw], [b.ctypes.data if b is not None else 0 for b in pb])
        h.call(self._fn(name), vin.weights, vin.biases, out.weights, out.biases, n)
        return pw, pb

    def columns_multiply(self, weights: Sequence, biases: Optional[Sequence] = None):
        """G·v from the kept columns (``kfac_gn_columns_multiply_*``): per-layer weight and bias
        vectors in :meth:`~libkfac.Optimizer.step`'s layout in, new ``(weights, biases)`` lists
        out (zeros for layers without kept columns)."""
        return self._product("kfac_gn_columns_multiply", weights, biases)

    # -- dense chain ------------------------------------------------------------------------

    def define_chain(self, layers: Sequence[int], activations: Sequence, distribution) -> None:
        """The chain ``layers[0] → activations[0] → layers[1] → …`` of dense and conv2d layers, each
        layer's output buffer the next one's input (``kfac_gn_chain_define``);
        the last activation must be ``'identity'``. Activations by name (``'identity'``,
        ``'relu'``, ``'tanh'``, ``'logistic'``, ``'custom'``) or ``KFAC_ACTIVATION_*``."""
        codes = [ACTIVATIONS[a.lower()] if isinstance(a, str) else int(a) for a in activations]
        n = len(codes)
        ids = (ctypes.c_int32 * max(n, 1))(*[int(l) for l in layers])
        acts = (ctypes.c_int32 * max(n, 1))(*codes)
        if len(layers) != n:
            raise ValueError("libkfac: as many activations as layers")
        self._chain_length = n
        self._handle.call(_lib.kfac_gn_chain_define, ids, acts, n, distribution_code(distribution))

    def chain_forward(self, weights: Sequence, biases: Sequence, inputs: Sequence, derivatives=None) -> np.ndarray:
        """The chain's forward pass (``kfac_gn_chain_forward_*``), lists in chain order: weights
        ``[out, in]``, biases (``None`` for none), inputs (``inputs[0]`` ``[rows, in]`` required;
        ``None`` later computes them), derivatives φ′ (CUSTOM activations only). Returns z."""
        n = len(weights)
        ws = [self._array(w, "weights") for w in weights]
        bs = [self._array(b, "biases") for b in biases]
        xs = [self._array(x, "inputs") for x in inputs]
        ds = [self._array(d, "derivatives") for d in (derivatives or [None] * n)]
        rows = xs[0].shape[0]
        last = ws[-1].shape[0]
        z = np.empty((rows, last), dtype=self.dtype)
        h = self._handle

        def arr(values):
            return (h.ptr_type * max(n, 1))(*[h.cast(v.ctypes.data if v is not None else 0) for v in values])

        h.call(self._fn("kfac_gn_chain_forward"), arr(ws), arr(bs), arr(xs), arr(ds), rows, h.cast(z.ctypes.data))
        return z

    def chain_record_columns(self, uses=("factor", "product")) -> None:
        """The chain back-propagates S's columns itself from the last forward pass and records
        them for every chain layer (``kfac_gn_chain_record_columns``): ``'factor'`` gives the
        chain layers' KFLR output factors, ``'product'`` keeps them for :meth:`columns_multiply`."""
        self._handle.call(_lib.kfac_gn_chain_record_columns, _uses_code(uses))

    def chain_record_kfra(self, variant="ggn", record_inputs: bool = False, output_grads=None) -> None:
        """KFRA from the chain's last forward pass (``kfac_gn_chain_record_kfra_*``; dense chains
        only): every chain layer's pending output factor gains Ḡ_l (batch-averaged recursion)
        weighted by the forward pass's rows; ``record_inputs`` also records the chain's inputs
        into the input factors. ``variant`` ``'ggn'`` (default) or ``'hessian'`` (adds the D̄
        term; needs ``output_grads`` ``[rows, output_dim]``, ∂ℓ_n/∂z_n of the summed loss)."""
        code = KFRA_VARIANTS[variant.lower()] if isinstance(variant, str) else int(variant)
        g = self._array(output_grads, "output_grads")
        h = self._handle
        h.call(self._fn("kfac_gn_chain_record_kfra"), code, 1 if record_inputs else 0,
               h.cast(g.ctypes.data if g is not None else 0))

    def chain_multiply(self, weights: Sequence, biases: Optional[Sequence] = None):
        """G·v over the chain's layers by the R operator (``kfac_gn_chain_multiply_*``), layouts
        as :meth:`columns_multiply` (zeros outside the chain)."""
        return self._product("kfac_gn_chain_multiply", weights, biases)
