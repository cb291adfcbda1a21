"""torch.distributed (gloo, CPU) through KFACPreconditioner(process_group=...): world sizes 2, 3
and 4 spawned with torch.multiprocessing, each rank training on an uneven slice of a union batch
(equal slices for the lazy reduce), gradients averaged over the union batch by the test. Every
rank's directions must equal each other bitwise and one process's on the union batch to rtol
1e-12 (float64), for the eigen, Cholesky and EKFAC strategies (EKFAC: paired recording and the
scaling exchange, with bases refreshed at steps 0, 2, 4 and S folded in between), and
block-tridiagonal K-FAC (tridiagonal=True: the two Linear layers linked)."""

import os
import socket
import tempfile

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from libkfac.torch import KFACPreconditioner

ROWS, STEPS = 12, 5


def _model(strategy=None):
    torch.manual_seed(0)
    if strategy in ("ekfac", "tridiagonal"):
        # Factors of full rank after the first batch (12 rows; the flattened 64 inputs would leave
        # A rank-deficient): EKFAC's S between refreshes is formed in the bases of the last
        # refresh, and a degenerate eigenspace's basis — so S — would depend on rounding, not
        # on the union batch alone.
        return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                             nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1, groups=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _batches():
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(ROWS, 2, 4, 4, generator=g, dtype=torch.float64),
             torch.randint(0, 3, (ROWS,), generator=g)) for _ in range(STEPS)]


def _slices(world, even):
    if even:
        return [(ROWS * r // world, ROWS * (r + 1) // world) for r in range(world)]
    total = world * (world + 1) // 2
    bounds = [ROWS * (r * (r + 1) // 2) // total for r in range(world + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _kwargs(strategy, reduce):
    extra = {}
    if strategy == "ekfac":
        extra = dict(damping=1e-2)  # S + λ: small S entries would amplify rounding (see _model)
    if strategy == "tridiagonal":  # the linked Linear(4, 6) → Linear(6, 3); eigen elsewhere
        strategy, extra = "eigen", dict(tridiagonal=True, damping=5e-2, pi_damping=True)
    return dict(inverse_strategy=strategy, inverse_update_period=2, kl_clip=1e-2, lr=0.1,
                distributed_reduce=reduce, input_shapes={"0": (4, 4)}, num_threads=1, **extra)


def _directions(model):
    return torch.cat([p.grad.reshape(-1).clone() for p in model.parameters()])


def _run(model, pre, batches, lo, hi, world, group):
    """STEPS steps on rows [lo, hi) of each batch; the gradient is the union mean loss's."""
    out = []
    for x, y in batches:
        model.zero_grad()
        loss = nn.functional.cross_entropy(model(x[lo:hi]), y[lo:hi])  # the local mean: hooks scale by rows
        loss.backward()
        for p in model.parameters():
            p.grad.mul_((hi - lo) / ROWS)
            if group is not None:
                dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
        pre.step()
        out.append(_directions(model))
        with torch.no_grad():
            for p in model.parameters():
                p.sub_(0.1 * p.grad)
    return torch.stack(out)


def _worker(rank, world, port, strategy, reduce, result_dir):
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.set_num_threads(1)
        batches = _batches()
        lo, hi = _slices(world, reduce == "lazy")[rank]
        model = _model(strategy)
        pre = KFACPreconditioner(model, process_group=True, **_kwargs(strategy, reduce))
        directions = _run(model, pre, batches, lo, hi, world, True)
        torch.save(directions, os.path.join(result_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# World 4 (the size) runs Cholesky and EKFAC on uneven slices of 1, 2, 4 and 5 rows; few
# spawns keep the test's time bounded (each process imports torch).
@pytest.mark.parametrize("world,strategy,reduce", [(2, "eigen", "eager"), (4, "cholesky", "eager"),
                                                   (3, "eigen", "lazy"), (4, "ekfac", "eager"),
                                                   (4, "tridiagonal", "eager")])
def test_ranks_match_one_process_on_the_union_batch(world, strategy, reduce):
    model = _model(strategy)
    pre = KFACPreconditioner(model, **_kwargs(strategy, reduce))
    expected = _run(model, pre, _batches(), 0, ROWS, 1, None)
    with tempfile.TemporaryDirectory() as result_dir:
        mp.spawn(_worker, args=(world, _free_port(), strategy, reduce, result_dir), nprocs=world, join=True)
        ranks = [torch.load(os.path.join(result_dir, f"rank{r}.pt")) for r in range(world)]
    for r in range(1, world):
        assert torch.equal(ranks[r], ranks[0]), f"rank {r} differs from rank 0"
    scale = expected.abs().max().item()
    difference = (ranks[0] - expected).abs().max().item() / scale
    print(f"world {world}, {strategy}, {reduce}: max relative difference to one process {difference:.2e}")
    assert difference <= 1e-12
