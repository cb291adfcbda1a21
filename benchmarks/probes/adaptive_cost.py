"""The adaptive step's cost against a fixed-damping K-FAC step, interleaved in one process on one
thread (issue 14, item 3): the convergence benchmark's trainers (benchmarks/training/trainers.py)
on one of its problems at batch 256 — fixed damping (λ 0.1, lr 0.316, KL clip; the tuned
ae-digits setting), the untuned adaptive mode with its default products (for the benchmark's
models: written out by hand over the fx trace, libkfac/torch/_traced_jvp.py), with torch.func's
vmapped jvp (the default before the written-out products), and with one jvp per tangent; all
three evaluate the loss after the update only on the steps whose report adjusts λ (the default
since 0.2), and "adaptive-every-step-loss" is the default products evaluating it every step.

    KFAC_LIBRARY=.build/release/libkfac.so python3 benchmarks/probes/adaptive_cost.py [problem] [steps]

Prints the median and mean CPU milliseconds per step (after 10 steps) and their ratios."""
import os, sys, time
# One thread, as the benchmark's runs (run.py): set before numpy, torch or libkfac load OpenBLAS.
# (Without it OpenBLAS's idle threads add CPU time to every step: fixed-damping CNN steps measured
# 16.6 ms against 8.8 ms with one thread.)
for _variable in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_variable] = "1"
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "training")); sys.path.insert(0, os.path.join(HERE, "..", "..", "bindings", "python"))
import numpy as np, torch
import trainers
trainers._set_single_thread()
problem_name = sys.argv[1] if len(sys.argv) > 1 else "ae-digits"
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 200
problem = trainers.get_problem(problem_name)
trainers._warm_up_forward_ad(problem)
methods = {}
for name, method, lr, opts in [("fixed", "kfac", 0.316, dict(damping=0.1)), ("adaptive-batched", "adaptive", 0.0, {}),
                               ("adaptive-every-step-loss", "adaptive", 0.0, {}),
                               ("adaptive-vmap", "adaptive", 0.0, {}), ("adaptive-loop", "adaptive", 0.0, {})]:
    torch.manual_seed(0)
    model = problem.make_model()
    task = trainers.make_task(problem_name, method, 256, steps, steps, 0, lr, **opts)
    step = trainers._build(task, problem, model)
    if name == "adaptive-vmap":
        step.preconditioner._use_traced_products = False
    if name == "adaptive-every-step-loss":
        pre = step.preconditioner
        original = pre.adaptive_step
        pre.adaptive_step = lambda *a, _o=original, **k: _o(*a, every_step_loss=True, **k)
    if name == "adaptive-loop":
        pre = step.preconditioner
        original = pre.adaptive_step
        pre.adaptive_step = lambda *a, _o=original, **k: _o(*a, batched_products=False, **k)
    methods[name] = step
batches = trainers._Batches(problem.size, 256, 0)
times = {n: [] for n in methods}
for k in range(steps):
    index = batches.next()
    x, y = problem.x[index], problem.target[index]
    for name, step in methods.items():
        c0 = time.process_time(); step(x, y); times[name].append(time.process_time() - c0)
med = {n: 1e3 * float(np.median(t[10:])) for n, t in times.items()}
mean = {n: 1e3 * float(np.mean(t[10:])) for n, t in times.items()}
print(problem_name, "median ms:", {n: round(v, 2) for n, v in med.items()}, "mean ms:", {n: round(v, 2) for n, v in mean.items()})
print("ratio to fixed (median):", {n: round(v / med['fixed'], 2) for n, v in med.items()}, "(mean):", {n: round(v / mean['fixed'], 2) for n, v in mean.items()})
