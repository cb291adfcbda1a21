"""Per-step overhead of libkfac's PyTorch integration against peers in the same loop (issue 14,
item 5): ASDL (``asdfghjkl``: ``KfacGradientMaker``) and curvlinops (``curvlinops-for-pytorch``:
``KFACLinearOperator`` + ``KFACInverseLinearOperator``).

One Python process; in every round each method trains its own copy of the same model on the same
batch, in turn (the order rotates from round to round); the overhead of a method in a round is its
step time minus the plain SGD step of that round (same model, same batch). Every library runs at
its default threads (PyTorch's intra-op threads, OpenBLAS's threads). Wall-clock time
(``time.perf_counter``): the libraries use several threads.

What is compared (stated, and checked on one batch before timing):
- the empirical Fisher (gradients of the mean loss's own backward pass, no sampling);
- "cholesky": factored Tikhonov damping with π (Martens & Grosse §6.3), the factors inverted by
  Cholesky — libkfac ``inverse_strategy='cholesky'``, ASDL's ``KfacGradientMaker`` (its only
  K-FAC inverse), curvlinops ``use_heuristic_damping=True``;
- "eigen": exact damping through eigendecompositions, (d_G d_Aᵀ + λ) — libkfac
  ``inverse_strategy='eigen'``, curvlinops ``use_exact_damping=True`` (ASDL has no such K-FAC
  inverse; its EKFAC is another method);
- the models have no biases: ASDL preconditions a bias with the output factor alone while libkfac
  and curvlinops (``separate_weight_and_bias=False``) fold it into [W | b]; without biases all
  three compute the same direction, which the check below verifies (factors up to the split of a
  scalar between A and G, which neither damping depends on, and directions);
- schedules: "every step" (factors and inverses every step) and "periods 1/10" (factors every
  step, inverses every 10 steps). curvlinops has no moving average or schedule: in "periods 1/10"
  it computes factors (its own forward and backward pass over the batch) and inverses every 10
  steps and reuses the inverse in between, which is LESS work than the others do (they fold
  statistics into the factors every step); the ratio against it is therefore conservative.

    KFAC_LIBRARY=.build/release/libkfac.so python3 benchmarks/peers/same_loop.py [--quick]
                 [--out benchmarks/results/peers.md] [--budget SECONDS]

Prints per configuration the median overhead per step of every method, libkfac's over the best
peer's (goal ≤ 0.5), and the largest single step over the median step of each method; writes the
same tables with the machine, versions, load averages and commit to ``--out``.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(ROOT, "bindings", "python"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=UserWarning)

import libkfac  # noqa: E402
from libkfac.torch import KFACPreconditioner  # noqa: E402

try:
    import asdl  # the PyPI package asdfghjkl installs the module asdl
    from asdl import KfacGradientMaker, PreconditioningConfig
except ImportError:  # pragma: no cover - reported in the output
    asdl = None
try:
    import curvlinops
    from curvlinops import KFACInverseLinearOperator, KFACLinearOperator
except ImportError:  # pragma: no cover
    curvlinops = None

LR = 1e-4  # small: the timing must not depend on where random-label training goes
DAMPING = 1e-2
FACTOR_DECAY = 0.95  # libkfac's default β; ASDL's ema_decay = 1 − β


# ---------------------------------------------------------------------------------------------
# Models and data
# ---------------------------------------------------------------------------------------------

def mlp(width: int) -> nn.Module:
    return nn.Sequential(nn.Linear(784, width, bias=False), nn.Tanh(), nn.Linear(width, width, bias=False),
                         nn.Tanh(), nn.Linear(width, 10, bias=False))


def cnn() -> nn.Module:
    """A small CIFAR-sized CNN: 3→32→64 3×3 convolutions (padding 1), ReLU, max pooling (2×2,
    then 4×4) and a dense classifier on 64·4·4 features."""
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.ReLU(), nn.MaxPool2d(4),
                         nn.Flatten(), nn.Linear(64 * 4 * 4, 10, bias=False))


class Problem:
    def __init__(self, name, make_model, input_shape, batch):
        self.name, self.make_model, self.input_shape, self.batch = name, make_model, input_shape, batch

    def data(self, seed: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randn((self.batch,) + self.input_shape, generator=g)
        y = torch.randint(0, 10, (self.batch,), generator=g)
        return x, y


# ---------------------------------------------------------------------------------------------
# Methods: each owns a copy of the model and an SGD optimizer; step(x, y) is one training step.
# ---------------------------------------------------------------------------------------------

class SGDMethod:
    label = "SGD"

    def __init__(self, model):
        self.model = model
        self.opt = torch.optim.SGD(model.parameters(), lr=LR)

    def gradient(self, x, y):
        self.opt.zero_grad(set_to_none=False)
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        return loss

    def step(self, x, y):
        self.gradient(x, y)
        self.opt.step()

    def directions(self, x, y):
        """The preconditioned gradient of one step (before the SGD update), per parameter."""
        self.gradient(x, y)
        return [p.grad.clone() for p in self.model.parameters()]


class LibkfacMethod(SGDMethod):
    def __init__(self, model, strategy, period, **options):
        super().__init__(model)
        self.label = "libkfac " + strategy + "".join(f" {k}={v}" for k, v in options.items())
        self.pre = KFACPreconditioner(model, lr=LR, damping=DAMPING, kl_clip=0.0, factor_decay=FACTOR_DECAY,
                                      factor_update_period=1, inverse_update_period=period,
                                      inverse_strategy=strategy, pi_damping=True, **options)

    def step(self, x, y):
        self.gradient(x, y)
        self.pre.step()
        self.opt.step()

    def directions(self, x, y):
        self.gradient(x, y)
        self.pre.step()
        return [p.grad.clone() for p in self.model.parameters()]

    def factors(self):
        return [self.pre.optimizer.factors(i) for i in range(len(self.pre._layers))]


class ASDLMethod(SGDMethod):
    def __init__(self, model, period, batch, ema_decay=1 - FACTOR_DECAY):
        super().__init__(model)
        self.label = "ASDL"
        # data_size: ASDL divides its summed statistics by it (the batch: a mean over examples).
        # ema_decay: the weight of the new batch. ASDL's average starts from zero (libkfac's from
        # the first batch), so the check uses 1.0 (the newest batch only, as libkfac's first step);
        # the timing uses 1 − β, the same work as libkfac's moving average. (Its default, -1,
        # inverts inside the statistics pass and drops the factors.)
        config = PreconditioningConfig(data_size=batch, damping=DAMPING, preconditioner_upd_interval=period,
                                       curvature_upd_interval=1, ema_decay=ema_decay)
        self.maker = KfacGradientMaker(model, config, fisher_type="fisher_emp", loss_type="cross_entropy")

    def gradient(self, x, y):
        self.opt.zero_grad(set_to_none=False)
        dummy = self.maker.setup_model_call(self.model, x)
        self.maker.setup_loss_call(F.cross_entropy, dummy, y)
        self.maker.forward_and_backward()

    def step(self, x, y):
        self.gradient(x, y)
        self.opt.step()

    def factors(self):
        out = []
        for module in self.model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d)):
                kron = self.maker._get_module_symmatrix(module, "kron")
                out.append((kron.A.double().numpy(), kron.B.double().numpy()))
        return out


class CurvlinopsMethod(SGDMethod):
    def __init__(self, model, strategy, period):
        super().__init__(model)
        self.label = "curvlinops " + strategy
        self.strategy, self.period, self.count, self.inverse = strategy, period, 0, None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.loss = nn.CrossEntropyLoss()

    def _precondition(self, x, y):
        if self.count % self.period == 0:
            self.kfac = KFACLinearOperator(self.model, self.loss, self.params, [(x, y)], check_deterministic=False,
                                           fisher_type="empirical", separate_weight_and_bias=False)
            self.kfac.compute_kronecker_factors()
            self.inverse = KFACInverseLinearOperator(self.kfac, damping=DAMPING,
                                                     use_heuristic_damping=self.strategy == "cholesky",
                                                     use_exact_damping=self.strategy == "eigen")
        self.count += 1
        directions = self.inverse @ [p.grad for p in self.params]
        for p, d in zip(self.params, directions):
            p.grad.copy_(d)

    def step(self, x, y):
        self.gradient(x, y)
        self._precondition(x, y)
        self.opt.step()

    def directions(self, x, y):
        self.gradient(x, y)
        self._precondition(x, y)
        return [p.grad.clone() for p in self.params]

    def factors(self):
        out = []
        for name in self.kfac._mapping:
            out.append((self.kfac._input_covariances[name].double().numpy(),
                        self.kfac._gradient_covariances[name].double().numpy()))
        return out


# ---------------------------------------------------------------------------------------------
# The check: same factors (up to the A/G split) and same directions on one batch
# ---------------------------------------------------------------------------------------------

def _relative(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def _kron_difference(peer, ours) -> float:
    """Relative difference of A⊗G between two factor pairs, without forming it: the split of a
    scalar between A and G (peers differ on it for convolutions) cancels in A⊗G, and neither
    damping depends on it. ‖A⊗G − A'⊗G'‖² = ‖A‖²‖G‖² + ‖A'‖²‖G'‖² − 2⟨A,A'⟩⟨G,G'⟩."""
    (a, g), (a2, g2) = [(np.asarray(m, np.float64), np.asarray(n, np.float64)) for m, n in (peer, ours)]
    if a.shape != a2.shape:  # libkfac keeps a conv's A per input-channel order of the weight
        return float("nan")
    sq = (np.sum(a * a) * np.sum(g * g) + np.sum(a2 * a2) * np.sum(g2 * g2)
          - 2 * np.sum(a * a2) * np.sum(g * g2))
    return float(np.sqrt(max(sq, 0.0)) / np.sqrt(np.sum(a2 * a2) * np.sum(g2 * g2)))


def check_same_settings(problem: Problem, strategy: str, peers, out_lines, tolerance=2e-3) -> bool:
    """One batch, fresh models with the same weights, inverses at this step: the peers' factors
    and directions against libkfac's. Returns whether every difference is below tolerance."""
    torch.manual_seed(1)
    base = problem.make_model()
    x, y = problem.data(12345)

    def copy():
        m = problem.make_model()
        m.load_state_dict(base.state_dict())
        return m

    ours = LibkfacMethod(copy(), strategy, 1)
    reference = ours.directions(x, y)
    our_factors = ours.factors()
    ok = True
    for make in peers:
        peer = make(copy())
        directions = peer.directions(x, y)
        direction_error = max(_relative(d.numpy(), r.numpy()) for d, r in zip(directions, reference))
        factor_error = max(_kron_difference(p, o) for p, o in zip(peer.factors(), our_factors))
        good = direction_error < tolerance and factor_error < tolerance
        ok &= good
        line = (f"check {problem.name} {strategy}: {peer.label}: A⊗G differs by {factor_error:.1e}, "
                f"directions by {direction_error:.1e} (relative, worst layer) — {'same' if good else 'DIFFERENT'}")
        print(line, flush=True)
        out_lines.append("- " + line)
    ours.pre.close()
    return ok


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def run_configuration(problem: Problem, strategy: str, period: int, rounds: int, extra_libkfac, peers,
                      deadline: float):
    """Interleaved rounds; returns {label: np.array of step seconds} (warm-up rounds dropped)."""
    torch.manual_seed(0)
    base = problem.make_model()
    makers = [("SGD", lambda m: SGDMethod(m)), ("libkfac", lambda m: LibkfacMethod(m, strategy, period))]
    makers += [(None, (lambda m, o=o: LibkfacMethod(m, strategy, period, **o))) for o in extra_libkfac]
    makers += [(None, make) for make in peers]
    methods = []
    for _, make in makers:
        m = problem.make_model()
        m.load_state_dict(base.state_dict())
        methods.append(make(m))
    warm = 2
    times = {m.label: [] for m in methods}
    order = list(range(len(methods)))
    batches = [problem.data(r) for r in range(8)]
    done = 0
    for r in range(warm + rounds):
        x, y = batches[r % len(batches)]
        for i in order:
            method = methods[i]
            t0 = time.perf_counter()
            method.step(x, y)
            elapsed = time.perf_counter() - t0
            if r >= warm:
                times[method.label].append(elapsed)
        order = order[1:] + order[:1]
        if r >= warm:
            done += 1
            # A bounded run: stop at the deadline once a whole inverse period (and 5 rounds) is in.
            if time.perf_counter() > deadline and done >= max(5, period + 1):
                break
    for m in methods:
        if isinstance(m, LibkfacMethod):
            m.pre.close()
    return {k: np.asarray(v) for k, v in times.items()}


def summarise(times):
    sgd = times["SGD"]
    rows = {}
    for label, t in times.items():
        overhead = t - sgd
        rows[label] = dict(step=float(np.median(t)), overhead=float(np.median(overhead)),
                           mean_overhead=float(np.mean(overhead)),
                           largest=float(np.max(t) / np.median(t)), rounds=len(t))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="W = 512 and the CNN only, fewer rounds")
    parser.add_argument("--budget", type=float, default=480.0,
                        help="seconds of timing in all (default 480); past twice that, the remaining "
                             "configurations are skipped and the report says so")
    parser.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "peers.md"))
    args = parser.parse_args()

    start = time.time()
    load_start = os.getloadavg()
    problems = [Problem(f"MLP 784-{w}-{w}-10, batch 256", (lambda w=w: mlp(w)), (784,), 256)
                for w in ((512,) if args.quick else (512, 1024, 2048))]
    problems.append(Problem("CNN 3-32-64 (3×3) + dense, 32×32, batch 64", cnn, (3, 32, 32), 64))
    schedules = [("every step", 1, 6), ("periods 1/10", 10, 20)]
    if args.quick:
        schedules = [("every step", 1, 4), ("periods 1/10", 10, 11)]
    configurations = [(p, s, sched) for p in problems for s in ("cholesky", "eigen") for sched in schedules]

    lines = []
    check_lines = []
    all_same = True
    for problem in problems:
        for strategy in ("cholesky", "eigen"):
            peers = []
            if asdl is not None and strategy == "cholesky":
                peers.append(lambda m, b=problem.batch: ASDLMethod(m, 1, b, ema_decay=1.0))
            if curvlinops is not None:
                peers.append(lambda m, s=strategy: CurvlinopsMethod(m, s, 1))
            all_same &= check_same_settings(problem, strategy, peers, check_lines)

    header = ("| model | inverse | schedule | rounds | SGD step | libkfac overhead | ASDL overhead | "
              "curvlinops overhead | libkfac / best peer (medians) | same, mean overheads | goal ≤ 0.5 (medians) | "
              "largest/median step: libkfac, ASDL, "
              "curvlinops |")
    lines.append(header)
    lines.append("|" + "---|" * 12)
    extra_rows = []

    def write(status: str):
        """Writes the report so far (after every configuration: an interrupted run leaves one)."""
        load_end = os.getloadavg()
        elapsed = time.time() - start
        try:
            commit = subprocess.run(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"], capture_output=True,
                                    text=True).stdout.strip()
            # The results directory is left out: this run's own report is written there as it goes.
            dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--untracked-files=no", "--", ".",
                                    ":(exclude)benchmarks/results"], capture_output=True, text=True).stdout.strip()
            commit += " (uncommitted changes)" if dirty else ""
        except OSError:
            commit = "unknown"
        cpu = platform.processor() or "unknown CPU"
        try:
            with open("/proc/cpuinfo") as f:
                for entry in f:
                    if entry.startswith("model name"):
                        cpu = entry.split(":", 1)[1].strip()
                        break
        except OSError:
            pass
        versions = (f"libkfac {libkfac.__version__ if hasattr(libkfac, '__version__') else '?'} (commit {commit}), "
                    f"torch {torch.__version__} ({torch.get_num_threads()} intra-op threads), "
                    f"asdfghjkl {_version('asdfghjkl')}, curvlinops-for-pytorch {_version('curvlinops-for-pytorch')}, "
                    f"Python {platform.python_version()}")
        report = [
            "# Same-loop peer benchmark (`make bench-peers`, benchmarks/peers/same_loop.py)",
            "",
            f"Machine: {os.cpu_count()} CPUs, {cpu}. {versions}.",
            f"Load average at start {load_start[0]:.2f}, at end {load_end[0]:.2f}; run took {elapsed:.0f} s"
            f"{' (--quick)' if args.quick else ''}; {status}.",
            "Overhead = median over rounds of (the method's step − the plain SGD step of the same round, same model, "
            "same batch); libkfac / best peer compares the same kind of inverse. Empirical Fisher, λ = "
            f"{DAMPING}, no KL clip, bias-free models, every library at its default threads.",
            "",
            "Same settings, checked on one batch before timing (factors and directions against libkfac's):",
            "",
            *check_lines,
            "",
            *lines,
            "",
            "libkfac's SUA and channel-grouping variants (overhead; relative to libkfac KFC; relative to the best peer's KFC):",
            "",
            "| model | variant | schedule | overhead | / libkfac KFC | / best peer | largest/median step |",
            "|---|---|---|---|---|---|---|",
            *extra_rows,
            "",
        ]
        os.makedirs(os.path.dirname(args.out), exist_ok=True)
        with open(args.out, "w") as f:
            f.write("\n".join(report))
        return load_end, elapsed

    timing_budget = args.budget
    skipped = 0
    for index, (problem, strategy, (schedule, period, rounds)) in enumerate(configurations):
        remaining = len(configurations) - index
        spent = time.time() - start
        if spent > 2 * timing_budget:  # a loaded machine: keep the run bounded, say what is missing
            skipped = remaining
            print(f"time bound reached ({spent:.0f} s): {remaining} configuration(s) not run", flush=True)
            break
        deadline = time.perf_counter() + max(5.0, (timing_budget - spent) / remaining)
        peers = []
        if asdl is not None and strategy == "cholesky":
            peers.append(lambda m, p=period, b=problem.batch: ASDLMethod(m, p, b))
        if curvlinops is not None:
            peers.append(lambda m, s=strategy, p=period: CurvlinopsMethod(m, s, p))
        extra = []
        if problem.make_model is cnn:
            extra = [dict(conv_approximation="sua"), dict(input_group_size=16, output_group_size=16),
                     dict(conv_approximation="sua", input_group_size=16, output_group_size=16)]
        times = run_configuration(problem, strategy, period, rounds, extra, peers, deadline)
        rows = summarise(times)
        ours = rows[f"libkfac {strategy}"]
        peer_rows = {k: v for k, v in rows.items() if k.startswith("ASDL") or k.startswith("curvlinops")}
        best = min(peer_rows.values(), key=lambda r: r["overhead"]) if peer_rows else None
        ratio = ours["overhead"] / best["overhead"] if best and best["overhead"] > 0 else float("nan")
        # Amortised: mean overhead per step, inversion steps included (curvlinops computes its
        # factors only on those in "periods 1/10", which the medians leave out).
        best_mean = min(peer_rows.values(), key=lambda r: r["mean_overhead"]) if peer_rows else None
        mean_ratio = (ours["mean_overhead"] / best_mean["mean_overhead"]
                      if best_mean and best_mean["mean_overhead"] > 0 else float("nan"))
        asdl_row = rows.get("ASDL")
        curv_row = rows.get(f"curvlinops {strategy}")

        def ms(row):
            return "–" if row is None else f"{1e3 * row['overhead']:.1f} ms"

        def big(row):
            return "–" if row is None else f"{row['largest']:.1f}×"

        line = (f"| {problem.name} | {strategy} | {schedule} | {ours['rounds']} | {1e3 * rows['SGD']['step']:.1f} ms | "
                f"{ms(ours)} | {ms(asdl_row)} | {ms(curv_row)} | {ratio:.2f} | {mean_ratio:.2f} | "
                f"{'met' if ratio <= 0.5 else 'MISSED'} | {big(ours)}, {big(asdl_row)}, {big(curv_row)} |")
        lines.append(line)
        print(line, flush=True)
        for label, row in rows.items():
            if label.startswith("libkfac") and label != f"libkfac {strategy}":
                extra_line = (f"| {problem.name} | {label} | {schedule} | {1e3 * row['overhead']:.1f} ms | "
                              f"{row['overhead'] / ours['overhead']:.2f} | "
                              f"{row['overhead'] / best['overhead'] if best else float('nan'):.2f} | "
                              f"{row['largest']:.1f}× |")
                extra_rows.append(extra_line)
                print(extra_line, flush=True)
        write(f"partial: {index + 1} of {len(configurations)} configurations so far")

    load_end, elapsed = write("complete" if not skipped else f"stopped at the time bound: {skipped} configuration(s) not run")
    print(f"load average {load_start[0]:.2f} → {load_end[0]:.2f}, {elapsed:.0f} s; wrote {args.out}")
    if not all_same:
        print("WARNING: a peer did not compute the same factors/directions (see the check lines)")
        sys.exit(1)


def _version(name: str) -> str:
    try:
        from importlib.metadata import version

        return version(name)
    except Exception:  # noqa: BLE001
        return "not installed"


if __name__ == "__main__":
    main()
