/// One Kronecker factor of a layer's curvature block — the input side A or the output side G.
///
/// It holds the second-moment sum of the rows recorded since the last factor update
/// (`pendingSum`, `pendingRows`) and the moving average (`running`). Both are symmetric and
/// kept in the upper triangle only. `staged` receives an out-of-place moving average when a step
/// must be able to fail after the fold (an inversion follows it), so that failure leaves
/// `running` untouched.
final class KroneckerFactor<Scalar: KFACScalar> {
    let dimension: Int
    let pendingSum: Matrix<Scalar>
    private(set) var pendingRows = 0
    private(set) var running: Matrix<Scalar>
    private(set) var hasRunning = false
    private var staged: Matrix<Scalar>?

    init(dimension: Int) throws(KFACError) {
        self.dimension = dimension
        pendingSum = try Matrix(rows: dimension, columns: dimension)
        running = try Matrix(rows: dimension, columns: dimension)
    }

    var hasPending: Bool { pendingRows > 0 }

    /// Adds alpha · Σ_n x_n x_nᵀ to the leading width×width block of the pending sum, x given as
    /// `rows` row-major rows of `width` values.
    func addSecondMoment(of x: UnsafePointer<Scalar>, rows: Int, width: Int, alpha: Scalar) {
        let chunkRows = Int(Int32.max) / Swift.max(width, 1)  // BLAS takes 32-bit sizes
        var start = 0
        while start < rows {
            let chunk = Swift.min(chunkRows, rows - start)
            Scalar.syrkTransposed(n: width, k: chunk, alpha: alpha, a: x + start * width, lda: width,
                                  beta: (pendingRows > 0 || start > 0) ? 1 : 0,
                                  c: pendingSum.base, ldc: dimension)
            start += chunk
        }
    }

    /// For an input extended by a trailing 1 (the bias): adds Σ_n x_n to the last column's
    /// upper part and `rows` to the corner. Call before `notePending`.
    func addAppendedOne(of x: UnsafePointer<Scalar>, rows: Int, width: Int, ones: Matrix<Scalar>) {
        let last = dimension - 1
        columnSums(of: x, rows: rows, columns: width, scale: 1, into: pendingSum.base + last,
                   stride: dimension, accumulate: pendingRows > 0, ones: ones)
        let corner = pendingSum.base + last * dimension + last
        corner.pointee = (pendingRows > 0 ? corner.pointee : 0) + Scalar(rows)
    }

    /// Counts `rows` more recorded rows.
    func notePending(rows: Int) { pendingRows += rows }

    /// Throws `.nonFinite` if folding the pending sum could produce a non-finite factor.
    func validatePending() throws(KFACError) {
        if hasPending && !Scalar.diagonalSafelyFinite(pendingSum.base, n: dimension) {
            throw KFACError(.nonFinite, "recorded statistics overflow (second moment is not finite)")
        }
    }

    /// The moving average's weights: the first fold initialises, later ones decay.
    private func foldCoefficients(decay: Scalar) -> (previous: Scalar, pending: Scalar) {
        let n = Scalar(pendingRows)
        return hasRunning ? (decay, (1 - decay) / n) : (0, 1 / n)
    }

    /// Folds the pending sum into the running average in place and clears it.
    /// Call `validatePending` first.
    func fold(decay: Scalar) {
        guard hasPending else { return }
        let (b, s) = foldCoefficients(decay: decay)
        Scalar.movingAverageUpper(into: running.base, previous: hasRunning ? UnsafePointer(running.base) : nil,
                           beta: b, pending: pendingSum.base, scale: s, n: dimension)
        hasRunning = true
        pendingRows = 0
    }

    /// The factor a step that folds out of place will use: the staged average (allocated on first
    /// use) if there is something pending, else the running factor. Call `validatePending` first.
    func stageFold(decay: Scalar) throws(KFACError) -> Matrix<Scalar> {
        guard hasPending else { return running }
        if staged == nil { staged = try Matrix(rows: dimension, columns: dimension) }
        let (b, s) = foldCoefficients(decay: decay)
        Scalar.movingAverageUpper(into: staged!.base, previous: hasRunning ? UnsafePointer(running.base) : nil,
                           beta: b, pending: pendingSum.base, scale: s, n: dimension)
        return staged!
    }

    /// Makes the staged average the running factor (after `stageFold`) and clears the pending sum.
    func commitStagedFold() {
        guard hasPending, let s = staged else { return }
        staged = running
        running = s
        hasRunning = true
        pendingRows = 0
    }

    /// The factor as a full symmetric row-major matrix.
    func copyRunning(into out: UnsafeMutablePointer<Scalar>) {
        out.update(from: running.base, count: dimension * dimension)
        Scalar.symmetrizeFromUpper(out, n: dimension)
    }

    /// Restores state from an image (see StateImage.swift).
    func restore(running r: UnsafePointer<Scalar>?, pending p: UnsafePointer<Scalar>?, pendingRows rows: Int) {
        if let r { running.base.update(from: r, count: dimension * dimension); hasRunning = true }
        else { hasRunning = false }
        if let p, rows > 0 { pendingSum.base.update(from: p, count: dimension * dimension); pendingRows = rows }
        else { pendingRows = 0 }
    }
}
