/// The schedule of asynchronous inversion (`KFAC_PARAM_ASYNC_INVERSION`, `AsyncInversion`):
/// which step waits for the background work, which commits it, which launches the next.
///
/// With Ti = `inverseUpdatePeriod` > 0, a due step (k ≡ 0 mod Ti) first settles the work
/// launched at the previous due step (waits for it and commits it), preconditions with the
/// inverses committed so far, then snapshots the factors as folded by itself and launches their
/// inversion. In the deterministic mode only due steps commit, so the step k ≥ 2·Ti uses the
/// inverses of the factors of step Ti·(⌊k/Ti⌋ − 1), and steps k < 2·Ti those of step 0 (whose
/// blocks had no inverse and were inverted in the step). The newest mode also commits at the
/// first step that finds the work finished.
extension KFACOptimizer {
    /// Whether the step inverts in the background: the mode is on and Ti > 0. Throws
    /// `.unsupported` when the mode is on together with something it does not support.
    func asyncInversionApplies(_ p: KFACParameters) throws(KFACError) -> Bool {
        guard p.asyncInversion != .off else { return false }
        let conflict: String? =
            p.inverseStrategy == .ekfac ? "the EKFAC strategy (its scaling S is re-estimated in the step, in the eigenbases it inverts)"
            : p.inverseSpread ? "inverse_spread (both move the inversions off the due step; choose one)"
            : p.factorDampingPeriod > 0 ? "the γ re-choice (factor_damping_period > 0: a γ step inverts every block for each candidate γ)"
            : tridiagonal != nil ? "block-tridiagonal links (their inverses couple neighbouring layers)"
            : distributed.size > 1 ? "distributed runs (the inverse exchange happens within the due step)"
            : nil
        if let conflict { throw KFACError(.unsupported, "async_inversion does not support \(conflict); turn one of them off") }
        return p.inverseUpdatePeriod > 0
    }

    /// Before planning a step: waits for pending background work when the step must settle it
    /// — a due step, a changed strategy, or the mode turned off (or Ti = 0) — and returns
    /// whether the step may commit or discard it (it has finished and was seen to: always after
    /// a wait, and in the newest mode whenever it already finished). Changes nothing.
    func settleBackground(_ p: KFACParameters, asyncOn: Bool) -> Bool {
        guard estimator.backgroundPending else { return false }
        if !asyncOn || shouldInvert(at: stepCount) || p.inverseStrategy != estimator.backgroundStrategy {
            estimator.waitForBackground()
            return true
        }
        return p.asyncInversion == .newest && estimator.backgroundFinished
    }

    /// Waits until no background inversion runs (tests; pending work is still committed by
    /// the step the schedule says).
    public func waitForBackgroundInversion() {
        estimator.waitForBackground()
    }
}
