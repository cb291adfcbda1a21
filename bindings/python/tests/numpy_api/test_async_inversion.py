"""async_inversion through the numpy API: an enum parameter ('off', 'newest' or True,
'deterministic'); in the deterministic mode step k's directions are the dense
(A ⊗ G + λI)⁻¹ vec(V) with the factors read after step s(k) = 0 for k < 2·Ti, Ti·(⌊k/Ti⌋ − 1)
after (a synchronous run lagging one period); combinations it does not support raise
UNSUPPORTED and change nothing."""

import numpy as np
import pytest

import libkfac as kfac
from references import dense as ref

SHAPES = [(6, 5), (5, 4)]
PERIOD, DAMPING = 3, 0.05


def _source(k):
    return 0 if k < 2 * PERIOD else PERIOD * (k // PERIOD - 1)


def test_values_and_names():
    with kfac.Optimizer(np.float64) as opt:
        assert opt.async_inversion == "off"
        opt.async_inversion = True
        assert opt.async_inversion == "newest"
        opt.async_inversion = "deterministic"
        assert opt.get_param(kfac.KFAC_PARAM_ASYNC_INVERSION) == "deterministic"
        with pytest.raises(kfac.KFACError) as info:
            opt.set_param("async_inversion", 3)
        assert info.value.status == kfac.KFAC_ERROR_PARAMETER_RANGE
        assert opt.async_inversion == "deterministic"


@pytest.mark.parametrize("dtype", [np.float64, np.float32], ids=["f64", "f32"])
def test_deterministic_directions_use_the_factors_of_the_predicted_step(dtype):
    rng = np.random.default_rng(4)
    factors = []
    with kfac.Optimizer(dtype, inverse_update_period=PERIOD, async_inversion="deterministic",
                        kl_clip=0, damping=DAMPING, factor_decay=0.6) as opt:
        for i, o in SHAPES:
            opt.add_dense(i, o)
        for k in range(11):
            for layer, (i, o) in enumerate(SHAPES):
                opt.record_inputs(layer, rng.standard_normal((5, i)).astype(dtype))
                opt.record_output_grads(layer, rng.standard_normal((5, o)).astype(dtype))
            w = [rng.standard_normal((o, i)).astype(dtype) for i, o in SHAPES]
            b = [rng.standard_normal(o).astype(dtype) for i, o in SHAPES]
            given = [ref.theta_grad(wl.astype(np.float64), bl.astype(np.float64)) for wl, bl in zip(w, b)]
            opt.step(w, b)
            factors.append([tuple(f.astype(np.float64) for f in opt.factors(layer)) for layer in range(len(SHAPES))])
            for layer in range(len(SHAPES)):
                A, G = factors[_source(k)][layer]
                expected = ref.precondition_eigen(A, G, given[layer], DAMPING)
                got = ref.theta_grad(w[layer].astype(np.float64), b[layer].astype(np.float64))
                tol = 1e-4 if dtype == np.float32 else 1e-10
                np.testing.assert_allclose(got, expected, atol=tol * max(1.0, np.abs(expected).max()),
                                           err_msg=f"step {k} layer {layer} (inverse of step {_source(k)})")
                if k >= 2 * PERIOD and k % PERIOD != 0:  # a synchronous run would differ here
                    A_now, G_now = factors[PERIOD * (k // PERIOD)][layer]
                    assert not np.allclose(got, ref.precondition_eigen(A_now, G_now, given[layer], DAMPING))


@pytest.mark.parametrize("conflict", [{"inverse_strategy": "ekfac"}, {"inverse_spread": True},
                                      {"factor_damping_period": 2}], ids=["ekfac", "spread", "gamma"])
def test_unsupported_combinations_raise_and_change_nothing(conflict):
    rng = np.random.default_rng(0)
    with kfac.Optimizer(np.float64, async_inversion=True, **conflict) as opt:
        opt.add_dense(4, 3)
        opt.record_inputs(0, rng.standard_normal((5, 4)))
        opt.record_output_grads(0, rng.standard_normal((5, 3)))
        image = opt.state_bytes()
        w, b = [rng.standard_normal((3, 4))], [rng.standard_normal(3)]
        w0 = w[0].copy()
        with pytest.raises(kfac.KFACError) as info:
            opt.step(w, b)
        assert info.value.status == kfac.KFAC_ERROR_UNSUPPORTED
        assert "async_inversion" in str(info.value)
        np.testing.assert_array_equal(w[0], w0)
        assert opt.step_count == 0
        assert opt.state_bytes() == image
