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
//
// Under the residual rule (the default, and what a Newton-CG trainer runs) every sum of an
// iteration runs in four interleaved partial sums (element i into lane i mod 4, lanes combined
// as ((l0 + l1) + l2) + l3, a tail of < 4 elements added after in order): one sequential chain
// of additions is latency-bound (about 4 cycles an element), and those chains were most of the
// solver's time per iteration. The order is fixed, so a solve stays reproducible bit for bit.
// The relative-progress rule keeps left-to-right sums: its stop (a difference of φ values
// relative to φ) can hinge on the last bits, and its tests pin the iteration it stops at.

extension ConjugateGradientKernels {
    /// q[o..<o+n] = src + s·p[o..<o+n]; returns `sum` + Σ p·q over the segment and whether src is
    /// finite (a non-finite value makes v·0 NaN, which a lane sum keeps). `interleaved` false:
    /// one left-to-right sum continuing `sum` (the relative-progress rule's order).
    static func productSegment(_ q: UnsafeMutablePointer<Scalar>, _ src: UnsafePointer<Scalar>, _ p: UnsafeMutablePointer<Scalar>,
                               shift s: Double, count n: Int, sum: Double, interleaved: Bool) -> (pq: Double, finite: Bool) {
        var l = SIMD4<Double>(), bad = SIMD4<Double>()
        var tail = interleaved ? 0.0 : sum, tailBad = 0.0
        let m = interleaved ? n & ~3 : 0
        let src = UnsafeMutablePointer(mutating: src)
        if Scalar.self == Float.self {
            let (q, v, p, s) = (float(q), float(src), float(p), Float(s))
            var i = 0
            while i < m {
                let vi = SIMD4<Float>(v[i], v[i + 1], v[i + 2], v[i + 3]), pi = SIMD4<Float>(p[i], p[i + 1], p[i + 2], p[i + 3])
                let qi = vi + s * pi
                q[i] = qi[0]; q[i + 1] = qi[1]; q[i + 2] = qi[2]; q[i + 3] = qi[3]
                l += SIMD4<Double>(pi * qi)
                bad += SIMD4<Double>(vi * 0)
                i += 4
            }
            for j in m..<n { let qj = v[j] + s * p[j]; q[j] = qj; tail += Double(p[j] * qj); tailBad += Double(v[j] * 0) }
        } else {
            let (q, v, p) = (double(q), double(src), double(p))
            var i = 0
            while i < m {
                let vi = SIMD4<Double>(v[i], v[i + 1], v[i + 2], v[i + 3]), pi = SIMD4<Double>(p[i], p[i + 1], p[i + 2], p[i + 3])
                let qi = vi + s * pi
                q[i] = qi[0]; q[i + 1] = qi[1]; q[i + 2] = qi[2]; q[i + 3] = qi[3]
                l += pi * qi
                bad += vi * 0
                i += 4
            }
            for j in m..<n { let qj = v[j] + s * p[j]; q[j] = qj; tail += p[j] * qj; tailBad += v[j] * 0 }
        }
        let pq = interleaved ? sum + (((l[0] + l[1]) + l[2]) + l[3]) + tail : tail
        let b = (((bad[0] + bad[1]) + bad[2]) + bad[3]) + tailBad
        return (pq, b == 0)
    }

    /// The residual rule's pass: rNext = r − α q, and ‖rNext‖² (φ is not needed: the rule does
    /// not read it). With `m`, also y = m ⊙ rNext and rNextᵀy (the diagonal preconditioner).
    static func residualNormPass(_ rNext: UnsafeMutablePointer<Scalar>, r: UnsafeMutablePointer<Scalar>, q: UnsafeMutablePointer<Scalar>,
                                 alpha a: Double, diagonal m: UnsafeMutablePointer<Scalar>?, into y: UnsafeMutablePointer<Scalar>,
                                 count n: Int) -> (rr: Double, ry: Double) {
        var lr = SIMD4<Double>(), ly = SIMD4<Double>()
        var tr = 0.0, ty = 0.0
        let c = n & ~3
        if Scalar.self == Float.self {
            let (rn, r, q, y, a) = (float(rNext), float(r), float(q), float(y), Float(a))
            var i = 0
            if let m = m.map(float) {
                while i < c {
                    let v = SIMD4<Float>(r[i], r[i + 1], r[i + 2], r[i + 3]) - a * SIMD4<Float>(q[i], q[i + 1], q[i + 2], q[i + 3])
                    let w = SIMD4<Float>(m[i], m[i + 1], m[i + 2], m[i + 3]) * v
                    rn[i] = v[0]; rn[i + 1] = v[1]; rn[i + 2] = v[2]; rn[i + 3] = v[3]
                    y[i] = w[0]; y[i + 1] = w[1]; y[i + 2] = w[2]; y[i + 3] = w[3]
                    lr += SIMD4<Double>(v * v); ly += SIMD4<Double>(v * w)
                    i += 4
                }
                for j in c..<n { let v = r[j] - a * q[j], w = m[j] * v; rn[j] = v; y[j] = w; tr += Double(v * v); ty += Double(v * w) }
            } else {
                while i < c {
                    let v = SIMD4<Float>(r[i], r[i + 1], r[i + 2], r[i + 3]) - a * SIMD4<Float>(q[i], q[i + 1], q[i + 2], q[i + 3])
                    rn[i] = v[0]; rn[i + 1] = v[1]; rn[i + 2] = v[2]; rn[i + 3] = v[3]
                    lr += SIMD4<Double>(v * v)
                    i += 4
                }
                for j in c..<n { let v = r[j] - a * q[j]; rn[j] = v; tr += Double(v * v) }
            }
        } else {
            let (rn, r, q, y) = (double(rNext), double(r), double(q), double(y))
            var i = 0
            if let m = m.map(double) {
                while i < c {
                    let v = SIMD4<Double>(r[i], r[i + 1], r[i + 2], r[i + 3]) - a * SIMD4<Double>(q[i], q[i + 1], q[i + 2], q[i + 3])
                    let w = SIMD4<Double>(m[i], m[i + 1], m[i + 2], m[i + 3]) * v
                    rn[i] = v[0]; rn[i + 1] = v[1]; rn[i + 2] = v[2]; rn[i + 3] = v[3]
                    y[i] = w[0]; y[i + 1] = w[1]; y[i + 2] = w[2]; y[i + 3] = w[3]
                    lr += v * v; ly += v * w
                    i += 4
                }
                for j in c..<n { let v = r[j] - a * q[j], w = m[j] * v; rn[j] = v; y[j] = w; tr += v * v; ty += v * w }
            } else {
                while i < c {
                    let v = SIMD4<Double>(r[i], r[i + 1], r[i + 2], r[i + 3]) - a * SIMD4<Double>(q[i], q[i + 1], q[i + 2], q[i + 3])
                    rn[i] = v[0]; rn[i + 1] = v[1]; rn[i + 2] = v[2]; rn[i + 3] = v[3]
                    lr += v * v
                    i += 4
                }
                for j in c..<n { let v = r[j] - a * q[j]; rn[j] = v; tr += v * v }
            }
        }
        return ((((lr[0] + lr[1]) + lr[2]) + lr[3]) + tr, (((ly[0] + ly[1]) + ly[2]) + ly[3]) + ty)
    }

    /// rNext = r − α q, and gᵀx, gᵀp, xᵀrNext, pᵀrNext, rNextᵀrNext in the same pass (the
    /// relative-progress rule, which needs φ; sequential sums, as the reference it is tested
    /// against: its stopping iteration can hinge on the last bits).
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

    /// Σ x·y, left to right.
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
