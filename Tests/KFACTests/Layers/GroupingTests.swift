import XCTest
@testable import KFAC

/// Channel grouping (`ChannelGrouping`) of dense and conv layers, KFC and SUA, against the
/// block-diagonal parts of the oracle factors, each test in Float and Double.
final class ChannelGroupingTests: XCTestCase {

    /// The header: "a size of 0, or one not smaller than the channel count, means no grouping"
    /// (the bias then keeps its cross terms).
    private static func effective(_ size: Int, count: Int) -> Int { size >= count ? 0 : size }

    /// The grouped input factor the oracle expects for a dense layer.
    private static func denseBlocks(_ a: Dense, inFeatures: Int, hasBias: Bool, size: Int) -> Dense {
        ConvOracle.blockDiagonalPart(a, block: ConvOracle.inputBlocks(size: effective(size, count: inFeatures), offsets: 1,
                                                                      biasIndex: hasBias ? inFeatures : nil))
    }

    /// The grouped Ω the oracle expects for a conv layer: channel groups span their channels'
    /// kh·kw coordinates, the bias is alone.
    private static func convBlocks(_ omega: Dense, _ s: ConvCase, size: Int) -> Dense {
        ConvOracle.blockDiagonalPart(omega, block: ConvOracle.inputBlocks(size: effective(size, count: s.inPerGroup), offsets: s.offsets,
                                                                          biasIndex: s.hasBias ? s.patchSize : nil))
    }

    private static func outputBlocks(_ g: Dense, count: Int, size: Int) -> Dense {
        ConvOracle.blockDiagonalPart(g, block: ConvOracle.outputBlocks(size: effective(size, count: count)))
    }

    // MARK: Factors

    func testDenseGroupedFactorsAreBlockDiagonalParts() throws {
        try denseGroupedFactors(Float.self)
        try denseGroupedFactors(Double.self)
    }

    /// A 7→5 dense layer ungrouped (layer 0) and with groupings whose sizes do not divide the
    /// counts (last groups of 1 input and 1 output feature), with size 1 and with sizes not
    /// smaller than the counts.
    private func denseGroupedFactors<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(201)
        let (inF, outF, rows) = (7, 5, 6)
        let layers: [(bias: Bool, grouping: ChannelGrouping)] = [
            (true, ChannelGrouping()),
            (true, ChannelGrouping(inputGroupSize: 3, outputGroupSize: 2)),
            (true, ChannelGrouping(inputGroupSize: 3)),
            (true, ChannelGrouping(outputGroupSize: 2)),
            (false, ChannelGrouping(inputGroupSize: 4, outputGroupSize: 3)),
            (true, ChannelGrouping(inputGroupSize: 1, outputGroupSize: 1)),
            // Sizes not smaller than the counts: no grouping, the bias keeps its cross terms.
            (true, ChannelGrouping(inputGroupSize: 7, outputGroupSize: 9)),
        ]
        let opt = try KFACOptimizer<S>()
        for l in layers { _ = try opt.addDense(inFeatures: inF, outFeatures: outF, hasBias: l.bias, grouping: l.grouping) }
        let x: [S] = random.array(rows * inF), dy: [S] = random.array(rows * outF)
        for l in layers.indices {
            try opt.recordInputs(layer: l, x, rows: rows)
            try opt.recordOutputGradients(layer: l, dy, rows: rows)
        }
        try opt.updateFactors()
        let ungrouped = try libraryFactors(opt, layer: 0, group: 0, aDimension: inF + 1, gDimension: outF)
        for (l, layer) in layers.enumerated() {
            let (inSize, outSize) = (layer.grouping.inputGroupSize, layer.grouping.outputGroupSize)
            let aDim = inF + (layer.bias ? 1 : 0)
            let lib = try libraryFactors(opt, layer: l, group: 0, aDimension: aDim, gDimension: outF)
            let a = Self.denseBlocks(naiveSecondMoment(x, rows: rows, width: inF, appendOne: layer.bias),
                                     inFeatures: inF, hasBias: layer.bias, size: inSize)
            let g = Self.outputBlocks(naiveSecondMoment(dy, rows: rows, width: outF, appendOne: false), count: outF, size: outSize)
            let label = "\(S.self) dense bias=\(layer.bias) grouping (\(inSize), \(outSize))"
            assertClose(lib.a, a, tolerance(S.self), "\(label): A")
            assertClose(lib.g, g, tolerance(S.self), "\(label): G")
            if layer.bias {
                assertClose(lib.a, Self.denseBlocks(ungrouped.a, inFeatures: inF, hasBias: true, size: inSize),
                            tolerance(S.self), "\(label): A as the ungrouped layer's blocks")
            }
            assertClose(lib.g, Self.outputBlocks(ungrouped.g, count: outF, size: outSize), tolerance(S.self),
                        "\(label): G as the ungrouped layer's blocks")
        }
    }

    /// Conv layers of the grouping tests with their channel groupings. With conv groups, channel
    /// groups are counted within each conv group's channels (the patch's local channel index c,
    /// as in "(c, i, j) with ⌊c/size⌋ equal").
    static let convCases: [(ConvCase, ChannelGrouping)] = [
        // 5 channels in groups of 2 (last group 1), both sides; stride and padding; bias.
        (ConvCase(inChannels: 5, outChannels: 5, kernel: (2, 2), stride: (2, 1), padding: (1, 1), input: (4, 5)),
         ChannelGrouping(inputGroupSize: 2, outputGroupSize: 2)),
        // Two conv groups of 4 input channels in pairs; output channels alone (diagonal Γ); no bias.
        (ConvCase(inChannels: 8, outChannels: 6, kernel: (3, 1), padding: (1, 0), groups: 2, hasBias: false, input: (4, 3)),
         ChannelGrouping(inputGroupSize: 2, outputGroupSize: 1)),
        // Conv1d NHWC, input grouping only (groups of 2 of 3 channels).
        (ConvCase(inChannels: 3, outChannels: 4, kernel: (1, 3), padding: (0, 1), input: (1, 6), channelsLast: true),
         ChannelGrouping(inputGroupSize: 2)),
        // Output grouping only, groups of 3 of 4 channels: the bias keeps its cross terms.
        (ConvCase(inChannels: 2, outChannels: 4, kernel: (2, 2), padding: (1, 1), input: (3, 3)),
         ChannelGrouping(outputGroupSize: 3)),
        // Two conv groups of 3 channels each, in channel groups {0, 1}, {2} of each conv group
        // (local numbering: global input channels {0, 1}, {2} and {3, 4}, {5}).
        (ConvCase(inChannels: 6, outChannels: 6, kernel: (2, 2), stride: (2, 2), padding: (1, 1), groups: 2, input: (4, 4)),
         ChannelGrouping(inputGroupSize: 2, outputGroupSize: 2)),
        // Sizes equal to the channel counts: no grouping at all (the bias keeps its cross terms).
        (ConvCase(inChannels: 3, outChannels: 2, kernel: (2, 2), padding: (1, 0), input: (3, 3)),
         ChannelGrouping(inputGroupSize: 3, outputGroupSize: 2)),
    ]

    func testConvGroupedFactorsAreBlockDiagonalParts() throws {
        for approximation in [ConvApproximation.kfc, .sua] {
            try convGroupedFactors(Float.self, approximation)
            try convGroupedFactors(Double.self, approximation)
        }
    }

    /// Each case twice in one optimizer, ungrouped and grouped: the grouped factors are the
    /// block-diagonal parts of the oracle's and of the ungrouped layer's.
    private func convGroupedFactors<S: KFACScalar>(_: S.Type, _ approximation: ConvApproximation) throws {
        var random = SeededRandom(211)
        let examples = 2
        for (s, grouping) in Self.convCases {
            let opt = try KFACOptimizer<S>()
            _ = try opt.addConv2d(s.geometry, approximation: approximation)
            _ = try opt.addConv2d(s.geometry, approximation: approximation, grouping: grouping)
            let (x, dy): ([S], [S]) = s.batch(&random, examples: examples)
            for l in 0..<2 {
                try opt.recordInputs(layer: l, x, rows: examples)
                try opt.recordOutputGradients(layer: l, dy, rows: examples)
            }
            try opt.updateFactors()
            for group in 0..<s.groups {
                let kfc = ConvOracle.omega(x, s, examples: examples, group: group)
                let omega = approximation == .sua ? ConvOracle.sua(kfc, s) : kfc
                let gamma = ConvOracle.gamma(dy, s, examples: examples, group: group)
                let ungrouped = try libraryFactors(opt, layer: 0, group: group, s)
                let grouped = try libraryFactors(opt, layer: 1, group: group, s)
                let label = "\(S.self) \(approximation) \(s) grouping (\(grouping.inputGroupSize), \(grouping.outputGroupSize)) group \(group)"
                assertClose(grouped.a, Self.convBlocks(omega, s, size: grouping.inputGroupSize), tolerance(S.self), "\(label): Ω")
                assertClose(grouped.g, Self.outputBlocks(gamma, count: s.outPerGroup, size: grouping.outputGroupSize), tolerance(S.self), "\(label): Γ")
                assertClose(grouped.a, Self.convBlocks(ungrouped.a, s, size: grouping.inputGroupSize), tolerance(S.self),
                            "\(label): Ω as the ungrouped layer's blocks")
                assertClose(grouped.g, Self.outputBlocks(ungrouped.g, count: s.outPerGroup, size: grouping.outputGroupSize), tolerance(S.self),
                            "\(label): Γ as the ungrouped layer's blocks")
            }
        }
    }

    // MARK: Preconditioning

    func testGroupedPreconditioningMatchesBlockDiagonalKroneckerSolve() throws {
        for strategy in InverseStrategy.allCases {
            try groupedPreconditioning(Float.self, strategy)
            try groupedPreconditioning(Double.self, strategy)
        }
    }

    /// `step` (KL clip off) with grouped dense and conv layers against the dense solve with the
    /// explicit Kronecker matrix of the block-diagonal factors: (Ω_grouped ⊗ Γ_grouped + λI)⁻¹
    /// for the eigen strategy, the factored damping with π of the grouped factors for Cholesky.
    private func groupedPreconditioning<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy) throws {
        var random = SeededRandom(223)
        let (damping, examples) = (0.05, 3)
        let (inF, outF) = (7, 5)
        let denseGrouping = ChannelGrouping(inputGroupSize: 3, outputGroupSize: 2)
        let convLayers: [(ConvCase, ConvApproximation, ChannelGrouping)] =
            Self.convCases.map { ($0.0, .kfc, $0.1) } + Self.convCases.prefix(2).map { ($0.0, .sua, $0.1) }
        let opt = try KFACOptimizer<S>()
        _ = try opt.addDense(inFeatures: inF, outFeatures: outF, hasBias: true, grouping: denseGrouping)
        for (s, approximation, grouping) in convLayers {
            _ = try opt.addConv2d(s.geometry, approximation: approximation, grouping: grouping)
        }
        var p = opt.parameters
        p.inverseStrategy = strategy; p.damping = damping; p.klClip = 0
        try opt.setParameters(p)

        let x: [S] = random.array(examples * inF), dy: [S] = random.array(examples * outF)
        try opt.recordInputs(layer: 0, x, rows: examples)
        try opt.recordOutputGradients(layer: 0, dy, rows: examples)
        var batches: [([S], [S])] = []
        for (i, (s, _, _)) in convLayers.enumerated() {
            let b: ([S], [S]) = s.batch(&random, examples: examples)
            try opt.recordInputs(layer: i + 1, b.0, rows: examples)
            try opt.recordOutputGradients(layer: i + 1, b.1, rows: examples)
            batches.append(b)
        }
        let grads = [LayerGradient<S>(weight: random.array(inF * outF), bias: random.array(outF))]
            + convLayers.map { $0.0.gradient(&random) as LayerGradient<S> }
        var out = grads
        try opt.step(&out)

        // The dense layer.
        let a = Self.denseBlocks(naiveSecondMoment(x, rows: examples, width: inF, appendOne: true),
                                 inFeatures: inF, hasBias: true, size: denseGrouping.inputGroupSize)
        let g = Self.outputBlocks(naiveSecondMoment(dy, rows: examples, width: outF, appendOne: false), count: outF,
                                 size: denseGrouping.outputGroupSize)
        let v = parameterMatrix(weight: grads[0].weight, bias: grads[0].bias, out: outF, inFeatures: inF)
        assertClose(parameterMatrix(weight: out[0].weight, bias: out[0].bias, out: outF, inFeatures: inF),
                    expectedDirection(a: a, g: g, v: v, damping: damping, strategy: strategy), tolerance(S.self),
                    "\(S.self) \(strategy) grouped dense layer")
        // The conv layers, per conv group.
        for (i, (s, approximation, grouping)) in convLayers.enumerated() {
            let l = i + 1
            for group in 0..<s.groups {
                let kfc = ConvOracle.omega(batches[i].0, s, examples: examples, group: group)
                let omega = Self.convBlocks(approximation == .sua ? ConvOracle.sua(kfc, s) : kfc, s, size: grouping.inputGroupSize)
                let gamma = Self.outputBlocks(ConvOracle.gamma(batches[i].1, s, examples: examples, group: group),
                                              count: s.outPerGroup, size: grouping.outputGroupSize)
                let v = ConvOracle.parameterMatrix(weight: grads[l].weight, bias: grads[l].bias, s, group: group)
                let expected = expectedDirection(a: omega, g: gamma, v: v, damping: damping, strategy: strategy)
                let actual = ConvOracle.parameterMatrix(weight: out[l].weight, bias: out[l].bias, s, group: group)
                assertClose(actual, expected, tolerance(S.self),
                            "\(S.self) \(strategy) grouped \(approximation) \(s) grouping (\(grouping.inputGroupSize), \(grouping.outputGroupSize)) group \(group)")
            }
        }
    }
}
