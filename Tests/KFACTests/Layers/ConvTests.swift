import XCTest
@testable import KFAC

// MARK: - Shared fixtures of the convolution and grouping tests

extension ConvCase {
    /// The library's description of the same convolution.
    var geometry: Conv2dGeometry {
        Conv2dGeometry(inChannels: inChannels, outChannels: outChannels, kernel: (kernelHeight, kernelWidth),
                       stride: (strideHeight, strideWidth), padding: (paddingHeight, paddingWidth),
                       dilation: (dilationHeight, dilationWidth), groups: groups, hasBias: hasBias,
                       input: (inputHeight, inputWidth), layout: channelsLast ? .channelsLast : .channelsFirst)
    }

    /// Seeded inputs and output gradients of `examples` examples, in the case's layout.
    func batch<S: KFACScalar>(_ random: inout SeededRandom, examples: Int) -> (x: [S], dy: [S]) {
        (random.array(examples * inputCount), random.array(examples * outputCount))
    }

    /// A seeded weight (and bias) gradient [C_out][C_in/G][kh][kw].
    func gradient<S: KFACScalar>(_ random: inout SeededRandom) -> LayerGradient<S> {
        LayerGradient(weight: random.array(weightCount), bias: hasBias ? random.array(outChannels) : nil)
    }
}

/// The library's factors of one (layer, group) as Dense matrices, after checking their sizes.
func libraryFactors<S: KFACScalar>(_ opt: KFACOptimizer<S>, layer: Int, group: Int, aDimension: Int, gDimension: Int,
                                   file: StaticString = #filePath, line: UInt = #line) throws -> (a: Dense, g: Dense) {
    let (a, g) = try opt.factors(layer: layer, group: group)
    XCTAssertEqual(a.count, aDimension * aDimension, "input factor size of layer \(layer) group \(group)", file: file, line: line)
    XCTAssertEqual(g.count, gDimension * gDimension, "output factor size of layer \(layer) group \(group)", file: file, line: line)
    guard a.count == aDimension * aDimension, g.count == gDimension * gDimension else {
        throw KFACError(.invalidSize, "factor sizes differ from the oracle's")
    }
    return (Dense(rows: aDimension, columns: aDimension, a), Dense(rows: gDimension, columns: gDimension, g))
}

/// The library's (Ω_g, Γ_g) of a conv layer.
func libraryFactors<S: KFACScalar>(_ opt: KFACOptimizer<S>, layer: Int, group: Int, _ s: ConvCase,
                                   file: StaticString = #filePath, line: UInt = #line) throws -> (a: Dense, g: Dense) {
    try libraryFactors(opt, layer: layer, group: group, aDimension: s.omegaDimension, gDimension: s.outPerGroup,
                       file: file, line: line)
}

// MARK: - Tests

/// Convolution layers (KFC and SUA) against the oracles of ConvOracles.swift, each test in Float
/// and Double.
final class ConvKFACTests: XCTestCase {

    /// The geometries of the factor tests: every feature of the patch extraction alone and in
    /// combination.
    static let factorCases: [ConvCase] = [
        // stride 2 with padding 1; the width's (6 + 2 − 3)/2 = 2.5 is floored.
        ConvCase(inChannels: 3, outChannels: 4, kernel: (3, 3), stride: (2, 2), padding: (1, 1), input: (5, 6)),
        // dilation 2 with padding 2, no bias.
        ConvCase(inChannels: 2, outChannels: 3, kernel: (3, 3), padding: (2, 2), dilation: (2, 2), hasBias: false, input: (6, 7)),
        // two conv groups.
        ConvCase(inChannels: 4, outChannels: 6, kernel: (3, 3), padding: (1, 1), groups: 2, input: (5, 5)),
        // depthwise: groups = C_in = C_out, with stride.
        ConvCase(inChannels: 3, outChannels: 3, kernel: (3, 3), stride: (2, 2), padding: (1, 1), groups: 3, input: (6, 5)),
        // 1×1 kernels, with stride, with and without bias.
        ConvCase(inChannels: 5, outChannels: 3, kernel: (1, 1), stride: (2, 2), input: (5, 4)),
        ConvCase(inChannels: 4, outChannels: 2, kernel: (1, 1), hasBias: false, input: (3, 3)),
        // non-square kernel and input; different stride, padding and dilation per axis.
        ConvCase(inChannels: 2, outChannels: 3, kernel: (2, 3), stride: (2, 1), padding: (1, 0), dilation: (1, 2), input: (5, 8)),
        // NHWC, with groups and with a non-square kernel.
        ConvCase(inChannels: 4, outChannels: 6, kernel: (3, 3), padding: (1, 1), groups: 2, input: (5, 5), channelsLast: true),
        ConvCase(inChannels: 2, outChannels: 3, kernel: (2, 3), stride: (2, 1), padding: (1, 0), dilation: (1, 2),
                 hasBias: false, input: (5, 8), channelsLast: true),
        // Conv1d: kernel (1, k) on input (1, L), with stride and padding; with dilation, no bias.
        ConvCase(inChannels: 3, outChannels: 4, kernel: (1, 3), stride: (1, 2), padding: (0, 1), input: (1, 9)),
        ConvCase(inChannels: 2, outChannels: 2, kernel: (1, 2), dilation: (1, 3), hasBias: false, input: (1, 8)),
        ConvCase(inChannels: 3, outChannels: 4, kernel: (1, 3), stride: (1, 2), padding: (0, 1), input: (1, 9), channelsLast: true),
    ]

    // MARK: KFC factors

    func testGeometryOutputSize() {
        for s in Self.factorCases {
            XCTAssertEqual(s.geometry.outputHeight, s.outputHeight, "\(s)")
            XCTAssertEqual(s.geometry.outputWidth, s.outputWidth, "\(s)")
        }
    }

    func testFactorsMatchNaiveLoop() throws {
        try factorsMatchNaiveLoop(Float.self)
        try factorsMatchNaiveLoop(Double.self)
    }

    /// Ω_g and Γ_g of every case and conv group against the loop over examples and positions.
    private func factorsMatchNaiveLoop<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(101)
        let examples = 3
        for s in Self.factorCases {
            let opt = try KFACOptimizer<S>()
            let layer = try opt.addConv2d(s.geometry)
            let (x, dy): ([S], [S]) = s.batch(&random, examples: examples)
            try opt.recordInputs(layer: layer, x, rows: examples)
            try opt.recordOutputGradients(layer: layer, dy, rows: examples)
            try opt.updateFactors()
            for group in 0..<s.groups {
                let (a, g) = try libraryFactors(opt, layer: layer, group: group, s)
                assertClose(a, ConvOracle.omega(x, s, examples: examples, group: group), tolerance(S.self), "\(S.self) Ω of \(s) group \(group)")
                assertClose(g, ConvOracle.gamma(dy, s, examples: examples, group: group), tolerance(S.self), "\(S.self) Γ of \(s) group \(group)")
            }
            XCTAssertThrowsError(try opt.factors(layer: layer, group: s.groups), "group \(s.groups) of \(s)") {
                XCTAssertEqual(($0 as? KFACError)?.status, .invalidArgument)
            }
        }
    }

    func testChannelsLastMatchesTransposedChannelsFirst() throws {
        try channelsLastMatchesChannelsFirst(Float.self)
        try channelsLastMatchesChannelsFirst(Double.self)
    }

    /// The same data in NCHW (layer 0) and transposed to NHWC (layer 1) give the same factors.
    private func channelsLastMatchesChannelsFirst<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(103)
        let examples = 2
        let nchw = ConvCase(inChannels: 4, outChannels: 6, kernel: (2, 3), stride: (2, 1), padding: (1, 1),
                            dilation: (1, 2), groups: 2, input: (5, 6))
        var nhwc = nchw
        nhwc.channelsLast = true
        let opt = try KFACOptimizer<S>()
        _ = try opt.addConv2d(nchw.geometry)
        _ = try opt.addConv2d(nhwc.geometry)
        let (x, dy): ([S], [S]) = nchw.batch(&random, examples: examples)
        let xLast = ConvOracle.channelsLast(x, n: examples, c: nchw.inChannels, h: nchw.inputHeight, w: nchw.inputWidth)
        let dyLast = ConvOracle.channelsLast(dy, n: examples, c: nchw.outChannels, h: nchw.outputHeight, w: nchw.outputWidth)
        try opt.recordInputs(layer: 0, x, rows: examples)
        try opt.recordOutputGradients(layer: 0, dy, rows: examples)
        try opt.recordInputs(layer: 1, xLast, rows: examples)
        try opt.recordOutputGradients(layer: 1, dyLast, rows: examples)
        try opt.updateFactors()
        for group in 0..<2 {
            let first = try libraryFactors(opt, layer: 0, group: group, nchw)
            let last = try libraryFactors(opt, layer: 1, group: group, nhwc)
            // Only the summation order may differ between the layouts.
            assertClose(last.a, first.a, tolerance(S.self) / 10, "\(S.self) Ω NHWC vs NCHW, group \(group)")
            assertClose(last.g, first.g, tolerance(S.self) / 10, "\(S.self) Γ NHWC vs NCHW, group \(group)")
            assertClose(first.a, ConvOracle.omega(x, nchw, examples: examples, group: group), tolerance(S.self), "\(S.self) Ω NCHW")
            assertClose(last.g, ConvOracle.gamma(dyLast, nhwc, examples: examples, group: group), tolerance(S.self), "\(S.self) Γ NHWC")
        }
    }

    func testFactorsMovingAverageAndMeanReduction() throws {
        try movingAverageAndReduction(Float.self)
        try movingAverageAndReduction(Double.self)
    }

    /// Two record calls of 2 and 3 examples, mean reduction (× examples of the call), loss scale
    /// 2; then a decayed second update — as for dense layers, with rows = examples.
    private func movingAverageAndReduction<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(107)
        let s = ConvCase(inChannels: 4, outChannels: 4, kernel: (3, 2), stride: (1, 2), padding: (1, 1), groups: 2, input: (4, 5))
        let beta = 0.8
        let opt = try KFACOptimizer<S>()
        _ = try opt.addConv2d(s.geometry)
        var p = opt.parameters
        p.lossReduction = .mean; p.outputGradScale = 2; p.factorDecay = beta
        try opt.setParameters(p)
        let b1: ([S], [S]) = s.batch(&random, examples: 2), b2: ([S], [S]) = s.batch(&random, examples: 3)
        for (b, n) in [(b1, 2), (b2, 3)] {
            try opt.recordInputs(layer: 0, b.0, rows: n)
            try opt.recordOutputGradients(layer: 0, b.1, rows: n)
        }
        try opt.updateFactors()
        var first: [(Dense, Dense)] = []
        for group in 0..<2 {
            let a = (2.0 / 5) * ConvOracle.omega(b1.0, s, examples: 2, group: group)
                + (3.0 / 5) * ConvOracle.omega(b2.0, s, examples: 3, group: group)
            let g = (2.0 / 5) * ConvOracle.gamma(b1.1, s, examples: 2, group: group, scale: 2.0 / 2)
                + (3.0 / 5) * ConvOracle.gamma(b2.1, s, examples: 3, group: group, scale: 3.0 / 2)
            let lib = try libraryFactors(opt, layer: 0, group: group, s)
            assertClose(lib.a, a, tolerance(S.self), "\(S.self) first Ω, group \(group)")
            assertClose(lib.g, g, tolerance(S.self), "\(S.self) first Γ, group \(group)")
            first.append((a, g))
        }
        let b3: ([S], [S]) = s.batch(&random, examples: 4)
        try opt.recordInputs(layer: 0, b3.0, rows: 4)
        try opt.recordOutputGradients(layer: 0, b3.1, rows: 4)
        try opt.updateFactors()
        for group in 0..<2 {
            let a = beta * first[group].0 + (1 - beta) * ConvOracle.omega(b3.0, s, examples: 4, group: group)
            let g = beta * first[group].1 + (1 - beta) * ConvOracle.gamma(b3.1, s, examples: 4, group: group, scale: 4.0 / 2)
            let lib = try libraryFactors(opt, layer: 0, group: group, s)
            assertClose(lib.a, a, tolerance(S.self), "\(S.self) EMA Ω, group \(group)")
            assertClose(lib.g, g, tolerance(S.self), "\(S.self) EMA Γ, group \(group)")
        }
    }

    func testFactorsIndependentOfRecordCallSizes() throws {
        try recordCallSizes(Float.self)
        try recordCallSizes(Double.self)
    }

    /// Record calls of 1, 1 | 1, 10, 1 examples folded in two updates (decay β, mean reduction):
    /// each case is sized so that the first update's statistics are few rows (fewer than the
    /// factor's dimension) and the second's start few and then grow many, on both sides — the
    /// factors are the weighted oracle averages however the rows arrived.
    private func recordCallSizes<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(137)
        let beta = 0.6
        let cases: [(ConvCase, ConvApproximation, ChannelGrouping)] = [
            // |T| = 4 positions per example, Ω of dimension 37, Γ of 6.
            (ConvCase(inChannels: 4, outChannels: 6, kernel: (3, 3), input: (4, 4)), .kfc, ChannelGrouping()),
            // SUA over 3 pixels per example, C of 8 channels; one output position.
            (ConvCase(inChannels: 8, outChannels: 4, kernel: (1, 3), input: (1, 3)), .sua, ChannelGrouping()),
            // Grouped blocks, NHWC.
            (ConvCase(inChannels: 4, outChannels: 6, kernel: (3, 3), input: (4, 4), channelsLast: true), .kfc,
             ChannelGrouping(inputGroupSize: 2, outputGroupSize: 4)),
        ]
        let folds = [[1, 1], [1, 10, 1]]
        for (s, approximation, grouping) in cases {
            let opt = try KFACOptimizer<S>()
            _ = try opt.addConv2d(s.geometry, approximation: approximation, grouping: grouping)
            var p = opt.parameters
            p.lossReduction = .mean; p.factorDecay = beta
            try opt.setParameters(p)
            var running: (a: Dense, g: Dense)?
            for (k, calls) in folds.enumerated() {
                let total = Double(calls.reduce(0, +))
                var a = Dense(rows: s.omegaDimension, columns: s.omegaDimension), g = Dense(rows: s.outPerGroup, columns: s.outPerGroup)
                for n in calls {
                    let (x, dy): ([S], [S]) = s.batch(&random, examples: n)
                    try opt.recordInputs(layer: 0, x, rows: n)
                    try opt.recordOutputGradients(layer: 0, dy, rows: n)
                    let omega = ConvOracle.omega(x, s, examples: n, group: 0)
                    let inputBlocks = ConvOracle.inputBlocks(size: grouping.inputGroupSize, offsets: s.offsets,
                                                             biasIndex: s.hasBias ? s.patchSize : nil)
                    a = a + (Double(n) / total) * ConvOracle.blockDiagonalPart(approximation == .sua ? ConvOracle.sua(omega, s) : omega,
                                                                               block: inputBlocks)
                    g = g + (Double(n) / total) * ConvOracle.blockDiagonalPart(
                        ConvOracle.gamma(dy, s, examples: n, group: 0, scale: Double(n)),
                        block: ConvOracle.outputBlocks(size: grouping.outputGroupSize))
                }
                try opt.updateFactors()
                let expected = running.map { (beta * $0.a + (1 - beta) * a, beta * $0.g + (1 - beta) * g) } ?? (a, g)
                let lib = try libraryFactors(opt, layer: 0, group: 0, s)
                assertClose(lib.a, expected.0, tolerance(S.self), "\(S.self) \(approximation) \(s) update \(k): Ω")
                assertClose(lib.g, expected.1, tolerance(S.self), "\(S.self) \(approximation) \(s) update \(k): Γ")
                running = expected
            }
        }
    }

    func testOneByOneConvolutionIsDenseLayerAtEveryPosition() throws {
        for channelsLast in [false, true] {
            for hasBias in [true, false] {
                try oneByOneIsDense(Float.self, channelsLast: channelsLast, hasBias: hasBias)
                try oneByOneIsDense(Double.self, channelsLast: channelsLast, hasBias: hasBias)
            }
        }
    }

    /// A 1×1 convolution (stride 1, no padding) is a dense layer applied to every pixel. Fed the
    /// N·|T| pixel rows, the dense layer's factors are A = (1/(N|T|)) Σ ā āᵀ and G = (1/(N|T|))
    /// Σ g gᵀ, while the conv's are Ω = (1/N) Σ_n Σ_t ā āᵀ and Γ = (1/(N|T|)) Σ g gᵀ. Hence
    ///     Ω_conv = |T| · A_dense   (bias entry included: |T| = |T| · 1),   Γ_conv = G_dense.
    private func oneByOneIsDense<S: KFACScalar>(_: S.Type, channelsLast: Bool, hasBias: Bool) throws {
        var random = SeededRandom(109)
        let examples = 2
        let s = ConvCase(inChannels: 4, outChannels: 3, kernel: (1, 1), hasBias: hasBias, input: (3, 4), channelsLast: channelsLast)
        let pixels = examples * s.positions
        let opt = try KFACOptimizer<S>()
        _ = try opt.addConv2d(s.geometry)
        _ = try opt.addDense(inFeatures: s.inChannels, outFeatures: s.outChannels, hasBias: hasBias)
        let (x, dy): ([S], [S]) = s.batch(&random, examples: examples)
        // Pixel rows [n][h][w][c]: the NHWC buffer itself, or the NCHW buffer transposed.
        let xRows = channelsLast ? x : ConvOracle.channelsLast(x, n: examples, c: s.inChannels, h: s.inputHeight, w: s.inputWidth)
        let dyRows = channelsLast ? dy : ConvOracle.channelsLast(dy, n: examples, c: s.outChannels, h: s.outputHeight, w: s.outputWidth)
        try opt.recordInputs(layer: 0, x, rows: examples)
        try opt.recordOutputGradients(layer: 0, dy, rows: examples)
        try opt.recordInputs(layer: 1, xRows, rows: pixels)
        try opt.recordOutputGradients(layer: 1, dyRows, rows: pixels)
        try opt.updateFactors()
        let conv = try libraryFactors(opt, layer: 0, group: 0, s)
        let dense = try libraryFactors(opt, layer: 1, group: 0, aDimension: s.omegaDimension, gDimension: s.outChannels)
        let label = "\(S.self) 1×1 \(channelsLast ? "NHWC" : "NCHW") bias=\(hasBias)"
        assertClose(conv.a, Double(s.positions) * dense.a, tolerance(S.self), "\(label): Ω = |T|·A")
        assertClose(conv.g, dense.g, tolerance(S.self), "\(label): Γ = G")
        // And both against the plain per-row oracle.
        assertClose(dense.a, naiveSecondMoment(xRows, rows: pixels, width: s.inChannels, appendOne: hasBias), tolerance(S.self), "\(label): A")
        assertClose(dense.g, naiveSecondMoment(dyRows, rows: pixels, width: s.outChannels, appendOne: false), tolerance(S.self), "\(label): G")
    }

    func testSingleExampleSinglePositionFisherBlockIsKroneckerProduct() throws {
        try singlePositionFisher(Float.self)
        try singlePositionFisher(Double.self)
    }

    /// With one example and one output position (input the size of the dilated kernel, no
    /// padding), each group's empirical Fisher block vec(∇Θ_g) vec(∇Θ_g)ᵀ, ∇Θ_g = g āᵀ, equals
    /// Ω_g ⊗ Γ_g. ∇Θ_g comes from the convolution's backward loop, not from patches.
    private func singlePositionFisher<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(113)
        let cases = [
            ConvCase(inChannels: 3, outChannels: 2, kernel: (2, 3), input: (2, 3)),
            ConvCase(inChannels: 4, outChannels: 4, kernel: (2, 2), dilation: (2, 1), groups: 2, hasBias: false, input: (3, 2)),
            ConvCase(inChannels: 2, outChannels: 3, kernel: (2, 2), stride: (3, 2), groups: 1, input: (2, 3), channelsLast: true),
        ]
        for s in cases {
            XCTAssertEqual(s.positions, 1, "\(s) must have one output position")
            let opt = try KFACOptimizer<S>()
            _ = try opt.addConv2d(s.geometry)
            let (x, dy): ([S], [S]) = s.batch(&random, examples: 1)
            try opt.recordInputs(layer: 0, x, rows: 1)
            try opt.recordOutputGradients(layer: 0, dy, rows: 1)
            try opt.updateFactors()
            for group in 0..<s.groups {
                let (a, g) = try libraryFactors(opt, layer: 0, group: group, s)
                let v = vec(ConvOracle.parameterGradient(x, dy, s, n: 0, group: group))
                var fisher = Dense(rows: v.count, columns: v.count)
                for i in v.indices { for j in v.indices { fisher[i, j] = v[i] * v[j] } }
                assertClose(kronecker(a, g), fisher, tolerance(S.self), "\(S.self) Fisher block of \(s) group \(group)")
            }
        }
    }

    // MARK: SUA

    func testSUAFactorIsKFCWithOffsetsAveraged() throws {
        try suaFactor(Float.self)
        try suaFactor(Double.self)
    }

    /// Ω_SUA against the SUA transform of the naive KFC Ω (borders included), Γ unchanged; a KFC
    /// twin of each layer in the same optimizer gives the untransformed Ω.
    private func suaFactor<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(127)
        let examples = 3
        let cases = [
            ConvCase(inChannels: 3, outChannels: 4, kernel: (3, 3), stride: (2, 2), padding: (1, 1), input: (5, 6)),
            ConvCase(inChannels: 4, outChannels: 2, kernel: (2, 3), stride: (1, 2), padding: (1, 2), groups: 2, hasBias: false, input: (4, 5)),
            ConvCase(inChannels: 2, outChannels: 3, kernel: (3, 3), padding: (2, 1), dilation: (2, 1), input: (4, 4), channelsLast: true),
            ConvCase(inChannels: 3, outChannels: 2, kernel: (1, 3), stride: (1, 2), padding: (0, 1), input: (1, 7)),
        ]
        for s in cases {
            let opt = try KFACOptimizer<S>()
            _ = try opt.addConv2d(s.geometry, approximation: .sua)
            _ = try opt.addConv2d(s.geometry, approximation: .kfc)
            let (x, dy): ([S], [S]) = s.batch(&random, examples: examples)
            for layer in 0..<2 {
                try opt.recordInputs(layer: layer, x, rows: examples)
                try opt.recordOutputGradients(layer: layer, dy, rows: examples)
            }
            try opt.updateFactors()
            for group in 0..<s.groups {
                let kfc = ConvOracle.omega(x, s, examples: examples, group: group)
                let sua = try libraryFactors(opt, layer: 0, group: group, s)
                let twin = try libraryFactors(opt, layer: 1, group: group, s)
                let label = "\(S.self) SUA \(s) group \(group)"
                assertClose(sua.a, ConvOracle.sua(kfc, s), tolerance(S.self), "\(label): Ω")
                assertClose(sua.a, ConvOracle.sua(twin.a, s), tolerance(S.self), "\(label): Ω from the KFC twin")
                assertClose(sua.g, ConvOracle.gamma(dy, s, examples: examples, group: group), tolerance(S.self), "\(label): Γ")
                assertClose(sua.g, twin.g, tolerance(S.self), "\(label): Γ as KFC's")
                if s.hasBias {
                    let b = s.patchSize
                    XCTAssertEqual(sua.a[b, b], Double(s.positions), accuracy: tolerance(S.self) * Double(s.positions), "\(label): Ω_bb = |T|")
                    for k in 0..<b {
                        XCTAssertEqual(sua.a[k, b], 0, "\(label): bias cross term \(k)")
                        XCTAssertEqual(sua.a[b, k], 0, "\(label): bias cross term \(k)")
                    }
                }
            }
        }
    }

    // MARK: Preconditioning

    /// The layers of the preconditioning test: KFC and SUA, conv groups 2, bias and no bias,
    /// both layouts; and a dense layer among them.
    static let stepCases: [(ConvCase, ConvApproximation)] = [
        (ConvCase(inChannels: 4, outChannels: 6, kernel: (3, 3), padding: (1, 1), groups: 2, input: (4, 4)), .kfc),
        (ConvCase(inChannels: 4, outChannels: 4, kernel: (2, 2), stride: (2, 2), padding: (1, 1), groups: 2, hasBias: false, input: (5, 5)), .sua),
        (ConvCase(inChannels: 3, outChannels: 2, kernel: (2, 3), stride: (1, 2), hasBias: false, input: (4, 6), channelsLast: true), .kfc),
        (ConvCase(inChannels: 4, outChannels: 6, kernel: (3, 3), padding: (1, 1), groups: 2, input: (4, 4), channelsLast: true), .sua),
        (ConvCase(inChannels: 2, outChannels: 3, kernel: (1, 3), stride: (1, 2), padding: (0, 1), input: (1, 9)), .kfc),
    ]

    func testPreconditioningMatchesDenseKroneckerSolve() throws {
        for strategy in InverseStrategy.allCases {
            try preconditionMatchesDenseSolve(Float.self, strategy, examples: 3)
            try preconditionMatchesDenseSolve(Double.self, strategy, examples: 3)
            // One example: rank-deficient factors, held up by the damping.
            try preconditionMatchesDenseSolve(Double.self, strategy, examples: 1)
        }
    }

    /// `step` (KL clip off) against, per conv group, the dense solve with the explicit Kronecker
    /// matrix of that group's factors (Ω_SUA for SUA layers); layer 5 is a dense layer.
    private func preconditionMatchesDenseSolve<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy, examples: Int) throws {
        var random = SeededRandom(131)
        let damping = 0.05
        let opt = try KFACOptimizer<S>()
        for (s, approximation) in Self.stepCases { _ = try opt.addConv2d(s.geometry, approximation: approximation) }
        let denseLayer = try opt.addDense(inFeatures: 5, outFeatures: 3, hasBias: true)
        var p = opt.parameters
        p.inverseStrategy = strategy; p.damping = damping; p.klClip = 0
        try opt.setParameters(p)

        var batches: [([S], [S])] = []
        for (l, (s, _)) in Self.stepCases.enumerated() {
            let b: ([S], [S]) = s.batch(&random, examples: examples)
            try opt.recordInputs(layer: l, b.0, rows: examples)
            try opt.recordOutputGradients(layer: l, b.1, rows: examples)
            batches.append(b)
        }
        let dx: [S] = random.array(examples * 5), ddy: [S] = random.array(examples * 3)
        try opt.recordInputs(layer: denseLayer, dx, rows: examples)
        try opt.recordOutputGradients(layer: denseLayer, ddy, rows: examples)

        let grads: [LayerGradient<S>] = Self.stepCases.map { $0.0.gradient(&random) }
            + [LayerGradient(weight: random.array(15), bias: random.array(3))]
        var out = grads
        try opt.step(&out)
        XCTAssertEqual(opt.lastKLScale, 1)

        for (l, (s, approximation)) in Self.stepCases.enumerated() {
            XCTAssertEqual(out[l].weight.count, s.weightCount)
            XCTAssertEqual(out[l].bias?.count, s.hasBias ? s.outChannels : nil)
            for group in 0..<s.groups {
                let kfc = ConvOracle.omega(batches[l].0, s, examples: examples, group: group)
                let omega = approximation == .sua ? ConvOracle.sua(kfc, s) : kfc
                let gamma = ConvOracle.gamma(batches[l].1, s, examples: examples, group: group)
                let v = ConvOracle.parameterMatrix(weight: grads[l].weight, bias: grads[l].bias, s, group: group)
                let expected = expectedDirection(a: omega, g: gamma, v: v, damping: damping, strategy: strategy)
                let actual = ConvOracle.parameterMatrix(weight: out[l].weight, bias: out[l].bias, s, group: group)
                assertClose(actual, expected, tolerance(S.self),
                            "\(S.self) \(strategy) N=\(examples) layer \(l) \(approximation) \(s) group \(group)")
            }
        }
        let a = naiveSecondMoment(dx, rows: examples, width: 5, appendOne: true)
        let g = naiveSecondMoment(ddy, rows: examples, width: 3, appendOne: false)
        let v = parameterMatrix(weight: grads[denseLayer].weight, bias: grads[denseLayer].bias, out: 3, inFeatures: 5)
        assertClose(parameterMatrix(weight: out[denseLayer].weight, bias: out[denseLayer].bias, out: 3, inFeatures: 5),
                    expectedDirection(a: a, g: g, v: v, damping: damping, strategy: strategy), tolerance(S.self),
                    "\(S.self) \(strategy) N=\(examples) dense layer beside the convolutions")
    }
}
