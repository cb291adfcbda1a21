import XCTest
@testable import KFAC

/// The output factor from recorded columns (KFLR, the Monte-Carlo Fisher) and the misuse paths
/// of the Gauss-Newton calls.
final class CurvatureColumnsTests: XCTestCase {
    func testKFLRAtOneExampleIsExactGGNBlock() throws {
        for d in OutputDistribution.allCases {
            for bias in [true, false] {
                try Float.checkKFLRBlock(TinyNet.denseNet(d, bias: bias, grouped: false))
                try Double.checkKFLRBlock(TinyNet.denseNet(d, bias: bias, grouped: false))
            }
        }
    }

    func testOneColumnEqualsRecordOutputGradients() throws {
        try Float.checkOneColumnEqualsOutputGradients()
        try Double.checkOneColumnEqualsOutputGradients()
    }

    func testConvColumnsFactorIsPerPositionDefinition() throws {
        try Float.checkConvColumnFactor()
        try Double.checkConvColumnFactor()
    }

    func testMisuseLeavesEverythingUnchanged() throws {
        try Float.checkGaussNewtonMisuse()
        try Double.checkGaussNewtonMisuse()
    }
}

extension KFACScalar {
    /// At N = 1, A ⊗ G_KFLR (A from the layer's input, G from its K columns) is exactly the GGN
    /// block Jᵀ B J of the layer: (A ⊗ G) vec(V) = G V A against the block times v.
    static func checkKFLRBlock(_ net: TinyNet) throws {
        let xs = net.inputs(1, seed: 12)
        let opt = try register(net, channelsLast: false)
        for l in net.layers.indices {
            let (inputs, columns) = recordBuffers(net, layer: l, xs, channelsLast: false)
            try opt.recordInputs(layer: l, inputs, rows: 1)
            try opt.recordOutputGradientColumns(layer: l, inputs: nil, columns: columns, rows: 1, k: net.outputDim, uses: .factor)
        }
        try opt.updateFactors()
        // The same factors from the chain's own back-propagated columns.
        let viaChain = try register(net, channelsLast: false)
        try viaChain.defineDenseChain(layers: Array(net.layers.indices), activations: net.layers.map(\.activation),
                                      distribution: net.distribution)
        let w = net.parameters.enumerated().map { l, p in p[..<net.layers[l].weightCount].map { Self($0) } }
        let b = net.parameters.enumerated().map { l, p in net.layers[l].hasBias ? p[net.layers[l].weightCount...].map { Self($0) } : nil }
        let x = [xs.flatMap { $0 }.map { Self($0) }]
        try withPointers(w) { wp in try withPointers(b) { bp in try withPointers(x) { xp in
            try viaChain.denseChainForward(rows: 1, weights: wp, biases: bp, inputs: [xp[0]] + Array(repeating: nil, count: net.layers.count - 1),
                                           derivatives: Array(repeating: nil, count: net.layers.count), outputs: nil)
        } } }
        try viaChain.denseChainRecordColumns(uses: .factor)
        XCTAssertEqual(viaChain.gaussNewtonColumnInfo.values, 0, "FACTOR alone keeps nothing")
        for l in net.layers.indices { try viaChain.recordInputs(layer: l, recordBuffers(net, layer: l, xs, channelsLast: false).inputs, rows: 1) }
        try viaChain.updateFactors()
        for l in net.layers.indices {
            let (g1, g2) = (try opt.factors(layer: l).g, try viaChain.factors(layer: l).g)
            assertClose(Dense(rows: 1, columns: g2.count, g2), Dense(rows: 1, columns: g1.count, g1), gnTolerance,
                        "KFLR G from the chain's columns = from the caller's, layer \(l) \(net.distribution) \(Self.self)")
        }
        for l in net.layers.indices {
            guard case .dense(let i, let o) = net.layers[l].kind else { continue }
            let bias = net.layers[l].hasBias, ia = i + (bias ? 1 : 0)
            let (a, g) = try opt.factors(layer: l)
            let block = net.gaussNewtonBlock(layer: l, xs)
            let v = net.randomVector(seed: 13)[l]
            // V = [W | b] (o × ia); G V A.
            var gva = [Double](repeating: 0, count: o * ia)
            for r in 0..<o { for c in 0..<ia {
                var s = 0.0
                for r2 in 0..<o { for c2 in 0..<ia {
                    let vv = c2 < i ? v[r2 * i + c2] : v[o * i + r2]
                    s += Double(g[r * o + r2]) * vv * Double(a[c2 * ia + c])
                } }
                gva[r * ia + c] = s
            } }
            let fromFactors = (0..<net.layers[l].parameterCount).map { q in q < o * i ? gva[(q / i) * ia + q % i] : gva[(q - o * i) * ia + i] }
            let expected = (0..<block.rows).map { r in (0..<block.columns).reduce(0.0) { $0 + block[r, $1] * v[$1] } }
            let err = relativeError([fromFactors], [expected])
            XCTAssertLessThan(err, gnTolerance, "KFLR block \(net.distribution) layer \(l) bias \(bias) \(Self.self): \(err)")
        }
    }

    /// K = 1 columns record exactly what record_output_grads does (loss scale applied, rows
    /// counted once); LOSS_REDUCTION = MEAN does not apply to columns; K = 2 columns g/√2
    /// equal both gradients recorded as 2N rows (the Monte-Carlo Fisher with two samples).
    static func checkOneColumnEqualsOutputGradients() throws {
        var r = SeededRandom(40)
        let conv = Conv2dGeometry(inChannels: 2, outChannels: 4, kernel: (2, 2), groups: 2, input: (3, 3))
        func make(_ reduction: LossReduction) throws -> KFACOptimizer<Self> {
            let o = try KFACOptimizer<Self>()
            try o.addDense(inFeatures: 3, outFeatures: 4, hasBias: true)
            try o.addConv2d(conv)
            try o.set(.outputGradScale, 4.0)
            try o.set(.lossReduction, Int64(reduction.rawValue))
            return o
        }
        let n = 3
        let x0: [Self] = r.array(n * 3), x1: [Self] = r.array(n * 2 * 9)
        let g0: [Self] = r.array(n * 4), g1: [Self] = r.array(n * 4 * 4)
        let h0: [Self] = r.array(n * 4), h1: [Self] = r.array(n * 4 * 4)
        let viaGrads = try make(.sum), viaColumns = try make(.mean), viaTwo = try make(.sum), viaSamples = try make(.sum)
        for o in [viaGrads, viaColumns, viaTwo, viaSamples] {
            try o.recordInputs(layer: 0, x0, rows: n)
            try o.recordInputs(layer: 1, x1, rows: n)
        }
        try viaGrads.recordOutputGradients(layer: 0, g0, rows: n)
        try viaGrads.recordOutputGradients(layer: 1, g1, rows: n)
        try viaColumns.recordOutputGradientColumns(layer: 0, inputs: x0, columns: g0, rows: n, k: 1, uses: [.factor, .product])
        try viaColumns.recordOutputGradientColumns(layer: 1, inputs: nil, columns: g1, rows: n, k: 1, uses: .factor)
        try viaTwo.recordOutputGradients(layer: 0, g0 + h0, rows: 2 * n)
        try viaTwo.recordOutputGradients(layer: 1, g1 + h1, rows: 2 * n)
        let root = Self(2).squareRoot()
        try viaSamples.recordOutputGradientColumns(layer: 0, inputs: nil, columns: (g0 + h0).map { $0 / root }, rows: n, k: 2, uses: .factor)
        try viaSamples.recordOutputGradientColumns(layer: 1, inputs: nil, columns: (g1 + h1).map { $0 / root }, rows: n, k: 2, uses: .factor)
        for o in [viaGrads, viaColumns, viaTwo, viaSamples] { try o.updateFactors() }
        for l in 0..<2 {
            for group in 0..<(l == 0 ? 1 : 2) {
                XCTAssertEqual(try viaColumns.factors(layer: l, group: group).g, try viaGrads.factors(layer: l, group: group).g,
                               "K = 1 columns, layer \(l) group \(group) \(Self.self): bit-identical to record_output_grads")
                let (two, samples) = (try viaTwo.factors(layer: l, group: group).g, try viaSamples.factors(layer: l, group: group).g)
                let m = Dense(rows: 1, columns: two.count, two)
                assertClose(Dense(rows: 1, columns: samples.count, samples), m, tolerance(Self.self) * 10,
                            "K = 2 sampled columns / √2, layer \(l) \(Self.self)")
            }
        }
    }

    /// Conv Γ from K columns: (1/(N|T|)) Σ_n Σ_t Σ_k c_{n,t,k} c_{n,t,k}ᵀ per group (KFC's |T|).
    static func checkConvColumnFactor() throws {
        var r = SeededRandom(41)
        let g = Conv2dGeometry(inChannels: 2, outChannels: 4, kernel: (2, 2), groups: 2, input: (3, 4), layout: .channelsLast)
        let opt = try KFACOptimizer<Self>()
        try opt.addConv2d(g)
        let (n, k, t, cout) = (3, 3, g.outputPositions, 4)
        let c: [Self] = r.array(k * n * t * cout)
        try opt.recordInputs(layer: 0, r.array(n * 2 * 12), rows: n)
        try opt.recordOutputGradientColumns(layer: 0, inputs: nil, columns: c, rows: n, k: k, uses: .factor)
        try opt.updateFactors()
        for group in 0..<2 {
            var expected = Dense(rows: 2, columns: 2)
            for j in 0..<k { for e in 0..<n { for q in 0..<t { for a in 0..<2 { for b in 0..<2 {
                let base = ((j * n + e) * t + q) * cout + group * 2
                expected[a, b] += Double(c[base + a]) * Double(c[base + b]) / Double(n * t)
            } } } } }
            assertClose(Dense(rows: 2, columns: 2, try opt.factors(layer: 0, group: group).g), expected, tolerance(Self.self),
                        "conv KFLR Γ group \(group) \(Self.self)")
        }
    }

    static func checkGaussNewtonMisuse() throws {
        var r = SeededRandom(42)
        let opt = try KFACOptimizer<Self>()
        try opt.addDense(inFeatures: 3, outFeatures: 2, hasBias: true)
        try opt.addDense(inFeatures: 2, outFeatures: 2, hasBias: false)
        try opt.addConv2d(Conv2dGeometry(inChannels: 1, outChannels: 2, kernel: (2, 2), input: (2, 2)))
        func status(_ body: () throws -> Void) -> KFACStatus? {
            do { try body(); return nil } catch let e as KFACError { return e.status } catch { return .internal }
        }
        let v = [LayerGradient<Self>(weight: r.array(6), bias: r.array(2)), LayerGradient(weight: r.array(4), bias: nil),
                 LayerGradient(weight: r.array(8), bias: r.array(2))]
        XCTAssertEqual(status { _ = try opt.gaussNewtonProduct(v) }, .noColumns, "product before any columns")
        XCTAssertEqual(status { _ = try opt.denseChainProduct(v) }, .noColumns, "chain product before define")
        let x0: [Self] = r.array(4 * 3), c0: [Self] = r.array(2 * 4 * 2), c1: [Self] = r.array(2 * 4 * 2)
        try opt.recordOutputGradientColumns(layer: 0, inputs: x0, columns: c0, rows: 4, k: 2, uses: .product)
        let before = try opt.gaussNewtonProduct(v)
        let info = opt.gaussNewtonColumnInfo
        XCTAssertEqual(info.examples, 4); XCTAssertEqual(info.k, 2); XCTAssertEqual(info.values, 4 * 3 + 4 * 2 * 2)
        var bad = c1; bad[3] = .nan
        let x1: [Self] = r.array(4 * 2)
        let cases: [(String, KFACStatus, () throws -> Void)] = [
            ("unknown layer", .unknownLayer, { try opt.recordOutputGradientColumns(layer: 3, inputs: x1, columns: c1, rows: 4, k: 2, uses: .product) }),
            ("uses 0", .invalidArgument, { try opt.recordOutputGradientColumns(layer: 1, inputs: x1, columns: c1, rows: 4, k: 2, uses: ColumnUses(rawValue: 0)) }),
            ("uses 4", .invalidArgument, { try opt.recordOutputGradientColumns(layer: 1, inputs: x1, columns: c1, rows: 4, k: 2, uses: ColumnUses(rawValue: 4)) }),
            ("NULL inputs for products", .nullPointer, { try opt.recordOutputGradientColumns(layer: 1, inputs: nil, columns: c1, rows: 4, k: 2, uses: .product) }),
            ("k differs", .invalidSize, { try opt.recordOutputGradientColumns(layer: 1, inputs: x1, columns: Array(c1[..<8]), rows: 4, k: 1, uses: .product) }),
            ("non-finite columns", .nonFinite, { try opt.recordOutputGradientColumns(layer: 1, inputs: x1, columns: bad, rows: 4, k: 2, uses: [.factor, .product]) }),
            ("non-finite inputs", .nonFinite, { try opt.recordOutputGradientColumns(layer: 1, inputs: x1.map { _ in .infinity }, columns: c1, rows: 4, k: 2, uses: .product) }),
            ("wrong array size", .invalidSize, { try opt.recordOutputGradientColumns(layer: 1, inputs: x1, columns: c1, rows: 3, k: 2, uses: .product) }),
        ]
        for (name, expected, body) in cases {
            XCTAssertEqual(status(body), expected, "\(name) \(Self.self)")
            XCTAssertEqual(opt.gaussNewtonColumnInfo.values, info.values, "\(name): nothing kept")
        }
        XCTAssertEqual(status { try opt.recordOutputGradientColumns(layer: 1, inputs: nil, columns: c1, rows: 0, k: 2, uses: .factor) }, .invalidSize)
        XCTAssertEqual(status { try opt.recordOutputGradientColumns(layer: 1, inputs: nil, columns: [], rows: 4, k: 0, uses: .factor) }, .invalidSize)
        XCTAssertFalse(try opt.layerInfo(1).hasFactors)
        // Examples disagree across layers.
        try opt.recordOutputGradientColumns(layer: 1, inputs: Array(x1[..<6]), columns: Array(c1[..<6]) + Array(c1[8..<14]), rows: 3, k: 2, uses: .product)
        XCTAssertEqual(status { _ = try opt.gaussNewtonProduct(v) }, .invalidSize, "examples differ between layers")
        try opt.recordOutputGradientColumns(layer: 1, inputs: Array(x1[6...]), columns: Array(c1[6..<8]) + Array(c1[14..<16]), rows: 1, k: 2, uses: .product)
        let both = try opt.gaussNewtonProduct(v)
        XCTAssertNotEqual(both[0].weight, before[0].weight, "layer 1's columns change layer 0's product")
        XCTAssertEqual(both[2].weight, [Self](repeating: 0, count: 8), "layers without columns are not covered")
        // Vector misuse.
        var noBias = v; noBias[0].bias = nil
        var extraBias = v; extraBias[1].bias = [1, 2]
        var nan = v; nan[1].weight[0] = .nan
        XCTAssertEqual(status { _ = try opt.gaussNewtonProduct(noBias) }, .nullPointer)
        XCTAssertEqual(status { _ = try opt.gaussNewtonProduct(extraBias) }, .invalidArgument)
        XCTAssertEqual(status { _ = try opt.gaussNewtonProduct(nan) }, .nonFinite)
        XCTAssertEqual(status { _ = try opt.gaussNewtonProduct(Array(v[..<2])) }, .invalidSize)
        XCTAssertEqual(try opt.gaussNewtonProduct(v), both, "failed products change nothing")
        opt.clearGaussNewtonColumns()
        XCTAssertEqual(opt.gaussNewtonColumnInfo.values, 0)
        XCTAssertEqual(status { _ = try opt.gaussNewtonProduct(v) }, .noColumns, "after clear")

        // Chains.
        XCTAssertEqual(status { try opt.defineDenseChain(layers: [0, 2], activations: [.tanh, .identity], distribution: .gaussian) }, .invalidSize, "dense 2 outputs into a conv of 4 input values")
        XCTAssertEqual(status { try opt.defineDenseChain(layers: [1, 0], activations: [.tanh, .identity], distribution: .gaussian) }, .invalidSize)
        XCTAssertEqual(status { try opt.defineDenseChain(layers: [0, 1], activations: [.tanh, .tanh], distribution: .gaussian) }, .invalidArgument)
        XCTAssertEqual(status { try opt.defineDenseChain(layers: [0, 0], activations: [.tanh, .identity], distribution: .gaussian) }, .invalidArgument)
        XCTAssertEqual(status { try opt.defineDenseChain(layers: [0, 5], activations: [.tanh, .identity], distribution: .gaussian) }, .unknownLayer)
        XCTAssertEqual(status { try opt.defineDenseChain(layers: [0], activations: [], distribution: .gaussian) }, .invalidSize)
        XCTAssertEqual(status { try opt.denseChainForward(rows: 1, weights: [], biases: [], inputs: [], derivatives: [], outputs: nil) }, .noColumns)
        try opt.defineDenseChain(layers: [0, 1], activations: [.custom, .identity], distribution: .categorical)
        XCTAssertEqual(status { _ = try opt.denseChainProduct(v) }, .noColumns, "chain product before forward")
        XCTAssertEqual(status { try opt.denseChainRecordColumns(uses: .factor) }, .noColumns, "chain columns before forward")
        let w0: [Self] = r.array(6), b0: [Self] = r.array(2), w1: [Self] = r.array(4), xs: [Self] = r.array(3 * 3),
            a1: [Self] = r.array(3 * 2), d0: [Self] = r.array(3 * 2)
        try withPointers([w0, b0, w1, xs, a1, d0]) { p in
            func forward(_ w: [UnsafePointer<Self>?], _ b: [UnsafePointer<Self>?], _ a: [UnsafePointer<Self>?],
                         _ d: [UnsafePointer<Self>?], rows: Int = 3) -> KFACStatus? {
                status { try opt.denseChainForward(rows: rows, weights: w, biases: b, inputs: a, derivatives: d, outputs: nil) }
            }
            XCTAssertEqual(forward([p[0], p[2]], [p[1], nil], [p[3], p[4]], [nil, nil]), .nullPointer, "CUSTOM without derivatives")
            XCTAssertEqual(forward([p[0], p[2]], [p[1], nil], [p[3], nil], [p[5], nil]), .nullPointer, "CUSTOM without next inputs")
            XCTAssertEqual(forward([p[0], p[2]], [nil, nil], [p[3], p[4]], [p[5], nil]), .nullPointer, "missing bias")
            XCTAssertEqual(forward([p[0], p[2]], [p[1], p[1]], [p[3], p[4]], [p[5], nil]), .invalidArgument, "bias on a layer without")
            XCTAssertEqual(forward([p[0], nil], [p[1], nil], [p[3], p[4]], [p[5], nil]), .nullPointer, "NULL weight")
            XCTAssertEqual(forward([p[0]], [p[1]], [p[3]], [p[5]]), .invalidSize, "wrong count")
            XCTAssertEqual(forward([p[0], p[2]], [p[1], nil], [p[3], p[4]], [p[5], nil], rows: 0), .invalidSize, "rows 0")
            XCTAssertEqual(forward([p[0], p[2]], [p[1], nil], [nil, p[4]], [p[5], nil]), .nullPointer, "NULL inputs")
            XCTAssertNil(forward([p[0], p[2]], [p[1], nil], [p[3], p[4]], [p[5], nil]))
        }
        let chainProduct = try opt.denseChainProduct(v)
        XCTAssertEqual(status { try opt.denseChainRecordColumns(uses: ColumnUses(rawValue: 0)) }, .invalidArgument, "chain columns, uses 0")
        try opt.recordOutputGradientColumns(layer: 0, inputs: x0, columns: r.array(4 * 3 * 2), rows: 4, k: 3, uses: .product)
        XCTAssertEqual(status { try opt.denseChainRecordColumns(uses: [.factor, .product]) }, .invalidSize, "chain k 2 against kept 3")
        XCTAssertFalse(try opt.layerInfo(0).hasFactors)
        XCTAssertEqual(opt.gaussNewtonColumnInfo.examples, 4, "a failed chain recording keeps nothing")
        opt.clearGaussNewtonColumns()
        XCTAssertEqual(chainProduct[2].weight, [Self](repeating: 0, count: 8), "layers outside the chain are not covered")
        var huge = x1; huge[0] = .nan
        try withPointers([w0, b0, w1, huge, a1, d0]) { p in
            XCTAssertEqual(status { try opt.denseChainForward(rows: 3, weights: [p[0], p[2]], biases: [p[1], nil], inputs: [p[3], p[4]],
                                                              derivatives: [p[5], nil], outputs: nil) }, .nonFinite)
        }
        XCTAssertEqual(try opt.denseChainProduct(v), chainProduct, "a failed forward keeps the previous one")
        XCTAssertEqual(status { try opt.defineDenseChain(layers: [0, 2], activations: [.tanh, .identity], distribution: .gaussian) }, .invalidSize)
        XCTAssertEqual(try opt.denseChainProduct(v), chainProduct, "a failed define keeps the previous chain")
    }
}

import AllocationCounter

extension CurvatureColumnsTests {
    /// After the first product (scratch sized), column and chain products allocate nothing
    /// outside OpenBLAS: a CG solve can call them every iteration.
    func testSteadyStateProductsDoNotAllocate() throws {
        try Float.checkProductsDoNotAllocate()
        try Double.checkProductsDoNotAllocate()
    }
}

extension KFACScalar {
    static func checkProductsDoNotAllocate() throws {
        var r = SeededRandom(43)
        let opt = try KFACOptimizer<Self>()
        try opt.addDense(inFeatures: 3, outFeatures: 4, hasBias: true)
        try opt.addDense(inFeatures: 4, outFeatures: 2, hasBias: false)
        try opt.addConv2d(Conv2dGeometry(inChannels: 2, outChannels: 4, kernel: (2, 2), groups: 2, input: (3, 3), layout: .channelsLast))
        let n = 5
        try opt.recordOutputGradientColumns(layer: 0, inputs: r.array(n * 3), columns: r.array(2 * n * 4), rows: n, k: 2, uses: .product)
        try opt.recordOutputGradientColumns(layer: 1, inputs: r.array(n * 4), columns: r.array(2 * n * 2), rows: n, k: 2, uses: .product)
        try opt.recordOutputGradientColumns(layer: 2, inputs: r.array(n * 18), columns: r.array(2 * n * 16), rows: n, k: 2, uses: .product)
        try opt.defineDenseChain(layers: [0, 1], activations: [.logistic, .identity], distribution: .bernoulli)
        let w0: [Self] = r.array(12), b0: [Self] = r.array(4), w1: [Self] = r.array(8), x: [Self] = r.array(n * 3)
        try withPointers([w0, b0, w1, x]) { p in
            try opt.denseChainForward(rows: n, weights: [p[0], p[2]], biases: [p[1], nil], inputs: [p[3], nil],
                                      derivatives: [nil, nil], outputs: nil)
        }
        let sizes = [(12, 4), (8, 0), (32, 4)]
        let v = sizes.map { (UnsafeMutablePointer<Self>.allocate(capacity: $0.0), UnsafeMutablePointer<Self>.allocate(capacity: max($0.1, 1))) }
        let o = sizes.map { (UnsafeMutablePointer<Self>.allocate(capacity: $0.0), UnsafeMutablePointer<Self>.allocate(capacity: max($0.1, 1))) }
        defer { (v + o).forEach { $0.0.deallocate(); $0.1.deallocate() } }
        for (l, s) in sizes.enumerated() {
            for i in 0..<s.0 { v[l].0[i] = Self(r.uniform()) }
            for i in 0..<s.1 { v[l].1[i] = Self(r.uniform()) }
        }
        let vector = { (l: Int) -> ParameterVector<Self>? in ParameterVector(weight: v[l].0, bias: sizes[l].1 > 0 ? UnsafePointer(v[l].1) : nil) }
        let output = { (l: Int) -> ParameterGradient<Self>? in ParameterGradient(weight: o[l].0, bias: sizes[l].1 > 0 ? o[l].1 : nil) }
        try opt.gaussNewtonProduct(vector, into: output)
        try opt.denseChainProduct(vector, into: output)
        // A chain with a convolution (patches and col2im in the product).
        let convChain = try KFACOptimizer<Self>()
        try convChain.addConv2d(Conv2dGeometry(inChannels: 1, outChannels: 2, kernel: (2, 2), input: (3, 3)))
        try convChain.addDense(inFeatures: 8, outFeatures: 3, hasBias: true)
        try convChain.defineDenseChain(layers: [0, 1], activations: [.tanh, .identity], distribution: .categorical)
        let cw0: [Self] = r.array(8), cb0: [Self] = r.array(2), cw1: [Self] = r.array(24), cb1: [Self] = r.array(3), cx: [Self] = r.array(n * 9)
        try withPointers([cw0, cb0, cw1, cb1, cx]) { p in
            try convChain.denseChainForward(rows: n, weights: [p[0], p[2]], biases: [p[1], p[3]], inputs: [p[4], nil],
                                            derivatives: [nil, nil], outputs: nil)
        }
        let cv = [cw0, cb0, cw1, cb1].map { a -> UnsafeMutablePointer<Self> in
            let q = UnsafeMutablePointer<Self>.allocate(capacity: a.count); q.initialize(from: a, count: a.count); return q }
        let co = [cw0, cb0, cw1, cb1].map { a in UnsafeMutablePointer<Self>.allocate(capacity: a.count) }
        defer { (cv + co).forEach { $0.deallocate() } }
        let cvector = { (l: Int) -> ParameterVector<Self>? in ParameterVector(weight: cv[2 * l], bias: UnsafePointer(cv[2 * l + 1])) }
        let coutput = { (l: Int) -> ParameterGradient<Self>? in ParameterGradient(weight: co[2 * l], bias: co[2 * l + 1]) }
        try convChain.denseChainProduct(cvector, into: coutput)
        allocation_counter_start()
        for _ in 0..<3 { try convChain.denseChainProduct(cvector, into: coutput) }
        let convCount = allocation_counter_stop() - allocation_counter_openblas()
        XCTAssertEqual(convCount, 0, "\(Self.self): \(convCount) allocations in 3 conv-chain products")
        for chain in [false, true] {
            allocation_counter_start()
            for _ in 0..<3 {
                if chain { try opt.denseChainProduct(vector, into: output) } else { try opt.gaussNewtonProduct(vector, into: output) }
            }
            let count = allocation_counter_stop(), openblas = allocation_counter_openblas()
            XCTAssertEqual(count - openblas, 0, "\(Self.self): \(count - openblas) allocations in 3 \(chain ? "chain" : "column") products")
        }
    }
}
