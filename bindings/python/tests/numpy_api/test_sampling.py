"""The seeded target samplers (libkfac.sample_targets, libkfac.sampled_output_grads): their
distributions, the output Fisher as second moment, reproducibility and errors."""

import ctypes

import numpy as np
import pytest

import libkfac as kfac
from libkfac import _lib
from references.adaptive import sigmoid, softmax


def _expect(status, function, *args, **kwargs):
    with pytest.raises(kfac.KFACError) as info:
        function(*args, **kwargs)
    assert info.value.status == status, info.value
    assert info.value.message
    return info.value

# ---------------------------------------------------------------------------------------------
# Samplers
# ---------------------------------------------------------------------------------------------

ROWS = 40_000


@pytest.mark.parametrize("sample_dtype", [np.float64, np.float32])
def test_categorical_frequencies(sample_dtype):
    logits = np.array([0.5, -1.0, 2.0, 0.0])
    z = np.tile(logits, (ROWS, 1)).astype(sample_dtype)
    targets = kfac.sample_targets(z, "categorical", seed=7)
    assert targets.dtype == sample_dtype and targets.shape == z.shape
    assert set(np.unique(targets)) <= {0.0, 1.0}
    assert np.all(targets.sum(axis=1) == 1)
    p = softmax(logits)
    frequency = targets.mean(axis=0)
    sigma = np.sqrt(p * (1 - p) / ROWS)
    assert np.all(np.abs(frequency - p) < 5 * sigma), (frequency, p)


def test_bernoulli_means_and_gaussian_moments():
    logits = np.array([0.5, -1.0, 2.0, 0.0])
    z = np.tile(logits, (ROWS, 1))
    targets = kfac.sample_targets(z, "bernoulli", seed=8)
    assert set(np.unique(targets)) == {0.0, 1.0}
    q = sigmoid(logits)
    assert np.all(np.abs(targets.mean(axis=0) - q) < 5 * np.sqrt(q * (1 - q) / ROWS))
    noise = kfac.sample_targets(z, kfac.KFAC_DIST_GAUSSIAN, seed=9) - z
    mean = noise.mean(axis=0)
    variance = noise.var(axis=0, ddof=1)
    assert np.all(np.abs(mean) < 5 / np.sqrt(ROWS)), mean
    assert np.all(np.abs(variance - 1) < 5 * np.sqrt(2 / ROWS)), variance
    # Coordinates and rows are independent: near-zero correlations.
    corr = np.corrcoef(noise[:, 0], noise[:, 1])[0, 1]
    assert abs(corr) < 5 / np.sqrt(ROWS)
    lag = np.corrcoef(noise[:-1, 0], noise[1:, 0])[0, 1]
    assert abs(lag) < 5 / np.sqrt(ROWS)


@pytest.mark.parametrize("distribution", ["categorical", "bernoulli", "gaussian"])
def test_sampled_output_grads_have_the_output_fisher_as_second_moment(distribution):
    logits = np.array([1.0, -0.5, 0.2])
    z = np.tile(logits, (ROWS, 1))
    g = kfac.sampled_output_grads(z, distribution, seed=3)
    moment = g.T @ g / ROWS
    if distribution == "categorical":
        p = softmax(logits)
        fisher = np.diag(p) - np.outer(p, p)
    elif distribution == "bernoulli":
        p = sigmoid(logits)
        fisher = np.diag(p * (1 - p))
    else:
        fisher = np.eye(3)
    # Per-entry standard error of a mean of products of bounded (or Gaussian) values.
    per_entry = np.sqrt(np.mean((g[:, :, None] * g[:, None, :]) ** 2, axis=0) / ROWS)
    assert np.all(np.abs(moment - fisher) < 5 * per_entry + 1e-12), (moment, fisher)
    assert np.all(np.abs(g.mean(axis=0)) < 5 * np.sqrt(np.diag(fisher) / ROWS) + 1e-12)


@pytest.mark.parametrize("distribution", ["categorical", "bernoulli", "gaussian"])
def test_sampled_grads_are_the_loss_gradient_at_the_sampled_targets(rng, distribution):
    z = rng.standard_normal((50, 5))
    y = kfac.sample_targets(z, distribution, seed=11)
    g = kfac.sampled_output_grads(z, distribution, seed=11)
    mean = {"categorical": softmax(z), "bernoulli": sigmoid(z), "gaussian": z}[distribution]
    np.testing.assert_allclose(g, mean - y, rtol=1e-12, atol=1e-12)


def test_samplers_are_reproducible_and_precision_independent(rng):
    z = rng.standard_normal((64, 6)).astype(np.float32)  # exactly representable in both
    first = kfac.sample_targets(z, "categorical", 5)
    for distribution in ("categorical", "bernoulli"):
        a = kfac.sample_targets(z, distribution, 5)
        assert np.array_equal(a, kfac.sample_targets(z, distribution, 5))
        assert np.array_equal(a, kfac.sample_targets(z.astype(np.float64), distribution, 5))
        assert not np.array_equal(a, kfac.sample_targets(z, distribution, 6))
        # Draws depend on the row index within the call: the first rows of a larger batch.
        assert np.array_equal(a[:10], kfac.sample_targets(z[:10], distribution, 5))
    g = kfac.sample_targets(z.astype(np.float64), "gaussian", 5)
    np.testing.assert_allclose(kfac.sample_targets(z, "gaussian", 5), g, rtol=1e-6, atol=1e-6)
    assert kfac.sample_targets(z.reshape(8, 8, 6), "gaussian", 5).shape == (8, 8, 6)
    assert np.array_equal(kfac.sample_targets(z[0], "categorical", 5), first[0])  # 1-D: one row
    assert kfac.sample_targets(np.zeros((2, 3), dtype=np.int64), "bernoulli", 1).dtype == np.float64
    assert kfac.sample_targets(np.zeros((2, 3), dtype=np.float16), "bernoulli", 1).dtype == np.float32
    assert kfac.sample_targets(z, "gaussian", 2**64 - 1).shape == z.shape


def test_sampler_errors():
    z = np.zeros((4, 3))
    for function in (kfac.sample_targets, kfac.sampled_output_grads):
        bad = z.copy()
        bad[1, 2] = np.nan
        _expect(kfac.KFAC_ERROR_NON_FINITE, function, bad, "categorical", 0)
        bad[1, 2] = -np.inf
        _expect(kfac.KFAC_ERROR_NON_FINITE, function, bad.astype(np.float32), "gaussian", 0)
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, function, z, 3, 0)
        _expect(kfac.KFAC_ERROR_INVALID_ARGUMENT, function, z, -1, 0)
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, function, z[:0], "categorical", 0)
        _expect(kfac.KFAC_ERROR_INVALID_SIZE, function, np.zeros((4, 0)), "categorical", 0)
        with pytest.raises(ValueError):
            function(z, "multinomial", 0)
        with pytest.raises(ValueError):
            function(z, "categorical", -1)
        with pytest.raises(ValueError):
            function(z, "categorical", 2**64)
        with pytest.raises(TypeError):
            function(z, "categorical", 1.5)
        with pytest.raises(TypeError):
            function(z.astype(np.complex128), "categorical", 0)
        with pytest.raises(ValueError):
            function(np.float64(1.0), "categorical", 0)
    # The raw functions: NULL pointers, sizes.
    dp = ctypes.POINTER(ctypes.c_double)
    out = np.full((4, 3), 7.0)
    zp, op = z.ctypes.data_as(dp), out.ctypes.data_as(dp)
    for name in ("kfac_sample_targets_f64", "kfac_sample_output_grads_f64"):
        function = getattr(_lib, name)
        assert function(None, 4, 3, 0, 1, op) == kfac.KFAC_ERROR_NULL_POINTER
        assert function(zp, 4, 3, 0, 1, None) == kfac.KFAC_ERROR_NULL_POINTER
        assert function(zp, -4, 3, 0, 1, op) == kfac.KFAC_ERROR_INVALID_SIZE
        assert function(zp, 2**40, 2**40, 0, 1, op) == kfac.KFAC_ERROR_SIZE_OVERFLOW
        assert function(zp, 4, 3, 7, 1, op) == kfac.KFAC_ERROR_INVALID_ARGUMENT
        assert np.all(out == 7.0), "failed calls leave the output buffer"
