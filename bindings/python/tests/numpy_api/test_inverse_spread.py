"""inverse_spread through the numpy API: a bool parameter; off and on agree at the period's first
step and whenever nothing is re-inverted, and differ where spreading re-inverts a block from a
newer factor (the library's own tests check which step's factors each block's inverse holds)."""

import numpy as np

import libkfac as kfac

SHAPES = [(6, 5), (5, 4), (4, 3)]  # costs 7³+5³, 6³+4³, 5³+3³: phases 0, 1, 2 with Ti = 3


def _run(spread, period=3, steps=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    with kfac.Optimizer(np.float64, inverse_update_period=period, inverse_spread=spread, kl_clip=0,
                        damping=0.05) as opt:
        assert opt.inverse_spread is spread
        for i, o in SHAPES:
            opt.add_dense(i, o)
        for _ in range(steps):
            for layer, (i, o) in enumerate(SHAPES):
                opt.record_inputs(layer, rng.standard_normal((4, i)))
                opt.record_output_grads(layer, rng.standard_normal((4, o)))
            w = [rng.standard_normal((o, i)) for i, o in SHAPES]
            b = [rng.standard_normal(o) for i, o in SHAPES]
            opt.step(w, b)
            out.append(w)
    return out


def test_spread_is_a_bool_and_reinverts_one_block_per_step():
    off, on = _run(False), _run(True)
    for layer in range(3):
        np.testing.assert_array_equal(on[0][layer], off[0][layer])  # step 0: every block inverted
    # Step 1: block 1 (phase 1) re-inverted from step 1's factors, the others keep step 0's.
    np.testing.assert_array_equal(on[1][0], off[1][0])
    assert not np.allclose(on[1][1], off[1][1])
    np.testing.assert_array_equal(on[1][2], off[1][2])
    # Step 3 (k ≡ 0): unspread re-inverts everything; spread only block 0.
    np.testing.assert_array_equal(on[3][0], off[3][0])
    assert not np.allclose(on[3][1], off[3][1]) and not np.allclose(on[3][2], off[3][2])


def test_period_one_spreads_nothing():
    for a, b in zip(_run(False, period=1), _run(True, period=1)):
        for x, y in zip(a, b):
            np.testing.assert_array_equal(x, y)
