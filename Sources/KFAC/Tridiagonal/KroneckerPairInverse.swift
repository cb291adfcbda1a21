/// The inverse of a sum of two Kronecker products, A ⊗ G + σ C ⊗ D (σ = ±1), by Martens &
/// Grosse's eq. 8 (seed 001): A (input side, m×m) and G (output side, n×n) symmetric positive
/// definite, C and D symmetric. The generalized symmetric-definite eigenproblems C x = s A x and
/// D y = t G y (LAPACK sygvd) give K_A, K_G with K_Aᵀ A K_A = I, K_Aᵀ C K_A = diag(s) (and the
/// same for G, D, t), so that
///
///     (A ⊗ G + σ C ⊗ D)⁻¹ = (K_A ⊗ K_G) (I + σ s ⊗ t)⁻¹ (K_A ⊗ K_G)ᵀ.
///
/// On gradient-shaped matrices W (n×m, A ⊗ G acting as W ↦ G W A) the product is
/// Z = K_G [(K_Gᵀ W K_A) ⊘ (1 + σ t sᵀ)] K_Aᵀ: four gemms.
///
/// The matrix is positive definite exactly when every 1 + σ t_i s_j > 0; `finish` refuses
/// (`.notPositiveDefinite`) when some 1 + σ t_i s_j is below `minimumDenominator`.
final class KroneckerPairInverse<Scalar: KFACScalar> {
    let inputDimension: Int
    let outputDimension: Int
    /// Row i is the i-th generalized eigenvector (K_Aᵀ, K_Gᵀ row-major), and the eigenvalues.
    let inputVectors: AlignedBuffer<Scalar>
    let inputValues: AlignedBuffer<Scalar>
    let outputVectors: AlignedBuffer<Scalar>
    let outputValues: AlignedBuffer<Scalar>
    /// 1 / (1 + σ t_i s_j), n×m.
    let scale: AlignedBuffer<Scalar>

    init(inputDimension m: Int, outputDimension n: Int) throws(KFACError) {
        inputDimension = m
        outputDimension = n
        inputVectors = try AlignedBuffer(rows: m, columns: m)
        inputValues = try AlignedBuffer(rows: 1, columns: m)
        outputVectors = try AlignedBuffer(rows: n, columns: n)
        outputValues = try AlignedBuffer(rows: 1, columns: n)
        scale = try AlignedBuffer(rows: n, columns: m)
    }

    /// Every buffer, in state-image order.
    var buffers: [AlignedBuffer<Scalar>] { [inputVectors, inputValues, outputVectors, outputValues, scale] }

    /// Solves one side's problem: `other` x = λ `factor` x, both full symmetric (row-major),
    /// `factor` positive definite. `factorScratch` (at least d×d) is overwritten.
    func computeSide(_ side: FactorSide, factor: UnsafePointer<Scalar>, other: UnsafePointer<Scalar>,
                     factorScratch: UnsafeMutablePointer<Scalar>, workspace: EigenWorkspace<Scalar>) throws(KFACError) {
        let (d, vectors, values) = side == .input ? (inputDimension, inputVectors, inputValues)
                                                  : (outputDimension, outputVectors, outputValues)
        try workspace.reserve(dimension: d)
        vectors.base.update(from: other, count: d * d)
        factorScratch.update(from: factor, count: d * d)
        let info = Scalar.generalizedSymmetricEigen(n: d, a: vectors.base, b: factorScratch, values: values.base,
                                                    work: workspace.work.base, workCount: workspace.work.count,
                                                    iwork: workspace.iwork, iworkCount: workspace.iworkCount)
        if info > Int32(d) {
            throw KFACError(.notPositiveDefinite, "damped \(d)×\(d) factor is not positive definite (sygvd info \(info)); increase the damping")
        }
        guard info == 0 else {
            throw KFACError(info < 0 ? .internal : .eigenFailed, "the generalized eigensolver failed on a \(d)×\(d) factor (sygvd info \(info))")
        }
    }

    /// After both sides: the scale grid 1 / (1 + σ t_i s_j); throws `.notPositiveDefinite` if
    /// some denominator is below `minimumDenominator` (or not finite).
    func finish(sign: Scalar, minimumDenominator: Scalar) throws(KFACError) {
        let (m, n) = (inputDimension, outputDimension)
        var smallest = Scalar.infinity
        for i in 0..<n {
            let t = sign * outputValues.base[i]
            for j in 0..<m {
                let denominator = 1 + t * inputValues.base[j]
                smallest = Swift.min(smallest, denominator)
                scale.base[i * m + j] = 1 / denominator
            }
        }
        guard smallest.isFinite, smallest >= minimumDenominator else {
            throw KFACError(.notPositiveDefinite, "A ⊗ G \(sign < 0 ? "−" : "+") C ⊗ D is not positive definite (smallest 1 \(sign < 0 ? "−" : "+") s·t is \(smallest)); increase the damping")
        }
    }

    /// z = (A ⊗ G + σ C ⊗ D)⁻¹ w for n×m row-major w; `scratch` n×m; w, z, scratch distinct.
    func apply(_ w: UnsafePointer<Scalar>, into z: UnsafeMutablePointer<Scalar>, scratch: UnsafeMutablePointer<Scalar>) {
        let (m, n) = (inputDimension, outputDimension)
        // K_Gᵀ W K_A
        Scalar.gemm(transA: false, transB: false, m: n, n: m, k: n, alpha: 1, a: outputVectors.base, lda: n,
                    b: w, ldb: m, beta: 0, c: scratch, ldc: m)
        Scalar.gemm(transA: false, transB: true, m: n, n: m, k: m, alpha: 1, a: scratch, lda: m,
                    b: inputVectors.base, ldb: m, beta: 0, c: z, ldc: m)
        for i in 0..<(n * m) { z[i] *= scale.base[i] }
        // K_G (·) K_Aᵀ
        Scalar.gemm(transA: true, transB: false, m: n, n: m, k: n, alpha: 1, a: outputVectors.base, lda: n,
                    b: z, ldb: m, beta: 0, c: scratch, ldc: m)
        Scalar.gemm(transA: false, transB: false, m: n, n: m, k: m, alpha: 1, a: scratch, lda: m,
                    b: inputVectors.base, ldb: m, beta: 0, c: z, ldc: m)
    }
}
