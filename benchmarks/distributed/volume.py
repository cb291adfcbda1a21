"""Communication volume and inverse load balance of libkfac's distributed runs, per step.

For a model's layer shapes (ResNet-50, a 12-block transformer stack) and rank counts P, prints
the values each rank sends per step — the statistics pack (eager: every factor update; lazy:
every inverse update) and the inverse pack (every inverse update), as a ring allreduce moves them
(2(P−1)/P × the buffer), and the allgatherv of the owned inverse units instead (what a rank
receives: every other rank's units once; the eager/lazy ratios count this route) — against the
gradient allreduce's, and the inverse stage's load-balance
efficiency (Σ n³ / P) / (the busiest rank's Σ n³) for the library's assignment (longest
processing time over blocks) with whole factors as units (no channel grouping) and with channel
groups of 32. Then checks the pack-size model against the library on a small model
(libkfac.Optimizer.exchange_size), when the bindings can be imported.

    python3 benchmarks/distributed/volume.py [--tf 1] [--ti 10] [--bytes 4]
"""

import argparse


def resnet50():
    """(name, a_dim, g_dim, in_channels, out_channels, kernel area, bias) of torchvision's
    ResNet-50 v1.5: 53 convolutions and the final fully connected layer."""
    layers = [("conv1", 3, 64, 49, False)]
    cin = 64
    for stage, (width, blocks) in enumerate([(64, 3), (128, 4), (256, 6), (512, 3)]):
        for b in range(blocks):
            layers += [(f"l{stage + 1}.{b}.c1", cin, width, 1, False), (f"l{stage + 1}.{b}.c2", width, width, 9, False),
                       (f"l{stage + 1}.{b}.c3", width, 4 * width, 1, False)]
            if b == 0:
                layers.append((f"l{stage + 1}.{b}.down", cin, 4 * width, 1, False))
            cin = 4 * width
    layers.append(("fc", 2048, 1000, 1, True))
    return layers


def transformer(blocks=12, d=768):
    layers = []
    for b in range(blocks):
        layers += [(f"b{b}.qkv", d, 3 * d, 1, True), (f"b{b}.proj", d, d, 1, True),
                   (f"b{b}.fc1", d, 4 * d, 1, True), (f"b{b}.fc2", 4 * d, d, 1, True)]
    return layers


def factor_blocks(channels, area, bias, group):
    """Unique block sizes of one factor with channel groups of `group` (0: one block, bias
    included), as the library forms them (KFC: a channel group covers its kernel positions)."""
    if group <= 0 or group >= channels:
        return [channels * area + (1 if bias else 0)]
    sizes, start = [], 0
    while start < channels:
        sizes.append(min(group, channels - start) * area)
        start += group
    return sizes + ([1] if bias else [])


def units(layers, group):
    out = []
    for _, cin, cout, area, bias in layers:
        out.append(factor_blocks(cin, area, bias, group))
        out.append(factor_blocks(cout, 1, False, group))
    return out


def statistics_values(layers, group):
    return sum(sum(b * (b + 1) // 2 for b in f) + 1 for f in units(layers, group))


def inverse_values(layers, group, strategy):
    # eigen: eigenvectors b² and eigenvalues b per block; Cholesky: the inverse block b².
    return sum(sum(b * b + (b if strategy == "eigen" else 0) for b in f) for f in units(layers, group))


def gradient_values(layers):
    return sum(cin * cout * area + (cout if bias else 0) for _, cin, cout, area, bias in layers)


def lpt_owners(costs, p):
    """The rank of each unit (in the given fixed order) under the library's assignment: cost
    largest first, ties in the fixed order, each to the least-loaded rank (lowest on a tie)."""
    loads, owner = [0.0] * p, [0] * len(costs)
    for i in sorted(range(len(costs)), key=lambda i: -costs[i]):
        r = min(range(p), key=lambda r: (loads[r], r))
        loads[r] += costs[i]
        owner[i] = r
    return owner


def gathered_counts(layers, group, strategy, p):
    """Values per rank of the allgatherv inverse exchange when every block is inverted."""
    sizes = [b for f in units(layers, group) for b in f]
    counts = [0] * p
    for b, r in zip(sizes, lpt_owners([b ** 3 for b in sizes], p)):
        counts[r] += b * b + (b if strategy == "eigen" else 0)
    return counts


def lpt_efficiency(costs, p):
    loads = [0.0] * p
    for c in sorted(costs, reverse=True):
        i = min(range(p), key=lambda r: (loads[r], r))
        loads[i] += c
    return sum(costs) / p / max(loads)


def report(name, layers, tf, ti, width, ranks):
    g = gradient_values(layers)
    print(f"\n{name}: {len(layers)} layers, {g / 1e6:.1f} M parameters; factor period {tf}, inverse period {ti}, "
          f"{width}-byte values; MB per rank per step as a ring allreduce moves them (2(P−1)/P × buffer)")
    print(f"{'P':>6} {'gradient':>9} {'stats eager':>12} {'stats lazy':>11} {'inverses':>9} {'inv gath.':>9} "
          f"{'eager/grad':>10} {'lazy/grad':>9} {'LPT whole':>10} {'LPT g32':>8}")
    whole = [b ** 3 for f in units(layers, 0) for b in f]
    g32 = [b ** 3 for f in units(layers, 32) for b in f]
    for p in ranks:
        ring = 2 * (p - 1) / p * width / 1e6
        grad = g * ring
        stats = statistics_values(layers, 0) * ring
        inv = inverse_values(layers, 0, "eigen") * ring / ti
        # The allgatherv route: a rank receives every other rank's units once (a ring allgather
        # moves the same), the busiest receiver being the rank that owns the fewest values.
        counts = gathered_counts(layers, 0, "eigen", p)
        gathered = (sum(counts) - min(counts)) * width / 1e6 / ti
        eager, lazy = stats / tf + gathered, stats / ti + gathered
        print(f"{p:>6} {grad:>9.1f} {stats / tf:>12.1f} {stats / ti:>11.1f} {inv:>9.1f} {gathered:>9.1f} "
              f"{eager / grad:>10.2f} {lazy / grad:>9.2f} {lpt_efficiency(whole, p):>10.3f} {lpt_efficiency(g32, p):>8.3f}")


def check_against_library():
    try:
        import numpy as np
        import libkfac as kfac
    except Exception as error:  # the bindings are optional here
        print(f"\n(library check skipped: {error})")
        return
    layers = [("d0", 7, 5, 1, True), ("d1", 5, 3, 1, False)]
    for group in (0, 2):
        for strategy in ("eigen", "cholesky"):
            with kfac.Optimizer(np.float64, inverse_strategy=strategy) as opt:
                for _, cin, cout, _, bias in layers:
                    opt.add_dense(cin, cout, bias=bias, input_group_size=group, output_group_size=group)
                got = (opt.exchange_size("statistics"), opt.exchange_size("inverses"))
            want = (statistics_values(layers, group), inverse_values(layers, group, strategy))
            # The gathered layout on 3 ranks (the first step inverts every block).
            counts_got = []
            for r in range(3):
                with kfac.Optimizer(np.float64, inverse_strategy=strategy) as opt:
                    for _, cin, cout, _, bias in layers:
                        opt.add_dense(cin, cout, bias=bias, input_group_size=group, output_group_size=group)
                    opt.set_world(r, 3)
                    rng = np.random.default_rng(0)
                    for i, (_, cin, cout, _, _) in enumerate(layers):
                        opt.record_inputs(i, rng.standard_normal((4, cin)))
                        opt.record_output_grads(i, rng.standard_normal((4, cout)))
                    counts_got.append(opt.inverse_layout()[0])
            got = got + (counts_got[0],)
            want = want + (gathered_counts(layers, group, strategy, 3),)
            if any(c != counts_got[0] for c in counts_got):
                raise SystemExit("the ranks disagree on the gathered layout")
            status = "ok" if got == want else "MISMATCH"
            print(f"library check, groups {group or 'none'}, {strategy}: statistics {got[0]} (model {want[0]}), "
                  f"inverses {got[1]} (model {want[1]}), gathered on 3 ranks {got[2]} (model {want[2]}): {status}")
            if got != want:
                raise SystemExit(1)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tf", type=int, default=1, help="factor update period")
    parser.add_argument("--ti", type=int, default=10, help="inverse update period")
    parser.add_argument("--bytes", type=int, default=4, help="bytes per value (4: float32 handles)")
    args = parser.parse_args()
    ranks = [2, 4, 8, 64, 128, 1024]
    report("ResNet-50 (KFC)", resnet50(), args.tf, args.ti, args.bytes, ranks)
    report("Transformer, 12 blocks of d = 768", transformer(), args.tf, args.ti, args.bytes, ranks)
    check_against_library()


if __name__ == "__main__":
    main()
