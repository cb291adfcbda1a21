/// Targets drawn from the model's predictive distribution, reproducibly: the draws for
/// (seed, row, coordinate) depend on nothing else, so the same seed gives the same targets in
/// any precision, batch split or thread.
public enum TargetSampler {
    /// A uniform in (0, 1) from (seed, row, index): SplitMix64 of a combined key.
    static func uniform(seed: UInt64, row: Int, index: Int) -> Double {
        var z = seed &+ 0x9E37_79B9_7F4A_7C15 &* (UInt64(truncatingIfNeeded: row) &* 0x1_0000_0001 &+ UInt64(truncatingIfNeeded: index) &+ 1)
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        z ^= z >> 31
        return (Double(z >> 11) + 0.5) / Double(1 << 53)
    }

    /// Writes sampled targets: a one-hot row (categorical), 0/1 values (bernoulli), or
    /// μ + standard normal noise (gaussian).
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    public static func sampleTargets<S: KFACScalar>(
        distribution: OutputDistribution, outputs z: UnsafePointer<S>, rows: Int, dim: Int, seed: UInt64,
        into targets: UnsafeMutablePointer<S>
    ) {
        for n in 0..<rows {
            let row = n * dim
            switch distribution {
            case .categorical:
                let (m, total) = OutputFisher.softmaxNormalizer(z + row, dim: dim)
                let r = uniform(seed: seed, row: n, index: 0) * total
                var cumulative = 0.0, chosen = dim - 1
                for i in 0..<dim {
                    cumulative += LibM.exp(Double(z[row + i]) - m)
                    if r < cumulative { chosen = i; break }
                }
                for i in 0..<dim { targets[row + i] = i == chosen ? 1 : 0 }
            case .bernoulli:
                for i in 0..<dim {
                    let p = OutputFisher.logistic(Double(z[row + i]))
                    targets[row + i] = uniform(seed: seed, row: n, index: i) < p ? 1 : 0
                }
            case .gaussian:
                // Box–Muller, one pair of uniforms per coordinate.
                for i in 0..<dim {
                    let u1 = uniform(seed: seed, row: n, index: 2 * i), u2 = uniform(seed: seed, row: n, index: 2 * i + 1)
                    let normal = (-2 * LibM.log(u1)).squareRoot() * LibM.cos(2 * Double.pi * u2)
                    targets[row + i] = S(Double(z[row + i]) + normal)
                }
            }
        }
    }

    /// The gradient of the summed negative log-likelihood with respect to the outputs, at targets
    /// sampled as `sampleTargets` does with the same seed: p − y (categorical, bernoulli) or
    /// μ − y (gaussian). Fed to `recordOutputGradients` (and back-propagated by the caller), it
    /// gives the statistics of the true Fisher instead of the empirical one.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    public static func sampledOutputGradients<S: KFACScalar>(
        distribution: OutputDistribution, outputs z: UnsafePointer<S>, rows: Int, dim: Int, seed: UInt64,
        into gradients: UnsafeMutablePointer<S>
    ) {
        guard distribution == .bernoulli else {
            sampleTargets(distribution: distribution, outputs: z, rows: rows, dim: dim, seed: seed, into: gradients)
            for n in 0..<rows {
                let row = n * dim
                if distribution == .categorical {
                    let (m, total) = OutputFisher.softmaxNormalizer(z + row, dim: dim)
                    for i in 0..<dim {
                        gradients[row + i] = S(LibM.exp(Double(z[row + i]) - m) / total) - gradients[row + i]
                    }
                } else {
                    for i in 0..<dim { gradients[row + i] = z[row + i] - gradients[row + i] }
                }
            }
            return
        }
        // Bernoulli in one pass: the same draws as `sampleTargets`, σ(z) computed once.
        for n in 0..<rows {
            let row = n * dim
            for i in 0..<dim {
                let p = OutputFisher.logistic(Double(z[row + i]))
                gradients[row + i] = S(p) - (uniform(seed: seed, row: n, index: i) < p ? 1 : 0)
            }
        }
    }
}
