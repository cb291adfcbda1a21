"""EKFAC against the eigen and Cholesky strategies on ae-digits at batch 256, with the tuned K-FAC
settings of the main table (lr 0.316, λ 0.1, sampled Fisher, inverses every 20 steps; tuned for
Cholesky K-FAC, not for EKFAC), through trainers.run_task: iterations and CPU seconds to the
target loss L* = 19.5 (SGD-momentum's), final loss, median step time. Not part of run.py's
protocol: a quick check, 3 seeds.

    PYTHONPATH=bindings/python KFAC_LIBRARY=.build/release/libkfac.so python3 benchmarks/training/ekfac_compare.py
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainers  # noqa: E402

TARGET = 19.5
rows = []
for strategy in ("eigen", "ekfac", "cholesky"):
    finals, iterations, seconds, steps = [], [], [], []
    for seed in range(3):
        task = trainers.make_task("ae-digits", "kfac", 256, 600, 10, seed, 0.316, damping=0.1, inverse_strategy=strategy)
        result = trainers.run_task(task)
        hit = next((c for c in result["curve"] if c[1] is not None and c[1] <= TARGET), None)
        finals.append(result["final_loss"])
        iterations.append(hit[0] if hit else float("inf"))
        seconds.append(hit[2] if hit else float("inf"))
        steps.append(result["step_ms_median"])
        print(strategy, seed, result["final_loss"], hit, result["step_ms_median"], flush=True)
    rows.append(dict(strategy=strategy, final_loss=float(np.median(finals)), iterations=iterations,
                     cpu_seconds=[round(s, 3) for s in seconds], step_ms=float(np.median(steps))))
print(json.dumps(rows, indent=1))
