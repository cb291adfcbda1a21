/// Spreading the inverse work of a period over its steps (`KFAC_PARAM_INVERSE_SPREAD`): each
/// block gets a phase s in [0, min(Ti, blocks)) and is re-inverted at the steps k with
/// k mod Ti = s, from the factors of that step. Phases are assigned by longest processing time:
/// blocks in decreasing order of their inversion cost (Σ d³ over the unique diagonal blocks of
/// both factors; ties by block index), each to the phase with the least cost so far (ties: the
/// lowest phase), so that no step carries much more than 1/Ti of a period's work unless one
/// block alone does. The assignment depends only on the blocks' shapes and Ti.
///
/// The arrays are sized once per block count, so recomputing the phases after a change of Ti
/// does not allocate.
final class InversionSpread {
    /// The phase of each block for `period`.
    private(set) var phase: [Int] = []
    /// Ti the phases were computed for (0: none yet).
    private(set) var period = 0
    /// Block indices in decreasing cost, and each phase's cost (scratch of `assign`).
    private var order: [Int] = []
    private var load: [Double] = []
    private var cost: [Double] = []

    /// Makes `phase` the assignment for `blocks` and `period` (> 1), reusing the last one when
    /// neither changed.
    func prepare<Scalar: KFACScalar>(_ blocks: [KroneckerBlock<Scalar>], period: Int) {
        let n = blocks.count
        guard period != self.period || phase.count != n else { return }
        if phase.count != n {
            phase = Array(repeating: 0, count: n)
            order = Array(repeating: 0, count: n)
            load = Array(repeating: 0, count: n)
            cost = Array(repeating: 0, count: n)
        }
        for k in 0..<n {
            var c = 0.0
            for d in blocks[k].input.structure.uniqueSizes { c += Double(d) * Double(d) * Double(d) }
            for d in blocks[k].output.structure.uniqueSizes { c += Double(d) * Double(d) * Double(d) }
            cost[k] = c
        }
        assign(count: n, period: period)
        self.period = period
    }

    /// LPT over `cost[0..<count]` into min(period, count) phases.
    private func assign(count n: Int, period: Int) {
        // Insertion sort: costlier first, then lower index (stable on equal costs).
        for i in 0..<n {
            order[i] = i
            var j = i
            while j > 0 && cost[order[j - 1]] < cost[i] {
                order[j] = order[j - 1]
                j -= 1
            }
            order[j] = i
        }
        let phases = Swift.min(period, n)
        for s in 0..<phases { load[s] = 0 }
        for i in 0..<n {
            let k = order[i]
            var best = 0
            for s in 1..<Swift.max(phases, 1) where load[s] < load[best] { best = s }
            phase[k] = best
            load[best] += cost[k]
        }
    }
}
