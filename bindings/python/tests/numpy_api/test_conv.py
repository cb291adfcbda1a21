"""Convolutions and channel grouping through kfac.Optimizer, against the independent numpy
reference of conv_reference.py (im2col loop, explicit Kronecker solves per group)."""

import ctypes

import numpy as np
import pytest

from references import conv as cr
import libkfac as kfac
from references import dense as ref
from libkfac import _lib
from testutil import assert_close

N = 3  # examples per batch

# Geometries covering every convention of the header; NCHW and NHWC are both run on each.
GEOMETRIES = [
    cr.Conv(2, 3, (3, 3), (5, 6), label="3x3"),
    cr.Conv(2, 3, (3, 3), (7, 6), stride=(2, 2), padding=(1, 1), label="stride2-pad1"),
    cr.Conv(2, 3, (3, 3), (7, 7), padding=(2, 2), dilation=(2, 2), label="dilation2"),
    cr.Conv(4, 6, (3, 3), (5, 6), stride=(2, 1), padding=(1, 1), groups=2, label="groups2"),
    cr.Conv(3, 6, (3, 3), (5, 5), padding=(1, 1), groups=3, label="depthwise-x2"),
    cr.Conv(3, 3, (3, 3), (4, 5), padding=(1, 1), groups=3, bias=False, label="depthwise-nobias"),
    cr.Conv(3, 4, (1, 1), (4, 5), label="1x1"),
    cr.Conv(2, 3, (2, 3), (6, 7), stride=(2, 1), padding=(1, 0), dilation=(1, 2), label="non-square"),
    cr.Conv(2, 3, (3, 3), (5, 6), stride=(1, 2), padding=(0, 1), bias=False, label="nobias"),
    cr.Conv(3, 4, (1, 3), (1, 9), stride=(1, 2), padding=(0, 1), one_d=True, label="conv1d"),
    cr.Conv(4, 4, (1, 3), (1, 8), padding=(0, 2), dilation=(1, 2), groups=2, one_d=True,
            label="conv1d-groups-dilation"),
]


def _with(conv, **changes):
    fields = dict(conv.__dict__)
    fields.update(changes)
    return cr.Conv(**fields)


def _ids(convs):
    return [conv.label for conv in convs]


def _batch(rng, conv, dtype, n=N):
    x = rng.standard_normal(conv.input_shape(n)).astype(dtype)
    g = rng.standard_normal(conv.grad_shape(n)).astype(dtype)
    return x, g


def _recorded(rng, conv, dtype, n=N, **params):
    """(opt, layer, expected factors) after one factor update from one random batch."""
    opt = kfac.Optimizer(dtype, **params)
    layer = conv.add_to(opt)
    x, g = _batch(rng, conv, dtype, n)
    opt.record_inputs(layer, x)
    opt.record_output_grads(layer, g)
    opt.update_factors()
    return opt, layer, cr.expected_factors(x, g, conv)


def _check_factors(opt, layer, expected, dtype):
    info = opt.layer_info(layer)
    assert info.groups == len(expected)
    for group, (omega, gamma) in enumerate(expected):
        a, g = opt.factors(layer, group)
        assert a.dtype == np.dtype(dtype) and a.shape == omega.shape and g.shape == gamma.shape
        assert_close(a, omega, dtype, scale=5.0)
        assert_close(g, gamma, dtype, scale=5.0)


# ---------------------------------------------------------------------------------------------
# Registration and layer info
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("conv", GEOMETRIES, ids=_ids(GEOMETRIES))
def test_layer_info_of_a_convolution(conv):
    with kfac.Optimizer(np.float64) as opt:
        opt.add_dense(3, 2)
        layer = conv.add_to(opt)
        assert layer == 1 and opt.num_layers == 2
        info = opt.layer_info(layer)
        assert info.kind == kfac.KFAC_LAYER_CONV2D
        assert (info.in_features, info.out_features) == (conv.in_channels, conv.out_channels)
        assert info.has_bias == conv.bias and info.groups == conv.groups
        assert (info.a_dim, info.g_dim) == (conv.a_dim, conv.cout)
        assert not info.has_factors and not info.has_inverses
        assert opt.layer_info(0).groups == 1


def test_add_conv2d_accepts_ints_pairs_and_padding_strings():
    with kfac.Optimizer(np.float64) as opt:
        a = opt.add_conv2d(2, 4, 3, stride=2, padding=1, dilation=1, input_size=(8, 8))
        b = opt.add_conv2d(2, 4, (3, 3), stride=(2, 2), padding=(1, 1), input_size=[8, 8])
        c = opt.add_conv2d(2, 4, (3, 5), padding="same", dilation=(2, 1), input_size=(8, 8))
        d = opt.add_conv2d(2, 4, 3, padding="valid", input_size=(8, 8))
        e = opt.add_conv1d(2, 4, (3,), stride=(2,), padding=(1,), input_size=(9,))
        assert [opt.layer_info(i).a_dim for i in (a, b, c, d, e)] == [19, 19, 31, 19, 7]
        with pytest.raises(ValueError, match="symmetric"):
            opt.add_conv2d(2, 4, 2, padding="same", input_size=(8, 8))  # PyTorch pads 1 zero
        with pytest.raises(ValueError, match="stride 1"):
            opt.add_conv2d(2, 4, 3, stride=2, padding="same", input_size=(8, 8))
        with pytest.raises(TypeError, match="input_size"):
            opt.add_conv2d(2, 4, 3)
        with pytest.raises(ValueError, match="layout"):
            opt.add_conv2d(2, 4, 3, input_size=(8, 8), layout="chwn")
        with pytest.raises(ValueError, match="approximation"):
            opt.add_conv2d(2, 4, 3, input_size=(8, 8), approximation="kfra")
        with pytest.raises(ValueError):
            opt.add_conv2d(2, 4, (3, 3, 3), input_size=(8, 8))
        with pytest.raises(TypeError):
            opt.add_conv2d(2, 4, 3.0, input_size=(8, 8))
        assert opt.num_layers == 5


@pytest.mark.parametrize(
    "kwargs, status",
    [
        (dict(groups=3), kfac.KFAC_ERROR_INVALID_SIZE),  # 3 does not divide 4 channels
        (dict(kernel_size=9), kfac.KFAC_ERROR_INVALID_SIZE),  # larger than the padded 8×8
        (dict(kernel_size=5, dilation=3), kfac.KFAC_ERROR_INVALID_SIZE),
        (dict(padding=-1), kfac.KFAC_ERROR_INVALID_SIZE),
        (dict(in_channels=0), kfac.KFAC_ERROR_INVALID_SIZE),
        (dict(stride=-2), kfac.KFAC_ERROR_INVALID_SIZE),
        (dict(input_group_size=-1), kfac.KFAC_ERROR_INVALID_SIZE),
        (dict(in_channels=1 << 31), kfac.KFAC_ERROR_SIZE_OVERFLOW),
        (dict(in_channels=4096, kernel_size=8), kfac.KFAC_ERROR_SIZE_OVERFLOW),  # Ω dim 262145
    ],
)
def test_add_conv2d_errors_come_from_the_library(kwargs, status):
    args = dict(in_channels=4, out_channels=4, kernel_size=3, input_size=(8, 8))
    args.update(kwargs)
    with kfac.Optimizer(np.float32) as opt:
        with pytest.raises(kfac.KFACError) as info:
            opt.add_conv2d(**args)
        assert info.value.status == status
        assert opt.num_layers == 0
        opt.add_conv2d(4, 4, 3, input_size=(8, 8))  # the handle still works
        assert opt.num_layers == 1


def test_raw_desc_with_an_older_struct_size_reads_missing_fields_as_zero(rng):
    """A caller compiled against a header without the grouping fields: struct_size up to
    `reserved`; the library must ignore whatever follows (grouping 0)."""
    handle = _lib.kfac_optimizer_p()
    assert _lib.kfac_optimizer_create(kfac.KFAC_FLOAT64, ctypes.byref(handle)) == kfac.KFAC_OK
    try:
        desc = _lib.kfac_conv2d_desc.new(
            in_channels=4, out_channels=4, kernel_h=3, kernel_w=3, input_h=5, input_w=5, has_bias=1,
            input_group_size=-5, output_group_size=-5,  # invalid if read
        )
        desc.struct_size = _lib.kfac_conv2d_desc.input_group_size.offset
        layer = ctypes.c_int32(-1)
        assert _lib.kfac_layer_add_conv2d(handle, ctypes.byref(desc), ctypes.byref(layer)) == kfac.KFAC_OK
        desc.struct_size -= 1
        assert _lib.kfac_layer_add_conv2d(handle, ctypes.byref(desc), ctypes.byref(layer)) == kfac.KFAC_ERROR_INVALID_SIZE
        count = ctypes.c_int32(-1)
        assert _lib.kfac_layer_count(handle, ctypes.byref(count)) == kfac.KFAC_OK and count.value == 1
        info = _lib.kfac_layer_info.new()
        assert _lib.kfac_layer_get_info(handle, 0, ctypes.byref(info)) == kfac.KFAC_OK
        assert (info.kind, info.groups, info.a_dim, info.g_dim) == (kfac.KFAC_LAYER_CONV2D, 1, 37, 4)
        assert info.struct_size == ctypes.sizeof(_lib.kfac_layer_info)
        # stride, dilation and groups 0 read as 1: a full Ω without grouping
        x = rng.standard_normal((2, 4, 5, 5))
        g = rng.standard_normal((2, 4, 3, 3))
        ptr = ctypes.POINTER(ctypes.c_double)
        assert _lib.kfac_layer_record_inputs_f64(handle, 0, x.ctypes.data_as(ptr), 2) == kfac.KFAC_OK
        assert _lib.kfac_layer_record_output_grads_f64(handle, 0, g.ctypes.data_as(ptr), 2) == kfac.KFAC_OK
        assert _lib.kfac_optimizer_update_factors(handle) == kfac.KFAC_OK
        a = np.zeros((37, 37))
        assert _lib.kfac_layer_get_factors_f64(handle, 0, 0, a.ctypes.data_as(ptr), None) == kfac.KFAC_OK
        conv = cr.Conv(4, 4, (3, 3), (5, 5))
        np.testing.assert_allclose(a, cr.expected_factors(x, g, conv)[0][0], rtol=1e-12, atol=1e-12)
    finally:
        _lib.kfac_optimizer_free(handle)


# ---------------------------------------------------------------------------------------------
# KFC factors
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("conv", GEOMETRIES, ids=_ids(GEOMETRIES))
def test_kfc_factors_match_im2col_reference(rng, dtype, conv, layout):
    conv = _with(conv, layout=layout)
    opt, layer, expected = _recorded(rng, conv, dtype)
    with opt:
        assert opt.layer_info(layer).has_factors
        _check_factors(opt, layer, expected, dtype)


def test_one_by_one_convolution_is_a_dense_layer_at_every_position(rng):
    """Header: a 1×1 convolution has Ω = |T|·A and Γ = G of the dense layer applied at every
    pixel (A, G from the pixels as rows)."""
    conv = cr.Conv(3, 4, (1, 1), (4, 5))
    x = rng.standard_normal(conv.input_shape(N))
    g = rng.standard_normal(conv.grad_shape(N))
    with kfac.Optimizer(np.float64) as opt:
        layer = conv.add_to(opt)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        opt.update_factors()
        omega, gamma = opt.factors(layer)
    pixels = x.transpose(0, 2, 3, 1).reshape(-1, 3)
    grads = g.transpose(0, 2, 3, 1).reshape(-1, 4)
    A, G = ref.batch_factors(pixels, grads, True)
    assert_close(omega, conv.positions * A, np.float64)
    assert_close(gamma, G, np.float64)


def test_conv1d_equals_the_1xL_conv2d(rng):
    """[N][C][L] inputs are exactly [N][C][1][L]: same factors from add_conv1d and add_conv2d."""
    x = rng.standard_normal((4, 3, 10))
    g = rng.standard_normal((4, 5, 5))
    with kfac.Optimizer(np.float64) as opt:
        a = opt.add_conv1d(3, 5, 3, stride=2, padding=1, input_size=10)
        b = opt.add_conv2d(3, 5, (1, 3), stride=(1, 2), padding=(0, 1), input_size=(1, 10))
        for layer in (a, b):
            opt.record_inputs(layer, x if layer == a else x[:, :, None, :])
            opt.record_output_grads(layer, g if layer == a else g[:, :, None, :])
        opt.update_factors()
        for fa, fb in zip(opt.factors(a), opt.factors(b)):
            np.testing.assert_array_equal(fa, fb)


def test_several_record_calls_average_over_all_examples(rng, dtype):
    conv = cr.Conv(4, 4, (3, 3), (5, 5), padding=(1, 1), groups=2)
    x1, g1 = _batch(rng, conv, dtype, 2)
    x2, g2 = _batch(rng, conv, dtype, 5)
    with kfac.Optimizer(dtype) as opt:
        layer = conv.add_to(opt)
        opt.record_inputs(layer, x1)
        opt.record_inputs(layer, x2)
        opt.record_output_grads(layer, g1)
        opt.record_output_grads(layer, g2)
        opt.update_factors()
        expected = cr.expected_factors(np.concatenate([x1, x2]), np.concatenate([g1, g2]), conv)
        _check_factors(opt, layer, expected, dtype)


def test_mean_reduction_multiplies_output_grads_by_the_examples(rng):
    conv = cr.Conv(2, 3, (3, 3), (5, 5))
    x, g = _batch(rng, conv, np.float64, 4)
    with kfac.Optimizer(np.float64, loss_reduction="mean") as mean, kfac.Optimizer(np.float64) as total:
        for opt, grads in ((mean, g / 4), (total, g)):
            layer = conv.add_to(opt)
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, grads)
            opt.update_factors()
        assert_close(mean.factors(0)[1], total.factors(0)[1], np.float64)
        assert_close(total.factors(0)[1], cr.expected_factors(x, g, conv)[0][1], np.float64)


def test_record_checks_the_element_count_and_accepts_conv_shapes(rng):
    with kfac.Optimizer(np.float64) as opt:
        c2 = opt.add_conv2d(2, 3, 3, input_size=(5, 6))
        c1 = opt.add_conv1d(2, 3, 3, input_size=7, layout="nhwc")
        d = opt.add_dense(4, 2)
        opt.record_inputs(c2, rng.standard_normal((4, 2, 5, 6)))  # [N][C][H][W]
        opt.record_inputs(c2, rng.standard_normal((4, 60)))  # flattened examples
        opt.record_output_grads(c2, rng.standard_normal((4, 3, 3, 4)).astype(np.float32))  # widened
        opt.record_inputs(c1, rng.standard_normal((2, 7, 2)))  # [N][L][C]
        opt.record_output_grads(c1, rng.standard_normal((2, 5, 3)))
        with pytest.raises(ValueError, match="60"):
            opt.record_inputs(c2, rng.standard_normal((4, 2, 5, 5)))
        with pytest.raises(ValueError, match="per example"):
            opt.record_output_grads(c2, rng.standard_normal((4, 3, 4, 4)))
        with pytest.raises(ValueError):
            opt.record_inputs(c1, rng.standard_normal((2, 2, 6)))
        with pytest.raises(TypeError):
            opt.record_inputs(c2, rng.standard_normal((4, 2, 5, 6)).astype(np.float32).astype(np.complex64))
        with pytest.raises(kfac.KFACError) as info:
            opt.record_inputs(c2, np.zeros((0, 2, 5, 6)))
        assert info.value.status == kfac.KFAC_ERROR_INVALID_SIZE
        opt.record_inputs(d, rng.standard_normal((3, 5, 4)))  # dense: rows flattened as before
    with kfac.Optimizer(np.float32) as opt:
        layer = opt.add_conv2d(2, 3, 3, input_size=(5, 6))
        with pytest.raises(TypeError, match="narrowed"):
            opt.record_inputs(layer, rng.standard_normal((1, 2, 5, 6)))


def test_records_are_zero_copy_for_contiguous_arrays_of_the_dtype(rng, monkeypatch):
    seen = []
    with kfac.Optimizer(np.float32) as opt:
        layer = opt.add_conv2d(2, 3, 3, input_size=(5, 6))
        x = rng.standard_normal((4, 2, 5, 6)).astype(np.float32)
        original = opt.handle.call

        def spy(function, *args):
            seen.append(args)
            return original(function, *args)

        monkeypatch.setattr(opt.handle, "call", spy)
        opt.record_inputs(layer, x)
    (layer_arg, pointer, rows), = seen
    assert ctypes.cast(pointer, ctypes.c_void_p).value == x.ctypes.data and rows == 4


# ---------------------------------------------------------------------------------------------
# SUA
# ---------------------------------------------------------------------------------------------

SUA_GEOMETRIES = [g for g in GEOMETRIES if g.label in (
    "3x3", "stride2-pad1", "dilation2", "groups2", "depthwise-x2", "non-square", "nobias",
    "conv1d", "1x1")]


@pytest.mark.parametrize("layout", ["nchw", "nhwc"])
@pytest.mark.parametrize("conv", SUA_GEOMETRIES, ids=_ids(SUA_GEOMETRIES))
def test_sua_omega_is_the_transformed_kfc_omega(rng, dtype, conv, layout):
    """SUA Ω = KFC Ω with cross-offset blocks removed, same-offset blocks replaced by their mean,
    and the bias block |T| without cross terms; Γ is KFC's."""
    kfc = _with(conv, layout=layout)
    sua = _with(conv, layout=layout, approximation="sua")
    x, g = _batch(rng, kfc, dtype)
    with kfac.Optimizer(dtype) as opt:
        a = kfc.add_to(opt)
        b = sua.add_to(opt)
        for layer in (a, b):
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, g)
        opt.update_factors()
        for group in range(conv.groups):
            omega_kfc, gamma_kfc = opt.factors(a, group)
            omega_sua, gamma_sua = opt.factors(b, group)
            # against the library's own KFC Ω and against the reference
            assert_close(omega_sua, cr.sua_from_kfc(omega_kfc.astype(np.float64), conv), dtype, scale=5.0)
            assert_close(gamma_sua, gamma_kfc, dtype)
            ref_omega, ref_gamma = cr.expected_factors(x, g, sua)[group]
            assert_close(omega_sua, ref_omega, dtype, scale=5.0)
            if conv.bias:
                assert_close(omega_sua[-1, -1], conv.positions, dtype)
                assert not np.any(omega_sua[-1, :-1]) and not np.any(omega_sua[:-1, -1])


def test_sua_factor_is_c_kron_identity_in_weight_order(rng):
    conv = cr.Conv(3, 2, (2, 2), (4, 4), padding=(1, 1), approximation="sua", bias=False)
    opt, layer, _ = _recorded(rng, conv, np.float64)
    with opt:
        omega, _ = opt.factors(layer)
    c = omega[::4, ::4]  # channel blocks at offset 0
    np.testing.assert_allclose(omega, np.kron(c, np.eye(4)), rtol=0, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Channel grouping
# ---------------------------------------------------------------------------------------------

GROUPED = [
    cr.Conv(5, 6, (3, 3), (5, 6), padding=(1, 1), input_group_size=2, output_group_size=4,
            label="kfc-5in-by2-6out-by4"),
    cr.Conv(4, 6, (3, 3), (5, 6), padding=(1, 1), groups=2, input_group_size=1,
            output_group_size=2, label="kfc-groups2-by1-by2"),
    cr.Conv(4, 6, (2, 3), (5, 6), stride=(2, 1), input_group_size=3, label="kfc-input-only"),
    cr.Conv(4, 6, (3, 3), (5, 6), output_group_size=5, bias=False, label="kfc-output-only-nobias"),
    cr.Conv(4, 6, (3, 3), (5, 6), input_group_size=4, output_group_size=6, label="kfc-not-smaller"),
    cr.Conv(4, 6, (3, 3), (5, 6), input_group_size=9, output_group_size=100, label="kfc-larger"),
    cr.Conv(5, 6, (3, 3), (5, 6), padding=(1, 1), approximation="sua", input_group_size=2,
            output_group_size=4, label="sua-by2-by4"),
    cr.Conv(4, 4, (3, 3), (6, 6), stride=(2, 2), groups=2, approximation="sua", input_group_size=1,
            output_group_size=1, bias=False, label="sua-groups2-by1"),
    cr.Conv(4, 4, (1, 3), (1, 9), padding=(0, 1), one_d=True, input_group_size=3,
            output_group_size=2, label="conv1d-by3-by2"),
]


@pytest.mark.parametrize("conv", GROUPED, ids=_ids(GROUPED))
def test_grouped_factors_are_the_block_diagonal_part(rng, dtype, conv):
    opt, layer, expected = _recorded(rng, conv, dtype)
    with opt:
        _check_factors(opt, layer, expected, dtype)
        ungrouped = _with(conv, input_group_size=0, output_group_size=0)
        x, g = _batch(rng, conv, dtype)
        full = cr.expected_factors(x, g, ungrouped)
        blocks = cr.expected_factors(x, g, conv)
        for (omega, gamma), (omega_b, gamma_b) in zip(full, blocks):
            # the block-diagonal part: equal on the blocks, zero elsewhere
            on = cr.mask(cr.input_ids(conv)).astype(bool)
            np.testing.assert_array_equal(omega_b[on], omega[on])
            assert not np.any(omega_b[~on])
            on = cr.mask(cr.block_ids(conv.cout, conv.output_group_size, False)).astype(bool)
            np.testing.assert_array_equal(gamma_b[on], gamma[on])
            assert not np.any(gamma_b[~on])


def test_group_size_not_smaller_than_the_channels_means_no_grouping(rng):
    conv = cr.Conv(4, 6, (3, 3), (5, 6))
    x, g = _batch(rng, conv, np.float64)
    with kfac.Optimizer(np.float64) as opt:
        layers = [
            _with(conv, input_group_size=s, output_group_size=t).add_to(opt)
            for s, t in ((0, 0), (4, 6), (7, 99))
        ]
        for layer in layers:
            opt.record_inputs(layer, x)
            opt.record_output_grads(layer, g)
        opt.update_factors()
        for layer in layers[1:]:
            for a, b in zip(opt.factors(layer), opt.factors(layers[0])):
                np.testing.assert_array_equal(a, b)
        assert np.all(opt.factors(layers[0])[0][-1] != 0)  # the bias row is joined to the block


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("sizes", [(2, 2), (3, 0), (0, 4), (5, 3), (7, 9)], ids=str)
def test_grouped_dense_factors(rng, dtype, bias, sizes):
    s_in, s_out = sizes
    with kfac.Optimizer(dtype) as opt:
        layer = opt.add_dense(7, 5, bias=bias, input_group_size=s_in, output_group_size=s_out)
        info = opt.layer_info(layer)
        assert (info.kind, info.groups, info.a_dim, info.g_dim) == (kfac.KFAC_LAYER_DENSE, 1, 7 + bias, 5)
        x = rng.standard_normal((9, 7)).astype(dtype)
        g = rng.standard_normal((9, 5)).astype(dtype)
        opt.record_inputs(layer, x)
        opt.record_output_grads(layer, g)
        opt.update_factors()
        A, G = opt.factors(layer)
        A_ref, G_ref = ref.batch_factors(x, g, bias)
        assert_close(A, A_ref * cr.mask(cr.block_ids(7, s_in, bias)), dtype)
        assert_close(G, G_ref * cr.mask(cr.block_ids(5, s_out, False)), dtype)


def test_dense_group_sizes_reach_the_library_in_the_descriptor(monkeypatch):
    """0.2 has one entry point, kfac_layer_add_dense with a kfac_dense_desc (0.1 chose between
    kfac_add_dense and kfac_add_dense_grouped): the group sizes travel in the descriptor."""
    calls = []
    with kfac.Optimizer(np.float64) as opt:
        original = opt.handle.call

        def spy(function, *args):
            desc = ctypes.cast(args[0], ctypes.POINTER(_lib.kfac_dense_desc)).contents
            calls.append((function, desc.struct_size, desc.in_features, desc.out_features, desc.has_bias,
                          desc.reserved, desc.input_group_size, desc.output_group_size))
            return original(function, *args)

        monkeypatch.setattr(opt.handle, "call", spy)
        opt.add_dense(3, 2)
        opt.add_dense(3, 2, input_group_size=1)
        opt.add_dense(3, 2, bias=False, output_group_size=1)
    size = ctypes.sizeof(_lib.kfac_dense_desc)
    assert calls == [
        (_lib.kfac_layer_add_dense, size, 3, 2, 1, 0, 0, 0),
        (_lib.kfac_layer_add_dense, size, 3, 2, 1, 0, 1, 0),
        (_lib.kfac_layer_add_dense, size, 3, 2, 0, 0, 0, 1),
    ]


def test_group_factor_errors(rng):
    conv = cr.Conv(4, 4, (3, 3), (5, 5), groups=2)
    opt, layer, _ = _recorded(rng, conv, np.float64)
    with opt:
        for group in (-1, 2, 2**31 - 1, -(2**31), 2**40):
            with pytest.raises(kfac.KFACError) as info:
                opt.factors(layer, group)
            assert info.value.status == kfac.KFAC_ERROR_INVALID_ARGUMENT, group
        with pytest.raises(TypeError):
            opt.factors(layer, True)
        with pytest.raises(kfac.KFACError) as info:
            opt.factors(7)
        assert info.value.status == kfac.KFAC_ERROR_UNKNOWN_LAYER


def test_get_group_factors_raw_errors(rng):
    """INVALID_ARGUMENT for a group out of range, DTYPE_MISMATCH, NO_STATISTICS; buffers
    untouched."""
    with kfac.Optimizer(np.float64) as opt:
        layer = opt.add_conv2d(4, 4, 3, groups=2, input_size=(5, 5))
        h = opt.handle.pointer
        a = np.full((19, 19), 7.0)
        g = np.full((2, 2), 7.0)
        dp = ctypes.POINTER(ctypes.c_double)
        fp = ctypes.POINTER(ctypes.c_float)
        assert _lib.kfac_layer_get_factors_f64(h, layer, 0, a.ctypes.data_as(dp), g.ctypes.data_as(dp)) == \
            kfac.KFAC_ERROR_NO_STATISTICS
        opt.record_inputs(layer, rng.standard_normal((2, 4, 5, 5)))
        opt.record_output_grads(layer, rng.standard_normal((2, 4, 3, 3)))
        opt.update_factors()
        for group in (-1, 2):
            assert _lib.kfac_layer_get_factors_f64(h, layer, group, a.ctypes.data_as(dp), None) == \
                kfac.KFAC_ERROR_INVALID_ARGUMENT
        af = np.zeros((19, 19), np.float32)
        assert _lib.kfac_layer_get_factors_f32(h, layer, 0, af.ctypes.data_as(fp), None) == \
            kfac.KFAC_ERROR_DTYPE_MISMATCH
        assert _lib.kfac_layer_get_factors_f64(h, 1, 0, a.ctypes.data_as(dp), None) == \
            kfac.KFAC_ERROR_UNKNOWN_LAYER
        assert _lib.kfac_layer_get_factors_f64(None, 0, 0, None, None) == kfac.KFAC_ERROR_NULL_POINTER
        assert np.all(a == 7.0) and np.all(g == 7.0)
        assert _lib.kfac_layer_get_factors_f64(h, layer, 1, None, g.ctypes.data_as(dp)) == kfac.KFAC_OK
        assert np.all(a == 7.0) and not np.all(g == 7.0)


# ---------------------------------------------------------------------------------------------
# Preconditioning
# ---------------------------------------------------------------------------------------------

PRECONDITIONED = [
    cr.Conv(4, 6, (3, 3), (5, 6), stride=(2, 1), padding=(1, 1), groups=2, label="groups2"),
    cr.Conv(5, 6, (3, 3), (5, 5), padding=(1, 1), input_group_size=2, output_group_size=4,
            label="channel-grouping"),
    cr.Conv(4, 6, (2, 3), (6, 6), stride=(2, 2), dilation=(1, 2), groups=2, input_group_size=1,
            output_group_size=2, bias=False, layout="nhwc", label="groups-grouping-nhwc-nobias"),
    cr.Conv(3, 3, (3, 3), (4, 4), padding=(1, 1), groups=3, label="depthwise"),
    cr.Conv(3, 4, (1, 3), (1, 9), stride=(1, 2), padding=(0, 1), one_d=True, label="conv1d"),
]


def _gradient(rng, conv, dtype):
    w = rng.standard_normal(conv.weight_shape()).astype(dtype)
    b = rng.standard_normal(conv.out_channels).astype(dtype) if conv.bias else None
    return w, b


@pytest.mark.parametrize("approximation", ["kfc", "sua"])
@pytest.mark.parametrize("strategy", ["eigen", "cholesky"])
@pytest.mark.parametrize("conv", PRECONDITIONED, ids=_ids(PRECONDITIONED))
def test_precondition_equals_per_group_kronecker_solve(rng, dtype, conv, strategy, approximation):
    conv = _with(conv, approximation=approximation)
    damping = 0.05
    opt, layer, expected = _recorded(rng, conv, dtype, damping=damping, inverse_strategy=strategy)
    with opt:
        opt.update_inverses()
        assert opt.layer_info(layer).has_inverses
        w, b = _gradient(rng, conv, dtype)
        want_w, want_b = cr.precondition(expected, w, b, conv, damping, strategy)
        opt.precondition(layer, w, b)
        scale = 5.0 if dtype == np.float64 else 20.0
        assert_close(w, want_w, dtype, scale=scale)
        if conv.bias:
            assert_close(b, want_b, dtype, scale=scale)


@pytest.mark.parametrize("use_pi", [True, False], ids=["pi", "nopi"])
def test_cholesky_pi_uses_the_traces_of_the_whole_group_factors(rng, use_pi):
    conv = cr.Conv(4, 6, (3, 3), (5, 6), padding=(1, 1), groups=2, approximation="sua",
                   input_group_size=1, output_group_size=2)
    damping = 0.02
    opt, layer, expected = _recorded(rng, conv, np.float64, damping=damping,
                                     inverse_strategy="cholesky", pi_damping=use_pi)
    with opt:
        opt.update_inverses()
        w, b = _gradient(rng, conv, np.float64)
        want_w, want_b = cr.precondition(expected, w, b, conv, damping, "cholesky", use_pi)
        opt.precondition(layer, w, b)
        assert_close(w, want_w, np.float64)
        assert_close(b, want_b, np.float64)


@pytest.mark.parametrize("approximation", ["kfc", "sua"])
def test_step_over_dense_and_conv_layers_with_kl_clip(rng, dtype, approximation):
    """kfac_step over a dense, a grouped conv and a conv1d layer: every direction equals the
    reference, scaled by the ν computed over all layers (all groups)."""
    damping, kl_clip, lr = 0.1, 1e-3, 0.3
    convs = [
        cr.Conv(4, 6, (3, 3), (5, 6), stride=(2, 1), padding=(1, 1), groups=2,
                approximation=approximation, input_group_size=1),
        cr.Conv(3, 4, (1, 3), (1, 9), stride=(1, 2), padding=(0, 1), one_d=True, bias=False,
                approximation=approximation),
    ]
    with kfac.Optimizer(dtype, damping=damping, kl_clip=kl_clip, learning_rate=lr) as opt:
        dense = opt.add_dense(5, 3, output_group_size=2)
        layers = [conv.add_to(opt) for conv in convs]
        x = rng.standard_normal((7, 5)).astype(dtype)
        gd = rng.standard_normal((7, 3)).astype(dtype)
        opt.record_inputs(dense, x)
        opt.record_output_grads(dense, gd)
        expected = []
        for conv, layer in zip(convs, layers):
            xc, gc = _batch(rng, conv, dtype)
            opt.record_inputs(layer, xc)
            opt.record_output_grads(layer, gc)
            expected.append(cr.expected_factors(xc, gc, conv))
        wd, bd = rng.standard_normal((3, 5)).astype(dtype), rng.standard_normal(3).astype(dtype)
        grads = [_gradient(rng, conv, dtype) for conv in convs]
        V = [ref.theta_grad(wd, bd)]
        A, G = ref.batch_factors(x, gd, True)
        G = G * cr.mask(cr.block_ids(3, 2, False))
        U = [ref.precondition_eigen(A, G, V[0], damping)]
        for conv, factors, (w, b) in zip(convs, expected, grads):
            uw, ub = cr.precondition(factors, w, b, conv, damping)
            V.append(np.concatenate([np.ravel(w), [] if b is None else b]).astype(np.float64))
            U.append(np.concatenate([np.ravel(uw), [] if ub is None else ub]))
        nu = ref.kl_scale(U, V, kl_clip, lr)
        assert nu < 1  # the clip is active
        opt.step([wd] + [w for w, _ in grads], [bd] + [b for _, b in grads])
        assert_close(opt.last_kl_scale, nu, dtype, scale=5.0)
        scale = 5.0 if dtype == np.float64 else 20.0
        assert_close(ref.theta_grad(wd, bd), nu * U[0], dtype, scale=scale)
        for (w, b), u in zip(grads, U[1:]):
            got = np.concatenate([np.ravel(w), [] if b is None else b])
            assert_close(got, nu * u, dtype, scale=scale)


def test_step_and_precondition_check_conv_gradient_shapes(rng):
    conv = cr.Conv(4, 6, (3, 3), (5, 6), groups=2)
    opt, layer, _ = _recorded(rng, conv, np.float64, kl_clip=0)
    with opt:
        opt.update_inverses()
        w, b = _gradient(rng, conv, np.float64)
        flat = w.reshape(6, 18).copy()
        expected = flat.copy()
        opt.precondition(layer, w, b.copy())
        opt.precondition(layer, flat, b.copy())  # [C_out][(C_in/groups)·kh·kw] is accepted
        np.testing.assert_allclose(flat, w.reshape(6, 18), rtol=1e-13)
        assert not np.allclose(flat, expected)
        with pytest.raises(ValueError, match="expected"):
            opt.precondition(layer, np.zeros((6, 4, 3, 3)), b)
        with pytest.raises(ValueError, match="expected"):
            opt.step([np.zeros((6, 2, 3, 2))], [b])
        with pytest.raises(ValueError, match="C-contiguous"):
            opt.step([np.zeros((6, 2, 3, 3)).transpose(0, 1, 3, 2)], [b])
