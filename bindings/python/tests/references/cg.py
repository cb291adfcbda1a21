"""An independent numpy preconditioned conjugate gradient with the stopping rules of kfac.h's
"Conjugate gradient and Newton-CG" section, written from the header's text (not from the
library): x₀ = 0, r₀ = −g, y = M⁻¹ r, p₀ = y₀; each iteration α = rᵀy / pᵀAp, x += αp, r −= αAp,
φ_i = ½ gᵀx − ½ xᵀr; stop (in this order) on ‖r‖ = 0, the rule (residual: ‖r_i‖ ≤ ξ‖g‖;
relative progress: k = max(10, ⌊i/10⌋), i > k, φ_i < 0, (φ_i − φ_{i−k}) / φ_i < kε), i = the
iteration limit; a non-positive pᵀAp stops before the update."""

import numpy as np


def pcg(G, shift, g, minv=None, rule="residual", tol=None, max_iterations=250):
    """Solves (G + shift I) x = −g. ``minv`` is the diagonal M⁻¹ (None: M = I). Returns
    (x, iterations, reason, [φ_0 … φ_i])."""
    G = np.asarray(G, np.float64)
    g = np.asarray(g, np.float64)
    tol = tol if tol is not None else (0.1 if rule == "residual" else 5e-4)
    precondition = (lambda r: r) if minv is None else (lambda r: minv * r)
    x = np.zeros_like(g)
    r = -g
    gnorm = np.linalg.norm(g)
    phis = [0.0]
    if gnorm == 0:
        return x, 0, "residual", phis
    y = precondition(r)
    p = y.copy()
    ry = r @ y
    i = 0
    while True:
        ap = G @ p + shift * p
        pap = p @ ap
        if not pap > 0:
            return x, i, "non_positive_curvature", phis
        a = ry / pap
        x = x + a * p
        r = r - a * ap
        i += 1
        phi = 0.5 * (g @ x) - 0.5 * (x @ r)
        phis.append(phi)
        rn = np.linalg.norm(r)
        if rn == 0:
            return x, i, "residual", phis
        if rule == "residual" and rn <= tol * gnorm:
            return x, i, "residual", phis
        if rule == "relative_progress":
            k = max(10, i // 10)
            if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * tol:
                return x, i, "relative_progress", phis
        if i >= max_iterations:
            return x, i, "max_iterations", phis
        y = precondition(r)
        ry_new = r @ y
        p = y + (ry_new / ry) * p
        ry = ry_new


def spd(spectrum, seed):
    """Q diag(spectrum) Qᵀ with a seeded random orthogonal Q."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(spectrum), len(spectrum))))
    return (q * np.asarray(spectrum)) @ q.T


def lm_schedule(damping, rhos, decay=2 / 3):
    """λ after each report: λ·decay if ρ > 3/4, λ/decay if ρ < 1/4 (LM_INTERVAL 1)."""
    out = []
    for rho in rhos:
        if rho > 0.75:
            damping *= decay
        elif rho < 0.25:
            damping /= decay
        out.append(damping)
    return out


def pcg_in_order(G, shift, g, rule="relative_progress", tol=None, max_iterations=250):
    """``pcg`` without a preconditioner, with every sum taken left to right in float64, in the
    order of operations the header's iteration lists (q = G·p + shift·p; α = rᵀr / pᵀq;
    r_new = r − αq; φ = ½(gᵀx + α gᵀp) − ½(xᵀr_new + α pᵀr_new); x += αp; p = r_new + βp). Two
    correct CGs drift apart by rounding after about a hundred iterations; with sums in the same
    order the iterates agree bit for bit, so the iteration where a rule fires is compared exactly
    however late it comes. Returns (x, iterations, reason)."""
    G = np.asarray(G, np.float64)
    g = [float(v) for v in g]
    n = len(g)
    tol = tol if tol is not None else (0.1 if rule == "residual" else 5e-4)

    def dot(a, b):
        s = 0.0
        for i in range(n):
            s += a[i] * b[i]
        return s

    gnorm = dot(g, g) ** 0.5
    x = [0.0] * n
    r = [-v for v in g]
    p = list(r)
    ry = dot(r, r)
    phis = [0.0]
    i = 0
    while True:
        gv = (G @ np.array(p)).tolist()
        q = [gv[k] + shift * p[k] for k in range(n)]
        pap = dot(p, q)
        if not pap > 0:
            return np.array(x), i, "non_positive_curvature"
        a = ry / pap
        rn = [r[k] - a * q[k] for k in range(n)]
        gx, gp, xr, pr, rr = dot(g, x), dot(g, p), dot(x, rn), dot(p, rn), dot(rn, rn)
        phi = 0.5 * (gx + a * gp) - 0.5 * (xr + a * pr)
        i += 1
        phis.append(phi)
        rn_norm = rr ** 0.5
        reason = None
        if rn_norm == 0:
            reason = "residual"
        elif rule == "residual" and rn_norm <= tol * gnorm:
            reason = "residual"
        elif rule == "relative_progress":
            k = max(10, i // 10)
            if i > k and phi < 0 and (phi - phis[i - k]) / phi < k * tol:
                reason = "relative_progress"
        if reason is None and i >= max_iterations:
            reason = "max_iterations"
        if reason is not None:
            return np.array([x[k] + a * p[k] for k in range(n)]), i, reason
        beta = rr / ry
        x = [x[k] + a * p[k] for k in range(n)]
        p = [rn[k] + beta * p[k] for k in range(n)]
        r = rn
        ry = rr
