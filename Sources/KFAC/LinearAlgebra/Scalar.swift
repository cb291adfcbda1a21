import CBLAS
import CLAPACKE

/// A floating-point type the library computes in: `Float` or `Double`.
///
/// The requirements are the BLAS and LAPACK kernels the library needs, each bound to the
/// `s`- or `d`-prefixed routine of OpenBLAS/LAPACKE. Matrices are row-major unless a
/// requirement says otherwise; for the symmetric LAPACK routines row- and column-major storage
/// are the same matrix, so they are called column-major to avoid LAPACKE's transposing copies.
public protocol KFACScalar: BinaryFloatingPoint, Sendable {
    /// The `kfac_dtype` code of the type (1 = float32, 2 = float64).
    static var dtypeCode: Int32 { get }

    /// `c = alpha * op(a) * op(b) + beta * c`, with op(a) m×k and op(b) k×n, row-major.
    static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Self, a: UnsafePointer<Self>, lda: Int, b: UnsafePointer<Self>, ldb: Int,
        beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)

    /// `c = alpha * a * b + beta * c` (`aOnLeft`) or `c = alpha * b * a + beta * c`, c m×n
    /// row-major, a symmetric and read from its upper triangle only (row-major).
    static func symm(
        aOnLeft: Bool, m: Int, n: Int, alpha: Self, a: UnsafePointer<Self>, lda: Int,
        b: UnsafePointer<Self>, ldb: Int, beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)

    /// The upper triangle (row-major) of `c = alpha * aᵀ a + beta * c`, a k×n row-major.
    static func syrkTransposed(
        n: Int, k: Int, alpha: Self, a: UnsafePointer<Self>, lda: Int,
        beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)

    /// The upper triangle (row-major) of `c = alpha * a aᵀ + beta * c`, a n×k row-major.
    static func syrk(
        n: Int, k: Int, alpha: Self, a: UnsafePointer<Self>, lda: Int,
        beta: Self, c: UnsafeMutablePointer<Self>, ldc: Int)

    /// `y = alpha * A x` (trans false) or `y = alpha * Aᵀ x` (trans true) plus `beta * y`, A m×n
    /// row-major, y with stride incY.
    static func gemv(
        trans: Bool, m: Int, n: Int, alpha: Self, a: UnsafePointer<Self>, lda: Int,
        x: UnsafePointer<Self>, beta: Self, y: UnsafeMutablePointer<Self>, incY: Int)

    /// `x *= alpha`.
    static func scal(count: Int, alpha: Self, x: UnsafeMutablePointer<Self>)

    /// `y += alpha * x`.
    static func axpy(count: Int, alpha: Self, x: UnsafePointer<Self>, y: UnsafeMutablePointer<Self>)

    /// Σ x_i y_i.
    static func dot(count: Int, x: UnsafePointer<Self>, y: UnsafePointer<Self>) -> Self

    /// Cholesky factorisation of the n×n symmetric matrix in `a` (LAPACK potrf). Returns the
    /// LAPACK info: 0 on success, > 0 if not positive definite.
    static func choleskyFactor(n: Int, a: UnsafeMutablePointer<Self>) -> Int32

    /// Inverse from the Cholesky factor of `choleskyFactor` (LAPACK potri); only one triangle
    /// of the result is written.
    static func choleskyInverse(n: Int, a: UnsafeMutablePointer<Self>) -> Int32

    /// Workspace sizes of `symmetricEigen` for order n (LAPACK syevd query).
    static func symmetricEigenWorkspace(n: Int) -> (work: Int, iwork: Int)

    /// Eigendecomposition of the n×n symmetric matrix in `a` (LAPACK syevd, jobz = V). On
    /// return `values` holds the ascending eigenvalues and `a`, read row-major, holds Qᵀ: row i
    /// is the i-th eigenvector.
    static func symmetricEigen(
        n: Int, a: UnsafeMutablePointer<Self>, values: UnsafeMutablePointer<Self>,
        work: UnsafeMutablePointer<Self>, workCount: Int,
        iwork: UnsafeMutablePointer<Int32>, iworkCount: Int) -> Int32

    /// The generalized symmetric-definite eigenproblem a x = λ b x (LAPACK sygvd, itype 1,
    /// jobz = V), a and b n×n symmetric (one triangle read). On return `values` holds the
    /// ascending λ and `a`, read row-major, holds Xᵀ (row i is the i-th eigenvector), with
    /// Xᵀ b X = I and Xᵀ a X = diag(λ); `b` holds its Cholesky factor. Returns the LAPACK info:
    /// 0 on success, n + i if b is not positive definite, 1…n if the eigensolver failed. The
    /// workspace of `symmetricEigenWorkspace` suffices.
    static func generalizedSymmetricEigen(
        n: Int, a: UnsafeMutablePointer<Self>, b: UnsafeMutablePointer<Self>, values: UnsafeMutablePointer<Self>,
        work: UnsafeMutablePointer<Self>, workCount: Int,
        iwork: UnsafeMutablePointer<Int32>, iworkCount: Int) -> Int32

    /// True when none of the `count` values is NaN or ±Inf.
    static func allFinite(_ x: UnsafePointer<Self>, count: Int) -> Bool

    /// The largest |x_i|, or +Inf if any value is NaN or ±Inf (0 for count 0).
    static func largestMagnitude(_ x: UnsafePointer<Self>, count: Int) -> Self

    // Element kernels, implemented once in LinearAlgebra.swift.
    static func symmetrizeFromUpper(_ m: UnsafeMutablePointer<Self>, n: Int)
    static func movingAverageUpper(
        into destination: UnsafeMutablePointer<Self>, previous: UnsafePointer<Self>?, beta: Self,
        pending: UnsafePointer<Self>, scale: Self, n: Int)
    static func trace(_ m: UnsafePointer<Self>, n: Int) -> Self
    static func diagonalSafelyFinite(_ m: UnsafePointer<Self>, n: Int) -> Bool
    static func copyUpperTriangle(
        from source: UnsafePointer<Self>, to destination: UnsafeMutablePointer<Self>, n: Int, diagonalShift shift: Self)
    static func divideByEigenvalueGrid(
        _ v: UnsafeMutablePointer<Self>, rows: Int, columns: Int,
        outputValues: UnsafePointer<Self>, inputValues: UnsafePointer<Self>, damping: Self)
    static func clampNegativeToZero(_ x: UnsafeMutablePointer<Self>, count: Int)
    static func scaledCopy(from source: UnsafePointer<Self>, to destination: UnsafeMutablePointer<Self>,
                           count: Int, scale: Self)
    static func extractPatchRows(_ x: UnsafePointer<Self>, geometry: Conv2dGeometry, group: Int, first: Int, count: Int,
                                 into out: UnsafeMutablePointer<Self>)
    static func extractPixelRows(_ x: UnsafePointer<Self>, geometry: Conv2dGeometry, group: Int, first: Int, count: Int,
                                 pixels: UnsafePointer<Int>, scales: UnsafePointer<Self>, pixelCount: Int,
                                 into out: UnsafeMutablePointer<Self>)
    static func gatherChannelRows(_ g: UnsafePointer<Self>, totalChannels: Int, positions: Int, firstChannel: Int,
                                  channels: Int, first: Int, count: Int, into out: UnsafeMutablePointer<Self>)
    static func gatherOffsetMajor(weight: UnsafePointer<Self>, bias: UnsafePointer<Self>?, rows: Int, channels: Int,
                                  taps: Int, into v: UnsafeMutablePointer<Self>)
    static func scatterOffsetMajor(_ u: UnsafePointer<Self>, scale: Self, weight: UnsafeMutablePointer<Self>,
                                   bias: UnsafeMutablePointer<Self>?, rows: Int, channels: Int, taps: Int)
    // EKFAC's element kernels, implemented in Inverses/EKFACInverse.swift.
    static func applyScaling(_ v: UnsafeMutablePointer<Self>, _ s: UnsafePointer<Self>, count: Int, damping: Self, divide: Bool)
    static func accumulateSquares(_ m: UnsafePointer<Self>, into s: UnsafeMutablePointer<Self>, count: Int, alpha: Self)
    static func squareInPlace(_ m: UnsafeMutablePointer<Self>, count: Int)
}

/// The library keeps factors in the upper triangle of row-major storage, which LAPACK (called
/// column-major) sees as the lower triangle.
private let lowerColumnMajor = CChar(UInt8(ascii: "L"))

/// syevd's workspace: the query's answer, but never below LAPACK's documented minimum for
/// jobz = V (1 + 6n + 2n², 3 + 5n) — a float32 query returns lwork as a float, which rounds
/// down above 2^24.
private func workspace(n: Int, queried: (work: Double, iwork: Int)?) -> (work: Int, iwork: Int) {
    let minimum = (1 + 6 * n + 2 * n * n, 3 + 5 * n)
    guard let q = queried, q.work.isFinite, q.work < 1e18 else { return minimum }
    return (max(Int(q.work.rounded(.up)), minimum.0), max(q.iwork, minimum.1))
}

@inline(__always) private func blasTranspose(_ t: Bool) -> CBLAS_TRANSPOSE {
    t ? CblasTrans : CblasNoTrans
}

extension Float: KFACScalar {
    public static var dtypeCode: Int32 { 1 }

    public static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Float, a: UnsafePointer<Float>, lda: Int, b: UnsafePointer<Float>, ldb: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_sgemm(CblasRowMajor, blasTranspose(transA), blasTranspose(transB),
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb),
                    beta, c, Int32(ldc))
    }

    public static func symm(
        aOnLeft: Bool, m: Int, n: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
        b: UnsafePointer<Float>, ldb: Int, beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_ssymm(CblasRowMajor, aOnLeft ? CblasLeft : CblasRight, CblasUpper, Int32(m), Int32(n),
                    alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    public static func syrkTransposed(
        n: Int, k: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, Int32(n), Int32(k), alpha, a,
                    Int32(lda), beta, c, Int32(ldc))
    }

    public static func syrk(
        n: Int, k: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
        beta: Float, c: UnsafeMutablePointer<Float>, ldc: Int
    ) {
        cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, Int32(n), Int32(k), alpha, a,
                    Int32(lda), beta, c, Int32(ldc))
    }

    public static func gemv(
        trans: Bool, m: Int, n: Int, alpha: Float, a: UnsafePointer<Float>, lda: Int,
        x: UnsafePointer<Float>, beta: Float, y: UnsafeMutablePointer<Float>, incY: Int
    ) {
        cblas_sgemv(CblasRowMajor, blasTranspose(trans), Int32(m), Int32(n), alpha, a, Int32(lda),
                    x, 1, beta, y, Int32(incY))
    }

    public static func scal(count: Int, alpha: Float, x: UnsafeMutablePointer<Float>) {
        cblas_sscal(Int32(count), alpha, x, 1)
    }

    public static func axpy(count: Int, alpha: Float, x: UnsafePointer<Float>, y: UnsafeMutablePointer<Float>) {
        cblas_saxpy(Int32(count), alpha, x, 1, y, 1)
    }

    public static func dot(count: Int, x: UnsafePointer<Float>, y: UnsafePointer<Float>) -> Float {
        cblas_sdot(Int32(count), x, 1, y, 1)
    }

    public static func choleskyFactor(n: Int, a: UnsafeMutablePointer<Float>) -> Int32 {
        LAPACKE_spotrf_work(LAPACK_COL_MAJOR, lowerColumnMajor, Int32(n), a, Int32(n))
    }

    public static func choleskyInverse(n: Int, a: UnsafeMutablePointer<Float>) -> Int32 {
        LAPACKE_spotri_work(LAPACK_COL_MAJOR, lowerColumnMajor, Int32(n), a, Int32(n))
    }

    public static func symmetricEigenWorkspace(n: Int) -> (work: Int, iwork: Int) {
        var a: Float = 0, w: Float = 0, work: Float = 0
        var iwork: Int32 = 0
        let info = LAPACKE_ssyevd_work(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "V")), lowerColumnMajor,
                                       Int32(n), &a, Int32(max(n, 1)), &w, &work, -1, &iwork, -1)
        return workspace(n: n, queried: info == 0 ? (Double(work), Int(iwork)) : nil)
    }

    public static func symmetricEigen(
        n: Int, a: UnsafeMutablePointer<Float>, values: UnsafeMutablePointer<Float>,
        work: UnsafeMutablePointer<Float>, workCount: Int,
        iwork: UnsafeMutablePointer<Int32>, iworkCount: Int
    ) -> Int32 {
        LAPACKE_ssyevd_work(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "V")), lowerColumnMajor,
                            Int32(n), a, Int32(n), values, work, Int32(workCount), iwork, Int32(iworkCount))
    }

    public static func generalizedSymmetricEigen(
        n: Int, a: UnsafeMutablePointer<Float>, b: UnsafeMutablePointer<Float>, values: UnsafeMutablePointer<Float>,
        work: UnsafeMutablePointer<Float>, workCount: Int,
        iwork: UnsafeMutablePointer<Int32>, iworkCount: Int
    ) -> Int32 {
        LAPACKE_ssygvd_work(LAPACK_COL_MAJOR, 1, CChar(UInt8(ascii: "V")), lowerColumnMajor,
                            Int32(n), a, Int32(n), b, Int32(n), values, work, Int32(workCount), iwork, Int32(iworkCount))
    }

    public static func allFinite(_ x: UnsafePointer<Float>, count: Int) -> Bool {
        largestMagnitude(x, count: count).isFinite
    }

    public static func largestMagnitude(_ x: UnsafePointer<Float>, count: Int) -> Float {
        // An integer max over |bits| vectorises, and orders non-negative floats like their values;
        // every Inf or NaN pattern is >= 0x7f80_0000, the pattern of +Inf.
        x.withMemoryRebound(to: UInt32.self, capacity: count) { bits in
            var largest: UInt32 = 0
            for i in 0..<count { largest = Swift.max(largest, bits[i] & 0x7fff_ffff) }
            return Float(bitPattern: Swift.min(largest, 0x7f80_0000))
        }
    }
}

extension Double: KFACScalar {
    public static var dtypeCode: Int32 { 2 }

    public static func gemm(
        transA: Bool, transB: Bool, m: Int, n: Int, k: Int,
        alpha: Double, a: UnsafePointer<Double>, lda: Int, b: UnsafePointer<Double>, ldb: Int,
        beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int
    ) {
        cblas_dgemm(CblasRowMajor, blasTranspose(transA), blasTranspose(transB),
                    Int32(m), Int32(n), Int32(k), alpha, a, Int32(lda), b, Int32(ldb),
                    beta, c, Int32(ldc))
    }

    public static func symm(
        aOnLeft: Bool, m: Int, n: Int, alpha: Double, a: UnsafePointer<Double>, lda: Int,
        b: UnsafePointer<Double>, ldb: Int, beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int
    ) {
        cblas_dsymm(CblasRowMajor, aOnLeft ? CblasLeft : CblasRight, CblasUpper, Int32(m), Int32(n),
                    alpha, a, Int32(lda), b, Int32(ldb), beta, c, Int32(ldc))
    }

    public static func syrkTransposed(
        n: Int, k: Int, alpha: Double, a: UnsafePointer<Double>, lda: Int,
        beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int
    ) {
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, Int32(n), Int32(k), alpha, a,
                    Int32(lda), beta, c, Int32(ldc))
    }

    public static func syrk(
        n: Int, k: Int, alpha: Double, a: UnsafePointer<Double>, lda: Int,
        beta: Double, c: UnsafeMutablePointer<Double>, ldc: Int
    ) {
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasNoTrans, Int32(n), Int32(k), alpha, a,
                    Int32(lda), beta, c, Int32(ldc))
    }

    public static func gemv(
        trans: Bool, m: Int, n: Int, alpha: Double, a: UnsafePointer<Double>, lda: Int,
        x: UnsafePointer<Double>, beta: Double, y: UnsafeMutablePointer<Double>, incY: Int
    ) {
        cblas_dgemv(CblasRowMajor, blasTranspose(trans), Int32(m), Int32(n), alpha, a, Int32(lda),
                    x, 1, beta, y, Int32(incY))
    }

    public static func scal(count: Int, alpha: Double, x: UnsafeMutablePointer<Double>) {
        cblas_dscal(Int32(count), alpha, x, 1)
    }

    public static func axpy(count: Int, alpha: Double, x: UnsafePointer<Double>, y: UnsafeMutablePointer<Double>) {
        cblas_daxpy(Int32(count), alpha, x, 1, y, 1)
    }

    public static func dot(count: Int, x: UnsafePointer<Double>, y: UnsafePointer<Double>) -> Double {
        cblas_ddot(Int32(count), x, 1, y, 1)
    }

    public static func choleskyFactor(n: Int, a: UnsafeMutablePointer<Double>) -> Int32 {
        LAPACKE_dpotrf_work(LAPACK_COL_MAJOR, lowerColumnMajor, Int32(n), a, Int32(n))
    }

    public static func choleskyInverse(n: Int, a: UnsafeMutablePointer<Double>) -> Int32 {
        LAPACKE_dpotri_work(LAPACK_COL_MAJOR, lowerColumnMajor, Int32(n), a, Int32(n))
    }

    public static func symmetricEigenWorkspace(n: Int) -> (work: Int, iwork: Int) {
        var a: Double = 0, w: Double = 0, work: Double = 0
        var iwork: Int32 = 0
        let info = LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "V")), lowerColumnMajor,
                                       Int32(n), &a, Int32(max(n, 1)), &w, &work, -1, &iwork, -1)
        return workspace(n: n, queried: info == 0 ? (work, Int(iwork)) : nil)
    }

    public static func symmetricEigen(
        n: Int, a: UnsafeMutablePointer<Double>, values: UnsafeMutablePointer<Double>,
        work: UnsafeMutablePointer<Double>, workCount: Int,
        iwork: UnsafeMutablePointer<Int32>, iworkCount: Int
    ) -> Int32 {
        LAPACKE_dsyevd_work(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "V")), lowerColumnMajor,
                            Int32(n), a, Int32(n), values, work, Int32(workCount), iwork, Int32(iworkCount))
    }

    public static func generalizedSymmetricEigen(
        n: Int, a: UnsafeMutablePointer<Double>, b: UnsafeMutablePointer<Double>, values: UnsafeMutablePointer<Double>,
        work: UnsafeMutablePointer<Double>, workCount: Int,
        iwork: UnsafeMutablePointer<Int32>, iworkCount: Int
    ) -> Int32 {
        LAPACKE_dsygvd_work(LAPACK_COL_MAJOR, 1, CChar(UInt8(ascii: "V")), lowerColumnMajor,
                            Int32(n), a, Int32(n), b, Int32(n), values, work, Int32(workCount), iwork, Int32(iworkCount))
    }

    public static func allFinite(_ x: UnsafePointer<Double>, count: Int) -> Bool {
        largestMagnitude(x, count: count).isFinite
    }

    public static func largestMagnitude(_ x: UnsafePointer<Double>, count: Int) -> Double {
        x.withMemoryRebound(to: UInt64.self, capacity: count) { bits in
            var largest: UInt64 = 0
            for i in 0..<count { largest = Swift.max(largest, bits[i] & 0x7fff_ffff_ffff_ffff) }
            return Double(bitPattern: Swift.min(largest, 0x7ff0_0000_0000_0000))
        }
    }
}

extension KFACScalar {
    /// The fallback of `symmetricEigen` when it fails (or returns non-finite values): the same
    /// decomposition of the n×n symmetric matrix whose upper triangle (row-major) is in `source`,
    /// computed in double precision with LAPACK's QR-iteration driver (dsyev) instead of divide
    /// and conquer, then rounded to this precision: `vectors` receives Qᵀ, `values` the ascending
    /// eigenvalues. Returns 0 on success, else the LAPACK info (or −1000 when memory could not
    /// be allocated, −1001 when the result is not finite). Allocates: a failure path only.
    static func symmetricEigenInDouble(n: Int, source: UnsafePointer<Self>, vectors: UnsafeMutablePointer<Self>,
                                       values: UnsafeMutablePointer<Self>) -> Int32 {
        guard let mRaw = malloc(Swift.max(n * n, 1) * 8), let wRaw = malloc(Swift.max(n, 1) * 8) else { return -1000 }
        let m = mRaw.assumingMemoryBound(to: Double.self), w = wRaw.assumingMemoryBound(to: Double.self)
        defer { free(mRaw); free(wRaw) }
        for i in 0..<n {
            for j in 0..<n { m[i * n + j] = j >= i ? Double(source[i * n + j]) : 0 }
        }
        let info = LAPACKE_dsyev(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "V")), lowerColumnMajor, Int32(n), m, Int32(n), w)
        guard info == 0 else { return info }
        for k in 0..<(n * n) { vectors[k] = Self(m[k]) }
        for k in 0..<n { values[k] = Self(w[k]) }
        guard allFinite(vectors, count: n * n), allFinite(values, count: n) else { return -1001 }
        return 0
    }
}
