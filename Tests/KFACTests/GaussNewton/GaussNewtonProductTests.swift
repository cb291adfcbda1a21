import XCTest
@testable import KFAC

/// G·v from stored Jacobian columns and from the dense chain's R operator against the explicit
/// (1/N) Σ_n J_nᵀ B_n J_n v of `TinyNet` (central-difference Jacobians, B written out), the three
/// output distributions, with and without bias, grouping, convolutions (groups, channels-last);
/// the deep linear Gaussian net's exact Hessian block (seed 000); S Sᵀ = B and B·q.
final class GaussNewtonProductTests: XCTestCase {
    func testOutputHessianRootAndProduct() {
        Float.checkOutputHessian()
        Double.checkOutputHessian()
    }

    func testColumnProductMatchesExplicitDense() throws {
        for d in OutputDistribution.allCases {
            for bias in [true, false] {
                try Float.checkColumnProduct(TinyNet.denseNet(d, bias: bias, grouped: false), "dense \(d) bias \(bias)")
                try Double.checkColumnProduct(TinyNet.denseNet(d, bias: bias, grouped: !bias), "dense \(d) bias \(bias)")
            }
        }
    }

    func testColumnProductMatchesExplicitConv() throws {
        for d in OutputDistribution.allCases {
            for (bias, last) in [(true, false), (false, true)] {
                try Float.checkColumnProduct(TinyNet.convNet(d, bias: bias), "conv \(d) bias \(bias)", channelsLast: last)
                try Double.checkColumnProduct(TinyNet.convNet(d, bias: bias), "conv \(d) bias \(bias)", channelsLast: !last)
            }
        }
    }

    func testChainProductMatchesExplicit() throws {
        let activations: [[ChainActivation]] = [[.tanh, .identity], [.relu, .identity], [.logistic, .identity], [.custom, .identity],
                                                 [.identity, .tanh, .identity]]
        for d in OutputDistribution.allCases {
            for (i, acts) in activations.enumerated() {
                let net = TinyNet.chainNet(d, activations: acts, bias: i % 2 == 0)
                try Float.checkChainProduct(net, "chain \(d) \(acts)", giveInputs: i % 2 == 1)
                try Double.checkChainProduct(net, "chain \(d) \(acts)", giveInputs: i % 2 == 0)
            }
        }
    }

    /// Convolutions in the chain (stretch goal): conv (groups, stride, padding) → tanh → conv
    /// (dilation, no bias) → tanh → dense, channels-first; the chain's own columns too.
    func testChainWithConvolutionsMatchesExplicit() throws {
        for d in OutputDistribution.allCases {
            for bias in [true, false] {
                try Float.checkChainProduct(TinyNet.convNet(d, bias: bias), "conv chain \(d) bias \(bias)", giveInputs: bias)
                try Double.checkChainProduct(TinyNet.convNet(d, bias: bias), "conv chain \(d) bias \(bias)", giveInputs: !bias)
            }
        }
    }

    /// Channels-last convolutions in a chain: conv (groups, padding) → logistic → conv (groups)
    /// → tanh → conv to a 1×1 output (whose channels are the network's outputs in either layout).
    func testChannelsLastConvChainMatchesExplicit() throws {
        var r = SeededRandom(94)
        for d in OutputDistribution.allCases {
            let g1 = Conv2dGeometry(inChannels: 2, outChannels: 4, kernel: (3, 3), padding: (1, 1), groups: 2, input: (3, 4))
            let g2 = Conv2dGeometry(inChannels: 4, outChannels: 4, kernel: (2, 3), groups: 2, hasBias: false, input: (3, 4))
            let g3 = Conv2dGeometry(inChannels: 4, outChannels: 3, kernel: (2, 2), input: (2, 2))
            let net = TinyNet([.init(kind: .conv(g1), hasBias: true, activation: .logistic),
                               .init(kind: .conv(g2), hasBias: false, activation: .tanh),
                               .init(kind: .conv(g3), hasBias: true, activation: .identity)], distribution: d, random: &r)
            for last in [true, false] {
                try Float.checkChainProduct(net, "conv chain \(d) channels-last \(last)", giveInputs: last, channelsLast: last)
                try Double.checkChainProduct(net, "conv chain \(d) channels-last \(last)", giveInputs: !last, channelsLast: last)
            }
        }
    }

    func testDeepLinearGaussianBlockIsExactHessian() throws {
        try Float.checkDeepLinearHessian()
        try Double.checkDeepLinearHessian()
    }
}

extension TinyNet {
    static func denseNet(_ d: OutputDistribution, bias: Bool, grouped: Bool) -> TinyNet {
        var r = SeededRandom(90)
        let g = grouped ? ChannelGrouping(inputGroupSize: 2, outputGroupSize: 2) : ChannelGrouping()
        return TinyNet([Layer(kind: .dense(inF: 3, outF: 4), hasBias: bias, activation: .tanh, grouping: g),
                        Layer(kind: .dense(inF: 4, outF: 3), hasBias: !bias, activation: .identity)], distribution: d, random: &r)
    }

    static func convNet(_ d: OutputDistribution, bias: Bool) -> TinyNet {
        var r = SeededRandom(91)
        let g = Conv2dGeometry(inChannels: 2, outChannels: 4, kernel: (3, 2), stride: (2, 1), padding: (1, 0), groups: 2,
                               hasBias: bias, input: (4, 3))
        let second = Conv2dGeometry(inChannels: 4, outChannels: 2, kernel: (2, 2), padding: (1, 1), dilation: (1, 2),
                                    hasBias: !bias, input: (g.outputHeight, g.outputWidth))
        return TinyNet([Layer(kind: .conv(g), hasBias: bias, activation: .tanh),
                        Layer(kind: .conv(second), hasBias: !bias, activation: .tanh),
                        Layer(kind: .dense(inF: 2 * second.outputPositions, outF: 3), hasBias: true, activation: .identity)],
                       distribution: d, random: &r)
    }

    static func chainNet(_ d: OutputDistribution, activations: [ChainActivation], bias: Bool) -> TinyNet {
        var r = SeededRandom(92)
        let widths = [3, 5] + Array(repeating: 4, count: activations.count - 2) + [3]
        let layers = activations.indices.map { i in
            Layer(kind: .dense(inF: widths[i], outF: widths[i + 1]), hasBias: bias || i == 0, activation: activations[i])
        }
        return TinyNet(layers, distribution: d, random: &r)
    }

    func inputs(_ count: Int, seed: UInt64) -> [[Double]] {
        var r = SeededRandom(seed)
        return (0..<count).map { _ in (0..<layers[0].inValues).map { _ in 1.5 * r.uniform() } }
    }

    func randomVector(seed: UInt64) -> [[Double]] {
        var r = SeededRandom(seed)
        return layers.map { l in (0..<l.parameterCount).map { _ in r.uniform() } }
    }
}

func relativeError(_ a: [[Double]], _ b: [[Double]]) -> Double {
    let scale = max(b.flatMap { $0 }.map(abs).max() ?? 0, 1e-300)
    return zip(a.flatMap { $0 }, b.flatMap { $0 }).map { abs($0 - $1) }.max()! / scale
}

extension KFACScalar {
    /// Product tolerance: Double is limited by the central-difference reference (~1e-9).
    static var gnTolerance: Double { Self.self == Float.self ? 2e-4 : 2e-7 }

    static func checkOutputHessian() {
        var r = SeededRandom(80)
        let (rows, dim) = (4, 5)
        for d in OutputDistribution.allCases {
            let z: [Self] = r.array(rows * dim, scale: 3), q: [Self] = r.array(rows * dim)
            var s = [Self](repeating: 0, count: dim * rows * dim), u = [Self](repeating: 0, count: rows * dim)
            OutputHessian.squareRoot(distribution: d, outputs: z, rows: rows, dim: dim, into: &s)
            OutputHessian.multiply(distribution: d, outputs: z, vectors: q, rows: rows, dim: dim, into: &u)
            for n in 0..<rows {
                let zn = (0..<dim).map { Double(z[n * dim + $0]) }, b = TinyNet.outputHessian(d, zn)
                var sst = Dense(rows: dim, columns: dim)
                for k in 0..<dim { for i in 0..<dim { for j in 0..<dim {
                    sst[i, j] += Double(s[(k * rows + n) * dim + i]) * Double(s[(k * rows + n) * dim + j])
                } } }
                assertClose(sst, b, tolerance(Self.self) * 10, "S Sᵀ = B, \(d) \(Self.self) row \(n)")
                let bq = Dense(rows: 1, columns: dim, (0..<dim).map { i in (0..<dim).reduce(0.0) { $0 + b[i, $1] * Double(q[n * dim + $1]) } })
                assertClose(Dense(rows: 1, columns: dim, Array(u[(n * dim)..<((n + 1) * dim)])), bq, tolerance(Self.self) * 10,
                            "B q, \(d) \(Self.self) row \(n)")
            }
        }
    }

    static func register(_ net: TinyNet, channelsLast: Bool) throws -> KFACOptimizer<Self> {
        let opt = try KFACOptimizer<Self>()
        for layer in net.layers {
            switch layer.kind {
            case .dense(let i, let o): try opt.addDense(inFeatures: i, outFeatures: o, hasBias: layer.hasBias, grouping: layer.grouping)
            case .conv(var g):
                g.hasBias = layer.hasBias
                g.layout = channelsLast ? .channelsLast : .channelsFirst
                try opt.addConv2d(g, grouping: layer.grouping)
            }
        }
        return opt
    }

    /// Layer l's inputs and columns as the record call takes them (converted to channels-last).
    static func recordBuffers(_ net: TinyNet, layer l: Int, _ xs: [[Double]], channelsLast: Bool) -> (inputs: [Self], columns: [Self]) {
        var inputs = xs.map { net.pass($0).inputs[l] }.flatMap { $0 }
        var columns = net.columns(layer: l, xs)
        if channelsLast, case .conv(let g) = net.layers[l].kind {
            inputs = toChannelsLast(inputs, examples: xs.count, channels: g.inChannels, positions: g.inputHeight * g.inputWidth)
            columns = toChannelsLast(columns, examples: xs.count * net.outputDim, channels: g.outChannels, positions: g.outputPositions)
        }
        return (inputs.map { Self($0) }, columns.map { Self($0) })
    }

    static func vectors(_ v: [[Double]], _ net: TinyNet) -> [LayerGradient<Self>] {
        zip(v, net.layers).map { p, l in
            LayerGradient(weight: p[..<l.weightCount].map { Self($0) }, bias: l.hasBias ? p[l.weightCount...].map { Self($0) } : nil)
        }
    }

    static func flat(_ g: [LayerGradient<Self>]) -> [[Double]] {
        g.map { ($0.weight + ($0.bias ?? [])).map { Double($0) } }
    }

    static func checkColumnProduct(_ net: TinyNet, _ name: String, channelsLast: Bool = false) throws {
        let xs = net.inputs(4, seed: 7)
        let opt = try register(net, channelsLast: channelsLast)
        for l in net.layers.indices {
            let (inputs, columns) = recordBuffers(net, layer: l, xs, channelsLast: channelsLast)
            // Two calls (micro-batches) append examples.
            let (w1, c1) = (net.layers[l].inValues, net.layers[l].outValues), k = net.outputDim
            func part(_ c: [Self], _ range: Range<Int>) -> [Self] {
                var out: [Self] = []
                for j in 0..<k {
                    let lo: Int = (j * xs.count + range.lowerBound) * c1, hi: Int = (j * xs.count + range.upperBound) * c1
                    out += c[lo..<hi]
                }
                return out
            }
            try opt.recordOutputGradientColumns(layer: l, inputs: Array(inputs[..<(w1 * 1)]), columns: part(columns, 0..<1),
                                                rows: 1, k: k, uses: .product)
            try opt.recordOutputGradientColumns(layer: l, inputs: Array(inputs[(w1 * 1)...]), columns: part(columns, 1..<xs.count),
                                                rows: xs.count - 1, k: k, uses: .product)
        }
        XCTAssertEqual(opt.gaussNewtonColumnInfo.examples, xs.count)
        let v = net.randomVector(seed: 8)
        let expected = net.gaussNewtonProduct(xs, v)
        let actual = flat(try opt.gaussNewtonProduct(vectors(v, net)))
        let err = relativeError(actual, expected)
        XCTAssertLessThan(err, gnTolerance, "\(name) \(Self.self) channels-last \(channelsLast): column product error \(err)")
        XCTAssertGreaterThan(expected.flatMap { $0 }.map(abs).max()!, 1e-3, "\(name): a non-trivial product")
    }

    static func checkChainProduct(_ net: TinyNet, _ name: String, giveInputs: Bool, channelsLast: Bool = false) throws {
        let xs = net.inputs(5, seed: 9)
        let opt = try register(net, channelsLast: channelsLast)
        let count = net.layers.count
        try opt.defineDenseChain(layers: Array(0..<count), activations: net.layers.map(\.activation), distribution: net.distribution)
        let weights = net.parameters.enumerated().map { l, p in p[..<net.layers[l].weightCount].map { Self($0) } }
        let biases = net.parameters.enumerated().map { l, p in net.layers[l].hasBias ? p[net.layers[l].weightCount...].map { Self($0) } : nil }
        let passes = xs.map { net.pass($0) }
        let inputs = (0..<count).map { l -> [Self] in
            let a = passes.flatMap { $0.inputs[l] }
            guard channelsLast, case .conv(let g) = net.layers[l].kind else { return a.map { Self($0) } }
            return toChannelsLast(a, examples: xs.count, channels: g.inChannels, positions: g.inputHeight * g.inputWidth).map { Self($0) }
        }
        let derivs = (0..<count).map { l in passes.flatMap { $0.pre[l] }.map { Self(TinyNet.phiPrime(net.layers[l].activation, $0)) } }
        var z = [Self](repeating: 0, count: xs.count * net.outputDim)
        try withPointers(weights) { w in try withPointers(biases) { b in try withPointers(inputs) { a in try withPointers(derivs) { d in
            let custom = net.layers.map { $0.activation == .custom }
            let given = (0..<count).map { l in l == 0 || giveInputs || (l > 0 && custom[l - 1]) ? a[l] : nil }
            try opt.denseChainForward(rows: xs.count, weights: w, biases: b, inputs: given,
                                      derivatives: (0..<count).map { custom[$0] ? d[$0] : nil }, outputs: &z)
        } } } }
        let zExpected = passes.flatMap { $0.pre.last! }
        XCTAssertLessThan(relativeError([z.map { Double($0) }], [zExpected]), tolerance(Self.self) * 10, "\(name): outputs")
        let v = net.randomVector(seed: 10)
        let expected = net.gaussNewtonProduct(xs, v)
        let actual = flat(try opt.denseChainProduct(vectors(v, net)))
        let err = relativeError(actual, expected)
        XCTAssertLessThan(err, gnTolerance, "\(name) \(Self.self): chain product error \(err)")
        // The chain's own back-propagated columns, kept: the backward setting without the caller.
        try opt.denseChainRecordColumns(uses: .product)
        let viaColumns = flat(try opt.gaussNewtonProduct(vectors(v, net)))
        let errColumns = relativeError(viaColumns, expected)
        XCTAssertLessThan(errColumns, gnTolerance, "\(name) \(Self.self): chain-recorded column product error \(errColumns)")
    }

    /// Seed 000: for a deep linear net with Gaussian output, layer l's exact Hessian block (second
    /// differences of the mean loss, exact for a loss quadratic in W_l) equals G's block.
    static func checkDeepLinearHessian() throws {
        var r = SeededRandom(93)
        let net = TinyNet([.init(kind: .dense(inF: 3, outF: 4), hasBias: true, activation: .identity),
                           .init(kind: .dense(inF: 4, outF: 3), hasBias: false, activation: .identity),
                           .init(kind: .dense(inF: 3, outF: 2), hasBias: true, activation: .identity)], distribution: .gaussian, random: &r)
        let xs = net.inputs(6, seed: 11)
        let ys = xs.map { _ in (0..<2).map { _ in r.uniform() } }
        func loss(_ p: [[Double]]) -> Double {
            zip(xs, ys).reduce(0.0) { s, e in
                let z = net.output(e.0, parameters: p)
                return s + 0.5 * zip(z, e.1).reduce(0.0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
            } / Double(xs.count)
        }
        let opt = try register(net, channelsLast: false)
        for l in net.layers.indices {
            let (inputs, columns) = recordBuffers(net, layer: l, xs, channelsLast: false)
            try opt.recordOutputGradientColumns(layer: l, inputs: inputs, columns: columns, rows: xs.count, k: 2, uses: .product)
        }
        try opt.defineDenseChain(layers: [0, 1, 2], activations: [.identity, .identity, .identity], distribution: .gaussian)
        let w = net.parameters.enumerated().map { l, p in p[..<net.layers[l].weightCount].map { Self($0) } }
        let b = net.parameters.enumerated().map { l, p in net.layers[l].hasBias ? p[net.layers[l].weightCount...].map { Self($0) } : nil }
        let x = [xs.flatMap { $0 }.map { Self($0) }]
        try withPointers(w) { wp in try withPointers(b) { bp in try withPointers(x) { xp in
            try opt.denseChainForward(rows: xs.count, weights: wp, biases: bp, inputs: [xp[0], nil, nil], derivatives: [nil, nil, nil], outputs: nil)
        } } }
        let h = 1e-3
        for l in net.layers.indices {
            let p = net.layers[l].parameterCount
            var hessian = Dense(rows: p, columns: p)
            for a in 0..<p {
                for c in 0..<p {
                    func shifted(_ da: Double, _ dc: Double) -> Double {
                        var q = net.parameters
                        q[l][a] += da
                        q[l][c] += dc
                        return loss(q)
                    }
                    hessian[a, c] = (shifted(h, h) - shifted(h, -h) - shifted(-h, h) + shifted(-h, -h)) / (4 * h * h)
                }
            }
            for trial in 0..<2 {
                var v = net.randomVector(seed: 20 + UInt64(trial)).enumerated().map { m, q in m == l ? q : q.map { _ in 0 } }
                v[l] = v[l].map { $0 }
                let hv = (0..<p).map { a in (0..<p).reduce(0.0) { $0 + hessian[a, $1] * v[l][$1] } }
                let fromColumns = flat(try opt.gaussNewtonProduct(vectors(v, net)))[l]
                let fromChain = flat(try opt.denseChainProduct(vectors(v, net)))[l]
                XCTAssertLessThan(relativeError([fromColumns], [hv]), gnTolerance, "deep linear layer \(l) columns \(Self.self)")
                XCTAssertLessThan(relativeError([fromChain], [hv]), gnTolerance, "deep linear layer \(l) chain \(Self.self)")
            }
        }
    }
}

/// Runs body with the arrays' base addresses (nil for nil arrays).
func withPointers<S, R>(_ arrays: [[S]?], _ body: ([UnsafePointer<S>?]) throws -> R) rethrows -> R {
    func go(_ i: Int, _ acc: [UnsafePointer<S>?]) throws -> R {
        if i == arrays.count { return try body(acc) }
        guard let a = arrays[i] else { return try go(i + 1, acc + [nil]) }
        return try a.withUnsafeBufferPointer { try go(i + 1, acc + [$0.baseAddress]) }
    }
    return try go(0, [])
}

func withPointers<S, R>(_ arrays: [[S]], _ body: ([UnsafePointer<S>?]) throws -> R) rethrows -> R {
    try withPointers(arrays.map { Optional($0) }, body)
}
