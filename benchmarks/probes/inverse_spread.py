"""Largest step over the median step with inverse_spread off and on, interleaved in one process
(issue 14, item 4(a)): PyTorch MLP 784-W-W-10 on random data, batch 256, SGD-momentum after
KFACPreconditioner.step(), inverses every 10 steps, torch's and the library's default threads.

    KFAC_LIBRARY=.build/release/libkfac.so python3 benchmarks/probes/inverse_spread.py [W] [steps] [eigen|cholesky]

Prints, per setting, the median, largest and mean step after the first period and the median of
each step of the period (the step that carries the inversions shows there)."""
import os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bindings", "python"))
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from libkfac.torch import KFACPreconditioner
W = int(sys.argv[1]) if len(sys.argv) > 1 else 1024
steps = int(sys.argv[2]) if len(sys.argv) > 2 else 60
strategy = sys.argv[3] if len(sys.argv) > 3 else "eigen"
torch.manual_seed(0)
x = torch.randn(256, 784); y = torch.randint(0, 10, (256,))
runs = {}
for spread in (False, True):
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(784, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU(), nn.Linear(W, 10))
    pre = KFACPreconditioner(model, damping=1e-2, inverse_update_period=10, inverse_strategy=strategy,
                             inverse_spread=spread)
    runs[spread] = (model, pre, torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9))
times = {False: [], True: []}
for k in range(steps):
    for spread, (model, pre, opt) in runs.items():  # interleaved: both under the same load
        t0 = time.perf_counter()
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        pre.step()
        opt.step()
        times[spread].append(time.perf_counter() - t0)
for spread, t in times.items():
    t = np.array(t[10:])  # from the second period on (step 0 inverts every block)
    print(f"W={W} {strategy} threads={torch.get_num_threads()} spread={spread}: median {1e3*np.median(t):.0f} ms, "
          f"max {1e3*t.max():.0f} ms, max/median {t.max()/np.median(t):.2f}, mean {1e3*t.mean():.0f} ms; "
          f"per step of the period: {[round(1e3*float(np.median(t[i::10]))) for i in range(min(10, len(t)))]} ms")
