import XCTest
@testable import KFAC
import AllocationCounter

/// KFRA on the dense chain (kfac_gn_chain_record_kfra_*) against KFLR, an exact Hessian block,
/// an explicit re-computation of the recursion, and its misuse and resume paths; the
/// Monte-Carlo Fisher from sampled columns against KFLR.
final class KFRATests: XCTestCase {
    /// At N = 1 the batch average is the example itself: KFRA = KFLR, every distribution.
    func testKFRAEqualsKFLRAtOneExample() throws {
        for d in OutputDistribution.allCases {
            let net = TinyNet.chainNet(d, activations: [.tanh, .logistic, .identity], bias: true)
            try Float.checkKFRAEqualsKFLR(net, examples: 1, tolerance: 1e-5)
            try Double.checkKFRAEqualsKFLR(net, examples: 1, tolerance: 1e-12)
        }
    }

    /// Deep linear net with Gaussian output (seed 000): KFRA = KFLR at any N, and A ⊗ G is the
    /// exact Hessian block of the mean loss.
    func testDeepLinearGaussianKFRAIsExactHessianBlock() throws {
        try Float.checkDeepLinearKFRA()
        try Double.checkDeepLinearKFRA()
    }

    /// A tanh chain at N = 50: the library's Ḡ_l (GGN and Hessian variants) against the
    /// recursion written out per example in Double here; KFRA differs from KFLR there.
    func testKFRARecursionMatchesExplicitAtFifty() throws {
        for d in OutputDistribution.allCases {
            try Float.checkKFRARecursion(d)
            try Double.checkKFRARecursion(d)
        }
    }

    /// At N = 1 the Hessian variant's A ⊗ Ḡ_l is the exact Hessian block of the loss in layer l's
    /// parameters (the D̄ term included), against central differences of the cross-entropy.
    func testHessianVariantAtOneExampleIsExactHessianBlock() throws {
        try Float.checkKFRAHessianBlock()
        try Double.checkKFRAHessianBlock()
    }

    func testResumeWithPendingKFRAIsBitIdentical() throws {
        try Float.checkKFRAResume()
        try Double.checkKFRAResume()
    }

    func testKFRAMisuseChangesNothing() throws {
        try Float.checkKFRAMisuse()
        try Double.checkKFRAMisuse()
    }

    /// After the first recording (and the first Hessian-variant one), a KFRA recording allocates
    /// nothing, for any batch up to the largest seen; the reused scratch gives the Ḡ_i of a
    /// fresh chain bit for bit.
    func testKFRARecordingDoesNotAllocateAfterWarmUp() throws {
        try Float.checkKFRADoesNotAllocate()
        try Double.checkKFRADoesNotAllocate()
    }

    /// S sampled output gradients / √S per example as columns (FACTOR) → KFLR as S grows.
    func testSampledColumnsConvergeToKFLR() throws {
        try Float.checkMonteCarloConverges()
        try Double.checkMonteCarloConverges()
    }
}

extension TinyNet {
    /// B_n written out from z (no library code).
    func outputHessian(_ z: [Double]) -> [[Double]] {
        let d = z.count
        switch distribution {
        case .gaussian:
            return (0..<d).map { i in (0..<d).map { j in i == j ? 1 : 0 } }
        case .bernoulli:
            return (0..<d).map { i in (0..<d).map { j in
                let p = 1 / (1 + Foundation_exp(-z[i]))
                return i == j ? p * (1 - p) : 0
            } }
        case .categorical:
            let m = z.max()!, e = z.map { Foundation_exp($0 - m) }, t = e.reduce(0, +), p = e.map { $0 / t }
            return (0..<d).map { i in (0..<d).map { j in (i == j ? p[i] : 0) - p[i] * p[j] } }
        }
    }

    static func phiSecond(_ f: ChainActivation, _ s: Double) -> Double {
        switch f {
        case .tanh: let t = Foundation_tanh(s); return -2 * t * (1 - t * t)
        case .logistic: let p = 1 / (1 + Foundation_exp(-s)); return p * (1 - p) * (1 - 2 * p)
        default: return 0
        }
    }

    /// The KFRA recursion per example in Double: Ḡ_l for every (dense) layer.
    func explicitKFRA(_ xs: [[Double]], outputGradients: [[Double]]? = nil) -> [[[Double]]] {
        let n = Double(xs.count), count = layers.count
        let passes = xs.map { pass($0) }
        let dim = outputDim
        var gbar = [[Double]](repeating: [Double](repeating: 0, count: dim), count: dim)
        for p in passes {
            let b = outputHessian(p.pre.last!)
            for i in 0..<dim { for j in 0..<dim { gbar[i][j] += b[i][j] / n } }
        }
        var result = [[[Double]]](repeating: [], count: count)
        result[count - 1] = gbar
        var grads = outputGradients
        for l in stride(from: count - 1, to: 0, by: -1) {
            guard case .dense(let fi, let fo) = layers[l].kind else { fatalError() }
            let w = parameters[l]   // [fo][fi] first
            let f = layers[l - 1].activation
            var next = [[Double]](repeating: [Double](repeating: 0, count: fi), count: fi)
            for a in 0..<fi { for c in 0..<fi {
                var m = 0.0
                for r in 0..<fo { for q in 0..<fo { m += w[r * fi + a] * gbar[r][q] * w[q * fi + c] } }
                var e = 0.0
                for p in passes { e += Self.phiPrime(f, p.pre[l - 1][a]) * Self.phiPrime(f, p.pre[l - 1][c]) / n }
                next[a][c] = m * e
            } }
            if var g = grads {
                for (k, p) in passes.enumerated() {
                    let da = (0..<fi).map { a in (0..<fo).reduce(0.0) { $0 + w[$1 * fi + a] * g[k][$1] } }
                    for a in 0..<fi { next[a][a] += Self.phiSecond(f, p.pre[l - 1][a]) * da[a] / n }
                    g[k] = (0..<fi).map { a in Self.phiPrime(f, p.pre[l - 1][a]) * da[a] }
                }
                grads = g
            }
            result[l - 1] = next
            gbar = next
        }
        return result
    }
}

extension KFACScalar {
    /// Defines the chain of `net` on `opt` and runs its forward pass on xs.
    static func chainForward(_ opt: KFACOptimizer<Self>, _ net: TinyNet, _ xs: [[Double]]) throws {
        try opt.defineDenseChain(layers: Array(net.layers.indices), activations: net.layers.map(\.activation),
                                 distribution: net.distribution)
        let w = net.parameters.enumerated().map { l, p in p[..<net.layers[l].weightCount].map { Self($0) } }
        let b = net.parameters.enumerated().map { l, p in net.layers[l].hasBias ? p[net.layers[l].weightCount...].map { Self($0) } : nil }
        let x = [xs.flatMap { $0 }.map { Self($0) }]
        let count = net.layers.count
        try withPointers(w) { wp in try withPointers(b) { bp in try withPointers(x) { xp in
            try opt.denseChainForward(rows: xs.count, weights: wp, biases: bp, inputs: [xp[0]] + Array(repeating: nil, count: count - 1),
                                      derivatives: Array(repeating: nil, count: count), outputs: nil)
        } } }
    }

    static func maxDifference(_ a: [Self], _ b: [Self]) -> Double {
        let scale = max(b.map { abs(Double($0)) }.max() ?? 0, 1e-300)
        return zip(a, b).map { abs(Double($0) - Double($1)) }.max()! / scale
    }

    /// KFRA (with its own A) against KFLR from the chain's columns (A recorded by the caller).
    static func checkKFRAEqualsKFLR(_ net: TinyNet, examples: Int, tolerance: Double) throws {
        let xs = net.inputs(examples, seed: 31)
        let kflr = try register(net, channelsLast: false), kfra = try register(net, channelsLast: false)
        try chainForward(kflr, net, xs)
        try kflr.denseChainRecordColumns(uses: .factor)
        for l in net.layers.indices { try kflr.recordInputs(layer: l, recordBuffers(net, layer: l, xs, channelsLast: false).inputs, rows: xs.count) }
        try chainForward(kfra, net, xs)
        try kfra.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil)
        try kflr.updateFactors()
        try kfra.updateFactors()
        for l in net.layers.indices {
            let (a1, g1) = try kflr.factors(layer: l), (a2, g2) = try kfra.factors(layer: l)
            XCTAssertLessThan(maxDifference(g2, g1), tolerance, "KFRA G = KFLR G, layer \(l) \(net.distribution) N \(examples) \(Self.self)")
            XCTAssertLessThan(maxDifference(a2, a1), tolerance, "KFRA's A = the caller's, layer \(l) \(Self.self)")
        }
    }

    static func checkDeepLinearKFRA() throws {
        var r = SeededRandom(94)
        let net = TinyNet([.init(kind: .dense(inF: 3, outF: 4), hasBias: true, activation: .identity),
                           .init(kind: .dense(inF: 4, outF: 3), hasBias: false, activation: .identity),
                           .init(kind: .dense(inF: 3, outF: 2), hasBias: true, activation: .identity)], distribution: .gaussian, random: &r)
        try checkKFRAEqualsKFLR(net, examples: 7, tolerance: Self.self == Float.self ? 1e-5 : 1e-12)
        let xs = net.inputs(7, seed: 32)
        let ys = xs.map { _ in (0..<2).map { _ in r.uniform() } }
        func loss(_ p: [[Double]]) -> Double {
            zip(xs, ys).reduce(0.0) { s, e in
                let z = net.output(e.0, parameters: p)
                return s + 0.5 * zip(z, e.1).reduce(0.0) { $0 + ($1.0 - $1.1) * ($1.0 - $1.1) }
            } / Double(xs.count)
        }
        let opt = try register(net, channelsLast: false)
        try chainForward(opt, net, xs)
        try opt.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil)
        try opt.updateFactors()
        let h = 1e-3
        for l in net.layers.indices {
            guard case .dense(let i, let o) = net.layers[l].kind else { continue }
            let bias = net.layers[l].hasBias, ia = i + (bias ? 1 : 0), p = net.layers[l].parameterCount
            let (a, g) = try opt.factors(layer: l)
            // Parameter q of the layer ↔ (row, column) of [W | b].
            func rc(_ q: Int) -> (Int, Int) { q < o * i ? (q / i, q % i) : (q - o * i, i) }
            var worst = 0.0, largest = 0.0
            for x in 0..<p {
                for y in x..<p {
                    func shifted(_ dx: Double, _ dy: Double) -> Double {
                        var q = net.parameters
                        q[l][x] += dx
                        q[l][y] += dy
                        return loss(q)
                    }
                    let exact = (shifted(h, h) - shifted(h, -h) - shifted(-h, h) + shifted(-h, -h)) / (4 * h * h)
                    let (r1, c1) = rc(x), (r2, c2) = rc(y)
                    let kron = Double(a[c1 * ia + c2]) * Double(g[r1 * o + r2])
                    worst = max(worst, abs(kron - exact))
                    largest = max(largest, abs(exact))
                }
            }
            XCTAssertLessThan(worst / largest, Self.self == Float.self ? 1e-5 : 1e-8,
                              "deep linear A ⊗ G_KFRA = exact Hessian block, layer \(l) \(Self.self)")
        }
    }

    static func checkKFRARecursion(_ d: OutputDistribution) throws {
        let net = TinyNet.chainNet(d, activations: [.tanh, .tanh, .identity], bias: true)
        let xs = net.inputs(50, seed: 33)
        var r = SeededRandom(34)
        let grads = xs.map { _ in (0..<net.outputDim).map { _ in r.uniform() } }
        let tolerance = Self.self == Float.self ? 2e-5 : 1e-12
        for variant in KFRAVariant.allCases {
            let opt = try register(net, channelsLast: false)
            try chainForward(opt, net, xs)
            let g = grads.flatMap { $0 }.map { Self($0) }
            try g.withUnsafeBufferPointer { p in
                try opt.denseChainRecordKFRA(variant: variant, recordInputs: false, outputGradients: p.baseAddress)
            }
            for l in net.layers.indices { try opt.recordInputs(layer: l, recordBuffers(net, layer: l, xs, channelsLast: false).inputs, rows: 50) }
            try opt.updateFactors()
            let expected = net.explicitKFRA(xs, outputGradients: variant == .hessian ? grads : nil)
            for l in net.layers.indices {
                let got = try opt.factors(layer: l).g
                XCTAssertLessThan(maxDifference(got, expected[l].flatMap { $0 }.map { Self($0) }), tolerance,
                                  "KFRA \(variant) layer \(l) \(d) \(Self.self)")
            }
            if variant == .hessian {
                let hidden = try opt.factors(layer: 0).g, ggn = net.explicitKFRA(xs)[0].flatMap { $0 }.map { Self($0) }
                XCTAssertGreaterThan(maxDifference(hidden, ggn), 1e-3, "the D̄ term matters for tanh (\(d))")
            }
        }
        // KFRA is not KFLR here (mean of products ≠ product of means).
        let kflr = try register(net, channelsLast: false)
        try chainForward(kflr, net, xs)
        try kflr.denseChainRecordColumns(uses: .factor)
        for l in net.layers.indices { try kflr.recordInputs(layer: l, recordBuffers(net, layer: l, xs, channelsLast: false).inputs, rows: 50) }
        try kflr.updateFactors()
        let first = net.explicitKFRA(xs)[0].flatMap { $0 }.map { Self($0) }
        XCTAssertGreaterThan(maxDifference(try kflr.factors(layer: 0).g, first), 1e-3, "KFRA ≠ KFLR at N = 50 (\(d))")
    }

    static func checkKFRAHessianBlock() throws {
        let net = TinyNet.chainNet(.categorical, activations: [.tanh, .logistic, .identity], bias: true)
        let xs = net.inputs(1, seed: 41), y = 1
        func loss(_ p: [[Double]]) -> Double {
            let z = net.output(xs[0], parameters: p), m = z.max()!
            return m + Foundation_log(z.reduce(0.0) { $0 + Foundation_exp($1 - m) }) - z[y]
        }
        let z = net.output(xs[0], parameters: net.parameters), m = z.max()!
        let e = z.map { Foundation_exp($0 - m) }, total = e.reduce(0, +)
        let grads = e.enumerated().map { i, v in Self(v / total - (i == y ? 1 : 0)) }
        let opt = try register(net, channelsLast: false), ggn = try register(net, channelsLast: false)
        try chainForward(opt, net, xs)
        try grads.withUnsafeBufferPointer { g in
            try opt.denseChainRecordKFRA(variant: .hessian, recordInputs: true, outputGradients: g.baseAddress)
        }
        try opt.updateFactors()
        try chainForward(ggn, net, xs)
        try ggn.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil)
        try ggn.updateFactors()
        let h = 1e-4
        for l in net.layers.indices {
            guard case .dense(let i, let o) = net.layers[l].kind else { continue }
            let ia = i + 1, p = net.layers[l].parameterCount
            func rc(_ q: Int) -> (Int, Int) { q < o * i ? (q / i, q % i) : (q - o * i, i) }
            func errors(_ factors: (a: [Self], g: [Self])) -> Double {
                var worst = 0.0, largest = 0.0
                for x in 0..<p {
                    for y in x..<p {
                        func shifted(_ dx: Double, _ dy: Double) -> Double {
                            var q = net.parameters
                            q[l][x] += dx
                            q[l][y] += dy
                            return loss(q)
                        }
                        let exact = (shifted(h, h) - shifted(h, -h) - shifted(-h, h) + shifted(-h, -h)) / (4 * h * h)
                        let (r1, c1) = rc(x), (r2, c2) = rc(y)
                        let kron = Double(factors.a[c1 * ia + c2]) * Double(factors.g[r1 * o + r2])
                        worst = max(worst, abs(kron - exact))
                        largest = max(largest, abs(exact))
                    }
                }
                return worst / largest
            }
            let err = errors(try opt.factors(layer: l))
            XCTAssertLessThan(err, Self.self == Float.self ? 1e-4 : 1e-6, "A ⊗ Ḡ_Hessian = exact Hessian block, layer \(l) \(Self.self)")
            if l < net.layers.count - 1 {
                XCTAssertGreaterThan(errors(try ggn.factors(layer: l)), 1e-3, "the GGN misses D̄ at layer \(l) (\(Self.self))")
            }
        }
    }

    static func checkKFRADoesNotAllocate() throws {
        let net = TinyNet.chainNet(.categorical, activations: [.tanh, .logistic, .identity], bias: true)
        let opt = try register(net, channelsLast: false)
        try opt.defineDenseChain(layers: Array(net.layers.indices), activations: net.layers.map(\.activation),
                                 distribution: net.distribution)
        let w = net.parameters.enumerated().map { l, p in p[..<net.layers[l].weightCount].map { Self($0) } }
        let b = net.parameters.enumerated().map { l, p in net.layers[l].hasBias ? p[net.layers[l].weightCount...].map { Self($0) } : nil }
        let count = net.layers.count, dim = net.layers[count - 1].outFeatures
        // The chain's forward pass (not counted: it copies θ and the inputs of each batch).
        func forward(_ xs: [[Double]]) throws {
            let x = [xs.flatMap { $0 }.map { Self($0) }]
            try withPointers(w) { wp in try withPointers(b) { bp in try withPointers(x) { xp in
                try opt.denseChainForward(rows: xs.count, weights: wp, biases: bp, inputs: [xp[0]] + Array(repeating: nil, count: count - 1),
                                          derivatives: Array(repeating: nil, count: count), outputs: nil)
            } } }
        }
        var r = SeededRandom(47)
        let gradients: [Self] = r.array(9 * dim)
        try gradients.withUnsafeBufferPointer { g in
            // Warm-up at both batch sizes (the input factors choose row buffers or sums by the rows).
            for rows in [9, 5] {
                try forward(net.inputs(rows, seed: 45))
                try opt.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil)
                try opt.updateFactors()
                try opt.denseChainRecordKFRA(variant: .hessian, recordInputs: true, outputGradients: g.baseAddress)
                try opt.updateFactors()
            }
            for (seed, rows) in [(UInt64(46), 9), (48, 5)] {
                try forward(net.inputs(rows, seed: seed))
                for variant in KFRAVariant.allCases {
                    allocation_counter_start()
                    try opt.denseChainRecordKFRA(variant: variant, recordInputs: true, outputGradients: g.baseAddress)
                    let allocations = allocation_counter_stop() - allocation_counter_openblas()
                    XCTAssertEqual(allocations, 0, "\(Self.self): \(allocations) allocations in a KFRA recording (\(variant), \(rows) rows)")
                    try opt.updateFactors()
                }
            }
            // The reused scratch against a fresh chain on the same (5-row) forward pass.
            let fresh = try register(net, channelsLast: false)
            try chainForward(fresh, net, net.inputs(5, seed: 48))
            for variant in KFRAVariant.allCases {
                let reused = try opt.denseChain!.kfraFactors(variant: variant, outputGradients: g.baseAddress)
                let first = try fresh.denseChain!.kfraFactors(variant: variant, outputGradients: g.baseAddress)
                for i in 0..<count {
                    let o = net.layers[i].outFeatures
                    XCTAssertEqual(Array(UnsafeBufferPointer(start: reused[i].base, count: o * o)),
                                   Array(UnsafeBufferPointer(start: first[i].base, count: o * o)),
                                   "\(Self.self): reused KFRA scratch, \(variant), chain layer \(i)")
                }
            }
        }
    }

    static func checkKFRAResume() throws {
        let net = TinyNet.chainNet(.categorical, activations: [.tanh, .relu, .identity], bias: true)
        let xs = net.inputs(9, seed: 35)
        let opt = try register(net, channelsLast: false)
        // A folded update, then KFRA pending at the save.
        try chainForward(opt, net, xs)
        try opt.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil)
        try opt.updateFactors()
        try chainForward(opt, net, Array(xs.prefix(4)))
        try opt.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil)
        let image = try opt.stateImage()
        let resumed = try register(net, channelsLast: false)
        try image.withUnsafeBytes { p in try resumed.loadState(from: p) }
        var r = SeededRandom(36)
        let grads = net.layers.map { l in LayerGradient<Self>(weight: r.array(l.weightCount), bias: l.hasBias ? r.array(l.outFeatures) : nil) }
        var (g1, g2) = (grads, grads)
        try opt.step(&g1)
        try resumed.step(&g2)
        for l in net.layers.indices {
            XCTAssertEqual(g1[l].weight, g2[l].weight, "resumed step bit-identical, layer \(l) \(Self.self)")
            XCTAssertEqual(g1[l].bias, g2[l].bias)
            XCTAssertEqual(try opt.factors(layer: l).g, try resumed.factors(layer: l).g)
        }
    }

    static func checkKFRAMisuse() throws {
        let net = TinyNet.chainNet(.bernoulli, activations: [.tanh, .custom, .identity], bias: true)
        let xs = net.inputs(3, seed: 37)
        let opt = try register(net, channelsLast: false), twin = try register(net, channelsLast: false)
        func expect(_ status: KFACStatus, _ body: () throws -> Void) {
            do { try body(); XCTFail("expected \(status)") } catch let e as KFACError { XCTAssertEqual(e.status, status, e.message) } catch { XCTFail("\(error)") }
        }
        expect(.noColumns) { try opt.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil) }
        // Custom activation: φ′ and the next inputs from the caller.
        try opt.defineDenseChain(layers: [0, 1, 2], activations: net.layers.map(\.activation), distribution: .bernoulli)
        let passes = xs.map { net.pass($0) }
        let w = net.parameters.enumerated().map { l, p in p[..<net.layers[l].weightCount].map { Self($0) } }
        let b = net.parameters.enumerated().map { l, p in p[net.layers[l].weightCount...].map { Self($0) } }
        let ins = (0..<3).map { l in passes.flatMap { $0.inputs[l] }.map { Self($0) } }
        let ds = (0..<3).map { l in passes.flatMap { $0.pre[l].map { TinyNet.phiPrime(net.layers[l].activation, $0) } }.map { Self($0) } }
        try withPointers(w) { wp in try withPointers(b) { bp in try withPointers(ins) { ip in try withPointers(ds) { dp in
            try opt.denseChainForward(rows: 3, weights: wp, biases: bp, inputs: ip, derivatives: dp, outputs: nil)
        } } } }
        let grads = [Self](repeating: 0.5, count: 3 * net.outputDim)
        grads.withUnsafeBufferPointer { g in
            expect(.unsupported) { try opt.denseChainRecordKFRA(variant: .hessian, recordInputs: true, outputGradients: g.baseAddress) }
        }
        var bad = grads
        bad[1] = .nan
        try bad.withUnsafeBufferPointer { g in
            let plain = try register(net, channelsLast: false)
            let tanhNet = TinyNet.chainNet(.bernoulli, activations: [.tanh, .tanh, .identity], bias: true)
            try chainForward(plain, tanhNet, xs)
            expect(.nonFinite) { try plain.denseChainRecordKFRA(variant: .hessian, recordInputs: true, outputGradients: g.baseAddress) }
            expect(.nullPointer) { try plain.denseChainRecordKFRA(variant: .hessian, recordInputs: true, outputGradients: nil) }
            XCTAssertEqual(try plain.stateImage(), try register(net, channelsLast: false).stateImage(),
                           "nothing was recorded by the failed calls")
        }
        // Convolutions: UNSUPPORTED.
        let conv = TinyNet.convNet(.gaussian, bias: true)
        let convOpt = try register(conv, channelsLast: false)
        try chainForward(convOpt, conv, conv.inputs(2, seed: 38))
        expect(.unsupported) { try convOpt.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil) }
        // Block-tridiagonal links: UNSUPPORTED (no cross statistics).
        let linked = try register(TinyNet.chainNet(.bernoulli, activations: [.tanh, .tanh, .identity], bias: true), channelsLast: false)
        try linked.linkLayers(lower: 0, upper: 1)
        try chainForward(linked, TinyNet.chainNet(.bernoulli, activations: [.tanh, .tanh, .identity], bias: true), xs)
        expect(.unsupported) { try linked.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil) }
        // A GGN KFRA with CUSTOM works (φ′ given), and the failed calls left `opt` as its twin.
        try opt.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil)
        try twin.defineDenseChain(layers: [0, 1, 2], activations: net.layers.map(\.activation), distribution: .bernoulli)
        try withPointers(w) { wp in try withPointers(b) { bp in try withPointers(ins) { ip in try withPointers(ds) { dp in
            try twin.denseChainForward(rows: 3, weights: wp, biases: bp, inputs: ip, derivatives: dp, outputs: nil)
        } } } }
        try twin.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: true, outputGradients: nil)
        XCTAssertEqual(try opt.stateImage(), try twin.stateImage(), "failed KFRA calls changed nothing (\(Self.self))")
    }

    static func checkMonteCarloConverges() throws {
        // One dense layer: its back-propagated columns are the output-side vectors themselves.
        let (rows, inF, dim) = (10, 3, 4)
        var r = SeededRandom(39)
        let z: [Self] = r.array(rows * dim, scale: 2)
        let x: [Self] = r.array(rows * inF)
        func factor(_ columns: [Self], k: Int) throws -> [Self] {
            let opt = try KFACOptimizer<Self>()
            try opt.addDense(inFeatures: inF, outFeatures: dim, hasBias: false)
            try opt.recordInputs(layer: 0, x, rows: rows)
            try opt.recordOutputGradientColumns(layer: 0, inputs: nil, columns: columns, rows: rows, k: k, uses: .factor)
            try opt.updateFactors()
            return try opt.factors(layer: 0).g
        }
        var sqrt = [Self](repeating: 0, count: dim * rows * dim)
        z.withUnsafeBufferPointer { zp in sqrt.withUnsafeMutableBufferPointer { s in
            OutputHessian.squareRoot(distribution: .categorical, outputs: zp.baseAddress!, rows: rows, dim: dim, into: s.baseAddress!)
        } }
        let kflr = try factor(sqrt, k: dim)
        var errors: [Double] = []
        for k in [4, 4000] {
            // Sample j of every row with seed 1000 + j; columns = gradients / √k.
            var columns = [Self](repeating: 0, count: k * rows * dim)
            z.withUnsafeBufferPointer { zp in columns.withUnsafeMutableBufferPointer { c in
                for j in 0..<k {
                    TargetSampler.sampledOutputGradients(distribution: .categorical, outputs: zp.baseAddress!, rows: rows, dim: dim,
                                                         seed: 1000 + UInt64(j), into: c.baseAddress! + j * rows * dim)
                }
            } }
            let s = Self(1 / Double(k).squareRoot())
            let mc = try factor(columns.map { $0 * s }, k: k)
            errors.append(zip(mc, kflr).map { abs(Double($0) - Double($1)) }.max()!)
        }
        // Entries of g gᵀ are bounded by 2 in magnitude: with N·k = 40000 draws per entry the
        // standard error is below 2/√40000 = 0.01; 0.03 is three of them.
        XCTAssertLessThan(errors[1], 0.03, "MC (k = 4000, seeds 1000…) → KFLR \(Self.self): \(errors)")
        XCTAssertLessThan(errors[1], errors[0], "more samples are closer \(Self.self): \(errors)")
    }
}
