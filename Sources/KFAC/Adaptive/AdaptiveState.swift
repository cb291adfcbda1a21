/// The adaptive mode's state (Martens & Grosse 2015, §6–7), keyed by block index of the
/// estimator: the last step's directions and the previous update δ₀ per block, and the
/// scalars of the quadratic model and the Levenberg–Marquardt rule.
final class AdaptiveState<Scalar: KFACScalar> {
    /// Whether the last step's directions await `solveStepSize`.
    var directionsAvailable = false
    /// Whether there is a previous update δ₀.
    var hasPreviousUpdate = false
    /// Inner products of the last step for the quadratic model that do not depend on its
    /// directions: ⟨V, δ₀⟩, ‖δ₀‖² (the rest are per candidate, `DampingCandidate`).
    var previousProducts = (vp: 0.0, pp: 0.0)
    /// M(δ) of the last solve, awaiting `reportLossChange`.
    var predictedChange: Double?
    /// ρ of the last report, NaN before the first.
    var lastReductionRatio = Double.nan
    var lossReports = 0

    /// Per block: δ₀ (gradient-shaped), allocated at the first solve.
    private(set) var previousUpdate: [AlignedBuffer<Scalar>?] = []
    /// Per block: the directions U of the last successful step, kept for the solve so that a
    /// later failed step or a standalone `precondition` cannot change them.
    private(set) var stepDirection: [AlignedBuffer<Scalar>?] = []

    /// Allocates the step directions (before a step commits, so the commit cannot fail).
    func reserveStepDirections(_ blocks: [KroneckerBlock<Scalar>]) throws(KFACError) {
        if stepDirection.count != blocks.count { stepDirection = Array(repeating: nil, count: blocks.count) }
        for k in blocks.indices where stepDirection[k] == nil {
            stepDirection[k] = try AlignedBuffer(rows: blocks[k].direction.rows, columns: blocks[k].direction.columns)
        }
    }

    /// Allocates δ₀ (before a solve commits).
    func reservePreviousUpdates(_ blocks: [KroneckerBlock<Scalar>]) throws(KFACError) {
        if previousUpdate.count != blocks.count { previousUpdate = Array(repeating: nil, count: blocks.count) }
        for k in blocks.indices where previousUpdate[k] == nil {
            previousUpdate[k] = try AlignedBuffer(rows: blocks[k].direction.rows, columns: blocks[k].direction.columns)
        }
    }

    /// δ₀ of block `k` when there is one.
    func previous(_ k: Int) -> AlignedBuffer<Scalar>? {
        hasPreviousUpdate && k < previousUpdate.count ? previousUpdate[k] : nil
    }

    // MARK: State image

    /// Writes: has previous update, has prediction, prediction, last ρ, loss reports, then δ₀
    /// per block (out × in scalars each) if there is one.
    func write(to w: inout StateWriter) {
        w.u64(hasPreviousUpdate ? 1 : 0)
        w.u64(predictedChange == nil ? 0 : 1)
        w.f64(predictedChange ?? 0)
        w.f64(lastReductionRatio)
        w.i64(lossReports)
        if hasPreviousUpdate {
            for case let p? in previousUpdate { w.scalars(p.base, count: p.count) }
        }
    }

    /// A fresh state holding what `write` wrote, for the estimator's `blocks`.
    static func read(from r: inout StateReader, blocks: [KroneckerBlock<Scalar>]) throws(KFACError) -> AdaptiveState {
        let s = AdaptiveState()
        s.hasPreviousUpdate = try r.flag()
        let hasPrediction = try r.flag()
        let prediction = try r.f64()
        guard prediction.isFinite && (hasPrediction || prediction == 0) else {
            throw KFACError(.corruptState, "state image has an impossible predicted change \(prediction)")
        }
        s.predictedChange = hasPrediction ? prediction : nil
        s.lastReductionRatio = try r.f64()
        s.lossReports = try r.i64()
        guard s.lossReports >= 0 && s.lossReports <= 1 << 62 && (s.lossReports > 0 || s.lastReductionRatio.isNaN) else {
            throw KFACError(.corruptState, "state image has an impossible loss-report count \(s.lossReports)")
        }
        if s.hasPreviousUpdate {
            try s.reservePreviousUpdates(blocks)
            for case let p? in s.previousUpdate {
                try r.scalars(into: p.base, count: p.count)
                guard Scalar.allFinite(p.base, count: p.count) else {
                    throw KFACError(.corruptState, "state image has a previous update that is not finite")
                }
            }
        }
        return s
    }

    /// The most bytes `write` can write for `blocks`.
    static func maximumImageBytes(blocks: [KroneckerBlock<Scalar>]) -> Int {
        40 + blocks.reduce(0) { $0 + $1.direction.count * MemoryLayout<Scalar>.stride }
    }
}
