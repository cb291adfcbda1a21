/// EKFAC's pending per-example gradients of one Kronecker block, recorded by paired record
/// calls since they were last used, in the block's own coordinates (a = input dimension,
/// o = output dimension; SUA's offset-major order), in one of two forms:
/// - `rows`: pairs (ā_r, g_r), in segments of examples of `unit` consecutive rows each; an
///   example's gradient is G_n = Σ_{r in n} g_r ā_rᵀ (unit 1: one row per example, or per-row
///   mode where every row or position counts as an example);
/// - `matrices`: whole per-example gradients G_n (o × a), when an example has so many rows that
///   rotating them would cost more than rotating G_n: unit·(o² + a²) > o·a·(o + a)
///   (`prefersMatrices`; convolutions with many positions);
/// and the divisor D: the rows of dense calls, the examples of convolution calls.
///
/// They are kept rather than summed because S is a second moment in the bases in force at the
/// step, which may be new bases computed at that very step. For given bases Q_A, Q_G:
///
///     S_batch = (1/D) Σ_n (Q_Gᵀ G_n Q_A)^{∘2}
///
/// rows: Ã = X Q_A and G̃ = Γ Q_G for all rows at once, then per example (G̃_nᵀ Ã_n)^{∘2}, or for
/// unit 1 (G̃^{∘2})ᵀ (Ã^{∘2}) in one gemm; matrices: two block products per example.
/// Buffers grow geometrically and are kept, so a steady batch stops allocating.
final class PairedStatistics<Scalar: KFACScalar> {
    let inputDimension: Int
    let outputDimension: Int
    private(set) var rowCount = 0
    /// Consecutive runs of rows whose examples have `unit` rows each.
    struct Segment: Equatable {
        var start: Int
        var count: Int
        var unit: Int
    }
    private(set) var segments: [Segment] = []
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
        segments.reserveCapacity(16)
        matrixScratch = try AlignedBuffer(rows: o, columns: a)
        matrixRotated = try AlignedBuffer(rows: o, columns: a)
        batch = try AlignedBuffer(rows: o, columns: a)
    }

    var hasPending: Bool { divisor > 0 }

    /// A bound on every entry of the unscaled sum Σ_n (Q_Gᵀ G_n Q_A)^∘2 that S_batch is formed
    /// from (BLAS applies the 1/divisor after summing): the sum of the record calls' bounds
    /// since the statistics were last cleared, or after a load Σ_n ‖G_n‖_F² of the kept
    /// examples. Paired calls refuse data that would take it past `KroneckerFactor.pendingLimit`,
    /// so the sum stays finite however many calls it spans (issue 15).
    private(set) var pendingMagnitude = 0.0

    /// Adds a paired call's bound to `pendingMagnitude` (after the call recorded its rows).
    func notePending(magnitude: Double) {
        pendingMagnitude += magnitude
    }

    /// Whether examples of `unit` rows are cheaper kept as matrices than as rows.
    func prefersMatrices(unit: Int) -> Bool {
        let (a, o) = (Double(inputDimension), Double(outputDimension))
        return unit > 1 && Double(unit) * (o * o + a * a) > o * a * (o + a)
    }

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
        if rows > 0 && segments.count == segments.capacity { segments.reserveCapacity(2 * segments.capacity) }
    }

    /// Where the next `rows` row pairs go (after `reserve`): ā rows (a wide), g rows (o wide).
    func nextRows() -> (inputs: UnsafeMutablePointer<Scalar>, gradients: UnsafeMutablePointer<Scalar>) {
        (inputRows!.base + rowCount * inputDimension, gradientRows!.base + rowCount * outputDimension)
    }

    /// Where the next matrix goes (after `reserve`).
    func nextMatrix() -> UnsafeMutablePointer<Scalar> {
        matrices!.base + matrixCount * outputDimension * inputDimension
    }

    /// Counts what was written at `nextRows` (in examples of `unit` rows) / `nextMatrix`, and the
    /// divisor. A new segment needs the capacity `reserve` made (at most one per call).
    func commit(rows: Int, unit: Int = 1, matrices count: Int, divisor d: Int) {
        if rows > 0 {
            // (Indexing rather than `segments.last`, which allocates in debug builds.)
            let n = segments.count
            if n > 0, segments[n - 1].unit == unit, segments[n - 1].start + segments[n - 1].count == rowCount {
                segments[n - 1] = Segment(start: segments[n - 1].start, count: segments[n - 1].count + rows, unit: unit)
            } else {
                segments.append(Segment(start: rowCount, count: rows, unit: unit))
            }
        }
        rowCount += rows
        matrixCount += count
        divisor += d
    }

    func clear() {
        pendingMagnitude = 0
        rowCount = 0
        matrixCount = 0
        divisor = 0
        consumed = false
        segments.removeAll(keepingCapacity: true)
    }

    /// The pending examples' divisor (rows or examples) for S_batch; 0 when none are pending.
    var pendingDivisor: Int { divisor }

    /// S_batch of the pending statistics in the bases of `inverse`, into `out` (o × a); with
    /// `unscaled`, the sum Σ_n (Q_Gᵀ G_n Q_A)^∘2 itself (the distributed exchange divides the
    /// ranks' summed sums by their summed divisors).
    func batchScaling(in inverse: EKFACInverse<Scalar>, into out: UnsafeMutablePointer<Scalar>, unscaled: Bool = false) {
        let (a, o) = (inputDimension, outputDimension)
        let scale = unscaled ? 1 : 1 / Scalar(divisor)
        out.initialize(repeating: 0, count: o * a)
        if rowCount > 0, let x = inputRows, let g = gradientRows, let rx = rotatedInputs, let rg = rotatedGradients {
            // Ã = X Q_A, G̃ = Γ Q_G (the bases hold Qᵀ).
            BlockDiagonalProduct.right(x.base, inverse.bases.input.vectors.base, structure: inverse.inputStructure,
                                       transposed: true, into: rx.base, rows: rowCount)
            BlockDiagonalProduct.right(g.base, inverse.bases.output.vectors.base, structure: inverse.outputStructure,
                                       transposed: true, into: rg.base, rows: rowCount)
            // Examples of several rows: (G̃_nᵀ Ã_n)^∘2 each.
            var singles = false
            for k in segments.indices {
                let segment = segments[k]
                guard segment.unit > 1 else { singles = true; continue }
                for first in stride(from: segment.start, to: segment.start + segment.count, by: segment.unit) {
                    Scalar.gemm(transA: true, transB: false, m: o, n: a, k: segment.unit, alpha: 1, a: rg.base + first * o, lda: o,
                                b: rx.base + first * a, ldb: a, beta: 0, c: matrixRotated.base, ldc: a)
                    Scalar.accumulateSquares(matrixRotated.base, into: out, count: o * a, alpha: scale)
                }
            }
            // Examples of one row: (G̃^∘2)ᵀ (Ã^∘2) over each such segment's rows.
            if singles {
                Scalar.squareInPlace(rx.base, count: rowCount * a)
                Scalar.squareInPlace(rg.base, count: rowCount * o)
                let chunk = Swift.max(1, Int(Int32.max) / Swift.max(a, o, 1))
                for k in segments.indices where segments[k].unit == 1 {
                    var start = segments[k].start
                    let end = start + segments[k].count
                    while start < end {
                        let rows = Swift.min(chunk, end - start)
                        Scalar.gemm(transA: true, transB: false, m: o, n: a, k: rows, alpha: scale, a: rg.base + start * o, lda: o,
                                    b: rx.base + start * a, ldb: a, beta: 1, c: out, ldc: a)
                        start += rows
                    }
                }
            }
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

    /// Σ x², in Double (finite for any finite Scalar data of the sizes a layer has).
    private static func squaredNorm(_ x: UnsafePointer<Scalar>, count: Int) -> Double {
        var sum = 0.0
        for i in 0..<count { let v = Double(x[i]); sum += v * v }
        return sum
    }

    // MARK: State images

    /// Writes: u64 divisor, u64 rows [rows·a input scalars, rows·o gradient scalars], u64
    /// segments [per segment: u64 rows, u64 rows per example], u64 matrices [matrices·o·a scalars].
    func write(to w: inout StateWriter) {
        w.u64(UInt64(divisor))
        w.u64(UInt64(rowCount))
        if rowCount > 0 {
            w.scalars(inputRows!.base, count: rowCount * inputDimension)
            w.scalars(gradientRows!.base, count: rowCount * outputDimension)
        }
        w.u64(UInt64(segments.count))
        for k in segments.indices {
            w.u64(UInt64(segments[k].count))
            w.u64(UInt64(segments[k].unit))
        }
        w.u64(UInt64(matrixCount))
        if matrixCount > 0 { w.scalars(matrices!.base, count: matrixCount * inputDimension * outputDimension) }
    }

    /// Reads what `write` wrote into these (fresh) statistics.
    func read(from r: inout StateReader) throws(KFACError) {
        let d = try r.i64(), rows = try r.i64()
        guard d >= 1, rows >= 0, rows <= Int(Int32.max) else { throw KFACError(.corruptState, "state image has bad paired statistics") }
        try r.ensureRemaining(rows, of: Scalar.self, values: inputDimension + outputDimension)
        try reserve(rows: rows, matrices: 0, workValues: 0)
        if rows > 0 {
            try r.scalars(into: inputRows!.base, count: rows * inputDimension)
            try r.scalars(into: gradientRows!.base, count: rows * outputDimension)
        }
        let segmentCount = try r.i64()
        guard segmentCount >= 0, segmentCount <= rows else { throw KFACError(.corruptState, "state image has bad paired statistics") }
        var read: [Segment] = []
        var start = 0
        for _ in 0..<segmentCount {
            let (n, unit) = (try r.i64(), try r.i64())
            guard n >= 1, unit >= 1, n % unit == 0, start + n <= rows else {
                throw KFACError(.corruptState, "state image has bad paired statistics")
            }
            read.append(Segment(start: start, count: n, unit: unit))
            start += n
        }
        guard start == rows else { throw KFACError(.corruptState, "state image has bad paired statistics") }
        let count = try r.i64()
        guard count >= 0, count <= Int(Int32.max) else { throw KFACError(.corruptState, "state image has bad paired statistics") }
        try r.ensureRemaining(count, of: Scalar.self, values: inputDimension * outputDimension)
        try reserve(rows: 0, matrices: count, workValues: 0)
        if count > 0 { try r.scalars(into: matrices!.base, count: count * inputDimension * outputDimension) }
        // Finite values only (issue 15): a NaN here would poison S at the next fold.
        guard rows == 0 || (Scalar.allFinite(inputRows!.base, count: rows * inputDimension)
                            && Scalar.allFinite(gradientRows!.base, count: rows * outputDimension)),
              count == 0 || Scalar.allFinite(matrices!.base, count: count * inputDimension * outputDimension) else {
            throw KFACError(.corruptState, "state image has paired statistics that are not finite")
        }
        // The kept examples' own bound (‖G_n‖_F ≤ Σ_t ‖g_t‖ ‖x_t‖; rotations keep the norm): at
        // most what the record calls that kept them accepted, so an image the API wrote passes.
        var magnitude = 0.0
        for segment in read {
            for first in stride(from: segment.start, to: segment.start + segment.count, by: segment.unit) {
                var norm = 0.0
                for t in first..<(first + segment.unit) {
                    norm += (Self.squaredNorm(inputRows!.base + t * inputDimension, count: inputDimension)
                             * Self.squaredNorm(gradientRows!.base + t * outputDimension, count: outputDimension)).squareRoot()
                }
                magnitude += norm * norm
            }
        }
        for n in 0..<count { magnitude += Self.squaredNorm(matrices!.base + n * inputDimension * outputDimension, count: inputDimension * outputDimension) }
        guard magnitude <= KroneckerFactor<Scalar>.pendingLimit else {
            throw KFACError(.corruptState, "state image has paired statistics larger than the paired calls accept")
        }
        pendingMagnitude = magnitude
        segments = read
        segments.reserveCapacity(16)
        rowCount = rows
        matrixCount = count
        divisor = d
    }
}
