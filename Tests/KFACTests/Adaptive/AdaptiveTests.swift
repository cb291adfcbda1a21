import XCTest
@testable import KFAC

/// The adaptive mode against a direct computation on a tiny network with its explicit Fisher,
/// and the target samplers against their distributions' moments.
final class AdaptiveTests: XCTestCase {

    private func softmax(_ z: [Double]) -> [Double] { oracleSoftmax(z) }


    private func dot(_ a: Dense, _ b: Dense) -> Double { zip(a.values, b.values).map(*).reduce(0, +) }

    func testStepSizeAndMomentumSolveTheQuadraticModel() throws {
        try quadraticModel(Float.self, tolerance: 2e-3)
        try quadraticModel(Double.self, tolerance: 1e-9)
    }

    private func quadraticModel<S: KFACScalar>(_: S.Type, tolerance: Double) throws {
        var random = SeededRandom(51)
        let (n, inF, out) = (12, 3, 4)
        let net = LinearSoftmaxOracle(inputs: (0..<n).map { _ in (0..<inF).map { _ in random.uniform() } },
                                labels: (0..<n).map { $0 % out }, out: out)
        var theta = Dense(rows: out, columns: inF + 1)
        for i in theta.values.indices { theta.values[i] = 0.5 * random.uniform() }
        let opt = try KFACOptimizer<S>()
        try opt.addDense(inFeatures: inF, outFeatures: out, hasBias: true)
        var p = opt.parameters
        p.klClip = 0; p.damping = 0.05; p.inverseUpdatePeriod = 1
        try opt.setParameters(p)

        var previous: Dense? = nil
        for k in 0..<3 {
            // Statistics, then the step on the mean-loss gradient.
            let x: [S] = net.inputs.flatMap { $0.map { S($0) } }
            var g: [S] = []
            for r in 0..<n {
                var pr = softmax(net.logits(theta, r))
                pr[net.labels[r]] -= 1
                g += pr.map { S($0) }
            }
            try opt.recordInputs(layer: 0, x, rows: n)
            try opt.recordOutputGradients(layer: 0, g, rows: n)
            let grad = net.gradient(theta)
            var grads = [LayerGradient<S>(weight: (0..<out).flatMap { o in (0..<inF).map { S(grad[o, $0]) } },
                                          bias: (0..<out).map { S(grad[$0, inF]) })]
            try opt.step(&grads)
            let d = parameterMatrix(weight: grads[0].weight, bias: grads[0].bias, out: out, inFeatures: inF)

            // The oracle: minimise ½ δᵀ(F + λI)δ + ∇hᵀδ over δ = −αD + μδ₀.
            let lambda = 0.05
            let delta = -1.0 * d
            let a11 = net.fisher(theta, delta, delta) + lambda * dot(delta, delta)
            let b1 = dot(grad, delta)
            var expectedAlpha: Double, expectedMu = 0.0, expectedM: Double
            if let prev = previous {
                let a12 = net.fisher(theta, delta, prev) + lambda * dot(delta, prev)
                let a22 = net.fisher(theta, prev, prev) + lambda * dot(prev, prev)
                let b2 = dot(grad, prev)
                let det = a11 * a22 - a12 * a12
                expectedAlpha = -(a22 * b1 - a12 * b2) / det
                expectedMu = -(a11 * b2 - a12 * b1) / det
                expectedM = 0.5 * (a11 * expectedAlpha * expectedAlpha + 2 * a12 * expectedAlpha * expectedMu
                                   + a22 * expectedMu * expectedMu) + b1 * expectedAlpha + b2 * expectedMu
            } else {
                expectedAlpha = -b1 / a11
                expectedM = 0.5 * a11 * expectedAlpha * expectedAlpha + b1 * expectedAlpha
            }
            let outputs: [S] = (0..<n).flatMap { net.logits(theta, $0).map { S($0) } }
            let jd: [S] = net.products(d).map { S($0) }
            let jp: [S]? = previous.map { net.products($0).map { S($0) } }
            let solved = try outputs.withUnsafeBufferPointer { o in
                try jd.withUnsafeBufferPointer { a in
                    try (jp ?? []).withUnsafeBufferPointer { b in
                        try opt.solveStepSize(outputs: o.baseAddress, directionProducts: a.baseAddress,
                                              previousProducts: jp == nil ? nil : b.baseAddress, rows: n, dim: out,
                                              distribution: .categorical)
                    }
                }
            }
            XCTAssertEqual(solved.alpha, expectedAlpha, accuracy: tolerance * abs(expectedAlpha), "\(S.self) step \(k): α")
            XCTAssertEqual(solved.mu, expectedMu, accuracy: tolerance * max(abs(expectedMu), 1e-3), "\(S.self) step \(k): μ")
            XCTAssertEqual(solved.predictedChange, expectedM, accuracy: tolerance * abs(expectedM), "\(S.self) step \(k): M(δ)")
            XCTAssertLessThan(solved.predictedChange, 0, "the model predicts a decrease")
            if k > 0 { XCTAssertNotEqual(solved.mu, 0, "momentum is used once there is a previous update") }

            // Apply δ, and ρ against the true losses.
            let update = expectedAlpha * delta + (previous.map { expectedMu * $0 } ?? Dense(rows: out, columns: inF + 1))
            let before = net.loss(theta)
            theta = theta + update
            let after = net.loss(theta)
            let rho = try opt.reportLossChange(before: before, after: after)
            XCTAssertEqual(rho, (after - before) / solved.predictedChange, accuracy: 1e-12)
            XCTAssertEqual(rho, (after - before) / expectedM, accuracy: 20 * tolerance)
            XCTAssertGreaterThan(rho, 0.3, "the quadratic model of a softmax layer is good near the optimum of the model")
            previous = update
        }
        // Misuse: solving twice, or reporting twice, is refused.
        var statusCode: KFACStatus?
        do { _ = try opt.reportLossChange(before: 1, after: 0.5) } catch { statusCode = error.status }
        XCTAssertEqual(statusCode, .noStep)
    }

    /// A one-layer optimizer with LM interval 2, ω = 0.9, λ = 1, and a function that records a
    /// fixed batch, steps and solves (Gaussian outputs), returning M(δ).
    private func lmOptimizer() throws -> (KFACOptimizer<Double>, () throws -> Double) {
        let opt = try KFACOptimizer<Double>()
        try opt.addDense(inFeatures: 2, outFeatures: 2, hasBias: false)
        var p = opt.parameters
        p.lmInterval = 2; p.lmDecay = 0.9; p.damping = 1; p.klClip = 0
        try opt.setParameters(p)
        let x: [Double] = [1, 0.5, -0.3, 0.8], g: [Double] = [0.2, -0.4, 0.5, 0.1]
        return (opt, {
            try opt.recordInputs(layer: 0, x, rows: 2)
            try opt.recordOutputGradients(layer: 0, g, rows: 2)
            var grads = [LayerGradient<Double>(weight: [0.3, -0.2, 0.1, 0.4], bias: nil)]
            try opt.step(&grads)
            return try opt.solveStepSize(outputs: [0.1, 0.2, -0.1, 0.3], directionProducts: [0.5, -0.2, 0.3, 0.1],
                                         previousProducts: nil, rows: 2, dim: 2, distribution: .gaussian).predictedChange
        })
    }

    func testLevenbergMarquardtAdjustsDampingEveryInterval() throws {
        let (opt, solve) = try lmOptimizer()
        func solveAndReport(ratio: Double) throws -> Double {
            let m = try solve()
            return try opt.reportLossChange(before: 1, after: 1 + ratio * m)
        }
        XCTAssertEqual(try solveAndReport(ratio: 0.9), 0.9, accuracy: 1e-12)
        XCTAssertEqual(opt.parameters.damping, 1, "no adjustment before the interval")
        XCTAssertEqual(try solveAndReport(ratio: 0.9), 0.9, accuracy: 1e-12)
        XCTAssertEqual(opt.parameters.damping, 0.81, accuracy: 1e-12, "ρ > 3/4: λ·ω^T1")
        _ = try solveAndReport(ratio: 0.5)
        _ = try solveAndReport(ratio: 0.5)
        XCTAssertEqual(opt.parameters.damping, 0.81, accuracy: 1e-12, "1/4 ≤ ρ ≤ 3/4: unchanged")
        _ = try solveAndReport(ratio: 0.1)
        _ = try solveAndReport(ratio: 0.1)
        XCTAssertEqual(opt.parameters.damping, 1, accuracy: 1e-12, "ρ < 1/4: λ/ω^T1")
    }

    /// A skipped report counts for the interval and leaves λ; the interval's last report is needed
    /// and cannot be skipped.
    func testSkippedReportsCountTowardTheInterval() throws {
        let (opt, solve) = try lmOptimizer()
        var status: KFACStatus?
        do { try opt.skipLossReport() } catch { status = error.status }
        XCTAssertEqual(status, .noStep, "nothing to skip before a solve")
        for round in 0..<2 {
            _ = try solve()
            XCTAssertFalse(opt.nextReportAdjustsDamping)
            try opt.skipLossReport()
            XCTAssertTrue(opt.lastReductionRatio.isNaN)
            XCTAssertEqual(opt.parameters.damping, round == 0 ? 1 : 0.81, accuracy: 1e-12, "a skip leaves λ")
            let m = try solve()
            XCTAssertTrue(opt.nextReportAdjustsDamping)
            status = nil
            do { try opt.skipLossReport() } catch { status = error.status }
            XCTAssertEqual(status, .noStep, "the interval's last report carries the losses")
            _ = try opt.reportLossChange(before: 1, after: 1 + (round == 0 ? 0.9 : 0.1) * m)
            XCTAssertEqual(opt.parameters.damping, round == 0 ? 0.81 : 1, accuracy: 1e-12, "ρ > 3/4: λ·ω², then ρ < 1/4: λ/ω²")
        }
    }

    // MARK: Samplers

    func testSampledTargetsFollowTheDistributions() {
        let rows = 40_000
        // Categorical: every row has the same logits; frequencies within 5σ of softmax.
        let logits: [Double] = [0.5, -1, 2, 0]
        let z = (0..<rows).flatMap { _ in logits }
        var targets = [Double](repeating: 0, count: z.count)
        TargetSampler.sampleTargets(distribution: .categorical, outputs: z, rows: rows, dim: 4, seed: 7, into: &targets)
        let p = softmax(logits)
        for i in 0..<4 {
            let frequency = (0..<rows).reduce(0.0) { $0 + targets[$1 * 4 + i] } / Double(rows)
            let sigma = (p[i] * (1 - p[i]) / Double(rows)).squareRoot()
            XCTAssertEqual(frequency, p[i], accuracy: 5 * sigma, "class \(i)")
        }
        for r in 0..<rows { XCTAssertEqual((0..<4).reduce(0.0) { $0 + targets[r * 4 + $1] }, 1) }
        // Bernoulli: means σ(z).
        TargetSampler.sampleTargets(distribution: .bernoulli, outputs: z, rows: rows, dim: 4, seed: 8, into: &targets)
        for i in 0..<4 {
            let q = OutputFisher.logistic(logits[i])
            let mean = (0..<rows).reduce(0.0) { $0 + targets[$1 * 4 + i] } / Double(rows)
            XCTAssertEqual(mean, q, accuracy: 5 * (q * (1 - q) / Double(rows)).squareRoot())
        }
        // Gaussian: mean μ, variance 1.
        TargetSampler.sampleTargets(distribution: .gaussian, outputs: z, rows: rows, dim: 4, seed: 9, into: &targets)
        for i in 0..<4 {
            let values = (0..<rows).map { targets[$0 * 4 + i] - logits[i] }
            let mean = values.reduce(0, +) / Double(rows)
            let variance = values.map { ($0 - mean) * ($0 - mean) }.reduce(0, +) / Double(rows - 1)
            XCTAssertEqual(mean, 0, accuracy: 5 / Double(rows).squareRoot())
            XCTAssertEqual(variance, 1, accuracy: 5 * (2 / Double(rows)).squareRoot())
        }
        // The same seed gives the same draws, whatever the batch split.
        var again = [Double](repeating: 0, count: 40)
        TargetSampler.sampleTargets(distribution: .gaussian, outputs: z, rows: 10, dim: 4, seed: 9, into: &again)
        XCTAssertEqual(Array(targets[0..<40]), again)
    }

    /// Gradients at sampled targets have mean 0 and covariance B = diag(p) − ppᵀ: their second
    /// moment is the true Fisher, which the empirical gradients' is not.
    func testSampledOutputGradientsHaveTheFisherAsSecondMoment() {
        let rows = 40_000, logits: [Float] = [1, -0.5, 0.2]
        let z = (0..<rows).flatMap { _ in logits }
        var g = [Float](repeating: 0, count: z.count)
        TargetSampler.sampledOutputGradients(distribution: .categorical, outputs: z, rows: rows, dim: 3, seed: 3, into: &g)
        let p = softmax(logits.map(Double.init))
        for i in 0..<3 {
            for j in 0..<3 {
                var moment = 0.0
                for r in 0..<rows { moment += Double(g[r * 3 + i]) * Double(g[r * 3 + j]) }
                moment /= Double(rows)
                let fisher = (i == j ? p[i] : 0) - p[i] * p[j]
                XCTAssertEqual(moment, fisher, accuracy: 0.01, "B[\(i)][\(j)]")
            }
        }
    }
}

extension AdaptiveTests {
    /// The solve uses the last successful step's directions, whatever happens in between.
    func testSolveIgnoresStandalonePreconditionAndFailedSteps() throws {
        var problem = TwoLayerProblem<Double>(seed: 61)
        let make = { () throws -> KFACOptimizer<Double> in try problem.makeOptimizer { $0.klClip = 0 } }
        let (a, b) = (try make(), try make())
        let batch = problem.batch(rows: 6)
        let grads = problem.gradients()
        for o in [a, b] {
            try problem.record(o, batch, rows: 6)
            var g = grads
            try o.step(&g)
        }
        // On b only: a standalone precondition and a failed step.
        var w = grads[0].weight, bias = grads[0].bias!
        try w.withUnsafeMutableBufferPointer { pw in
            try bias.withUnsafeMutableBufferPointer { pb in try b.precondition(layer: 0, weight: pw.baseAddress!, bias: pb.baseAddress!) }
        }
        var bad = grads
        bad[1].weight[0] = .nan
        XCTAssertThrowsError(try b.step(&bad))
        let outputs: [Double] = [0.2, -0.1, 0.4, 0.3, 0, 0.1], products: [Double] = [0.5, 0.1, -0.2, 0.3, 0.2, -0.4]
        let sa = try a.solveStepSize(outputs: outputs, directionProducts: products, previousProducts: nil, rows: 2, dim: 3,
                                     distribution: .categorical)
        let sb = try b.solveStepSize(outputs: outputs, directionProducts: products, previousProducts: nil, rows: 2, dim: 3,
                                     distribution: .categorical)
        XCTAssertEqual(sa.alpha, sb.alpha)
        XCTAssertEqual(sa.predictedChange, sb.predictedChange)
    }

    /// γ, when set, damps the inverses instead of λ (which the LM adjustment then leaves alone).
    func testFactorDampingReplacesLambdaInTheInverses() throws {
        var problem = TwoLayerProblem<Double>(seed: 67)
        let opt = try problem.makeOptimizer { $0.klClip = 0; $0.damping = 5; $0.factorDamping = 0.05 }
        let batch = problem.batch(rows: 7)
        try problem.record(opt, batch, rows: 7)
        let grads = problem.gradients()
        var out = grads
        try opt.step(&out)
        for (l, s) in TwoLayerProblem<Double>.shapes.enumerated() {
            let a = naiveSecondMoment(batch[l].x, rows: 7, width: s.inF, appendOne: s.bias)
            let g = naiveSecondMoment(batch[l].g, rows: 7, width: s.outF, appendOne: false)
            let v = parameterMatrix(weight: grads[l].weight, bias: grads[l].bias, out: s.outF, inFeatures: s.inF)
            let expected = expectedDirection(a: a, g: g, v: v, damping: 0.05, strategy: .eigen)
            let actual = parameterMatrix(weight: out[l].weight, bias: out[l].bias, out: s.outF, inFeatures: s.inF)
            assertClose(actual, expected, 1e-10, "layer \(l) with γ = 0.05, λ = 5")
        }
    }
}
