"""One training run of the convergence benchmark, executed in a worker process.

:func:`run_task` takes a plain dict (picklable, see :func:`make_task`) and returns a plain dict
with the training-loss curve ``[(iterations, loss, seconds), ...]`` and per-step statistics.
Methods: ``sgd`` (SGD-momentum), ``adam``, ``kfac`` (this library's KFACPreconditioner + SGD
with momentum), ``adaptive`` (KFACPreconditioner's adaptive mode: Levenberg–Marquardt λ, γ,
α/μ from the quadratic model, untuned; no learning rate) and ``peer`` (curvlinops' KFAC inverse
operator + SGD with momentum, the KL clip applied here with the formula of kfac.h). See
README.md for the protocol.

Timing: each training step — zeroing the gradients, forward, backward, every K-FAC computation
(the sampled-Fisher pass included) and the optimizer's update — is timed twice: the process's
CPU time (``time.process_time()``; a run is single-threaded, so this is the wall-clock the step
takes on a core of its own) and the wall-clock (``time.perf_counter()``, which also counts
time the core was taken by other processes). Evaluations of the whole-training-set loss are
outside both. Curve points are ``(iterations, loss, cpu_seconds, wall_seconds)``.
"""

from __future__ import annotations

import math
import os
import sys
import time
from typing import Dict, List, Optional

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from problems import MNIST1D_CNN_GROUPING, MNIST1D_PAPER_ACCURACY, REPO_ROOT, get_problem  # noqa: E402,F401

try:
    import libkfac  # noqa: E402
except ImportError:  # not installed: the bindings of this checkout
    sys.path.insert(0, os.path.join(REPO_ROOT, "bindings", "python"))
    import libkfac  # noqa: E402
from libkfac.torch import KFACPreconditioner  # noqa: E402

#: Offset of the seed of the sampled-Fisher draws from the run's seed.
FISHER_SEED_OFFSET = 1_000_003
#: A loss above this (or not finite) ends the run as diverged.
DIVERGED = 1e6

#: K-FAC settings fixed by the protocol (README.md, "Methods"); a task may override them for
#: the ablations and the peer comparison.
KFAC_DEFAULTS = dict(
    momentum=0.9,
    kl_clip=1e-2,
    factor_decay=0.95,
    factor_update_period=1,
    inverse_update_period=20,
    inverse_strategy="cholesky",
    pi_damping=True,
    fisher="sampled",
    # Convolutions (Protocol 2): KFC (Grosse & Martens 2016) or SUA, and channel grouping —
    # KFACPreconditioner's per-layer options, passed through unchanged.
    conv_approximation="kfc",
    input_group_size=0,
    output_group_size=0,
)


#: K-FAC's adaptive mode, UNTUNED: fixed settings from Martens & Grosse 2015, the same for every
#: problem (README.md, "Methods" and "Added in the adaptive-mode session"). A task may override
#: them for the adaptive ablations only.
ADAPTIVE_DEFAULTS = dict(
    damping=150.0,               # λ0 (M&G's initial λ)
    factor_damping=150.0,        # γ0: M&G's γ0 = sqrt(λ0 + η), η = 0; this library's γ is M&G's γ²
    lm_interval=5,               # T1
    lm_decay=0.95,               # ω1 per step (the library raises it to T1: (19/20)^5)
    factor_damping_period=20,    # T2 (0 = γ fixed at γ0)
    factor_damping_decay=0.95,   # ω2 = 0.95^T2 on this library's γ = M&G's sqrt(19/20)^T2 on theirs
    factor_decay=0.95,
    factor_update_period=1,
    inverse_update_period=20,    # T3
    inverse_strategy="cholesky",
    pi_damping=True,             # factored Tikhonov damping with π (M&G §6.3)
    fisher="sampled",
    qmodel_momentum=True,        # μ from the quadratic model; False = α only (ablation)
)


#: K-FAC variants for convolutions (Protocol 2, MNIST-1D CNN): method name -> the options that
#: differ from :data:`KFAC_DEFAULTS` (which uses KFC). Tuned on K-FAC's grid like "kfac".
KFAC_VARIANTS = {
    "kfac-sua": dict(conv_approximation="sua"),
    "kfac-grouped": dict(MNIST1D_CNN_GROUPING),
}


def make_task(problem, method, batch, T, eval_every, seed, lr, sparse_after=0, **options) -> Dict:
    """A run description. ``batch`` 0 means full batch. ``options``: ``momentum`` (sgd),
    ``beta1`` (adam), ``damping`` and any key of :data:`KFAC_DEFAULTS` (kfac, its variants of
    :data:`KFAC_VARIANTS`, peer), any key of :data:`ADAPTIVE_DEFAULTS` (adaptive, whose ``lr`` is
    unused: pass 0). Mini-batch runs evaluate the whole-training-set loss every ``eval_every``
    iterations, after iteration ``sparse_after`` (0 = never) every ``5 * eval_every`` only, and
    after the last (:func:`evaluates_at`)."""
    task = dict(problem=problem, method=method, batch=int(batch), T=int(T),
                eval_every=int(eval_every), seed=int(seed), lr=float(lr), sparse_after=int(sparse_after))
    if method in ("kfac", "peer", "adaptive") or method in KFAC_VARIANTS:
        merged = dict(ADAPTIVE_DEFAULTS if method == "adaptive" else KFAC_DEFAULTS)
        merged.update(KFAC_VARIANTS.get(method, {}))
        merged.update(options)
        options = merged
    task["options"] = options
    return task


def evaluates_at(k: int, task: Dict) -> bool:
    """Whether a mini-batch run evaluates the whole-training-set loss after iteration ``k``."""
    every, sparse = max(1, task["eval_every"]), task.get("sparse_after", 0)
    if k == task["T"]:
        return True
    if sparse and k > sparse:
        return k % (5 * every) == 0
    return k % every == 0


def _set_single_thread() -> None:
    torch.set_num_threads(1)


class _Batches:
    """The mini-batches of one seed: a new permutation every epoch from
    ``numpy.random.default_rng(seed)``, the last partial batch dropped; or the whole set."""

    def __init__(self, n: int, batch: int, seed: int):
        self.n = n
        self.full = batch <= 0 or batch >= n
        self.batch = n if self.full else batch
        self.rng = np.random.default_rng(seed)
        self.per_epoch = n // self.batch
        self.position = self.per_epoch  # forces a permutation at the first call
        self.permutation = None

    def next(self) -> Optional[torch.Tensor]:
        if self.full:
            return None
        if self.position == self.per_epoch:
            self.permutation = torch.from_numpy(self.rng.permutation(self.n))
            self.position = 0
        start = self.position * self.batch
        self.position += 1
        return self.permutation[start:start + self.batch]


def _full_loss(model, problem) -> float:
    model.eval()
    with torch.no_grad():
        value = problem.loss(model(problem.x), problem.target).item()
    model.train()
    return value


def _test_metrics(model, problem):
    if problem.x_test is None:
        return None
    model.eval()
    with torch.no_grad():
        logits = model(problem.x_test)
        loss = problem.loss(logits, problem.y_test).item()
        accuracy = (logits.argmax(dim=1) == problem.y_test).float().mean().item()
    model.train()
    return {"loss": loss, "accuracy": accuracy}


def _bad(value: float) -> bool:
    return not math.isfinite(value) or value > DIVERGED


# ---------------------------------------------------------------------------------------------
# Step functions: each performs one full training step and returns the loss of the batch
# (before the update).
# ---------------------------------------------------------------------------------------------


class _PlainStep:
    def __init__(self, model, optimizer, problem):
        self.model, self.optimizer, self.problem = model, optimizer, problem

    def __call__(self, x, y) -> float:
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.problem.loss(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        return loss.item()


class _KFACStep:
    """libkfac's KFACPreconditioner in front of SGD-momentum, with the sampled Fisher."""

    def __init__(self, model, optimizer, problem, options):
        self.model, self.optimizer, self.problem = model, optimizer, problem
        self.sampled = options["fisher"] == "sampled"
        self.distribution = "bernoulli" if problem.kind == "autoencoder" else "categorical"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.preconditioner = KFACPreconditioner(
            model,
            lr=lambda: optimizer.param_groups[0]["lr"],
            damping=options["damping"],
            kl_clip=options["kl_clip"],
            factor_decay=options["factor_decay"],
            factor_update_period=options["factor_update_period"],
            inverse_update_period=options["inverse_update_period"],
            inverse_strategy=options["inverse_strategy"],
            pi_damping=options["pi_damping"],
            loss_reduction="mean",
            num_threads=1,
            tridiagonal=options.get("tridiagonal", False),  # block-tridiagonal (tridiagonal_compare.py)
            curvature=options.get("curvature", "fisher"),   # KFLR / MC / KFRA (curvature_compare.py)
            mc_samples=options.get("mc_samples", 1),
            conv_approximation=options.get("conv_approximation", "kfc"),
            input_group_size=options.get("input_group_size", 0),
            output_group_size=options.get("output_group_size", 0),
        )
        self.curvature = options.get("curvature", "fisher")
        self.kl_scales: List[float] = []

    def __call__(self, x, y) -> float:
        self.optimizer.zero_grad(set_to_none=False)
        output = self.model(x)
        if self.curvature != "fisher":
            self.preconditioner.curvature_backward(output, self.distribution)
        elif self.sampled and self.preconditioner.optimizer.wants_statistics:
            # True-Fisher statistics: the hooks record this pass's output gradients (and the
            # saved inputs are consumed by it); the parameter gradients are left alone.
            self.preconditioner.sampled_fisher_backward(output, self.distribution)
        loss = self.problem.loss(output, y)
        loss.backward()
        self.preconditioner.step()
        self.optimizer.step()
        self.kl_scales.append(self.preconditioner.last_kl_scale)
        return loss.item()

    def close(self):
        self.preconditioner.close()


class _AdaptiveStep:
    """libkfac's adaptive mode (M&G 2015 §6–7): KFACPreconditioner.step() writes the directions
    D, then KFACPreconditioner.adaptive_step() chooses α and μ from the quadratic model with
    the exact Fisher (forward-mode products J·D, J·δ₀), applies θ ← θ − α·D + μ·δ₀, evaluates
    the loss again on the steps whose report adjusts λ (Levenberg–Marquardt, every lm_interval-th;
    the library's default) and, where the library has it, γ. No
    learning rate, no KL clip. Same sampled-Fisher statistics as :class:`_KFACStep`."""

    def __init__(self, model, problem, options):
        self.model, self.problem = model, problem
        self.sampled = options["fisher"] == "sampled"
        self.momentum = bool(options["qmodel_momentum"])
        self.distribution = "bernoulli" if problem.kind == "autoencoder" else "categorical"
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.preconditioner = KFACPreconditioner(
            model,
            lr=1.0,  # η of the KL clip only, which is off
            damping=options["damping"],
            kl_clip=0.0,
            factor_decay=options["factor_decay"],
            factor_update_period=options["factor_update_period"],
            inverse_update_period=options["inverse_update_period"],
            inverse_strategy=options["inverse_strategy"],
            pi_damping=options["pi_damping"],
            loss_reduction="mean",
            num_threads=1,
            lm_interval=options["lm_interval"],
            lm_decay=options["lm_decay"],
            factor_damping=options["factor_damping"],
            factor_damping_period=options["factor_damping_period"],
            factor_damping_decay=options["factor_damping_decay"],
        )
        self.alphas: List[float] = []
        self.mus: List[float] = []
        self.rhos: List[float] = []
        self.dampings: List[float] = []
        self.factor_dampings: List[float] = []

    def __call__(self, x, y) -> float:
        self.model.zero_grad(set_to_none=False)
        output = self.model(x)
        if self.sampled and self.preconditioner.optimizer.wants_statistics:
            self.preconditioner.sampled_fisher_backward(output, self.distribution)
        loss = self.problem.loss(output, y)
        loss.backward()
        self.preconditioner.step()
        result = self.preconditioner.adaptive_step(x, lambda out: self.problem.loss(out, y), self.distribution,
                                                   momentum=self.momentum)
        self.alphas.append(result.alpha)
        self.mus.append(result.mu)
        if result.loss_evaluated:  # ρ exists on the steps whose report adjusts λ (every lm_interval-th)
            self.rhos.append(result.rho)
        self.dampings.append(result.damping)
        self.factor_dampings.append(self.preconditioner.optimizer.factor_damping)
        return loss.item()

    def statistics(self) -> Dict:
        if not self.alphas:
            return {}
        finite = lambda values: [v for v in values if math.isfinite(v)]
        median = lambda values: float(np.median(finite(values))) if finite(values) else None
        every = max(1, len(self.dampings) // 50)  # λ and γ traces, at most ~50 points
        return dict(
            alpha_median=median(self.alphas), mu_median=median(self.mus), rho_median=median(self.rhos),
            damping_final=self.dampings[-1], damping_min=min(self.dampings),
            factor_damping_final=self.factor_dampings[-1],
            factor_damping_changes=int(sum(a != b for a, b in zip(self.factor_dampings, self.factor_dampings[1:]))),
            damping_trace=[(i + 1, self.dampings[i], self.factor_dampings[i])
                           for i in range(0, len(self.dampings), every)],
        )

    def close(self):
        self.preconditioner.close()


class _PeerStep:
    """curvlinops' KFAC (rebuilt from the current batch every step, Monte-Carlo Fisher with one
    sample) and its inverse with heuristic π damping, in front of SGD-momentum; the KL clip
    of kfac.h applied here."""

    def __init__(self, model, optimizer, problem, options, seed):
        from curvlinops import KFACInverseLinearOperator, KFACLinearOperator

        self.KFAC, self.KFACInverse = KFACLinearOperator, KFACInverseLinearOperator
        self.model, self.optimizer, self.problem = model, optimizer, problem
        self.options = options
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss_func = peer_loss_function(problem)
        # curvlinops' mean-reduced BCEWithLogitsLoss is the mean over examples *and* outputs,
        # so its Fisher is the problem's (summed over the C outputs) divided by C:
        # (F + λ)⁻¹ = (1/C) (F/C + λ/C)⁻¹. For the classifiers C is 1. min_damping=0: no floor
        # under the π-split dampings (curvlinops' default floor 1e-8 would change them when π
        # is large, as in the first layers of the deep autoencoders at initialisation).
        self.fisher_scale = float(problem.x.shape[1]) if problem.kind == "autoencoder" else 1.0
        self.seed = seed
        self.steps = 0
        self.kl_scales: List[float] = []
        # Parameters grouped by module, for the per-layer |<U, V>| of the KL clip.
        self.groups = [[p for p in m.parameters(recurse=False)] for m in model.modules()
                       if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]

    def directions(self, x, y, fisher_type):
        """curvlinops' K-FAC inverse applied to the current ``.grad`` of the parameters."""
        operator = self.KFAC(
            self.model, self.loss_func, self.params, [(x, y)],
            fisher_type=fisher_type, mc_samples=1, seed=self.seed * 100_003 + self.steps,
            check_deterministic=False, separate_weight_and_bias=False,
            num_data=len(x), num_per_example_loss_terms=1,
        )
        inverse = self.KFACInverse(operator, damping=self.options["damping"] / self.fisher_scale,
                                   use_heuristic_damping=True, min_damping=0.0)
        return [u.div_(self.fisher_scale) for u in inverse @ [p.grad for p in self.params]]

    def __call__(self, x, y) -> float:
        self.optimizer.zero_grad(set_to_none=False)
        loss = self.problem.loss(self.model(x), y)
        loss.backward()
        fisher = "mc" if self.options["fisher"] == "sampled" else "empirical"
        directions = self.directions(x, y, fisher)
        scale = 1.0
        kappa, lr = self.options["kl_clip"], self.optimizer.param_groups[0]["lr"]
        if kappa > 0:
            by_param = {id(p): (p.grad, u) for p, u in zip(self.params, directions)}
            total = 0.0
            for group in self.groups:
                total += abs(sum(float((by_param[id(p)][0] * by_param[id(p)][1]).sum()) for p in group))
            if total > 0:
                scale = min(1.0, math.sqrt(kappa / (lr * lr * total)))
        with torch.no_grad():
            for p, u in zip(self.params, directions):
                p.grad.copy_(u).mul_(scale)
        self.optimizer.step()
        self.kl_scales.append(scale)
        self.steps += 1
        return loss.item()


def peer_loss_function(problem):
    """The torch.nn loss module curvlinops needs, equal to the problem's loss."""
    if problem.kind == "autoencoder":
        # Mean over examples and pixels; _PeerStep rescales the curvature to the problem's loss
        # (summed over pixels), see fisher_scale.
        return torch.nn.BCEWithLogitsLoss(reduction="mean")
    return torch.nn.CrossEntropyLoss(reduction="mean")


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def _build(task, problem, model):
    method, options, lr = task["method"], task["options"], task["lr"]
    if method == "sgd":
        optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=options["momentum"])
        return _PlainStep(model, optimizer, problem)
    if method == "adam":
        optimizer = torch.optim.Adam(model.parameters(), lr=lr, betas=(options["beta1"], 0.999), eps=1e-8)
        return _PlainStep(model, optimizer, problem)
    if method == "adaptive":
        return _AdaptiveStep(model, problem, options)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=options["momentum"])
    if method == "kfac" or method in KFAC_VARIANTS:
        return _KFACStep(model, optimizer, problem, options)
    if method == "peer":
        return _PeerStep(model, optimizer, problem, options, task["seed"])
    raise ValueError(f"unknown method {method!r}")


_WARMED_UP = set()


def _warm_up_forward_ad(problem) -> None:
    """PyTorch compiles its forward-mode decompositions at their first use in a process
    (≈ 0.1 s measured): done here, once per worker process and problem, before the run is seeded
    and outside its timing, so that the adaptive mode's first run in a worker is not charged
    for it. Uses a throwaway model; the run seeds the generator afterwards."""
    if problem.name in _WARMED_UP:
        return
    from torch.func import functional_call, jvp

    model = problem.make_model()
    names = [name for name, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    with torch.no_grad():
        jvp(lambda *values: functional_call(model, dict(zip(names, values)), (problem.x[:2],)),
            params, tuple(torch.ones_like(p) for p in params))
    _WARMED_UP.add(problem.name)


def run_task(task: Dict) -> Dict:
    """Trains one model as ``task`` says; returns the curve and statistics (see module doc)."""
    _set_single_thread()
    started = time.perf_counter()
    problem = get_problem(task["problem"])
    seed, T, eval_every = task["seed"], task["T"], max(1, task["eval_every"])
    if task["method"] == "adaptive":
        _warm_up_forward_ad(problem)
    torch.manual_seed(seed)
    model = problem.make_model()
    step = _build(task, problem, model)
    torch.manual_seed(seed + FISHER_SEED_OFFSET)  # the sampled-Fisher draws only
    batches = _Batches(problem.size, task["batch"], seed)

    curve = []          # (iterations done, whole-training-set loss, CPU seconds, wall seconds)
    cpu_times, wall_times = [], []
    cpu, wall = 0.0, 0.0
    diverged, error = False, None
    if not batches.full:
        curve.append((0, _full_loss(model, problem), 0.0, 0.0))
    k = 0
    try:
        while k < T:
            index = batches.next()
            x = problem.x if index is None else problem.x[index]
            y = problem.target if index is None else problem.target[index]
            w0, c0 = time.perf_counter(), time.process_time()
            batch_loss = step(x, y)
            c1, w1 = time.process_time(), time.perf_counter()
            if batches.full:  # the step's own forward pass measured the whole set
                curve.append((k, batch_loss, cpu, wall))
            cpu += c1 - c0
            wall += w1 - w0
            cpu_times.append(c1 - c0)
            wall_times.append(w1 - w0)
            k += 1
            if _bad(batch_loss):
                diverged = True
                break
            if not batches.full and evaluates_at(k, task):
                value = _full_loss(model, problem)
                curve.append((k, value, cpu, wall))
                if _bad(value):
                    diverged = True
                    break
    except libkfac.KFACError as exc:  # e.g. a factorisation failing on non-finite statistics
        diverged, error = True, str(exc)
    if not diverged:
        final = _full_loss(model, problem)
        if batches.full:
            curve.append((k, final, cpu, wall))
        diverged = _bad(final)
    else:
        final = float("inf")
    milliseconds = lambda values, f: 1e3 * float(f(values)) if values else None
    result = dict(
        task=task,
        curve=[(int(i), float(v) if math.isfinite(v) else None, float(c), float(w)) for i, v, c, w in curve],
        final_loss=float("inf") if diverged else final,
        diverged=diverged,
        error=error,
        steps=k,
        examples=problem.size,
        step_ms_median=milliseconds(cpu_times, np.median),
        step_ms_mean=milliseconds(cpu_times, np.mean),
        wall_step_ms_median=milliseconds(wall_times, np.median),
        wall_step_ms_mean=milliseconds(wall_times, np.mean),
        train_seconds=cpu,
        train_wall_seconds=wall,
        wall_seconds=time.perf_counter() - started,
        test=None if diverged else _test_metrics(model, problem),
    )
    if isinstance(step, _AdaptiveStep):
        result["adaptive"] = step.statistics()
    scales = getattr(step, "kl_scales", None)
    if scales:
        result["kl_scale_median"] = float(np.median(scales))
        result["kl_clipped_fraction"] = float(np.mean(np.asarray(scales) < 1.0))
    if hasattr(step, "close"):
        step.close()
    return result


# ---------------------------------------------------------------------------------------------
# Checks and calibration run in worker processes
# ---------------------------------------------------------------------------------------------


def _directions_both(problem, dtype, damping: float, batch: int, seed: int):
    """This library's and curvlinops' directions for one batch of ``problem`` in ``dtype``."""
    torch.manual_seed(seed)
    model = problem.make_model().to(dtype)
    x = problem.x[:batch].to(dtype)
    y = problem.target[:batch]
    y = y.to(dtype) if y.is_floating_point() else y
    options = dict(KFAC_DEFAULTS, damping=damping, kl_clip=0.0, factor_decay=0.0,
                   inverse_update_period=1, fisher="empirical")
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)  # lr is not used: no step is taken
    ours = _KFACStep(model, optimizer, problem, options)
    optimizer.zero_grad()
    problem.loss(model(x), y).backward()
    gradients = [p.grad.clone() for p in model.parameters()]
    ours.preconditioner.step()
    mine = [p.grad.detach().clone().double() for p in model.parameters()]
    ours.close()
    for p, g in zip(model.parameters(), gradients):
        p.grad.copy_(g)
    theirs = [u.double() for u in _PeerStep(model, optimizer, problem, options, seed).directions(x, y, "empirical")]
    return mine, theirs


def peer_direction_check(problem_name: str, damping: float, batch: int = 256, seed: int = 0) -> Dict:
    """On one batch, with the empirical Fisher (no sampling), factors of that batch only,
    Cholesky + π damping and no KL clip, compares this library's direction with curvlinops'
    in float64 (where they must agree to rounding) and float32 (what the benchmark runs):
    ``‖ours − theirs‖ / ‖theirs‖`` over all parameters, and the cosine in float32."""
    _set_single_thread()
    problem = get_problem(problem_name)
    result = dict(problem=problem_name, damping=damping, batch=batch)
    for dtype, suffix in ((torch.float64, "f64"), (torch.float32, "f32")):
        mine, theirs = _directions_both(problem, dtype, damping, batch, seed)
        difference = math.sqrt(sum(float(((a - b) ** 2).sum()) for a, b in zip(mine, theirs)))
        norm_mine = math.sqrt(sum(float((a * a).sum()) for a in mine))
        norm_theirs = math.sqrt(sum(float((b * b).sum()) for b in theirs))
        result[f"relative_difference_{suffix}"] = difference / norm_theirs
        result[f"cosine_{suffix}"] = float(sum(float((a * b).sum()) for a, b in zip(mine, theirs))) / (norm_mine * norm_theirs)
    return result


def step_timing(problem_name: str, batch: int, method: str, steps: int, torch_threads: int,
                kfac_threads: int = 1) -> Dict:
    """Median time of ``steps`` training steps (after 3 warm-up steps) for the thread table."""
    torch.set_num_threads(torch_threads)
    problem = get_problem(problem_name)
    torch.manual_seed(0)
    model = problem.make_model()
    options = dict(KFAC_DEFAULTS, damping=1e-1, momentum=0.9, beta1=0.9)
    task = dict(method=method, options=options, lr=1e-3, seed=0)
    step = _build(task, problem, model)
    if isinstance(step, _KFACStep):
        step.preconditioner.num_threads = kfac_threads
    torch.manual_seed(FISHER_SEED_OFFSET)
    batches = _Batches(problem.size, batch, 0)
    times = []
    for i in range(steps + 3):
        index = batches.next()
        x = problem.x if index is None else problem.x[index]
        y = problem.target if index is None else problem.target[index]
        t0 = time.perf_counter()
        step(x, y)
        if i >= 3:
            times.append(time.perf_counter() - t0)
    if hasattr(step, "close"):
        step.close()
    return dict(problem=problem_name, batch=batch, method=method, torch_threads=torch_threads,
                kfac_threads=kfac_threads, openblas_threads=os.environ.get("OPENBLAS_NUM_THREADS"),
                step_ms_median=1e3 * float(np.median(times)), steps=steps)
