"""The address-level layer: one ``kfac_optimizer`` handle and the library's calls on raw buffer
addresses, statuses turned into :class:`~libkfac.KFACError`.

Both front-ends sit on it: :class:`libkfac.Optimizer` checks and converts numpy arrays and
passes their addresses; :mod:`libkfac.torch` passes the addresses of tensors it owns (the
zero-copy path). Nothing here checks shapes or dtypes of buffers: a caller passing addresses
vouches for them (the library checks only what it can: NULLs, sizes, ids).
"""

from __future__ import annotations

import ctypes
import threading
from typing import NamedTuple, Optional, Sequence, Tuple

import numpy as np

from . import _lib
from ._convert import CTYPES, DTYPES
from ._errors import KFACError, check, last_error

__all__ = ["Handle", "LayerPointers"]


def _unsupported(name: str):
    """Stands in for an experimental function the loaded library does not export."""

    def call(*args):
        raise KFACError(_lib.KFAC_ERROR_UNSUPPORTED, f"the loaded library does not export {name}()")

    return call


class LayerPointers(NamedTuple):
    """The per-layer buffer arguments of the step-shaped calls (``float *const *weights,
    float *const *biases, int32_t n_layers``): keep one and reuse it while its buffers live."""

    weights: ctypes.Array
    biases: Optional[ctypes.Array]
    count: int


class Handle:
    """A ``kfac_optimizer`` of one precision. Calls are serialised by :attr:`lock` (an
    ``RLock``: callers may hold it across several calls); :meth:`close` frees the handle."""

    def __init__(self, dtype):
        dtype = np.dtype(dtype)
        if dtype not in DTYPES:
            raise TypeError(f"libkfac.Optimizer: dtype must be float32 or float64, not {dtype}")
        self.dtype = dtype
        ctype, suffix = CTYPES[dtype]
        self.ptr_type = ctypes.POINTER(ctype)
        self._fn = {
            name: getattr(_lib, f"kfac_{name}_{suffix}") or _unsupported(f"kfac_{name}_{suffix}")
            for name in (
                "layer_record_inputs", "layer_record_output_grads", "layer_get_factors", "optimizer_step",
                "layer_precondition", "adaptive_solve_step_size", "adaptive_get_update",
                "candidates_get_directions", "candidates_solve_step_size", "curvature_multiply",
                "cg_begin", "cg_get_vector", "cg_supply_product", "cg_finish",
                "layer_record_examples", "layer_get_ekfac_scaling",
                "distributed_pack_statistics", "distributed_unpack_statistics",
                "distributed_pack_inverses", "distributed_unpack_inverses", "distributed_pack_model_sums",
                "distributed_pack_owned_inverses", "distributed_unpack_gathered_inverses",
                "distributed_pack_scalings", "distributed_unpack_scalings",
                "layer_get_cross_factors",
            )
        }
        self.lock = threading.RLock()
        self._free = _lib.kfac_optimizer_free  # kept so __del__ works during interpreter exit
        self._pointer = None
        pointer = _lib.kfac_optimizer_p()
        status = _lib.kfac_optimizer_create(DTYPES[dtype], ctypes.byref(pointer))
        if status != _lib.KFAC_OK:
            raise KFACError(status, last_error(None))
        self._pointer = pointer

    # -----------------------------------------------------------------------------------------
    # Lifetime and calling
    # -----------------------------------------------------------------------------------------

    @property
    def pointer(self):
        """The live ``kfac_optimizer *`` (``ValueError`` once closed)."""
        pointer = self._pointer
        if pointer is None:
            raise ValueError("libkfac.Optimizer: the optimizer is closed")
        return pointer

    @property
    def closed(self) -> bool:
        return self._pointer is None

    def close(self) -> None:
        """Frees the handle; closing twice is harmless."""
        with self.lock:
            pointer, self._pointer = self._pointer, None
            if pointer is not None:
                self._free(pointer)

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown: modules may already be gone
            pass

    def call(self, function, *args) -> int:
        """``function(handle, *args)``; :class:`KFACError` for a negative result."""
        with self.lock:
            pointer = self.pointer
            return check(function(pointer, *args), pointer)

    def cast(self, address: int):
        """A buffer address (0 for none) as a pointer of the handle's scalar type."""
        return ctypes.cast(address or None, self.ptr_type)

    def pointer_arrays(self, weight_addresses: Sequence[int], bias_addresses: Sequence[int]) -> LayerPointers:
        """:class:`LayerPointers` from buffer addresses, one weight and one bias address per
        layer (0 for an absent bias; the bias array is NULL when no layer has one)."""
        n = len(weight_addresses)
        weights = (self.ptr_type * max(n, 1))(*[self.cast(a) for a in weight_addresses])
        biases = (self.ptr_type * max(n, 1))(*[self.cast(a) for a in bias_addresses])
        return LayerPointers(weights, biases if any(bias_addresses) else None, n)

    # -----------------------------------------------------------------------------------------
    # Queries and parameters
    # -----------------------------------------------------------------------------------------

    def _get(self, function, ctype):
        """A getter's out-parameter after a successful call."""
        out = ctype()
        self.call(function, ctypes.byref(out))
        return out.value

    def _get_if_stepped(self, function) -> Optional[float]:
        """A double getter that fails with NO_STEP until the value exists: None then."""
        try:
            return float(self._get(function, ctypes.c_double))
        except KFACError as error:
            if error.status != _lib.KFAC_ERROR_NO_STEP:
                raise
            return None

    def get_dtype(self) -> int:
        return int(self._get(_lib.kfac_optimizer_get_dtype, ctypes.c_int32))

    def layer_count(self) -> int:
        return int(self._get(_lib.kfac_layer_count, ctypes.c_int32))

    def wants_statistics(self) -> bool:
        return bool(self._get(_lib.kfac_optimizer_wants_statistics, ctypes.c_int32))

    def step_count(self) -> int:
        return int(self._get(_lib.kfac_optimizer_get_step_count, ctypes.c_int64))

    def kl_scale(self) -> Optional[float]:
        """ν of the last step; None before the first (the library's NO_STEP)."""
        return self._get_if_stepped(_lib.kfac_optimizer_get_kl_scale)

    def reduction_ratio(self) -> Optional[float]:
        """ρ of the last report; None before the first (the library's NO_STEP)."""
        return self._get_if_stepped(_lib.kfac_adaptive_get_reduction_ratio)

    def get_double(self, param: int) -> float:
        out = ctypes.c_double()
        self.call(_lib.kfac_param_get_double, param, ctypes.byref(out))
        return float(out.value)

    def set_double(self, param: int, value: float) -> None:
        self.call(_lib.kfac_param_set_double, param, float(value))

    def get_int(self, param: int) -> int:
        out = ctypes.c_int64()
        self.call(_lib.kfac_param_get_int, param, ctypes.byref(out))
        return int(out.value)

    def set_int(self, param: int, value: int) -> None:
        self.call(_lib.kfac_param_set_int, param, value)

    # -----------------------------------------------------------------------------------------
    # Layers
    # -----------------------------------------------------------------------------------------

    def add_dense(self, in_features: int, out_features: int, bias: bool,
                  input_group_size: int = 0, output_group_size: int = 0) -> int:
        desc = _lib.kfac_dense_desc.new(in_features=in_features, out_features=out_features,
                                        has_bias=1 if bias else 0, input_group_size=input_group_size,
                                        output_group_size=output_group_size)
        layer = ctypes.c_int32()
        self.call(_lib.kfac_layer_add_dense, ctypes.byref(desc), ctypes.byref(layer))
        return int(layer.value)

    def add_conv2d(self, desc) -> int:
        layer = ctypes.c_int32()
        self.call(_lib.kfac_layer_add_conv2d, ctypes.byref(desc), ctypes.byref(layer))
        return int(layer.value)

    def layer_info(self, layer: int):
        info = _lib.kfac_layer_info.new()
        self.call(_lib.kfac_layer_get_info, layer, ctypes.byref(info))
        return info

    # -----------------------------------------------------------------------------------------
    # Statistics, factors, inverses
    # -----------------------------------------------------------------------------------------

    def record(self, side: int, layer: int, address: int, rows: int) -> None:
        """Records ``rows`` rows (dense) or examples (convolution) at ``address``: inputs for
        ``side`` 0, output gradients for ``side`` 1."""
        function = self._fn["layer_record_inputs"] if side == 0 else self._fn["layer_record_output_grads"]
        self.call(function, layer, self.cast(address), rows)

    def record_examples(self, layer: int, inputs_address: int, grads_address: int, rows: int,
                        rows_per_example: int) -> None:
        """Experimental (EKFAC): paired inputs and output gradients of the same rows."""
        self.call(self._fn["layer_record_examples"], layer, self.cast(inputs_address), self.cast(grads_address),
                  rows, rows_per_example)

    def get_ekfac_scaling(self, layer: int, group: int, address: int) -> None:
        """Experimental (EKFAC): S of one group, [g_dim][a_dim], into ``address``."""
        self.call(self._fn["layer_get_ekfac_scaling"], layer, group, self.cast(address))

    def update_factors(self) -> None:
        self.call(_lib.kfac_optimizer_update_factors)

    def update_inverses(self) -> None:
        self.call(_lib.kfac_optimizer_update_inverses)

    def discard_statistics(self) -> None:
        self.call(_lib.kfac_optimizer_discard_statistics)

    def get_factors(self, layer: int, group: int, a_address: int, g_address: int) -> None:
        self.call(self._fn["layer_get_factors"], layer, group, self.cast(a_address), self.cast(g_address))

    def link(self, lower: int, upper: int) -> None:
        """Experimental: kfac_layer_link."""
        self.call(_lib.kfac_layer_link, lower, upper)

    def get_cross_factors(self, lower: int, a_address: int, g_address: int) -> None:
        """Experimental: kfac_layer_get_cross_factors_*."""
        self.call(self._fn["layer_get_cross_factors"], lower, self.cast(a_address), self.cast(g_address))

    # -----------------------------------------------------------------------------------------
    # Preconditioning
    # -----------------------------------------------------------------------------------------

    def step(self, pointers: LayerPointers) -> None:
        self.call(self._fn["optimizer_step"], *pointers)

    def precondition(self, layer: int, weight_address: int, bias_address: int) -> None:
        self.call(self._fn["layer_precondition"], layer, self.cast(weight_address), self.cast(bias_address))

    def curvature_multiply(self, power: int, pointers: LayerPointers) -> None:
        """Experimental: the buffers ← (damped curvature)^power · buffers, per layer."""
        self.call(self._fn["curvature_multiply"], power, *pointers)

    # -----------------------------------------------------------------------------------------
    # Experimental: conjugate gradient and Newton-CG (reverse communication)
    # -----------------------------------------------------------------------------------------

    def cg_begin(self, desc, grads: LayerPointers, diagonal: Optional[LayerPointers]) -> int:
        """Begins a solve; returns the request (KFAC_CG_NEED_PRODUCT or KFAC_CG_DONE)."""
        request = ctypes.c_int32()
        dw, db = (diagonal.weights, diagonal.biases) if diagonal is not None else (None, None)
        self.call(self._fn["cg_begin"], ctypes.byref(desc), grads.weights, grads.biases, dw, db, grads.count,
                  ctypes.byref(request))
        return int(request.value)

    def cg_get_vector(self, pointers: LayerPointers) -> None:
        self.call(self._fn["cg_get_vector"], *pointers)

    def cg_supply_product(self, pointers: LayerPointers) -> int:
        request = ctypes.c_int32()
        self.call(self._fn["cg_supply_product"], *pointers, ctypes.byref(request))
        return int(request.value)

    def cg_finish(self, pointers: LayerPointers):
        result = _lib.kfac_cg_result.new()
        self.call(self._fn["cg_finish"], *pointers, ctypes.byref(result))
        return result

    def cg_report_loss_change(self, step_scale: float, before: float, after: float) -> float:
        rho = ctypes.c_double()
        self.call(_lib.kfac_cg_report_loss_change, float(step_scale), float(before), float(after), ctypes.byref(rho))
        return float(rho.value)

    # -----------------------------------------------------------------------------------------
    # Adaptive mode
    # -----------------------------------------------------------------------------------------

    def solve_step_size(self, outputs: int, direction_products: int, previous_products: int,
                        rows: int, dim: int, distribution: int) -> Tuple[float, float, float]:
        alpha, mu, predicted = ctypes.c_double(), ctypes.c_double(), ctypes.c_double()
        self.call(self._fn["adaptive_solve_step_size"], self.cast(outputs), self.cast(direction_products),
                  self.cast(previous_products), rows, dim, distribution,
                  ctypes.byref(alpha), ctypes.byref(mu), ctypes.byref(predicted))
        return float(alpha.value), float(mu.value), float(predicted.value)

    # -----------------------------------------------------------------------------------------
    # Distributed runs (experimental)
    # -----------------------------------------------------------------------------------------

    def set_world(self, rank: int, size: int) -> None:
        self.call(_lib.kfac_distributed_set_world, rank, size)

    def get_world(self) -> Tuple[int, int]:
        rank, size = ctypes.c_int32(), ctypes.c_int32()
        self.call(_lib.kfac_distributed_get_world, ctypes.byref(rank), ctypes.byref(size))
        return int(rank.value), int(size.value)

    def exchange_count(self, what: int) -> int:
        count = ctypes.c_int64()
        self.call(_lib.kfac_distributed_get_count, what, ctypes.byref(count))
        return int(count.value)

    def exchange_due(self, what: int) -> bool:
        due = ctypes.c_int32()
        self.call(_lib.kfac_distributed_get_due, what, ctypes.byref(due))
        return bool(due.value)

    def inverse_owner(self, layer: int, group: int, side: int, block: int) -> int:
        rank = ctypes.c_int32()
        self.call(_lib.kfac_distributed_get_owner, layer, group, side, block, ctypes.byref(rank))
        return int(rank.value)

    def exchange(self, name: str, address: int, count: int) -> None:
        """kfac_distributed_<name>_* (pack_statistics, unpack_statistics, pack_inverses,
        unpack_inverses, pack_scalings, unpack_scalings) on the buffer at ``address`` of ``count`` values."""
        self.call(self._fn["distributed_" + name], self.cast(address), count)

    def synchronize(self, allreduce_sum, allgatherv=None) -> None:
        """kfac_distributed_synchronize with ``allreduce_sum(pointer, count)`` (returning 0 on
        success) as the collective of the handle's precision, and optionally
        ``allgatherv(send, receive, counts, displacements)``."""
        f32 = self.ptr_type is _lib.c_float_p
        reduce_type = _lib.kfac_allreduce_sum_fn_f32 if f32 else _lib.kfac_allreduce_sum_fn_f64
        gather_type = _lib.kfac_allgatherv_fn_f32 if f32 else _lib.kfac_allgatherv_fn_f64
        fields = {("allreduce_sum_f32" if f32 else "allreduce_sum_f64"):
                  reduce_type(lambda p, n, _user: allreduce_sum(p, n))}
        if allgatherv is not None:
            fields["allgatherv_f32" if f32 else "allgatherv_f64"] = gather_type(
                lambda s, r, c, d, _user: allgatherv(s, r, c, d))
        collectives = _lib.kfac_collectives.new(**fields)
        self.call(_lib.kfac_distributed_synchronize, ctypes.byref(collectives))

    def inverse_layout(self, size: int):
        counts = (ctypes.c_int64 * max(size, 1))()
        displacements = (ctypes.c_int64 * max(size, 1))()
        self.call(_lib.kfac_distributed_get_inverse_layout, counts, displacements, size)
        return list(counts)[:size], list(displacements)[:size]

    def pack_model_sums(self, outputs: int, direction_products: Sequence[int], previous_products: int,
                        rows: int, dim: int, distribution: int, sums: int, n_sums: int) -> None:
        n = len(direction_products)
        products = (self.ptr_type * max(n, 1))(*[self.cast(a) for a in direction_products])
        self.call(self._fn["distributed_pack_model_sums"], self.cast(outputs), products, n,
                  self.cast(previous_products), rows, dim, distribution,
                  ctypes.cast(sums, ctypes.POINTER(ctypes.c_double)), n_sums)

    def solve_model_sums(self, sums: int, n_sums: int) -> Tuple[int, float, float, float]:
        chosen = ctypes.c_int32()
        alpha, mu, predicted = ctypes.c_double(), ctypes.c_double(), ctypes.c_double()
        self.call(_lib.kfac_distributed_solve_model_sums, ctypes.cast(sums, ctypes.POINTER(ctypes.c_double)), n_sums,
                  ctypes.byref(chosen), ctypes.byref(alpha), ctypes.byref(mu), ctypes.byref(predicted))
        return int(chosen.value), float(alpha.value), float(mu.value), float(predicted.value)

    def candidate_count(self) -> int:
        return int(self._get(_lib.kfac_candidates_get_count, ctypes.c_int32))

    def candidate_directions(self, candidate: int, pointers: LayerPointers) -> float:
        """Writes candidate ``candidate``'s directions; returns its factor damping γ."""
        damping = ctypes.c_double()
        self.call(self._fn["candidates_get_directions"], candidate, *pointers, ctypes.byref(damping))
        return float(damping.value)

    def solve_step_size_candidates(self, outputs: int, direction_products: Sequence[int],
                                   previous_products: int, rows: int, dim: int,
                                   distribution: int) -> Tuple[int, float, float, float]:
        n = len(direction_products)
        products = (self.ptr_type * max(n, 1))(*[self.cast(a) for a in direction_products])
        chosen = ctypes.c_int32()
        alpha, mu, predicted = ctypes.c_double(), ctypes.c_double(), ctypes.c_double()
        self.call(self._fn["candidates_solve_step_size"], self.cast(outputs), products, n,
                  self.cast(previous_products), rows, dim, distribution, ctypes.byref(chosen),
                  ctypes.byref(alpha), ctypes.byref(mu), ctypes.byref(predicted))
        return int(chosen.value), float(alpha.value), float(mu.value), float(predicted.value)

    def get_update(self, pointers: LayerPointers) -> None:
        self.call(self._fn["adaptive_get_update"], *pointers)

    def report_loss_change(self, before: float, after: float) -> float:
        rho = ctypes.c_double()
        self.call(_lib.kfac_adaptive_report_loss_change, float(before), float(after), ctypes.byref(rho))
        return float(rho.value)

    def report_needed(self) -> bool:
        return bool(self._get(_lib.kfac_adaptive_get_report_needed, ctypes.c_int32))

    def skip_loss_report(self) -> None:
        self.call(_lib.kfac_adaptive_skip_loss_report)

    # -----------------------------------------------------------------------------------------
    # State
    # -----------------------------------------------------------------------------------------

    def state_bytes(self) -> bytes:
        with self.lock:
            size = ctypes.c_size_t()
            self.call(_lib.kfac_state_get_size, ctypes.byref(size))
            buffer = ctypes.create_string_buffer(max(size.value, 1))
            written = ctypes.c_size_t()
            self.call(_lib.kfac_state_save, buffer, size.value, ctypes.byref(written))
            return buffer.raw[: written.value]

    def load_state(self, data: bytes) -> None:
        self.call(_lib.kfac_state_load, data, len(data))

    def save_file(self, path: bytes) -> None:
        self.call(_lib.kfac_state_save_file, path)

    def load_file(self, path: bytes) -> None:
        self.call(_lib.kfac_state_load_file, path)
