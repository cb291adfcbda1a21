"""Running factors A and G against the per-example reference loop."""

import numpy as np
import pytest

import libkfac as kfac
from references import dense as ref
from testutil import assert_close, random_batch


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_batch_factors_match_per_example_loop(rng, dtype, bias):
    with kfac.Optimizer(dtype) as opt:
        layer = opt.add_dense(5, 3, bias=bias)
        x, g = random_batch(rng, 11, 5, 3, dtype)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        assert not opt.layer_info(layer).has_factors
        opt.update_factors()
        A, G = opt.factors(layer)
        assert A.dtype == np.dtype(dtype) and G.dtype == np.dtype(dtype)
        assert A.shape == ((6, 6) if bias else (5, 5)) and G.shape == (3, 3)
        A_ref, G_ref = ref.batch_factors(x, g, bias)
        assert_close(A, A_ref, dtype)
        assert_close(G, G_ref, dtype)
        info = opt.layer_info(layer)
        assert info.has_factors and not info.has_inverses


def test_several_record_calls_average_over_all_rows(rng, dtype):
    """Micro-batches: each side is averaged over all rows recorded for it (sides may differ)."""
    with kfac.Optimizer(dtype) as opt:
        layer = opt.add_dense(4, 2)
        x1, g1 = random_batch(rng, 3, 4, 2, dtype)
        x2, g2 = random_batch(rng, 7, 4, 2, dtype)
        _, g3 = random_batch(rng, 5, 4, 2, dtype)
        opt.record_inputs(layer, x1)
        opt.record_output_grads(layer, g1)
        opt.record_inputs(layer, x2)
        opt.record_output_grads(layer, g2)
        opt.record_output_grads(layer, g3)
        opt.update_factors()
        A, G = opt.factors(layer)
        assert_close(A, ref.outer_mean(ref.extend(np.vstack([x1, x2]), True)), dtype)
        assert_close(G, ref.outer_mean(np.vstack([g1, g2, g3])), dtype)


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
def test_moving_average_over_two_batches(rng, dtype, bias):
    decay = 0.8
    with kfac.Optimizer(dtype, factor_decay=decay) as opt:
        layer = opt.add_dense(4, 3, bias=bias)
        A_run = G_run = None
        for rows in (6, 9):
            x, g = random_batch(rng, rows, 4, 3, dtype)
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, g)
            opt.update_factors()
            A_batch, G_batch = ref.batch_factors(x, g, bias)
            A_run = ref.ema(A_run, A_batch, decay)
            G_run = ref.ema(G_run, G_batch, decay)
            A, G = opt.factors(layer)
            assert_close(A, A_run, dtype)
            assert_close(G, G_run, dtype)


def test_update_without_pending_statistics_keeps_factors(rng):
    with kfac.Optimizer(np.float64, factor_decay=0.5) as opt:
        layer = opt.add_dense(3, 2)
        x, g = random_batch(rng, 4, 3, 2, np.float64)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        opt.update_factors()
        before = opt.factors(layer)
        opt.update_factors()
        after = opt.factors(layer)
        np.testing.assert_array_equal(before[0], after[0])
        np.testing.assert_array_equal(before[1], after[1])


def test_mean_reduction_multiplies_each_call_by_its_rows(rng, dtype):
    """Gradients of a mean loss (g/N for a call of N rows) give the factors of the sum loss."""
    with kfac.Optimizer(dtype, loss_reduction="mean") as opt:
        layer = opt.add_dense(3, 4)
        x1, g1 = random_batch(rng, 5, 3, 4, dtype)
        x2, g2 = random_batch(rng, 8, 3, 4, dtype)
        opt.record_inputs(layer, x1)
        opt.record_inputs(layer, x2)
        opt.record_output_grads(layer, (g1 / 5).astype(dtype))
        opt.record_output_grads(layer, (g2 / 8).astype(dtype))
        opt.update_factors()
        A, G = opt.factors(layer)
        assert_close(A, ref.outer_mean(ref.extend(np.vstack([x1, x2]), True)), dtype)
        assert_close(G, ref.outer_mean(np.vstack([g1, g2])), dtype)


def test_output_grad_scale_divides_recorded_gradients(rng, dtype):
    scale = 1024.0
    with kfac.Optimizer(dtype, output_grad_scale=scale) as opt:
        layer = opt.add_dense(3, 4)
        x, g = random_batch(rng, 6, 3, 4, dtype)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, (g * scale).astype(dtype))
        opt.update_factors()
        _, G = opt.factors(layer)
        assert_close(G, ref.outer_mean(g), dtype)


def test_mean_reduction_and_scale_together(rng, dtype):
    scale, rows = 8.0, 6
    with kfac.Optimizer(dtype, output_grad_scale=scale, loss_reduction="mean") as opt:
        layer = opt.add_dense(3, 4)
        x, g = random_batch(rng, rows, 3, 4, dtype)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, (g * scale / rows).astype(dtype))
        opt.update_factors()
        A, G = opt.factors(layer)
        assert_close(A, ref.outer_mean(ref.extend(x, True)), dtype)
        assert_close(G, ref.outer_mean(g), dtype)


def test_reduction_and_scale_do_not_touch_inputs(rng):
    with kfac.Optimizer(np.float64, output_grad_scale=3.0, loss_reduction="mean") as opt:
        layer = opt.add_dense(3, 2)
        x, g = random_batch(rng, 5, 3, 2, np.float64)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        opt.update_factors()
        A, _ = opt.factors(layer)
        assert_close(A, ref.outer_mean(ref.extend(x, True)), np.float64)


def test_sequence_inputs_flatten_to_rows(rng):
    """[N, T, features] arrays are N·T rows (a layer shared across tokens)."""
    x = rng.standard_normal((3, 4, 5))
    g = rng.standard_normal((3, 4, 2))
    with kfac.Optimizer(np.float64) as opt:
        layer = opt.add_dense(5, 2)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        opt.update_factors()
        A, G = opt.factors(layer)
    assert_close(A, ref.outer_mean(ref.extend(x.reshape(12, 5), True)), np.float64)
    assert_close(G, ref.outer_mean(g.reshape(12, 2)), np.float64)


def test_non_contiguous_and_widened_arrays_are_converted(rng):
    """Views (transposed, strided) and float32 data in a float64 optimizer are accepted."""
    base = rng.standard_normal((5, 12))
    x = base.T[::2]  # [6][5], not contiguous
    g32 = rng.standard_normal((6, 3)).astype(np.float32)
    assert not x.flags.c_contiguous
    with kfac.Optimizer(np.float64) as opt:
        layer = opt.add_dense(5, 3)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g32)
        opt.update_factors()
        A, G = opt.factors(layer)
    assert_close(A, ref.outer_mean(ref.extend(x, True)), np.float64)
    assert_close(G, ref.outer_mean(g32.astype(np.float64)), np.float64)


def test_narrowing_and_bad_shapes_are_rejected(rng):
    with kfac.Optimizer(np.float32) as opt:
        layer = opt.add_dense(3, 2)
        with pytest.raises(TypeError, match="narrow"):
            opt.record_inputs(layer, rng.standard_normal((4, 3)))  # float64 -> float32
        with pytest.raises(TypeError):
            opt.record_output_grads(layer, np.ones((4, 2), dtype=np.int64))
        with pytest.raises(ValueError):
            opt.record_inputs(layer, np.ones((4, 5), dtype=np.float32))  # wrong width
        with pytest.raises(ValueError):
            opt.record_inputs(layer, np.ones(3, dtype=np.float32))  # 1-D
        with pytest.raises(ValueError):
            opt.record_output_grads(layer, np.ones((4, 3), dtype=np.float32))
        # Nothing was recorded by the failed calls.
        with pytest.raises(kfac.KFACError) as info:
            opt.update_inverses()
        assert info.value.status == kfac.KFAC_ERROR_NO_STATISTICS


def test_factors_per_layer_are_independent(rng):
    with kfac.Optimizer(np.float64) as opt:
        l0 = opt.add_dense(4, 3)
        l1 = opt.add_dense(3, 2, bias=False)
        assert (l0, l1) == (0, 1) and opt.num_layers == 2
        x0, g0 = random_batch(rng, 5, 4, 3, np.float64)
        x1, g1 = random_batch(rng, 5, 3, 2, np.float64)
        opt.record_inputs(l0, x0)
        opt.record_inputs(l1, x1)
        opt.record_output_grads(l1, g1)
        opt.record_output_grads(l0, g0)
        opt.update_factors()
        for layer, x, g, bias in ((l0, x0, g0, True), (l1, x1, g1, False)):
            A, G = opt.factors(layer)
            A_ref, G_ref = ref.batch_factors(x, g, bias)
            assert_close(A, A_ref, np.float64)
            assert_close(G, G_ref, np.float64)


def test_schedule_folds_statistics_on_factor_update_steps(rng):
    """Tf = 2: steps 0, 2, 4 fold; statistics recorded on step 1 are kept for step 2."""
    decay = 0.5
    with kfac.Optimizer(np.float64, factor_update_period=2, inverse_update_period=1,
                        factor_decay=decay, kl_clip=0) as opt:
        layer = opt.add_dense(3, 2)
        wants = []
        A_run = None
        pending = []
        for k in range(5):
            wants.append(opt.wants_statistics)
            x, g = random_batch(rng, 4, 3, 2, np.float64)
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, g)
            pending.append(x)
            opt.step([rng.standard_normal((2, 3))], [rng.standard_normal(2)])
            if k % 2 == 0:
                A_run = ref.ema(A_run, ref.outer_mean(ref.extend(np.vstack(pending), True)), decay)
                pending = []
            A, _ = opt.factors(layer)
            assert_close(A, A_run, np.float64)
        assert wants == [True, False, True, False, True]
        assert opt.step_count == 5


def test_period_zero_always_wants_statistics():
    with kfac.Optimizer(np.float64, factor_update_period=0) as opt:
        opt.add_dense(2, 2)
        assert opt.wants_statistics
