#if canImport(Glibc)
import Glibc
#endif

/// One cross-layer factor of a link between a lower layer l and the layer l + 1 above it:
/// A_{l,l+1} = E[ā_l ā_{l+1}ᵀ] (input side) or G_{l,l+1} = E[g_l g_{l+1}ᵀ] (output side), a
/// lowerWidth × upperWidth row-major matrix, averaged like the diagonal factors
/// (`KroneckerFactor`): the same moving average with the same decay, folded at the same times.
///
/// The rows recorded for the two layers are paired in the order they arrive: each side keeps
/// its rows not yet paired (scaled, with the appended bias value), and as soon as both sides
/// have some, the first min(n_lower, n_upper) of each are multiplied into the pending sum
/// Σ x_lower x_upperᵀ (one gemm) and dropped. A fold requires that every recorded row was
/// paired and that the pairs are as many as the rows of the layers' diagonal factors
/// (`checkPaired`): the rows of a link must be the same examples, in the same order.
final class CrossFactor<Scalar: KFACScalar> {
    let lowerWidth: Int
    let upperWidth: Int
    private var lowerRows: AlignedBuffer<Scalar>?
    private var upperRows: AlignedBuffer<Scalar>?
    private(set) var lowerCount = 0
    private(set) var upperCount = 0
    private let pendingSum: AlignedBuffer<Scalar>
    private(set) var pairedRows = 0
    private(set) var running: AlignedBuffer<Scalar>
    private(set) var hasRunning = false
    private var staged: AlignedBuffer<Scalar>?

    init(lowerWidth: Int, upperWidth: Int) throws(KFACError) {
        self.lowerWidth = lowerWidth
        self.upperWidth = upperWidth
        pendingSum = try AlignedBuffer(rows: lowerWidth, columns: upperWidth)
        running = try AlignedBuffer(rows: lowerWidth, columns: upperWidth)
    }

    var count: Int { lowerWidth * upperWidth }
    var hasPending: Bool { pairedRows > 0 || lowerCount > 0 || upperCount > 0 }

    /// Reserves room for `rows` more unpaired rows on one side, so that `add` cannot fail.
    /// Grows geometrically: a steady recording pattern stops allocating. On error nothing changed.
    /// Runs before the estimator checks `rows` (issue 15: a huge count overflowed here), so it
    /// bounds the unpaired rows as the factors bound their pending rows (`.sizeOverflow`).
    func prepare(upper: Bool, rows: Int) throws(KFACError) {
        let width = upper ? upperWidth : lowerWidth
        let (buffer, used) = upper ? (upperRows, upperCount) : (lowerRows, lowerCount)
        let (needed, overflow) = used.addingReportingOverflow(rows)
        guard !overflow, needed <= KroneckerFactor<Scalar>.maximumPendingRows else {
            throw KFACError(.sizeOverflow, "\(rows) rows with \(used) unpaired rows of the link: more than 2^53 rows pending; fold or discard the statistics")
        }
        if let b = buffer, b.rows >= needed { return }
        let bigger = try AlignedBuffer<Scalar>(rows: Swift.max(needed, 2 * (buffer?.rows ?? 0)), columns: width)
        if let b = buffer { bigger.base.update(from: b.base, count: used * width) }
        if upper { upperRows = bigger } else { lowerRows = bigger }
    }

    /// Appends `rows` rows (`width` values each, consecutive rows `width` apart) times `scale`,
    /// with `appended` as a last coordinate if given, to one side, then pairs what it can.
    /// Call `prepare` first.
    func add(upper: Bool, _ x: UnsafePointer<Scalar>, rows: Int, width: Int, appended: Scalar?, scale: Scalar) {
        let w = upper ? upperWidth : lowerWidth
        guard let buffer = upper ? upperRows : lowerRows else { return }
        let start = upper ? upperCount : lowerCount
        for r in 0..<rows {
            let destination = buffer.base + (start + r) * w
            Scalar.scaledCopy(from: x + r * width, to: destination, count: width, scale: scale)
            if let appended { destination[width] = appended }
        }
        if upper { upperCount += rows } else { lowerCount += rows }
        pair()
    }

    /// Multiplies the rows both sides have into the pending sum and drops them.
    private func pair() {
        let n = Swift.min(lowerCount, upperCount)
        guard n > 0, let lower = lowerRows, let upper = upperRows else { return }
        Scalar.gemm(transA: true, transB: false, m: lowerWidth, n: upperWidth, k: n, alpha: 1,
                    a: lower.base, lda: lowerWidth, b: upper.base, ldb: upperWidth,
                    beta: pairedRows > 0 ? 1 : 0, c: pendingSum.base, ldc: upperWidth)
        pairedRows += n
        lowerCount -= n
        upperCount -= n
        if lowerCount > 0 { memmove(lower.base, lower.base + n * lowerWidth, lowerCount * lowerWidth * MemoryLayout<Scalar>.stride) }
        if upperCount > 0 { memmove(upper.base, upper.base + n * upperWidth, upperCount * upperWidth * MemoryLayout<Scalar>.stride) }
    }

    /// Throws `.invalidSize` unless every recorded row is paired and the pairs are as many as
    /// the pending rows of the two layers' diagonal factors on this side.
    func checkPaired(lowerPending: Int, upperPending: Int, what: String) throws(KFACError) {
        guard lowerCount == 0, upperCount == 0, pairedRows == lowerPending, pairedRows == upperPending else {
            throw KFACError(.invalidSize, "the \(what) rows of the link do not pair: the lower layer recorded \(lowerPending) rows, the upper \(upperPending), \(pairedRows) were paired (\(lowerCount) and \(upperCount) left over); record the same examples, in the same order, for both layers")
        }
    }

    /// destination = β·running + c·pending (the diagonal factors' rule: β = 0 on the first fold).
    private func average(into destination: AlignedBuffer<Scalar>, decay: Scalar) {
        let n = Scalar(pairedRows)
        let (beta, c): (Scalar, Scalar) = hasRunning ? (decay, (1 - decay) / n) : (0, 1 / n)
        let (d, p, s) = (destination.base, running.base, pendingSum.base)
        if hasRunning {
            for i in 0..<count { d[i] = beta * p[i] + c * s[i] }
        } else {
            for i in 0..<count { d[i] = c * s[i] }
        }
    }

    /// Folds in place (after `checkPaired`).
    func fold(decay: Scalar) {
        guard pairedRows > 0 else { return }
        average(into: running, decay: decay)
        hasRunning = true
        pairedRows = 0
    }

    /// The factor a step that folds out of place uses: staged (allocated on first use) if
    /// something is pending, else the running factor. Nothing committed changes.
    func stageFold(decay: Scalar) throws(KFACError) -> AlignedBuffer<Scalar> {
        guard pairedRows > 0 else { return running }
        if staged == nil { staged = try AlignedBuffer(rows: lowerWidth, columns: upperWidth) }
        average(into: staged!, decay: decay)
        return staged!
    }

    // MARK: Distributed exchange (full matrices, not upper triangles: a cross factor is rectangular)

    /// Values of a statistics pack: the matrix, then one count.
    var packCount: Int { count + 1 }

    /// Throws `.invalidSize` if rows recorded for one layer of the link wait for the other's.
    func checkAllPaired(_ what: String) throws(KFACError) {
        guard lowerCount == 0, upperCount == 0 else {
            throw KFACError(.invalidSize, "the \(what) rows of a link do not pair (\(lowerCount) and \(upperCount) rows wait for the other layer): record the same examples for both layers before the exchange")
        }
    }

    /// Eager reduce: the pending sum Σ x_lower x_upperᵀ and its row count.
    func packPending(into out: UnsafeMutablePointer<Scalar>) {
        if pairedRows > 0 { out.update(from: pendingSum.base, count: count) } else { out.initialize(repeating: 0, count: count) }
        out[count] = Scalar(pairedRows)
    }

    /// Eager reduce: the (allreduced) sums and rows become the pending statistics.
    func replacePending(from p: UnsafePointer<Scalar>, rows: Int) {
        discardPending()
        guard rows > 0 else { return }
        pendingSum.base.update(from: p, count: count)
        pairedRows = rows
    }

    /// Lazy reduce: the moving average the next inversion uses (with the pending sums folded in
    /// when `folding`), then 1, or zeros and 0 without one.
    func packAverage(into out: UnsafeMutablePointer<Scalar>, scratch: AlignedBuffer<Scalar>, decay: Scalar, folding: Bool) {
        if folding && pairedRows > 0 {
            average(into: scratch, decay: decay)
            out.update(from: scratch.base, count: count)
        } else if hasRunning {
            out.update(from: running.base, count: count)
        } else {
            out.initialize(repeating: 0, count: count)
        }
        out[count] = folding && pairedRows > 0 || hasRunning ? 1 : 0
    }

    /// Lazy reduce: the running factor becomes the ranks' mean (`weight` ranks had one).
    func replaceRunning(from p: UnsafePointer<Scalar>, weight: Int, folding: Bool) {
        guard weight > 0 else { return }
        let scale = 1 / Scalar(weight)
        for i in 0..<count { running.base[i] = scale * p[i] }
        hasRunning = true
        if folding { pairedRows = 0 }
    }

    /// Bytes of `saveExchanged`.
    var exchangedBytes: Int { 2 * count * MemoryLayout<Scalar>.stride + 16 }

    /// What an exchange may change (running, pending sum and their flags), for its rollback.
    func saveExchanged(to w: inout StateWriter) {
        w.u64(hasRunning ? 1 : 0)
        w.scalars(running.base, count: count)
        w.u64(UInt64(pairedRows))
        w.scalars(pendingSum.base, count: count)
    }

    func restoreExchanged(from r: inout StateReader) throws(KFACError) {
        hasRunning = try r.flag()
        try r.scalars(into: running.base, count: count)
        pairedRows = try r.i64()
        try r.scalars(into: pendingSum.base, count: count)
    }

    // MARK: State images

    /// Writes: has running [factor], paired rows [pending sum], unpaired rows of each side.
    func write(to w: inout StateWriter) {
        w.u64(hasRunning ? 1 : 0)
        if hasRunning { w.scalars(running.base, count: count) }
        w.u64(UInt64(pairedRows))
        if pairedRows > 0 { w.scalars(pendingSum.base, count: count) }
        w.u64(UInt64(lowerCount))
        if lowerCount > 0 { w.scalars(lowerRows!.base, count: lowerCount * lowerWidth) }
        w.u64(UInt64(upperCount))
        if upperCount > 0 { w.scalars(upperRows!.base, count: upperCount * upperWidth) }
    }

    /// Drops the pending cross statistics (paired sums and unpaired rows); the running factor stays.
    func discardPending() {
        pairedRows = 0
        lowerCount = 0
        upperCount = 0
    }

    /// Reads what `write` wrote into this (fresh) factor, checked against what recording can
    /// produce (issue 15): finite values, pending sums within the record limit, at most as many
    /// paired and unpaired rows as the two layers' factors have pending (`lowerPending`,
    /// `upperPending`), unpaired rows on one side only (rows of both sides pair at once).
    func read(from r: inout StateReader, lowerPending: Int, upperPending: Int) throws(KFACError) {
        hasRunning = try r.flag()
        if hasRunning {
            try r.scalars(into: running.base, count: count)
            guard Scalar.allFinite(running.base, count: count) else {
                throw KFACError(.corruptState, "state image has a cross factor that is not finite")
            }
        }
        let paired = try r.i64()
        guard paired >= 0 && paired <= Swift.min(lowerPending, upperPending) else {
            throw KFACError(.corruptState, "state image has \(paired) paired cross rows, more than the linked layers have pending")
        }
        if paired > 0 {
            try r.scalars(into: pendingSum.base, count: count)
            // |Σ x_l x_uᵀ| ≤ √(Σ x_l² · Σ x_u²): within what the layers' record bound allows.
            guard Double(Scalar.largestMagnitude(pendingSum.base, count: count)) <= KroneckerFactor<Scalar>.pendingLimit else {
                throw KFACError(.corruptState, "state image has pending cross sums that are not finite or larger than a record call accepts")
            }
        }
        pairedRows = paired
        for upper in [false, true] {
            let rows = try r.i64()
            let width = upper ? upperWidth : lowerWidth
            guard rows >= 0 && rows <= (upper ? upperPending : lowerPending) - paired else {
                throw KFACError(.corruptState, "state image has a bad unpaired cross row count \(rows)")
            }
            try r.ensureRemaining(rows, of: Scalar.self, values: width)  // before allocating room for them
            if rows > 0 {
                try prepare(upper: upper, rows: rows)
                let b = (upper ? upperRows : lowerRows)!
                try r.scalars(into: b.base, count: rows * width)
                guard Scalar.allFinite(b.base, count: rows * width) else {
                    throw KFACError(.corruptState, "state image has unpaired cross rows that are not finite")
                }
            }
            if upper { upperCount = rows } else { lowerCount = rows }
        }
        guard lowerCount == 0 || upperCount == 0 else {
            throw KFACError(.corruptState, "state image has unpaired cross rows on both sides of a link")
        }
    }
}
