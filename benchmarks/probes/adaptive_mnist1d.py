"""Why the untuned adaptive mode misses L* on MNIST-1D (issue 14, item 3): per-step traces of
K-FAC's adaptive mode on the convergence benchmark's problems, with the benchmark's own
trainers (benchmarks/training/trainers.py: same models, seeds, batches, sampled-Fisher draws
and untuned settings as run.py's "adaptive" task), one thread.

    KFAC_LIBRARY=.build/release/libkfac.so OPENBLAS_NUM_THREADS=1 \\
        python3 benchmarks/probes/adaptive_mnist1d.py [--problem mlp-mnist1d] [--seeds 0-4] \\
        [--T 1000] [--set KEY=VALUE ...] [--sgd] [--trace] [--diagnose] [--json out.json]

For each seed it prints the iteration at which the whole-training-set loss first reaches L*
(--target, default the L* of the last default run), the loss at the protocol's T_K and at the
end, λ and γ at the end, the medians of α, μ and ρ, and where a run stopped (a non-finite loss,
or the KFACError adaptive_step raises when the loss after its update is not finite: the harness
counts both as diverged). ``--trace`` also prints every step with ρ < 0, |μ| > 5 or a batch loss
that more than doubled, and the last step. ``--diagnose`` recomputes every one-candidate solve
in float64 from the same output products (the gradient, the directions D and δ₀ taken from the
model, the categorical Fisher forms centred): α, μ, M(δ), the two parts of α's denominator
(DᵀFD/n and λ‖D‖²), vᵀFv/n and λ‖δ₀‖² of δ₀, and cos² between D and δ₀ in the metric F + λI.
``--set`` overrides a setting of trainers.ADAPTIVE_DEFAULTS (``damping``, ``factor_damping``, …)
or sets a library parameter the harness leaves at its default (``damping_min``,
``factor_damping_ratio``). ``--sgd`` also runs tuned SGD-momentum (the last default run's lr and
momentum) on the same seeds, for the loss at the same iterations.

The figures of benchmarks/training/README.md, "Adaptive mode on MNIST-1D", came from:
    --T 1000 --sgd --trace                       (mlp-mnist1d; and --problem cnn-mnist1d)
    --problem cnn-mnist1d --seeds 0 --T 625 --trace --diagnose
    --T 500 --seeds 5-19 --trace                 (mlp-mnist1d)
    --T 1000 --set damping_min=1e-4              (both MNIST-1D problems; also 1e-3)
    --T 500 --set damping=1.0 --set factor_damping=1.0 [--set damping_min=1e-4]
    --problem ae-digits --seeds 0-2 [--set damping_min=1e-4]   (and ae-mnist)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time

for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_variable, "1")

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "training"))
sys.path.insert(0, os.path.join(HERE, "..", "..", "bindings", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import trainers  # noqa: E402
import libkfac  # noqa: E402
from libkfac.torch import KFACPreconditioner  # noqa: E402

#: L* of the last full default run (benchmarks/results/training.md, 2026-12-07): tuned
#: SGD-momentum's median final loss after T (1000 for MNIST-1D, 2000 ae-digits, 1000 ae-mnist).
TARGETS = {"mlp-mnist1d": 0.006029, "cnn-mnist1d": 0.002216, "ae-digits": 16.89, "ae-mnist": 127.2}
#: The protocol's T_K (K-FAC's budget) and eval_every / sparse_after of the default profile.
BUDGETS = {"mlp-mnist1d": (500, 10, 0), "cnn-mnist1d": (500, 10, 0), "ae-digits": (1000, 10, 0),
           "ae-mnist": (250, 10, 0)}
#: Tuned SGD-momentum of the same run (lr, momentum).
SGD_TUNED = {"mlp-mnist1d": (0.1, 0.9), "cnn-mnist1d": (0.1, 0.9), "ae-digits": (0.0316, 0.9),
             "ae-mnist": (0.00316, 0.9)}
#: KFACPreconditioner options that trainers.ADAPTIVE_DEFAULTS does not carry.
EXTRA = ("damping_min", "factor_damping_ratio")


class TracedAdaptiveStep(trainers._AdaptiveStep):
    """trainers._AdaptiveStep with every AdaptiveStepResult kept, and the extra options."""

    def __init__(self, model, problem, options, extra):
        super().__init__(model, problem, options)
        for key, value in extra.items():
            setattr(self.preconditioner.optimizer, key, value)
        self.results = []
        self.diagnose = False

    def __call__(self, x, y) -> float:
        pre = self.preconditioner
        self.model.zero_grad(set_to_none=False)
        output = self.model(x)
        if self.sampled and pre.optimizer.wants_statistics:
            pre.sampled_fisher_backward(output, self.distribution)
        loss = self.problem.loss(output, y)
        loss.backward()
        diagnose = self.diagnose
        if diagnose:
            params = pre._adaptive_parameters()
            gradient = [p.grad.detach().double().clone() for p in params]
            previous = None if pre._previous_update is None else [d.detach().double().clone() for d in pre._previous_update]
        pre.step()
        if diagnose:
            direction = [p.grad.detach().double().clone() for p in params]
        gamma_before = pre.optimizer.factor_damping
        lam_before = pre.optimizer.damping
        captured = {}
        if diagnose:
            solve = pre.optimizer.solve_step_size_candidates

            def capture(outputs, products, jp, code, _solve=solve):
                captured.update(outputs=np.array(outputs, dtype=np.float64), products=[np.array(a, dtype=np.float64) for a in products],
                                jp=None if jp is None else np.array(jp, dtype=np.float64))
                return _solve(outputs, products, jp, code)

            pre.optimizer.solve_step_size_candidates = capture
        try:
            result = pre.adaptive_step(x, lambda out: self.problem.loss(out, y), self.distribution, momentum=self.momentum)
        finally:
            if diagnose:
                del pre.optimizer.solve_step_size_candidates
        update_norm = math.sqrt(sum(float((d.double() ** 2).sum()) for d in pre._previous_update))
        record = dict(lam_min=pre.optimizer.damping_min, loss=float(loss.detach()), after=result.loss_after, M=result.predicted_change,
                      rho=result.rho, alpha=result.alpha, mu=result.mu, lam=lam_before,
                      lam_after=result.damping, gamma=gamma_before, gamma_after=result.factor_damping,
                      chosen=result.chosen, candidates=result.candidates, update_norm=update_norm,
                      max_logit=float(output.detach().abs().max()))
        if diagnose and result.candidates == 1:
            record.update(model_in_float64(captured, gradient, direction, previous, lam_before))
        self.results.append(record)
        return float(loss.detach())


def fisher_forms(z, u, v):
    """Σ over rows of uᵀBu, uᵀBv, vᵀBv with B = diag(p) − p pᵀ (categorical), centred (two-pass)."""
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    uc = u - (p * u).sum(axis=1, keepdims=True)
    out = [float((p * uc * uc).sum())]
    if v is not None:
        vc = v - (p * v).sum(axis=1, keepdims=True)
        out += [float((p * uc * vc).sum()), float((p * vc * vc).sum())]
    return out


def model_in_float64(captured, gradient, direction, previous, lam):
    """The quadratic model of the solve recomputed in float64 from the same products: the
    conditioning of the 2×2 system (cos² of the angle between D and δ₀ in the metric F + λI),
    α and μ solved in float64, M(δ) and the terms of a11."""
    dot = lambda a, b: float(sum(float((x * y).sum()) for x, y in zip(a, b)))
    z, u, v = captured["outputs"], captured["products"][0], captured["jp"]
    n = z.shape[0]
    forms = fisher_forms(z, u, v)
    a11 = forms[0] / n + lam * dot(direction, direction)
    b1 = -dot(gradient, direction)
    out = dict(uFu=forms[0] / n, lam_dd=lam * dot(direction, direction), gD=-b1, D_norm=math.sqrt(dot(direction, direction)))
    if v is None or previous is None:
        alpha = -b1 / a11
        out.update(alpha64=alpha, mu64=0.0, M64=0.5 * b1 * alpha, cos2=float("nan"))
        return out
    a12 = -forms[1] / n - lam * dot(direction, previous)
    a22 = forms[2] / n + lam * dot(previous, previous)
    b2 = dot(gradient, previous)
    det = a11 * a22 - a12 * a12
    alpha = -(a22 * b1 - a12 * b2) / det
    mu = -(a11 * b2 - a12 * b1) / det
    out.update(alpha64=alpha, mu64=mu, M64=0.5 * (b1 * alpha + b2 * mu), cos2=a12 * a12 / (a11 * a22),
               vFv=forms[2] / n, lam_pp=lam * dot(previous, previous))
    return out


def run(problem_name, seed, T, eval_every, options, extra, dtype, diagnose=False):
    """One adaptive run as trainers.run_task does it, traced. Returns the dict of the run."""
    trainers._set_single_thread()
    problem = trainers.get_problem(problem_name)
    trainers._warm_up_forward_ad(problem)
    task = trainers.make_task(problem_name, "adaptive", 256, T, eval_every, seed, 0.0, **options)
    torch.manual_seed(seed)
    model = problem.make_model().to(dtype)
    x_all = problem.x.to(dtype)
    target_all = problem.target.to(dtype) if problem.target.is_floating_point() else problem.target
    step = TracedAdaptiveStep(model, problem, task["options"], extra)
    step.diagnose = diagnose
    torch.manual_seed(seed + trainers.FISHER_SEED_OFFSET)
    batches = trainers._Batches(problem.size, 256, seed)

    def full_loss():
        with torch.no_grad():
            return float(problem.loss(model(x_all), target_all))

    curve, error, cpu = [(0, full_loss())], None, 0.0
    k = 0
    while k < T:
        index = batches.next()
        c0 = time.process_time()
        try:
            batch_loss = step(x_all[index], target_all[index])
        except libkfac.KFACError as exc:
            error = dict(step=k + 1, message=str(exc))
            break
        cpu += time.process_time() - c0
        k += 1
        if not math.isfinite(batch_loss) or batch_loss > trainers.DIVERGED:
            error = dict(step=k, message=f"batch loss {batch_loss}")
            break
        if k % eval_every == 0 or k == T:
            curve.append((k, full_loss()))
            if not math.isfinite(curve[-1][1]):
                error = dict(step=k, message=f"training loss {curve[-1][1]}")
                break
    step.close()
    return dict(problem=problem_name, seed=seed, T=T, options=options, extra=extra, curve=curve, error=error,
                steps=k, trace=step.results, cpu_seconds=cpu)


def run_sgd(problem_name, seed, T, eval_every):
    lr, momentum = SGD_TUNED[problem_name]
    task = trainers.make_task(problem_name, "sgd", 256, T, eval_every, seed, lr, momentum=momentum)
    result = trainers.run_task(task)
    return [(int(i), v) for i, v, *_ in result["curve"]]


def first_reach(curve, target):
    for k, value in curve:
        if value is not None and value <= target:
            return k
    return None


def loss_at(curve, k):
    values = [v for i, v in curve if i == k]
    return values[0] if values else None


def parse_seeds(text):
    if "-" in text:
        a, b = text.split("-")
        return list(range(int(a), int(b) + 1))
    return [int(s) for s in text.split(",")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--problem", default="mlp-mnist1d", choices=sorted(BUDGETS))
    parser.add_argument("--seeds", default="0-4")
    parser.add_argument("--T", type=int, default=None, help="iterations (default: the protocol's T_K)")
    parser.add_argument("--target", type=float, default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--sgd", action="store_true")
    parser.add_argument("--trace", action="store_true")
    parser.add_argument("--diagnose", action="store_true", help="recompute every solve in float64 (slow)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    TK, eval_every, _ = BUDGETS[args.problem]
    T = args.T or TK
    target = args.target if args.target is not None else TARGETS[args.problem]
    options, extra = {}, {}
    for item in args.set:
        key, value = item.split("=", 1)
        value = float(value) if any(c in value for c in ".e") else int(value)
        (extra if key in EXTRA else options)[key] = value
    dtype = torch.float32
    print(f"{args.problem}: adaptive mode, T = {T}, L* = {target}, overrides {options} {extra}, "
          "float32", flush=True)
    runs = []
    for seed in parse_seeds(args.seeds):
        r = run(args.problem, seed, T, eval_every, options, extra, dtype, args.diagnose)
        tr = r["trace"]
        med = lambda key: float(np.median([t[key] for t in tr if math.isfinite(t[key])])) if tr else float("nan")
        reach = first_reach(r["curve"], target)
        line = (f"seed {seed}: reaches L* at {reach if reach is not None else 'never'}; loss at {TK}: "
                f"{loss_at(r['curve'], TK)}, at {r['steps']}: {r['curve'][-1][1]:.5g}; final λ {tr[-1]['lam_after']:.3g}, "
                f"γ {tr[-1]['gamma_after']:.3g}; median α {med('alpha'):.3g}, μ {med('mu'):.3g}, ρ {med('rho'):.3g}; "
                f"{r['cpu_seconds']:.1f} CPU s")
        floor = next((i + 1 for i, t in enumerate(tr) if t["lam_after"] <= 1.0001 * tr[0]["lam_min"]), None)
        reports = [tr[k - 1]["rho"] for k in range(5, (floor or len(tr)) + 1, 5)]
        line += (f"; λ at its floor from step {floor}; LM reports before it: {len(reports)}, "
                 f"{sum(1 for x in reports if x < 0.75)} with ρ < 3/4; ρ over steps 1–80: "
                 f"{min(t['rho'] for t in tr[:80]):.3g}–{max(t['rho'] for t in tr[:80]):.3g}")
        if r["error"]:
            line += f"; STOPPED at step {r['error']['step']}: {r['error']['message']}"
        if args.sgd:
            r["sgd_curve"] = run_sgd(args.problem, seed, max(T, 1000), eval_every)
            line += f"; SGD-m reaches L* at {first_reach(r['sgd_curve'], target)}, loss at {T}: {loss_at(r['sgd_curve'], T)}"
            line += "; loss at 100/300/500 adaptive " + " / ".join(f"{loss_at(r['curve'], k):.3g}" for k in (100, 300, 500)
                                                               if loss_at(r['curve'], k) is not None)
            line += ", SGD-m " + " / ".join(f"{loss_at(r['sgd_curve'], k):.3g}" for k in (100, 300, 500))
        print(line, flush=True)
        if args.trace:
            for i, t in enumerate(tr):
                if not (t["rho"] >= 0) or i + 1 == len(tr) or abs(t["mu"]) > 5 or t["after"] > 2 * t["loss"]:
                    print(f"   step {i + 1}: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                         for k, v in t.items()), flush=True)
        runs.append(r)
    if args.json:
        with open(args.json, "w") as file:
            json.dump(runs, file)


if __name__ == "__main__":
    main()
