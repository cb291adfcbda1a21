"""The experimental distributed calls of libkfac.Optimizer in an in-process fake world: P
handles, a SUM over their packed buffers as the allreduce, uneven slices of a union batch;
directions bit-identical across ranks and equal to one handle's on the union batch."""

import threading

import numpy as np
import pytest

import libkfac as kfac

ROWS = 11


def _optimizer(rank, size, strategy):
    linked = strategy == "tridiagonal"  # the two layers linked (block-tridiagonal), eigen otherwise
    opt = kfac.Optimizer(np.float64, inverse_strategy="eigen" if linked else strategy, inverse_update_period=2,
                         kl_clip=1e-2, **(dict(damping=5e-2, pi_damping=True) if linked else {}))
    opt.add_dense(6, 4, bias=True)
    opt.add_dense(4, 3, bias=False)
    if linked:
        opt.link_layers(0, 1)
    opt.set_world(rank, size)
    return opt


@pytest.mark.parametrize("size", [1, 2, 3, 4])
@pytest.mark.parametrize("strategy", ["eigen", "cholesky", "ekfac", "tridiagonal"])
def test_fake_world_matches_the_union_batch(size, strategy):
    rng = np.random.default_rng(3)
    ref = _optimizer(0, 1, strategy)
    ranks = [_optimizer(r, size, strategy) for r in range(size)]
    assert ranks[-1].world == (size - 1, size)
    total = size * (size + 1) // 2
    bounds = [ROWS * (r * (r + 1) // 2) // total for r in range(size + 1)]

    class World:
        def __init__(self):
            self.buffers = []

    for _ in range(5):
        x0, g0 = rng.standard_normal((ROWS, 6)), rng.standard_normal((ROWS, 4))
        x1, g1 = rng.standard_normal((ROWS, 4)), rng.standard_normal((ROWS, 3))
        grads = [rng.standard_normal((4, 6)), rng.standard_normal(4), rng.standard_normal((3, 4))]
        for opt, (lo, hi) in [(ref, (0, ROWS))] + list(zip(ranks, zip(bounds[:-1], bounds[1:]))):
            if hi > lo and strategy == "ekfac":  # paired: S needs per-example gradients
                opt.record_examples(0, x0[lo:hi], g0[lo:hi]); opt.record_examples(1, x1[lo:hi], g1[lo:hi])
            elif hi > lo:
                opt.record_inputs(0, x0[lo:hi]); opt.record_output_grads(0, g0[lo:hi])
                opt.record_inputs(1, x1[lo:hi]); opt.record_output_grads(1, g1[lo:hi])
        # The fake allreduce: every rank packs, then every rank receives the sum (EKFAC: the
        # scalings after the inverses, in the bases just exchanged).
        for what in ("statistics", "inverses", "scalings"):
            if not ranks[0].exchange_due(what):
                continue
            packs = [getattr(o, "pack_" + what)() for o in ranks]
            total_pack = np.sum(packs, axis=0)
            for o in ranks:
                getattr(o, "unpack_" + what)(total_pack.copy())
        expected = [g.copy() for g in grads]
        ref.step([expected[0], expected[2]], [expected[1], None])
        directions = []
        for o in ranks:
            d = [g.copy() for g in grads]
            o.step([d[0], d[2]], [d[1], None])
            directions.append(np.concatenate([a.ravel() for a in d]))
        for d in directions[1:]:
            assert np.array_equal(d, directions[0])
        want = np.concatenate([a.ravel() for a in expected])
        assert np.max(np.abs(directions[0] - want)) <= 1e-12 * np.max(np.abs(want))
        if strategy == "tridiagonal":  # the cross factors are the union batch's
            for got, want in zip(ranks[-1].cross_factors(0), ref.cross_factors(0)):
                assert np.max(np.abs(got - want)) <= 1e-12 * np.max(np.abs(want))
        if strategy == "ekfac":  # S itself is the union batch's
            for layer in (0, 1):
                s_ref = ref.ekfac_scaling(layer)
                assert np.max(np.abs(ranks[-1].ekfac_scaling(layer) - s_ref)) <= 1e-12 * np.max(np.abs(s_ref))


def test_synchronize_and_errors():
    opt = _optimizer(0, 1, "eigen")
    opt.record_inputs(0, np.ones((2, 6))); opt.record_output_grads(0, np.ones((2, 4)))
    opt.record_inputs(1, np.ones((2, 4))); opt.record_output_grads(1, np.ones((2, 3)))
    calls = []
    opt.synchronize(lambda a: calls.append(a.size))
    assert len(calls) == 2 and calls[0] == opt.exchange_size("statistics")
    with pytest.raises(kfac.KFACError) as info:
        opt.set_world(2, 2)
    assert info.value.status == kfac.KFAC_ERROR_INVALID_ARGUMENT
    with pytest.raises(ValueError):
        opt.exchange_size("gradients")
    assert not opt.exchange_due("scalings")  # not EKFAC
    with pytest.raises(kfac.KFACError) as info:
        opt.pack_scalings()
    assert info.value.status == kfac.KFAC_ERROR_INVALID_ARGUMENT
    assert opt.distributed_reduce == "eager"
    opt.distributed_reduce = "lazy"
    assert opt.get_param("distributed_reduce") == "lazy"


def test_model_sums_match_the_union_solve():
    """Two ranks' model sums (uneven rows, one rank empty at the second step) solve to the union
    batch's α and μ on both ranks."""
    rng = np.random.default_rng(8)
    ref = _optimizer(0, 1, "eigen")
    ranks = [_optimizer(r, 2, "eigen") for r in range(2)]
    for opt in [ref] + ranks:
        opt.kl_clip = 0.0
    rows = 7
    for cut in (3, 0, 5):
        x0, g0 = rng.standard_normal((rows, 6)), rng.standard_normal((rows, 4))
        x1, g1 = rng.standard_normal((rows, 4)), rng.standard_normal((rows, 3))
        grads = [rng.standard_normal((4, 6)), rng.standard_normal(4), rng.standard_normal((3, 4))]
        z, jd, jp = (rng.standard_normal((rows, 3)) for _ in range(3))
        for opt, (lo, hi) in [(ref, (0, rows)), (ranks[0], (0, cut)), (ranks[1], (cut, rows))]:
            if hi > lo:
                opt.record_inputs(0, x0[lo:hi]); opt.record_output_grads(0, g0[lo:hi])
                opt.record_inputs(1, x1[lo:hi]); opt.record_output_grads(1, g1[lo:hi])
        for what in ("statistics", "inverses"):
            if ranks[0].exchange_due(what):
                total = sum(getattr(o, "pack_" + what)() for o in ranks)
                for o in ranks:
                    getattr(o, "unpack_" + what)(total.copy())
        for opt in [ref] + ranks:
            d = [g.copy() for g in grads]
            opt.step([d[0], d[2]], [d[1], None])
        first = ref.step_count == 1
        want = ref.solve_step_size(z, jd, None if first else jp)
        sums = [o.pack_model_sums(z[lo:hi], jd[lo:hi], None if first else jp[lo:hi])
                for o, (lo, hi) in zip(ranks, [(0, cut), (cut, rows)])]
        total = sums[0] + sums[1]
        got = [o.solve_model_sums(total) for o in ranks]
        assert got[0] == got[1]
        assert got[0][1] == pytest.approx(want[0], rel=1e-12)
        assert got[0][2] == pytest.approx(want[1], rel=1e-12, abs=1e-300)


class _ThreadWorld:
    """P ranks on P threads; ``allreduce(rank)`` returns a SUM-allreduce over a barrier that sums
    the ranks' buffers in rank order (the same bits on every rank), failing on every rank at
    call ``failing_call`` by raising."""

    def __init__(self, size, failing_call=None):
        self.size, self.failing_call = size, failing_call
        self.barrier = threading.Barrier(size)
        self.published = [None] * size
        self.calls = [0] * size

    def allgatherv(self, rank):
        def gather(mine, counts, displacements):
            call = self.calls[rank]
            self.calls[rank] += 1
            if call == self.failing_call:
                raise ConnectionError(f"collective {call} failed")
            self.published[rank] = mine
            self.barrier.wait()
            out = np.concatenate([self.published[r] for r in range(self.size)])
            self.barrier.wait()
            assert out.size == displacements[-1] + counts[-1]
            return out
        return gather

    def allreduce(self, rank):
        def reduce(array):
            call = self.calls[rank]
            self.calls[rank] += 1
            if call == self.failing_call:
                raise ConnectionError(f"collective {call} failed")
            self.published[rank] = array
            self.barrier.wait()
            total = np.zeros_like(array)
            for r in range(self.size):
                total += self.published[r]
            self.barrier.wait()
            return total
        return reduce

    def run(self, body):
        errors = [None] * self.size

        def target(r):
            try:
                body(r)
            except BaseException as error:  # reported to the main thread
                errors[r] = error

        threads = [threading.Thread(target=target, args=(r,)) for r in range(self.size)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        return errors


def _record(opt, data, lo, hi):
    if hi > lo:
        x0, g0, x1, g1 = data
        opt.record_inputs(0, x0[lo:hi]); opt.record_output_grads(0, g0[lo:hi])
        opt.record_inputs(1, x1[lo:hi]); opt.record_output_grads(1, g1[lo:hi])


def _step_data(rng):
    return ((rng.standard_normal((ROWS, 6)), rng.standard_normal((ROWS, 4)),
             rng.standard_normal((ROWS, 4)), rng.standard_normal((ROWS, 3))),
            [rng.standard_normal((4, 6)), rng.standard_normal(4), rng.standard_normal((3, 4))])


def _directions(opt, grads):
    d = [g.copy() for g in grads]
    opt.step([d[0], d[2]], [d[1], None])
    return np.concatenate([a.ravel() for a in d])


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("size", [2, 4])
def test_synchronize_on_threads_matches_the_union_batch(size, gather):
    """Optimizer.synchronize (kfac_distributed_synchronize) with a collective on threads."""
    rng = np.random.default_rng(8)
    steps = [_step_data(rng) for _ in range(5)]
    ref = _optimizer(0, 1, "eigen")
    expected = []
    for data, grads in steps:
        _record(ref, data, 0, ROWS)
        expected.append(_directions(ref, grads))
    ranks = [_optimizer(r, size, "eigen") for r in range(size)]
    total = size * (size + 1) // 2
    bounds = [ROWS * (r * (r + 1) // 2) // total for r in range(size + 1)]
    world = _ThreadWorld(size)
    got = [[] for _ in range(size)]

    def body(r):
        for data, grads in steps:
            _record(ranks[r], data, bounds[r], bounds[r + 1])
            ranks[r].synchronize(world.allreduce(r), world.allgatherv(r) if gather else None)
            got[r].append(_directions(ranks[r], grads))

    assert world.run(body) == [None] * size
    for k, want in enumerate(expected):
        for r in range(1, size):
            assert np.array_equal(got[r][k], got[0][k])
        assert np.max(np.abs(got[0][k] - want)) <= 1e-12 * np.max(np.abs(want))


@pytest.mark.parametrize("failing_call", [0, 1])
def test_synchronize_failure_leaves_every_handle_unchanged(failing_call):
    """An allreduce raising at the statistics (0) or inverse (1) exchange: the exception reaches
    every rank, each handle's state equals an untouched twin's, and the retry gives the union
    batch's directions."""
    size = 3
    rng = np.random.default_rng(9)
    (data, grads), = [_step_data(rng)]
    ranks = [_optimizer(r, size, "cholesky") for r in range(size)]
    twins = [_optimizer(r, size, "cholesky") for r in range(size)]
    bounds = [0, 2, 6, ROWS]
    for r in range(size):
        _record(ranks[r], data, bounds[r], bounds[r + 1])
        _record(twins[r], data, bounds[r], bounds[r + 1])
    world = _ThreadWorld(size, failing_call)
    errors = world.run(lambda r: ranks[r].synchronize(world.allreduce(r)))
    assert all(isinstance(e, ConnectionError) for e in errors), errors
    assert all(isinstance(e.__cause__, kfac.KFACError) and e.__cause__.status == kfac.KFAC_ERROR_CALLBACK
               for e in errors)
    for r in range(size):
        assert ranks[r].state_bytes() == twins[r].state_bytes()
    world.failing_call = None
    got = [None] * size
    assert world.run(lambda r: (ranks[r].synchronize(world.allreduce(r)),
                                got.__setitem__(r, _directions(ranks[r], grads)))) == [None] * size
    ref = _optimizer(0, 1, "cholesky")
    _record(ref, data, 0, ROWS)
    want = _directions(ref, grads)
    for r in range(size):
        assert np.array_equal(got[r], got[0])
    assert np.max(np.abs(got[0] - want)) <= 1e-12 * np.max(np.abs(want))


@pytest.mark.parametrize("size", [1, 3])
def test_gathered_inverses_match_the_union_batch(size):
    """pack_owned_inverses / unpack_gathered_inverses by hand: the segments (one full inverse
    pack in all on the first step) give every rank the union batch's directions, bitwise alike."""
    rng = np.random.default_rng(12)
    ref = _optimizer(0, 1, "eigen")
    ranks = [_optimizer(r, size, "eigen") for r in range(size)]
    bounds = [ROWS * r // size for r in range(size + 1)]
    for step in range(4):
        data, grads = _step_data(rng)
        _record(ref, data, 0, ROWS)
        for r in range(size):
            _record(ranks[r], data, bounds[r], bounds[r + 1])
        if ranks[0].exchange_due("statistics"):
            total = np.sum([o.pack_statistics() for o in ranks], axis=0)
            for o in ranks:
                o.unpack_statistics(total.copy())
        if ranks[0].exchange_due("inverses"):
            counts, displacements = ranks[0].inverse_layout()
            assert displacements == [sum(counts[:r]) for r in range(size)]
            if step == 0:
                assert sum(counts) == ranks[0].exchange_size("inverses")
            gathered = np.concatenate([o.pack_owned_inverses() for o in ranks])
            for o in ranks:
                o.unpack_gathered_inverses(gathered)
        want = _directions(ref, grads)
        got = [_directions(o, grads) for o in ranks]
        for d in got[1:]:
            assert np.array_equal(d, got[0])
        assert np.max(np.abs(got[0] - want)) <= 1e-12 * np.max(np.abs(want))
