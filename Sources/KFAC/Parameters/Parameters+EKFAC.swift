extension ParameterSpec {
    /// EKFAC (the KFAC_INVERSE_EKFAC strategy): the moving average of its scaling S and how
    /// paired recording forms per-example gradients.
    static let ekfacParameters: [ParameterSpec] = [
        ParameterSpec(.ekfacDecay, "ekfac_decay", .double, .ekfac, lower: 0, upper: 1, upperInclusive: false,
                      default: 0.95, effect: .nextStep,
                      read: { $0.ekfacDecay }, write: { $0.ekfacDecay = $1 }),
        ParameterSpec(.ekfacMode, "ekfac_mode", .int, .ekfac, lower: 0, upper: 1,
                      default: Double(EKFACMode.perExample.rawValue), effect: .nextRecord,
                      read: { Double($0.ekfacMode.rawValue) },
                      write: { $0.ekfacMode = EKFACMode(rawValue: Int32($1)) ?? .perExample }),
    ]
}

/// How paired recording forms EKFAC's per-example gradients (`kfac_ekfac_mode`).
public enum EKFACMode: Int32, Sendable, CaseIterable {
    /// Exact: the rows of an example (a sequence's tokens, a convolution's positions) are
    /// summed into its gradient G_n = Σ_t g_t ā_tᵀ before squaring.
    case perExample = 0
    /// Cheaper: every row or position counts as an example (the cross terms of an example's
    /// rows are dropped); one gemm per step instead of one per example.
    case perRow = 1
}
