"""The adaptive mode of Martens & Grosse (2015, §6–7) and the re-choice of the factor damping γ
(§6.6), as methods of :class:`libkfac.Optimizer`: step size and momentum from the quadratic
model, the direction candidates of a γ step, the update and the reduction ratio.

:class:`AdaptiveMethods` is a mixin: it uses the optimizer's ``_handle`` (the address-level
calls), ``_output_rows`` and ``_layer_buffers`` (array checks) and imports nothing of
:mod:`libkfac.optimizer`.
"""

from __future__ import annotations

from typing import Optional, Sequence, Tuple

import numpy as np

from . import _convert, _lib
from ._convert import INT32_MAX
from ._errors import KFACError

__all__ = ["AdaptiveMethods"]


class AdaptiveMethods:
    """The adaptive-mode methods of :class:`libkfac.Optimizer`."""

    def solve_step_size(
        self,
        outputs,
        direction_products,
        previous_products=None,
        distribution="categorical",
    ) -> Tuple[float, float, float]:
        """Chooses the step size α and momentum μ of the adaptive mode for the directions the
        last :meth:`step` wrote (``kfac_adaptive_solve_step_size_*``).

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
        code = _convert.distribution_code(distribution)
        z = self._output_rows(outputs, None, "outputs")
        rows, dim = z.shape
        jd = self._output_rows(direction_products, dim, "direction_products")
        if jd.shape != z.shape:
            raise ValueError(f"libkfac: direction_products have {jd.shape[0]} rows, the outputs {rows}")
        jp = None
        if previous_products is not None:
            jp = self._output_rows(previous_products, dim, "previous_products")
            if jp.shape != z.shape:
                raise ValueError(f"libkfac: previous_products have {jp.shape[0]} rows, the outputs {rows}")
        return self._handle.solve_step_size(z.ctypes.data, jd.ctypes.data, 0 if jp is None else jp.ctypes.data,
                                            rows, dim, code)

    def candidate_count(self) -> int:
        """The number of direction candidates the last successful :meth:`step` prepared
        (``kfac_candidates_get_count``, experimental): 1 on an ordinary step; on a γ step (every
        ``factor_damping_period`` steps) up to 3, one per factor damping γ, γ·ω₂, γ/ω₂ whose
        directions were finite (candidate 0, the current γ, is always there: it is what
        :meth:`step` wrote). 0 once the step was solved, and before the first step."""
        return self._handle.candidate_count()

    @staticmethod
    def _candidate_index(candidate) -> int:
        if _convert.is_bool(candidate):
            raise TypeError("libkfac: candidate must be an integer, not bool")
        return _convert.int32(candidate, "candidate", _lib.KFAC_ERROR_INVALID_ARGUMENT)

    def candidate_directions(
        self,
        candidate: int,
        weight_dirs: Sequence[np.ndarray],
        bias_dirs: Optional[Sequence[Optional[np.ndarray]]] = None,
    ) -> float:
        """Writes the directions of candidate ``candidate`` (``0 <= candidate <
        candidate_count()``) of the last step into the arrays, and returns that candidate's
        factor damping γ (``kfac_candidates_get_directions_*``, experimental).

        The arrays follow :meth:`step`'s layout and rules (one C-contiguous, writeable array of
        the handle's dtype per layer, ``None`` for the bias of a layer without one). The
        directions are KL-clipped with the candidate's own ν; candidate 0 is what :meth:`step`
        wrote. Use them for the forward-mode products ``J·D_k`` that
        :meth:`solve_step_size_candidates` takes. Changes nothing in the handle; raises
        ``KFAC_ERROR_NO_STEP`` when no step awaits a solve and ``KFAC_ERROR_INVALID_ARGUMENT``
        for a candidate out of range."""
        candidate = self._candidate_index(candidate)
        with self._handle.lock:
            pointers = self._layer_buffers(weight_dirs, bias_dirs, "weight_dirs", "bias_dirs")
            return self._handle.candidate_directions(candidate, pointers)

    def solve_step_size_candidates(
        self,
        outputs,
        direction_products,
        previous_products=None,
        distribution="categorical",
    ) -> Tuple[int, float, float, float]:
        """:meth:`solve_step_size` over all direction candidates of the last step
        (``kfac_candidates_solve_step_size_*``, experimental), the re-choice of the factor damping γ of
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
        code = _convert.distribution_code(distribution)
        z = self._output_rows(outputs, None, "outputs")
        rows, dim = z.shape
        if isinstance(direction_products, np.ndarray) and direction_products.ndim < 3:
            raise ValueError(
                "libkfac: direction_products must hold one [rows][output_dim] array per candidate "
                f"(a sequence of arrays or an [n_candidates, rows, output_dim] array), got shape "
                f"{direction_products.shape}"
            )
        products = []
        for k, product in enumerate(direction_products):
            jd = self._output_rows(product, dim, f"direction_products[{k}]")
            if jd.shape != z.shape:
                raise ValueError(
                    f"libkfac: direction_products[{k}] have {jd.shape[0]} rows, the outputs {rows}"
                )
            products.append(jd)
        if len(products) > INT32_MAX:
            raise KFACError(_lib.KFAC_ERROR_INVALID_ARGUMENT, f"{len(products)} candidates")
        jp = None
        if previous_products is not None:
            jp = self._output_rows(previous_products, dim, "previous_products")
            if jp.shape != z.shape:
                raise ValueError(f"libkfac: previous_products have {jp.shape[0]} rows, the outputs {rows}")
        return self._handle.solve_step_size_candidates(
            z.ctypes.data, [jd.ctypes.data for jd in products], 0 if jp is None else jp.ctypes.data,
            rows, dim, code)

    def pack_model_sums(self, outputs, direction_products, previous_products=None,
                        distribution="categorical") -> np.ndarray:
        """EXPERIMENTAL (``kfac_distributed_pack_model_sums_*``). The quadratic model's
        output-space sums over this rank's rows, as a float64 array for a SUM-allreduce across the
        ranks of a distributed run; then :meth:`solve_model_sums`. ``direction_products``: one
        ``J·D_k`` per candidate (one array for candidate 0 alone); ``outputs`` may have 0 rows."""
        code = _convert.distribution_code(distribution)
        z = self._output_rows(outputs, None, "outputs")
        rows, dim = z.shape
        if isinstance(direction_products, np.ndarray) and direction_products.ndim < 3:
            direction_products = [direction_products]
        products = [self._output_rows(p, dim, f"direction_products[{k}]") for k, p in enumerate(direction_products)]
        for k, jd in enumerate(products):
            if jd.shape != z.shape:
                raise ValueError(f"libkfac: direction_products[{k}] have {jd.shape[0]} rows, the outputs {rows}")
        jp = None if previous_products is None else self._output_rows(previous_products, dim, "previous_products")
        if jp is not None and jp.shape != z.shape:
            raise ValueError(f"libkfac: previous_products have {jp.shape[0]} rows, the outputs {rows}")
        sums = np.zeros(3 * len(products) + 2, dtype=np.float64)
        self._handle.pack_model_sums(z.ctypes.data if rows else 0, [jd.ctypes.data if rows else 0 for jd in products],
                                     0 if jp is None or not rows else jp.ctypes.data, rows, dim, code,
                                     sums.ctypes.data, sums.size)
        return sums

    def solve_model_sums(self, sums) -> Tuple[int, float, float, float]:
        """EXPERIMENTAL (``kfac_distributed_solve_model_sums``). Solves from SUM-allreduced
        :meth:`pack_model_sums` arrays: ``(chosen, alpha, mu, predicted_change)`` of the union
        batch, as :meth:`solve_step_size_candidates` returns them."""
        sums = np.ascontiguousarray(sums, dtype=np.float64)
        return self._handle.solve_model_sums(sums.ctypes.data, sums.size)

    def get_update(
        self,
        weight_updates: Sequence[np.ndarray],
        bias_updates: Optional[Sequence[Optional[np.ndarray]]] = None,
    ) -> None:
        """Writes the update ``δ = −α·D_chosen + μ·δ₀`` of the last solve into the arrays
        (``kfac_adaptive_get_update_*``; the library keeps it as the next δ₀): apply ``θ ← θ + δ``.

        The arrays follow :meth:`step`'s layout and rules. Raises ``KFAC_ERROR_NO_STEP`` before
        the first solve. Changes nothing in the handle."""
        with self._handle.lock:
            self._handle.get_update(
                self._layer_buffers(weight_updates, bias_updates, "weight_updates", "bias_updates"))

    def report_loss_change(self, loss_before, loss_after) -> float:
        """Reports the mean loss before and after applying the last solved update
        (``kfac_adaptive_report_loss_change``); returns the reduction ratio
        ``ρ = (after − before) / M(δ)`` (NaN if M(δ) was not negative). Every ``lm_interval``
        reports, λ (``damping``) is multiplied by ``lm_decay ** lm_interval`` if ρ > 3/4 and
        divided by it if ρ < 1/4. One report per solve (``KFAC_ERROR_NO_STEP`` otherwise)."""
        return self._handle.report_loss_change(float(loss_before), float(loss_after))

    @property
    def report_needed(self) -> bool:
        """Whether the next :meth:`report_loss_change` adjusts λ (``kfac_adaptive_get_report_needed``,
        experimental): ``lm_interval`` is T > 0 and the next report is a T-th one (reports and
        skips both count). Only those reports' ρ is used; on the other steps the loss after the
        update need not be evaluated (:meth:`skip_loss_report`)."""
        return self._handle.report_needed()

    def skip_loss_report(self) -> None:
        """Ends the last solve without a loss report (``kfac_adaptive_skip_loss_report``,
        experimental): it counts as a report for ``lm_interval``, λ is unchanged and
        :attr:`last_reduction_ratio` becomes NaN. Raises ``KFAC_ERROR_NO_STEP`` without a solve
        to report, or when :attr:`report_needed` (that report must carry the losses)."""
        self._handle.skip_loss_report()

    @property
    def last_reduction_ratio(self) -> Optional[float]:
        """ρ of the last :meth:`report_loss_change` (``None`` before the first)."""
        return self._handle.reduction_ratio()
