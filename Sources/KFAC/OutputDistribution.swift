/// The predictive distribution at a network's output, for the exact output-space Fisher and
/// for sampling targets (`kfac_distribution`). Outputs are given per example as a row of `dim`
/// values: logits for `.categorical` (softmax) and `.bernoulli` (independent sigmoids), means
/// for `.gaussian` (unit variance, i.e. the squared error ½‖y − μ‖²).
public enum OutputDistribution: Int32, Sendable, CaseIterable {
    case categorical = 0
    case bernoulli = 1
    case gaussian = 2
}

/// The output-space Fisher B of a distribution at one example's outputs z: the Hessian of the
/// negative log-likelihood in z (for these exponential families, also E[g gᵀ] over targets
/// sampled from the model).
///   categorical: B = diag(p) − p pᵀ, p = softmax(z);  bernoulli: B = diag(p(1 − p)), p = σ(z);
///   gaussian: B = I.
enum OutputFisher {
    /// (uᵀBu, uᵀBv, vᵀBv) summed over the rows (v may be nil: then only uᵀBu).
    // Specialised: the C ABI calls these generically, and unspecialised element loops cost ~100 ns a value.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func quadraticForms<S: KFACScalar>(
        distribution: OutputDistribution, outputs z: UnsafePointer<S>, rows: Int, dim: Int,
        u: UnsafePointer<S>, v: UnsafePointer<S>?
    ) -> (uu: Double, uv: Double, vv: Double) {
        var uu = 0.0, uv = 0.0, vv = 0.0
        for n in 0..<rows {
            let row = n * dim
            switch distribution {
            case .gaussian:
                for i in 0..<dim {
                    let a = Double(u[row + i])
                    uu += a * a
                    if let v { let b = Double(v[row + i]); uv += a * b; vv += b * b }
                }
            case .bernoulli:
                for i in 0..<dim {
                    let p = logistic(Double(z[row + i])), w = p * (1 - p), a = Double(u[row + i])
                    uu += w * a * a
                    if let v { let b = Double(v[row + i]); uv += w * a * b; vv += w * b * b }
                }
            case .categorical:
                let (m, total) = OutputFisher.softmaxNormalizer(z + row, dim: dim)
                var pu = 0.0, pv = 0.0, puu = 0.0, puv = 0.0, pvv = 0.0
                for i in 0..<dim {
                    let p = Foundationless.exp(Double(z[row + i]) - m) / total, a = Double(u[row + i])
                    pu += p * a; puu += p * a * a
                    if let v { let b = Double(v[row + i]); pv += p * b; puv += p * a * b; pvv += p * b * b }
                }
                uu += puu - pu * pu
                if v != nil { uv += puv - pu * pv; vv += pvv - pv * pv }
            }
        }
        return (uu, uv, vv)
    }

    /// The max of a row of logits and Σ exp(z − max): p_i = exp(z_i − max) / total.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func softmaxNormalizer<S: KFACScalar>(_ z: UnsafePointer<S>, dim: Int) -> (max: Double, total: Double) {
        var m = -Double.infinity
        for i in 0..<dim { m = Swift.max(m, Double(z[i])) }
        var total = 0.0
        for i in 0..<dim { total += Foundationless.exp(Double(z[i]) - m) }
        return (m, total)
    }

    static func logistic(_ x: Double) -> Double {
        x >= 0 ? 1 / (1 + Foundationless.exp(-x)) : Foundationless.exp(x) / (1 + Foundationless.exp(x))
    }
}

#if canImport(Glibc)
import Glibc
#endif

/// Math functions from the C library (the core does not depend on Foundation).
enum Foundationless {
    @inline(__always) static func exp(_ x: Double) -> Double { Glibc.exp(x) }
    @inline(__always) static func log(_ x: Double) -> Double { Glibc.log(x) }
    @inline(__always) static func cos(_ x: Double) -> Double { Glibc.cos(x) }
}

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
                    cumulative += Foundationless.exp(Double(z[row + i]) - m)
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
                    let normal = (-2 * Foundationless.log(u1)).squareRoot() * Foundationless.cos(2 * Double.pi * u2)
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
                        gradients[row + i] = S(Foundationless.exp(Double(z[row + i]) - m) / total) - gradients[row + i]
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
