// The element-wise kernels the library needs beside BLAS and LAPACK, in one place. Symmetric
// matrices are kept in the upper triangle of row-major storage (LAPACK's column-major lower).
//
// The kernels are requirements of `KFACScalar` with their one implementation here, so that the
// Float and Double witnesses are specialised loops even when called from generic code (a
// generic free function runs unspecialised there, several times slower). Being requirements of
// a public protocol they are public, but they are the library's internals, not API.

extension KFACScalar {

    /// Copies the upper triangle of an n×n row-major matrix into its lower triangle, tile by tile so
    /// that the transposed reads stay in cache.
    public static func symmetrizeFromUpper(_ m: UnsafeMutablePointer<Self>, n: Int) {
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
    public static func movingAverageUpper(
        into destination: UnsafeMutablePointer<Self>, previous: UnsafePointer<Self>?, beta: Self,
        pending: UnsafePointer<Self>, scale: Self, n: Int
    ) {
        // Three loops, so that each vectorises: with `previous` == `destination` in one loop the
        // compiler's overlap check fails and it would fall back to scalar code.
        for i in 0..<n {
            let d = destination + i * n, p = pending + i * n
            if let previous, UnsafePointer(destination) == previous {
                for j in i..<n { d[j] = beta * d[j] + scale * p[j] }
            } else if let previous {
                let r = previous + i * n
                for j in i..<n { d[j] = beta * r[j] + scale * p[j] }
            } else {
                for j in i..<n { d[j] = scale * p[j] }
            }
        }
    }

    /// Σ_i m[i][i].
    public static func trace(_ m: UnsafePointer<Self>, n: Int) -> Self {
        var s: Self = 0
        for i in 0..<n { s += m[i * n + i] }
        return s
    }

    /// True when every diagonal entry of a second-moment matrix is finite with a margin of 2⁻⁴ of
    /// the largest finite value. By Cauchy–Schwarz every off-diagonal entry is then bounded by the
    /// diagonal, so a moving average of such matrices cannot overflow either.
    public static func diagonalSafelyFinite(_ m: UnsafePointer<Self>, n: Int) -> Bool {
        let limit = Self.greatestFiniteMagnitude / 16
        for i in 0..<n {
            let d = m[i * n + i]
            if !(d.magnitude <= limit) { return false }  // also false for NaN
        }
        return true
    }

    /// Upper triangle of `destination = source + shift * I` (n×n).
    public static func copyUpperTriangle(
        from source: UnsafePointer<Self>, to destination: UnsafeMutablePointer<Self>, n: Int, diagonalShift shift: Self
    ) {
        for i in 0..<n {
            (destination + i * n + i).update(from: source + i * n + i, count: n - i)
            destination[i * n + i] += shift
        }
    }

    /// v[i][j] /= (outputValues[i] * inputValues[j] + damping) for a rows×columns matrix: the
    /// eigenbasis division of exact damping.
    public static func divideByEigenvalueGrid(
        _ v: UnsafeMutablePointer<Self>, rows: Int, columns: Int,
        outputValues: UnsafePointer<Self>, inputValues: UnsafePointer<Self>, damping: Self
    ) {
        for i in 0..<rows {
            let row = v + i * columns, g = outputValues[i]
            for j in 0..<columns { row[j] /= g * inputValues[j] + damping }
        }
    }

    /// destination[i] = scale * source[i].
    public static func scaledCopy(from source: UnsafePointer<Self>, to destination: UnsafeMutablePointer<Self>,
                                  count: Int, scale: Self) {
        if scale == 1 {
            destination.update(from: source, count: count)
        } else {
            for i in 0..<count { destination[i] = scale * source[i] }
        }
    }

    /// Replaces negative values (rounding noise in the spectrum of a PSD matrix) by zero.
    public static func clampNegativeToZero(_ x: UnsafeMutablePointer<Self>, count: Int) {
        for i in 0..<count where x[i] < 0 { x[i] = 0 }
    }
}

/// `sums[k * incY] (+)= scale * Σ_rows x[row][k]` for `rows` rows of `columns` values, rows
/// `stride` apart (added when `accumulate`, else overwritten), via BLAS against a vector of ones
/// that covers `ones.count` rows at a time.
func columnSums<T: KFACScalar>(
    of x: UnsafePointer<T>, rows: Int, columns: Int, stride: Int, scale: T,
    into sums: UnsafeMutablePointer<T>, incY: Int, accumulate: Bool, ones: AlignedBuffer<T>
) {
    var start = 0
    while start < rows {
        let chunk = Swift.min(ones.count, rows - start)
        T.gemv(trans: true, m: chunk, n: columns, alpha: scale, a: x + start * stride, lda: stride,
               x: ones.base, beta: (accumulate || start > 0) ? 1 : 0, y: sums, incY: incY)
        start += chunk
    }
}
