import CBLAS
import XCTest
@testable import KFAC

/// Dense-layer K-FAC against the oracles of Oracles.swift, each test in Float and Double.
final class DenseKFACTests: XCTestCase {

    // MARK: Factors

    func testFactorsMatchNaiveLoopAndMovingAverage() throws {
        try factorsMatchNaiveLoop(Float.self)
        try factorsMatchNaiveLoop(Double.self)
    }

    private func factorsMatchNaiveLoop<S: KFACScalar>(_: S.Type) throws {
        var problem = TwoLayerProblem<S>(seed: 1)
        let beta = 0.8
        let opt = try problem.makeOptimizer {
            $0.lossReduction = .mean
            $0.outputGradScale = 2
            $0.factorDecay = beta
        }
        // Two record calls of 3 and 4 rows: every row counts once, the mean reduction scales each
        // call's gradients by its rows, the loss scale divides them.
        let b1 = problem.batch(rows: 3), b2 = problem.batch(rows: 4)
        try problem.record(opt, b1, rows: 3)
        try problem.record(opt, b2, rows: 4)
        try opt.updateFactors()
        var first: [(Dense, Dense)] = []
        for (l, s) in TwoLayerProblem<S>.shapes.enumerated() {
            let a = (3.0 / 7) * naiveSecondMoment(b1[l].x, rows: 3, width: s.inF, appendOne: s.bias)
                + (4.0 / 7) * naiveSecondMoment(b2[l].x, rows: 4, width: s.inF, appendOne: s.bias)
            let g = (3.0 / 7) * naiveSecondMoment(b1[l].g, rows: 3, width: s.outF, appendOne: false, rowScale: 3.0 / 2)
                + (4.0 / 7) * naiveSecondMoment(b2[l].g, rows: 4, width: s.outF, appendOne: false, rowScale: 4.0 / 2)
            let (la, lg) = try opt.factors(layer: l)
            assertClose(Dense(rows: a.rows, columns: a.columns, la), a, tolerance(S.self), "A of layer \(l)")
            assertClose(Dense(rows: g.rows, columns: g.columns, lg), g, tolerance(S.self), "G of layer \(l)")
            first.append((a, g))
        }
        // A second update decays: F ← β F + (1 − β) F_batch.
        let b3 = problem.batch(rows: 5)
        try problem.record(opt, b3, rows: 5)
        try opt.updateFactors()
        for (l, s) in TwoLayerProblem<S>.shapes.enumerated() {
            let a = beta * first[l].0 + (1 - beta) * naiveSecondMoment(b3[l].x, rows: 5, width: s.inF, appendOne: s.bias)
            let g = beta * first[l].1
                + (1 - beta) * naiveSecondMoment(b3[l].g, rows: 5, width: s.outF, appendOne: false, rowScale: 5.0 / 2)
            let (la, lg) = try opt.factors(layer: l)
            assertClose(Dense(rows: a.rows, columns: a.columns, la), a, tolerance(S.self), "EMA A of layer \(l)")
            assertClose(Dense(rows: g.rows, columns: g.columns, lg), g, tolerance(S.self), "EMA G of layer \(l)")
        }
    }

    func testSingleExampleFisherBlockIsKroneckerProduct() throws {
        try singleExampleFisher(Float.self)
        try singleExampleFisher(Double.self)
    }

    /// For one example the empirical Fisher block vec(∇Θ) vec(∇Θ)ᵀ, ∇Θ = g āᵀ, equals A ⊗ G.
    private func singleExampleFisher<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(7)
        let opt = try KFACOptimizer<S>()
        try opt.addDense(inFeatures: 4, outFeatures: 3, hasBias: true)
        let x: [S] = random.array(4), g: [S] = random.array(3)
        try opt.recordInputs(layer: 0, x, rows: 1)
        try opt.recordOutputGradients(layer: 0, g, rows: 1)
        try opt.updateFactors()
        let (a, gg) = try opt.factors(layer: 0)
        let libraryBlock = kronecker(Dense(rows: 5, columns: 5, a), Dense(rows: 3, columns: 3, gg))
        var grad = Dense(rows: 3, columns: 5)
        let xb = x.map(Double.init) + [1]
        for o in 0..<3 { for i in 0..<5 { grad[o, i] = Double(g[o]) * xb[i] } }
        let v = vec(grad)
        var fisher = Dense(rows: 15, columns: 15)
        for i in 0..<15 { for j in 0..<15 { fisher[i, j] = v[i] * v[j] } }
        assertClose(libraryBlock, fisher, tolerance(S.self), "single-example Fisher")
    }

    // MARK: Preconditioning

    func testPreconditioningMatchesDenseKroneckerSolve() throws {
        for strategy in InverseStrategy.allCases {
            for usePi in [true, false] {
                try preconditionMatchesDenseSolve(Float.self, strategy, usePi: usePi, rows: 9)
                try preconditionMatchesDenseSolve(Double.self, strategy, usePi: usePi, rows: 9)
                // Fewer rows than the factor dimension: singular factors, held up by the damping.
                try preconditionMatchesDenseSolve(Double.self, strategy, usePi: usePi, rows: 2)
            }
        }
    }

    private func preconditionMatchesDenseSolve<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy, usePi: Bool, rows: Int) throws {
        var problem = TwoLayerProblem<S>(seed: 3)
        let damping = 0.05
        let opt = try problem.makeOptimizer {
            $0.inverseStrategy = strategy
            $0.damping = damping
            $0.klClip = 0
            $0.piDamping = usePi
        }
        let b = problem.batch(rows: rows)
        try problem.record(opt, b, rows: rows)
        let grads = problem.gradients()
        var out = grads
        try opt.step(&out)
        for (l, s) in TwoLayerProblem<S>.shapes.enumerated() {
            let a = naiveSecondMoment(b[l].x, rows: rows, width: s.inF, appendOne: s.bias)
            let g = naiveSecondMoment(b[l].g, rows: rows, width: s.outF, appendOne: false)
            let v = parameterMatrix(weight: grads[l].weight, bias: grads[l].bias, out: s.outF, inFeatures: s.inF)
            let expected = expectedDirection(a: a, g: g, v: v, damping: damping, strategy: strategy, usePi: usePi)
            let actual = parameterMatrix(weight: out[l].weight, bias: out[l].bias, out: s.outF, inFeatures: s.inF)
            assertClose(actual, expected, tolerance(S.self), "\(S.self) \(strategy) π=\(usePi) rows=\(rows) layer \(l)")
        }
        XCTAssertEqual(opt.lastKLScale, 1)
        // precondition(layer:) applies the same inverse without touching the state.
        var w = grads[0].weight, bias = grads[0].bias!
        try w.withUnsafeMutableBufferPointer { pw in
            try bias.withUnsafeMutableBufferPointer { pb in
                try opt.precondition(layer: 0, weight: pw.baseAddress!, bias: pb.baseAddress!)
            }
        }
        XCTAssertEqual(w, out[0].weight)
        XCTAssertEqual(bias, out[0].bias)
    }

    func testKLClipScalesEveryLayerByNu() throws {
        try klClip(Float.self)
        try klClip(Double.self)
    }

    private func klClip<S: KFACScalar>(_: S.Type) throws {
        var problem = TwoLayerProblem<S>(seed: 11)
        let (kappa, eta, damping) = (1e-4, 0.5, 0.1)
        let opt = try problem.makeOptimizer {
            $0.klClip = kappa; $0.learningRate = eta; $0.damping = damping
        }
        let b = problem.batch(rows: 8)
        try problem.record(opt, b, rows: 8)
        let grads = problem.gradients()
        var out = grads
        try opt.step(&out)
        var inner = 0.0
        var unclipped: [Dense] = []
        for (l, s) in TwoLayerProblem<S>.shapes.enumerated() {
            let a = naiveSecondMoment(b[l].x, rows: 8, width: s.inF, appendOne: s.bias)
            let g = naiveSecondMoment(b[l].g, rows: 8, width: s.outF, appendOne: false)
            let v = parameterMatrix(weight: grads[l].weight, bias: grads[l].bias, out: s.outF, inFeatures: s.inF)
            let u = expectedDirection(a: a, g: g, v: v, damping: damping, strategy: .eigen)
            inner += abs(zip(u.values, v.values).map(*).reduce(0, +))
            unclipped.append(u)
        }
        let nu = min(1, (kappa / (eta * eta * inner)).squareRoot())
        XCTAssertLessThan(nu, 0.5, "the test must exercise clipping")
        XCTAssertEqual(opt.lastKLScale, nu, accuracy: tolerance(S.self) * nu)
        for (l, s) in TwoLayerProblem<S>.shapes.enumerated() {
            let actual = parameterMatrix(weight: out[l].weight, bias: out[l].bias, out: s.outF, inFeatures: s.inF)
            assertClose(actual, nu * unclipped[l], tolerance(S.self), "clipped layer \(l)")
        }
    }

    // MARK: Schedule

    func testFactorAndInversePeriods() throws {
        try periods(Float.self)
        try periods(Double.self)
    }

    /// Factor period 2, inverse period 3: which statistics and which inverse each step uses.
    private func periods<S: KFACScalar>(_: S.Type) throws {
        var problem = TwoLayerProblem<S>(seed: 5)
        let (beta, damping) = (0.7, 0.05)
        let opt = try problem.makeOptimizer {
            $0.factorUpdatePeriod = 2; $0.inverseUpdatePeriod = 3
            $0.factorDecay = beta; $0.damping = damping; $0.klClip = 0
        }
        let shapes = TwoLayerProblem<S>.shapes
        func naive(_ b: [(x: [S], g: [S])], rows: Int) -> [(Dense, Dense)] {
            shapes.enumerated().map { l, s in
                (naiveSecondMoment(b[l].x, rows: rows, width: s.inF, appendOne: s.bias),
                 naiveSecondMoment(b[l].g, rows: rows, width: s.outF, appendOne: false))
            }
        }
        func checkStep(_ factors: [(Dense, Dense)], _ label: String) throws {
            let grads = problem.gradients()
            var out = grads
            try opt.step(&out)
            for (l, s) in shapes.enumerated() {
                let v = parameterMatrix(weight: grads[l].weight, bias: grads[l].bias, out: s.outF, inFeatures: s.inF)
                let expected = expectedDirection(a: factors[l].0, g: factors[l].1, v: v, damping: damping, strategy: .eigen)
                let actual = parameterMatrix(weight: out[l].weight, bias: out[l].bias, out: s.outF, inFeatures: s.inF)
                assertClose(actual, expected, tolerance(S.self), "\(label), layer \(l)")
            }
        }
        // k = 0: fold B0, invert.
        XCTAssertTrue(opt.wantsStatistics)
        let b0 = problem.batch(rows: 6)
        try problem.record(opt, b0, rows: 6)
        let f0 = naive(b0, rows: 6)
        try checkStep(f0, "step 0")
        // k = 1: not a factor step; B1 stays pending; the step-0 inverse is used.
        XCTAssertFalse(opt.wantsStatistics)
        let b1 = problem.batch(rows: 4)
        try problem.record(opt, b1, rows: 4)
        try checkStep(f0, "step 1")
        // k = 2: fold B1 and B2 together into the average; no inversion (period 3): still F0's inverse.
        XCTAssertTrue(opt.wantsStatistics)
        let b2 = problem.batch(rows: 6)
        try problem.record(opt, b2, rows: 6)
        try checkStep(f0, "step 2")
        let n1 = naive(b1, rows: 4), n2 = naive(b2, rows: 6)
        func average(_ old: Dense, _ p1: Dense, _ p2: Dense) -> Dense {
            let batch: Dense = 0.4 * p1 + 0.6 * p2
            return beta * old + (1 - beta) * batch
        }
        let f2 = (0..<shapes.count).map { l in
            (average(f0[l].0, n1[l].0, n2[l].0), average(f0[l].1, n1[l].1, n2[l].1))
        }
        // k = 3: inversion of the averaged factors.
        try checkStep(f2, "step 3")
        XCTAssertEqual(opt.stepCount, 4)
    }

    func testInverseUpdatePeriodZeroMeansOnRequest() throws {
        var problem = TwoLayerProblem<Double>(seed: 9)
        let opt = try problem.makeOptimizer { $0.inverseUpdatePeriod = 0 }
        try problem.record(opt, problem.batch(rows: 5), rows: 5)
        var grads = problem.gradients()
        XCTAssertThrowsError(try opt.step(&grads)) { XCTAssertEqual(($0 as? KFACError)?.status, .noInverses) }
        XCTAssertEqual(opt.stepCount, 0)
        try opt.updateFactors()
        try opt.updateInverses()
        try opt.step(&grads)
        XCTAssertEqual(opt.stepCount, 1)
    }

    // MARK: Parallel inversion

    func testParallelInversionMatchesSequential() throws {
        // The worker pool runs only while OpenBLAS is single-threaded.
        let blasThreads = openblas_get_num_threads()
        openblas_set_num_threads(1)
        defer { openblas_set_num_threads(blasThreads) }
        var directions: [[LayerGradient<Double>]] = []
        for threads in [1, 2] {
            var problem = TwoLayerProblem<Double>(seed: 21)
            let opt = try problem.makeOptimizer { $0.threadCount = threads; $0.klClip = 0 }
            try problem.record(opt, problem.batch(rows: 7), rows: 7)
            var g = problem.gradients()
            try opt.step(&g)
            directions.append(g)
        }
        for l in 0..<2 {
            for (x, y) in zip(directions[0][l].weight, directions[1][l].weight) { XCTAssertEqual(x, y, accuracy: 1e-9) }
        }
    }
}
