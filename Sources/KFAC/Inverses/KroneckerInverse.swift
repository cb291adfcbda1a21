/// The inverse of one Kronecker factor in the representation of an `InverseStrategy`, block by
/// block (`FactorStructure`): each unique block is inverted once.
///
/// - `.cholesky`: `matrix` holds each block's (F_b + shift·I)⁻¹ as a full symmetric matrix,
///   formed by LAPACK potrf/potri; `values` is unused.
/// - `.eigen`: `matrix` holds each block's Qᵀ (row i is the i-th eigenvector) and `values` the
///   eigenvalues in recorded-coordinate order, negative rounding noise clamped to 0; `tileValues`
///   repeats them along the factor's coordinates. Damping is applied when preconditioning.
final class FactorInverse<Scalar: KFACScalar> {
    let strategy: InverseStrategy
    let structure: FactorStructure
    let matrix: AlignedBuffer<Scalar>
    let values: AlignedBuffer<Scalar>
    let tileValues: AlignedBuffer<Scalar>

    init(strategy: InverseStrategy, structure: FactorStructure) throws(KFACError) {
        self.strategy = strategy
        self.structure = structure
        matrix = try AlignedBuffer(rows: 1, columns: structure.storageCount)
        values = try AlignedBuffer(rows: 1, columns: strategy == .eigen ? structure.recordedWidth : 0)
        tileValues = try AlignedBuffer(rows: 1, columns: strategy == .eigen ? structure.dimension : 0)
    }

    var dimension: Int { structure.dimension }

    /// Inverts unique block `q` of the factor whose blocks are in `factor` (block storage, upper
    /// triangles). `shift` is the Tikhonov term added to the diagonal for `.cholesky` (ignored
    /// for `.eigen`). Blocks are independent: different blocks may be computed concurrently.
    func computeBlock(_ q: Int, from factor: UnsafePointer<Scalar>, shift: Scalar, workspace: EigenWorkspace<Scalar>) throws(KFACError) {
        let n = structure.uniqueSizes[q], o = structure.storageOffsets[q]
        let block = matrix.base + o
        switch strategy {
        case .cholesky:
            Scalar.copyUpperTriangle(from: factor + o, to: block, n: n, diagonalShift: shift)
            let info = Scalar.choleskyFactor(n: n, a: block)
            guard info == 0 else {
                throw KFACError(.notPositiveDefinite,
                                "damped \(n)×\(n) factor block is not positive definite (potrf info \(info)); increase the damping")
            }
            let info2 = Scalar.choleskyInverse(n: n, a: block)
            guard info2 == 0 else {
                throw KFACError(.notPositiveDefinite, "damped \(n)×\(n) factor block is singular (potri info \(info2))")
            }
            Scalar.symmetrizeFromUpper(block, n: n)
        case .eigen:
            Scalar.copyUpperTriangle(from: factor + o, to: block, n: n, diagonalShift: 0)
            try workspace.reserve(dimension: n)
            let v = values.base + structure.uniqueOffsets[q]
            let info = Scalar.symmetricEigen(n: n, a: block, values: v,
                                             work: workspace.work.base, workCount: workspace.work.count,
                                             iwork: workspace.iwork, iworkCount: workspace.iworkCount)
            guard info == 0 else {
                throw KFACError(.eigenFailed, "eigendecomposition of a \(n)×\(n) factor block failed (syevd info \(info))")
            }
            Scalar.clampNegativeToZero(v, count: n)
        }
        guard Scalar.allFinite(block, count: n * n) else {
            throw KFACError(.nonFinite, "the inverse of a \(n)×\(n) factor block is not finite; increase the damping")
        }
    }

    /// After all blocks are computed: lays the eigenvalues out along the factor's coordinates.
    func finish() {
        guard strategy == .eigen else { return }
        for k in structure.tiles.indices {
            let tile = structure.tiles[k], b = structure.uniqueSizes[tile.unique]
            (tileValues.base + tile.offset).update(from: values.base + structure.uniqueOffsets[tile.unique], count: b)
        }
    }
}

/// LAPACK workspace for eigendecompositions, one per worker thread, grown to the largest
/// block on first use and then reused.
final class EigenWorkspace<Scalar: KFACScalar> {
    private(set) var work: AlignedBuffer<Scalar>
    private(set) var iwork: UnsafeMutablePointer<Int32>
    private(set) var iworkCount = 0
    private var dimension = -1

    init() throws(KFACError) {
        work = try AlignedBuffer(rows: 1, columns: 1)
        iwork = .allocate(capacity: 1)
    }

    func reserve(dimension n: Int) throws(KFACError) {
        guard n > dimension else { return }
        let (w, iw) = Scalar.symmetricEigenWorkspace(n: n)
        guard w <= Int(Int32.max), iw <= Int(Int32.max) else {
            throw KFACError(.sizeOverflow, "the eigensolver's workspace for a \(n)×\(n) factor exceeds LAPACK's 32-bit sizes; use the Cholesky strategy")
        }
        work = try AlignedBuffer(rows: 1, columns: w)
        iwork.deallocate()
        iwork = .allocate(capacity: Swift.max(iw, 1))
        iworkCount = iw
        dimension = n
    }

    deinit { iwork.deallocate() }
}

/// The damped inverse of a whole Kronecker block A ⊗ G: one `FactorInverse` per side, of the
/// same strategy, and how they act on a gradient matrix V (out × aDim, row-major), block by block.
struct KroneckerInverse<Scalar: KFACScalar> {
    let input: FactorInverse<Scalar>
    let output: FactorInverse<Scalar>

    var strategy: InverseStrategy { input.strategy }

    init(strategy: InverseStrategy, input: FactorStructure, output: FactorStructure) throws(KFACError) {
        self.input = try FactorInverse(strategy: strategy, structure: input)
        self.output = try FactorInverse(strategy: strategy, structure: output)
    }

    /// c = v · op(M_A) where M_A is the input side's block-diagonal matrix (Mᵀ if `transposed`).
    private func multiplyInputSide(_ v: UnsafePointer<Scalar>, transposed: Bool, into c: UnsafeMutablePointer<Scalar>, rows o: Int) {
        let a = input.dimension, s = input.structure
        for t in s.tiles.indices {
            let tile = s.tiles[t], b = s.uniqueSizes[tile.unique]
            Scalar.gemm(transA: false, transB: transposed, m: o, n: b, k: b, alpha: 1, a: v + tile.offset, lda: a,
                        b: input.matrix.base + s.storageOffsets[tile.unique], ldb: b, beta: 0, c: c + tile.offset, ldc: a)
        }
    }

    /// c = op(M_G) · v where M_G is the output side's block-diagonal matrix.
    private func multiplyOutputSide(_ v: UnsafePointer<Scalar>, transposed: Bool, into c: UnsafeMutablePointer<Scalar>, columns a: Int) {
        let s = output.structure
        for t in s.tiles.indices {
            let tile = s.tiles[t], b = s.uniqueSizes[tile.unique]
            Scalar.gemm(transA: transposed, transB: false, m: b, n: a, k: b, alpha: 1,
                        a: output.matrix.base + s.storageOffsets[tile.unique], lda: b,
                        b: v + tile.offset * a, ldb: a, beta: 0, c: c + tile.offset * a, ldc: a)
        }
    }

    /// u = (damped A ⊗ G)⁻¹ v, with `scratch` of v's shape. `damping` is λ, used by `.eigen`
    /// (for `.cholesky` it was applied when the inverses were formed).
    func apply(to v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, scratch t: AlignedBuffer<Scalar>, damping: Scalar) {
        let o = output.dimension, a = input.dimension
        switch strategy {
        case .cholesky:
            // U = G⁻¹ (V A⁻¹)
            multiplyInputSide(v.base, transposed: false, into: t.base, rows: o)
            multiplyOutputSide(t.base, transposed: false, into: u.base, columns: a)
        case .eigen:
            // U = Q_G [(Q_Gᵀ V Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ; the blocks hold Q_Gᵀ and Q_Aᵀ.
            multiplyInputSide(v.base, transposed: true, into: t.base, rows: o)
            multiplyOutputSide(t.base, transposed: false, into: u.base, columns: a)
            Scalar.divideByEigenvalueGrid(u.base, rows: o, columns: a, outputValues: output.tileValues.base,
                                          inputValues: input.tileValues.base, damping: damping)
            multiplyInputSide(u.base, transposed: false, into: t.base, rows: o)
            multiplyOutputSide(t.base, transposed: true, into: u.base, columns: a)
        }
    }
}
