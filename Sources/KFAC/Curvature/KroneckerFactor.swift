/// One Kronecker factor of a curvature block — the input side A or the output side G — with the
/// block structure of `FactorStructure` (one dense block unless grouped or SUA).
///
/// Statistics recorded since the last factor update are kept in one of two forms:
/// - as the recorded rows themselves (`rowBuffer`: scaled, with the appended bias value), while
///   they take no more memory than the factor — the usual case of one batch per update of a
///   dense layer. The fold is then one syrk per block into the moving average (its beta is the
///   decay), with no extra pass over the factor;
/// - beyond that, as the sums Σ x xᵀ of each block (`pendingSum`).
/// Every block is symmetric and kept in the upper triangle only (row-major). `staged` receives
/// an out-of-place moving average when a step must be able to fail after the fold (an inversion
/// follows it), so that failure leaves `running` and the pending statistics untouched.
final class KroneckerFactor<Scalar: KFACScalar> {
    let structure: FactorStructure
    private var rowBuffer: AlignedBuffer<Scalar>?
    private(set) var bufferedRows = 0
    private var pendingSum: AlignedBuffer<Scalar>?
    private(set) var summedRows = 0
    /// A bound on every entry of the pending second-moment sums (those of the buffered rows
    /// included): the sum over the record calls since the last fold of each call's own bound.
    /// Record calls refuse data that would take it past `pendingLimit`, so the sums themselves —
    /// not only each call's share — stay finite with a margin (issue 15).
    private(set) var pendingMagnitude = 0.0
    /// The moving average, block by block (`structure.storageOffsets`).
    private(set) var running: AlignedBuffer<Scalar>
    private(set) var hasRunning = false
    private var staged: AlignedBuffer<Scalar>?

    init(structure: FactorStructure) throws(KFACError) {
        self.structure = structure
        running = try AlignedBuffer(rows: 1, columns: structure.storageCount)
    }

    /// The factor's dimension (the gradient matrix's extent on this side).
    var dimension: Int { structure.dimension }
    /// Rows recorded since the last fold.
    var pendingRows: Int { bufferedRows + summedRows }
    var hasPending: Bool { pendingRows > 0 }

    /// The largest `pendingMagnitude` a record call may leave (2⁻⁴ of the largest finite value).
    static var pendingLimit: Double { Double(Scalar.greatestFiniteMagnitude) / 16 }
    /// The most rows that may be pending (so that counts, and their conversion to a scalar,
    /// stay exact and cannot overflow).
    static var maximumPendingRows: Int { 1 << 53 }

    /// Adds a record call's bound to `pendingMagnitude` (after the call recorded its rows).
    func notePending(magnitude: Double) {
        pendingMagnitude += magnitude
    }

    /// Rows are buffered while they take no more memory than the block storage.
    private var rowBufferLimit: Int { Swift.max(1, structure.storageCount / Swift.max(1, structure.recordedWidth)) }

    /// Records `rows` rows of `width` values (row-major, consecutive rows `stride` apart), each
    /// multiplied by `scale`, followed by `appended` as a last coordinate if given
    /// (width + 1 == recordedWidth), else width == recordedWidth. On error nothing changed.
    func record(_ x: UnsafePointer<Scalar>, rows: Int, width: Int, stride: Int? = nil, appended: Scalar?,
                scale: Scalar, ones: AlignedBuffer<Scalar>) throws(KFACError) {
        let buffered = try prepareRecord(rows: rows)
        add(x, rows: rows, width: width, stride: stride, appended: appended, scale: scale, ones: ones, buffered: buffered)
    }

    /// Prepares to record `rows` more rows (possibly in several `add` calls): decides whether they
    /// are buffered as rows (true) or summed, and allocates what that needs, so that the `add`
    /// calls cannot fail. On error nothing changed.
    func prepareRecord(rows: Int) throws(KFACError) -> Bool {
        if summedRows == 0 && bufferedRows + rows <= rowBufferLimit {
            _ = try reserveRowBuffer(bufferedRows + rows)
            return true
        }
        _ = try pendingSumMatrix()
        return false
    }

    /// Records rows as `record` does, in the form `prepareRecord` chose for them.
    func add(_ x: UnsafePointer<Scalar>, rows: Int, width: Int, stride: Int? = nil, appended: Scalar?,
             scale: Scalar, ones: AlignedBuffer<Scalar>, buffered: Bool) {
        let stride = stride ?? width
        let w = structure.recordedWidth
        if buffered, let buffer = rowBuffer {
            for r in 0..<rows {
                let destination = buffer.base + (bufferedRows + r) * w
                Scalar.scaledCopy(from: x + r * stride, to: destination, count: width, scale: scale)
                if let appended { destination[width] = appended }
            }
            bufferedRows += rows
            return
        }
        guard let sum = pendingSum else { return }
        flushRowBuffer(into: sum)
        let accumulate = summedRows > 0
        for q in structure.uniqueSizes.indices {
            let (lo, b) = (structure.uniqueOffsets[q], structure.uniqueSizes[q])
            let block = sum.base + structure.storageOffsets[q]
            let dataColumns = Swift.max(0, Swift.min(lo + b, width) - lo)
            if dataColumns > 0 {
                symmetricUpdate(n: dataColumns, rows: rows, alpha: scale * scale, a: x + lo, lda: stride,
                                accumulate: accumulate, c: block, ldc: b)
            }
            if let appended, lo + b == width + 1 {
                // The block holds the appended coordinate: its cross terms and its corner.
                if dataColumns > 0 {
                    columnSums(of: x + lo, rows: rows, columns: dataColumns, stride: stride, scale: scale * appended,
                               into: block + dataColumns, incY: b, accumulate: accumulate, ones: ones)
                }
                let corner = block + dataColumns * b + dataColumns
                corner.pointee = (accumulate ? corner.pointee : 0) + Scalar(rows) * appended * appended
            }
        }
        summedRows += rows
    }

    /// Records, in the summed form (`prepareRecord` returned false), the columns of `examples`
    /// matrices of `width` rows × `columns` values (row-major, matrix e at `x + e·exampleStride`):
    /// Σₑ Xₑ Xₑᵀ · scale², i.e. the same statistics as `add` of the transposed rows (each column
    /// a row of `width` values), without transposing them — a channels-first convolution's output
    /// gradients, one syrk per example. No appended coordinate.
    func addColumns(_ x: UnsafePointer<Scalar>, examples: Int, columns: Int, width: Int, exampleStride: Int,
                    scale: Scalar) {
        guard let sum = pendingSum, examples > 0 else { return }
        flushRowBuffer(into: sum)
        for q in structure.uniqueSizes.indices {
            let (lo, b) = (structure.uniqueOffsets[q], structure.uniqueSizes[q])
            let block = sum.base + structure.storageOffsets[q]
            let dataRows = Swift.max(0, Swift.min(lo + b, width) - lo)
            guard dataRows > 0 else { continue }
            for e in 0..<examples {
                Scalar.syrk(n: dataRows, k: columns, alpha: scale * scale, a: x + e * exampleStride + lo * columns,
                            lda: columns, beta: summedRows > 0 || e > 0 ? 1 : 0, c: block, ldc: b)
            }
        }
        summedRows += examples * columns
    }

    /// Upper triangle of c (n×n, ldc) (+)= alpha · aᵀ a for `rows` rows of a (n columns, lda).
    private func symmetricUpdate(n: Int, rows: Int, alpha: Scalar, a: UnsafePointer<Scalar>, lda: Int,
                                 accumulate: Bool, c: UnsafeMutablePointer<Scalar>, ldc: Int) {
        let chunkRows = Swift.max(1, Int(Int32.max) / Swift.max(lda, 1))  // BLAS takes 32-bit sizes
        var start = 0
        while start < rows {
            let chunk = Swift.min(chunkRows, rows - start)
            let b: Scalar = start > 0 || accumulate ? 1 : 0
            Scalar.syrkTransposed(n: n, k: chunk, alpha: alpha, a: a + start * lda, lda: lda, beta: b, c: c, ldc: ldc)
            start += chunk
        }
    }

    private func reserveRowBuffer(_ rows: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        if let b = rowBuffer, b.rows >= rows { return b }
        // Grow geometrically (up to the limit) so that a steady batch size stops allocating.
        let capacity = Swift.min(Swift.max(rowBufferLimit, rows), Swift.max(rows, 2 * (rowBuffer?.rows ?? 0)))
        let bigger = try AlignedBuffer<Scalar>(rows: capacity, columns: structure.recordedWidth)
        if let old = rowBuffer { bigger.base.update(from: old.base, count: bufferedRows * structure.recordedWidth) }
        rowBuffer = bigger
        return bigger
    }

    private func pendingSumMatrix() throws(KFACError) -> AlignedBuffer<Scalar> {
        if let s = pendingSum { return s }
        let s = try AlignedBuffer<Scalar>(rows: 1, columns: structure.storageCount)
        pendingSum = s
        return s
    }

    /// syrk of the buffered rows into every block of `destination`: alpha·XᵀX + beta·destination.
    private func blockUpdates(from buffer: AlignedBuffer<Scalar>, alpha: Scalar, beta: Scalar, into destination: UnsafeMutablePointer<Scalar>) {
        for q in structure.uniqueSizes.indices {
            let b = structure.uniqueSizes[q]
            Scalar.syrkTransposed(n: b, k: bufferedRows, alpha: alpha, a: buffer.base + structure.uniqueOffsets[q],
                                  lda: structure.recordedWidth, beta: beta,
                                  c: destination + structure.storageOffsets[q], ldc: b)
        }
    }

    /// Moves the buffered rows into the block sums.
    private func flushRowBuffer(into sum: AlignedBuffer<Scalar>) {
        guard bufferedRows > 0, let buffer = rowBuffer else { return }
        blockUpdates(from: buffer, alpha: 1, beta: summedRows > 0 ? 1 : 0, into: sum.base)
        summedRows += bufferedRows
        bufferedRows = 0
    }

    /// Throws `.nonFinite` if folding the pending statistics could produce a non-finite factor.
    /// (Record calls already refuse values that could; this is the last line of defence.)
    func validatePending() throws(KFACError) {
        guard summedRows > 0, let sum = pendingSum else { return }
        for q in structure.uniqueSizes.indices
        where !Scalar.diagonalSafelyFinite(sum.base + structure.storageOffsets[q], n: structure.uniqueSizes[q]) {
            throw KFACError(.nonFinite, "recorded statistics overflow (second moment is not finite)")
        }
    }

    /// destination = β·previous + c·(pending statistics), β = 0 for the first fold, with
    /// c = (1 − β)/rows (or 1/rows). `previous` may be `destination`.
    private func average(into destination: AlignedBuffer<Scalar>, decay: Scalar) {
        let n = Scalar(pendingRows)
        let (beta, c): (Scalar, Scalar) = hasRunning ? (decay, (1 - decay) / n) : (0, 1 / n)
        let previous: UnsafePointer<Scalar>? = hasRunning ? UnsafePointer(running.base) : nil
        var rowsBeta = beta
        if summedRows > 0, let sum = pendingSum {
            for q in structure.uniqueSizes.indices {
                let o = structure.storageOffsets[q]
                Scalar.movingAverageUpper(into: destination.base + o, previous: previous.map { $0 + o }, beta: beta,
                                          pending: sum.base + o, scale: c, n: structure.uniqueSizes[q])
            }
            rowsBeta = 1
        } else if destination !== running, let previous {
            destination.base.update(from: previous, count: structure.storageCount)
        }
        if bufferedRows > 0, let buffer = rowBuffer {
            blockUpdates(from: buffer, alpha: c, beta: rowsBeta, into: destination.base)
        }
    }

    private func clearPending() {
        bufferedRows = 0
        summedRows = 0
        pendingMagnitude = 0
    }

    /// Drops the statistics recorded since the last fold (`kfac_optimizer_discard_statistics`).
    func discardPending() {
        clearPending()
    }

    /// Folds the pending statistics into the running average in place and clears them.
    /// Call `validatePending` first.
    func fold(decay: Scalar) {
        guard hasPending else { return }
        average(into: running, decay: decay)
        hasRunning = true
        clearPending()
    }

    /// The factor a step that folds out of place will use: the staged average (allocated on first
    /// use) if something is pending, else the running factor. Nothing committed changes.
    /// Call `validatePending` first.
    func stageFold(decay: Scalar) throws(KFACError) -> AlignedBuffer<Scalar> {
        guard hasPending else { return running }
        if staged == nil { staged = try AlignedBuffer(rows: 1, columns: structure.storageCount) }
        average(into: staged!, decay: decay)
        return staged!
    }

    /// Makes the staged average the running factor (after `stageFold`) and clears the pending
    /// statistics.
    func commitStagedFold() {
        guard hasPending, let s = staged else { return }
        staged = running
        running = s
        hasRunning = true
        clearPending()
    }

    /// tr of the factor (over its `dimension` coordinates) from block storage `m`.
    func trace(of m: UnsafePointer<Scalar>) -> Scalar {
        var t: Scalar = 0
        for k in structure.tiles.indices {
            let tile = structure.tiles[k]
            t += Scalar.trace(m + structure.storageOffsets[tile.unique], n: structure.uniqueSizes[tile.unique])
        }
        return t
    }

    /// The running factor as a full symmetric dimension×dimension row-major matrix (zeros off
    /// the blocks), in the layer's own parameter order (`FactorStructure.externalIndex`).
    func copyRunning(into out: UnsafeMutablePointer<Scalar>) {
        let d = structure.dimension
        let index = structure.externalIndex
        out.initialize(repeating: 0, count: d * d)
        for tile in structure.tiles {
            let b = structure.uniqueSizes[tile.unique]
            let block = running.base + structure.storageOffsets[tile.unique]
            for i in 0..<b {
                for j in i..<b {
                    let v = block[i * b + j]
                    let (r, c) = (index?[tile.offset + i] ?? tile.offset + i, index?[tile.offset + j] ?? tile.offset + j)
                    out[r * d + c] = v
                    out[c * d + r] = v
                }
            }
        }
    }

    // MARK: State images

    /// Writes: has running [blocks], buffered rows [rows·width], summed rows [blocks].
    func write(to w: inout StateWriter) {
        w.u64(hasRunning ? 1 : 0)
        if hasRunning { w.scalars(running.base, count: structure.storageCount) }
        w.u64(UInt64(bufferedRows))
        if bufferedRows > 0 { w.scalars(rowBuffer!.base, count: bufferedRows * structure.recordedWidth) }
        w.u64(UInt64(summedRows))
        if summedRows > 0 { w.scalars(pendingSum!.base, count: structure.storageCount) }
    }

    /// Reads what `write` wrote into this (fresh) factor, and checks everything a record call or
    /// a fold guarantees: running blocks finite with a non-negative diagonal, buffered rows
    /// within the buffer and finite, summed blocks finite with a non-negative diagonal, at most
    /// `maximumPendingRows` pending rows (never both buffered and summed ones), and pending sums
    /// within the limit record calls keep them under. So a loaded factor can neither trap nor
    /// fail a later fold because of its own contents.
    func read(from r: inout StateReader) throws(KFACError) {
        hasRunning = try r.flag()
        if hasRunning {
            try r.scalars(into: running.base, count: structure.storageCount)
            guard secondMomentBlocksValid(running.base) else {
                throw KFACError(.corruptState, "state image has a running factor that is not finite or has a negative diagonal")
            }
        }
        let buffered = try r.i64()
        guard buffered >= 0 && buffered <= rowBufferLimit else {
            throw KFACError(.corruptState, "state image has \(buffered) buffered rows where at most \(rowBufferLimit) fit")
        }
        var magnitude = 0.0
        if buffered > 0 {
            let w = structure.recordedWidth
            let buffer = try reserveRowBuffer(buffered)
            try r.scalars(into: buffer.base, count: buffered * w)
            for row in 0..<buffered {
                let largest = Double(Scalar.largestMagnitude(buffer.base + row * w, count: w))
                guard largest.isFinite else { throw KFACError(.corruptState, "state image has a buffered row that is not finite") }
                magnitude += largest * largest
            }
        }
        bufferedRows = buffered
        let summed = try r.i64()
        guard summed >= 0 && summed <= Self.maximumPendingRows && (summed == 0 || buffered == 0) else {
            throw KFACError(.corruptState, "state image has an impossible pending row count \(summed)")
        }
        if summed > 0 {
            let sum = try pendingSumMatrix()
            try r.scalars(into: sum.base, count: structure.storageCount)
            guard secondMomentBlocksValid(sum.base) else {
                throw KFACError(.corruptState, "state image has pending sums that are not finite or have a negative diagonal")
            }
            // A sum of outer products: every entry is bounded by the largest diagonal entry.
            for q in structure.uniqueSizes.indices {
                let (o, b) = (structure.storageOffsets[q], structure.uniqueSizes[q])
                for i in 0..<b { magnitude = Swift.max(magnitude, Double(sum.base[o + i * b + i])) }
            }
        }
        summedRows = summed
        guard magnitude <= Self.pendingLimit else {
            throw KFACError(.corruptState, "state image has pending statistics larger than a record call accepts")
        }
        pendingMagnitude = magnitude
    }

    /// Whether block storage `m` holds finite blocks whose diagonals are non-negative (what a
    /// second moment, or a moving average of them, always is).
    private func secondMomentBlocksValid(_ m: UnsafePointer<Scalar>) -> Bool {
        guard Scalar.allFinite(m, count: structure.storageCount) else { return false }
        for q in structure.uniqueSizes.indices {
            let (o, b) = (structure.storageOffsets[q], structure.uniqueSizes[q])
            for i in 0..<b where !(m[o + i * b + i] >= 0) { return false }
        }
        return true
    }

    /// The most bytes `write` can write for this factor's structure (state-file size checks).
    var maximumImageBytes: Int {
        let s = MemoryLayout<Scalar>.stride
        return 24 + (2 * structure.storageCount + rowBufferLimit * structure.recordedWidth) * s
    }
}

// MARK: Distributed runs (Distributed/): packing statistics for a caller's sum-allreduce

extension KroneckerFactor {
    /// Values one factor contributes to a statistics pack: each unique block's upper triangle
    /// (row-major), then one count.
    var packCount: Int {
        // (A loop rather than `reduce`, which allocates in debug builds.)
        let sizes = structure.uniqueSizes
        var n = 1
        for q in sizes.indices { n += sizes[q] * (sizes[q] + 1) / 2 }
        return n
    }

    /// Writes the upper triangles of `blocks` (block storage) into `out`, returning the values written.
    private func packUpper(_ blocks: UnsafePointer<Scalar>, into out: UnsafeMutablePointer<Scalar>) -> Int {
        var w = 0
        for q in structure.uniqueSizes.indices {
            let b = structure.uniqueSizes[q], block = blocks + structure.storageOffsets[q]
            for i in 0..<b {
                (out + w).update(from: block + i * b + i, count: b - i)
                w += b - i
            }
        }
        return w
    }

    /// Reads upper triangles written by `packUpper` into block storage `blocks`, times `scale`.
    private func unpackUpper(_ p: UnsafePointer<Scalar>, scale: Scalar, into blocks: UnsafeMutablePointer<Scalar>) {
        var r = 0
        for q in structure.uniqueSizes.indices {
            let b = structure.uniqueSizes[q], block = blocks + structure.storageOffsets[q]
            for i in 0..<b {
                for j in i..<b { block[i * b + j] = scale * p[r + j - i] }
                r += b - i
            }
        }
    }

    /// Eager reduce: the pending statistics as Σ x xᵀ (upper triangles of each unique block) and
    /// the pending row count, in `packCount` values. `scratch` holds at least `storageCount`
    /// values. Changes nothing.
    func packPending(into out: UnsafeMutablePointer<Scalar>, scratch: UnsafeMutablePointer<Scalar>) {
        let count = structure.storageCount
        if summedRows > 0, let sum = pendingSum {
            scratch.update(from: sum.base, count: count)
        } else {
            scratch.initialize(repeating: 0, count: count)
        }
        if bufferedRows > 0, let buffer = rowBuffer {
            blockUpdates(from: buffer, alpha: 1, beta: summedRows > 0 ? 1 : 0, into: scratch)
        }
        let w = packUpper(scratch, into: out)
        out[w] = Scalar(pendingRows)
    }

    /// Allocates what `replacePending` needs, so that it cannot fail.
    func preparePendingReplacement() throws(KFACError) {
        _ = try pendingSumMatrix()
    }

    /// Eager reduce: makes the (sum-allreduced) sums and row count of `packPending` this
    /// factor's pending statistics. `rows` is the count read from the pack (a whole number >= 0).
    func replacePending(from p: UnsafePointer<Scalar>, rows: Int) {
        clearPending()
        guard rows > 0, let sum = pendingSum else { return }
        unpackUpper(p, scale: 1, into: sum.base)
        summedRows = rows
    }

    /// Lazy reduce: the moving average this factor has for the next step's inversion — with its
    /// pending statistics folded in when that step folds (`folding`), else the running factor
    /// alone (the pending statistics wait for their fold, as in a single process) — as upper
    /// triangles, then 1 if it has one, else zeros and 0. `scratch` holds at least
    /// `storageCount` values. Changes nothing.
    func packAverage(into out: UnsafeMutablePointer<Scalar>, scratch: AlignedBuffer<Scalar>, decay: Scalar, folding: Bool) {
        let folds = folding && hasPending
        if folds {
            average(into: scratch, decay: decay)
        } else if hasRunning {
            scratch.base.update(from: running.base, count: structure.storageCount)
        } else {
            scratch.base.initialize(repeating: 0, count: structure.storageCount)
        }
        let w = packUpper(scratch.base, into: out)
        out[w] = folds || hasRunning ? 1 : 0
    }

    /// Lazy reduce: the running factor becomes the mean of the ranks' averages (the allreduced
    /// sum from `packAverage` divided by `weight`, the ranks that had one). The pending
    /// statistics were folded into the pack when `folding` (cleared here), else they stay
    /// pending for the next fold. With weight 0 nothing changes.
    func replaceRunning(from p: UnsafePointer<Scalar>, weight: Int, folding: Bool) {
        guard weight > 0 else { return }
        unpackUpper(p, scale: 1 / Scalar(weight), into: running.base)
        hasRunning = true
        if folding { clearPending() }
    }
}

extension KroneckerFactor {
    /// Bytes `saveStatistics` can write at most.
    var maximumSnapshotBytes: Int { maximumImageBytes + 8 }

    /// Writes everything an exchange may change (the running factor and the pending
    /// statistics, as the state image has them, and the pending magnitude), so that
    /// `restoreStatistics` can undo an exchange that failed after it unpacked.
    func saveStatistics(to w: inout StateWriter) {
        write(to: &w)
        w.f64(pendingMagnitude)
    }

    /// Undoes an exchange: reads what `saveStatistics` wrote.
    func restoreStatistics(from r: inout StateReader) throws(KFACError) {
        try read(from: &r)
        pendingMagnitude = try r.f64()
    }
}
