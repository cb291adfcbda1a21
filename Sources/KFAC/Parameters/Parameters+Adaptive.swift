extension ParameterSpec {
    /// The adaptive mode (Martens & Grosse 2015, §6–7): Levenberg–Marquardt adjustment of λ and
    /// the factor damping γ with its periodic re-choice.
    static let adaptiveParameters: [ParameterSpec] = [
        ParameterSpec(.lmInterval, "lm_interval", .int, .adaptive, lower: 0, upper: periodLimit,
                      default: 0, effect: .immediate,
                      read: { Double($0.lmInterval) }, write: { $0.lmInterval = Int($1) }),
        ParameterSpec(.lmDecay, "lm_decay", .double, .adaptive, lower: 0, lowerInclusive: false, upper: 1, upperInclusive: false,
                      default: 0.95, effect: .immediate,
                      read: { $0.lmDecay }, write: { $0.lmDecay = $1 }),
        ParameterSpec(.factorDamping, "factor_damping", .double, .adaptive, lower: 0, upper: .infinity, upperInclusive: false,
                      default: 0, effect: .nextStep,
                      read: { $0.factorDamping }, write: { $0.factorDamping = $1 }),
        ParameterSpec(.factorDampingPeriod, "factor_damping_period", .int, .adaptive, lower: 0, upper: periodLimit,
                      default: 0, effect: .nextStep,
                      read: { Double($0.factorDampingPeriod) }, write: { $0.factorDampingPeriod = Int($1) }),
        ParameterSpec(.factorDampingDecay, "factor_damping_decay", .double, .adaptive, lower: 0, lowerInclusive: false,
                      upper: 1, upperInclusive: false, default: 0.95, effect: .nextStep,
                      read: { $0.factorDampingDecay }, write: { $0.factorDampingDecay = $1 }),
        // Safeguards (the runaway they prevent: benchmarks/training/README.md, "Adaptive mode").
        ParameterSpec(.dampingMin, "damping_min", .double, .adaptive, lower: 0, upper: .infinity, upperInclusive: false,
                      default: 1e-4, effect: .immediate,
                      read: { $0.dampingMin }, write: { $0.dampingMin = $1 }),
        ParameterSpec(.factorDampingRatio, "factor_damping_ratio", .double, .adaptive, lower: 1, upper: .infinity,
                      upperInclusive: false, default: 10, effect: .nextStep,
                      read: { $0.factorDampingRatio }, write: { $0.factorDampingRatio = $1 }),
    ]
}
