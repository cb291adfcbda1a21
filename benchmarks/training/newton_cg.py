"""Newton-CG rows of the convergence benchmark (issue 9; protocol in README.md, "Added in the
Newton-CG session"): libkfac.torch.NewtonCG with no, diagonal and K-FAC preconditioning on the
full-batch ae-digits and mlp-digits problems, five seeds, against the L* of the default run.

    python3 benchmarks/training/newton_cg.py [--iterations N] [--seeds K] [--out DIR]

Writes DIR/newton_cg.md (default benchmarks/results). About 12 minutes of CPU on one core
(``--problems ae-digits`` and ``--problems mlp-digits`` in two processes: about 6 minutes).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(HERE)), "bindings", "python"))

from problems import get_problem  # noqa: E402

import libkfac  # noqa: E402
from libkfac.torch import KFACPreconditioner, NewtonCG  # noqa: E402

#: L* of the default run of 2026-11-23 (benchmarks/results/training.md, "full" rows): the median
#: final training loss of tuned SGD-momentum, and its iterations / CPU seconds to reach it, and
#: K-FAC's (libkfac, tuned), for comparison.
L_STAR = {
    "ae-digits": dict(L=22.08, sgd=(300, 2.05), kfac=(57, 1.01)),
    "mlp-digits": dict(L=5.24e-07, sgd=(263, 0.941), kfac=(math.inf, math.inf)),
}
DISTRIBUTION = {"ae-digits": "bernoulli", "mlp-digits": "categorical"}
PRECONDITIONERS = ["none", "diagonal", "kfac"]
CURVATURE_FRACTION = 0.05


def run(problem, kind: str, seed: int, iterations: int):
    torch.manual_seed(seed)
    model = problem.make_model()
    x, target, loss_fn = problem.x, problem.target, problem.loss
    n = x.shape[0]
    size = math.ceil(CURVATURE_FRACTION * n)
    rng = np.random.default_rng(seed)
    kp = None
    if kind == "kfac":
        kp = KFACPreconditioner(model, damping=1.0, inverse_strategy="eigen", factor_update_period=0,
                                inverse_update_period=0, num_threads=1, loss_reduction="mean")
    ncg = NewtonCG(model, preconditioner=kp if kp is not None else (None if kind == "none" else "diagonal"),
                   damping=1.0, lm_decay=2 / 3, lm_interval=1, tolerance=0.1, max_iterations=250)
    losses, seconds, cg_iterations = [], [], []
    order, cursor = rng.permutation(n), 0
    clock = 0.0
    for _ in range(iterations):
        if cursor + size > n:
            order, cursor = rng.permutation(n), 0
        subset = torch.from_numpy(order[cursor:cursor + size])
        cursor += size
        start = time.process_time()
        if kp is not None:  # K-FAC statistics: the sampled Fisher of the curvature batch
            out = model(x[subset])
            kp.sampled_fisher_backward(out, DISTRIBUTION[problem.name])
            kp.optimizer.update_factors()
            kp.optimizer.update_inverses()
        result = ncg.step(x, target, loss_fn, curvature_indices=subset)
        clock += time.process_time() - start
        losses.append(result.loss_after)
        seconds.append(clock)
        cg_iterations.append(result.cg.iterations)
    return losses, seconds, cg_iterations


def first_reaching(losses, seconds, level):
    for i, loss in enumerate(losses):
        if loss <= level:
            return i + 1, seconds[i]
    return math.inf, math.inf


def fmt(v, digits=3):
    if v == math.inf:
        return "∞"
    return f"{v:.{digits}g}"


def summary(values):
    finite = sorted(values)
    med = statistics.median(finite)
    return f"{fmt(med)} [{fmt(min(values))}–{fmt(max(values))}]"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--iterations", type=int, default=60)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--out", default=os.path.join(os.path.dirname(HERE), "results"))
    parser.add_argument("--problems", default="ae-digits,mlp-digits")
    args = parser.parse_args()
    torch.set_num_threads(1)
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    rows = []
    t0 = time.time()
    for name in args.problems.split(","):
        problem = get_problem(name)
        level = L_STAR[name]["L"]
        for kind in PRECONDITIONERS:
            finals, its, secs, cgs, per_step = [], [], [], [], []
            for seed in range(args.seeds):
                losses, seconds, cg = run(problem, kind, seed, args.iterations)
                i, s = first_reaching(losses, seconds, level)
                finals.append(losses[-1])
                its.append(i)
                secs.append(s)
                cgs.extend(cg)
                per_step.append(seconds[-1] / len(seconds))
                print(f"[{time.time() - t0:6.0f} s] {name} {kind} seed {seed}: final {losses[-1]:.4g}, "
                      f"to L* {i} it / {fmt(s)} s, CG/Newton {statistics.mean(cg):.1f}", flush=True)
            rows.append((name, kind, level, summary(finals), summary(its), summary(secs),
                         statistics.mean(cgs), statistics.median(cgs), max(cgs), 1e3 * statistics.mean(per_step)))
    os.makedirs(args.out, exist_ok=True)
    default = args.problems == "ae-digits,mlp-digits"
    path = os.path.join(args.out, "newton_cg.md" if default else f"newton_cg_{args.problems.replace(',', '_')}.md")
    with open(path, "w", encoding="utf-8") as f:
        f.write("# Newton-CG rows of the convergence benchmark\n\n")
        f.write(f"libkfac {libkfac.library_version}, torch {torch.__version__}, {platform.machine()}, "
                f"{args.seeds} seeds, {args.iterations} Newton iterations, full batch, curvature batch "
                f"{CURVATURE_FRACTION:.0%}, λ₀ 1, LM 2/3 · 3/2, ξ 0.1, ≤ 250 CG iterations, Armijo; "
                "protocol in benchmarks/training/README.md (\"Added in the Newton-CG session\").\n\n")
        f.write("L* and the SGD-momentum / K-FAC figures are those of the default run's full-batch rows "
                "(training.md). Seconds are CPU seconds of the training steps on one core.\n\n")
        f.write("| problem | preconditioner | L* | final loss | Newton iterations to L* | CPU s to L* "
                "| CG iterations per Newton step (mean, median, max) | ms per Newton step | SGD-m / K-FAC: iterations, s to L* |\n")
        f.write("|---|---|---|---|---|---|---|---|---|\n")
        for name, kind, level, final, its, secs, cg_mean, cg_med, cg_max, ms in rows:
            ref = L_STAR[name]
            f.write(f"| {name} | {kind} | {fmt(level)} | {final} | {its} | {secs} | {cg_mean:.1f}, {cg_med:g}, {cg_max} "
                    f"| {ms:.0f} | {ref['sgd'][0]}, {fmt(ref['sgd'][1])} / {fmt(ref['kfac'][0])}, {fmt(ref['kfac'][1])} |\n")
    print(f"wrote {path} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
