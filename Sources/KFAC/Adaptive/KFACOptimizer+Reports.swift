extension KFACOptimizer {
    /// Whether a loss change was ever reported (so `lastReductionRatio` is a reported ρ, which
    /// may itself be NaN when that solve's M(δ) was not negative).
    public var hasReportedLossChange: Bool { adaptive.lossReports > 0 }
}
