"""Block-tridiagonal K-FAC (KFACPreconditioner(tridiagonal=True): every consecutive pair of Linear
layers linked) against block-diagonal K-FAC with the Cholesky strategy (the same factored π
damping), through trainers.run_task with the tuned K-FAC settings of the main table (lr 0.316,
λ 0.1, sampled Fisher, inverses every 20 steps; tuned for block-diagonal K-FAC): iterations and
CPU seconds to the target loss L* (SGD-momentum's), final loss, median step time. Not part of
run.py's protocol: a quick check, 3 seeds.

    PYTHONPATH=bindings/python KFAC_LIBRARY=.build/release/libkfac.so python3 benchmarks/training/tridiagonal_compare.py
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainers  # noqa: E402

# (problem, batch, iterations, lr, damping, target L*)
SETTINGS = [("ae-digits", 256, 600, 0.316, 0.1, 19.5), ("mlp-digits", 256, 300, 0.316, 0.1, None)]
rows = []
for problem, batch, T, lr, damping, target in SETTINGS:
    for tridiagonal in (False, True):
        finals, iterations, seconds, steps = [], [], [], []
        for seed in range(3):
            task = trainers.make_task(problem, "kfac", batch, T, 10, seed, lr, damping=damping,
                                      inverse_strategy="cholesky", tridiagonal=tridiagonal)
            result = trainers.run_task(task)
            hit = None
            if target is not None:
                hit = next((c for c in result["curve"] if c[1] is not None and c[1] <= target), None)
            finals.append(result["final_loss"])
            iterations.append(hit[0] if hit else float("inf"))
            seconds.append(hit[2] if hit else float("inf"))
            steps.append(result["step_ms_median"])
            print(problem, "tridiagonal" if tridiagonal else "block-diagonal", seed, result["final_loss"], hit,
                  result["step_ms_median"], flush=True)
        rows.append(dict(problem=problem, tridiagonal=tridiagonal, final_loss=float(np.median(finals)),
                         finals=[round(f, 4) for f in finals], iterations=iterations,
                         cpu_seconds=[round(s, 3) for s in seconds], step_ms=float(np.median(steps))))
print(json.dumps(rows, indent=1))
