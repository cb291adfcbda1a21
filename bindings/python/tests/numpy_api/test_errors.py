"""Error paths: every failure raises KFACError with the right status and leaves a usable
optimizer behind; parameters; lifetime."""

import ctypes
import math

import numpy as np
import pytest

import libkfac as kfac
from references import dense as ref
from libkfac import _lib
from testutil import assert_close, random_batch


def _expect(status, function, *args, **kwargs):
    with pytest.raises(kfac.KFACError) as info:
        function(*args, **kwargs)
    error = info.value
    assert error.status == status, (error.status_name, error.message)
    assert error.status_name == kfac.status_name(status)
    assert isinstance(error.message, str) and error.message
    assert error.status_name in str(error)
    return error


def _one_step_reference(x, g, w, b, damping):
    A, G = ref.batch_factors(x, g, True)
    return ref.precondition_eigen(A, G, ref.theta_grad(w, b), damping)


# ---------------------------------------------------------------------------------------------
# Parameters
# ---------------------------------------------------------------------------------------------


def test_parameter_defaults():
    with kfac.Optimizer() as opt:
        assert opt.dtype == np.float32
        assert opt.params() == {
            "learning_rate": 0.1,
            "damping": 1e-3,
            "factor_decay": 0.95,
            "kl_clip": 1e-3,
            "output_grad_scale": 1.0,
            "factor_update_period": 1,
            "inverse_update_period": 10,
            "inverse_strategy": "eigen",
            "pi_damping": True,
            "loss_reduction": "sum",
            "num_threads": 0,
            "inverse_spread": False,
            "async_inversion": "off",
            "lm_decay": 0.95,
            "factor_damping": 0.0,
            "factor_damping_decay": 0.95,
            "lm_interval": 0,
            "factor_damping_period": 0,
            "damping_min": 1e-4,
            "factor_damping_ratio": 10.0,
            "ekfac_decay": 0.95,
            "ekfac_mode": "per_example",
            "distributed_reduce": "eager",
        }


def test_parameters_round_trip_through_properties_and_enums():
    with kfac.Optimizer(np.float64, damping=0.25, inverse_strategy="cholesky") as opt:
        assert opt.damping == 0.25 and opt.inverse_strategy == "cholesky"
        opt.learning_rate = 0.3
        opt.factor_decay = 0.0
        opt.kl_clip = 0
        opt.output_grad_scale = 128
        opt.factor_update_period = 0
        opt.inverse_update_period = 7
        opt.inverse_strategy = kfac.KFAC_INVERSE_EIGEN
        opt.pi_damping = False
        opt.loss_reduction = "mean"
        opt.num_threads = 1
        assert opt.get_param(kfac.KFAC_PARAM_LEARNING_RATE) == 0.3
        assert opt.get_param("factor_decay") == 0.0
        assert opt.kl_clip == 0.0 and isinstance(opt.kl_clip, float)
        assert opt.output_grad_scale == 128.0
        assert opt.factor_update_period == 0 and opt.inverse_update_period == 7
        assert opt.inverse_strategy == "eigen"
        assert opt.pi_damping is False
        assert opt.loss_reduction == "mean"
        assert opt.get_param(kfac.KFAC_PARAM_LOSS_REDUCTION) == "mean"
        assert opt.num_threads == 1
        opt.set_param(kfac.KFAC_PARAM_LOSS_REDUCTION, kfac.KFAC_REDUCTION_SUM)
        assert opt.loss_reduction == "sum"


@pytest.mark.parametrize(
    "name, value",
    [
        ("learning_rate", -0.1),
        ("learning_rate", math.inf),
        ("learning_rate", math.nan),
        ("damping", -1.0),
        ("damping", math.inf),
        ("damping", math.nan),
        ("factor_decay", 1.0),
        ("kl_clip", -1e-3),
        ("output_grad_scale", 0.0),
        ("factor_update_period", -1),
        ("inverse_update_period", -1),
        ("inverse_strategy", 3),
        ("pi_damping", 2),
        ("loss_reduction", 5),
        ("num_threads", 257),
    ],
)
def test_out_of_range_parameters_raise_and_change_nothing(name, value):
    with kfac.Optimizer(np.float64) as opt:
        before = opt.get_param(name)
        _expect(kfac.KFAC_ERROR_PARAMETER_RANGE, opt.set_param, name, value)
        assert opt.get_param(name) == before


def test_parameter_errors_from_the_library():
    with kfac.Optimizer(np.float64) as opt:
        _expect(kfac.KFAC_ERROR_UNKNOWN_PARAMETER, opt.set_param, 999, 1.0)
        _expect(kfac.KFAC_ERROR_UNKNOWN_PARAMETER, opt.get_param, 999)
        value = ctypes.c_int64()
        status = _lib.kfac_param_get_int(opt.handle.pointer, kfac.KFAC_PARAM_DAMPING, ctypes.byref(value))
        assert status == kfac.KFAC_ERROR_PARAMETER_TYPE
        status = _lib.kfac_param_set_double(opt.handle.pointer, kfac.KFAC_PARAM_NUM_THREADS, 2.0)
        assert status == kfac.KFAC_ERROR_PARAMETER_TYPE
        assert _lib.kfac_param_set_double(None, kfac.KFAC_PARAM_DAMPING, 1.0) == kfac.KFAC_ERROR_NULL_POINTER
        _expect(kfac.KFAC_ERROR_PARAMETER_RANGE, opt.set_param, "num_threads", 2**70)
        with pytest.raises(ValueError):
            opt.set_param("no_such_parameter", 1)
        with pytest.raises(ValueError):
            opt.inverse_strategy = "qr"
        with pytest.raises(TypeError):
            opt.damping = "large"
        with pytest.raises(TypeError):
            opt.inverse_update_period = 2.5
        assert opt.damping == 1e-3


def test_constructor_rejects_bad_dtype_and_parameters():
    with pytest.raises(TypeError):
        kfac.Optimizer(np.int32)
    with pytest.raises(TypeError):
        kfac.Optimizer(np.float16)
    _expect(kfac.KFAC_ERROR_PARAMETER_RANGE, kfac.Optimizer, np.float64, damping=-1)
    with pytest.raises(ValueError):
        kfac.Optimizer(np.float64, dampening=0.1)


# ---------------------------------------------------------------------------------------------
# Layers and statistics
# ---------------------------------------------------------------------------------------------


def test_layer_errors(rng):
    with kfac.Optimizer(np.float64) as opt:
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, opt.add_dense, 0, 3)
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, opt.add_dense, 3, -1)
        _expect(kfac.KFAC_ERROR_SIZE_OVERFLOW, opt.add_dense, 50000, 3)
        assert opt.num_layers == 0
        layer = opt.add_dense(3, 2)
        _expect(kfac.KFAC_ERROR_UNKNOWN_LAYER, opt.layer_info, 1)
        _expect(kfac.KFAC_ERROR_UNKNOWN_LAYER, opt.layer_info, -1)
        _expect(kfac.KFAC_ERROR_UNKNOWN_LAYER, opt.record_inputs, 7, np.ones((2, 3)))
        _expect(kfac.KFAC_ERROR_UNKNOWN_LAYER, opt.record_output_grads, -1, np.ones((2, 2)))
        _expect(kfac.KFAC_ERROR_UNKNOWN_LAYER, opt.record_inputs, 2**40, np.ones((2, 3)))
        _expect(kfac.KFAC_ERROR_UNKNOWN_LAYER, opt.factors, 3)
        _expect(kfac.KFAC_ERROR_UNKNOWN_LAYER, opt.precondition, 3, np.ones((2, 3)), np.ones(2))
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, opt.record_inputs, layer, np.ones((0, 3)))
        _expect(kfac.KFAC_ERROR_NO_STATISTICS, opt.factors, layer)
        x, g = random_batch(rng, 4, 3, 2, np.float64)
        opt.record_inputs(layer, x)
        _expect(kfac.KFAC_ERROR_LAYERS_FROZEN, opt.add_dense, 2, 2)
        assert opt.num_layers == 1
        opt.record_output_grads(layer, g)
        opt.update_factors()
        A, G = opt.factors(layer)
        assert_close(A, ref.outer_mean(ref.extend(x, True)), np.float64)


def test_wrong_dtype(rng):
    """The wrapper refuses to narrow (TypeError); the library reports DTYPE_MISMATCH."""
    with kfac.Optimizer(np.float32) as opt:
        layer = opt.add_dense(3, 2)
        with pytest.raises(TypeError):
            opt.record_inputs(layer, rng.standard_normal((4, 3)))
        x64 = np.ones((4, 3))
        status = _lib.kfac_layer_record_inputs_f64(
            opt.handle.pointer, layer, x64.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), 4)
        assert status == kfac.KFAC_ERROR_DTYPE_MISMATCH
        a = np.zeros((4, 4))
        status = _lib.kfac_layer_get_factors_f64(
            opt.handle.pointer, layer, 0, a.ctypes.data_as(ctypes.POINTER(ctypes.c_double)), None)
        assert status == kfac.KFAC_ERROR_DTYPE_MISMATCH
        assert _lib.kfac_optimizer_last_error(opt.handle.pointer)
        # still works
        x, g = random_batch(rng, 4, 3, 2, np.float32)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        opt.update_factors()
        A, _ = opt.factors(layer)
        assert_close(A, ref.outer_mean(ref.extend(x, True)), np.float32)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_is_rejected_and_nothing_is_recorded(rng, bad):
    damping = 0.1
    with kfac.Optimizer(np.float64, damping=damping, kl_clip=0) as opt:
        layer = opt.add_dense(3, 2)
        x, g = random_batch(rng, 4, 3, 2, np.float64)
        poisoned = x.copy()
        poisoned[2, 1] = bad
        _expect(kfac.KFAC_ERROR_NON_FINITE, opt.record_inputs, layer, poisoned)
        opt.record_inputs(layer, x)
        poisoned_g = g.copy()
        poisoned_g[0, 0] = bad
        _expect(kfac.KFAC_ERROR_NON_FINITE, opt.record_output_grads, layer, poisoned_g)
        opt.record_output_grads(layer, g)
        w, b = rng.standard_normal((2, 3)), rng.standard_normal(2)
        expected = _one_step_reference(x, g, w, b, damping)
        opt.step([w], [b])
        assert_close(ref.theta_grad(w, b), expected, np.float64)


def test_non_finite_gradient_fails_the_step_without_side_effects(rng):
    with kfac.Optimizer(np.float64, damping=0.1, kl_clip=0) as opt:
        layer = opt.add_dense(3, 2)
        x, g = random_batch(rng, 4, 3, 2, np.float64)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        image = opt.state_bytes()
        w, b = rng.standard_normal((2, 3)), rng.standard_normal(2)
        w[0, 0] = np.nan
        w_before, b_before = w.copy(), b.copy()
        _expect(kfac.KFAC_ERROR_NON_FINITE, opt.step, [w], [b])
        assert w.tobytes() == w_before.tobytes() and b.tobytes() == b_before.tobytes()
        assert opt.step_count == 0
        assert opt.state_bytes() == image
        w[0, 0] = 0.5
        expected = _one_step_reference(x, g, w, b, 0.1)
        opt.step([w], [b])
        assert_close(ref.theta_grad(w, b), expected, np.float64)


def test_step_before_statistics(rng):
    with kfac.Optimizer(np.float64, damping=0.1, kl_clip=0) as opt:
        layer = opt.add_dense(3, 2)
        w, b = rng.standard_normal((2, 3)), rng.standard_normal(2)
        w0, b0 = w.copy(), b.copy()
        error = _expect(kfac.KFAC_ERROR_NO_STATISTICS, opt.step, [w], [b])
        assert error.message == error.message.strip() and len(error.message) > 5
        np.testing.assert_array_equal(w, w0)
        np.testing.assert_array_equal(b, b0)
        assert opt.step_count == 0 and opt.last_kl_scale is None
        _expect(kfac.KFAC_ERROR_NO_STATISTICS, opt.update_inverses)
        # and it works afterwards
        x, g = random_batch(rng, 5, 3, 2, np.float64)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        expected = _one_step_reference(x, g, w, b, 0.1)
        opt.step([w], [b])
        assert_close(ref.theta_grad(w, b), expected, np.float64)
        assert opt.step_count == 1


def test_precondition_before_inverses(rng):
    with kfac.Optimizer(np.float64) as opt:
        layer = opt.add_dense(3, 2)
        w, b = np.ones((2, 3)), np.ones(2)
        with pytest.raises(kfac.KFACError) as info:
            opt.precondition(layer, w, b)
        # no factors yet: the header allows either status here
        assert info.value.status in (kfac.KFAC_ERROR_NO_STATISTICS, kfac.KFAC_ERROR_NO_INVERSES)
        x, g = random_batch(rng, 5, 3, 2, np.float64)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        opt.update_factors()
        _expect(kfac.KFAC_ERROR_NO_INVERSES, opt.precondition, layer, w, b)
        np.testing.assert_array_equal(w, np.ones((2, 3)))


def test_inverse_period_zero_without_inverses(rng):
    with kfac.Optimizer(np.float64, inverse_update_period=0) as opt:
        layer = opt.add_dense(3, 2)
        x, g = random_batch(rng, 5, 3, 2, np.float64)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        _expect(kfac.KFAC_ERROR_NO_INVERSES, opt.step, [np.ones((2, 3))], [np.ones(2)])
        assert opt.step_count == 0
        opt.update_factors()
        opt.update_inverses()
        opt.step([np.ones((2, 3))], [np.ones(2)])
        assert opt.step_count == 1


def test_library_rejects_null_and_missing_bias_buffers(rng):
    """Calls the raw step with a NULL bias array for a layer with bias."""
    with kfac.Optimizer(np.float64) as opt:
        opt.add_dense(3, 2)
        x, g = random_batch(rng, 5, 3, 2, np.float64)
        opt.record_inputs(0, x)
        opt.record_output_grads(0, g)
        w = np.ones((2, 3))
        pointer = ctypes.POINTER(ctypes.c_double)
        weights = (pointer * 1)(w.ctypes.data_as(pointer))
        status = _lib.kfac_optimizer_step_f64(opt.handle.pointer, weights, None, 1)
        assert status == kfac.KFAC_ERROR_NULL_POINTER
        status = _lib.kfac_optimizer_step_f64(opt.handle.pointer, weights, None, 2)
        assert status in (kfac.KFAC_ERROR_INVALID_SIZE, kfac.KFAC_ERROR_NULL_POINTER)
        steps = ctypes.c_int64(-1)
        assert _lib.kfac_optimizer_get_step_count(opt.handle.pointer, ctypes.byref(steps)) == kfac.KFAC_OK
        assert steps.value == 0
        np.testing.assert_array_equal(w, np.ones((2, 3)))


def test_bias_given_for_layer_without_bias_is_invalid(rng):
    with kfac.Optimizer(np.float64) as opt:
        opt.add_dense(3, 2, bias=False)
        x, g = random_batch(rng, 5, 3, 2, np.float64)
        opt.record_inputs(0, x)
        opt.record_output_grads(0, g)
        opt.update_factors()
        opt.update_inverses()
        w, b = np.ones((2, 3)), np.ones(2)
        pointer = ctypes.POINTER(ctypes.c_double)
        status = _lib.kfac_layer_precondition_f64(opt.handle.pointer, 0, w.ctypes.data_as(pointer),
                                            b.ctypes.data_as(pointer))
        assert status == kfac.KFAC_ERROR_INVALID_ARGUMENT
        with pytest.raises(ValueError):
            opt.precondition(0, w, b)
        opt.precondition(0, w)


# ---------------------------------------------------------------------------------------------
# Lifetime
# ---------------------------------------------------------------------------------------------


def test_close_and_context_manager():
    opt = kfac.Optimizer(np.float64)
    assert not opt.closed
    opt.add_dense(2, 2)
    assert "1 layer" in repr(opt)
    opt.close()
    opt.close()
    assert opt.closed and "closed" in repr(opt)
    with pytest.raises(ValueError):
        opt.add_dense(2, 2)
    with pytest.raises(ValueError):
        _ = opt.step_count
    with kfac.Optimizer(np.float64) as other:
        other.add_dense(2, 3)
    assert other.closed


def test_many_handles_are_freed():
    for _ in range(200):
        opt = kfac.Optimizer(np.float32)
        opt.add_dense(8, 8)
        del opt  # __del__ frees it


def test_error_is_picklable():
    import pickle

    error = kfac.KFACError(kfac.KFAC_ERROR_IO, "cannot open /x")
    copy = pickle.loads(pickle.dumps(error))
    assert (copy.status, copy.status_name, copy.message) == (
        kfac.KFAC_ERROR_IO, "KFAC_ERROR_IO", "cannot open /x")
