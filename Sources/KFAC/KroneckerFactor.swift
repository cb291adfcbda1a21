/// One Kronecker factor of a layer's curvature block — the input side A or the output side G.
///
/// Statistics recorded since the last factor update are kept in one of two forms:
/// - as the rows themselves (`rowBuffer`: each row scaled, with the trailing 1 of a bias), while
///   there are at most `dimension` of them — the usual case of one batch per update. The fold is
///   then a single syrk into the moving average (its beta is the decay), with no extra pass over
///   the d×d factor;
/// - beyond that, as the second-moment sum Σ x xᵀ (`pendingSum`), which is smaller than the rows.
/// Factors are symmetric and kept in the upper triangle only. `staged` receives an out-of-place
/// moving average when a step must be able to fail after the fold (an inversion follows it), so
/// that failure leaves `running` and the pending statistics untouched.
final class KroneckerFactor<Scalar: KFACScalar> {
    let dimension: Int
    private var rowBuffer: Matrix<Scalar>?
    private(set) var bufferedRows = 0
    private var pendingSum: Matrix<Scalar>?
    private(set) var summedRows = 0
    private(set) var running: Matrix<Scalar>
    private(set) var hasRunning = false
    private var staged: Matrix<Scalar>?

    init(dimension: Int) throws(KFACError) {
        self.dimension = dimension
        running = try Matrix(rows: dimension, columns: dimension)
    }

    /// Rows recorded since the last fold.
    var pendingRows: Int { bufferedRows + summedRows }
    var hasPending: Bool { pendingRows > 0 }

    /// Records `rows` rows of `width` values (row-major), each multiplied by `scale` and, with
    /// `appendOne`, extended by a trailing 1 (width + 1 == dimension). On error nothing changed.
    func record(_ x: UnsafePointer<Scalar>, rows: Int, width: Int, appendOne: Bool, scale: Scalar,
                ones: Matrix<Scalar>) throws(KFACError) {
        if summedRows == 0 && bufferedRows + rows <= dimension {
            let buffer = try reserveRowBuffer(bufferedRows + rows)
            for r in 0..<rows {
                let destination = buffer.base + (bufferedRows + r) * dimension
                Scalar.scaledCopy(from: x + r * width, to: destination, count: width, scale: scale)
                if appendOne { destination[width] = 1 }
            }
            bufferedRows += rows
            return
        }
        let sum = try pendingSumMatrix()
        flushRowBuffer(into: sum)
        let chunkRows = Int(Int32.max) / Swift.max(width, 1)  // BLAS takes 32-bit sizes
        var start = 0
        while start < rows {
            let chunk = Swift.min(chunkRows, rows - start)
            Scalar.syrkTransposed(n: width, k: chunk, alpha: scale * scale, a: x + start * width, lda: width,
                                  beta: (summedRows > 0 || start > 0) ? 1 : 0, c: sum.base, ldc: dimension)
            start += chunk
        }
        if appendOne {
            let last = dimension - 1
            columnSums(of: x, rows: rows, columns: width, scale: scale, into: sum.base + last,
                       stride: dimension, accumulate: summedRows > 0, ones: ones)
            let corner = sum.base + last * dimension + last
            corner.pointee = (summedRows > 0 ? corner.pointee : 0) + Scalar(rows)
        }
        summedRows += rows
    }

    private func reserveRowBuffer(_ rows: Int) throws(KFACError) -> Matrix<Scalar> {
        if let b = rowBuffer, b.rows >= rows { return b }
        // Grow geometrically (up to `dimension` rows) so that a steady batch size stops allocating.
        let capacity = Swift.min(dimension, Swift.max(rows, 2 * (rowBuffer?.rows ?? 0)))
        let bigger = try Matrix<Scalar>(rows: capacity, columns: dimension)
        if let old = rowBuffer { bigger.base.update(from: old.base, count: bufferedRows * dimension) }
        rowBuffer = bigger
        return bigger
    }

    private func pendingSumMatrix() throws(KFACError) -> Matrix<Scalar> {
        if let s = pendingSum { return s }
        let s = try Matrix<Scalar>(rows: dimension, columns: dimension)
        pendingSum = s
        return s
    }

    /// Moves the buffered rows into the second-moment sum.
    private func flushRowBuffer(into sum: Matrix<Scalar>) {
        guard bufferedRows > 0, let buffer = rowBuffer else { return }
        Scalar.syrkTransposed(n: dimension, k: bufferedRows, alpha: 1, a: buffer.base, lda: dimension,
                              beta: summedRows > 0 ? 1 : 0, c: sum.base, ldc: dimension)
        summedRows += bufferedRows
        bufferedRows = 0
    }

    /// Throws `.nonFinite` if folding the pending statistics could produce a non-finite factor.
    /// (Record calls already refuse values that could; this is the last line of defence.)
    func validatePending() throws(KFACError) {
        if summedRows > 0, let sum = pendingSum, !Scalar.diagonalSafelyFinite(sum.base, n: dimension) {
            throw KFACError(.nonFinite, "recorded statistics overflow (second moment is not finite)")
        }
    }

    /// destination = β·previous + c·(pending statistics), β = 0 for the first fold, with
    /// c = (1 − β)/rows (or 1/rows). `previous` may be `destination`.
    private func average(into destination: Matrix<Scalar>, decay: Scalar) {
        let n = Scalar(pendingRows)
        let (beta, c): (Scalar, Scalar) = hasRunning ? (decay, (1 - decay) / n) : (0, 1 / n)
        let previous: UnsafePointer<Scalar>? = hasRunning ? UnsafePointer(running.base) : nil
        var rowsBeta = beta
        if summedRows > 0, let sum = pendingSum {
            Scalar.movingAverageUpper(into: destination.base, previous: previous, beta: beta,
                                      pending: sum.base, scale: c, n: dimension)
            rowsBeta = 1
        } else if destination !== running, let previous {
            destination.base.update(from: previous, count: dimension * dimension)
        }
        if bufferedRows > 0, let buffer = rowBuffer {
            Scalar.syrkTransposed(n: dimension, k: bufferedRows, alpha: c, a: buffer.base, lda: dimension,
                                  beta: rowsBeta, c: destination.base, ldc: dimension)
        }
    }

    private func clearPending() {
        bufferedRows = 0
        summedRows = 0
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
    func stageFold(decay: Scalar) throws(KFACError) -> Matrix<Scalar> {
        guard hasPending else { return running }
        if staged == nil { staged = try Matrix(rows: dimension, columns: dimension) }
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

    /// The factor as a full symmetric row-major matrix.
    func copyRunning(into out: UnsafeMutablePointer<Scalar>) {
        out.update(from: running.base, count: dimension * dimension)
        Scalar.symmetrizeFromUpper(out, n: dimension)
    }

    // MARK: State images

    /// Writes: has running [d²], buffered rows [rows·d], summed rows [d²].
    func write(to w: inout StateWriter) {
        let d2 = dimension * dimension
        w.u64(hasRunning ? 1 : 0)
        if hasRunning { w.scalars(running.base, count: d2) }
        w.u64(UInt64(bufferedRows))
        if bufferedRows > 0 { w.scalars(rowBuffer!.base, count: bufferedRows * dimension) }
        w.u64(UInt64(summedRows))
        if summedRows > 0 { w.scalars(pendingSum!.base, count: d2) }
    }

    /// Reads what `write` wrote into this (fresh) factor.
    func read(from r: inout StateReader) throws(KFACError) {
        let d2 = dimension * dimension
        hasRunning = try r.flag()
        if hasRunning { try r.scalars(into: running.base, count: d2) }
        let buffered = try r.i64()
        guard buffered >= 0 && buffered <= dimension else {
            throw KFACError(.corruptState, "state image has \(buffered) buffered rows for a factor of dimension \(dimension)")
        }
        if buffered > 0 { try r.scalars(into: try reserveRowBuffer(buffered).base, count: buffered * dimension) }
        bufferedRows = buffered
        let summed = try r.i64()
        guard summed >= 0 else { throw KFACError(.corruptState, "state image has a negative row count") }
        if summed > 0 { try r.scalars(into: try pendingSumMatrix().base, count: d2) }
        summedRows = summed
    }
}
