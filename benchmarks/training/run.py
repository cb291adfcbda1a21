#!/usr/bin/env python3
"""Convergence benchmark of libkfac's K-FAC against SGD-momentum and Adam (issues 4 and 14).

    python3 benchmarks/training/run.py [--profile default|digits|full|smoke] [--workers 2] [--tuning grid|halving]
    python3 benchmarks/training/run.py --pilot        # the timing pilot: step times only

Runs the protocol of benchmarks/training/README.md (Protocol 2) — tuning on pre-declared equal
grids (SGD-momentum and Adam for the budget T, K-FAC and its convolution variants for the budget
T_K; ``--tuning halving``: by successive halving, Protocol 2.1, not the default), five seeds of
every best configuration, K-FAC's adaptive mode (untuned, five seeds per setting) and, in
``--profile full``, the batch-size sweep, the K-FAC ablations (fixed-damping and adaptive), the
curvlinops peer and the threads table — in worker processes of one thread each, showing
progress on stderr, and writes benchmarks/results/training.md, training_*.png and
training_raw.json (``--profile digits`` into benchmarks/results/digits/; the smoke profile into
a temporary directory, see --out).
``--report-only`` rebuilds the table and plots from an existing training_raw.json.

training_raw.json (read by report.py and by families.py; keys kept stable):

- ``profile``, ``profile_settings`` (the profile dict; ``settings`` are tuples
  ``(problem, batch, T, T_K, eval_every, sparse_after)``, batch 0 = full), ``workers``,
  ``machine``, ``threads``, ``grids``, ``refine``, ``tuning`` (``grid`` or ``halving``),
  ``screen_divisor``, ``survivors`` (used by ``halving`` only), ``runtime_seconds``.
- ``settings``: one entry per (problem, batch, tuned method) — ``problem``, ``batch``, ``method``
  (``sgd``, ``adam``, ``kfac``, ``kfac-sua``, ``kfac-grouped``), ``T`` (the method's own budget:
  T for sgd/adam, T_K for the K-FAC methods), ``eval_every``, ``sparse_after``, ``best`` (the
  tuned configuration: ``lr`` and the ``second`` hyperparameter's name as key), ``second``,
  ``edge``, ``second_from``, ``grid`` (every tuning point: lr, second value, ``final_loss``
  after ``T``, ``diverged``) and ``runs`` (the five seeds, seed 0 first). With ``--tuning
  halving`` also ``T_screen``, and each point has ``screen_loss`` after ``T_screen``,
  ``diverged`` in the screen and ``final_loss`` after ``T`` for the survivors (null for the
  others).
- ``adaptive``: one entry per (problem, batch) with ``method`` "adaptive", ``T`` (= T_K),
  ``options`` and ``runs``.
- A run (trainers.run_task): ``task`` (problem, method, batch, T, eval_every, sparse_after, seed,
  lr, options), ``curve`` = [(iterations, whole-training-set loss or null, CPU seconds, wall
  seconds)], ``final_loss``, ``diverged``, ``error``, ``steps``, ``examples``, ``step_ms_median``,
  ``step_ms_mean``, ``wall_step_ms_median``, ``wall_step_ms_mean``, ``train_seconds`` (CPU),
  ``train_wall_seconds``, ``wall_seconds``, ``test`` ({loss, accuracy} for classifiers) and, for
  adaptive runs, ``adaptive`` (λ, γ, α, μ, ρ statistics).
- ``L_star``: [{problem, batch, T, value}] — L* of each setting, the median over the five seeds
  of tuned SGD-momentum's ``final_loss`` after T (null if the median seed diverged).
- ``sweep``, ``ablation``, ``ablation_names``, ``peer``, ``adaptive_ablation``,
  ``adaptive_ablation_names`` (empty or null in the default profile), ``adaptive_mode``,
  ``kfac_variants`` (method -> options over KFAC_DEFAULTS), ``mnist1d_paper_accuracy``.
"""

from __future__ import annotations

import os

# One thread per run (README.md, "Same conditions"): set before numpy, torch or libkfac load
# OpenBLAS/OpenMP, here and in every worker process (which inherit the environment and import
# this file again). Only the threads table's workers keep the values measure_threads() sets.
if os.environ.get("KFAC_BENCH_KEEP_THREADS") != "1":
    for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[_variable] = "1"

import argparse  # noqa: E402
import importlib  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import multiprocessing  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(os.path.dirname(HERE))
RESULTS = os.path.join(REPO_ROOT, "benchmarks", "results")
sys.path.insert(0, HERE)

REQUIREMENTS = {"mlxtend": "mlxtend", "matplotlib": "matplotlib", "curvlinops": "curvlinops-for-pytorch",
                "mnist1d": "mnist1d"}

# ---------------------------------------------------------------------------------------------
# Protocol constants (README.md)
# ---------------------------------------------------------------------------------------------

GRIDS = {
    "sgd": dict(lrs=[1e-4, 1e-3, 1e-2, 1e-1, 1.0], second="momentum", values=[0.9, 0.99]),
    "adam": dict(lrs=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1], second="beta1", values=[0.9, 0.99]),
    "kfac": dict(lrs=[1e-3, 1e-2, 1e-1, 1.0, 10.0], second="damping", values=[1e-3, 1e-1]),
}
METHODS = ("sgd", "adam", "kfac")
#: K-FAC variants tuned on the CNN problems with Conv1d layers (Protocol 2): KFC is "kfac".
CONV1D_PROBLEMS = ("cnn-mnist1d",)
METHOD_NAMES = {"sgd": "SGD-momentum", "adam": "Adam", "kfac": "K-FAC (libkfac)", "peer": "K-FAC (curvlinops)",
                "adaptive": "K-FAC adaptive (untuned)", "kfac-sua": "K-FAC SUA (libkfac)",
                "kfac-grouped": "K-FAC grouped (libkfac)"}
REFINE = (10 ** -0.5, 10 ** 0.5)
# Problems whose second hyperparameter is taken from another problem at the same batch setting.
TRANSFER_SECOND = {"ae-mnist": "ae-digits"}
# Successive halving (--tuning halving; README.md, "Protocol 2.1"): grid points are screened for
# T // SCREEN_DIVISOR iterations; the best SURVIVORS[number of second values] of the screen run T.
SCREEN_DIVISOR = 4
SURVIVORS = {2: 2, 1: 2}


def setting_methods(problem, trainers) -> list:
    """The tuned methods of a setting: SGD-momentum, Adam, K-FAC, and on the Conv1d CNN the
    K-FAC variants (SUA, channel grouping)."""
    return list(METHODS) + (list(trainers.KFAC_VARIANTS) if problem in CONV1D_PROBLEMS else [])


def is_kfac(method) -> bool:
    return method == "kfac" or method.startswith("kfac-") or method == "adaptive"


def transfer_source(problem, method):
    """(problem, method) whose tuned second hyperparameter this tuning reuses, or None: ae-mnist
    takes ae-digits' (same method), K-FAC's variants take K-FAC's λ of the same problem."""
    if method.startswith("kfac-"):
        return problem, "kfac"
    if problem in TRANSFER_SECOND:
        return TRANSFER_SECOND[problem], method
    return None

# K-FAC ablations on (ae-digits, batch 256): name -> option overrides of the tuned K-FAC.
ABLATIONS = [
    ("baseline (Cholesky + π, sampled Fisher, Ti = 20)", None),
    ("π damping off", dict(pi_damping=False)),
    ("empirical Fisher", dict(fisher="empirical")),
    ("inverse period 1", dict(inverse_update_period=1)),
    ("inverse period 5", dict(inverse_update_period=5)),
    ("inverse period 100", dict(inverse_update_period=100)),
    ("exact damping (eigen)", dict(inverse_strategy="eigen")),
    ("KL clip κ = 1e-1 (added after the smoke run, see README)", dict(kl_clip=1e-1)),
    ("KL clip off", dict(kl_clip=0.0)),
]
# K-FAC adaptive-mode ablations on the same problem and batch (README.md, "Added in the
# adaptive-mode session"): name -> option overrides of trainers.ADAPTIVE_DEFAULTS. The untuned
# adaptive runs of the main table are the baseline row; "α/μ fully off" is the fixed-damping
# K-FAC row of the table above (tuned lr, λ, KL clip), so it is not run again.
ADAPTIVE_BASELINE = "adaptive (untuned, LM + α/μ + γ re-choice; the main table's runs)"
ADAPTIVE_ABLATIONS = [
    ("LM off (λ fixed at λ0)", dict(lm_interval=0)),
    ("α only (no momentum μ)", dict(qmodel_momentum=False)),
    ("γ re-choice off (γ fixed at γ0)", dict(factor_damping_period=0)),
]

# A setting: (problem, batch (0 = full), T (SGD-momentum, Adam), T_K (K-FAC, its variants, the
# adaptive mode), eval_every, sparse_after): the whole-training-set loss is evaluated every
# eval_every iterations, and after iteration sparse_after (0 = never) every 5 * eval_every only.
# README.md, "Protocol 2 (issue 14)".
_DEFAULT_SETTINGS = [("ae-digits", 256, 2000, 1000, 10, 0), ("ae-mnist", 256, 1000, 250, 10, 250),
                     ("mlp-mnist1d", 256, 1000, 500, 10, 0), ("cnn-mnist1d", 256, 1000, 500, 10, 0)]
_ISSUE4_EXTRAS = dict(
    sweep=dict(problem="ae-digits", tuned_at=256, batches=[32, 64, 128, 256, 512, 1024, 0], T=300, seeds=5),
    ablation=dict(problem="ae-digits", batch=256, seeds=5),
    peer=[("ae-digits", 256, 100), ("ae-mnist", 256, 50)],
    peer_seeds=3,
    threads=("ae-mnist", 256, 30),
)
PROFILES = {
    "default": dict(
        settings=_DEFAULT_SETTINGS,
        omitted=["full-batch settings, mlp-digits and cnn-digits, the batch-size sweep, the K-FAC and adaptive "
                 "ablations, the curvlinops peer and the threads table: `--profile full` (Protocol 2, README.md)"],
        seeds=5,
        sweep=None, ablation=None, peer=[], peer_seeds=0, threads=None,
    ),
    "smoke": dict(
        settings=[("ae-digits", 256, 40, 20, 10, 0), ("mlp-digits", 0, 10, 5, 1, 0),
                  ("cnn-mnist1d", 256, 10, 5, 5, 0)],
        omitted=["everything else (smoke profile)"],
        seeds=3,
        sweep=dict(problem="ae-digits", tuned_at=256, batches=[64, 0], T=20, seeds=3),
        ablation=dict(problem="ae-digits", batch=256, seeds=3),
        peer=[("ae-digits", 256, 10)],
        peer_seeds=1,
        threads=("ae-digits", 256, 10),
    ),
}
# The digits profile: the digits classifiers (MLP and CNN) at batch 256, which the default profile
# omits, under Protocol 2's budgets (T = 2000 for SGD-m and Adam, T_K = 1000); families.py
# --profile digits reads this run for the classifiers' Newton-CG, curvature and tridiagonal rows.
# No full-batch settings, sweep, ablations or peer. Written into benchmarks/results/digits/ so
# that it never overwrites the default run.
_DIGITS_SETTINGS = [("mlp-digits", 256, 2000, 1000, 10, 0), ("cnn-digits", 256, 2000, 1000, 10, 0)]
PROFILES["digits"] = dict(
    settings=_DIGITS_SETTINGS,
    omitted=["the default profile's problems (`make bench-train`); full-batch settings, the sweep, ablations, "
             "peer and threads table (`--profile full`)"],
    seeds=5,
    sweep=None, ablation=None, peer=[], peer_seeds=0, threads=None,
    out="digits",
)
PROFILES["full"] = dict(
    _ISSUE4_EXTRAS, omitted=[], seeds=5,
    settings=[("ae-digits", 256, 2000, 1000, 10, 0), ("ae-mnist", 256, 1000, 250, 10, 250),
              ("mlp-mnist1d", 256, 3000, 1500, 10, 1500), ("cnn-mnist1d", 256, 3000, 1500, 10, 1500),
              ("ae-digits", 0, 2000, 1000, 1, 0), ("ae-mnist", 0, 1000, 250, 1, 0),
              ("mlp-digits", 256, 2000, 1000, 10, 0), ("mlp-digits", 0, 2000, 1000, 1, 0),
              ("cnn-digits", 256, 2000, 1000, 10, 0), ("cnn-digits", 0, 2000, 1000, 1, 0)],
)

# ---------------------------------------------------------------------------------------------
# Cost model (per-step milliseconds on one core), for ordering and ETA only
# ---------------------------------------------------------------------------------------------

_SIZES = {"ae-digits": 1797, "ae-mnist": 5000, "mlp-digits": 1500, "cnn-digits": 1500, "mlp-mnist1d": 4000,
          "cnn-mnist1d": 4000}
# problem: (fixed ms, ms per example) of an SGD step; what K-FAC adds: (fixed, per example). The
# default profile's problems: the timing pilot's split rescaled to the CPU step means of the
# default run of 2026-12-07 15:21 UTC (2-core AMD EPYC VM, 2–3× slower per step than the machine
# of the pilot). The digits classifiers (not in that run): the pilot's figures × 2.2, the factor
# by which the other problems' steps changed.
_COST = {
    "ae-digits": ((1.16, 0.0065), (3.74, 0.0083)),
    "ae-mnist": ((1.83, 0.112), (39.0, 0.063)),
    "mlp-digits": ((0.70, 0.0042), (1.76, 0.0059)),
    "cnn-digits": ((0.24, 0.0229), (2.2, 0.0337)),
    "mlp-mnist1d": ((0.32, 0.0054), (1.79, 0.0032)),
    "cnn-mnist1d": ((0.56, 0.0285), (3.81, 0.0279)),
}
# What the adaptive step adds to the K-FAC step (the two forward-mode products, the loss after
# the update, the solve): (fixed ms, ms per example), rescaled the same way from the adaptive
# step means of that run (divided by the γ overhead below); the digits classifiers: the
# adaptive-mode pilot × 2.2.
_ADAPTIVE_EXTRA = {
    "ae-digits": (2.08, 0.0125),
    "ae-mnist": (1.6, 0.145),
    "mlp-digits": (3.3, 0.019),
    "cnn-digits": (3.1, 0.048),
    "mlp-mnist1d": (2.41, 0.0060),
    "cnn-mnist1d": (3.46, 0.0381),
}
# γ re-choice (every T2 = 20 steps: two more products and, with Cholesky, two more inversions of
# every factor), not measurable before the library had it: +10 % of the adaptive step, a guess.
_GAMMA_STEP_OVERHEAD = 1.10


def estimated_seconds(task) -> float:
    if task.get("kind") == "check":
        return 3.0
    problem, method = task["problem"], task["method"]
    n = _SIZES[problem]
    batch = n if task["batch"] <= 0 or task["batch"] >= n else task["batch"]
    (a, b), (c, d) = _COST[problem]
    sgd = a + b * batch
    kfac_step = sgd + c + d * batch
    step = {"sgd": sgd, "adam": 1.1 * sgd}.get(method, kfac_step if method.startswith("kfac") else 3 * kfac_step)
    if method == "adaptive":
        e, f = _ADAPTIVE_EXTRA[problem]
        step = kfac_step + e + f * batch
        if task["options"].get("factor_damping_period", 0) > 0:
            step *= _GAMMA_STEP_OVERHEAD
    if method == "kfac" and task["options"].get("inverse_update_period") == 1:
        step *= 2.5
    import trainers  # the evaluation rule of the runs themselves

    evals = 0 if batch == n else sum(trainers.evaluates_at(k, task) for k in range(1, task["T"] + 1))
    return (task["T"] * step + evals * (a + b * n) / 3) / 1e3 + 0.05


# ---------------------------------------------------------------------------------------------
# Experiments: generators that yield lists of tasks (receiving their results) or Need(key)
# (receiving another experiment's return value), and return a summary.
# ---------------------------------------------------------------------------------------------


class Need:
    def __init__(self, key):
        self.key = key


def _score(result) -> float:
    loss = result["final_loss"]
    return loss if (loss is not None and math.isfinite(loss)) else math.inf


def tuning_experiment(trainers, problem, batch, T, eval_every, sparse_after, method, seeds, halving=False):
    """Tunes ``method`` on its grid (seed 0, criterion: final loss after ``T``), then runs the
    best configuration on the other seeds. K-FAC's variants use K-FAC's grid.

    Protocol 2 (the default): every grid point runs ``T``, then the two refinements around the
    best. ``halving`` (README.md, "Protocol 2.1: tuning by successive halving", tried and not
    adopted):
    every grid point and the two refinements around the best are screened for
    ``T // SCREEN_DIVISOR`` iterations (the whole-set loss evaluated at the end only); the best
    :data:`SURVIVORS` of the screen run the full ``T``, and the best final loss after ``T`` is
    chosen. Either way the chosen configuration's run is seed 0's."""
    grid = GRIDS["kfac" if method.startswith("kfac") else method]
    second, values = grid["second"], grid["values"]
    source_key = transfer_source(problem, method)
    transferred_from = None
    if source_key is not None:
        source = yield Need(("tune", source_key[0], batch, source_key[1]))
        if source is not None:  # None: the source setting is not part of this profile: use both values
            values = [source["best"][second]]
            transferred_from = source_key[0] if source_key[1] == method else f"{METHOD_NAMES[source_key[1]]}"
    make = lambda lr, value, seed: trainers.make_task(problem, method, batch, T, eval_every, seed, lr,
                                                      sparse_after=sparse_after, **{second: value})
    T_tried = max(1, T // SCREEN_DIVISOR) if halving else T
    tried_task = ((lambda lr, value: trainers.make_task(problem, method, batch, T_tried, T_tried, 0, lr,
                                                        **{second: value}))
                  if halving else (lambda lr, value: make(lr, value, 0)))
    stage1 = [tried_task(lr, value) for value in values for lr in grid["lrs"]]
    results1 = yield stage1
    best1 = min(range(len(stage1)), key=lambda i: (_score(results1[i]), i))
    lr1, value1 = stage1[best1]["lr"], stage1[best1]["options"][second]
    stage2 = [tried_task(lr1 * factor, value1) for factor in REFINE]
    results2 = yield stage2
    tried = list(zip(stage1 + stage2, results1 + results2))
    if halving:
        order = sorted(range(len(tried)), key=lambda i: (_score(tried[i][1]), i))
        survivors = order[:SURVIVORS[len(values)]]
        full_tasks = [make(tried[i][0]["lr"], tried[i][0]["options"][second], 0) for i in survivors]
        full_results = yield full_tasks
    else:
        survivors = list(range(len(tried)))
        full_tasks, full_results = [t for t, _ in tried], [r for _, r in tried]
    best = min(range(len(full_tasks)), key=lambda j: (_score(full_results[j]), j))
    best_task, best_result = full_tasks[best], full_results[best]
    lr, value = best_task["lr"], best_task["options"][second]
    # "edge": no learning rate on one side of the chosen one was tried (with its second value).
    tested = [t["lr"] for t, _ in tried if t["options"][second] == value]
    edge = lr in (min(tested), max(tested))
    others = yield [make(lr, value, seed) for seed in range(1, seeds)]
    finals = dict(zip(survivors, full_results))  # tuning point -> its run for the full budget
    points = []
    for i, (t, r) in enumerate(tried):
        point = dict(lr=t["lr"], **{second: t["options"][second]}, diverged=r["diverged"],
                     final_loss=_score(finals[i]) if i in finals else None)
        if halving:
            point["screen_loss"] = _score(r)
        points.append(point)
    return dict(
        problem=problem, batch=batch, T=T, eval_every=eval_every, sparse_after=sparse_after, method=method,
        best={"lr": lr, second: value}, second=second, edge=edge,
        second_from=transferred_from, **({"T_screen": T_tried} if halving else {}),
        grid=points,
        runs=[best_result] + list(others),
    )


def sweep_experiment(trainers, sweep, method):
    tuned = yield Need(("tune", sweep["problem"], sweep["tuned_at"], method))
    if tuned is None:
        return None
    options = {k: v for k, v in tuned["best"].items() if k != "lr"}
    tasks = [trainers.make_task(sweep["problem"], method, batch, sweep["T"], sweep["T"], seed, tuned["best"]["lr"], **options)
             for batch in sweep["batches"] for seed in range(sweep["seeds"])]
    results = yield tasks
    return dict(method=method, best=tuned["best"], runs=results)


def ablation_experiment(trainers, ablation):
    tuned = yield Need(("tune", ablation["problem"], ablation["batch"], "kfac"))
    if tuned is None:
        return None
    options = {k: v for k, v in tuned["best"].items() if k != "lr"}
    tasks, names = [], []
    for name, overrides in ABLATIONS[1:]:
        for seed in range(ablation["seeds"]):
            tasks.append(trainers.make_task(ablation["problem"], "kfac", ablation["batch"], tuned["T"],
                                            tuned["eval_every"], seed, tuned["best"]["lr"],
                                            sparse_after=tuned.get("sparse_after", 0), **dict(options, **overrides)))
            names.append(name)
    results = yield tasks
    rows = {ABLATIONS[0][0]: tuned["runs"]}
    for name, result in zip(names, results):
        rows.setdefault(name, []).append(result)
    return dict(best=tuned["best"], rows=rows, adaptive_available=True)


def adaptive_experiment(trainers, problem, batch, T, eval_every, sparse_after, seeds):
    """K-FAC's adaptive mode, untuned: the same fixed settings for every problem, no grid; the
    five seeds of the other methods (same initial weights, batches and sampled-Fisher draws)."""
    tasks = [trainers.make_task(problem, "adaptive", batch, T, eval_every, seed, 0.0, sparse_after=sparse_after)
             for seed in range(seeds)]
    results = yield tasks
    return dict(problem=problem, batch=batch, T=T, eval_every=eval_every, sparse_after=sparse_after, method="adaptive",
                options=tasks[0]["options"], runs=results)


def adaptive_ablation_experiment(trainers, problem, batch, T, eval_every, sparse_after, seeds):
    """The adaptive-mode ablations (ADAPTIVE_ABLATIONS) at ``problem``/``batch``."""
    tasks, names, notes = [], [], {}
    for name, overrides in ADAPTIVE_ABLATIONS:
        for seed in range(seeds):
            tasks.append(trainers.make_task(problem, "adaptive", batch, T, eval_every, seed, 0.0,
                                            sparse_after=sparse_after, **overrides))
            names.append(name)
    results = yield tasks
    rows = {}
    for name, result in zip(names, results):
        rows.setdefault(name, []).append(result)
    return dict(problem=problem, batch=batch, rows=rows, notes=notes)


def peer_experiment(trainers, problem, batch, T, seeds):
    tuned = yield Need(("tune", problem, batch, "kfac"))
    if tuned is None:
        return None
    damping = tuned["best"]["damping"]
    check = yield [dict(kind="check", problem=problem, damping=damping, batch=batch)]
    same = dict(damping=damping, factor_decay=0.0, inverse_update_period=1)
    tasks = []
    for seed in range(seeds):
        for method in ("kfac", "peer"):
            tasks.append(trainers.make_task(problem, method, batch, T, T, seed, tuned["best"]["lr"], **same))
    results = yield tasks
    return dict(problem=problem, batch=batch, T=T, best=tuned["best"], check=check[0],
                kfac=[r for r in results if r["task"]["method"] == "kfac"],
                peer=[r for r in results if r["task"]["method"] == "peer"])


# ---------------------------------------------------------------------------------------------
# Worker entry point
# ---------------------------------------------------------------------------------------------


def execute(task):
    import warnings

    # curvlinops' import chain uses torch.jit.script, deprecated in recent PyTorch.
    warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.script.*")
    import trainers

    if task.get("kind") == "check":
        return trainers.peer_direction_check(task["problem"], task["damping"], task["batch"])
    return trainers.run_task(task)


def _priority(key, task) -> float:
    """Longest first, except that the experiments others wait for (the ae-digits tuning that
    ae-mnist, the sweep and the ablations need) and ae-mnist itself (the longest chain) go
    before everything else."""
    boost = 0.0
    if key[0] == "tune" and key[1] == "ae-digits":
        boost = 2000.0
    elif key[0] == "tune" and key[1] == "ae-mnist":
        boost = 1000.0
    return estimated_seconds(task) + boost


def _describe(task) -> str:
    if task.get("kind") == "check":
        return f"{task['problem']} peer direction check"
    batch = "full" if task["batch"] <= 0 else task["batch"]
    if task["method"] == "adaptive":
        return f"{task['problem']}/{batch} adaptive seed {task['seed']}"
    return f"{task['problem']}/{batch} {task['method']} lr={task['lr']:g} seed {task['seed']}"


# ---------------------------------------------------------------------------------------------
# Scheduler with a progress line
# ---------------------------------------------------------------------------------------------


class Progress:
    def __init__(self, planned_seconds: float, workers: int):
        self.planned = planned_seconds
        self.workers = workers
        self.done_estimate = 0.0
        self.done_actual = 0.0
        self.runs = 0
        self.start = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self.last_print = 0.0
        self.last_text = ""

    def update(self, task, result_seconds, running):
        self.runs += 1
        self.done_estimate += estimated_seconds(task)
        self.done_actual += result_seconds
        self.show(running)

    def show(self, running, force=False):
        elapsed = time.perf_counter() - self.start
        ratio = self.done_actual / self.done_estimate if self.done_estimate > 0 else 1.0
        left = max(0.0, self.planned - self.done_estimate) * ratio / self.workers
        fraction = min(1.0, self.done_estimate / self.planned) if self.planned else 1.0
        bar = "#" * int(24 * fraction) + "-" * (24 - int(24 * fraction))
        text = (f"[{bar}] {100 * fraction:3.0f}%  {self.runs} runs  elapsed {_clock(elapsed)}  "
                f"left ~{_clock(left)}  | {running}")
        if self.tty:
            sys.stderr.write("\r" + text[:150].ljust(150))
            sys.stderr.flush()
        elif force or time.perf_counter() - self.last_print > 15:
            sys.stderr.write(text + "\n")
            self.last_print = time.perf_counter()
        self.last_text = text

    def finish(self):
        if self.tty:
            sys.stderr.write("\n")


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}:{seconds % 60:02d}"


def run_experiments(experiments, workers, progress):
    """Runs the generators of ``experiments`` ({key: generator}) to completion on a process
    pool; returns {key: return value}."""
    finished, waiting = {}, {}  # key -> value;  needed key -> [waiting keys]
    pending = {}  # key -> [tasks, results, remaining]
    ready = []  # (estimated seconds, sequence, key, index, task)
    sequence = [0]

    def advance(key, value):
        generator = experiments[key]
        while True:
            try:
                item = generator.send(value)
            except StopIteration as stop:
                finished[key] = stop.value
                for waiter in waiting.pop(key, []):
                    advance(waiter, stop.value)
                return
            if isinstance(item, Need):
                if item.key in finished:
                    value = finished[item.key]
                    continue
                if item.key not in experiments:
                    value = None
                    continue
                waiting.setdefault(item.key, []).append(key)
                return
            tasks = list(item)
            if not tasks:
                value = []
                continue
            pending[key] = [tasks, [None] * len(tasks), len(tasks)]
            for index, task in enumerate(tasks):
                sequence[0] += 1
                ready.append((_priority(key, task), sequence[0], key, index, task))
            return

    for key in list(experiments):
        if key not in finished and not any(key in w for w in waiting.values()):
            advance(key, None)

    context = multiprocessing.get_context("spawn")
    in_flight = {}
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        while ready or in_flight:
            ready.sort(key=lambda entry: (-entry[0], entry[1]))  # longest first
            while ready and len(in_flight) < workers:
                cost, _, key, index, task = ready.pop(0)
                in_flight[pool.submit(execute, task)] = (key, index, task, time.perf_counter())
            running = "; ".join(_describe(t) for _, _, t, _ in in_flight.values())
            progress.show(running)
            done, _ = wait(list(in_flight), timeout=5, return_when=FIRST_COMPLETED)
            for future in done:
                key, index, task, started = in_flight.pop(future)
                result = future.result()
                entry = pending[key]
                entry[1][index] = result
                entry[2] -= 1
                progress.update(task, time.perf_counter() - started, _describe(task))
                if entry[2] == 0:
                    del pending[key]
                    advance(key, entry[1])
    if waiting:
        raise RuntimeError(f"experiments waiting on results that never came: {waiting}")
    return finished


def planned_seconds(profile, trainers, halving=False) -> float:
    """Estimated single-core seconds of everything the profile runs (for the ETA)."""
    total = 0.0
    settings = {(p, b): (T, TK, e, sparse) for p, b, T, TK, e, sparse in profile["settings"]}
    for problem, batch, T, TK, eval_every, sparse in profile["settings"]:
        for method in setting_methods(problem, trainers):
            grid = GRIDS["kfac" if method.startswith("kfac") else method]
            source = transfer_source(problem, method)
            transferred = source is not None and (source[0], batch) in settings
            values = 1 if transferred else len(grid["values"])
            screens = len(grid["lrs"]) * values + len(REFINE)
            budget = TK if is_kfac(method) else T
            task = trainers.make_task(problem, method, batch, budget, eval_every, 0, 1.0,
                                      sparse_after=sparse, damping=1.0)
            if halving:
                short = max(1, budget // SCREEN_DIVISOR)
                screen = trainers.make_task(problem, method, batch, short, short, 0, 1.0, damping=1.0)
                total += (SURVIVORS[values] + profile["seeds"] - 1) * estimated_seconds(task)
                total += screens * estimated_seconds(screen)
            else:
                total += (screens + profile["seeds"] - 1) * estimated_seconds(task)
        task = trainers.make_task(problem, "adaptive", batch, TK, eval_every, 0, 0.0, sparse_after=sparse)
        total += profile["seeds"] * estimated_seconds(task)
    sweep = profile.get("sweep")
    if sweep:
        for batch in sweep["batches"]:
            for method in METHODS:
                task = trainers.make_task(sweep["problem"], method, batch, sweep["T"], sweep["T"], 0, 1.0, damping=1.0)
                total += sweep["seeds"] * estimated_seconds(task)
    ablation = profile.get("ablation")
    if ablation and (ablation["problem"], ablation["batch"]) in settings:
        _, TK, e, sparse = settings[(ablation["problem"], ablation["batch"])]
        for _, overrides in ABLATIONS[1:]:
            task = trainers.make_task(ablation["problem"], "kfac", ablation["batch"], TK, e, 0, 1.0,
                                      sparse_after=sparse, **overrides)
            total += ablation["seeds"] * estimated_seconds(task)
        for _, overrides in ADAPTIVE_ABLATIONS:
            task = trainers.make_task(ablation["problem"], "adaptive", ablation["batch"], TK, e, 0, 0.0,
                                      sparse_after=sparse, **overrides)
            total += ablation["seeds"] * estimated_seconds(task)
    for problem, batch, T in profile.get("peer") or []:
        for method in ("kfac", "peer"):
            task = trainers.make_task(problem, method, batch, T, T, 0, 1.0, inverse_update_period=1)
            total += profile["peer_seeds"] * estimated_seconds(task)
        total += 3.0
    return total


# ---------------------------------------------------------------------------------------------
# Threads table: one- against two-thread step times, measured alone before the pool starts
# ---------------------------------------------------------------------------------------------


def _timing_worker(arguments):
    import trainers

    return trainers.step_timing(*arguments)


def measure_threads(profile):
    problem, batch, steps = profile["threads"]
    rows = []
    configurations = [("1", 1, 1), ("1", 2, 2), ("2", 2, 2)]  # (OpenBLAS, torch, libkfac threads)
    context = multiprocessing.get_context("spawn")
    saved = os.environ["OPENBLAS_NUM_THREADS"]
    os.environ["KFAC_BENCH_KEEP_THREADS"] = "1"
    try:
        for openblas, torch_threads, kfac_threads in configurations:
            os.environ["OPENBLAS_NUM_THREADS"] = openblas
            os.environ["OMP_NUM_THREADS"] = str(torch_threads)
            with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
                for method in ("sgd", "kfac"):
                    rows.append(pool.submit(_timing_worker, (problem, batch, method, steps, torch_threads, kfac_threads)).result())
    finally:
        os.environ["OPENBLAS_NUM_THREADS"] = saved
        os.environ["OMP_NUM_THREADS"] = "1"
        del os.environ["KFAC_BENCH_KEEP_THREADS"]
    return rows


# ---------------------------------------------------------------------------------------------
# Environment
# ---------------------------------------------------------------------------------------------


def ensure_packages(install: bool):
    missing = [pip for module, pip in REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
    if not missing:
        return
    if not install:
        raise SystemExit(f"missing Python packages: {' '.join(missing)} "
                         f"(pip install -r {os.path.relpath(os.path.join(HERE, 'requirements.txt'))})")
    print(f"installing {' '.join(missing)} with pip (benchmark set-up)", file=sys.stderr)
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-r", os.path.join(HERE, "requirements.txt")])
    importlib.invalidate_caches()


def machine_description(trainers) -> dict:
    import numpy
    import torch

    def version(module):
        try:
            from importlib.metadata import version as v
            return v(module)
        except Exception:
            return "not installed"

    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    kfac = trainers.libkfac
    git = lambda *args: subprocess.run(["git", "-C", os.path.dirname(os.path.abspath(kfac.__file__)), *args],
                                       capture_output=True, text=True).stdout.strip()
    commit = git("rev-parse", "--short", "HEAD") or "not a git checkout"
    dirty = bool(git("status", "--porcelain", "--untracked-files=no"))
    openblas = "unknown"
    try:
        ldd = subprocess.run(["ldd", kfac.library_path], capture_output=True, text=True).stdout
        openblas = next((line.split("=>")[1].split("(")[0].strip() for line in ldd.splitlines() if "openblas" in line), "unknown")
        openblas = os.path.realpath(openblas)
    except Exception:
        pass
    return dict(
        cpu=cpu, cores=os.cpu_count(), load_average_start=os.getloadavg(),
        python=sys.version.split()[0], torch=torch.__version__, numpy=numpy.__version__,
        libkfac=kfac.library_version, libkfac_path=kfac.library_path, bindings_path=os.path.dirname(kfac.__file__),
        libkfac_commit=commit, libkfac_dirty=dirty, openblas=openblas,
        curvlinops=version("curvlinops-for-pytorch"), mlxtend=version("mlxtend"), matplotlib=version("matplotlib"),
        mnist1d=version("mnist1d"),
        date=time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    )


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------


PILOT_STEPS = 30
PILOT_SETTINGS = [("ae-digits", 256), ("ae-digits", 0), ("ae-mnist", 256), ("mlp-digits", 256), ("mlp-digits", 0),
                  ("cnn-digits", 256), ("cnn-digits", 0), ("mlp-mnist1d", 256), ("cnn-mnist1d", 256)]


def pilot(workers: int) -> None:
    """The timing pilot of Protocol 2 (README.md): median CPU milliseconds per step of every
    method on every setting, over PILOT_STEPS steps of one seed at a fixed configuration, in
    ``workers`` single-thread processes as the benchmark runs. Prints times only — no loss is
    printed or looked at; the budgets are sized from these figures."""
    import trainers

    tasks = []
    for problem, batch in PILOT_SETTINGS:
        methods = ["sgd", "adam", "kfac", "adaptive"]
        if problem == "cnn-mnist1d":
            methods += list(trainers.KFAC_VARIANTS)
        for method in methods:
            options = dict(momentum=0.9, beta1=0.9, damping=1e-1) if method != "adaptive" else {}
            tasks.append(trainers.make_task(problem, method, batch, PILOT_STEPS, PILOT_STEPS, 0,
                                            1e-3 if method != "adaptive" else 0.0, **options))
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
        results = list(pool.map(execute, tasks))
    print("| problem | batch | method | CPU ms per step (median) | wall ms per step (median) |")
    print("|---|---|---|---|---|")
    for task, result in zip(tasks, results):
        batch = "full" if task["batch"] <= 0 else task["batch"]
        print(f"| {task['problem']} | {batch} | {task['method']} | {result['step_ms_median']:.2f} "
              f"| {result['wall_step_ms_median']:.2f} |")
    print(f"load average at the end: {os.getloadavg()}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--workers", type=int, default=2, help="concurrent single-thread runs (default 2)")
    parser.add_argument("--tuning", choices=["grid", "halving"], default="grid",
                        help="grid: Protocol 2's full-budget tuning (default); halving: successive halving "
                             "(README.md, Protocol 2.1, tried and not adopted as the default)")
    parser.add_argument("--out", default=None,
                        help="output directory (default benchmarks/results; for --profile smoke a temporary "
                             "directory, so that a smoke run never overwrites the committed results)")
    parser.add_argument("--no-install", action="store_true", help="do not pip-install missing packages")
    parser.add_argument("--report-only", action="store_true", help="rebuild the report from training_raw.json")
    parser.add_argument("--pilot", action="store_true",
                        help="only the timing pilot: per-step times of every method and setting (no losses)")
    args = parser.parse_args()
    if args.pilot:
        pilot(args.workers)
        return
    if args.out is None:
        args.out = (os.path.join(tempfile.gettempdir(), "kfac-training-smoke") if args.profile == "smoke"
                    else os.path.join(RESULTS, PROFILES[args.profile].get("out", "")).rstrip(os.sep))
    os.makedirs(args.out, exist_ok=True)
    raw_path = os.path.join(args.out, "training_raw.json")

    ensure_packages(not args.no_install)
    import report

    if args.report_only:
        with open(raw_path) as file:
            raw = json.load(file)
        report.write_report(raw, args.out)
        return

    started = time.perf_counter()
    import trainers

    profile = PROFILES[args.profile]
    machine = machine_description(trainers)
    print(f"libkfac {machine['libkfac']} ({machine['libkfac_path']}), torch {machine['torch']}, "
          f"curvlinops {machine['curvlinops']}; profile {args.profile}, {args.workers} workers", file=sys.stderr)
    if profile["omitted"]:
        print("omitted in this profile: " + "; ".join(profile["omitted"]), file=sys.stderr)

    # K-FAC's adaptive mode: untuned, the settings of trainers.ADAPTIVE_DEFAULTS.
    print(f"K-FAC adaptive mode (untuned): γ re-chosen every T2 = "
          f"{trainers.ADAPTIVE_DEFAULTS['factor_damping_period']} steps", file=sys.stderr)

    threads = []
    if profile.get("threads"):
        print("measuring step times with 1 and 2 threads (alone)...", file=sys.stderr)
        threads = measure_threads(profile)

    experiments = {}
    settings_by_key = {(p, b): (T, TK, e, sparse) for p, b, T, TK, e, sparse in profile["settings"]}
    for problem, batch, T, TK, eval_every, sparse in profile["settings"]:
        for method in setting_methods(problem, trainers):
            experiments[("tune", problem, batch, method)] = tuning_experiment(
                trainers, problem, batch, TK if is_kfac(method) else T, eval_every, sparse, method, profile["seeds"],
                halving=args.tuning == "halving")
        experiments[("adaptive", problem, batch)] = adaptive_experiment(
            trainers, problem, batch, TK, eval_every, sparse, profile["seeds"])
    if profile.get("sweep"):
        for method in METHODS:
            experiments[("sweep", method)] = sweep_experiment(trainers, profile["sweep"], method)
    ablation = profile.get("ablation")
    if ablation:
        experiments[("ablation",)] = ablation_experiment(trainers, ablation)
        if (ablation["problem"], ablation["batch"]) in settings_by_key:
            _, TK, eval_every, sparse = settings_by_key[(ablation["problem"], ablation["batch"])]
            experiments[("adaptive-ablation",)] = adaptive_ablation_experiment(
                trainers, ablation["problem"], ablation["batch"], TK, eval_every, sparse, ablation["seeds"])
    for problem, batch, T in profile.get("peer") or []:
        experiments[("peer", problem, batch)] = peer_experiment(trainers, problem, batch, T, profile["peer_seeds"])

    progress = Progress(planned_seconds(profile, trainers, args.tuning == "halving"), args.workers)
    finished = run_experiments(experiments, args.workers, progress)
    progress.finish()

    machine["load_average_end"] = os.getloadavg()
    raw = dict(
        profile=args.profile, profile_settings=profile, workers=args.workers, machine=machine, threads=threads,
        grids=GRIDS, refine=REFINE, tuning=args.tuning, screen_divisor=SCREEN_DIVISOR, survivors=SURVIVORS,
        settings=[finished[("tune", p, b, m)] for p, b, *_ in profile["settings"]
                  for m in setting_methods(p, trainers)],
        sweep=[finished[("sweep", m)] for m in METHODS if ("sweep", m) in finished],
        ablation=finished.get(("ablation",)), ablation_names=[name for name, _ in ABLATIONS],
        peer=[finished[("peer", p, b)] for p, b, _ in profile.get("peer") or []],
        adaptive_mode=dict(
            available=True,
            gamma_rechoice=True,
            gamma_note=None,
            defaults=trainers.ADAPTIVE_DEFAULTS,
            options=dict(trainers.ADAPTIVE_DEFAULTS),
        ),
        adaptive=[finished[("adaptive", p, b)] for p, b, *_ in profile["settings"]
                  if ("adaptive", p, b) in finished],
        adaptive_ablation=finished.get(("adaptive-ablation",)),
        adaptive_ablation_names=[ADAPTIVE_BASELINE] + [name for name, _ in ADAPTIVE_ABLATIONS],
        kfac_variants=dict(trainers.KFAC_VARIANTS),
        mnist1d_paper_accuracy=dict(trainers.MNIST1D_PAPER_ACCURACY),
    )
    # L* per setting, stored for readers of the JSON (report.py recomputes it the same way).
    raw["L_star"] = [dict(problem=e["problem"], batch=e["batch"], T=e["T"],
                          value=report.median([report._loss(r["final_loss"]) for r in e["runs"]]))
                     for e in raw["settings"] if e["method"] == "sgd"]
    raw = _finite(raw)  # JSON-safe: a diverged run's loss is null
    # Written twice so that the recorded runtime includes writing the report and plots.
    for _ in range(2):
        raw["runtime_seconds"] = time.perf_counter() - started
        headline = report.write_report(raw, args.out)
        with open(raw_path, "w") as file:
            json.dump(raw, file)
    print(headline)
    print(f"\nwrote {os.path.relpath(args.out)}/training.md, training_*.png, training_raw.json; "
          f"total {_clock(time.perf_counter() - started)}")


def _finite(value):
    """JSON-safe copy: non-finite floats become None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k) if not isinstance(k, str) else k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


if __name__ == "__main__":
    main()
