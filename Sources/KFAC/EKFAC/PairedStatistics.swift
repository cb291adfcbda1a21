/// EKFAC's pending per-example gradients of one Kronecker block, recorded by paired record
/// calls since they were last used, in the block's own coordinates (a = input dimension,
/// o = output dimension; SUA's offset-major order):
/// - `rows`: pairs (ā_r, g_r) whose per-example gradient is the one outer product g_r ā_rᵀ
///   (one row per example, or per-row mode where every row or position counts as an example);
/// - `matrices`: whole per-example gradients G_n = Σ_t g_{n,t} ā_{n,t}ᵀ (o × a) when an example
///   has several rows (sequences, convolution positions) in per-example mode;
/// - `divisor` D: the rows of dense calls, the examples of convolution calls.
///
/// They are kept rather than summed because S is a second moment in the bases in force at the
/// step, which may be new bases computed at that very step. For given bases Q_A, Q_G:
///
///     S_batch = (1/D) [ Σ_rows (Q_Gᵀ g_r)^{∘2} ((Q_Aᵀ ā_r)^{∘2})ᵀ + Σ_matrices (Q_Gᵀ G_n Q_A)^{∘2} ]
///
/// (rows: two rotations of all rows and one gemm; matrices: two block products per example).
/// Buffers grow geometrically and are kept, so a steady batch stops allocating.
final class PairedStatistics<Scalar: KFACScalar> {
    let inputDimension: Int
    let outputDimension: Int
    private(set) var rowCount = 0
    private(set) var matrixCount = 0
    private(set) var divisor = 0
    private var inputRows: AlignedBuffer<Scalar>?
    private var gradientRows: AlignedBuffer<Scalar>?
    private var matrices: AlignedBuffer<Scalar>?
    /// Scratch for `batchScaling`: rotated rows (grown with the rows), one o × a matrix pair.
    private var rotatedInputs: AlignedBuffer<Scalar>?
    private var rotatedGradients: AlignedBuffer<Scalar>?
    private let matrixScratch: AlignedBuffer<Scalar>
    private let matrixRotated: AlignedBuffer<Scalar>
    private let batch: AlignedBuffer<Scalar>
    /// Scratch for the layers' paired recording (rows of one example).
    private(set) var work: AlignedBuffer<Scalar>?
    /// Set when a step staged S from these statistics: its commit clears them.
    var consumed = false
    /// S computed by `update_factors` before its fold commits.
    private(set) var stagedScaling: AlignedBuffer<Scalar>?

    init(inputDimension a: Int, outputDimension o: Int) throws(KFACError) {
        inputDimension = a
        outputDimension = o
        matrixScratch = try AlignedBuffer(rows: o, columns: a)
        matrixRotated = try AlignedBuffer(rows: o, columns: a)
        batch = try AlignedBuffer(rows: o, columns: a)
    }

    var hasPending: Bool { divisor > 0 }

    private static func grown(_ b: AlignedBuffer<Scalar>?, rows: Int, columns: Int, keep: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        if let b, b.rows >= rows { return b }
        let capacity = Swift.max(rows, 2 * (b?.rows ?? 0))
        let bigger = try AlignedBuffer<Scalar>(rows: capacity, columns: columns)
        if let b, keep > 0 { bigger.base.update(from: b.base, count: keep * columns) }
        return bigger
    }

    /// Makes room for `rows` more row pairs and `examples` more matrices, and `workValues` of
    /// scratch. On error nothing changed.
    func reserve(rows: Int, matrices count: Int, workValues: Int) throws(KFACError) {
        let (a, o) = (inputDimension, outputDimension)
        let newInputs = rows > 0 ? try Self.grown(inputRows, rows: rowCount + rows, columns: a, keep: rowCount) : inputRows
        let newGradients = rows > 0 ? try Self.grown(gradientRows, rows: rowCount + rows, columns: o, keep: rowCount) : gradientRows
        let newMatrices = count > 0 ? try Self.grown(matrices, rows: matrixCount + count, columns: o * a, keep: matrixCount) : matrices
        let newWork = (work?.count ?? 0) >= workValues ? work
            : try AlignedBuffer<Scalar>(rows: 1, columns: Swift.max(workValues, 2 * (work?.count ?? 0)))
        // The rotation scratch of the step that will use these rows, so the step cannot fail on it.
        let newRotatedInputs = rows > 0 ? try Self.grown(rotatedInputs, rows: rowCount + rows, columns: a, keep: 0) : rotatedInputs
        let newRotatedGradients = rows > 0 ? try Self.grown(rotatedGradients, rows: rowCount + rows, columns: o, keep: 0) : rotatedGradients
        work = newWork
        (inputRows, gradientRows, matrices) = (newInputs, newGradients, newMatrices)
        (rotatedInputs, rotatedGradients) = (newRotatedInputs, newRotatedGradients)
    }

    /// Where the next `rows` row pairs go (after `reserve`): ā rows (a wide), g rows (o wide).
    func nextRows() -> (inputs: UnsafeMutablePointer<Scalar>, gradients: UnsafeMutablePointer<Scalar>) {
        (inputRows!.base + rowCount * inputDimension, gradientRows!.base + rowCount * outputDimension)
    }

    /// Where the next matrix goes (after `reserve`).
    func nextMatrix() -> UnsafeMutablePointer<Scalar> {
        matrices!.base + matrixCount * outputDimension * inputDimension
    }

    /// Counts what was written at `nextRows` / `nextMatrix`, and the divisor.
    func commit(rows: Int, matrices count: Int, divisor d: Int) {
        rowCount += rows
        matrixCount += count
        divisor += d
    }

    func clear() {
        rowCount = 0
        matrixCount = 0
        divisor = 0
        consumed = false
    }

    /// S_batch of the pending statistics in the bases of `inverse`, into `out` (o × a).
    func batchScaling(in inverse: EKFACInverse<Scalar>, into out: UnsafeMutablePointer<Scalar>) {
        let (a, o) = (inputDimension, outputDimension)
        let scale = 1 / Scalar(divisor)
        if rowCount > 0, let x = inputRows, let g = gradientRows, let rx = rotatedInputs, let rg = rotatedGradients {
            // Ã = X Q_A, G̃ = Γ Q_G (the bases hold Qᵀ), squared; S = (1/D) G̃²ᵀ Ã².
            BlockDiagonalProduct.right(x.base, inverse.bases.input.vectors.base, structure: inverse.inputStructure,
                                       transposed: true, into: rx.base, rows: rowCount)
            BlockDiagonalProduct.right(g.base, inverse.bases.output.vectors.base, structure: inverse.outputStructure,
                                       transposed: true, into: rg.base, rows: rowCount)
            Scalar.squareInPlace(rx.base, count: rowCount * a)
            Scalar.squareInPlace(rg.base, count: rowCount * o)
            var start = 0
            let chunk = Swift.max(1, Int(Int32.max) / Swift.max(a, o, 1))
            while start < rowCount {
                let k = Swift.min(chunk, rowCount - start)
                Scalar.gemm(transA: true, transB: false, m: o, n: a, k: k, alpha: scale, a: rg.base + start * o, lda: o,
                            b: rx.base + start * a, ldb: a, beta: start > 0 ? 1 : 0, c: out, ldc: a)
                start += k
            }
        } else {
            out.initialize(repeating: 0, count: o * a)
        }
        if matrixCount > 0, let m = matrices {
            for n in 0..<matrixCount {
                inverse.rotate(m.base + n * o * a, into: matrixRotated.base, scratch: matrixScratch.base)
                Scalar.accumulateSquares(matrixRotated.base, into: out, count: o * a, alpha: scale)
            }
        }
    }

    /// S_new = β S + (1 − β) S_batch into `out` (which may be `s`).
    func foldedScaling(_ s: UnsafePointer<Scalar>, decay: Scalar, in inverse: EKFACInverse<Scalar>,
                       into out: UnsafeMutablePointer<Scalar>) {
        let count = inputDimension * outputDimension
        if UnsafePointer(out) == s {
            batchScaling(in: inverse, into: batch.base)
            Scalar.scal(count: count, alpha: decay, x: out)
            Scalar.axpy(count: count, alpha: 1 - decay, x: batch.base, y: out)
        } else {
            batchScaling(in: inverse, into: out)
            Scalar.scal(count: count, alpha: 1 - decay, x: out)
            Scalar.axpy(count: count, alpha: decay, x: s, y: out)
        }
    }

    /// Allocates the buffer `update_factors` stages S in.
    func reserveStagedScaling() throws(KFACError) -> AlignedBuffer<Scalar> {
        if let s = stagedScaling { return s }
        let s = try AlignedBuffer<Scalar>(rows: outputDimension, columns: inputDimension)
        stagedScaling = s
        return s
    }

    // MARK: State images

    /// Writes: u64 divisor, u64 rows [rows·a input scalars, rows·o gradient scalars],
    /// u64 matrices [matrices·o·a scalars].
    func write(to w: inout StateWriter) {
        w.u64(UInt64(divisor))
        w.u64(UInt64(rowCount))
        if rowCount > 0 {
            w.scalars(inputRows!.base, count: rowCount * inputDimension)
            w.scalars(gradientRows!.base, count: rowCount * outputDimension)
        }
        w.u64(UInt64(matrixCount))
        if matrixCount > 0 { w.scalars(matrices!.base, count: matrixCount * inputDimension * outputDimension) }
    }

    /// Reads what `write` wrote into these (fresh) statistics.
    func read(from r: inout StateReader) throws(KFACError) {
        let d = try r.i64(), rows = try r.i64()
        guard d >= 1, rows >= 0, rows <= Int(Int32.max) else { throw KFACError(.corruptState, "state image has bad paired statistics") }
        try reserve(rows: rows, matrices: 0, workValues: 0)
        if rows > 0 {
            try r.scalars(into: inputRows!.base, count: rows * inputDimension)
            try r.scalars(into: gradientRows!.base, count: rows * outputDimension)
        }
        let count = try r.i64()
        guard count >= 0, count <= Int(Int32.max) else { throw KFACError(.corruptState, "state image has bad paired statistics") }
        try reserve(rows: 0, matrices: count, workValues: 0)
        if count > 0 { try r.scalars(into: matrices!.base, count: count * inputDimension * outputDimension) }
        commit(rows: rows, matrices: count, divisor: d)
    }
}
