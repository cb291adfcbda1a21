/// The inverse of one Kronecker factor in the representation of an `InverseStrategy`:
///
/// - `.cholesky`: `matrix` holds (F + shift·I)⁻¹ as a full symmetric matrix, formed by LAPACK
///   potrf/potri; `values` is unused.
/// - `.eigen`: `matrix` holds Qᵀ (row i is the i-th eigenvector of F) and `values` the
///   eigenvalues, negative rounding noise clamped to 0; damping is applied when preconditioning.
final class FactorInverse<Scalar: KFACScalar> {
    let strategy: InverseStrategy
    let dimension: Int
    let matrix: Matrix<Scalar>
    let values: Matrix<Scalar>

    init(strategy: InverseStrategy, dimension: Int) throws(KFACError) {
        self.strategy = strategy
        self.dimension = dimension
        matrix = try Matrix(rows: dimension, columns: dimension)
        values = try Matrix(rows: 1, columns: strategy == .eigen ? dimension : 0)
    }

    /// Computes the inverse of the factor whose upper triangle is in `factor`. `shift` is the
    /// Tikhonov term added to the diagonal for `.cholesky` (ignored for `.eigen`).
    func compute(from factor: UnsafePointer<Scalar>, shift: Scalar, workspace: EigenWorkspace<Scalar>) throws(KFACError) {
        let n = dimension
        switch strategy {
        case .cholesky:
            Scalar.copyUpperTriangle(from: factor, to: matrix.base, n: n, diagonalShift: shift)
            let info = Scalar.choleskyFactor(n: n, a: matrix.base)
            guard info == 0 else {
                throw KFACError(.notPositiveDefinite,
                                "damped \(n)×\(n) factor is not positive definite (potrf info \(info)); increase the damping")
            }
            let info2 = Scalar.choleskyInverse(n: n, a: matrix.base)
            guard info2 == 0 else {
                throw KFACError(.notPositiveDefinite, "damped \(n)×\(n) factor is singular (potri info \(info2))")
            }
            Scalar.symmetrizeFromUpper(matrix.base, n: n)
        case .eigen:
            Scalar.copyUpperTriangle(from: factor, to: matrix.base, n: n, diagonalShift: 0)
            try workspace.reserve(dimension: n)
            let info = Scalar.symmetricEigen(n: n, a: matrix.base, values: values.base,
                                             work: workspace.work.base, workCount: workspace.work.count,
                                             iwork: workspace.iwork, iworkCount: workspace.iworkCount)
            guard info == 0 else {
                throw KFACError(.eigenFailed, "eigendecomposition of a \(n)×\(n) factor failed (syevd info \(info))")
            }
            Scalar.clampNegativeToZero(values.base, count: n)
        }
        guard Scalar.allFinite(matrix.base, count: n * n) else {
            throw KFACError(.nonFinite, "the inverse of a \(n)×\(n) factor is not finite; increase the damping")
        }
    }
}

/// LAPACK workspace for eigendecompositions, one per worker thread, grown to the largest
/// factor on first use and then reused.
final class EigenWorkspace<Scalar: KFACScalar> {
    private(set) var work: Matrix<Scalar>
    private(set) var iwork: UnsafeMutablePointer<Int32>
    private(set) var iworkCount = 0
    private var dimension = -1

    init() throws(KFACError) {
        work = try Matrix(rows: 1, columns: 1)
        iwork = .allocate(capacity: 1)
    }

    func reserve(dimension n: Int) throws(KFACError) {
        guard n > dimension else { return }
        let (w, iw) = Scalar.symmetricEigenWorkspace(n: n)
        guard w <= Int(Int32.max), iw <= Int(Int32.max) else {
            throw KFACError(.sizeOverflow, "the eigensolver's workspace for a \(n)×\(n) factor exceeds LAPACK's 32-bit sizes; use the Cholesky strategy")
        }
        work = try Matrix(rows: 1, columns: w)
        iwork.deallocate()
        iwork = .allocate(capacity: Swift.max(iw, 1))
        iworkCount = iw
        dimension = n
    }

    deinit { iwork.deallocate() }
}

/// The damped inverse of a whole Kronecker block A ⊗ G: one `FactorInverse` per side, of the
/// same strategy, and how they act on a gradient matrix V (out × aDim, row-major).
struct KroneckerInverse<Scalar: KFACScalar> {
    let input: FactorInverse<Scalar>
    let output: FactorInverse<Scalar>

    var strategy: InverseStrategy { input.strategy }

    init(strategy: InverseStrategy, inputDimension: Int, outputDimension: Int) throws(KFACError) {
        input = try FactorInverse(strategy: strategy, dimension: inputDimension)
        output = try FactorInverse(strategy: strategy, dimension: outputDimension)
    }

    /// u = (damped A ⊗ G)⁻¹ v, with `scratch` of v's shape. `damping` is λ, used by `.eigen`
    /// (for `.cholesky` it was applied when the inverses were formed).
    func apply(to v: Matrix<Scalar>, into u: Matrix<Scalar>, scratch t: Matrix<Scalar>, damping: Scalar) {
        let o = output.dimension, a = input.dimension
        switch strategy {
        case .cholesky:
            // U = G⁻¹ (V A⁻¹)
            Scalar.gemm(transA: false, transB: false, m: o, n: a, k: a, alpha: 1, a: v.base, lda: a,
                        b: input.matrix.base, ldb: a, beta: 0, c: t.base, ldc: a)
            Scalar.gemm(transA: false, transB: false, m: o, n: a, k: o, alpha: 1, a: output.matrix.base, lda: o,
                        b: t.base, ldb: a, beta: 0, c: u.base, ldc: a)
        case .eigen:
            // U = Q_G [(Q_Gᵀ V Q_A) ⊘ (d_G d_Aᵀ + λ)] Q_Aᵀ; the matrices hold Q_Gᵀ and Q_Aᵀ.
            Scalar.gemm(transA: false, transB: true, m: o, n: a, k: a, alpha: 1, a: v.base, lda: a,
                        b: input.matrix.base, ldb: a, beta: 0, c: t.base, ldc: a)
            Scalar.gemm(transA: false, transB: false, m: o, n: a, k: o, alpha: 1, a: output.matrix.base, lda: o,
                        b: t.base, ldb: a, beta: 0, c: u.base, ldc: a)
            Scalar.divideByEigenvalueGrid(u.base, rows: o, columns: a, outputValues: output.values.base,
                                   inputValues: input.values.base, damping: damping)
            Scalar.gemm(transA: false, transB: false, m: o, n: a, k: a, alpha: 1, a: u.base, lda: a,
                        b: input.matrix.base, ldb: a, beta: 0, c: t.base, ldc: a)
            Scalar.gemm(transA: true, transB: false, m: o, n: a, k: o, alpha: 1, a: output.matrix.base, lda: o,
                        b: t.base, ldb: a, beta: 0, c: u.base, ldc: a)
        }
    }
}
