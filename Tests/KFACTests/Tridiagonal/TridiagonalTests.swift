import XCTest
@testable import KFAC

/// Block-tridiagonal K-FAC (Martens & Grosse 2015 §4.3, seed 001 eq. 8) against dense oracles
/// built here from the library's own factors (`factors`, `crossFactors`): F̂⁻¹ = Ξᵀ Λ Ξ with
/// explicit Kronecker products and dense solves, in Float and Double.
final class TridiagonalTests: XCTestCase {
    func testEquation8MatchesDenseInverseBothSigns() throws {
        for sign in [-1.0, 1.0] {
            try Float.checkEquation8(sign: sign)
            try Double.checkEquation8(sign: sign)
        }
    }

    func testCrossFactorsMatchPerExampleLoopWithMovingAverage() throws {
        try Float.checkCrossFactors()
        try Double.checkCrossFactors()
    }

    func testInverseProductMatchesDenseGaussianGraphicalModel() throws {
        for layers in [3, 4] {
            try Float.checkChain(layers: layers)
            try Double.checkChain(layers: layers)
        }
    }

    func testSeparateChainsAndUnlinkedLayers() throws {
        try Float.checkPartialLinks(layers: 4, only: [0, 2])
        try Double.checkPartialLinks(layers: 4, only: [0, 2])
        try Float.checkPartialLinks(layers: 3, only: [1])
        try Double.checkPartialLinks(layers: 3, only: [1])
    }

    func testUncorrelatedLayersReduceToBlockDiagonalCholesky() throws {
        try Float.checkReducesToCholesky()
        try Double.checkReducesToCholesky()
    }

    func testResumeIsBitIdentical() throws {
        try Float.checkResume()
        try Double.checkResume()
    }

    func testSingularConditionalCovarianceFailsAndChangesNothing() throws {
        try Float.checkSingular()
        try Double.checkSingular()
    }

    /// CG's K-FAC preconditioner uses the linked layers' F̂⁻¹: the first search direction of PCG
    /// from x₀ = 0 for (G + λI) s = −g is F̂⁻¹(−g).
    func testConjugateGradientPreconditionsLinkedLayers() throws {
        try Double.checkConjugateGradient()
        try Float.checkConjugateGradient()
    }

    func testMisuse() throws {
        try Float.checkMisuse()
        try Double.checkMisuse()
    }
}

/// A chain of dense layers, layer l + 1 consuming layer l's output.
struct ChainNet<S: KFACScalar> {
    var shapes: [(inF: Int, outF: Int, bias: Bool)]
    var random: SeededRandom

    static func layers(_ n: Int) -> [(inF: Int, outF: Int, bias: Bool)] {
        Array([(4, 5, true), (5, 3, true), (3, 2, false), (2, 3, true)].prefix(n))
    }

    init(layers n: Int, seed: UInt64) {
        shapes = Self.layers(n)
        random = SeededRandom(seed)
    }

    func makeOptimizer(link: Bool = true, only lowers: [Int]? = nil,
                       _ configure: (inout KFACParameters) -> Void = { _ in }) throws -> KFACOptimizer<S> {
        let opt = try KFACOptimizer<S>()
        for s in shapes { try opt.addDense(inFeatures: s.inF, outFeatures: s.outF, hasBias: s.bias) }
        if link { for l in lowers ?? Array(0..<(shapes.count - 1)) { try opt.linkLayers(lower: l, upper: l + 1) } }
        var p = opt.parameters
        p.damping = 0.05
        p.inverseStrategy = .cholesky
        p.piDamping = true
        configure(&p)
        try opt.setParameters(p)
        return opt
    }

    /// Inputs and output gradients for every layer: a forward pass through tanh (so consecutive
    /// layers are correlated), random output gradients.
    mutating func batch(rows: Int) -> [(x: [S], g: [S])] {
        var x: [Double] = (0..<(rows * shapes[0].inF)).map { _ in random.uniform() }
        var out: [(x: [S], g: [S])] = []
        for s in shapes {
            let w = (0..<(s.inF * s.outF)).map { _ in random.uniform() }
            var y = [Double](repeating: 0, count: rows * s.outF)
            for n in 0..<rows {
                for o in 0..<s.outF {
                    var v = s.bias ? 0.1 : 0
                    for i in 0..<s.inF { v += w[o * s.inF + i] * x[n * s.inF + i] }
                    y[n * s.outF + o] = Foundation.tanh(v)
                }
            }
            out.append((x.map { S($0) }, random.array(rows * s.outF)))
            x = y
        }
        // Correlate the output gradients of consecutive layers too.
        for l in stride(from: shapes.count - 2, through: 0, by: -1) {
            let (o, uo) = (shapes[l].outF, shapes[l + 1].outF)
            for n in 0..<rows {
                for i in 0..<o { out[l].g[n * o + i] += S(0.7) * out[l + 1].g[n * uo + i % uo] }
            }
        }
        return out
    }

    func record(_ opt: KFACOptimizer<S>, _ b: [(x: [S], g: [S])], rows: Int) throws {
        for l in b.indices { try opt.recordInputs(layer: l, b[l].x, rows: rows) }
        for l in b.indices.reversed() { try opt.recordOutputGradients(layer: l, b[l].g, rows: rows) }
    }

    var sizes: [(o: Int, a: Int)] { shapes.map { ($0.outF, $0.inF + ($0.bias ? 1 : 0)) } }
    var total: Int { sizes.reduce(0) { $0 + $1.o * $1.a } }
    var offsets: [Int] { sizes.indices.map { l in sizes[..<l].reduce(0) { $0 + $1.o * $1.a } } }

    /// Applies the optimizer's all-layer product at `power` to the stacked vec(V_l) (column-major
    /// per layer).
    func product(_ opt: KFACOptimizer<S>, _ v: [Double], power: CurvaturePower) throws -> [Double] {
        var weights: [UnsafeMutablePointer<S>] = [], biases: [UnsafeMutablePointer<S>?] = []
        defer { weights.forEach { $0.deallocate() }; biases.forEach { $0?.deallocate() } }
        for (l, s) in shapes.enumerated() {
            let w = UnsafeMutablePointer<S>.allocate(capacity: s.inF * s.outF)
            let b: UnsafeMutablePointer<S>? = s.bias ? .allocate(capacity: s.outF) : nil
            scatter(v, layer: l, weight: w, bias: b)
            weights.append(w); biases.append(b)
        }
        try opt.multiply(power: power) { ParameterGradient(weight: weights[$0], bias: biases[$0]) }
        var u = [Double](repeating: 0, count: total)
        for l in shapes.indices { gather(&u, layer: l, weight: weights[l], bias: biases[l]) }
        return u
    }

    func scatter(_ v: [Double], layer l: Int, weight: UnsafeMutablePointer<S>, bias: UnsafeMutablePointer<S>?) {
        let s = shapes[l], (o, a) = sizes[l], base = offsets[l]
        for j in 0..<a { for i in 0..<o {
            let x = S(v[base + j * o + i])
            if j < s.inF { weight[i * s.inF + j] = x } else { bias![i] = x }
        } }
    }

    func gather(_ v: inout [Double], layer l: Int, weight: UnsafePointer<S>, bias: UnsafePointer<S>?) {
        let s = shapes[l], (o, a) = sizes[l], base = offsets[l]
        for j in 0..<a { for i in 0..<o {
            v[base + j * o + i] = Double(j < s.inF ? weight[i * s.inF + j] : bias![i])
        } }
    }

    /// The library's operator at `power` as a dense matrix (columns = images of unit vectors).
    func operatorMatrix(_ opt: KFACOptimizer<S>, power: CurvaturePower) throws -> Dense {
        var m = Dense(rows: total, columns: total)
        for c in 0..<total {
            var e = [Double](repeating: 0, count: total)
            e[c] = 1
            let u = try product(opt, e, power: power)
            for r in 0..<total { m[r, c] = u[r] }
        }
        return m
    }

    /// The oracle: damped diagonal factors, cross factors, Ψ, Σ and F̂⁻¹ = Ξᵀ Λ Ξ, all dense, from
    /// the optimizer's own running factors.
    func denseModel(_ opt: KFACOptimizer<S>, damping: Double, only lowers: [Int]? = nil) throws -> (inverse: Dense, diagonal: [Dense], cross: [Dense]) {
        let linked = Set(lowers ?? Array(0..<(shapes.count - 1)))
        let n = shapes.count
        var ad: [Dense] = [], gd: [Dense] = []
        for l in 0..<n {
            let (o, a) = sizes[l]
            let f = try opt.factors(layer: l)
            let (am, gm) = (Dense(rows: a, columns: a, f.a), Dense(rows: o, columns: o, f.g))
            let pi = ((am.trace / Double(a)) / (gm.trace / Double(o))).squareRoot()
            ad.append(am + (pi * damping.squareRoot()) * Dense.identity(a))
            gd.append(gm + (damping.squareRoot() / pi) * Dense.identity(o))
        }
        let diagonal = (0..<n).map { kronecker(ad[$0], gd[$0]) }
        var cross: [Dense] = []
        for l in 0..<(n - 1) {
            guard linked.contains(l) else {
                cross.append(Dense(rows: sizes[l].o * sizes[l].a, columns: sizes[l + 1].o * sizes[l + 1].a))
                continue
            }
            let c = try opt.crossFactors(lower: l)
            cross.append(kronecker(Dense(rows: sizes[l].a, columns: sizes[l + 1].a, c.a),
                                   Dense(rows: sizes[l].o, columns: sizes[l + 1].o, c.g)))
        }
        // Ψ_l = F̃_{l,l+1} F̃_{l+1,l+1}⁻¹, Σ_l = F̃_{l,l} − Ψ_l F̃_{l+1,l+1} Ψ_lᵀ.
        var xi = Dense.identity(total), lambda = Dense(rows: total, columns: total)
        for l in 0..<n {
            let sigma: Dense
            if l < n - 1 && linked.contains(l) {
                let psi = transpose(solveColumns(diagonal[l + 1], transpose(cross[l])))
                xiBlock(&xi, l, l + 1, -1.0 * psi)
                sigma = diagonal[l] + (-1.0) * multiply(multiply(psi, diagonal[l + 1]), transpose(psi))
            } else {
                sigma = diagonal[l]
            }
            xiBlock(&lambda, l, l, solveColumns(sigma, Dense.identity(sigma.rows)))
        }
        return (multiply(multiply(transpose(xi), lambda), xi), diagonal, cross)
    }

    func xiBlock(_ m: inout Dense, _ bi: Int, _ bj: Int, _ b: Dense) {
        for i in 0..<b.rows { for j in 0..<b.columns { m[offsets[bi] + i, offsets[bj] + j] = b[i, j] } }
    }

    func block(_ m: Dense, _ bi: Int, _ bj: Int) -> Dense {
        let (r, c) = (sizes[bi].o * sizes[bi].a, sizes[bj].o * sizes[bj].a)
        var b = Dense(rows: r, columns: c)
        for i in 0..<r { for j in 0..<c { b[i, j] = m[offsets[bi] + i, offsets[bj] + j] } }
        return b
    }
}

// transpose(_:) is EKFACOracles.swift's.
fileprivate func multiply(_ a: Dense, _ b: Dense) -> Dense {
    var c = Dense(rows: a.rows, columns: b.columns)
    for i in 0..<a.rows { for k in 0..<a.columns where a[i, k] != 0 { for j in 0..<b.columns { c[i, j] += a[i, k] * b[k, j] } } }
    return c
}

/// M⁻¹ B column by column.
fileprivate func solveColumns(_ m: Dense, _ b: Dense) -> Dense {
    var x = Dense(rows: b.rows, columns: b.columns)
    for j in 0..<b.columns {
        let s = denseSolve(m, (0..<b.rows).map { b[$0, j] })
        for i in 0..<b.rows { x[i, j] = s[i] }
    }
    return x
}

fileprivate func randomSPD(_ n: Int, _ r: inout SeededRandom, shift: Double) -> Dense {
    var x = Dense(rows: n, columns: n)
    for i in x.values.indices { x.values[i] = r.uniform() }
    return multiply(x, transpose(x)) + shift * Dense.identity(n)
}

extension KFACScalar {
    static var chainTolerance: Double { Self.self == Float.self ? 2e-3 : 1e-12 }

    static func checkEquation8(sign: Double) throws {
        var r = SeededRandom(7)
        let (m, n) = (4, 3)
        let a = randomSPD(m, &r, shift: 2), g = randomSPD(n, &r, shift: 2)
        var c = randomSPD(m, &r, shift: 0), d = randomSPD(n, &r, shift: 0)
        c = 0.25 * c; d = 0.25 * d
        let inverse = try KroneckerPairInverse<Self>(inputDimension: m, outputDimension: n)
        let workspace = try EigenWorkspace<Self>()
        let scratch = try AlignedBuffer<Self>(rows: m, columns: m)
        func buffer(_ x: Dense) throws -> AlignedBuffer<Self> {
            let b = try AlignedBuffer<Self>(rows: x.rows, columns: x.columns)
            for i in x.values.indices { b.base[i] = Self(x.values[i]) }
            return b
        }
        let (ab, gb, cb, db) = (try buffer(a), try buffer(g), try buffer(c), try buffer(d))
        try inverse.computeSide(.input, factor: ab.base, other: cb.base, factorScratch: scratch.base, workspace: workspace)
        try inverse.computeSide(.output, factor: gb.base, other: db.base, factorScratch: scratch.base, workspace: workspace)
        try inverse.finish(sign: Self(sign), minimumDenominator: Self.ulpOfOne.squareRoot())
        var w = Dense(rows: n, columns: m)
        for i in w.values.indices { w.values[i] = r.uniform() }
        let wb = try buffer(w), zb = try AlignedBuffer<Self>(rows: n, columns: m), sb = try AlignedBuffer<Self>(rows: n, columns: m)
        inverse.apply(wb.base, into: zb.base, scratch: sb.base)
        let matrix = kronecker(a, g) + sign * kronecker(c, d)
        let expected = unvec(denseSolve(matrix, vec(w)), rows: n, columns: m)
        assertClose(Dense(rows: n, columns: m, Array(UnsafeBufferPointer(start: zb.base, count: n * m))), expected,
                    Self.self == Float.self ? 1e-4 : 1e-12, "\(Self.self) eq. 8 with sign \(sign)")
    }

    static func checkCrossFactors() throws {
        var net = ChainNet<Self>(layers: 3, seed: 3)
        let opt = try net.makeOptimizer { $0.factorDecay = 0.8; $0.lossReduction = .mean; $0.outputGradScale = 2 }
        let rows = 6
        var expectedA = [Dense](), expectedG = [Dense]()
        for fold in 0..<3 {
            let b = net.batch(rows: rows)
            // Record in two parts to exercise pairing across calls.
            for l in b.indices {
                let w = net.shapes[l].inF
                try opt.recordInputs(layer: l, Array(b[l].x[0..<(2 * w)]), rows: 2)
            }
            for l in b.indices {
                let w = net.shapes[l].inF
                try opt.recordInputs(layer: l, Array(b[l].x[(2 * w)...]), rows: rows - 2)
            }
            for l in b.indices.reversed() { try opt.recordOutputGradients(layer: l, b[l].g, rows: rows) }
            try opt.updateFactors()
            for l in 0..<2 {
                let (s, u) = (net.shapes[l], net.shapes[l + 1])
                var ax = Dense(rows: s.inF + 1, columns: u.inF + (u.bias ? 1 : 0))
                var gx = Dense(rows: s.outF, columns: u.outF)
                let scale = Double(rows) / 2  // mean reduction over the output-gradient scale
                for n in 0..<rows {
                    var x = (0..<s.inF).map { Double(b[l].x[n * s.inF + $0]) } + [1]
                    var y = (0..<u.inF).map { Double(b[l + 1].x[n * u.inF + $0]) }
                    if u.bias { y.append(1) }
                    for i in 0..<x.count { for j in 0..<y.count { ax[i, j] += x[i] * y[j] / Double(rows) } }
                    x = (0..<s.outF).map { scale * Double(b[l].g[n * s.outF + $0]) }
                    y = (0..<u.outF).map { scale * Double(b[l + 1].g[n * u.outF + $0]) }
                    for i in 0..<x.count { for j in 0..<y.count { gx[i, j] += x[i] * y[j] / Double(rows) } }
                }
                if fold == 0 {
                    expectedA.append(ax); expectedG.append(gx)
                } else {
                    expectedA[l] = 0.8 * expectedA[l] + 0.2 * ax
                    expectedG[l] = 0.8 * expectedG[l] + 0.2 * gx
                }
                let got = try opt.crossFactors(lower: l)
                assertClose(Dense(rows: ax.rows, columns: ax.columns, got.a), expectedA[l], tolerance(Self.self), "\(Self.self) A_{\(l),\(l + 1)}")
                assertClose(Dense(rows: gx.rows, columns: gx.columns, got.g), expectedG[l], tolerance(Self.self), "\(Self.self) G_{\(l),\(l + 1)}")
            }
        }
    }

    static func checkChain(layers: Int) throws {
        var net = ChainNet<Self>(layers: layers, seed: 11 + UInt64(layers))
        let opt = try net.makeOptimizer { $0.factorDecay = 0.5 }
        for _ in 0..<2 {
            try net.record(opt, net.batch(rows: 9), rows: 9)
            try opt.updateFactors()
        }
        try opt.updateInverses()
        let model = try net.denseModel(opt, damping: 0.05)
        let tol = chainTolerance
        // Directions against the dense Ξᵀ Λ Ξ.
        for _ in 0..<3 {
            let v = (0..<net.total).map { _ in net.random.uniform() }
            let u = try net.product(opt, v, power: .inverse)
            let expected = multiply(model.inverse, Dense(rows: net.total, columns: 1, v))
            assertClose(Dense(rows: net.total, columns: 1, u), expected, tol, "\(Self.self) \(layers) layers: F̂⁻¹ v")
            // Forward then inverse: the identity.
            let back = try net.product(opt, try net.product(opt, v, power: .one), power: .inverse)
            assertClose(Dense(rows: net.total, columns: 1, back), Dense(rows: net.total, columns: 1, v),
                        Self.self == Float.self ? 2e-3 : 1e-10, "\(Self.self) \(layers) layers: F̂⁻¹ F̂ v")
        }
        // The library's F̂⁻¹ is zero beyond the first off-diagonal; its F̂ agrees with the damped
        // Kronecker blocks on the diagonal and the first off-diagonal.
        let inverse = try net.operatorMatrix(opt, power: .inverse)
        assertClose(inverse, model.inverse, tol, "\(Self.self) \(layers) layers: F̂⁻¹ as a matrix")
        let forward = try net.operatorMatrix(opt, power: .one)
        for i in 0..<layers {
            for j in 0..<layers where abs(i - j) > 1 {
                XCTAssertLessThan(net.block(inverse, i, j).maxAbs, Self.self == Float.self ? 1e-5 : 1e-14,
                                  "\(Self.self): F̂⁻¹ block (\(i), \(j)) is not zero")
            }
            assertClose(net.block(forward, i, i), model.diagonal[i], Self.self == Float.self ? 2e-3 : 1e-10,
                        "\(Self.self): F̂ block (\(i), \(i)) is not Ā ⊗ Ḡ")
            if i + 1 < layers {
                assertClose(net.block(forward, i, i + 1), model.cross[i], Self.self == Float.self ? 2e-3 : 1e-10,
                            "\(Self.self): F̂ block (\(i), \(i + 1)) is not A_{l,l+1} ⊗ G_{l,l+1}")
                assertClose(net.block(forward, i + 1, i), transpose(model.cross[i]), Self.self == Float.self ? 2e-3 : 1e-10,
                            "\(Self.self): F̂ block (\(i + 1), \(i))")
            }
        }
        // The step preconditions with the same F̂⁻¹ (no KL clip).
        let step = try net.makeOptimizer { $0.factorDecay = 0.5; $0.factorUpdatePeriod = 1; $0.inverseUpdatePeriod = 1; $0.klClip = 0 }
        var twin = ChainNet<Self>(layers: layers, seed: 11 + UInt64(layers))
        let b1 = twin.batch(rows: 9), b2 = twin.batch(rows: 9)
        try twin.record(step, b1, rows: 9)
        var zero = twin.shapes.map { LayerGradient<Self>(weight: .init(repeating: 0, count: $0.inF * $0.outF), bias: $0.bias ? .init(repeating: 0, count: $0.outF) : nil) }
        try step.step(&zero)
        try twin.record(step, b2, rows: 9)
        let v = (0..<net.total).map { _ in twin.random.uniform() }
        var grads = zero
        for l in twin.shapes.indices {
            let w = UnsafeMutablePointer<Self>.allocate(capacity: grads[l].weight.count)
            let b: UnsafeMutablePointer<Self>? = grads[l].bias.map { .allocate(capacity: $0.count) }
            twin.scatter(v, layer: l, weight: w, bias: b)
            grads[l].weight = Array(UnsafeBufferPointer(start: w, count: grads[l].weight.count))
            if let b { grads[l].bias = Array(UnsafeBufferPointer(start: b, count: grads[l].bias!.count)) }
            w.deallocate(); b?.deallocate()
        }
        try step.step(&grads)
        var u = [Double](repeating: 0, count: net.total)
        for l in twin.shapes.indices {
            grads[l].weight.withUnsafeBufferPointer { w in
                if let bias = grads[l].bias {
                    bias.withUnsafeBufferPointer { b in twin.gather(&u, layer: l, weight: w.baseAddress!, bias: b.baseAddress) }
                } else {
                    twin.gather(&u, layer: l, weight: w.baseAddress!, bias: nil)
                }
            }
        }
        let viaProduct = try twin.product(step, v, power: .inverse)
        assertClose(Dense(rows: net.total, columns: 1, u), Dense(rows: net.total, columns: 1, viaProduct), tol,
                    "\(Self.self) \(layers) layers: step direction against the product")
        let expected = multiply(try twin.denseModel(step, damping: 0.05).inverse, Dense(rows: net.total, columns: 1, v))
        assertClose(Dense(rows: net.total, columns: 1, u), expected, tol, "\(Self.self) \(layers) layers: step direction")
    }

    /// Two chains (0–1, 2–3) or a chain beside an unlinked layer (Cholesky strategy): F̂⁻¹ is
    /// block-diagonal between chains, the unlinked layer's block the Cholesky/π inverse.
    static func checkPartialLinks(layers: Int, only lowers: [Int]) throws {
        var net = ChainNet<Self>(layers: layers, seed: 31 + UInt64(layers))
        let opt = try net.makeOptimizer(only: lowers) { $0.factorDecay = 0.5 }
        for _ in 0..<2 {
            try net.record(opt, net.batch(rows: 9), rows: 9)
            try opt.updateFactors()
        }
        try opt.updateInverses()
        let model = try net.denseModel(opt, damping: 0.05, only: lowers)
        for _ in 0..<3 {
            let v = (0..<net.total).map { _ in net.random.uniform() }
            let u = try net.product(opt, v, power: .inverse)
            let expected = multiply(model.inverse, Dense(rows: net.total, columns: 1, v))
            assertClose(Dense(rows: net.total, columns: 1, u), expected, chainTolerance, "\(Self.self) links \(lowers) of \(layers) layers")
            let back = try net.product(opt, try net.product(opt, v, power: .one), power: .inverse)
            assertClose(Dense(rows: net.total, columns: 1, back), Dense(rows: net.total, columns: 1, v),
                        Self.self == Float.self ? 2e-3 : 1e-10, "\(Self.self) links \(lowers): F̂⁻¹ F̂ v")
        }
    }

    /// Data whose cross moments vanish (rows in ± pairs for the upper layer): Ψ = 0, so the
    /// tridiagonal directions are the block-diagonal Cholesky/π ones.
    static func checkReducesToCholesky() throws {
        let net = ChainNet<Self>(layers: 2, seed: 5)
        var r = SeededRandom(9)
        let rows = 8
        var b: [(x: [Self], g: [Self])] = []
        for s in net.shapes {
            var x: [Self] = [], g: [Self] = []
            for _ in 0..<(rows / 2) {
                let xr: [Self] = r.array(s.inF), gr: [Self] = r.array(s.outF)
                x += xr + xr; g += gr + gr
            }
            b.append((x, g))
        }
        // Lower rows come in equal pairs, upper rows in ± pairs: Σ x_lower x_upperᵀ = 0 (no biases).
        for n in stride(from: 1, to: rows, by: 2) {
            let s = net.shapes[1]
            for i in 0..<s.inF { b[1].x[n * s.inF + i] = -b[1].x[n * s.inF + i] }
            for i in 0..<s.outF { b[1].g[n * s.outF + i] = -b[1].g[n * s.outF + i] }
        }
        var plain = net
        plain.shapes = [(4, 5, false), (5, 3, false)]
        let linked = try plain.makeOptimizer()
        let blockDiagonal = try plain.makeOptimizer(link: false)
        for opt in [linked, blockDiagonal] {
            try plain.record(opt, b, rows: rows)
            try opt.updateFactors()
            try opt.updateInverses()
        }
        let cross = try linked.crossFactors(lower: 0)
        XCTAssertLessThan(cross.a.map { Double($0.magnitude) }.max()!, 1e-6)
        let v = (0..<plain.total).map { _ in r.uniform() }
        let u = try plain.product(linked, v, power: .inverse), expected = try plain.product(blockDiagonal, v, power: .inverse)
        assertClose(Dense(rows: plain.total, columns: 1, u), Dense(rows: plain.total, columns: 1, expected),
                    Self.self == Float.self ? 1e-4 : 1e-12, "\(Self.self): zero cross factors give the Cholesky/π directions")
    }

    static func checkResume() throws {
        var net = ChainNet<Self>(layers: 3, seed: 21)
        let configure: (inout KFACParameters) -> Void = {
            $0.factorDecay = 0.9; $0.factorUpdatePeriod = 1; $0.inverseUpdatePeriod = 2; $0.klClip = 0.01; $0.learningRate = 0.1
        }
        let a = try net.makeOptimizer(configure)
        let batches = (0..<5).map { _ in net.batch(rows: 7) }
        let grads = net.shapes.map { s in LayerGradient<Self>(weight: net.random.array(s.inF * s.outF), bias: s.bias ? net.random.array(s.outF) : nil) }
        var image: [UInt8] = []
        var directionsA: [[LayerGradient<Self>]] = []
        for (k, b) in batches.enumerated() {
            if k == 2 {
                // Save with half-recorded statistics: unpaired rows on the links.
                for l in b.indices { try a.recordInputs(layer: l, b[l].x, rows: 7) }
                image = try a.stateImage()
                for l in b.indices.reversed() { try a.recordOutputGradients(layer: l, b[l].g, rows: 7) }
            } else {
                try net.record(a, b, rows: 7)
            }
            var g = grads
            try a.step(&g)
            if k >= 2 { directionsA.append(g) }
        }
        let c = try net.makeOptimizer(configure)
        try image.withUnsafeBytes { try c.loadState(from: $0) }
        var directionsC: [[LayerGradient<Self>]] = []
        for k in 2..<5 {
            let b = batches[k]
            if k == 2 {
                for l in b.indices.reversed() { try c.recordOutputGradients(layer: l, b[l].g, rows: 7) }
            } else {
                try net.record(c, b, rows: 7)
            }
            var g = grads
            try c.step(&g)
            directionsC.append(g)
        }
        XCTAssertEqual(directionsA, directionsC, "\(Self.self): resumed directions differ")
        XCTAssertTrue(try a.stateImage() == c.stateImage(), "\(Self.self): resumed state differs")
    }

    /// Output gradients of the lower layer that are a linear map of the upper layer's, and
    /// biases on both sides (s_max = 1 exactly without damping): with a negligible damping
    /// Σ_{0|1} is singular.
    static func checkSingular() throws {
        var net = ChainNet<Self>(layers: 2, seed: 13)
        let opt = try net.makeOptimizer { $0.damping = 1e-30 }
        var b = net.batch(rows: 12)
        for n in 0..<12 {
            for i in 0..<5 { b[0].g[n * 5 + i] = b[1].g[n * 3 + i % 3] }
            // Lower inputs determine the upper ones exactly: identical columns reused.
            for i in 0..<5 { b[1].x[n * 5 + i] = b[0].x[n * 4 + i % 4] }
        }
        try net.record(opt, b, rows: 12)
        try opt.updateFactors()
        let before = try opt.stateImage()
        XCTAssertThrowsError(try opt.updateInverses()) { e in
            XCTAssertEqual((e as? KFACError)?.status, .notPositiveDefinite, "\(Self.self): \(e)")
        }
        XCTAssertTrue(try opt.stateImage() == before, "\(Self.self): a failed inversion changed the handle")
        XCTAssertFalse(try opt.layerInfo(0).hasInverses)
    }

    static func checkConjugateGradient() throws {
        var net = ChainNet<Self>(layers: 3, seed: 41)
        let opt = try net.makeOptimizer()
        try net.record(opt, net.batch(rows: 9), rows: 9)
        try opt.updateFactors()
        try opt.updateInverses()
        let g = (0..<net.total).map { _ in net.random.uniform() }
        var gradient = opt.zeroLayerArrays()
        for l in net.shapes.indices {
            let w = UnsafeMutablePointer<Self>.allocate(capacity: gradient[l].weight.count)
            let b: UnsafeMutablePointer<Self>? = gradient[l].bias.map { .allocate(capacity: $0.count) }
            net.scatter(g, layer: l, weight: w, bias: b)
            gradient[l].weight = Array(UnsafeBufferPointer(start: w, count: gradient[l].weight.count))
            if let b { gradient[l].bias = Array(UnsafeBufferPointer(start: b, count: gradient[l].bias!.count)) }
            w.deallocate(); b?.deallocate()
        }
        let request = try opt.beginConjugateGradient(CGOptions(tolerance: 1e-6, preconditioner: .kfac), gradient: gradient)
        XCTAssertEqual(request, .needProduct)
        let p = try opt.conjugateGradientVector()
        var u = [Double](repeating: 0, count: net.total)
        for l in net.shapes.indices {
            p[l].weight.withUnsafeBufferPointer { w in
                if let bias = p[l].bias {
                    bias.withUnsafeBufferPointer { b in net.gather(&u, layer: l, weight: w.baseAddress!, bias: b.baseAddress) }
                } else {
                    net.gather(&u, layer: l, weight: w.baseAddress!, bias: nil)
                }
            }
        }
        let expected = try net.product(opt, g.map { -$0 }, power: .inverse)
        assertClose(Dense(rows: net.total, columns: 1, u), Dense(rows: net.total, columns: 1, expected),
                    Self.self == Float.self ? 1e-4 : 1e-12, "\(Self.self): CG's first direction is F̂⁻¹(−g)")
    }

    static func checkMisuse() throws {
        let net = ChainNet<Self>(layers: 3, seed: 1)
        let opt = try net.makeOptimizer(link: false)
        func expect(_ status: KFACStatus, _ body: () throws -> Void, _ what: String) {
            XCTAssertThrowsError(try body(), what) { e in XCTAssertEqual((e as? KFACError)?.status, status, "\(what): \(e)") }
        }
        expect(.unknownLayer, { try opt.linkLayers(lower: 2, upper: 3) }, "unknown layer")
        expect(.invalidArgument, { try opt.linkLayers(lower: 0, upper: 2) }, "not consecutive")
        try opt.linkLayers(lower: 0, upper: 1)
        expect(.invalidArgument, { try opt.linkLayers(lower: 0, upper: 1) }, "twice")
        let mismatched = try KFACOptimizer<Self>()
        try mismatched.addDense(inFeatures: 4, outFeatures: 5, hasBias: true)
        try mismatched.addDense(inFeatures: 6, outFeatures: 2, hasBias: true)
        expect(.invalidSize, { try mismatched.linkLayers(lower: 0, upper: 1) }, "sizes")
        try mismatched.addConv2d(Conv2dGeometry(inChannels: 1, outChannels: 1, kernel: (1, 1), input: (1, 2)))
        expect(.invalidArgument, { try mismatched.linkLayers(lower: 1, upper: 2) }, "conv")
        expect(.invalidArgument, { _ = try opt.crossFactors(lower: 1) }, "no link")
        expect(.noStatistics, { _ = try opt.crossFactors(lower: 0) }, "no statistics")
        // Rows that do not pair: the fold fails and changes nothing.
        var data = ChainNet<Self>(layers: 3, seed: 1)
        let b = data.batch(rows: 5)
        try opt.recordInputs(layer: 0, b[0].x, rows: 5)
        try opt.recordInputs(layer: 1, Array(b[1].x[0..<(4 * 5)]), rows: 4)
        try opt.recordInputs(layer: 2, b[2].x, rows: 5)
        for l in 0..<3 { try opt.recordOutputGradients(layer: l, b[l].g, rows: 5) }
        var g = data.shapes.map { LayerGradient<Self>(weight: .init(repeating: 1, count: $0.inF * $0.outF), bias: $0.bias ? .init(repeating: 1, count: $0.outF) : nil) }
        var p = opt.parameters
        p.factorUpdatePeriod = 1; p.inverseUpdatePeriod = 1
        try opt.setParameters(p)
        let before = try opt.stateImage()
        expect(.invalidSize, { try opt.updateFactors() }, "unpaired rows")
        expect(.invalidSize, { try opt.step(&g) }, "unpaired rows in a step")
        XCTAssertTrue(try opt.stateImage() == before, "\(Self.self): a failed fold or step changed the handle")
        expect(.layersFrozen, { try opt.linkLayers(lower: 1, upper: 2) }, "after statistics")
        // The missing row; then single-layer products are unsupported on linked layers.
        try opt.recordInputs(layer: 1, Array(b[1].x[(4 * 5)...]), rows: 1)
        try opt.step(&g)
        var w = g[0].weight, bias = g[0].bias!
        expect(.unsupported, { try w.withUnsafeMutableBufferPointer { wp in try bias.withUnsafeMutableBufferPointer { bp in
            try opt.precondition(layer: 0, weight: wp.baseAddress!, bias: bp.baseAddress) } } }, "single-layer precondition")
        var w2 = g[2].weight, b2 = g[2].bias
        XCTAssertNil(b2)
        try w2.withUnsafeMutableBufferPointer { wp in try opt.precondition(layer: 2, weight: wp.baseAddress!, bias: nil) }
        _ = b2
        p.factorDampingPeriod = 2; p.factorDampingDecay = 0.9; p.factorDamping = 0.05
        try opt.setParameters(p)
        try net.record(opt, b, rows: 5)
        expect(.unsupported, { try opt.step(&g) }, "γ re-choice with links")
        b2 = nil
    }
}
