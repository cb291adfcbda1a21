#!/usr/bin/env python3
"""Soak (issue 15): a long run of a small model through the Python bindings, with periodic
state saves and loads, watching memory and finiteness — a benchmark-style script, not a timed
test. `make soak` runs it (STEPS=10000 by default).

The model: a 32-64-10 tanh MLP with softmax cross-entropy (mean loss, so
``loss_reduction="mean"``) on synthetic data labelled by a fixed random teacher, K-FAC
directions applied with plain SGD. Every SAVE_EVERY steps the state is saved to a file and
loaded back into the same handle, and every LOAD_FRESH_EVERY steps into a fresh optimizer that
replaces the old one (so handles are created and freed too). The resident set size (VmRSS) is
read after a warm-up and at the end; the run fails if any direction, weight or loss is not finite,
or if the RSS grew by more than RSS_TOLERANCE_KIB.
"""
import argparse
import os
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bindings", "python"))
import libkfac  # noqa: E402


def rss_kib():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return -1


def make_optimizer(dims):
    opt = libkfac.Optimizer(np.float64, damping=1e-2, loss_reduction="mean", kl_clip=1e-2, learning_rate=0.1,
                            inverse_update_period=10)
    for i in range(len(dims) - 1):
        opt.add_dense(dims[i], dims[i + 1])
    return opt


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=int(os.environ.get("STEPS", 10000)))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--save-every", type=int, default=250)
    parser.add_argument("--load-fresh-every", type=int, default=1000)
    parser.add_argument("--warmup", type=int, default=500)
    parser.add_argument("--rss-tolerance-kib", type=int, default=2048)
    args = parser.parse_args()

    rng = np.random.default_rng(15)
    dims = [32, 64, 10]
    teacher = rng.standard_normal((10, 32))
    w1 = rng.standard_normal((64, 32)) / np.sqrt(32)
    b1 = np.zeros(64)
    w2 = rng.standard_normal((10, 64)) / np.sqrt(64)
    b2 = np.zeros(10)
    lr = 0.1
    opt = make_optimizer(dims)
    directory = tempfile.mkdtemp(prefix="kfac-soak-")
    path = os.path.join(directory, "state.ckpt")
    start_rss = None
    losses = []
    t0 = time.perf_counter()
    for k in range(args.steps):
        x = rng.standard_normal((args.batch, 32))
        y = np.argmax(x @ teacher.T, axis=1)
        h = np.tanh(x @ w1.T + b1)
        logits = h @ w2.T + b2
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(args.batch), y] + 1e-300))
        dlogits = p.copy()
        dlogits[np.arange(args.batch), y] -= 1
        dlogits /= args.batch                          # gradient of the mean loss
        dw2 = dlogits.T @ h
        db2 = dlogits.sum(axis=0)
        dh = (dlogits @ w2) * (1 - h * h)
        dw1 = dh.T @ x
        db1 = dh.sum(axis=0)
        if opt.wants_statistics:
            opt.record_inputs(0, x)
            opt.record_output_grads(0, dh)
            opt.record_inputs(1, h)
            opt.record_output_grads(1, dlogits)
        opt.step([dw1, dw2], [db1, db2])
        for d in (dw1, db1, dw2, db2):
            if not np.all(np.isfinite(d)):
                sys.exit(f"step {k}: a direction is not finite")
        w1 -= lr * dw1
        b1 -= lr * db1
        w2 -= lr * dw2
        b2 -= lr * db2
        if not np.isfinite(loss):
            sys.exit(f"step {k}: the loss is not finite")
        losses.append(loss)
        if (k + 1) % args.save_every == 0:
            opt.save(path)
            if (k + 1) % args.load_fresh_every == 0:
                fresh = make_optimizer(dims)
                fresh.load(path)
                opt.close()
                opt = fresh
            else:
                opt.load(path)
        if k + 1 == args.warmup:
            start_rss = rss_kib()
    seconds = time.perf_counter() - t0
    end_rss = rss_kib()
    opt.close()
    os.unlink(path)
    os.rmdir(directory)
    first, last = np.mean(losses[:100]), np.mean(losses[-100:])
    growth = end_rss - start_rss
    print(f"soak: {args.steps} steps, batch {args.batch}, save+load every {args.save_every} "
          f"(fresh handle every {args.load_fresh_every}): {seconds:.1f} s, {args.steps / seconds:.0f} steps/s")
    print(f"soak: loss {first:.4f} (first 100 steps) -> {last:.4f} (last 100), every direction finite")
    print(f"soak: VmRSS {start_rss} KiB after {args.warmup} steps, {end_rss} KiB at the end ({growth:+d} KiB)")
    if growth > args.rss_tolerance_kib:
        sys.exit(f"soak: memory grew by {growth} KiB (> {args.rss_tolerance_kib})")


if __name__ == "__main__":
    main()
