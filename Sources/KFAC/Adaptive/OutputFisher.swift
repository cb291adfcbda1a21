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
                    let p = LibM.exp(Double(z[row + i]) - m) / total, a = Double(u[row + i])
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
        for i in 0..<dim { total += LibM.exp(Double(z[i]) - m) }
        return (m, total)
    }

    static func logistic(_ x: Double) -> Double {
        x >= 0 ? 1 / (1 + LibM.exp(-x)) : LibM.exp(x) / (1 + LibM.exp(x))
    }
}
