"""Conjugate gradient and Newton-CG (experimental ``kfac_cg_*`` of ``kfac.h``) on numpy arrays.

The solver works by reverse communication: it hands out a vector ``v`` and asks for ``G·v``
(the caller's curvature — usually the Gauss-Newton matrix of a curvature batch — without the
damping λ and the L2 term η); the caller computes it by any means. :meth:`NewtonCG.solve` runs
the loop with a Python callable; :meth:`NewtonCG.begin` / :meth:`~NewtonCG.vector` /
:meth:`~NewtonCG.supply` / :meth:`~NewtonCG.finish` are the loop's steps for callers that drive
it themselves. Nothing in the library calls Python: an exception in ``product`` propagates
normally and leaves the solve open at its last iterate.

A Newton-CG iteration (Martens 2010; simpleNN)::

    import libkfac
    from libkfac.newton_cg import NewtonCG, armijo_backtracking

    opt = libkfac.Optimizer(np.float64, damping=1.0, lm_interval=1, lm_decay=2 / 3)
    ... opt.add_dense(...) for every layer ...
    cg = NewtonCG(opt, preconditioner="none", tolerance=0.1, max_iterations=250)
    for it in range(iterations):
        loss, gw, gb = loss_and_gradient(theta)              # the whole batch
        subset = rng.choice(n, n // 20)                      # G on 5% of it
        step_w, step_b, res = cg.solve(gw, gb, lambda vw, vb: gauss_newton_product(theta, subset, vw, vb))
        alpha, new_loss = armijo_backtracking(lambda a: loss_at(theta, a, step_w, step_b), loss, res.grad_dot_step)
        theta = theta + alpha * step
        cg.report_loss_change(loss, new_loss, step_scale=alpha)   # ρ against the model without λ; adjusts λ

λ is the optimizer's ``damping`` parameter: ``lm_decay = 2/3`` and ``lm_interval = 1`` give
simpleNN's λ·3/2 (ρ < 1/4) and λ·2/3 (ρ > 3/4).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np

from . import _lib

__all__ = ["CGResult", "NewtonCG", "armijo_backtracking", "PRECONDITIONERS", "STOP_RULES"]

#: Preconditioner names → ``kfac_cg_preconditioner``.
PRECONDITIONERS = {
    "none": _lib.KFAC_CG_PRECONDITIONER_NONE,
    "kfac": _lib.KFAC_CG_PRECONDITIONER_KFAC,
    "diagonal": _lib.KFAC_CG_PRECONDITIONER_DIAGONAL,
}
#: Stopping-rule names → ``kfac_cg_stop_rule``.
STOP_RULES = {"residual": _lib.KFAC_CG_STOP_RESIDUAL, "relative_progress": _lib.KFAC_CG_STOP_RELATIVE_PROGRESS}
_REASONS = {
    _lib.KFAC_CG_REASON_RUNNING: "running",
    _lib.KFAC_CG_REASON_RESIDUAL: "residual",
    _lib.KFAC_CG_REASON_RELATIVE_PROGRESS: "relative_progress",
    _lib.KFAC_CG_REASON_MAX_ITERATIONS: "max_iterations",
    _lib.KFAC_CG_REASON_NON_POSITIVE_CURVATURE: "non_positive_curvature",
    _lib.KFAC_CG_REASON_CALLER: "caller",
}


@dataclass(frozen=True)
class CGResult:
    """``kfac_cg_result``: s is the solution, G the caller's curvature."""

    iterations: int
    products: int
    reason: str
    grad_dot_step: float      #: gᵀs
    step_curvature: float     #: sᵀ(G + ηI)s
    damping_term: float       #: λ‖s‖²
    model_value: float        #: gᵀs + ½ sᵀ(G + ηI)s, the model without λ
    quadratic_value: float    #: φ(s) = model_value + ½ λ‖s‖²
    residual_norm: float
    gradient_norm: float
    damping: float            #: λ of the solve

    def predicted_change(self, step_scale: float = 1.0) -> float:
        """m(α) = α gᵀs + ½ α² sᵀ(G + ηI)s, the model the reduction ratio is measured against."""
        a = float(step_scale)
        return a * self.grad_dot_step + 0.5 * a * a * self.step_curvature

    @classmethod
    def _from_c(cls, r) -> "CGResult":
        return cls(int(r.iterations), int(r.products), _REASONS.get(int(r.reason), str(r.reason)),
                   float(r.grad_dot_step), float(r.step_curvature), float(r.damping_term), float(r.model_value),
                   float(r.quadratic_value), float(r.residual_norm), float(r.gradient_norm), float(r.damping))


Arrays = Tuple[List[np.ndarray], List[Optional[np.ndarray]]]


class NewtonCG:
    """Preconditioned CG solves of ``(G + (λ + η) I) s = −g`` on a :class:`libkfac.Optimizer`'s
    layers (its handle holds the solve; one solve at a time per optimizer).

    Args:
        optimizer: the :class:`libkfac.Optimizer` whose layers define the vectors' layout (the
            layout of :meth:`~libkfac.Optimizer.step`) and whose ``damping`` is λ.
        preconditioner: ``"none"``, ``"kfac"`` (the optimizer's current K-FAC inverses: record
            statistics and compute inverses first) or ``"diagonal"`` (``(d + λ + η)^exponent``
            with ``d`` given to each solve, Martens 2010: the sum of squared per-example
            gradients).
        stop_rule: ``"residual"`` (‖r‖ ≤ ξ‖g‖, simpleNN) or ``"relative_progress"`` (Martens
            2010, §4.4).
        tolerance: ξ or ε; None for 0.1 / 5e-4.
        max_iterations: at most this many CG iterations (default 250).
        warm_start, warm_start_decay: start from ``decay ·`` the previous solution.
        diagonal_exponent: α of the diagonal preconditioner (0.75).
        l2: η, added to λ in the system and to G in the model (the loss and gradient you pass
            include ``½η‖θ‖²``).
    """

    def __init__(self, optimizer, *, preconditioner: str = "none", stop_rule: str = "residual",
                 tolerance: Optional[float] = None, max_iterations: int = 250, warm_start: bool = False,
                 warm_start_decay: float = 0.95, diagonal_exponent: float = 0.75, l2: float = 0.0):
        self.optimizer = optimizer
        self.options = dict(preconditioner=preconditioner, stop_rule=stop_rule, tolerance=tolerance,
                            max_iterations=max_iterations, warm_start=warm_start,
                            warm_start_decay=warm_start_decay, diagonal_exponent=diagonal_exponent, l2=l2)
        self._desc(**self.options)  # validate the names now
        self._keep = None

    @staticmethod
    def _desc(preconditioner, stop_rule, tolerance, max_iterations, warm_start, warm_start_decay,
              diagonal_exponent, l2):
        if preconditioner not in PRECONDITIONERS:
            raise ValueError(f"libkfac: preconditioner must be one of {sorted(PRECONDITIONERS)}, not {preconditioner!r}")
        if stop_rule not in STOP_RULES:
            raise ValueError(f"libkfac: stop_rule must be one of {sorted(STOP_RULES)}, not {stop_rule!r}")
        return _lib.kfac_cg_desc.new(
            max_iterations=int(max_iterations), stop_rule=STOP_RULES[stop_rule],
            tolerance=0.0 if tolerance is None else float(tolerance), preconditioner=PRECONDITIONERS[preconditioner],
            warm_start=1 if warm_start else 0, warm_start_decay=float(warm_start_decay),
            diagonal_exponent=float(diagonal_exponent), l2=float(l2))

    # -- buffers ---------------------------------------------------------------------------------

    def _shapes(self):
        return self.optimizer._layers

    def _zeros(self) -> Arrays:
        dtype = self.optimizer.dtype
        ws = [np.zeros(s.weight_shapes[0], dtype) for s in self._shapes()]
        bs = [np.zeros(s.out_features, dtype) if s.has_bias else None for s in self._shapes()]
        return ws, bs

    def _inputs(self, weights, biases, what: str):
        """Read-only arrays as contiguous copies of the handle's dtype (kept alive) and their
        pointers."""
        opt = self.optimizer
        shapes = self._shapes()
        weights = list(weights)
        biases = [None] * len(shapes) if biases is None else list(biases)
        ws = [np.array(opt._converted(w, f"{what} weights"), copy=True, order="C") for w in weights]
        if len(ws) == len(shapes):
            ws = [w.reshape(s.weight_shapes[0]) if w.size == int(np.prod(s.weight_shapes[0])) else w
                  for w, s in zip(ws, shapes)]
        bs = [None if b is None else np.array(opt._converted(b, f"{what} biases"), copy=True, order="C")
              for b in biases]
        return (ws, bs), opt._layer_buffers(ws, bs, f"{what}_w", f"{what}_b")

    # -- the reverse-communication steps ----------------------------------------------------------

    def begin(self, grad_weights: Sequence, grad_biases: Optional[Sequence] = None, *,
              diagonal_weights: Optional[Sequence] = None, diagonal_biases: Optional[Sequence] = None,
              **overrides) -> bool:
        """Begins a solve with gradient g (replacing an open one); ``overrides`` replace this
        solver's options for this solve. Returns True while a product is needed."""
        desc = self._desc(**{**self.options, **overrides})
        handle = self.optimizer._handle
        with handle.lock:
            grads, gp = self._inputs(grad_weights, grad_biases, "grad")
            diag, dp = (None, None)
            if diagonal_weights is not None:
                diag, dp = self._inputs(diagonal_weights, diagonal_biases, "diagonal")
            request = handle.cg_begin(desc, gp, dp)
        return request == _lib.KFAC_CG_NEED_PRODUCT

    def vector(self) -> Arrays:
        """The vector whose product G·v the solve needs (new arrays, the step's layout)."""
        ws, bs = self._zeros()
        handle = self.optimizer._handle
        with handle.lock:
            handle.cg_get_vector(self.optimizer._layer_buffers(ws, bs, "vector_w", "vector_b"))
        return ws, bs

    def supply(self, product_weights: Sequence, product_biases: Optional[Sequence] = None) -> bool:
        """Supplies G·v (no λ, no η). A product with NaN or Inf raises ``KFAC_ERROR_NON_FINITE``
        and may be supplied again. Returns True while another product is needed."""
        handle = self.optimizer._handle
        with handle.lock:
            _, pointers = self._inputs(product_weights, product_biases, "product")
            return handle.cg_supply_product(pointers) == _lib.KFAC_CG_NEED_PRODUCT

    def finish(self) -> Tuple[List[np.ndarray], List[Optional[np.ndarray]], CGResult]:
        """Ends the solve: the step s (weights, biases) and its :class:`CGResult`."""
        ws, bs = self._zeros()
        handle = self.optimizer._handle
        with handle.lock:
            result = handle.cg_finish(self.optimizer._layer_buffers(ws, bs, "step_w", "step_b"))
        return ws, bs, CGResult._from_c(result)

    def solve(self, grad_weights: Sequence, grad_biases: Optional[Sequence],
              product: Callable[[List[np.ndarray], List[Optional[np.ndarray]]], Tuple[Sequence, Optional[Sequence]]],
              *, diagonal_weights: Optional[Sequence] = None, diagonal_biases: Optional[Sequence] = None,
              **overrides):
        """A whole solve: ``product(vector_weights, vector_biases)`` returns G·v as
        ``(weights, biases)``. Returns ``(step_weights, step_biases, CGResult)``."""
        more = self.begin(grad_weights, grad_biases, diagonal_weights=diagonal_weights,
                          diagonal_biases=diagonal_biases, **overrides)
        while more:
            vw, vb = self.vector()
            pw, pb = product(vw, vb)
            more = self.supply(pw, pb)
        return self.finish()

    def report_loss_change(self, loss_before, loss_after, step_scale: float = 1.0) -> float:
        """``kfac_cg_report_loss_change``: ρ = (after − before) / m(step_scale), m the model of
        the last finished solve without λ; adjusts λ by the Levenberg–Marquardt rule."""
        return self.optimizer._handle.cg_report_loss_change(step_scale, float(loss_before), float(loss_after))


def armijo_backtracking(loss_at: Callable[[float], float], loss_before: float, grad_dot_step: float, *,
                        eta: float = 1e-4, max_halvings: int = 30) -> Tuple[float, float]:
    """simpleNN's line search on the CG step: α = 1, ½, ¼, … until
    ``loss_at(α) − loss_before ≤ eta · α · gᵀs``. Returns ``(α, loss_at(α))`` (the last α tried
    if none is accepted within ``max_halvings``)."""
    alpha = 1.0
    for _ in range(max_halvings + 1):
        loss = float(loss_at(alpha))
        if loss - loss_before <= eta * alpha * grad_dot_step:
            return alpha, loss
        alpha *= 0.5
    return alpha * 2, loss
