// The element-wise kernels the library needs beside BLAS and LAPACK, in one place. Symmetric
// matrices are kept in the upper triangle of row-major storage (LAPACK's column-major lower).
// Each kernel is pre-specialised for Float and Double so that generic callers run the
// specialised loop.

/// Copies the upper triangle of an n×n row-major matrix into its lower triangle, tile by tile so
/// that the transposed reads stay in cache.
@_specialize(where T == Float)
@_specialize(where T == Double)
func symmetrizeFromUpper<T: KFACScalar>(_ m: UnsafeMutablePointer<T>, n: Int) {
    let tile = 32
    var ib = 0
    while ib < n {
        let iEnd = Swift.min(ib + tile, n)
        var jb = 0
        while jb <= ib {
            let jEnd = Swift.min(jb + tile, n)
            for i in ib..<iEnd {
                for j in jb..<Swift.min(jEnd, i) { m[i * n + j] = m[j * n + i] }
            }
            jb += tile
        }
        ib += tile
    }
}

/// Upper triangle of `destination = beta * previous + scale * pending` (n×n), or
/// `destination = scale * pending` when `previous` is nil. `destination` may be `previous`.
@_specialize(where T == Float)
@_specialize(where T == Double)
func movingAverageUpper<T: KFACScalar>(
    into destination: UnsafeMutablePointer<T>, previous: UnsafePointer<T>?, beta: T,
    pending: UnsafePointer<T>, scale: T, n: Int
) {
    for i in 0..<n {
        let d = destination + i * n, p = pending + i * n
        if let previous {
            let r = previous + i * n
            for j in i..<n { d[j] = beta * r[j] + scale * p[j] }
        } else {
            for j in i..<n { d[j] = scale * p[j] }
        }
    }
}

/// Σ_i m[i][i].
@_specialize(where T == Float)
@_specialize(where T == Double)
func trace<T: KFACScalar>(_ m: UnsafePointer<T>, n: Int) -> T {
    var s: T = 0
    for i in 0..<n { s += m[i * n + i] }
    return s
}

/// True when every diagonal entry of a second-moment matrix is finite with a margin of 2⁻⁴ of
/// the largest finite value. By Cauchy–Schwarz every off-diagonal entry is then bounded by the
/// diagonal, so a moving average of such matrices cannot overflow either.
@_specialize(where T == Float)
@_specialize(where T == Double)
func diagonalSafelyFinite<T: KFACScalar>(_ m: UnsafePointer<T>, n: Int) -> Bool {
    let limit = T.greatestFiniteMagnitude / 16
    for i in 0..<n {
        let d = m[i * n + i]
        if !(d.magnitude <= limit) { return false }  // also false for NaN
    }
    return true
}

/// Upper triangle of `destination = source + shift * I` (n×n).
@_specialize(where T == Float)
@_specialize(where T == Double)
func copyUpperTriangle<T: KFACScalar>(
    from source: UnsafePointer<T>, to destination: UnsafeMutablePointer<T>, n: Int, diagonalShift shift: T
) {
    for i in 0..<n {
        (destination + i * n + i).update(from: source + i * n + i, count: n - i)
        destination[i * n + i] += shift
    }
}

/// v[i][j] /= (outputValues[i] * inputValues[j] + damping) for a rows×columns matrix: the
/// eigenbasis division of exact damping.
@_specialize(where T == Float)
@_specialize(where T == Double)
func divideByEigenvalueGrid<T: KFACScalar>(
    _ v: UnsafeMutablePointer<T>, rows: Int, columns: Int,
    outputValues: UnsafePointer<T>, inputValues: UnsafePointer<T>, damping: T
) {
    for i in 0..<rows {
        let row = v + i * columns, g = outputValues[i]
        for j in 0..<columns { row[j] /= g * inputValues[j] + damping }
    }
}

/// Replaces negative values (rounding noise in the spectrum of a PSD matrix) by zero.
@_specialize(where T == Float)
@_specialize(where T == Double)
func clampNegativeToZero<T: KFACScalar>(_ x: UnsafeMutablePointer<T>, count: Int) {
    for i in 0..<count where x[i] < 0 { x[i] = 0 }
}

/// `sums[k * stride] (+)= scale * Σ_rows x[row][k]` for a rows×columns row-major block (added
/// when `accumulate`, else overwritten), via BLAS against a vector of ones that covers
/// `ones.count` rows at a time.
func columnSums<T: KFACScalar>(
    of x: UnsafePointer<T>, rows: Int, columns: Int, scale: T,
    into sums: UnsafeMutablePointer<T>, stride: Int, accumulate: Bool, ones: Matrix<T>
) {
    var start = 0
    while start < rows {
        let chunk = Swift.min(ones.count, rows - start)
        T.gemv(trans: true, m: chunk, n: columns, alpha: scale, a: x + start * columns, lda: columns,
               x: ones.base, beta: (accumulate || start > 0) ? 1 : 0, y: sums, incY: stride)
        start += chunk
    }
}

/// The upper triangle (row-major) of `c = alpha * aᵀ a + beta * c`, a k×n row-major, computed as
/// one gemm per block row: C[i-block, i-block…] = Aᵢᵀ A[:, i-block…]. OpenBLAS's syrk runs at about
/// half the sgemm rate; the block rows compute m(m+1)/2 blocks for the m²/2 of the triangle
/// (m = n / blockSize) at the full gemm rate. Small matrices go to syrk.
func symmetricRankUpdate<T: KFACScalar>(
    n: Int, k: Int, alpha: T, a: UnsafePointer<T>, lda: Int, beta: T, c: UnsafeMutablePointer<T>, ldc: Int
) {
    let blockSize = 128
    guard n >= 4 * blockSize else {
        T.syrkTransposed(n: n, k: k, alpha: alpha, a: a, lda: lda, beta: beta, c: c, ldc: ldc)
        return
    }
    var start = 0
    while start < n {
        let rows = Swift.min(blockSize, n - start)
        T.gemm(transA: true, transB: false, m: rows, n: n - start, k: k, alpha: alpha,
               a: a + start, lda: lda, b: a + start, ldb: lda, beta: beta, c: c + start * ldc + start, ldc: ldc)
        start += rows
    }
}
