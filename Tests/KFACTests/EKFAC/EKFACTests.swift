import XCTest
@testable import KFAC

/// EKFAC (KFAC_INVERSE_EKFAC) against the oracles of EKFACOracles.swift, each test in Float and
/// Double: S is the diagonal of the explicit per-example empirical Fisher in the library's
/// Kronecker eigenbasis, the directions are the dense solve with Ũ diag(S) Ũᵀ + λI, and the
/// schedule of S is the header's.
final class EKFACTests: XCTestCase {
    // MARK: Fixtures

    struct DenseCase: CustomStringConvertible {
        var inFeatures: Int, outFeatures: Int, bias: Bool
        var rows: Int, rowsPerExample: Int
        var mode: EKFACMode
        var grouping = ChannelGrouping()
        var reduction = LossReduction.sum
        var gradScale = 1.0
        var description: String {
            "dense \(inFeatures)→\(outFeatures) bias=\(bias) rows=\(rows) T=\(rowsPerExample) \(mode) groups \(grouping.inputGroupSize)/\(grouping.outputGroupSize) \(reduction) scale \(gradScale)"
        }
        /// The scale recorded gradients are multiplied by.
        var recordScale: Double { (reduction == .mean ? Double(rows) : 1) / gradScale }
        var divisor: Double { Double(rows) }
    }

    static let denseCases: [DenseCase] = [
        DenseCase(inFeatures: 4, outFeatures: 3, bias: true, rows: 7, rowsPerExample: 1, mode: .perExample),
        DenseCase(inFeatures: 4, outFeatures: 3, bias: true, rows: 9, rowsPerExample: 3, mode: .perExample),
        DenseCase(inFeatures: 4, outFeatures: 3, bias: true, rows: 9, rowsPerExample: 3, mode: .perRow),
        DenseCase(inFeatures: 5, outFeatures: 4, bias: false, rows: 8, rowsPerExample: 2, mode: .perExample,
                  reduction: .mean, gradScale: 4),
        DenseCase(inFeatures: 5, outFeatures: 4, bias: true, rows: 8, rowsPerExample: 2, mode: .perExample,
                  grouping: ChannelGrouping(inputGroupSize: 2, outputGroupSize: 3)),
        // Long sequences: kept as per-example matrices rather than rows (PairedStatistics.prefersMatrices).
        DenseCase(inFeatures: 2, outFeatures: 2, bias: true, rows: 16, rowsPerExample: 8, mode: .perExample),
    ]

    static func ekfacOptimizer<S: KFACScalar>(_: S.Type, _ configure: (inout KFACParameters) -> Void = { _ in }) throws -> KFACOptimizer<S> {
        let opt = try KFACOptimizer<S>()
        var p = opt.parameters
        p.inverseStrategy = .ekfac; p.klClip = 0; p.damping = 0.05; p.factorDamping = 0
        configure(&p)
        try opt.setParameters(p)
        return opt
    }

    /// One dense layer with one paired batch recorded and inverted (S = S_batch in new bases).
    static func denseProblem<S: KFACScalar>(_: S.Type, _ c: DenseCase, seed: UInt64,
                                            invert: Bool = true) throws -> (KFACOptimizer<S>, x: [S], g: [S]) {
        var random = SeededRandom(seed)
        let opt = try ekfacOptimizer(S.self) {
            $0.ekfacMode = c.mode; $0.lossReduction = c.reduction; $0.outputGradScale = c.gradScale
        }
        try opt.addDense(inFeatures: c.inFeatures, outFeatures: c.outFeatures, hasBias: c.bias, grouping: c.grouping)
        let x: [S] = random.array(c.rows * c.inFeatures), g: [S] = random.array(c.rows * c.outFeatures, scale: 2)
        try opt.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: c.rows, rowsPerExample: c.rowsPerExample)
        if invert {
            try opt.updateFactors()
            try opt.updateInverses()
        }
        return (opt, x, g)
    }

    static func tol<S: KFACScalar>(_: S.Type) -> Double { S.self == Float.self ? 2e-5 : 1e-12 }

    // MARK: S against the explicit per-example Fisher

    func testDenseScalingIsDiagonalOfRotatedEmpiricalFisher() throws {
        try denseScaling(Float.self)
        try denseScaling(Double.self)
    }

    private func denseScaling<S: KFACScalar>(_: S.Type) throws {
        for c in Self.denseCases {
            let (opt, x, g) = try Self.denseProblem(S.self, c, seed: 501)
            let (qa, qg, s) = try ekfacState(opt, layer: 0)
            // The bases are the eigenbases of the library's factors (as the eigen strategy's).
            let (a, gf) = try libraryFactors(opt, layer: 0, group: 0, aDimension: qa.rows, gDimension: qg.rows)
            for (q, f, name) in [(qa, a, "A"), (qg, gf, "G")] {
                var d = product(product(transpose(q), f), q)
                for i in 0..<d.rows { d[i, i] = 0 }
                XCTAssertLessThan(d.maxAbs / max(1, f.maxAbs), 100 * Self.tol(S.self), "\(S.self) \(c): Qᵀ\(name)Q is diagonal")
            }
            let gradients = densePerExampleGradients(x: x, g: g, rows: c.rows, inFeatures: c.inFeatures, outFeatures: c.outFeatures,
                                                     bias: c.bias, rowsPerExample: c.rowsPerExample, perRow: c.mode == .perRow,
                                                     scale: c.recordScale)
            let expected = rotatedSecondMoment(gradients, divisor: c.divisor, qa: qa, qg: qg)
            assertClose(s, expected, Self.tol(S.self), "\(S.self) \(c): S = (1/R) Σ (Q_Gᵀ G_n Q_A)²")
            // The same through the explicit empirical Fisher: S = diag(Ũᵀ F Ũ).
            let u = kronecker(qa, qg)
            let d = product(product(transpose(u), empiricalFisher(gradients, divisor: c.divisor)), u)
            var diagonal = Dense(rows: s.rows, columns: s.columns)
            for k in 0..<d.rows { diagonal[k % s.rows, k / s.rows] = d[k, k] }
            assertClose(s, diagonal, Self.tol(S.self), "\(S.self) \(c): S = diag(Ũᵀ F Ũ)")
            // A wrong formula (here: K-FAC's d_G d_Aᵀ) would not meet the tolerance.
            if c.rows > 1 {
                let kfac = ekfacMatrix(qa: qa, qg: qg, s: s) + (-1) * kronecker(a, gf)
                XCTAssertGreaterThan(frobenius(kfac) / max(1, s.maxAbs), 1000 * Self.tol(S.self), "\(S.self) \(c): S differs from d_G d_Aᵀ")
            }
        }
    }

    func testBothStorageFormsAreUsed() throws {
        let p = try PairedStatistics<Double>(inputDimension: 3, outputDimension: 2)
        XCTAssertTrue(p.prefersMatrices(unit: 8))
        XCTAssertFalse(p.prefersMatrices(unit: 2))
        XCTAssertFalse(p.prefersMatrices(unit: 1))
    }

    func testPerExampleAndPerRowModesAgreeForOneRowPerExample() throws {
        for mode in EKFACMode.allCases {
            let c = DenseCase(inFeatures: 3, outFeatures: 2, bias: true, rows: 6, rowsPerExample: 1, mode: mode)
            let (opt, _, _) = try Self.denseProblem(Double.self, c, seed: 502)
            let (_, _, s) = try ekfacState(opt, layer: 0)
            let (other, _, _) = try Self.denseProblem(Double.self, DenseCase(inFeatures: 3, outFeatures: 2, bias: true, rows: 6,
                                                                              rowsPerExample: 1, mode: mode == .perRow ? .perExample : .perRow),
                                                      seed: 502)
            XCTAssertEqual(s, try ekfacState(other, layer: 0).s, "T = 1: the modes are the same computation")
        }
    }

    static let convCases: [(ConvCase, ConvApproximation, EKFACMode)] = [
        (ConvCase(inChannels: 2, outChannels: 3, kernel: (3, 2), stride: (2, 1), padding: (1, 1), input: (5, 4)), .kfc, .perExample),
        (ConvCase(inChannels: 4, outChannels: 4, kernel: (2, 2), stride: (1, 2), padding: (1, 0), groups: 2, input: (4, 5)), .kfc, .perExample),
        (ConvCase(inChannels: 4, outChannels: 2, kernel: (2, 3), padding: (0, 1), dilation: (1, 2), groups: 2, hasBias: false,
                  input: (3, 5), channelsLast: true), .kfc, .perExample),
        (ConvCase(inChannels: 2, outChannels: 3, kernel: (2, 2), stride: (2, 2), padding: (1, 1), input: (4, 4)), .sua, .perExample),
        (ConvCase(inChannels: 4, outChannels: 4, kernel: (3, 3), padding: (1, 1), groups: 2, input: (3, 3)), .sua, .perExample),
        (ConvCase(inChannels: 2, outChannels: 3, kernel: (3, 2), stride: (2, 1), padding: (1, 1), input: (5, 4)), .kfc, .perRow),
        (ConvCase(inChannels: 2, outChannels: 2, kernel: (2, 2), stride: (1, 1), padding: (0, 1), groups: 2,
                  input: (3, 3), channelsLast: true), .sua, .perRow),
        // Two positions: kept as rows in examples of 2 (PairedStatistics.prefersMatrices).
        (ConvCase(inChannels: 2, outChannels: 3, kernel: (3, 3), input: (3, 4)), .kfc, .perExample),
    ]

    func testConvScalingMatchesNaivePerExampleLoop() throws {
        try convScaling(Float.self)
        try convScaling(Double.self)
    }

    private func convScaling<S: KFACScalar>(_: S.Type) throws {
        for (s, approximation, mode) in Self.convCases {
            var random = SeededRandom(503)
            let examples = 3
            let opt = try Self.ekfacOptimizer(S.self) { $0.ekfacMode = mode }
            try opt.addConv2d(s.geometry, approximation: approximation)
            let (x, dy): ([S], [S]) = s.batch(&random, examples: examples)
            try opt.recordExamples(layer: 0, inputs: x, outputGradients: dy, rows: examples)
            try opt.updateFactors()
            try opt.updateInverses()
            for group in 0..<s.groups {
                let (qa, qg, scaling) = try ekfacState(opt, layer: 0, group: group)
                let gradients = mode == .perExample
                    ? (0..<examples).map { ConvOracle.parameterGradient(x, dy, s, n: $0, group: group) }
                    : convPerPositionGradients(x, dy, s, examples: examples, group: group)
                let expected = rotatedSecondMoment(gradients, divisor: Double(examples), qa: qa, qg: qg)
                assertClose(scaling, expected, Self.tol(S.self), "\(S.self) \(s) \(approximation) \(mode) group \(group): S")
            }
        }
    }

    func testOneByOneConvolutionOnOnePixelIsDense() throws {
        let s = ConvCase(inChannels: 3, outChannels: 2, kernel: (1, 1), input: (1, 1))
        var random = SeededRandom(504)
        let (x, dy): ([Double], [Double]) = s.batch(&random, examples: 5)
        let conv = try Self.ekfacOptimizer(Double.self)
        try conv.addConv2d(s.geometry)
        try conv.recordExamples(layer: 0, inputs: x, outputGradients: dy, rows: 5)
        let dense = try Self.ekfacOptimizer(Double.self)
        try dense.addDense(inFeatures: 3, outFeatures: 2, hasBias: true)
        try dense.recordExamples(layer: 0, inputs: x, outputGradients: dy, rows: 5)
        for o in [conv, dense] { try o.updateFactors(); try o.updateInverses() }
        XCTAssertEqual(try conv.ekfacScaling(layer: 0), try dense.ekfacScaling(layer: 0))
    }

    // MARK: Optimality

    func testFrobeniusErrorNeverAboveKFAC() throws {
        try frobeniusError(Float.self)
        try frobeniusError(Double.self)
    }

    private func frobeniusError<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(505)
        for c in Self.denseCases where c.grouping == ChannelGrouping() {
            let (opt, x, g) = try Self.denseProblem(S.self, c, seed: 506)
            let (qa, qg, s) = try ekfacState(opt, layer: 0)
            let f = empiricalFisher(densePerExampleGradients(x: x, g: g, rows: c.rows, inFeatures: c.inFeatures,
                                                             outFeatures: c.outFeatures, bias: c.bias,
                                                             rowsPerExample: c.rowsPerExample, perRow: c.mode == .perRow,
                                                             scale: c.recordScale), divisor: c.divisor)
            let (a, gf) = try libraryFactors(opt, layer: 0, group: 0, aDimension: qa.rows, gDimension: qg.rows)
            let ekfac = frobenius(f + (-1) * ekfacMatrix(qa: qa, qg: qg, s: s))
            let kfac = frobenius(f + (-1) * kronecker(a, gf))
            XCTAssertLessThanOrEqual(ekfac, kfac * (1 + Self.tol(S.self)), "\(S.self) \(c): ‖F − EKFAC‖ ≤ ‖F − A⊗G‖")
            for _ in 0..<3 {
                var perturbed = s
                for i in perturbed.values.indices { perturbed.values[i] += 0.05 * s.maxAbs * random.uniform() }
                XCTAssertLessThanOrEqual(ekfac, frobenius(f + (-1) * ekfacMatrix(qa: qa, qg: qg, s: perturbed)) * (1 + Self.tol(S.self)),
                                         "\(S.self) \(c): S is the best diagonal in its basis")
            }
        }
    }

    // MARK: Directions

    func testSingleExampleEqualsEigenStrategy() throws {
        try singleExample(Float.self)
        try singleExample(Double.self)
    }

    private func singleExample<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(507)
        let x: [S] = random.array(5), g: [S] = random.array(3)
        let gradient = [LayerGradient<S>(weight: random.array(15), bias: random.array(3))]
        var directions: [[LayerGradient<S>]] = []
        for strategy in [InverseStrategy.eigen, .ekfac] {
            let opt = try Self.ekfacOptimizer(S.self) { $0.inverseStrategy = strategy }
            try opt.addDense(inFeatures: 5, outFeatures: 3, hasBias: true)
            if strategy == .ekfac {
                try opt.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: 1)
            } else {
                try opt.recordInputs(layer: 0, x, rows: 1)
                try opt.recordOutputGradients(layer: 0, g, rows: 1)
            }
            var d = gradient
            try opt.step(&d)
            directions.append(d)
            if strategy == .ekfac {
                // N = 1: S = d_G d_Aᵀ exactly (up to rounding).
                let c = try opt.estimator.block(layer: 0, group: 0)
                let inverse = c.inverse as! EKFACInverse<S>
                let (dg, da) = (inverse.bases.output.tileValues.base, inverse.bases.input.tileValues.base)
                var outer = Dense(rows: 3, columns: 6)
                for i in 0..<3 { for j in 0..<6 { outer[i, j] = Double(dg[i]) * Double(da[j]) } }
                assertClose(try ekfacState(opt, layer: 0).s, outer, Self.tol(S.self), "\(S.self) N = 1: S = d_G d_Aᵀ")
            }
        }
        let (e, k) = (directions[0][0], directions[1][0])
        assertClose(Dense(rows: 1, columns: 18, k.weight + k.bias!), Dense(rows: 1, columns: 18, e.weight + e.bias!),
                    S.self == Float.self ? 1e-4 : 1e-10, "\(S.self) N = 1: EKFAC's direction is the eigen strategy's")
    }

    func testDirectionsAndForwardProductAreDenseEKFACMatrix() throws {
        try directions(Float.self)
        try directions(Double.self)
    }

    private func directions<S: KFACScalar>(_: S.Type) throws {
        for c in Self.denseCases {
            for factorDamping in [0.0, 0.3] {
                var random = SeededRandom(508)
                let (opt, _, _) = try Self.denseProblem(S.self, c, seed: 509)
                try opt.set(.factorDamping, factorDamping)
                let lambda = opt.parameters.inverseDamping
                let (qa, qg, s) = try ekfacState(opt, layer: 0)
                let m = ekfacMatrix(qa: qa, qg: qg, s: s) + lambda * Dense.identity(qa.rows * qg.rows)
                var w: [S] = random.array(c.inFeatures * c.outFeatures), b: [S]? = c.bias ? random.array(c.outFeatures) : nil
                let v = parameterMatrix(weight: w, bias: b, out: c.outFeatures, inFeatures: c.inFeatures)
                try w.withUnsafeMutableBufferPointer { pw in
                    if b == nil { try opt.precondition(layer: 0, weight: pw.baseAddress!, bias: nil); return }
                    try b!.withUnsafeMutableBufferPointer { pb in try opt.precondition(layer: 0, weight: pw.baseAddress!, bias: pb.baseAddress!) }
                }
                let expected = unvec(denseSolve(m, vec(v)), rows: v.rows, columns: v.columns)
                assertClose(parameterMatrix(weight: w, bias: b, out: c.outFeatures, inFeatures: c.inFeatures), expected,
                            S.self == Float.self ? 1e-4 : 1e-10, "\(S.self) \(c) γ=\(factorDamping): (Ũ diag(S) Ũᵀ + λI)⁻¹ v")
                let one = Dense(rows: m.rows, columns: m.columns,
                                try opt.estimator.denseMatrix(layer: 0, group: 0, power: .one, opt.parameters.curvatureSettings))
                assertClose(one, m, S.self == Float.self ? 1e-5 : 1e-12, "\(S.self) \(c) γ=\(factorDamping): power +1 is Ũ diag(S + λ) Ũᵀ")
            }
        }
    }

    func testDampingCandidatesUseTheScaling() throws {
        try dampingCandidates(Float.self)
        try dampingCandidates(Double.self)
    }

    /// A γ step with EKFAC: each candidate's directions are (Ũ diag(S) Ũᵀ + γ_k I)⁻¹ v with the
    /// step's S (damping applied when preconditioning, as for the eigen strategy).
    private func dampingCandidates<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(514)
        let (inF, outF, rows) = (3, 2, 6)
        let opt = try Self.ekfacOptimizer(S.self) { $0.factorDampingPeriod = 1; $0.factorDamping = 0.2; $0.factorDampingDecay = 0.5 }
        try opt.addDense(inFeatures: inF, outFeatures: outF, hasBias: true)
        try opt.recordExamples(layer: 0, inputs: random.array(rows * inF) as [S], outputGradients: random.array(rows * outF) as [S],
                               rows: rows, rowsPerExample: 2)
        let w: [S] = random.array(inF * outF), b: [S] = random.array(outF)
        var d = [LayerGradient<S>(weight: w, bias: b)]
        try opt.step(&d)
        XCTAssertEqual(opt.candidateCount, 3)
        let (qa, qg, s) = try ekfacState(opt, layer: 0)
        let v = parameterMatrix(weight: w, bias: b, out: outF, inFeatures: inF)
        for k in 0..<3 {
            var cw = [S](repeating: 0, count: inF * outF), cb = [S](repeating: 0, count: outF)
            let gamma = try cw.withUnsafeMutableBufferPointer { pw in
                try cb.withUnsafeMutableBufferPointer { pb in
                    try opt.copyCandidateDirections(k, into: { _ in ParameterGradient(weight: pw.baseAddress!, bias: pb.baseAddress!) })
                }
            }
            let m = ekfacMatrix(qa: qa, qg: qg, s: s) + gamma * Dense.identity(qa.rows * qg.rows)
            let expected = unvec(denseSolve(m, vec(v)), rows: v.rows, columns: v.columns)
            // Candidates are KL-clipped with their own ν; the clip is off here (κ = 0).
            assertClose(parameterMatrix(weight: cw, bias: cb, out: outF, inFeatures: inF), expected,
                        S.self == Float.self ? 1e-4 : 1e-10, "\(S.self) candidate \(k) (γ = \(gamma))")
        }
    }

    // MARK: Schedule

    func testScheduleMovingAverageAndResetOnNewBases() throws {
        try schedule(Float.self)
        try schedule(Double.self)
    }

    private func schedule<S: KFACScalar>(_: S.Type) throws {
        let (inF, outF, rows, beta) = (4, 3, 6, 0.6)
        var random = SeededRandom(510)
        let opt = try Self.ekfacOptimizer(S.self) { $0.inverseUpdatePeriod = 3; $0.ekfacDecay = beta; $0.factorDecay = 0.5 }
        try opt.addDense(inFeatures: inF, outFeatures: outF, hasBias: true)
        func batch() -> (x: [S], g: [S]) { (random.array(rows * inF), random.array(rows * outF)) }
        func rotated(_ b: (x: [S], g: [S]), _ qa: Dense, _ qg: Dense) -> Dense {
            rotatedSecondMoment(densePerExampleGradients(x: b.x, g: b.g, rows: rows, inFeatures: inF, outFeatures: outF, bias: true,
                                                         rowsPerExample: 1, perRow: false), divisor: Double(rows), qa: qa, qg: qg)
        }
        func step() throws {
            var d = [LayerGradient<S>(weight: random.array(inF * outF), bias: random.array(outF))]
            try opt.step(&d)
        }
        let tol = Self.tol(S.self)
        // k = 0: new bases, S = S_batch.
        let b0 = batch()
        try opt.recordExamples(layer: 0, inputs: b0.x, outputGradients: b0.g, rows: rows)
        try step()
        var (qa, qg, s) = try ekfacState(opt, layer: 0)
        assertClose(s, rotated(b0, qa, qg), tol, "\(S.self) k=0: S = S_batch in the new bases")
        // k = 1: same bases, S ← β S + (1 − β) S_batch.
        let b1 = batch()
        try opt.recordExamples(layer: 0, inputs: b1.x, outputGradients: b1.g, rows: rows)
        try step()
        var next = try ekfacState(opt, layer: 0)
        XCTAssertEqual(next.qa, qa, "\(S.self) k=1 keeps the bases")
        XCTAssertEqual(next.qg, qg)
        assertClose(next.s, beta * s + (1 - beta) * rotated(b1, qa, qg), tol, "\(S.self) k=1: S ← β S + (1 − β) S_batch")
        s = next.s
        // k = 2: unpaired records only: S unchanged.
        try opt.recordInputs(layer: 0, batch().x, rows: rows)
        try opt.recordOutputGradients(layer: 0, batch().g, rows: rows)
        try step()
        XCTAssertEqual(try ekfacState(opt, layer: 0).s, s, "\(S.self) k=2: no paired rows, S unchanged")
        // k = 3: new bases with paired rows: S = S_batch in them.
        let b3 = batch()
        try opt.recordExamples(layer: 0, inputs: b3.x, outputGradients: b3.g, rows: rows)
        try step()
        next = try ekfacState(opt, layer: 0)
        XCTAssertNotEqual(next.qa, qa, "\(S.self) k=3 recomputes the bases")
        (qa, qg) = (next.qa, next.qg)
        assertClose(next.s, rotated(b3, qa, qg), tol, "\(S.self) k=3: S = S_batch in the new bases")
        // k = 4, 5 with unpaired records; k = 6: new bases without paired rows: S = d_G d_Aᵀ.
        for _ in 4...6 {
            try opt.recordInputs(layer: 0, batch().x, rows: rows)
            try opt.recordOutputGradients(layer: 0, batch().g, rows: rows)
            try step()
        }
        let c = try opt.estimator.block(layer: 0, group: 0)
        let inverse = c.inverse as! EKFACInverse<S>
        var outer = Dense(rows: outF, columns: inF + 1)
        for i in 0..<outF { for j in 0...inF { outer[i, j] = Double(inverse.bases.output.tileValues.base[i]) * Double(inverse.bases.input.tileValues.base[j]) } }
        assertClose(try ekfacState(opt, layer: 0).s, outer, tol, "\(S.self) k=6: new bases without paired rows, S = d_G d_Aᵀ")
        // update_factors with bases: the same moving average.
        (qa, qg, s) = try ekfacState(opt, layer: 0)
        let b7 = batch()
        try opt.recordExamples(layer: 0, inputs: b7.x, outputGradients: b7.g, rows: rows)
        try opt.updateFactors()
        assertClose(try ekfacState(opt, layer: 0).s, beta * s + (1 - beta) * rotated(b7, qa, qg), tol,
                    "\(S.self) update_factors: S ← β S + (1 − β) S_batch")
        // update_inverses: new bases and nothing pending: S = d_G d_Aᵀ of the new factors.
        try opt.updateInverses()
        let refreshed = try opt.estimator.block(layer: 0, group: 0).inverse as! EKFACInverse<S>
        for i in 0..<outF { for j in 0...inF { outer[i, j] = Double(refreshed.bases.output.tileValues.base[i]) * Double(refreshed.bases.input.tileValues.base[j]) } }
        assertClose(try ekfacState(opt, layer: 0).s, outer, tol, "\(S.self) update_inverses without paired rows: S = d_G d_Aᵀ")
    }

    func testFactorUpdatePeriodKeepsPairedRowsUntilTheFold() throws {
        // Tf = 2: rows recorded at k = 0 and k = 1 are both in the first S (new bases at k = 0
        // use k = 0's rows; k = 1 is not a factor update, k = 2 folds k = 1's and k = 2's rows).
        let (inF, outF, rows) = (3, 2, 4)
        var random = SeededRandom(511)
        let opt = try Self.ekfacOptimizer(Double.self) { $0.factorUpdatePeriod = 2; $0.inverseUpdatePeriod = 10; $0.ekfacDecay = 0.5 }
        try opt.addDense(inFeatures: inF, outFeatures: outF, hasBias: false)
        var batches: [(x: [Double], g: [Double])] = []
        for _ in 0..<3 {
            let b: (x: [Double], g: [Double]) = (random.array(rows * inF), random.array(rows * outF))
            batches.append(b)
            try opt.recordExamples(layer: 0, inputs: b.x, outputGradients: b.g, rows: rows)
            var d = [LayerGradient<Double>(weight: random.array(inF * outF), bias: nil)]
            try opt.step(&d)
        }
        let (qa, qg, s) = try ekfacState(opt, layer: 0)
        func rotated(_ bs: [(x: [Double], g: [Double])]) -> Dense {
            rotatedSecondMoment(bs.flatMap { densePerExampleGradients(x: $0.x, g: $0.g, rows: rows, inFeatures: inF, outFeatures: outF,
                                                                      bias: false, rowsPerExample: 1, perRow: false) },
                                divisor: Double(rows * bs.count), qa: qa, qg: qg)
        }
        assertClose(s, 0.5 * rotated([batches[0]]) + 0.5 * rotated([batches[1], batches[2]]), 1e-12,
                    "S folds every factor update with the rows since the last one")
    }

    // MARK: Checkpoints

    func testResumeFromCheckpointIsBitIdentical() throws {
        try resume(Float.self)
        try resume(Double.self)
    }

    private func resume<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(512)
        let s = ConvCase(inChannels: 2, outChannels: 4, kernel: (2, 2), padding: (1, 0), groups: 2, input: (3, 3))
        func make() throws -> KFACOptimizer<S> {
            let opt = try Self.ekfacOptimizer(S.self) { $0.inverseUpdatePeriod = 2; $0.ekfacDecay = 0.7 }
            try opt.addDense(inFeatures: 4, outFeatures: 3, hasBias: true)
            try opt.addConv2d(s.geometry, approximation: .sua)
            return opt
        }
        let a = try make()
        func record(_ opts: [KFACOptimizer<S>], rowsPerExample: Int) throws {
            let x: [S] = random.array(6 * 4), g: [S] = random.array(6 * 3)
            let (cx, cg): ([S], [S]) = s.batch(&random, examples: 2)
            for o in opts {
                try o.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: 6, rowsPerExample: rowsPerExample)
                try o.recordExamples(layer: 1, inputs: cx, outputGradients: cg, rows: 2)
            }
        }
        func step(_ opts: [KFACOptimizer<S>]) throws -> [[LayerGradient<S>]] {
            let d0 = [LayerGradient<S>(weight: random.array(12), bias: random.array(3)), s.gradient(&random) as LayerGradient<S>]
            return try opts.map { o in var d = d0; try o.step(&d); return d }
        }
        for _ in 0..<3 { try record([a], rowsPerExample: 2); _ = try step([a]) }
        try record([a], rowsPerExample: 3)  // pending paired rows in the image
        let b = try make()
        let image = try a.stateImage()
        try image.withUnsafeBytes { try b.loadState(from: $0) }
        XCTAssertEqual(try b.stateImage(), image, "\(S.self): the image round-trips")
        for _ in 0..<4 {
            let d = try step([a, b])
            XCTAssertEqual(d[0], d[1], "\(S.self): directions after resuming are bit-identical")
            try record([a, b], rowsPerExample: 2)
        }
        XCTAssertEqual(try a.ekfacScaling(layer: 1, group: 1), try b.ekfacScaling(layer: 1, group: 1))
        XCTAssertEqual(try a.stateImage(), try b.stateImage(), "\(S.self): states stay identical")
    }

    // MARK: Misuse

    func testMisuseLeavesTheOptimizerUnchanged() throws {
        let opt = try Self.ekfacOptimizer(Double.self)
        try opt.addDense(inFeatures: 3, outFeatures: 2, hasBias: true)
        try opt.addConv2d(ConvCase(inChannels: 1, outChannels: 2, kernel: (2, 2), input: (3, 3)).geometry)
        let x = [Double](repeating: 0.5, count: 12), g = [Double](repeating: 0.25, count: 8)
        XCTAssertThrowsError(try opt.ekfacScaling(layer: 0)) { XCTAssertEqual(($0 as! KFACError).status, .noInverses) }
        let before = try opt.stateImage()
        func expect(_ status: KFACStatus, _ what: String, _ body: () throws -> Void) {
            XCTAssertThrowsError(try body(), what) { XCTAssertEqual(($0 as? KFACError)?.status, status, what) }
            XCTAssertEqual(try? opt.stateImage(), before, "\(what) left the optimizer as it was")
        }
        expect(.invalidSize, "rows_per_example 0") { try opt.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: 4, rowsPerExample: 0) }
        expect(.invalidSize, "rows_per_example 3 of 4 rows") { try opt.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: 4, rowsPerExample: 3) }
        expect(.unknownLayer, "layer 2") { try opt.recordExamples(layer: 2, inputs: x, outputGradients: g, rows: 4) }
        expect(.nonFinite, "NaN gradient") {
            var bad = g; bad[3] = .nan
            try opt.recordExamples(layer: 0, inputs: x, outputGradients: bad, rows: 4)
        }
        expect(.nonFinite, "huge values") {
            try opt.recordExamples(layer: 0, inputs: x.map { $0 * 1e150 }, outputGradients: g.map { $0 * 1e150 }, rows: 4)
        }
        expect(.nullPointer, "NULL inputs") { try opt.recordExamples(layer: 0, inputs: nil, outputGradients: g, rows: 4) }
        let cx = [Double](repeating: 0.5, count: 18), cg = [Double](repeating: 0.25, count: 16)
        expect(.invalidSize, "conv rows_per_example 2") { try opt.recordExamples(layer: 1, inputs: cx, outputGradients: cg, rows: 2, rowsPerExample: 2) }
        try opt.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: 4, rowsPerExample: 2)
        try opt.recordExamples(layer: 1, inputs: cx, outputGradients: cg, rows: 2)
        try opt.updateFactors()
        try opt.updateInverses()
        XCTAssertThrowsError(try opt.ekfacScaling(layer: 1, group: 1)) { XCTAssertEqual(($0 as! KFACError).status, .invalidArgument) }
        XCTAssertEqual(try opt.ekfacScaling(layer: 0).count, 2 * 4)
        // Another strategy: no EKFAC inverse to read, and the paired call records A and G only.
        try opt.set(.inverseStrategy, Int64(InverseStrategy.eigen.rawValue))
        try opt.updateInverses()
        XCTAssertThrowsError(try opt.ekfacScaling(layer: 0)) { XCTAssertEqual(($0 as! KFACError).status, .noInverses) }
        try opt.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: 4)
        XCTAssertNil(opt.estimator.blocks[0].paired.flatMap { $0.hasPending ? $0 : nil }, "no per-example gradients kept for the eigen strategy")
    }

    func testLeavingTheStrategyDiscardsPendingExamples() throws {
        // An EKFAC handle with pending per-example gradients, switched to the eigen strategy, is
        // the eigen handle that recorded the same rows unpaired: same state image, byte for byte.
        var random = SeededRandom(515)
        let x: [Double] = random.array(8 * 3), g: [Double] = random.array(8 * 2)
        let a = try Self.ekfacOptimizer(Double.self), b = try Self.ekfacOptimizer(Double.self) { $0.inverseStrategy = .eigen }
        for o in [a, b] { try o.addDense(inFeatures: 3, outFeatures: 2, hasBias: true) }
        try a.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: 8, rowsPerExample: 2)
        XCTAssertTrue(a.estimator.blocks[0].paired?.hasPending ?? false)
        try b.recordInputs(layer: 0, x, rows: 8)
        try b.recordOutputGradients(layer: 0, g, rows: 8)
        try a.set(.inverseStrategy, Int64(InverseStrategy.eigen.rawValue))
        XCTAssertFalse(a.estimator.blocks[0].paired?.hasPending ?? false)
        XCTAssertEqual(try a.stateImage(), try b.stateImage())
    }

    func testPairedCallRecordsTheSameFactorsAsTheUnpairedCalls() throws {
        for strategy in InverseStrategy.allCases {
            var random = SeededRandom(513)
            let s = ConvCase(inChannels: 2, outChannels: 2, kernel: (2, 2), stride: (2, 1), input: (4, 3))
            let (x, g): ([Double], [Double]) = (random.array(10 * 4), random.array(10 * 3))
            let (cx, cg): ([Double], [Double]) = s.batch(&random, examples: 3)
            var factors: [[[Double]]] = []
            for paired in [false, true] {
                let opt = try Self.ekfacOptimizer(Double.self) { $0.inverseStrategy = strategy; $0.lossReduction = .mean }
                try opt.addDense(inFeatures: 4, outFeatures: 3, hasBias: true)
                try opt.addConv2d(s.geometry)
                if paired {
                    try opt.recordExamples(layer: 0, inputs: x, outputGradients: g, rows: 10, rowsPerExample: 5)
                    try opt.recordExamples(layer: 1, inputs: cx, outputGradients: cg, rows: 3)
                } else {
                    try opt.recordInputs(layer: 0, x, rows: 10); try opt.recordOutputGradients(layer: 0, g, rows: 10)
                    try opt.recordInputs(layer: 1, cx, rows: 3); try opt.recordOutputGradients(layer: 1, cg, rows: 3)
                }
                try opt.updateFactors()
                let f0 = try opt.factors(layer: 0), f1 = try opt.factors(layer: 1)
                factors.append([f0.a, f0.g, f1.a, f1.g])
            }
            XCTAssertEqual(factors[0], factors[1], "\(strategy): a paired call adds exactly what the two unpaired calls add")
        }
    }
}
