"""State images: a resumed optimizer produces bit-identical directions."""

import os

import numpy as np
import pytest

import libkfac as kfac
from testutil import random_batch

LAYERS = [(5, 4, True), (4, 3, False)]


def _make(dtype, **params):
    opt = kfac.Optimizer(dtype, **params)
    for fan_in, fan_out, bias in LAYERS:
        opt.add_dense(fan_in, fan_out, bias=bias)
    return opt


def _batches(seed, steps, dtype):
    """Deterministic statistics and gradients for ``steps`` steps."""
    rng = np.random.default_rng(seed)
    result = []
    for _ in range(steps):
        stats = [random_batch(rng, 6, fan_in, fan_out, dtype) for fan_in, fan_out, _ in LAYERS]
        grads = [
            (rng.standard_normal((fan_out, fan_in)).astype(dtype),
             rng.standard_normal(fan_out).astype(dtype) if bias else None)
            for fan_in, fan_out, bias in LAYERS
        ]
        result.append((stats, grads))
    return result


def _run(opt, batches):
    """Runs the steps (recording statistics when wanted; ``[]`` records none); returns the
    directions of each step as bytes."""
    out = []
    for stats, grads in batches:
        if stats and opt.wants_statistics:
            for layer, (x, g) in enumerate(stats):
                opt.record_inputs(layer, x)
                opt.record_output_grads(layer, g)
        ws = [w.copy() for w, _ in grads]
        bs = [None if b is None else b.copy() for _, b in grads]
        opt.step(ws, bs)
        out.append(b"".join(a.tobytes() for a in ws + [b for b in bs if b is not None]))
    return out


PARAMS = dict(damping=0.05, kl_clip=1e-2, factor_decay=0.9, inverse_update_period=3,
              factor_update_period=2)


@pytest.mark.parametrize("strategy", ["eigen", "cholesky", "ekfac"])
def test_state_bytes_round_trip_is_bit_identical(dtype, strategy):
    batches = _batches(7, 9, dtype)
    # Step 4 is a factor-update step (Tf = 2): its statistics are recorded before saving, so the
    # image holds pending statistics; neither run records them again.
    continuation = [([], batches[4][1])] + batches[5:]
    with _make(dtype, inverse_strategy=strategy, **PARAMS) as original:
        _run(original, batches[:4])
        for layer, (x, g) in enumerate(batches[4][0]):
            original.record_inputs(layer, x)
            original.record_output_grads(layer, g)
        image = original.state_bytes()
        assert image[:8] == b"KFACSTAT"
        expected = _run(original, continuation)
        steps_after = original.step_count
        kl_after = original.last_kl_scale

    with _make(dtype) as resumed:  # default parameters: the image brings them
        resumed.load_state(image)
        assert resumed.step_count == 4
        assert resumed.inverse_strategy == strategy
        assert resumed.damping == PARAMS["damping"]
        assert resumed.factor_update_period == PARAMS["factor_update_period"]
        assert _run(resumed, continuation) == expected
        assert resumed.step_count == steps_after
        assert resumed.last_kl_scale == kl_after


def test_file_round_trip_is_bit_identical(tmp_path):
    batches = _batches(11, 6, np.float64)
    path = tmp_path / "kfac.state"
    with _make(np.float64, **PARAMS) as original:
        _run(original, batches[:3])
        original.save(path)
        original.save(str(path))  # overwriting is fine (atomic rename)
        assert path.read_bytes() == original.state_bytes()
        expected = _run(original, batches[3:])
    assert [p.name for p in tmp_path.iterdir()] == ["kfac.state"]  # no temporary left over
    with _make(np.float64) as resumed:
        resumed.load(path)
        assert _run(resumed, batches[3:]) == expected


def test_state_of_a_fresh_optimizer_round_trips():
    with _make(np.float32, damping=0.5) as a, _make(np.float32) as b:
        b.load_state(a.state_bytes())
        assert b.damping == 0.5
        assert b.state_bytes() == a.state_bytes()


def test_corrupt_images_are_rejected_and_change_nothing(rng):
    with _make(np.float64, **PARAMS) as opt:
        _run(opt, _batches(3, 2, np.float64))
        image = opt.state_bytes()
        with _make(np.float64, damping=0.3) as other:
            before = other.state_bytes()
            flipped = bytearray(image)
            flipped[len(image) // 2] ^= 0x40
            for bad in (bytes(flipped), image[:-1], image[: len(image) // 2], b"", b"garbage!" * 8):
                with pytest.raises(kfac.KFACError) as info:
                    other.load_state(bad)
                assert info.value.status == kfac.KFAC_ERROR_CORRUPT_STATE, info.value
            wrong_magic = b"KFACSTAX" + image[8:]
            with pytest.raises(kfac.KFACError) as info:
                other.load_state(wrong_magic)
            assert info.value.status == kfac.KFAC_ERROR_CORRUPT_STATE
            assert other.state_bytes() == before
            other.load_state(bytearray(image))  # any bytes-like object
            assert other.state_bytes() == image


def test_mismatching_images_are_rejected():
    with _make(np.float64) as opt:
        image = opt.state_bytes()
    with _make(np.float32) as other_dtype:
        with pytest.raises(kfac.KFACError) as info:
            other_dtype.load_state(image)
        assert info.value.status == kfac.KFAC_ERROR_STATE_MISMATCH
    with kfac.Optimizer(np.float64) as other_layers:
        other_layers.add_dense(5, 4)
        with pytest.raises(kfac.KFACError) as info:
            other_layers.load_state(image)
        assert info.value.status == kfac.KFAC_ERROR_STATE_MISMATCH
        other_layers.add_dense(4, 3, bias=True)  # bias differs from LAYERS[1]
        with pytest.raises(kfac.KFACError) as info:
            other_layers.load_state(image)
        assert info.value.status == kfac.KFAC_ERROR_STATE_MISMATCH


def test_file_errors(tmp_path):
    with _make(np.float64) as opt:
        missing_dir = tmp_path / "no" / "such" / "dir" / "state"
        with pytest.raises(kfac.KFACError) as info:
            opt.save(missing_dir)
        assert info.value.status == kfac.KFAC_ERROR_IO
        assert info.value.message
        with pytest.raises(kfac.KFACError) as info:
            opt.load(tmp_path / "absent")
        assert info.value.status == kfac.KFAC_ERROR_IO
        junk = tmp_path / "junk"
        junk.write_bytes(os.urandom(64))
        with pytest.raises(kfac.KFACError) as info:
            opt.load(junk)
        assert info.value.status == kfac.KFAC_ERROR_CORRUPT_STATE


def test_distinct_handles_run_concurrently():
    """Handles are independent: four threads (ctypes releases the GIL) give the sequential
    results bit for bit."""
    import threading

    batches = _batches(5, 6, np.float64)

    def run():
        with _make(np.float64, **PARAMS) as opt:
            return _run(opt, batches)

    expected = run()
    results = [None] * 4

    def worker(index):
        results[index] = run()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert all(result == expected for result in results)
