// Reference computations for the tests, written the slow and obvious way in Double: per-example
// loops, explicit Kronecker products and a dense linear solve. They share no code with the
// library.
@testable import KFAC

/// A seeded SplitMix64 generator: the same inputs on every run and machine.
struct SeededRandom {
    var state: UInt64
    init(_ seed: UInt64) { state = seed }
    mutating func next() -> UInt64 {
        state &+= 0x9E37_79B9_7F4A_7C15
        var z = state
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    mutating func uniform() -> Double { Double(next() >> 11) / Double(1 << 52) - 1 }
    mutating func array<S: KFACScalar>(_ count: Int, scale: Double = 1) -> [S] {
        (0..<count).map { _ in S(scale * uniform()) }
    }
}

/// A dense row-major Double matrix.
struct Dense: Equatable {
    var rows: Int, columns: Int
    var values: [Double]

    init(rows: Int, columns: Int) {
        self.rows = rows; self.columns = columns
        values = Array(repeating: 0, count: rows * columns)
    }
    init<S: KFACScalar>(rows: Int, columns: Int, _ v: [S]) {
        self.rows = rows; self.columns = columns
        values = v.map { Double($0) }
    }
    subscript(i: Int, j: Int) -> Double {
        get { values[i * columns + j] }
        set { values[i * columns + j] = newValue }
    }
    static func identity(_ n: Int) -> Dense {
        var m = Dense(rows: n, columns: n)
        for i in 0..<n { m[i, i] = 1 }
        return m
    }
    static func + (a: Dense, b: Dense) -> Dense {
        var c = a
        for i in c.values.indices { c.values[i] += b.values[i] }
        return c
    }
    static func * (s: Double, a: Dense) -> Dense {
        var c = a
        for i in c.values.indices { c.values[i] *= s }
        return c
    }
    var trace: Double { (0..<rows).reduce(0) { $0 + self[$1, $1] } }
    func maxAbsDifference(_ other: Dense) -> Double {
        zip(values, other.values).map { abs($0 - $1) }.max() ?? 0
    }
    var maxAbs: Double { values.map(abs).max() ?? 0 }
}

/// (1/N) Σ_n x_n x_nᵀ over the rows of x (rows × width), each row scaled by `rowScale` and,
/// with `appendOne`, extended by a trailing 1 — the naive per-example loop.
func naiveSecondMoment<S: KFACScalar>(_ x: [S], rows: Int, width: Int, appendOne: Bool, rowScale: Double = 1) -> Dense {
    let d = width + (appendOne ? 1 : 0)
    var m = Dense(rows: d, columns: d)
    for n in 0..<rows {
        var v = (0..<width).map { rowScale * Double(x[n * width + $0]) }
        if appendOne { v.append(1) }
        for i in 0..<d { for j in 0..<d { m[i, j] += v[i] * v[j] / Double(rows) } }
    }
    return m
}

/// The explicit Kronecker product A ⊗ B.
func kronecker(_ a: Dense, _ b: Dense) -> Dense {
    var k = Dense(rows: a.rows * b.rows, columns: a.columns * b.columns)
    for i in 0..<a.rows { for j in 0..<a.columns { for p in 0..<b.rows { for q in 0..<b.columns {
        k[i * b.rows + p, j * b.columns + q] = a[i, j] * b[p, q]
    } } } }
    return k
}

/// Column-major vec of a matrix, the convention under which (A ⊗ G) vec(V) = vec(G V A).
func vec(_ m: Dense) -> [Double] {
    var v: [Double] = []
    for j in 0..<m.columns { for i in 0..<m.rows { v.append(m[i, j]) } }
    return v
}

func unvec(_ v: [Double], rows: Int, columns: Int) -> Dense {
    var m = Dense(rows: rows, columns: columns)
    for j in 0..<columns { for i in 0..<rows { m[i, j] = v[j * rows + i] } }
    return m
}

/// Solves M x = b by Gaussian elimination with partial pivoting.
func denseSolve(_ m: Dense, _ b: [Double]) -> [Double] {
    let n = m.rows
    var a = m.values, x = b
    for k in 0..<n {
        let p = (k..<n).max { abs(a[$0 * n + k]) < abs(a[$1 * n + k]) }!
        if p != k {
            for j in 0..<n { a.swapAt(k * n + j, p * n + j) }
            x.swapAt(k, p)
        }
        for i in (k + 1)..<n {
            let f = a[i * n + k] / a[k * n + k]
            if f == 0 { continue }
            for j in k..<n { a[i * n + j] -= f * a[k * n + j] }
            x[i] -= f * x[k]
        }
    }
    for k in stride(from: n - 1, through: 0, by: -1) {
        var s = x[k]
        for j in (k + 1)..<n { s -= a[k * n + j] * x[j] }
        x[k] = s / a[k * n + k]
    }
    return x
}

/// [W | b] as a Dense matrix.
func parameterMatrix<S: KFACScalar>(weight: [S], bias: [S]?, out: Int, inFeatures: Int) -> Dense {
    let cols = inFeatures + (bias == nil ? 0 : 1)
    var m = Dense(rows: out, columns: cols)
    for o in 0..<out {
        for i in 0..<inFeatures { m[o, i] = Double(weight[o * inFeatures + i]) }
        if let bias { m[o, inFeatures] = Double(bias[o]) }
    }
    return m
}

/// The damped-Kronecker solves of the header's two inverse strategies, done densely.
func expectedDirection(a: Dense, g: Dense, v: Dense, damping: Double, strategy: InverseStrategy, usePi: Bool = true) -> Dense {
    switch strategy {
    case .eigen, .ekfac:  // EKFAC without paired recording: S = d_G d_Aᵀ, the eigen strategy
        let m = kronecker(a, g) + damping * Dense.identity(a.rows * g.rows)
        return unvec(denseSolve(m, vec(v)), rows: v.rows, columns: v.columns)
    case .cholesky:
        let pi = usePi ? ((a.trace / Double(a.rows)) / (g.trace / Double(g.rows))).squareRoot() : 1
        let ad = a + (pi * damping.squareRoot()) * Dense.identity(a.rows)
        let gd = g + (damping.squareRoot() / pi) * Dense.identity(g.rows)
        return unvec(denseSolve(kronecker(ad, gd), vec(v)), rows: v.rows, columns: v.columns)
    }
}
