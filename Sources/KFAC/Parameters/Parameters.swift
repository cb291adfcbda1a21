/// How the damped inverse of a Kronecker block is formed and applied (`kfac_inverse_strategy`).
public enum InverseStrategy: Int32, Sendable, CaseIterable {
    /// Factored Tikhonov damping with π; both damped factors inverted through Cholesky.
    case cholesky = 0
    /// Exact damping (A ⊗ G + λI)⁻¹ through eigendecompositions of both factors.
    case eigen = 1
    /// EKFAC (George et al. 2018): the eigen strategy's bases with a scaling S re-estimated from
    /// per-example gradients (paired recording) in place of d_G d_Aᵀ.
    case ekfac = 2
}

/// Whether inversions run in the background between steps (`kfac_async_inversion`): a due
/// step snapshots the factors and hands their inversion to a library thread; a later step
/// commits the result (see `include/kfac.h`).
public enum AsyncInversion: Int32, Sendable, CaseIterable {
    /// Every inversion runs inside the step that is due.
    case off = 0
    /// A step commits the background result as soon as it is complete (timing-dependent), at
    /// the latest at the next due step, which waits for it.
    case newest = 1
    /// The background result is committed exactly at the next due step, which waits for it:
    /// directions are a pure function of the inputs (tests, reproducible runs).
    case deterministic = 2
}

/// How the caller's loss was reduced over rows (`kfac_reduction`).
public enum LossReduction: Int32, Sendable, CaseIterable {
    /// Output gradients are those of Σ_n ℓ_n: used as given.
    case sum = 0
    /// Output gradients are those of (1/rows) Σ_n ℓ_n: multiplied by the rows of each record call.
    case mean = 1
}

/// Every tunable setting of an optimizer. The defaults and bounds are those of the parameter
/// table (`ParameterSpec.table`, documented in `include/kfac.h`): `init()` reads the defaults from
/// it and `validate()` checks every field against it.
public struct KFACParameters: Equatable, Sendable {
    /// η of the KL clip (>= 0; 0 never clips); the library returns directions, the caller
    /// applies its own rate.
    public var learningRate: Double = 0
    /// λ (> 0): the damping of the inverses and, in the adaptive mode, of the quadratic model.
    public var damping: Double = 0
    /// γ (>= 0): when > 0, the damping of the factor inverses instead of λ, so that the
    /// Levenberg–Marquardt adjustment of λ does not change how the factors are inverted
    /// (Martens & Grosse 2015, §6.6). 0 = use λ.
    public var factorDamping: Double = 0

    /// Re-choice of γ (Martens & Grosse 2015, §6.6): every `factorDampingPeriod` steps (T₂; 0 =
    /// off) a step also prepares directions for γ·ω₂ and γ/ω₂, ω₂ = factorDampingDecay^T₂, and
    /// the candidate solve keeps the best.
    public var factorDampingPeriod: Int = 0
    /// The base of ω₂, in (0, 1).
    public var factorDampingDecay: Double = 0
    /// The Levenberg–Marquardt adjustment never decreases λ below this (>= 0).
    public var dampingMin: Double = 0
    /// r (>= 1): a γ step keeps γ within [λ/r, λ·r] (`bandedFactorDamping`).
    public var factorDampingRatio: Double = 0

    /// The damping the factor inverses use: γ if set, else λ.
    public var inverseDamping: Double { factorDamping > 0 ? factorDamping : damping }
    /// Whether a factor damping lies in the band [λ/r, λ·r] of `factorDampingRatio`.
    func factorDampingInBand(_ gamma: Double) -> Bool {
        gamma >= damping / factorDampingRatio && gamma <= damping * factorDampingRatio
    }
    /// The damping a γ step starts from: `inverseDamping` brought into [λ/r, λ·r] (unchanged
    /// when it is inside).
    var bandedFactorDamping: Double {
        Swift.min(Swift.max(inverseDamping, damping / factorDampingRatio), damping * factorDampingRatio)
    }
    /// β of the factors' moving average, in [0, 1).
    public var factorDecay: Double = 0
    /// κ of the KL clip (>= 0); 0 disables clipping.
    public var klClip: Double = 0
    /// Recorded output gradients are divided by this (> 0), e.g. a mixed-precision loss scale.
    public var outputGradScale: Double = 0
    /// Fold statistics every this many steps (>= 0; 0 = only on request).
    public var factorUpdatePeriod: Int = 0
    /// Recompute inverses every this many steps (>= 0; 0 = only on request).
    public var inverseUpdatePeriod: Int = 0
    public var inverseStrategy: InverseStrategy = .eigen
    /// Use π in factored damping (Cholesky strategy).
    public var piDamping: Bool = false
    public var lossReduction: LossReduction = .sum
    /// Threads for parallel inversions, 0 = one per online CPU, at most 256.
    public var threadCount: Int = 0
    /// Spread the inversions of a period over its steps, block by block (`InversionSpread`).
    public var inverseSpread: Bool = false
    /// Invert in the background between steps (`AsyncInversion`, `BackgroundInversion`).
    public var asyncInversion: AsyncInversion = .off
    /// Levenberg–Marquardt adjustment of λ (Martens & Grosse 2015, §6.5): every `lmInterval`
    /// reported loss changes, λ is multiplied by lmDecay^lmInterval if ρ > 3/4 and divided by it
    /// if ρ < 1/4. 0 turns the adjustment off.
    public var lmInterval: Int = 0
    /// The base ω₁ of that factor, in (0, 1).
    public var lmDecay: Double = 0
    /// β_S of EKFAC's scaling S, in [0, 1).
    public var ekfacDecay: Double = 0
    /// How paired recording forms EKFAC's per-example gradients.
    public var ekfacMode: EKFACMode = .perExample
    /// When a distributed run reduces statistics (Distributed/): every factor update (exact) or
    /// lazily, only before an inverse update.
    public var distributedReduce: DistributedReduce = .eager

    /// The defaults of the parameter table.
    public init() {
        for spec in ParameterSpec.table { spec.write(&self, spec.defaultValue) }
    }

    /// Throws `.parameterRange` naming the first parameter (in table order) outside its bounds.
    public func validate() throws(KFACError) {
        for spec in ParameterSpec.table {
            let value = spec.read(self)
            guard spec.accepts(value) else {
                throw KFACError(.parameterRange, "\(spec.name) must be in \(spec.rangeDescription), got \(spec.type == .int ? String(Int64(value)) : "\(value)")")
            }
        }
    }
}

extension KFACParameters {
    /// The value of a double parameter; throws `.parameterType` for an int parameter.
    public func double(_ p: ParameterID) throws(KFACError) -> Double {
        let spec = p.spec
        guard spec.type == .double else { throw KFACError(.parameterType, "parameter \(spec.name) is an int parameter") }
        return spec.read(self)
    }

    /// The value of an int parameter; throws `.parameterType` for a double parameter.
    public func int(_ p: ParameterID) throws(KFACError) -> Int64 {
        let spec = p.spec
        guard spec.type == .int else { throw KFACError(.parameterType, "parameter \(spec.name) is a double parameter") }
        return Int64(spec.read(self))
    }

    /// A copy with one double parameter changed and validated.
    public func setting(_ p: ParameterID, _ value: Double) throws(KFACError) -> KFACParameters {
        let spec = p.spec
        guard spec.type == .double else { throw KFACError(.parameterType, "parameter \(spec.name) is an int parameter") }
        return try setting(spec, value, shown: "\(value)")
    }

    /// A copy with one int parameter changed and validated.
    public func setting(_ p: ParameterID, _ value: Int64) throws(KFACError) -> KFACParameters {
        let spec = p.spec
        guard spec.type == .int else { throw KFACError(.parameterType, "parameter \(spec.name) is a double parameter") }
        // Every int bound is below 2^53, so a value that rounds into the bounds was inside them.
        return try setting(spec, Double(value), shown: "\(value)")
    }

    private func setting(_ spec: ParameterSpec, _ value: Double, shown: String) throws(KFACError) -> KFACParameters {
        guard spec.accepts(value) else {
            throw KFACError(.parameterRange, "\(spec.name) must be in \(spec.rangeDescription), got \(shown)")
        }
        var q = self
        spec.write(&q, value)
        try q.validate()
        return q
    }

    /// The value of any parameter as a double (int parameters exactly), for tables and images.
    public subscript(_ p: ParameterID) -> Double { p.spec.read(self) }
}
