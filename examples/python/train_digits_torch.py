#!/usr/bin/env python3
"""Train a small MLP (or CNN) on the handwritten digits with PyTorch and libkfac's K-FAC.

Three runs from the same initial weights and the same minibatch order:

  * K-FAC: plain SGD whose gradients are first preconditioned by
    libkfac.torch.KFACPreconditioner;
  * SGD with momentum alone;
  * Adam.

The model is 64-128-64-10 with tanh activations and a mean cross-entropy loss; with
--model cnn it is a small CNN on the 8x8 images (Conv2d 1->8 3x3, Conv2d 8->16 3x3 stride 2 in
2 groups, Linear 256->10), whose convolutions K-FAC preconditions with the KFC approximation
(--conv-approximation sua for SUA). The data is
data/digits.bin of this repository (1797 8x8 images from scikit-learn, see data/README.md):
the first 1500 examples train, the last 297 test. Pixels are scaled by 1/16.

Run from anywhere, after building the library (swift build -c release --product kfac):

    python3 examples/python/train_digits_torch.py [--epochs N] [--model mlp|cnn]

The libkfac package is imported from bindings/python of this checkout unless it is installed.
Everything is seeded; the run takes a few seconds on two CPU cores.
"""

import argparse
import os
import struct
import sys
import time

import numpy as np
import torch
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DATA_PATH = os.path.join(REPO_ROOT, "data", "digits.bin")

try:
    from libkfac.torch import KFACPreconditioner
except ImportError:  # not installed: use the bindings of this checkout
    sys.path.insert(0, os.path.join(REPO_ROOT, "bindings", "python"))
    from libkfac.torch import KFACPreconditioner

TRAIN_SIZE = 1500
BATCH_SIZE = 64
SEED = 0


def load_digits(path=DATA_PATH):
    """Reads digits.bin: magic b"DIGITS01", uint32 n, uint32 d (little-endian), n*d uint8
    pixels (0..16), n uint8 labels. Returns float32 pixels scaled to [0, 1] and int64 labels."""
    with open(path, "rb") as file:
        blob = file.read()
    if blob[:8] != b"DIGITS01":
        raise SystemExit(f"{path}: not a DIGITS01 file")
    n, d = struct.unpack_from("<II", blob, 8)
    expected = 16 + n * d + n
    if len(blob) != expected:
        raise SystemExit(f"{path}: {len(blob)} bytes, expected {expected} for n={n}, d={d}")
    pixels = np.frombuffer(blob, dtype=np.uint8, count=n * d, offset=16).reshape(n, d)
    labels = np.frombuffer(blob, dtype=np.uint8, count=n, offset=16 + n * d)
    if pixels.max() > 16 or labels.max() > 9:
        raise SystemExit(f"{path}: values out of range")
    x = torch.from_numpy(pixels.astype(np.float32) / 16.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def make_model(kind="mlp"):
    """The 64-128-64-10 tanh MLP, or the small CNN, with the same initial weights on every
    call. Both take the flat [N, 64] pixels."""
    torch.manual_seed(SEED)
    if kind == "cnn":
        return nn.Sequential(
            nn.Unflatten(1, (1, 8, 8)),
            nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),                       # [N, 8, 8, 8]
            nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.Tanh(),  # [N, 16, 4, 4]
            nn.Flatten(),
            nn.Linear(16 * 4 * 4, 10),
        )
    return nn.Sequential(
        nn.Linear(64, 128), nn.Tanh(),
        nn.Linear(128, 64), nn.Tanh(),
        nn.Linear(64, 10),
    )


def evaluate(model, x, y):
    """(mean cross-entropy, accuracy) of the model on (x, y)."""
    model.eval()
    with torch.no_grad():
        logits = model(x)
        loss = nn.functional.cross_entropy(logits, y).item()
        accuracy = (logits.argmax(dim=1) == y).float().mean().item()
    model.train()
    return loss, accuracy


def train(name, model, optimizer, data, epochs, preconditioner=None):
    """Trains with the given optimizer (and K-FAC preconditioner); prints one line per epoch
    and returns (final train loss, final test loss, final test accuracy, seconds)."""
    x_train, y_train, x_test, y_test = data
    order = np.random.default_rng(SEED)  # same minibatch order for every run
    start = time.perf_counter()
    print(f"\n== {name}")
    for epoch in range(1, epochs + 1):
        permutation = torch.from_numpy(order.permutation(len(x_train)))
        running, batches = 0.0, 0
        for first in range(0, len(x_train), BATCH_SIZE):
            index = permutation[first:first + BATCH_SIZE]
            optimizer.zero_grad()
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            loss.backward()
            if preconditioner is not None:
                preconditioner.step()
            optimizer.step()
            running += loss.item()
            batches += 1
        test_loss, test_accuracy = evaluate(model, x_test, y_test)
        print(f"  epoch {epoch:2d}  train loss {running / batches:.4f}  "
              f"test loss {test_loss:.4f}  test accuracy {100 * test_accuracy:5.1f}%")
    seconds = time.perf_counter() - start
    train_loss, _ = evaluate(model, x_train, y_train)
    test_loss, test_accuracy = evaluate(model, x_test, y_test)
    return train_loss, test_loss, test_accuracy, seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=10, help="epochs per optimizer (default 10)")
    parser.add_argument("--model", choices=["mlp", "cnn"], default="mlp", help="default mlp")
    parser.add_argument("--conv-approximation", choices=["kfc", "sua"], default="kfc",
                        help="K-FAC approximation of the CNN's convolutions (default kfc)")
    args = parser.parse_args()

    # The model is tiny: one PyTorch thread is as fast as several, and it keeps PyTorch's
    # OpenMP workers from spinning on the cores that libkfac's OpenBLAS threads need.
    torch.set_num_threads(1)
    x, y = load_digits()
    data = (x[:TRAIN_SIZE], y[:TRAIN_SIZE], x[TRAIN_SIZE:], y[TRAIN_SIZE:])
    print(f"digits: {len(x)} examples of {x.shape[1]} pixels; "
          f"{TRAIN_SIZE} train, {len(x) - TRAIN_SIZE} test; batch {BATCH_SIZE}; model {args.model}")

    results = {}

    model = make_model(args.model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.2)
    kfac_pre = KFACPreconditioner(
        model,
        lr=lambda: sgd.param_groups[0]["lr"],  # the KL clip follows the optimizer's rate
        damping=0.03,
        kl_clip=0.01,
        factor_decay=0.95,
        factor_update_period=1,
        inverse_update_period=10,
        inverse_strategy="eigen",
        loss_reduction="mean",  # cross_entropy averages over the batch
        conv_approximation=args.conv_approximation,  # used by the CNN's convolutions only
    )
    results["K-FAC + SGD (lr 0.2)"] = train("K-FAC + SGD", model, sgd, data, args.epochs, kfac_pre)
    kfac_pre.close()

    model = make_model(args.model)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    results["SGD-momentum (lr 0.1)"] = train("SGD-momentum", model, sgd, data, args.epochs)

    model = make_model(args.model)
    adam = torch.optim.Adam(model.parameters(), lr=1e-3)
    results["Adam (lr 1e-3)"] = train("Adam", model, adam, data, args.epochs)

    print(f"\nafter {args.epochs} epochs:")
    print(f"  {'optimizer':24s} {'train loss':>10s} {'test loss':>10s} {'test acc':>9s} {'time':>7s}")
    for name, (train_loss, test_loss, accuracy, seconds) in results.items():
        print(f"  {name:24s} {train_loss:10.4f} {test_loss:10.4f} {100 * accuracy:8.1f}% "
              f"{seconds:6.2f}s")


if __name__ == "__main__":
    main()
