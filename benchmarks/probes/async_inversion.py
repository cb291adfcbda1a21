"""Largest step over the median step with async_inversion off, 'newest' and 'deterministic'
(issue 14, item 4(b); goal: largest/median <= 1.5 with async on): PyTorch MLP 784-W-W-10 on random
data, batch 256, SGD-momentum after KFACPreconditioner.step(), inverses every 10 steps, torch's
and the library's default threads. One command, ratios printed:

    KFAC_LIBRARY=.build/release/libkfac.so python3 benchmarks/probes/async_inversion.py [W ...] [--steps N] [--strategy eigen|cholesky]
        [--torch-threads N]    (e.g. OPENBLAS_NUM_THREADS=1 ... --torch-threads 1: one core left for the background)

(default W = 1024 2048, 50 steps, eigen). Settings run one after the other, not interleaved: the
background inversion of one setting would otherwise run during another setting's steps. Each
setting's first period is left out (step 0 inverts every block in the step). Per setting: the
median, largest and mean step, largest/median, and the median of each step of the period (a
step that carries or waits for the inversions shows there; its largest value over the median
step is printed too, being robust to a single spike of load from other processes)."""
import argparse, os, sys, time
sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bindings", "python"))
import numpy as np, torch, torch.nn as nn, torch.nn.functional as F
from libkfac.torch import KFACPreconditioner

parser = argparse.ArgumentParser()
parser.add_argument("widths", nargs="*", type=int, default=[1024, 2048])
parser.add_argument("--steps", type=int, default=50)
parser.add_argument("--strategy", default="eigen")
parser.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads(N) (0: torch's default). With 1, and OPENBLAS_NUM_THREADS=1 in the "
                         "environment, the step leaves one of 2 cores idle for the background inversion: the case "
                         "the mode is for (a GPU trainer's idle host cores)")
args = parser.parse_args()
if args.torch_threads:
    torch.set_num_threads(args.torch_threads)
PERIOD = 10
torch.manual_seed(0)
x = torch.randn(256, 784); y = torch.randint(0, 10, (256,))
summary = []
for W in args.widths:
    for mode in ("off", "newest", "deterministic"):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(784, W), nn.ReLU(), nn.Linear(W, W), nn.ReLU(), nn.Linear(W, 10))
        pre = KFACPreconditioner(model, damping=1e-2, inverse_update_period=PERIOD, inverse_strategy=args.strategy,
                                 async_inversion=mode)
        opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
        times = []
        for k in range(args.steps):
            t0 = time.perf_counter()
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            pre.step()
            opt.step()
            times.append(time.perf_counter() - t0)
        pre.close()
        t = np.array(times[PERIOD:])
        ratio = t.max() / np.median(t)
        per_step = [float(np.median(t[i::PERIOD])) for i in range(min(PERIOD, len(t)))]
        summary.append((W, mode, ratio, max(per_step) / np.median(t)))
        print(f"W={W} {args.strategy} torch threads={torch.get_num_threads()} async={mode}: median {1e3*np.median(t):.0f} ms, "
              f"max {1e3*t.max():.0f} ms, max/median {ratio:.2f}, mean {1e3*t.mean():.0f} ms; per step of the "
              f"period: {[round(1e3*v) for v in per_step]} ms", flush=True)
print("largest/median step (goal <= 1.5 with async on); beside it the slowest step of the period")
print("(median over periods) / median, which a single load spike does not move:")
for W, mode, ratio, slowest in summary:
    print(f"  W={W:5d} async={mode:13s} largest/median {ratio:5.2f} {'met' if ratio <= 1.5 else 'missed':6s}"
          f"  slowest-step-of-period/median {slowest:5.2f}")
