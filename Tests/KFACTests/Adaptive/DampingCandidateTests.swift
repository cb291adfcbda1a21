import XCTest
@testable import KFAC

/// The re-choice of the factor damping γ (Martens & Grosse 2015, §6.6) against dense oracles:
/// each candidate's directions against an explicit damped Kronecker solve, the kept candidate
/// against the quadratic model computed with the explicit Fisher of a linear softmax layer.
final class DampingCandidateTests: XCTestCase {

    private func dot(_ a: Dense, _ b: Dense) -> Double { zip(a.values, b.values).map(*).reduce(0, +) }

    private func dense<S: KFACScalar>(_ g: LayerGradient<S>, out: Int, inF: Int) -> Dense {
        parameterMatrix(weight: g.weight, bias: g.bias, out: out, inFeatures: inF)
    }

    func testCandidatesAreExactSolvesAndTheBestModelIsKept() throws {
        for strategy in InverseStrategy.allCases {
            try candidates(Float.self, strategy: strategy, tolerance: 2e-3)
            try candidates(Double.self, strategy: strategy, tolerance: 1e-8)
        }
    }

    private func candidates<S: KFACScalar>(_: S.Type, strategy: InverseStrategy, tolerance: Double) throws {
        let label = "\(S.self) \(strategy)"
        var random = SeededRandom(77)
        let (n, inF, out) = (16, 3, 4)
        let net = LinearSoftmaxOracle(inputs: (0..<n).map { _ in (0..<inF).map { _ in random.uniform() } },
                          labels: (0..<n).map { ($0 * 7) % out }, out: out)
        var theta = Dense(rows: out, columns: inF + 1)
        for i in theta.values.indices { theta.values[i] = 0.5 * random.uniform() }
        let opt = try KFACOptimizer<S>()
        try opt.addDense(inFeatures: inF, outFeatures: out, hasBias: true)
        var p = opt.parameters
        // γ starts far too large, so a smaller candidate must win the first γ step; the inverse
        // period equals T₂, so the step after a γ step uses the inverses the solve kept.
        p.klClip = 0; p.damping = 1e-3; p.factorDamping = 3; p.factorDecay = 0
        p.inverseStrategy = strategy; p.inverseUpdatePeriod = 2
        p.factorDampingPeriod = 2; p.factorDampingDecay = 0.8; p.lmInterval = 0
        p.factorDampingRatio = 1e300  // γ = 3000 λ: outside the default band, which this test does not exercise
        try opt.setParameters(p)
        let omega = 0.8 * 0.8
        var gamma = 3.0
        var previous: Dense?
        var inverseFactors = (a: Dense(rows: 1, columns: 1), g: Dense(rows: 1, columns: 1))
        var chosenSmaller = 0

        for k in 0..<6 {
            let x: [S] = net.inputs.flatMap { $0.map { S($0) } }
            try opt.recordInputs(layer: 0, x, rows: n)
            try opt.recordOutputGradients(layer: 0, net.outputGradients(theta).map { S($0 / Double(n)) }, rows: n)
            let grad = net.gradient(theta)
            var grads = [LayerGradient<S>(weight: (0..<out).flatMap { o in (0..<inF).map { S(grad[o, $0]) } },
                                          bias: (0..<out).map { S(grad[$0, inF]) })]
            try opt.step(&grads)
            let gammaStep = k % 2 == 0
            XCTAssertEqual(opt.candidateCount, gammaStep ? 3 : 1, "\(label) step \(k): candidates")
            if gammaStep {
                let f = try opt.factors(layer: 0)
                inverseFactors = (Dense(rows: inF + 1, columns: inF + 1, f.a), Dense(rows: out, columns: out, f.g))
            }
            let dampings = gammaStep ? [gamma, gamma * omega, gamma / omega] : [gamma]
            assertClose(dense(grads[0], out: out, inF: inF),
                        expectedDirection(a: inverseFactors.a, g: inverseFactors.g, v: grad, damping: gamma, strategy: strategy),
                        tolerance, "\(label) step \(k): the step's directions use γ = \(gamma)")

            // Every candidate against the explicit solve, and its quadratic model.
            var directions: [Dense] = [], products: [[S]] = []
            var models: [(alpha: Double, mu: Double, m: Double)] = []
            for j in dampings.indices {
                let (d, damping) = try opt.candidateDirections(j)
                XCTAssertEqual(damping, dampings[j], accuracy: 1e-12 * dampings[j], "\(label) step \(k) candidate \(j): γ")
                let direction = dense(d[0], out: out, inF: inF)
                assertClose(direction, expectedDirection(a: inverseFactors.a, g: inverseFactors.g, v: grad,
                                                         damping: dampings[j], strategy: strategy),
                            tolerance, "\(label) step \(k) candidate \(j): directions")
                directions.append(direction)
                products.append(net.products(direction).map { S($0) })
                let lambda = opt.parameters.damping, delta = -1.0 * direction
                let a11 = net.fisher(theta, delta, delta) + lambda * dot(delta, delta), b1 = dot(grad, delta)
                if let prev = previous {
                    let a12 = net.fisher(theta, delta, prev) + lambda * dot(delta, prev)
                    let a22 = net.fisher(theta, prev, prev) + lambda * dot(prev, prev)
                    let b2 = dot(grad, prev), det = a11 * a22 - a12 * a12
                    let alpha = -(a22 * b1 - a12 * b2) / det, mu = -(a11 * b2 - a12 * b1) / det
                    models.append((alpha, mu, 0.5 * (a11 * alpha * alpha + 2 * a12 * alpha * mu + a22 * mu * mu) + b1 * alpha + b2 * mu))
                } else {
                    let alpha = -b1 / a11
                    models.append((alpha, 0, 0.5 * a11 * alpha * alpha + b1 * alpha))
                }
            }
            let best = models.indices.min { models[$0].m < models[$1].m }!
            let outputs: [S] = (0..<n).flatMap { net.logits(theta, $0).map { S($0) } }
            let jp: [S]? = previous.map { net.products($0).map { S($0) } }
            let solved = try withPointers(products) { pointers in
                try outputs.withUnsafeBufferPointer { o in
                    try (jp ?? []).withUnsafeBufferPointer { b in
                        try opt.solveStepSize(outputs: o.baseAddress, candidateProducts: { pointers[$0] }, candidateCount: products.count,
                                              previousProducts: jp == nil ? nil : b.baseAddress, rows: n, dim: out,
                                              distribution: .categorical)
                    }
                }
            }
            XCTAssertEqual(solved.chosen, best, "\(label) step \(k): the candidate with the lowest M(δ)")
            XCTAssertEqual(solved.alpha, models[best].alpha, accuracy: tolerance * abs(models[best].alpha), "\(label) step \(k): α")
            XCTAssertEqual(solved.mu, models[best].mu, accuracy: tolerance * max(abs(models[best].mu), 1e-3), "\(label) step \(k): μ")
            XCTAssertEqual(solved.predictedChange, models[best].m, accuracy: tolerance * abs(models[best].m), "\(label) step \(k): M")
            if gammaStep {
                gamma = dampings[best]
                if best == 1 { chosenSmaller += 1 }
            }
            XCTAssertEqual(opt.parameters.factorDamping, gamma, accuracy: 1e-12 * gamma, "\(label) step \(k): γ kept")

            // The update the library hands back is −α D_best + μ δ₀.
            let update = models[best].alpha * (-1.0 * directions[best]) + (previous.map { models[best].mu * $0 } ?? Dense(rows: out, columns: inF + 1))
            assertClose(dense(try opt.update()[0], out: out, inF: inF), update, tolerance, "\(label) step \(k): update")
            let before = net.loss(theta)
            theta = theta + update
            _ = try opt.reportLossChange(before: before, after: net.loss(theta))
            previous = update
        }
        XCTAssertGreaterThan(chosenSmaller, 0, "\(label): γ = 3 is too large; a smaller candidate must win a γ step")
    }

    private func withPointers<S: KFACScalar, R>(_ arrays: [[S]], _ body: ([UnsafePointer<S>?]) throws -> R) rethrows -> R {
        let buffers = arrays.map { a -> UnsafeMutablePointer<S> in
            let p = UnsafeMutablePointer<S>.allocate(capacity: max(a.count, 1))
            p.initialize(from: a, count: a.count)
            return p
        }
        defer { buffers.forEach { $0.deallocate() } }
        return try body(buffers.map { UnsafePointer($0) })
    }
}

extension DampingCandidateTests {
    private func status(_ body: () throws -> Void) -> KFACStatus? {
        do { try body(); return nil } catch { return (error as? KFACError)?.status }
    }

    /// Wrong counts, out-of-range candidates and wrong call order are refused and change nothing
    /// (the twin optimizer, given only the correct calls, ends in the same state); the plain
    /// solve on a γ step keeps γ.
    func testCandidateMisuseChangesNothing() throws {
        for strategy in InverseStrategy.allCases {
            try candidateMisuse(Float.self, strategy)
            try candidateMisuse(Double.self, strategy)
        }
    }

    private func candidateMisuse<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy) throws {
        var problem = TwoLayerProblem<S>(seed: 41)
        let configure: (inout KFACParameters) -> Void = {
            $0.inverseStrategy = strategy; $0.klClip = 0; $0.factorDampingPeriod = 2; $0.damping = 0.1; $0.inverseUpdatePeriod = 2
        }
        let opt = try problem.makeOptimizer(configure), twin = try problem.makeOptimizer(configure)
        let (rows, dim) = (4, 3)
        let outputs: [S] = problem.random.array(rows * dim)
        let products: [[S]] = (0..<3).map { _ in problem.random.array(rows * dim) }
        func solve(_ o: KFACOptimizer<S>, count: Int) throws -> Int {
            try outputs.withUnsafeBufferPointer { out in
                try products[0].withUnsafeBufferPointer { p0 in
                    try products[1].withUnsafeBufferPointer { p1 in
                        try products[2].withUnsafeBufferPointer { p2 in
                            let pointers = [p0.baseAddress, p1.baseAddress, p2.baseAddress]
                            return try o.solveStepSize(outputs: out.baseAddress, candidateProducts: { pointers[$0] }, candidateCount: count,
                                                       previousProducts: nil, rows: rows, dim: dim, distribution: .categorical).chosen
                        }
                    }
                }
            }
        }
        XCTAssertEqual(opt.candidateCount, 0)
        XCTAssertEqual(status { _ = try opt.candidateDirections(0) }, .noStep, "before the first step")
        XCTAssertEqual(status { _ = try opt.update() }, .noStep, "before the first solve")
        for k in 0..<4 {
            let batch = problem.batch(rows: rows)
            let grads = problem.gradients()
            for o in [opt, twin] {
                try problem.record(o, batch, rows: rows)
                var g = grads
                try o.step(&g)
            }
            let count = k % 2 == 0 ? 3 : 1
            XCTAssertEqual(opt.candidateCount, count)
            XCTAssertEqual(status { _ = try solve(opt, count: count == 3 ? 1 : 3) }, .invalidArgument, "wrong candidate count")
            XCTAssertEqual(status { _ = try opt.candidateDirections(count) }, .invalidArgument)
            XCTAssertEqual(status { _ = try opt.candidateDirections(-1) }, .invalidArgument)
            _ = try opt.candidateDirections(count - 1)
            let weights = TwoLayerProblem<S>.shapes.map { UnsafeMutablePointer<S>.allocate(capacity: $0.inF * $0.outF) }
            defer { weights.forEach { $0.deallocate() } }
            XCTAssertEqual(status {
                try opt.copyCandidateDirections(0) { l in ParameterGradient(weight: weights[l], bias: nil) }
            }, .nullPointer, "a layer with a bias needs its bias buffer")
            if k == 2 {
                // The plain solve on a γ step solves for candidate 0 and keeps γ.
                let gamma = opt.parameters.factorDamping
                for o in [opt, twin] {
                    _ = try outputs.withUnsafeBufferPointer { out in
                        try products[0].withUnsafeBufferPointer { p in
                            try o.solveStepSize(outputs: out.baseAddress, directionProducts: p.baseAddress, previousProducts: nil,
                                                rows: rows, dim: dim, distribution: .categorical)
                        }
                    }
                }
                XCTAssertEqual(opt.parameters.factorDamping, gamma)
            } else {
                XCTAssertEqual(try solve(opt, count: count), try solve(twin, count: count))
            }
            XCTAssertEqual(opt.candidateCount, 0, "solved")
            XCTAssertEqual(status { _ = try solve(opt, count: count) }, .noStep, "solving twice")
            XCTAssertEqual(status { _ = try opt.candidateDirections(0) }, .noStep, "after the solve")
            XCTAssertEqual(try opt.update(), try twin.update())
            XCTAssertEqual(opt.parameters, twin.parameters)
        }
        XCTAssertEqual(try opt.stateImage(), try twin.stateImage())
    }
}
