/// How the damped inverse of a Kronecker block is formed and applied (`kfac_inverse_strategy`).
public enum InverseStrategy: Int32, Sendable, CaseIterable {
    /// Factored Tikhonov damping with π; both damped factors inverted through Cholesky.
    case cholesky = 0
    /// Exact damping (A ⊗ G + λI)⁻¹ through eigendecompositions of both factors.
    case eigen = 1
}

/// How the caller's loss was reduced over rows (`kfac_reduction`).
public enum LossReduction: Int32, Sendable, CaseIterable {
    /// Output gradients are those of Σ_n ℓ_n: used as given.
    case sum = 0
    /// Output gradients are those of (1/rows) Σ_n ℓ_n: multiplied by the rows of each record call.
    case mean = 1
}

/// Every tunable setting of an optimizer, with the defaults and bounds of `include/kfac.h`.
public struct KFACParameters: Equatable, Sendable {
    /// η of the KL clip (>= 0; 0 never clips); the library returns directions, the caller
    /// applies its own rate.
    public var learningRate: Double = 0.1
    /// λ (> 0): the damping of the inverses and, in the adaptive mode, of the quadratic model.
    public var damping: Double = 1e-3
    /// γ (>= 0): when > 0, the damping of the factor inverses instead of λ, so that the
    /// Levenberg–Marquardt adjustment of λ does not change how the factors are inverted
    /// (Martens & Grosse 2015, §6.6). 0 = use λ.
    public var factorDamping: Double = 0

    /// Re-choice of γ (Martens & Grosse 2015, §6.6): every `factorDampingPeriod` steps (T₂; 0 =
    /// off) a step also prepares directions for γ·ω₂ and γ/ω₂, ω₂ = factorDampingDecay^T₂, and
    /// the candidate solve keeps the best.
    public var factorDampingPeriod: Int = 0
    /// The base of ω₂, in (0, 1).
    public var factorDampingDecay: Double = 0.95

    /// The damping the factor inverses use: γ if set, else λ.
    public var inverseDamping: Double { factorDamping > 0 ? factorDamping : damping }
    /// β of the factors' moving average, in [0, 1).
    public var factorDecay: Double = 0.95
    /// κ of the KL clip (>= 0); 0 disables clipping.
    public var klClip: Double = 1e-3
    /// Recorded output gradients are divided by this (> 0), e.g. a mixed-precision loss scale.
    public var outputGradScale: Double = 1
    /// Fold statistics every this many steps (>= 0; 0 = only on request).
    public var factorUpdatePeriod: Int = 1
    /// Recompute inverses every this many steps (>= 0; 0 = only on request).
    public var inverseUpdatePeriod: Int = 10
    public var inverseStrategy: InverseStrategy = .eigen
    /// Use π in factored damping (Cholesky strategy).
    public var piDamping: Bool = true
    public var lossReduction: LossReduction = .sum
    /// Threads for parallel inversions, 0 = one per online CPU, at most 256.
    public var threadCount: Int = 0
    /// Levenberg–Marquardt adjustment of λ (Martens & Grosse 2015, §6.5): every `lmInterval`
    /// reported loss changes, λ is multiplied by lmDecay^lmInterval if ρ > 3/4 and divided by it
    /// if ρ < 1/4. 0 turns the adjustment off.
    public var lmInterval: Int = 0
    /// The base ω₁ of that factor, in (0, 1).
    public var lmDecay: Double = 0.95

    public init() {}

    /// Throws `.parameterRange` naming the first field outside its bounds.
    public func validate() throws(KFACError) {
        func check(_ ok: Bool, _ what: String) throws(KFACError) {
            if !ok { throw KFACError(.parameterRange, what) }
        }
        try check(learningRate >= 0 && learningRate.isFinite, "learning rate must be >= 0 and finite, got \(learningRate)")
        try check(damping > 0 && damping.isFinite, "damping must be > 0 and finite, got \(damping)")
        try check(factorDecay >= 0 && factorDecay < 1, "factor decay must be in [0, 1), got \(factorDecay)")
        try check(klClip >= 0 && klClip.isFinite, "KL clip must be >= 0 and finite, got \(klClip)")
        try check(outputGradScale > 0 && outputGradScale.isFinite, "output gradient scale must be > 0 and finite, got \(outputGradScale)")
        try check(factorUpdatePeriod >= 0, "factor update period must be >= 0, got \(factorUpdatePeriod)")
        try check(inverseUpdatePeriod >= 0, "inverse update period must be >= 0, got \(inverseUpdatePeriod)")
        try check(threadCount >= 0 && threadCount <= 256, "thread count must be in [0, 256], got \(threadCount)")
        try check(lmInterval >= 0 && lmInterval <= Int(Int32.max), "LM interval must be in [0, 2^31 − 1], got \(lmInterval)")
        try check(lmDecay > 0 && lmDecay < 1, "LM decay must be in (0, 1), got \(lmDecay)")
        try check(factorDamping >= 0 && factorDamping.isFinite, "factor damping must be >= 0 and finite, got \(factorDamping)")
        try check(factorDampingPeriod >= 0 && factorDampingPeriod <= Int(Int32.max), "factor damping period must be in [0, 2^31 − 1], got \(factorDampingPeriod)")
        try check(factorDampingDecay > 0 && factorDampingDecay < 1, "factor damping decay must be in (0, 1), got \(factorDampingDecay)")
    }
}

/// The parameters by their pinned `kfac_param` number, for typed get/set by id (the C ABI and
/// the bindings use this).
public enum KFACParameter: Int32, Sendable, CaseIterable {
    case learningRate = 1
    case damping = 2
    case factorDecay = 3
    case klClip = 4
    case outputGradScale = 5
    case lmDecay = 6
    case factorDamping = 7
    case factorDampingDecay = 8
    case factorUpdatePeriod = 100
    case inverseUpdatePeriod = 101
    case inverseStrategy = 102
    case piDamping = 103
    case lossReduction = 104
    case threadCount = 105
    case lmInterval = 106
    case factorDampingPeriod = 107

    /// Whether the parameter is read and written as a double (else as an int).
    public var isDouble: Bool { rawValue < 100 }
}

extension KFACParameters {
    /// The value of a double parameter; throws `.parameterType` for an int parameter.
    public func double(_ p: KFACParameter) throws(KFACError) -> Double {
        switch p {
        case .learningRate: return learningRate
        case .damping: return damping
        case .factorDecay: return factorDecay
        case .klClip: return klClip
        case .outputGradScale: return outputGradScale
        case .lmDecay: return lmDecay
        case .factorDamping: return factorDamping
        case .factorDampingDecay: return factorDampingDecay
        default: throw KFACError(.parameterType, "parameter \(p) is an int parameter")
        }
    }

    /// The value of an int parameter; throws `.parameterType` for a double parameter.
    public func int(_ p: KFACParameter) throws(KFACError) -> Int64 {
        switch p {
        case .factorUpdatePeriod: return Int64(factorUpdatePeriod)
        case .inverseUpdatePeriod: return Int64(inverseUpdatePeriod)
        case .inverseStrategy: return Int64(inverseStrategy.rawValue)
        case .piDamping: return piDamping ? 1 : 0
        case .lossReduction: return Int64(lossReduction.rawValue)
        case .threadCount: return Int64(threadCount)
        case .lmInterval: return Int64(lmInterval)
        case .factorDampingPeriod: return Int64(factorDampingPeriod)
        default: throw KFACError(.parameterType, "parameter \(p) is a double parameter")
        }
    }

    /// A copy with one double parameter changed and validated.
    public func setting(_ p: KFACParameter, _ value: Double) throws(KFACError) -> KFACParameters {
        var q = self
        switch p {
        case .learningRate: q.learningRate = value
        case .damping: q.damping = value
        case .factorDecay: q.factorDecay = value
        case .klClip: q.klClip = value
        case .outputGradScale: q.outputGradScale = value
        case .lmDecay: q.lmDecay = value
        case .factorDamping: q.factorDamping = value
        case .factorDampingDecay: q.factorDampingDecay = value
        default: throw KFACError(.parameterType, "parameter \(p) is an int parameter")
        }
        try q.validate()
        return q
    }

    /// A copy with one int parameter changed and validated.
    public func setting(_ p: KFACParameter, _ value: Int64) throws(KFACError) -> KFACParameters {
        var q = self
        func range(_ ok: Bool) throws(KFACError) {
            if !ok { throw KFACError(.parameterRange, "value \(value) out of range for parameter \(p)") }
        }
        switch p {
        case .factorUpdatePeriod:
            try range(value >= 0 && value <= Int64(Int32.max)); q.factorUpdatePeriod = Int(value)
        case .inverseUpdatePeriod:
            try range(value >= 0 && value <= Int64(Int32.max)); q.inverseUpdatePeriod = Int(value)
        case .inverseStrategy:
            guard let s = Int32(exactly: value).flatMap(InverseStrategy.init(rawValue:)) else { try range(false); return q }
            q.inverseStrategy = s
        case .piDamping:
            try range(value == 0 || value == 1); q.piDamping = value == 1
        case .lossReduction:
            guard let r = Int32(exactly: value).flatMap(LossReduction.init(rawValue:)) else { try range(false); return q }
            q.lossReduction = r
        case .threadCount:
            try range(value >= 0 && value <= 256); q.threadCount = Int(value)
        case .lmInterval:
            try range(value >= 0 && value <= Int64(Int32.max)); q.lmInterval = Int(value)
        case .factorDampingPeriod:
            try range(value >= 0 && value <= Int64(Int32.max)); q.factorDampingPeriod = Int(value)
        default: throw KFACError(.parameterType, "parameter \(p) is a double parameter")
        }
        try q.validate()
        return q
    }
}
