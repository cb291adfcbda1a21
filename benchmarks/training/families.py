#!/usr/bin/env python3
"""Convergence rows of the curvature families (issues 9–11) inside the benchmark protocol.

    python3 benchmarks/training/families.py [--profile smoke|default|digits|full] [--workers 2]
                                            [--main-run PATH] [--out DIR]

Protocol: benchmarks/training/README.md, "Families (issues 9–11)". Three groups of rows, each on
the problems, seeds (0–4), batches and budgets of the main run (run.py), whose
``training_raw.json`` gives L* and the tuned K-FAC / SGD-momentum / Adam configurations:

- Newton-CG (``libkfac.torch.NewtonCG``) with no, diagonal and K-FAC preconditioning, full batch,
  beside the main run's K-FAC, SGD-momentum and Adam runs of the profile's reference setting
  (batch 256 in the default and digits profiles, whose main runs have no full-batch setting:
  compare CPU seconds, not iterations; full batch in ``--profile full``);
- the output-factor curvatures (sampled Fisher, KFLR, KFRA, Monte-Carlo with one sample) and
  EKFAC against the eigen strategy, at the main run's mini-batch setting, with the tuned K-FAC lr
  and λ of the problem and its K-FAC budget T_K;
- block-tridiagonal against block-diagonal (Cholesky + π) K-FAC, same setting and configuration.

Runs execute in worker processes of one thread each (two by default, like run.py). Writes
DIR/families.md and DIR/families_raw.json (DIR: benchmarks/results; the smoke profile writes into
a temporary directory so that it never overwrites the committed results).
"""

from __future__ import annotations

import os

# One thread per run, set before numpy, torch or libkfac load OpenBLAS/OpenMP (as run.py does);
# the worker processes inherit it.
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results")
sys.path.insert(0, HERE)

from report import median  # noqa: E402  (+∞ counts as a value, as in the main report)

INF = math.inf
FULL = 0  # the main run's batch key of a full-batch setting

# ---------------------------------------------------------------------------------------------
# Protocol constants (README.md, "Families (issues 9–11)"), declared before any run
# ---------------------------------------------------------------------------------------------

#: Newton-CG preconditioners.
PRECONDITIONERS = ("none", "diagonal", "kfac")
NEWTON_NAMES = {"none": "no preconditioner", "diagonal": "diagonal preconditioner (Martens 2010)",
                "kfac": "K-FAC preconditioner"}
#: Newton-CG's own hyperparameter: the initial λ of the Levenberg–Marquardt rule, chosen on seed 0
#: by the final training loss (the main protocol's criterion), per problem and preconditioner.
NEWTON_DAMPING_GRID = (1e-2, 1.0, 1e2)
#: simpleNN's settings, fixed: curvature batch fraction, residual rule ξ, CG cap, LM factors.
NEWTON_FIXED = dict(curvature_fraction=0.05, tolerance=0.1, max_iterations=250, lm_decay=2 / 3, lm_interval=1)

#: Output-factor curvature and inverse-strategy variants: name -> option overrides of the tuned
#: K-FAC (trainers.KFAC_DEFAULTS: Cholesky + π, sampled Fisher, inverses every 20 steps).
CURVATURE_VARIANTS = [
    ("Fisher (sampled; = the main K-FAC)", {}),
    ("KFLR", dict(curvature="kflr")),
    ("KFRA", dict(curvature="kfra")),
    ("MC, 1 sample", dict(curvature="mc", mc_samples=1)),
    ("eigen (exact damping)", dict(inverse_strategy="eigen")),
    ("EKFAC", dict(inverse_strategy="ekfac")),
]
BASELINE = CURVATURE_VARIANTS[0][0]
TRIDIAGONAL = ("block-tridiagonal (Cholesky + π on the diagonal factors)", dict(tridiagonal=True))

#: Protocol 2's default profile (README.md, "Adapted to Protocol 2"): the K-FAC rows at batch 256
#: for the main run's T_K of each problem; Newton-CG (full-batch gradient, 5 % curvature batch) on
#: both autoencoders for a fixed number of Newton iterations, set against the batch-256 runs.
PROFILES = {
    "default": dict(
        seeds=5,
        newton=dict(problems=["ae-digits", "ae-mnist"], iterations={"ae-digits": 50, "ae-mnist": 20},
                    reference_batch=256),
        families=dict(problems=["ae-digits", "mlp-mnist1d", "cnn-mnist1d"], batch=256),
        tridiagonal=dict(problems=["ae-digits", "ae-mnist", "mlp-mnist1d"], batch=256),
        T_cap=None,
        newton_note=None,
        omitted=["ae-mnist in the curvature rows (KFLR on 784 outputs costs 784 backward columns per example): "
                 "`--profile full`; mlp-digits and cnn-digits (Newton-CG, curvature and tridiagonal rows): "
                 "`--profile digits` (`make bench-digits`)"],
    ),
    "smoke": dict(
        seeds=2,
        newton=dict(problems=["mlp-digits"], iterations={"mlp-digits": 3}, reference_batch=FULL),
        families=dict(problems=["ae-digits"], batch=256),
        tridiagonal=dict(problems=["ae-digits"], batch=256),
        T_cap=20,
        omitted=["everything else (smoke profile: plumbing only, nothing to read)"],
    ),
}
#: The digits profile: the rows the default profile omits, on ``run.py --profile digits``'s run
#: (benchmarks/results/digits/training_raw.json; results written beside it): Newton-CG on the
#: digits classifiers (against their batch-256 setting, as the default profile's ae-digits row),
#: the curvature rows on the classifiers and the block-tridiagonal row of the plain
#: (non-residual) digits MLP.
PROFILES["digits"] = dict(
    PROFILES["default"],
    newton=dict(problems=["mlp-digits", "cnn-digits"], iterations={"mlp-digits": 40, "cnn-digits": 40},
                reference_batch=256),
    families=dict(problems=["mlp-digits", "cnn-digits"], batch=256),
    tridiagonal=dict(problems=["mlp-digits"], batch=256),
    newton_note=None,
    omitted=["the default profile's rows (`make bench-families`); ae-mnist at full batch (`--profile full`)"],
    out="digits",
)
PROFILES["full"] = dict(
    PROFILES["default"],
    newton=dict(problems=["ae-digits", "mlp-digits", "cnn-digits", "ae-mnist"],
                iterations={"ae-digits": 50, "mlp-digits": 40, "cnn-digits": 40, "ae-mnist": 20},
                reference_batch=FULL),
    families=dict(problems=["mlp-digits", "cnn-digits", "ae-digits", "ae-mnist", "mlp-mnist1d", "cnn-mnist1d"],
                  batch=256),
    tridiagonal=dict(problems=["mlp-digits", "ae-digits", "ae-mnist", "mlp-mnist1d"], batch=256),
    newton_note=None,
    omitted=[],
)


# ---------------------------------------------------------------------------------------------
# The main run's results
# ---------------------------------------------------------------------------------------------


def _loss(value) -> float:
    return INF if value is None else float(value)




def read_main_run(path: str, needed) -> dict:
    """L*, budgets, tuned configurations and runs of the main run's settings ``needed``
    ((problem, batch) pairs, batch 0 = full) from run.py's ``training_raw.json``: the only place
    this driver reads that file. Exits with a clear message if the file or a setting is missing."""
    if not os.path.exists(path):
        raise SystemExit(f"families.py: {path} not found. These rows take L* and the tuned configurations "
                         "from the main run: run `make bench-train` (or `python3 benchmarks/training/run.py "
                         "[--profile ...]`) first, or pass --main-run PATH.")
    with open(path) as file:
        raw = json.load(file)
    settings = {}
    for entry in raw.get("settings", []):
        settings.setdefault((entry["problem"], int(entry["batch"])), {})[entry["method"]] = entry
    label = lambda key: f"{key[0]} at batch {'full' if key[1] == FULL else key[1]}"
    missing = [label(key) for key in needed
               if key not in settings or any(m not in settings[key] for m in ("sgd", "adam", "kfac"))]
    if missing:
        raise SystemExit(f"families.py: {path} (profile {raw.get('profile')!r}) has no tuned SGD-momentum / Adam / "
                         f"K-FAC results for {', '.join(missing)}. Run run.py with a profile that has them "
                         "(`--profile full` for ae-mnist at full batch), or choose a smaller --profile here.")
    out = {}
    for key in needed:
        methods = settings[key]
        sgd, kfac = methods["sgd"], methods["kfac"]
        out[key] = dict(
            problem=key[0], batch=key[1], T=int(sgd["T"]), eval_every=int(sgd["eval_every"]),
            # K-FAC's own budget and evaluation points (Protocol 2's T_K; = T under Protocol 1)
            T_K=int(kfac["T"]), eval_every_K=int(kfac["eval_every"]), sparse_after_K=int(kfac.get("sparse_after", 0)),
            L_star=median([_loss(r["final_loss"]) for r in sgd["runs"]]),
            tuned={m: dict(methods[m]["best"]) for m in ("sgd", "adam", "kfac")},
            runs={m: methods[m]["runs"] for m in ("sgd", "adam", "kfac")},
        )
    out["_meta"] = dict(path=path, profile=raw.get("profile"), machine=raw.get("machine", {}))
    return out


def reach(curve, target: float):
    """(iterations, CPU seconds) at the first curve point with loss ≤ target, or (∞, ∞)."""
    for point in curve:
        iterations, loss, cpu = point[0], point[1], point[2]
        if loss is not None and loss <= target:
            return float(iterations), float(cpu)
    return INF, INF


# ---------------------------------------------------------------------------------------------
# Newton-CG trainer (runs in a worker process)
# ---------------------------------------------------------------------------------------------


def run_newton(task: dict) -> dict:
    """Newton-CG on the whole training set of ``task['problem']``: the gradient and loss on every
    example, G·v (Gauss-Newton, torch.func) on a curvature batch of ⌈5%⌉ of it (a new slice of a
    permutation from ``numpy.random.default_rng(seed)`` each iteration, simpleNN's cycling), LM
    damping from ``task['damping']``, Armijo backtracking. With the K-FAC preconditioner its
    statistics are the sampled Fisher of the curvature batch, inverses every iteration (eigen
    strategy, λ shared with the LM rule). Everything of an iteration is inside the CPU timing."""
    import numpy as np
    import torch

    import trainers
    from libkfac.torch import KFACPreconditioner, NewtonCG

    torch.set_num_threads(1)
    started = time.perf_counter()
    problem = trainers.get_problem(task["problem"])
    seed, kind, iterations = task["seed"], task["preconditioner"], task["iterations"]
    distribution = "bernoulli" if problem.kind == "autoencoder" else "categorical"
    _warm_up_newton(problem, kind)
    torch.manual_seed(seed)
    model = problem.make_model()
    torch.manual_seed(seed + trainers.FISHER_SEED_OFFSET)  # the sampled-Fisher draws only
    x, target, loss_fn = problem.x, problem.target, problem.loss
    n = x.shape[0]
    size = math.ceil(NEWTON_FIXED["curvature_fraction"] * n)
    rng = np.random.default_rng(seed)
    kfac = None
    if kind == "kfac":
        kfac = KFACPreconditioner(model, damping=task["damping"], inverse_strategy="eigen", factor_decay=0.95,
                                  factor_update_period=0, inverse_update_period=0, num_threads=1,
                                  loss_reduction="mean", input_shapes=_conv_input_shapes(model, x[:1]))
    ncg = NewtonCG(model, preconditioner=kfac if kfac is not None else (None if kind == "none" else "diagonal"),
                   damping=task["damping"], lm_decay=NEWTON_FIXED["lm_decay"],
                   lm_interval=NEWTON_FIXED["lm_interval"], tolerance=NEWTON_FIXED["tolerance"],
                   max_iterations=NEWTON_FIXED["max_iterations"])
    with torch.no_grad():
        initial = float(loss_fn(model(x), target))
    curve = [(0, initial, 0.0, 0.0)]
    cg_iterations, step_cpu = [], []
    cpu = wall = 0.0
    order, cursor = rng.permutation(n), 0
    diverged, error = False, None
    for k in range(1, iterations + 1):
        if cursor + size > n:
            order, cursor = rng.permutation(n), 0
        subset = torch.from_numpy(order[cursor:cursor + size])
        cursor += size
        c0, w0 = time.process_time(), time.perf_counter()
        try:
            if kfac is not None:
                out = model(x[subset])
                kfac.sampled_fisher_backward(out, distribution)
                kfac.optimizer.update_factors()
                kfac.optimizer.update_inverses()
            result = ncg.step(x, target, loss_fn, curvature_indices=subset)
        except trainers.libkfac.KFACError as exc:
            diverged, error = True, str(exc)
            break
        c1, w1 = time.process_time(), time.perf_counter()
        cpu += c1 - c0
        wall += w1 - w0
        step_cpu.append(c1 - c0)
        cg_iterations.append(int(result.cg.iterations))
        curve.append((k, float(result.loss_after), cpu, wall))
        if not math.isfinite(result.loss_after) or result.loss_after > trainers.DIVERGED:
            diverged = True
            break
    final = curve[-1][1] if not diverged else INF
    if kfac is not None:
        kfac.close()
    return dict(task=task, curve=curve, final_loss=final, diverged=diverged, error=error,
                cg_iterations=cg_iterations, step_ms_mean=1e3 * float(np.mean(step_cpu)) if step_cpu else None,
                train_seconds=cpu, wall_seconds=time.perf_counter() - started)


_WARMED_UP = set()


def _warm_up_newton(problem, kind) -> None:
    """PyTorch compiles torch.func's linearize / jvp / vmap paths at their first use in a process
    (measured: the first Newton step of a worker 3–6× slower than the next): one untimed Newton
    step on a throwaway model, once per worker process, problem and preconditioner, before the
    run is seeded."""
    import torch

    from libkfac.torch import KFACPreconditioner, NewtonCG

    if (problem.name, kind) in _WARMED_UP:
        return
    model = problem.make_model()
    subset = torch.arange(8)
    kfac = None
    if kind == "kfac":
        kfac = KFACPreconditioner(model, damping=1.0, inverse_strategy="eigen", factor_update_period=0,
                                  inverse_update_period=0, num_threads=1, loss_reduction="mean",
                                  input_shapes=_conv_input_shapes(model, problem.x[:1]))
        kfac.sampled_fisher_backward(model(problem.x[subset]),
                                     "bernoulli" if problem.kind == "autoencoder" else "categorical")
        kfac.optimizer.update_factors()
        kfac.optimizer.update_inverses()
    ncg = NewtonCG(model, preconditioner=kfac if kfac is not None else (None if kind == "none" else "diagonal"),
                   max_iterations=2)
    ncg.step(problem.x[:64], problem.target[:64], problem.loss, curvature_indices=subset)
    if kfac is not None:
        kfac.close()
    _WARMED_UP.add((problem.name, kind))


def _conv_input_shapes(model, example):
    """{module: (H, W)} of every Conv2d's input, from one forward pass of one example: NewtonCG
    registers the K-FAC layers before any training forward pass has run, so the convolutions'
    spatial sizes must be given (KFACPreconditioner's ``input_shapes``)."""
    import torch

    shapes, handles = {}, []
    for module in model.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles.append(module.register_forward_pre_hook(
                lambda m, inputs: shapes.__setitem__(m, tuple(inputs[0].shape[-2:]))))
    with torch.no_grad():
        model(example)
    for handle in handles:
        handle.remove()
    return shapes or None


def execute(task: dict) -> dict:
    """Worker entry point: a Newton-CG run, or a K-FAC run of trainers.run_task. A configuration
    the integration refuses (KFRA on a convolution) comes back as ``unsupported`` with its message."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
    import trainers

    if task.get("kind") == "newton":
        return run_newton(task)
    try:
        return trainers.run_task(task)
    except ValueError as exc:
        return dict(task=task, unsupported=str(exc))


# ---------------------------------------------------------------------------------------------
# Scheduling
# ---------------------------------------------------------------------------------------------


def newton_task(problem, kind, seed, damping, iterations):
    return dict(kind="newton", problem=problem, preconditioner=kind, seed=seed, damping=damping,
                iterations=iterations)


def kfac_task(trainers, setting, seed, overrides, T_cap):
    """A K-FAC run of trainers.run_task at the main run's setting (batch, K-FAC budget T_K and its
    evaluation points) with the tuned K-FAC lr and λ of that setting and ``overrides`` of the variant."""
    tuned = setting["tuned"]["kfac"]
    T = setting["T_K"] if T_cap is None else min(T_cap, setting["T_K"])
    eval_every = min(setting["eval_every_K"], T)
    return trainers.make_task(setting["problem"], "kfac", setting["batch"], T, eval_every, seed, tuned["lr"],
                              sparse_after=setting["sparse_after_K"], damping=tuned["damping"], **overrides)


#: Rough single-core seconds per step (ordering and the ETA only): Newton-CG per Newton step,
#: and a factor on the K-FAC step for the variants. Measured on the 2-core AMD EPYC VM: K-FAC CPU
#: ms per step at batch 256 from the default run.py run of 2026-12-07 (ae-*, *-mnist1d), the
#: Newton seconds per iteration and the variants' step ratios from the first full default
#: families run (same day); the digits classifiers (not in those runs): the earlier machine's
#: figures × 3, the factor by which the others changed.
_NEWTON_SECONDS = {"ae-digits": 0.47, "mlp-digits": 0.36, "cnn-digits": 0.9, "ae-mnist": 2.3}
_KFAC_STEP_MS = {"ae-digits": 9.0, "mlp-digits": 7.5, "cnn-digits": 24.0, "ae-mnist": 86.0, "mlp-mnist1d": 4.9,
                 "cnn-mnist1d": 18.8}
_VARIANT_FACTOR = {"kflr": 3.0, "kfra": 2.45, "mc": 1.15, "ekfac": 1.34, "eigen": 1.06, "tridiagonal": 1.5}
_KFLR_FACTOR = {"ae-digits": 7.15, "ae-mnist": 100.0}


def estimated_seconds(task) -> float:
    if task.get("kind") == "newton":
        return task["iterations"] * _NEWTON_SECONDS.get(task["problem"], 1.0)
    options = task["options"]
    factor = 1.0
    for key in (options.get("curvature"), options.get("inverse_strategy"),
                "tridiagonal" if options.get("tridiagonal") else None):
        factor *= _KFLR_FACTOR.get(task["problem"], _VARIANT_FACTOR["kflr"]) if key == "kflr" \
            else _VARIANT_FACTOR.get(key, 1.0)
    return task["T"] * _KFAC_STEP_MS.get(task["problem"], 10.0) * factor / 1e3


def describe(task) -> str:
    if task.get("kind") == "newton":
        return f"{task['problem']} Newton-CG {task['preconditioner']} λ0={task['damping']:g} seed {task['seed']}"
    o = task["options"]
    variant = o.get("curvature", "fisher") + ("/tridiagonal" if o.get("tridiagonal") else "") + \
        f"/{o.get('inverse_strategy')}"
    return f"{task['problem']}/{task['batch']} {variant} seed {task['seed']}"


def run_all(initial_tasks, follow_up, workers):
    """Runs ``initial_tasks`` ([(key, task)]) longest first on a pool of ``workers`` processes;
    ``follow_up(key, result)`` may return more (key, task) pairs, scheduled as they come.
    Returns [(key, result)] in completion order."""
    ready = list(initial_tasks)
    done_results = []
    context = multiprocessing.get_context("spawn")
    in_flight = {}
    started = time.perf_counter()
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        while ready or in_flight:
            ready.sort(key=lambda entry: -estimated_seconds(entry[1]))
            while ready and len(in_flight) < workers:
                key, task = ready.pop(0)
                in_flight[pool.submit(execute, task)] = (key, task)
            finished, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for future in finished:
                key, task = in_flight.pop(future)
                result = future.result()
                done_results.append((key, result))
                left = sum(estimated_seconds(t) for _, t in ready) / workers
                print(f"[{time.perf_counter() - started:6.0f} s] done {describe(task)}"
                      f"{' (unsupported)' if 'unsupported' in result else ''}; {len(ready)} queued, "
                      f"~{left:.0f} s left", file=sys.stderr, flush=True)
                ready.extend(follow_up(key, result))
    return done_results


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------


def fmt(value, digits=4) -> str:
    if value is None:
        return "–"
    if value == INF:
        return "∞"
    if abs(value) >= 1000 or (abs(value) < 1e-3 and value != 0):
        return f"{value:.3g}"
    return f"{value:.{digits}g}"


def spread(values, digits=4) -> str:
    """median [min–max] (+ how many are ∞)."""
    text = fmt(median(values), digits)
    if len(values) > 1:
        text += f" [{fmt(min(values), digits)}–{fmt(max(values), digits)}]"
    infinite = sum(v == INF for v in values)
    if infinite:
        text += f" ({infinite}/{len(values)} ∞)"
    return text


def summarise(runs, target):
    finals = [_loss(r["final_loss"]) for r in runs]
    reached = [reach(r["curve"], target) for r in runs]
    steps = [r["step_ms_mean"] for r in runs if r.get("step_ms_mean") is not None]
    return dict(final=spread(finals), iterations=spread([i for i, _ in reached]),
                seconds=spread([s for _, s in reached], 3),
                step_ms=fmt(statistics.median(steps), 3) if steps else "–",
                iterations_median=median([i for i, _ in reached]), seconds_median=median([s for _, s in reached]))


def newton_section(raw, main) -> list:
    lines = ["## Newton-CG (issue 9)", "",
             f"Full batch. Newton-CG rows: this run, seeds 0–{raw['seeds'] - 1} at the initial λ chosen on seed 0 from "
             f"{{{', '.join(f'{d:g}' for d in NEWTON_DAMPING_GRID)}}} (final training loss); iterations are "
             "Newton iterations. SGD-momentum / Adam / K-FAC rows: the main run's tuned full-batch runs "
             "(same seeds, initial weights and data; timed in that run, not this one). CG iterations per "
             "Newton step: mean, median and max over every step of every seed.", "",
             "| problem | method | λ0 / tuned configuration | final training loss | iterations to L* | CPU s to L* "
             "| ms per iteration (CPU, median of seed means) | CG iterations per Newton step (mean, median, max) |",
             "|---|---|---|---|---|---|---|---|"]
    cg_rows = []
    reference = raw.get("newton_reference_batch", FULL)
    if reference != FULL:
        lines[2] = lines[2].replace(
            "SGD-momentum / Adam / K-FAC rows: the main run's tuned full-batch runs",
            f"SGD-momentum / Adam / K-FAC rows and L*: the main run's tuned runs at batch {reference} — "
            "a Newton iteration takes the whole training set, so its iterations do not compare with theirs; "
            "the CPU seconds do")
    for problem, block in raw["newton"].items():
        setting = main[(problem, reference)]
        target = setting["L_star"]
        lines.append(f"| **{problem}** (L* = {fmt(target)}, main run T = {setting['T']}) | | | | | | | |")
        for method, name in (("sgd", "SGD-momentum"), ("adam", "Adam"), ("kfac", "K-FAC (libkfac)")):
            s = summarise(setting["runs"][method], target)
            config = ", ".join(f"{k} {fmt(v, 3)}" for k, v in setting["tuned"][method].items())
            lines.append(f"| | {name} (main run) | {config} | {s['final']} | {s['iterations']} | {s['seconds']} "
                         f"| {s['step_ms']} | |")
        for kind in PRECONDITIONERS:
            entry = block[kind]
            runs = entry["runs"]
            s = summarise(runs, target)
            cg = [c for r in runs for c in r["cg_iterations"]]
            cg_text = f"{statistics.mean(cg):.1f}, {statistics.median(cg):g}, {max(cg)}" if cg else "–"
            cg_rows.append((problem, kind, statistics.mean(cg) if cg else None))
            lines.append(f"| | Newton-CG, {NEWTON_NAMES[kind]} | λ0 {entry['damping']:g} "
                         f"| {s['final']} | {s['iterations']} | {s['seconds']} | {s['step_ms']} | {cg_text} |")
    lines.append("")
    lines.append("Newton-CG's λ0 grid on seed 0 (final training loss; the chosen one in bold):")
    lines.append("")
    for problem, block in raw["newton"].items():
        for kind in PRECONDITIONERS:
            grid = block[kind]["grid"]
            cells = [(f"**{d:g}: {fmt(_loss(v))}**" if d == block[kind]["damping"] else f"{d:g}: {fmt(_loss(v))}")
                     for d, v in grid]
            lines.append(f"- {problem}, {kind}: " + ", ".join(cells))
    lines.append("")
    verdict = []
    for problem in raw["newton"]:
        means = {k: m for p, k, m in cg_rows if p == problem}
        if means.get("kfac") is not None and means.get("none") is not None:
            ratio = means["kfac"] / means["none"] if means["none"] else INF
            block = raw["newton"][problem]
            dampings = " / ".join(f"{block[k]['damping']:g}" for k in PRECONDITIONERS)
            verdict.append(f"{problem}: K-FAC {means['kfac']:.1f} against none {means['none']:.1f} "
                           f"(diagonal {means['diagonal']:.1f}), {ratio:.2f}× — "
                           f"{'cut' if ratio < 0.9 else ('about the same' if ratio <= 1.1 else 'more')} "
                           f"(λ0 none / diagonal / K-FAC: {dampings})")
    lines.append("Does K-FAC preconditioning cut the CG iterations per Newton step? Mean CG iterations: "
                 + "; ".join(verdict) + ". Each preconditioner runs at its own chosen λ0 and the LM rule moves λ, "
                 "and a smaller λ needs more CG iterations, so where the λ0 differ the comparison is not at equal "
                 "damping.")
    lines.append("")
    return lines


def variants_section(title, intro, raw_rows, main, names) -> list:
    lines = [title, "", intro, "",
             "| problem, batch | variant | final training loss | iterations to L* | CPU s to L* "
             "| ms per step (CPU, median of seed means) | step cost / the Fisher (Cholesky) row's |",
             "|---|---|---|---|---|---|---|"]
    for problem, rows in raw_rows.items():
        setting = main[(problem, rows["batch"])]
        target = setting["L_star"]
        tuned = setting["tuned"]["kfac"]
        lines.append(f"| **{problem}, batch {rows['batch'] or 'full'}** (L* = {fmt(target)}, SGD-momentum "
                     f"after T = {setting['T']}; K-FAC budget T_K = {rows['T']}; K-FAC lr {fmt(tuned['lr'], 3)}, λ {fmt(tuned['damping'], 3)}) | | | | | | |")
        base = rows["variants"].get(BASELINE)
        base_ms = statistics.median([r["step_ms_mean"] for r in base]) if base else None
        for name in names:
            runs = rows["variants"].get(name)
            if runs is None:
                continue
            refused = [r["unsupported"] for r in runs if "unsupported" in r]
            if refused:
                lines.append(f"| | {name} | refused: {refused[0]} | | | | |")
                continue
            s = summarise(runs, target)
            ms = statistics.median([r["step_ms_mean"] for r in runs])
            ratio = f"{ms / base_ms:.2f}×" if base_ms else "–"
            lines.append(f"| | {name} | {s['final']} | {s['iterations']} | {s['seconds']} | {s['step_ms']} | {ratio} |")
    lines.append("")
    for problem, rows in raw_rows.items():
        base, mc = rows["variants"].get(BASELINE), rows["variants"].get("MC, 1 sample")
        if base and mc and all("unsupported" not in r for r in mc) and \
                [r["final_loss"] for r in base] == [r["final_loss"] for r in mc]:
            lines.append(f"{problem}: the MC (1 sample) runs end at bit-identical losses to the Fisher runs on every "
                         "seed — the same seeded sampler gives the same draws, and one column recorded as a factor "
                         "is the recorded gradient: a consistency check of the two paths, not a second data point.")
            lines.append("")
    return lines


def write_report(raw, main, path):
    machine = raw["machine"]
    lines = ["# Curvature families in the convergence benchmark (issues 9–11)", ""]
    if raw.get("note"):
        lines += [f"**{raw['note']}**", ""]
    lines += [
             f"Profile `{raw['profile']}`, {raw['workers']} worker processes of one thread, seeds 0–{raw['seeds'] - 1}. "
             f"Protocol: `benchmarks/training/README.md`, \"Families (issues 9–11)\". L*, budgets and the tuned "
             f"configurations come from the main run `{os.path.relpath(main['_meta']['path'], REPO_ROOT)}` "
             f"(profile `{main['_meta']['profile']}`, libkfac commit "
             f"{main['_meta']['machine'].get('libkfac_commit', '?')}).", "",
             f"Machine: {machine['cpu']}, {machine['cores']} cores, load average {machine['load_start']} at the start "
             f"and {machine['load_end']} at the end; Python {machine['python']}, torch {machine['torch']}, numpy "
             f"{machine['numpy']}, libkfac {machine['libkfac']} (commit {machine['commit']}"
             f"{', with local changes' if machine['dirty'] else ''}); {machine['date']}; runtime "
             f"{raw['runtime_seconds'] / 60:.1f} min.", ""]
    cpu = wall = 0.0
    for block in raw["newton"].values():
        for entry in block.values():
            for run in entry["runs"]:
                cpu, wall = cpu + run["curve"][-1][2], wall + run["curve"][-1][3]
    for group in (raw["curvatures"], raw["tridiagonal"]):
        for rows in group.values():
            for runs in rows["variants"].values():
                for run in runs:
                    if "unsupported" not in run:
                        cpu, wall = cpu + run["train_seconds"], wall + run["train_wall_seconds"]
    if cpu > 0:
        lines += [f"Wall-clock / CPU time of the timed steps over all runs: {wall / cpu:.2f} (1.0 = each run had "
                  "its core to itself; more = other processes took the cores, which the CPU seconds do not count).",
                  ""]
    if raw.get("newton_note"):
        lines += [raw["newton_note"], ""]
    if raw["omitted"]:
        lines += ["Not in this profile: " + "; ".join(raw["omitted"]) + ".", ""]
    lines += ["Cells: median [min–max] over the seeds; a seed that never reaches L* counts as ∞ (the median "
              "is ∞ when three or more of five do not). CPU seconds are the training steps' own "
              "(evaluations excluded).", ""]
    if raw["newton"]:
        lines += newton_section(raw, main)
    if raw["curvatures"]:
        lines += variants_section(
            "## Output-factor curvatures and EKFAC (issue 10)",
            "Every variant runs at the tuned K-FAC lr and λ of its problem (tuned for the sampled Fisher with "
            "the Cholesky + π strategy, not for these), κ = 1e-2, inverses every 20 steps, factor decay 0.95, "
            "in this run. Curvature rows use Cholesky + π; \"eigen\" and \"EKFAC\" use the sampled Fisher. "
            "MC with one sample draws through the column recording (`curvature=\"mc\"`), the Fisher row through "
            "`sampled_fisher_backward`: the same statistic in distribution by two paths.",
            raw["curvatures"], main, [name for name, _ in CURVATURE_VARIANTS])
    if raw["tridiagonal"]:
        lines += variants_section(
            "## Block-tridiagonal against block-diagonal K-FAC (issue 11)",
            "Both at the tuned K-FAC lr and λ, Cholesky + π damping (tridiagonal: π on the diagonal factors "
            "everywhere they appear, every consecutive pair of Linear layers linked), in this run; the "
            "block-diagonal runs are the Fisher row of the table above (the same tasks).",
            raw["tridiagonal"], main, [BASELINE, TRIDIAGONAL[0]])
    with open(path, "w", encoding="utf-8") as file:
        file.write("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


def machine_description(trainers) -> dict:
    import subprocess

    import numpy
    import torch

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next(line.split(":", 1)[1].strip() for line in file if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    git = lambda *args: subprocess.run(["git", "-C", REPO_ROOT, *args], capture_output=True, text=True).stdout.strip()
    return dict(cpu=cpu, cores=os.cpu_count(), load_start=tuple(round(v, 2) for v in os.getloadavg()),
                python=sys.version.split()[0], torch=torch.__version__, numpy=numpy.__version__,
                libkfac=trainers.libkfac.library_version, libkfac_path=trainers.libkfac.library_path,
                commit=git("rev-parse", "--short", "HEAD") or "not a git checkout",
                dirty=bool(git("status", "--porcelain", "--untracked-files=no")),
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--workers", type=int, default=2, help="concurrent single-thread runs (default 2)")
    parser.add_argument("--main-run", default=None,
                        help="the main run's training_raw.json (default benchmarks/results/training_raw.json; "
                             "for --profile smoke the smoke run's, $TMPDIR/kfac-training-smoke)")
    parser.add_argument("--note", default=None, help="a line written under the title of families.md (e.g. the "
                                                      "machine's state or why the run is not final)")
    parser.add_argument("--out", default=None,
                        help="output directory (default benchmarks/results; for --profile smoke a temporary one)")
    parser.add_argument("--groups", default="newton,curvatures,tridiagonal",
                        help="which row groups to run (comma-separated subset of newton, curvatures, tridiagonal)")
    parser.add_argument("--report-only", action="store_true", help="rebuild families.md from families_raw.json")
    args = parser.parse_args()
    smoke = args.profile == "smoke"
    results = os.path.join(RESULTS, PROFILES[args.profile].get("out", "")).rstrip(os.sep)
    if args.out is None:
        args.out = os.path.join(tempfile.gettempdir(), "kfac-families-smoke") if smoke else results
    if args.main_run is None:
        base = os.path.join(tempfile.gettempdir(), "kfac-training-smoke") if smoke else results
        args.main_run = os.path.join(base, "training_raw.json")
    profile = dict(PROFILES[args.profile])
    groups = set(args.groups.split(","))
    if not groups <= {"newton", "curvatures", "tridiagonal"}:
        raise SystemExit(f"families.py: --groups {args.groups!r}: choose among newton, curvatures, tridiagonal")
    for group, key in (("newton", "newton"), ("curvatures", "families"), ("tridiagonal", "tridiagonal")):
        if group not in groups:
            profile[key] = dict(profile[key], problems=[])
            profile["omitted"] = profile["omitted"] + [f"the {group} rows (--groups {args.groups})"]
    reference = profile["newton"].get("reference_batch", FULL)
    needed = [(p, reference) for p in profile["newton"]["problems"]]
    needed += [(p, profile["families"]["batch"]) for p in profile["families"]["problems"]]
    needed += [(p, profile["tridiagonal"]["batch"]) for p in profile["tridiagonal"]["problems"]]
    main_run = read_main_run(args.main_run, list(dict.fromkeys(needed)))
    if args.report_only:
        with open(os.path.join(args.out, "families_raw.json")) as file:
            raw = json.load(file)
        if args.note is not None:
            raw["note"] = args.note
        write_report(raw, main_run, os.path.join(args.out, "families.md"))
        return

    started = time.perf_counter()
    import trainers

    machine = machine_description(trainers)
    print(f"libkfac {machine['libkfac']} ({machine['libkfac_path']}), torch {machine['torch']}; profile "
          f"{args.profile}, {args.workers} workers; main run {args.main_run}", file=sys.stderr)
    if profile["omitted"]:
        print("omitted in this profile: " + "; ".join(profile["omitted"]), file=sys.stderr)
    seeds = profile["seeds"]

    tasks = []
    for problem in profile["newton"]["problems"]:
        for kind in PRECONDITIONERS:
            for damping in NEWTON_DAMPING_GRID:
                tasks.append((("newton-grid", problem, kind), newton_task(
                    problem, kind, 0, damping, profile["newton"]["iterations"][problem])))
    kfac_keys = {}
    for group, variants in (("families", CURVATURE_VARIANTS), ("tridiagonal", [CURVATURE_VARIANTS[0], TRIDIAGONAL])):
        batch = profile[group]["batch"]
        for problem in profile[group]["problems"]:
            setting = main_run[(problem, batch)]
            for name, overrides in variants:
                for seed in range(seeds):
                    key = ("kfac", problem, batch, name, seed)
                    if key not in kfac_keys:  # the Fisher baseline is shared by both groups
                        kfac_keys[key] = True
                        tasks.append((key, kfac_task(trainers, setting, seed, overrides, profile["T_cap"])))

    grids = {}

    def follow_up(key, result):
        if key[0] != "newton-grid":
            return []
        entry = grids.setdefault(key[1:], [])
        entry.append(result)
        if len(entry) < len(NEWTON_DAMPING_GRID):
            return []
        entry.sort(key=lambda r: NEWTON_DAMPING_GRID.index(r["task"]["damping"]))
        scores = [_loss(r["final_loss"]) for r in entry]
        best = min(range(len(entry)), key=lambda i: (scores[i], i))
        damping = entry[best]["task"]["damping"]
        problem, kind = key[1:]
        return [(("newton", problem, kind), newton_task(problem, kind, seed, damping,
                                                        profile["newton"]["iterations"][problem]))
                for seed in range(1, seeds)]

    print(f"{len(tasks)} runs to start, ~{sum(estimated_seconds(t) for _, t in tasks) / args.workers:.0f} s "
          "(rough estimate; Newton-CG seeds 1+ come after their λ0 grid)", file=sys.stderr)
    results = run_all(tasks, follow_up, args.workers)

    raw = dict(profile=args.profile, workers=args.workers, seeds=seeds, omitted=profile["omitted"], note=args.note,
               newton_note=profile.get("newton_note"), newton_reference_batch=reference,
               main_run=args.main_run, newton_fixed=NEWTON_FIXED, newton_damping_grid=NEWTON_DAMPING_GRID,
               newton={}, curvatures={}, tridiagonal={})
    for problem in profile["newton"]["problems"]:
        raw["newton"][problem] = {}
        for kind in PRECONDITIONERS:
            grid = grids[(problem, kind)]
            scores = [_loss(r["final_loss"]) for r in grid]
            best = min(range(len(grid)), key=lambda i: (scores[i], i))
            others = sorted((r for k, r in results if k == ("newton", problem, kind)), key=lambda r: r["task"]["seed"])
            raw["newton"][problem][kind] = dict(
                damping=grid[best]["task"]["damping"], grid=[(r["task"]["damping"], r["final_loss"]) for r in grid],
                runs=[grid[best]] + others)
    by_key = {k: r for k, r in results if k[0] == "kfac"}
    for group, variants in (("families", CURVATURE_VARIANTS), ("tridiagonal", [CURVATURE_VARIANTS[0], TRIDIAGONAL])):
        batch = profile[group]["batch"]
        target = raw["curvatures" if group == "families" else "tridiagonal"]
        for problem in profile[group]["problems"]:
            runs = {name: [by_key[("kfac", problem, batch, name, s)] for s in range(seeds)] for name, _ in variants}
            T = next(iter(runs.values()))[0]["task"]["T"]
            target[problem] = dict(batch=batch, T=T, variants=runs)

    machine["load_end"] = tuple(round(v, 2) for v in os.getloadavg())
    raw["machine"] = machine
    os.makedirs(args.out, exist_ok=True)
    raw["runtime_seconds"] = time.perf_counter() - started
    report_path = os.path.join(args.out, "families.md")
    write_report(raw, main_run, report_path)
    with open(os.path.join(args.out, "families_raw.json"), "w") as file:
        json.dump(_finite(raw), file)
    print(f"wrote {os.path.relpath(report_path)} and families_raw.json; total {raw['runtime_seconds'] / 60:.1f} min")


def _finite(value):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    main()
