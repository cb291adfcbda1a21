"""A deliberately naive numpy reference of the convolution conventions of ``include/kfac.h``.

Written from the header's text, independently of the library: receptive-field patches by an
explicit im2col loop over output positions and kernel offsets, factors as sums of outer products,
SUA and channel grouping as explicit transformations of those matrices. Preconditioning reuses
the dense solves of ``kfac_reference`` (the explicit Kronecker matrix, ``np.kron``), per group.
"""

from dataclasses import dataclass, field
from typing import Tuple

import numpy as np

from . import dense as ref


@dataclass
class Conv:
    """A convolution as ``kfac_conv2d_desc`` describes it (PyTorch's Conv2d plus the input size).
    A 1-D convolution is ``one_d=True`` with kernel/stride/... ``(1, k)`` and input ``(1, L)``."""

    in_channels: int
    out_channels: int
    kernel: Tuple[int, int]
    input: Tuple[int, int]
    stride: Tuple[int, int] = (1, 1)
    padding: Tuple[int, int] = (0, 0)
    dilation: Tuple[int, int] = (1, 1)
    groups: int = 1
    bias: bool = True
    layout: str = "nchw"
    one_d: bool = False
    approximation: str = "kfc"
    input_group_size: int = 0
    output_group_size: int = 0
    label: str = field(default="", compare=False)

    @property
    def output(self) -> Tuple[int, int]:
        return tuple(
            (self.input[d] + 2 * self.padding[d] - self.dilation[d] * (self.kernel[d] - 1) - 1)
            // self.stride[d] + 1
            for d in range(2)
        )

    @property
    def positions(self) -> int:
        """|T|."""
        return self.output[0] * self.output[1]

    @property
    def taps(self) -> int:
        """kh·kw."""
        return self.kernel[0] * self.kernel[1]

    @property
    def cin(self) -> int:
        """Input channels per group."""
        return self.in_channels // self.groups

    @property
    def cout(self) -> int:
        """Output channels per group."""
        return self.out_channels // self.groups

    @property
    def a_dim(self) -> int:
        return self.cin * self.taps + (1 if self.bias else 0)

    # Shapes of one batch of N examples in this layer's layout, as the caller passes them.

    def input_shape(self, n):
        h, w = self.input
        c = self.in_channels
        if self.one_d:
            return (n, w, c) if self.layout == "nhwc" else (n, c, w)
        return (n, h, w, c) if self.layout == "nhwc" else (n, c, h, w)

    def grad_shape(self, n):
        h, w = self.output
        c = self.out_channels
        if self.one_d:
            return (n, w, c) if self.layout == "nhwc" else (n, c, w)
        return (n, h, w, c) if self.layout == "nhwc" else (n, c, h, w)

    def weight_shape(self):
        if self.one_d:
            return (self.out_channels, self.cin, self.kernel[1])
        return (self.out_channels, self.cin, self.kernel[0], self.kernel[1])

    def add_to(self, opt):
        """Registers this convolution on a ``kfac.Optimizer``; returns the layer id."""
        common = dict(
            groups=self.groups, bias=self.bias, layout=self.layout, approximation=self.approximation,
            input_group_size=self.input_group_size, output_group_size=self.output_group_size,
        )
        if self.one_d:
            return opt.add_conv1d(
                self.in_channels, self.out_channels, self.kernel[1], stride=self.stride[1],
                padding=self.padding[1], dilation=self.dilation[1], input_size=self.input[1], **common)
        return opt.add_conv2d(
            self.in_channels, self.out_channels, self.kernel, stride=self.stride, padding=self.padding,
            dilation=self.dilation, input_size=self.input, **common)


def to_nchw(array, conv: Conv):
    """An input or output-gradient batch in [N][C][H][W] float64, whatever the layout and
    dimensionality it was given in."""
    a = np.asarray(array, dtype=np.float64)
    if conv.one_d:
        a = a[:, :, None, :] if conv.layout == "nchw" else a[:, None, :, :]
    if conv.layout == "nhwc":
        a = a.transpose(0, 3, 1, 2)
    return a


def patches(x, conv: Conv):
    """im2col: for each group g an array [N][|T|][cin·kh·kw] of receptive-field patches, entries
    ordered like the flattened weight [c][i][j], zeros where the kernel reads the padding.
    ``x`` is the caller's input batch (any layout)."""
    x = to_nchw(x, conv)
    n = x.shape[0]
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = conv.kernel, conv.stride, conv.padding, conv.dilation
    height, width = conv.input
    out_h, out_w = conv.output
    result = []
    for g in range(conv.groups):
        p = np.zeros((n, out_h * out_w, conv.cin * kh * kw))
        for oh in range(out_h):
            for ow in range(out_w):
                t = oh * out_w + ow
                for c in range(conv.cin):
                    for i in range(kh):
                        for j in range(kw):
                            y = oh * sh - ph + i * dh
                            xx = ow * sw - pw + j * dw
                            if 0 <= y < height and 0 <= xx < width:
                                p[:, t, (c * kh + i) * kw + j] = x[:, g * conv.cin + c, y, xx]
        result.append(p)
    return result


def grad_rows(grads, conv: Conv):
    """For each group g the output gradients [N][|T|][cout]."""
    gr = to_nchw(grads, conv)
    n = gr.shape[0]
    result = []
    for g in range(conv.groups):
        block = gr[:, g * conv.cout:(g + 1) * conv.cout]  # [N][cout][Ho][Wo]
        result.append(block.reshape(n, conv.cout, -1).transpose(0, 2, 1))
    return result


def kfc_factors(x, grads, conv: Conv):
    """[(Ω_g, Γ_g)] of one factor update (KFC, no grouping), from the header's definitions:
    Ω_g = (1/N) Σ_n Σ_t ā ā ᵀ, Γ_g = (1/(N|T|)) Σ_n Σ_t g gᵀ, by explicit loops of outer products."""
    result = []
    n = np.asarray(x).shape[0]
    for p, gg in zip(patches(x, conv), grad_rows(grads, conv)):
        omega = np.zeros((conv.a_dim, conv.a_dim))
        gamma = np.zeros((conv.cout, conv.cout))
        for e in range(n):
            for t in range(conv.positions):
                a = p[e, t]
                if conv.bias:
                    a = np.append(a, 1.0)
                omega += np.outer(a, a)
                gamma += np.outer(gg[e, t], gg[e, t])
        result.append((omega / n, gamma / (n * conv.positions)))
    return result


def sua_from_kfc(omega, conv: Conv):
    """The header's SUA Ω from the KFC Ω (weight order [c][i][j]): cross-offset blocks removed,
    every same-offset diagonal block replaced by the mean of those blocks, bias block kept
    (|T|) without its cross terms."""
    taps, cin = conv.taps, conv.cin
    mean = np.zeros((cin, cin))
    for p in range(taps):
        idx = np.arange(cin) * taps + p
        mean += omega[np.ix_(idx, idx)]
    mean /= taps
    result = np.zeros_like(omega)
    for p in range(taps):
        idx = np.arange(cin) * taps + p
        result[np.ix_(idx, idx)] = mean
    if conv.bias:
        result[-1, -1] = omega[-1, -1]
    return result


def block_ids(count, group_size, bias, force_bias_block=False):
    """Block index of each of ``count`` coordinates (plus a bias coordinate if ``bias``) under
    the header's grouping rule: groups of ``group_size`` consecutive coordinates, the last one
    possibly smaller, the bias its own block; a size of 0 or >= count means no grouping (one
    block, bias included, unless ``force_bias_block``)."""
    active = 0 < group_size < count
    ids = [c // group_size if active else 0 for c in range(count)]
    if bias:
        ids.append(max(ids) + 1 if (active or force_bias_block) else 0)
    return np.array(ids)


def mask(ids):
    """1 where two coordinates share a block."""
    return (ids[:, None] == ids[None, :]).astype(np.float64)


def input_ids(conv: Conv):
    """Block ids of Ω's coordinates (weight order): a channel group covers its channels' kh·kw
    coordinates. SUA always separates the bias (its cross terms are dropped anyway)."""
    channel = block_ids(conv.cin, conv.input_group_size, False)
    ids = np.repeat(channel, conv.taps)
    if conv.bias:
        active = 0 < conv.input_group_size < conv.cin
        separate = active or conv.approximation == "sua"
        ids = np.append(ids, ids.max() + 1 if separate else 0)
    return ids


def expected_factors(x, grads, conv: Conv):
    """[(Ω_g, Γ_g)] as kfac_get_group_factors returns them: KFC or SUA, then channel grouping
    (block-diagonal part)."""
    result = []
    for omega, gamma in kfc_factors(x, grads, conv):
        if conv.approximation == "sua":
            omega = sua_from_kfc(omega, conv)
        omega = omega * mask(input_ids(conv))
        gamma = gamma * mask(block_ids(conv.cout, conv.output_group_size, False))
        result.append((omega, gamma))
    return result


def theta_groups(weight, bias, conv: Conv):
    """[V_g] = [W_g flattened | b_g] of shape [cout][a_dim], in float64."""
    w = np.asarray(weight, dtype=np.float64).reshape(conv.out_channels, -1)
    result = []
    for g in range(conv.groups):
        rows = slice(g * conv.cout, (g + 1) * conv.cout)
        result.append(ref.theta_grad(w[rows], None if bias is None else np.asarray(bias)[rows]))
    return result


def precondition(factors, weight, bias, conv: Conv, damping, strategy="eigen", use_pi=True):
    """The preconditioned gradient by dense per-group solves: ``(U_w, U_b)`` in the caller's
    weight shape and [C_out] (U_b None without bias)."""
    out_w = np.zeros((conv.out_channels, conv.cin * conv.taps))
    out_b = np.zeros(conv.out_channels) if conv.bias else None
    for g, ((omega, gamma), v) in enumerate(zip(factors, theta_groups(weight, bias, conv))):
        if strategy == "eigen":
            u = ref.precondition_eigen(omega, gamma, v, damping)
        else:
            u = ref.precondition_cholesky(omega, gamma, v, damping, use_pi)
        rows = slice(g * conv.cout, (g + 1) * conv.cout)
        w_part, b_part = ref.split_theta(u, conv.bias)
        out_w[rows] = w_part
        if conv.bias:
            out_b[rows] = b_part
    return out_w.reshape(np.shape(weight)), out_b
