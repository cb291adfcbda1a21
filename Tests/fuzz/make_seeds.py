#!/usr/bin/env python3
"""Writes the hand-made seeds of the fuzz corpus (Tests/fuzz/corpus/seed-*): short programs in
the harness's encoding (Tests/fuzz/fuzz_api.c) that reach the interesting states — a dense and a
convolution layer, recorded statistics, steps with either inverse strategy, state images saved,
edited, resealed and loaded, files, the adaptive mode, two handles, and the experimental families
(links with cross factors and curvature products, the Gauss-Newton chain with columns and KFRA,
conjugate gradient, distributed pack/unpack). The rest of the corpus is
a set cover of what the long runs of issue 15 kept (libFuzzer's -set_cover_merge: 1,534
inputs, 200 KB, named by their SHA-1), plus the 1,452 inputs that libFuzzer's -merge=1 kept from
the runs that first drove the experimental families (new edges and features over that cover);
`make fuzz` adds new inputs to build/fuzz-corpus, not to the repository."""
import os
import sys

H1 = 0x80  # the op byte's high bit selects the second handle


def create(f64=True, h=0):
    return [0x00 | h, 0, 1 if f64 else 0, 1]


def param_int(index, value_index, h=0):
    return [0x01 | h, index, 1, value_index]


def dense(in_sel=2, out_sel=1, bias=1, h=0):
    # struct_size, not hostile, in, out, has_bias (2 bytes), reserved, groups (2), non-NULL desc
    return [0x02 | h, 1, 1, in_sel, out_sel, 1, bias, 1, 1, 1, 1]


def conv(h=0):
    return [0x03 | h, 1, 1, 1, 3, 2, 2, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1, 2, 4, 4, 1, 1, 1, 0, 1, 0, 1, 1, 1, 1]


def record(layer, side, rows_sel=3, h=0):
    # layer (2 bytes), side, dtype, rows (2 bytes), value mode, non-NULL
    return [0x04 | h, 1, layer, side, 1, 1, rows_sel, 2, 1]


def step(layers_with_bias, h=0):
    out = [0x07 | h, 1, 1]
    for bias in layers_with_bias:
        out += [2, 1] + ([2] if bias else []) + [1]
    return out + [1, 1, 0]


def save(h=0):
    return [0x0C | h, 0, 0, 1]


def load_edited(at, h=0, reseal=True):
    return [0x0C | h, 1, 0, 1, 1, 0, (at >> 16) & 255, (at >> 8) & 255, at & 255, 0, 3, 1 if reseal else 0, 1]


def files(h=0):
    return [0x0C | h, 3, 0, 1, 0x0C | h, 4, 0, 1, 0x0D | h, 5, 1]


def solve_and_report(h=0):
    solve = [0x0B | h, 1, 1, 3, 1, 2, 1, 0, 2, 0, 2, 2, 2, 0, 1]
    report = [0x0B | h, 1, 1, 3, 1, 2, 1, 0, 2, 0, 2, 2, 2, 2, 100, 90, 1]
    return solve + report


def schedule(which, h=0):
    return [0x0A | h, which, 1, 0, 0, 0, 0]


def train(bias_layers, rounds):
    out = []
    for _ in range(rounds):
        for layer in range(len(bias_layers)):
            out += record(layer, 0) + record(layer, 1)
        out += step(bias_layers)
    return out


# Op 15: the experimental families (second byte: 1-2 chain, 3 columns, 4-5 CG, 6 distributed, 7 links).
def buffers(layers_with_bias):
    out = [1]
    for bias in layers_with_bias:
        out += [2, 1] + ([2] if bias else []) + [1]
    return out + [1, 1]


def curvature(layers_with_bias, power, h=0):
    return [0x07 | h, 1] + buffers(layers_with_bias) + [1, 1, 1 if power > 0 else 2]


def link(h=0):
    return [0x0F | h, 7, 1, 0, 1, 1]


def cross_factors(h=0):
    return [0x0F | h, 7, 1, 0, 1, 0, 1, 1, 1]


def chain_define(n=2, h=0):
    # dtype, define, n, identity order, five activations (tanh), last IDENTITY, distribution 0, no NULLs
    return [0x0F | h, 1, 1, 0, 1, n - 1, 0] + [1, 2] * 5 + [1, 1, 0, 3]


def chain_forward(h=0):
    layer0 = [2, 1, 2, 2, 2]
    later = [2, 1, 2, 1, 2]
    return [0x0F | h, 1, 1, 1, 1, 1] + layer0 + later * 3 + [1, 5]


def chain_columns(uses=3, h=0):
    return [0x0F | h, 1, 1, 2, 1, uses - 1]


def chain_kfra(h=0):
    return [0x0F | h, 1, 1, 3, 1, 0, 1, 1, 1, 2]


def gn_multiply(layers_with_bias, chain, h=0):
    return [0x0F | h, 1, 1, 4 if chain else 5] + buffers(layers_with_bias) + buffers(layers_with_bias)


def cg(layers_with_bias, h=0):
    desc = [1, 1, 3, 0, 1, 1, 0, 1]  # defaults but 5 iterations, K-FAC preconditioner
    begin = [0x0F | h, 4, 1, 0] + desc + buffers(layers_with_bias) + [1] + buffers(layers_with_bias) + [1, 1, 1]
    vector = [0x0F | h, 4, 1, 1] + buffers(layers_with_bias)
    supply = [0x0F | h, 4, 1, 2] + buffers(layers_with_bias) + [1]
    finish = [0x0F | h, 4, 1, 3] + buffers(layers_with_bias) + [1, 1]
    report = [0x0F | h, 4, 1, 4, 1, 150, 140, 1]
    return begin + (vector + supply) * 3 + finish + report


def distributed(h=0):
    world = [0x0F | h, 6, 1, 0, 1, 0, 1, 0, 1, 1, 1, 1]
    statistics = [0x0F | h, 6, 1, 3, 1, 0, 1, 0, 0, 1, 1]
    inverses = [0x0F | h, 6, 1, 3, 1, 1, 1, 0, 0, 1, 1]
    return world + statistics + inverses


SEEDS = {
    "dense-eigen": create() + dense() + train([1], 3) + save() + load_edited(200),
    "dense-cholesky-f32": create(False) + param_int(7, 0) + dense() + train([1], 3) + save() + load_edited(96),
    "two-layers": create() + dense() + dense(3, 2, 0) + train([1, 0], 2) + save() + files(),
    "conv": create(False) + conv() + train([1], 2) + save() + load_edited(300, reseal=False),
    "adaptive": create() + param_int(11, 1) + dense() + train([1], 2) + solve_and_report() + train([1], 1) + save()
    + load_edited(64),
    "discard": create() + dense() + record(0, 0) + schedule(2) + record(0, 0) + record(0, 1) + schedule(0)
    + schedule(1) + step([1]),
    "two-handles": create() + create(False, H1) + dense() + dense(h=H1) + train([1], 1) + save() + [0x8C, 1, 1, 1, 1,
                                                                                                      0, 0, 0, 8, 0,
                                                                                                      3, 1, 1],
    "links": create() + dense() + dense(1, 1) + link() + train([1, 1], 3) + cross_factors() + curvature([1, 1], 1)
    + curvature([1, 1], -1) + save() + load_edited(900),
    "chain-kfra": create() + dense() + dense(1, 1) + chain_define() + train([1, 1], 1) + chain_forward()
    + chain_columns() + gn_multiply([1, 1], True) + gn_multiply([1, 1], False) + chain_kfra() + step([1, 1]),
    "cg": create() + dense() + train([1], 2) + cg([1]),
    "distributed": create() + dense() + distributed() + train([1], 1) + distributed() + step([1]),
}


def main():
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(os.path.dirname(__file__), "corpus")
    os.makedirs(target, exist_ok=True)
    for name, program in SEEDS.items():
        with open(os.path.join(target, "seed-" + name), "wb") as f:
            f.write(bytes(b & 255 for b in program))


if __name__ == "__main__":
    main()
