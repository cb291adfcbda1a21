"""The MNIST-1D CNN of the convergence benchmark (benchmarks/training/problems.py: strided,
padded Conv1d layers from one input channel, then a Linear layer) through KFACPreconditioner:
its first-step directions against the independent references of references/conv.py and
references/dense.py, with KFC, SUA and channel grouping (the three K-FAC variants the
benchmark runs)."""

import numpy as np
import pytest
import torch
from torch import nn

import libkfac as kfac
from libkfac.torch import KFACPreconditioner
from test_torch_conv import CaptureAll, flat_grad, reference_directions
from testutil import assert_close


def mnist1d_cnn(channels=6, length=40):
    """The benchmark's architecture (kernel 5 stride 2 padding 1, then kernel 3 stride 2
    padding 1 twice, ReLU), with fewer channels so that the reference stays small."""
    after = length
    for kernel in (5, 3, 3):
        after = (after + 2 - kernel) // 2 + 1
    return nn.Sequential(
        nn.Unflatten(1, (1, length)),
        nn.Conv1d(1, channels, 5, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Conv1d(channels, channels, 3, stride=2, padding=1), nn.ReLU(),
        nn.Flatten(),
        nn.Linear(channels * after, 10),
    ), after


@pytest.mark.parametrize(
    "options",
    [dict(), dict(conv_approximation="sua"), dict(input_group_size=3, output_group_size=2)],
    ids=["kfc", "sua", "kfc-grouped"],
)
def test_mnist1d_cnn_directions_equal_reference(options):
    torch.manual_seed(3)
    model, after = mnist1d_cnn()
    model = model.double()
    damping, kl_clip, lr, examples = 0.05, 1e-3, 0.1, 7
    pre = KFACPreconditioner(model, damping=damping, kl_clip=kl_clip, lr=lr, **options)
    capture = CaptureAll(model)
    x = torch.randn(examples, 40, dtype=torch.float64)
    y = torch.randint(0, 10, (examples,))
    nn.functional.cross_entropy(model(x), y).backward()
    expected, nu = reference_directions(
        model, capture, damping, kl_clip, lr, examples, options.get("conv_approximation", "kfc"),
        options.get("input_group_size", 0), options.get("output_group_size", 0))
    pre.step()
    assert_close(pre.last_kl_scale, nu, np.float64, scale=5.0)
    assert [name for name, _ in pre.layers] == ["1", "3", "5", "8"]
    for name, module in pre.layers:
        assert_close(flat_grad(module), expected[name], np.float64, scale=5.0)
    info = [pre.optimizer.layer_info(i) for i in range(4)]
    assert [i.kind for i in info] == [kfac.KFAC_LAYER_CONV2D] * 3 + [kfac.KFAC_LAYER_DENSE]
    assert pre.input_sizes == {"1": (40,), "3": (19,), "5": (10,)} and after == 5
    capture.remove()
    pre.close()
