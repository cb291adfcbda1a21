"""The output factors' curvature source (KFACPreconditioner(curvature=...)): K-FAC's sampled Fisher
(one sample per example, the main table's setting) against KFLR (the exact expected Gauss-Newton
blocks, K = output_dim columns per example), the Monte-Carlo Fisher with 4 samples and KFRA
(batch-averaged recursion on the dense chain), through trainers.run_task with the tuned K-FAC
settings of the main table (lr 0.316, λ 0.1, inverses every 20 steps; tuned for the sampled
Fisher, not for these): iterations and CPU seconds to the target loss L* (SGD-momentum's), final
loss, median step time. Not part of run.py's protocol: a quick check, 3 seeds.

    PYTHONPATH=bindings/python KFAC_LIBRARY=.build/release/libkfac.so python3 benchmarks/training/curvature_compare.py
"""

import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import trainers  # noqa: E402

# (problem, batch, iterations, lr, damping, target L*)
SETTINGS = [("ae-digits", 256, 600, 0.316, 0.1, 19.5), ("mlp-digits", 256, 300, 0.316, 0.1, None)]
VARIANTS = [("sampled Fisher", {}), ("KFLR", {"curvature": "kflr"}),
            ("MC, 4 samples", {"curvature": "mc", "mc_samples": 4}), ("KFRA", {"curvature": "kfra"})]
seeds = int(os.environ.get("SEEDS", "3"))
rows = []
for problem, batch, T, lr, damping, target in SETTINGS:
    for name, extra in VARIANTS:
        finals, iterations, seconds, steps = [], [], [], []
        for seed in range(seeds):
            task = trainers.make_task(problem, "kfac", batch, T, 10, seed, lr, damping=damping, **extra)
            result = trainers.run_task(task)
            hit = None
            if target is not None:
                hit = next((c for c in result["curve"] if c[1] is not None and c[1] <= target), None)
            finals.append(result["final_loss"])
            iterations.append(hit[0] if hit else float("inf"))
            seconds.append(hit[2] if hit else float("inf"))
            steps.append(result["step_ms_median"])
            print(problem, name, seed, result["final_loss"], hit, result["step_ms_median"], flush=True)
        rows.append(dict(problem=problem, variant=name, final_loss=float(np.median(finals)),
                         finals=[round(f, 4) for f in finals], iterations=iterations,
                         cpu_seconds=[round(s, 3) for s in seconds], step_ms=float(np.median(steps))))
print(json.dumps(rows, indent=1))
