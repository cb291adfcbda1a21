/// The solver's element-wise loops, written once per concrete precision: the optimizer's methods
/// are generic over `KFACScalar` and, called from another module, run unspecialised, where a
/// generic loop pays a witness call per element. Each kernel checks the precision once and runs a
/// plain Float or Double loop (BLAS does the dot products and axpys).
enum ConjugateGradientKernels<Scalar: KFACScalar> {
    @inline(__always)
    private static func float(_ p: UnsafeMutablePointer<Scalar>) -> UnsafeMutablePointer<Float> {
        UnsafeMutableRawPointer(p).assumingMemoryBound(to: Float.self)
    }

    @inline(__always)
    private static func double(_ p: UnsafeMutablePointer<Scalar>) -> UnsafeMutablePointer<Double> {
        UnsafeMutableRawPointer(p).assumingMemoryBound(to: Double.self)
    }

    /// r = −g − q − s·x.
    static func residual(_ r: UnsafeMutablePointer<Scalar>, g: UnsafeMutablePointer<Scalar>, q: UnsafeMutablePointer<Scalar>,
                         x: UnsafeMutablePointer<Scalar>, shift s: Double, count n: Int) {
        if Scalar.self == Float.self {
            let (r, g, q, x, s) = (float(r), float(g), float(q), float(x), Float(s))
            for i in 0..<n { r[i] = -g[i] - q[i] - s * x[i] }
        } else {
            let (r, g, q, x) = (double(r), double(g), double(q), double(x))
            for i in 0..<n { r[i] = -g[i] - q[i] - s * x[i] }
        }
    }

    /// y = a · x.
    static func scaled(_ y: UnsafeMutablePointer<Scalar>, _ x: UnsafeMutablePointer<Scalar>, by a: Double, count n: Int) {
        if Scalar.self == Float.self {
            let (y, x, a) = (float(y), float(x), Float(a))
            for i in 0..<n { y[i] = a * x[i] }
        } else {
            let (y, x) = (double(y), double(x))
            for i in 0..<n { y[i] = a * x[i] }
        }
    }

    /// y = m ⊙ r.
    static func multiply(_ y: UnsafeMutablePointer<Scalar>, _ m: UnsafeMutablePointer<Scalar>, _ r: UnsafeMutablePointer<Scalar>,
                         count n: Int) {
        if Scalar.self == Float.self {
            let (y, m, r) = (float(y), float(m), float(r))
            for i in 0..<n { y[i] = m[i] * r[i] }
        } else {
            let (y, m, r) = (double(y), double(m), double(r))
            for i in 0..<n { y[i] = m[i] * r[i] }
        }
    }

    /// p = y + β p.
    static func direction(_ p: UnsafeMutablePointer<Scalar>, _ y: UnsafeMutablePointer<Scalar>, beta: Double, count n: Int) {
        if Scalar.self == Float.self {
            let (p, y, b) = (float(p), float(y), Float(beta))
            for i in 0..<n { p[i] = y[i] + b * p[i] }
        } else {
            let (p, y) = (double(p), double(y))
            for i in 0..<n { p[i] = y[i] + beta * p[i] }
        }
    }

    /// m = (m + s)^(−α) in place (d ≥ 0 given in m).
    static func diagonalInverse(_ m: UnsafeMutablePointer<Scalar>, shift s: Double, exponent a: Double, count n: Int) {
        if Scalar.self == Float.self {
            let m = float(m)
            for i in 0..<n { m[i] = Float(LibM.exp(-a * LibM.log(Double(m[i]) + s))) }
        } else {
            let m = double(m)
            for i in 0..<n { m[i] = LibM.exp(-a * LibM.log(m[i] + s)) }
        }
    }

    /// Whether every value is ≥ 0 (false for NaN).
    static func nonNegative(_ x: UnsafePointer<Scalar>, count n: Int) -> Bool {
        let p = UnsafeMutablePointer(mutating: x)
        if Scalar.self == Float.self {
            let x = float(p)
            for i in 0..<n where !(x[i] >= 0) { return false }
        } else {
            let x = double(p)
            for i in 0..<n where !(x[i] >= 0) { return false }
        }
        return true
    }

    /// x = 0.
    static func zero(_ x: UnsafeMutablePointer<Scalar>, count n: Int) {
        UnsafeMutableRawPointer(x).initializeMemory(as: UInt8.self, repeating: 0, count: n * MemoryLayout<Scalar>.stride)
    }
}

// MARK: Fused passes of one iteration (sums in Double in both precisions)

extension ConjugateGradientKernels {
    /// q[o..<o+n] = src + s·p[o..<o+n]; returns `sum` + Σ p·q over the segment (continuing one
    /// left-to-right sum across segments) and whether src is finite.
    static func productSegment(_ q: UnsafeMutablePointer<Scalar>, _ src: UnsafePointer<Scalar>, _ p: UnsafeMutablePointer<Scalar>,
                               shift s: Double, count n: Int, sum: Double) -> (pq: Double, finite: Bool) {
        var pq = sum
        var finite = true
        let src = UnsafeMutablePointer(mutating: src)
        if Scalar.self == Float.self {
            let (q, v, p, s) = (float(q), float(src), float(p), Float(s))
            for i in 0..<n {
                let value = v[i]
                finite = finite && value.isFinite
                let qi = value + s * p[i]
                q[i] = qi
                pq += Double(p[i] * qi)
            }
        } else {
            let (q, v, p) = (double(q), double(src), double(p))
            for i in 0..<n {
                let value = v[i]
                finite = finite && value.isFinite
                let qi = value + s * p[i]
                q[i] = qi
                pq += p[i] * qi
            }
        }
        return (pq, finite)
    }

    /// rNext = r − α q, and gᵀx, gᵀp, xᵀrNext, pᵀrNext, rNextᵀrNext in the same pass.
    static func residualPass(_ rNext: UnsafeMutablePointer<Scalar>, r: UnsafeMutablePointer<Scalar>, q: UnsafeMutablePointer<Scalar>,
                             g: UnsafeMutablePointer<Scalar>, x: UnsafeMutablePointer<Scalar>, p: UnsafeMutablePointer<Scalar>,
                             alpha a: Double, count n: Int) -> (gx: Double, gp: Double, xr: Double, pr: Double, rr: Double) {
        var (gx, gp, xr, pr, rr) = (0.0, 0.0, 0.0, 0.0, 0.0)
        if Scalar.self == Float.self {
            let (rn, r, q, g, x, p, a) = (float(rNext), float(r), float(q), float(g), float(x), float(p), Float(a))
            for i in 0..<n {
                let v = r[i] - a * q[i]
                rn[i] = v
                gx += Double(g[i] * x[i]); gp += Double(g[i] * p[i])
                xr += Double(x[i] * v); pr += Double(p[i] * v); rr += Double(v * v)
            }
        } else {
            let (rn, r, q, g, x, p) = (double(rNext), double(r), double(q), double(g), double(x), double(p))
            for i in 0..<n {
                let v = r[i] - a * q[i]
                rn[i] = v
                gx += g[i] * x[i]; gp += g[i] * p[i]
                xr += x[i] * v; pr += p[i] * v; rr += v * v
            }
        }
        return (gx, gp, xr, pr, rr)
    }

    /// y = m ⊙ r; returns rᵀy.
    static func diagonalPass(_ y: UnsafeMutablePointer<Scalar>, _ m: UnsafeMutablePointer<Scalar>, _ r: UnsafeMutablePointer<Scalar>,
                             count n: Int) -> Double {
        var ry = 0.0
        if Scalar.self == Float.self {
            let (y, m, r) = (float(y), float(m), float(r))
            for i in 0..<n { let v = m[i] * r[i]; y[i] = v; ry += Double(r[i] * v) }
        } else {
            let (y, m, r) = (double(y), double(m), double(r))
            for i in 0..<n { let v = m[i] * r[i]; y[i] = v; ry += r[i] * v }
        }
        return ry
    }

    /// Σ x·y.
    static func dot(_ x: UnsafeMutablePointer<Scalar>, _ y: UnsafeMutablePointer<Scalar>, count n: Int) -> Double {
        var s = 0.0
        if Scalar.self == Float.self {
            let (x, y) = (float(x), float(y))
            for i in 0..<n { s += Double(x[i] * y[i]) }
        } else {
            let (x, y) = (double(x), double(y))
            for i in 0..<n { s += x[i] * y[i] }
        }
        return s
    }

    /// x += α p, then p = y + β p (the old p for x).
    static func updatePass(x: UnsafeMutablePointer<Scalar>, p: UnsafeMutablePointer<Scalar>, y: UnsafeMutablePointer<Scalar>,
                           alpha a: Double, beta b: Double, count n: Int) {
        if Scalar.self == Float.self {
            let (x, p, y, a, b) = (float(x), float(p), float(y), Float(a), Float(b))
            for i in 0..<n { let pi = p[i]; x[i] += a * pi; p[i] = y[i] + b * pi }
        } else {
            let (x, p, y) = (double(x), double(p), double(y))
            for i in 0..<n { let pi = p[i]; x[i] += a * pi; p[i] = y[i] + b * pi }
        }
    }

    /// x += α p.
    static func axpy(_ x: UnsafeMutablePointer<Scalar>, _ p: UnsafeMutablePointer<Scalar>, alpha a: Double, count n: Int) {
        if Scalar.self == Float.self {
            let (x, p, a) = (float(x), float(p), Float(a))
            for i in 0..<n { x[i] += a * p[i] }
        } else {
            let (x, p) = (double(x), double(p))
            for i in 0..<n { x[i] += a * p[i] }
        }
    }
}
