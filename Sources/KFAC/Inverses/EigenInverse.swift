/// Tests only: 1 makes the first eigensolver attempt of every block fail, 2 the retry too.
enum EigenFaultInjection {
    nonisolated(unsafe) static var failingAttempts = 0
}

/// Exact damping through eigendecompositions (LAPACK syevd): each side holds its blocks' Qᵀ
/// (row i is the i-th eigenvector) and the eigenvalues in recorded-coordinate order, negative
/// rounding noise clamped to 0, also laid out along the factor's coordinates. λ is applied when
/// multiplying: U = Q_G [(Q_Gᵀ V Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ.
///
/// State-image section: per side (input, then output) the eigenvector blocks (block storage),
/// then the eigenvalues (recorded width).
final class EigenInverse<Scalar: KFACScalar>: KroneckerInverse {
    static var strategy: InverseStrategy { .eigen }
    static var dampingIsBakedIn: Bool { false }

    /// One side's eigendecomposition (also the bases of `EKFACInverse`).
    struct Side {
        let structure: FactorStructure
        let vectors: AlignedBuffer<Scalar>
        let values: AlignedBuffer<Scalar>
        /// `values` repeated along the factor's coordinates (tiles).
        let tileValues: AlignedBuffer<Scalar>

        init(_ structure: FactorStructure) throws(KFACError) {
            self.structure = structure
            vectors = try AlignedBuffer(rows: 1, columns: structure.storageCount)
            values = try AlignedBuffer(rows: 1, columns: structure.recordedWidth)
            tileValues = try AlignedBuffer(rows: 1, columns: structure.dimension)
        }

        func layOutTileValues() {
            for k in structure.tiles.indices {
                let tile = structure.tiles[k], b = structure.uniqueSizes[tile.unique]
                (tileValues.base + tile.offset).update(from: values.base + structure.uniqueOffsets[tile.unique], count: b)
            }
        }
    }

    let input: Side
    let output: Side

    var inputStructure: FactorStructure { input.structure }
    var outputStructure: FactorStructure { output.structure }

    static func damping(_ lambda: Double, pi: () -> Scalar) -> KroneckerDamping<Scalar> {
        .exact(Scalar(lambda))
    }

    init(input: FactorStructure, output: FactorStructure) throws(KFACError) {
        self.input = try Side(input)
        self.output = try Side(output)
    }

    func computeBlock(_ sideName: FactorSide, _ q: Int, from factor: UnsafePointer<Scalar>, shift: Scalar,
                      workspace: EigenWorkspace<Scalar>) throws(KFACError) {
        let side = sideName == .input ? input : output
        let structure = side.structure
        let n = structure.uniqueSizes[q], o = structure.storageOffsets[q]
        let block = side.vectors.base + o
        Scalar.copyUpperTriangle(from: factor + o, to: block, n: n, diagonalShift: 0)
        try workspace.reserve(dimension: n)
        let v = side.values.base + structure.uniqueOffsets[q]
        var info = Scalar.symmetricEigen(n: n, a: block, values: v,
                                         work: workspace.work.base, workCount: workspace.work.count,
                                         iwork: workspace.iwork, iworkCount: workspace.iworkCount)
        if EigenFaultInjection.failingAttempts >= 1 { info = 1 }
        let first = info
        if info != 0 || !Scalar.allFinite(v, count: n) || !Scalar.allFinite(block, count: n * n) {
            // Retry in double precision with another driver; if that fails too, the step (or
            // update) fails with EIGEN_FAILED and the committed inverse stays.
            info = Scalar.symmetricEigenInDouble(n: n, source: factor + o, vectors: block, values: v)
            if EigenFaultInjection.failingAttempts >= 2 { info = 1 }
        }
        guard info == 0 else {
            throw KFACError(.eigenFailed, "eigendecomposition of a \(n)×\(n) factor block failed (syevd info \(first), then in double precision with syev info \(info)); the previous inverses are kept")
        }
        Scalar.clampNegativeToZero(v, count: n)
    }

    func finish() {
        input.layOutTileValues()
        output.layOutTileValues()
    }

    func multiplyInverse(_ v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, scratch t: AlignedBuffer<Scalar>,
                         damping: Scalar) {
        let o = output.structure.dimension, a = input.structure.dimension
        // U = Q_G [(Q_Gᵀ V Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ; the blocks hold Q_Gᵀ and Q_Aᵀ.
        BlockDiagonalProduct.right(v.base, input.vectors.base, structure: input.structure, transposed: true, into: t.base, rows: o)
        BlockDiagonalProduct.left(t.base, output.vectors.base, structure: output.structure, transposed: false, into: u.base, columns: a)
        Scalar.divideByEigenvalueGrid(u.base, rows: o, columns: a, outputValues: output.tileValues.base,
                                      inputValues: input.tileValues.base, damping: damping)
        BlockDiagonalProduct.right(u.base, input.vectors.base, structure: input.structure, transposed: false, into: t.base, rows: o)
        BlockDiagonalProduct.left(t.base, output.vectors.base, structure: output.structure, transposed: true, into: u.base, columns: a)
    }

    func write(to w: inout StateWriter) {
        // (Two calls rather than a loop over [input, output]: an array literal allocates in
        // debug builds, and the distributed exchange writes images every inverse step.)
        for s in 0..<2 {
            let side = s == 0 ? input : output
            w.scalars(side.vectors.base, count: side.vectors.count)
            w.scalars(side.values.base, count: side.values.count)
        }
    }

    func read(from r: inout StateReader) throws(KFACError) {
        for s in 0..<2 {
            let side = s == 0 ? input : output
            try r.scalars(into: side.vectors.base, count: side.vectors.count)
            try r.scalars(into: side.values.base, count: side.values.count)
        }
        finish()
    }

    /// Orthonormal eigenvectors (every entry at most 1 in magnitude) and eigenvalues clamped to
    /// be non-negative, all finite.
    func validateLoaded() throws(KFACError) {
        for side in [input, output] {
            guard Scalar.allFinite(side.vectors.base, count: side.vectors.count),
                  Double(Scalar.largestMagnitude(side.vectors.base, count: side.vectors.count)) <= 1.001,
                  Scalar.allFinite(side.values.base, count: side.values.count),
                  (0..<side.values.count).allSatisfy({ side.values.base[$0] >= 0 }) else {
                throw KFACError(.corruptState, "state image has an eigendecomposition that is not finite, not orthonormal or has negative eigenvalues")
            }
        }
    }

    static func imageScalarCount(input: FactorStructure, output: FactorStructure) -> Int {
        input.storageCount + input.recordedWidth + output.storageCount + output.recordedWidth
    }

    /// Per side its eigenvector blocks (b×b at the storage offset), then its eigenvalues (b at
    /// the unique offset).
    func unitRanges(_ side: FactorSide, _ q: Int) -> InverseUnitRanges? {
        let structure = side == .input ? input.structure : output.structure
        let base = side == .input ? 0 : input.structure.storageCount + input.structure.recordedWidth
        let b = structure.uniqueSizes[q]
        let vectors = base + structure.storageOffsets[q], values = base + structure.storageCount + structure.uniqueOffsets[q]
        return InverseUnitRanges(vectors..<vectors + b * b, values..<values + b)
    }
}
