import XCTest
@testable import KFAC

/// `asyncInversion`: due steps hand the inversion of the factors they folded to the background
/// thread and a later step commits it. The oracle keeps every step's running factors and forms
/// each layer's direction densely from the factors of the step whose inverse the schedule says
/// the step uses (`include/kfac.h`, KFAC_PARAM_ASYNC_INVERSION).
final class AsyncInversionTests: XCTestCase {
    static let shapes: [(inF: Int, outF: Int, bias: Bool)] = [(7, 6, true), (6, 5, false), (5, 4, true)]
    static let period = 3, damping = 0.05

    /// The deterministic mode with Ti = 3: steps 0…5 use the inverses of step 0 (inverted in the
    /// step: no block had one), then step k the inverses of the factors of step 3·(⌊k/3⌋ − 1) —
    /// a synchronous run lagging one period. A failed step at a non-due step (4) and at a due
    /// step (6, which would commit and launch) changes nothing: the retry gives the oracle.
    func testDeterministicModeUsesTheFactorsOfThePreviousDueStep() throws {
        for strategy in [InverseStrategy.cholesky, .eigen] {
            try run(Float.self, strategy, mode: .deterministic, failAt: [4, 6], source: { k in k < 6 ? 0 : 3 * (k / 3 - 1) })
            try run(Double.self, strategy, mode: .deterministic, failAt: [4, 6], source: { k in k < 6 ? 0 : 3 * (k / 3 - 1) })
        }
    }

    /// The newest mode commits finished work at the first step that finds it: waiting for the
    /// background thread after every step makes that the step after the launch, so step k uses
    /// the factors of step 3·⌊k/3⌋ except at a due step, which still has those of the previous one.
    func testNewestModeCommitsFinishedWorkAtTheNextStep() throws {
        let source = { (k: Int) in k <= 3 ? 0 : k % 3 == 0 ? k - 3 : 3 * (k / 3) }
        for strategy in [InverseStrategy.cholesky, .eigen] {
            try run(Float.self, strategy, mode: .newest, waitAfterEachStep: true, source: source)
            try run(Double.self, strategy, mode: .newest, waitAfterEachStep: true, source: source)
        }
    }

    /// Without waiting, the newest mode uses either the deterministic mode's inverse or the one
    /// launched at the last due step, and never goes back to the older one within a period.
    func testNewestModeWithoutWaitingUsesOneOfTheTwoAllowedInverses() throws {
        var usedNewer = Array(repeating: false, count: 3)
        try run(Double.self, .eigen, mode: .newest, steps: 14, allowed: { k in
            let older = k < 6 ? 0 : 3 * (k / 3 - 1)
            return k % 3 == 0 || k < 3 ? [older] : [older, 3 * (k / 3)]
        }, check: { k, l, used in
            guard k >= 3 else { return }
            if k % 3 == 0 {  // a due step: only the older inverse, and a new period starts
                usedNewer[l] = false
            } else if used == 3 * (k / 3) {
                usedNewer[l] = true
            } else if usedNewer[l] {
                XCTFail("step \(k) layer \(l) went back to the older inverse")
            }
        })
    }

    /// Parameter changes while work is pending: a new strategy discards it (the next step
    /// inverts every block itself, from its own factors); turning the mode off makes the next
    /// step wait for it and commit it, then the synchronous schedule resumes.
    func testStrategyChangeDiscardsAndModeOffCommitsPendingWork() throws {
        // Strategy eigen → cholesky after step 3 (which launched): step 4 inverts from the
        // factors of step 4; step 6 launches (uses 4), step 9 commits 6.
        try run(Double.self, .eigen, mode: .deterministic, steps: 11,
                change: (3, { $0.inverseStrategy = .cholesky }),
                source: { k in k < 4 ? 0 : k < 9 ? 4 : 6 },
                strategyAt: { k in k < 4 ? .eigen : .cholesky })
        // Mode off after step 3: step 4 commits the inverses of step 3; step 6 inverts itself.
        try run(Float.self, .cholesky, mode: .deterministic, steps: 9,
                change: (3, { $0.asyncInversion = .off }),
                source: { k in k < 4 ? 0 : k < 6 ? 3 : 6 })
    }

    /// A background inversion that failed is not reported by itself: the step that would commit
    /// it (the next due step, 6) inverts its blocks in the step from its own factors instead,
    /// and launches nothing for them; the next due step (9) launches again, 12 commits.
    func testFailedBackgroundInversionFallsBackToTheStep() throws {
        try run(Double.self, .cholesky, mode: .deterministic, steps: 14, afterStep: { k, opt in
            guard k == 3 else { return }
            opt.waitForBackgroundInversion()
            opt.estimator.backgroundError = KFACError(.notPositiveDefinite, "injected")
        }, source: { k in k < 6 ? 0 : k < 12 ? 6 : 9 })
    }

    /// update_inverses discards pending work (every block gets newer inverses) and a loaded
    /// state has none: its next due step launches and the one after commits.
    func testUpdateInversesAndLoadDiscardPendingWork() throws {
        let opt = try makeOptimizer(Double.self, .eigen, mode: .deterministic)
        var random = SeededRandom(5)
        for _ in 0..<4 { _ = try step(opt, &random) }  // step 3 launched
        XCTAssertTrue(opt.estimator.backgroundPending)
        let image = try opt.stateImage()
        try opt.updateInverses()
        XCTAssertFalse(opt.estimator.backgroundPending)
        let loaded = try makeOptimizer(Double.self, .eigen, mode: .deterministic)
        for _ in 0..<4 { _ = try step(loaded, &random) }
        XCTAssertTrue(loaded.estimator.backgroundPending)
        try loaded.loadState(from: image.withUnsafeBytes { UnsafeRawBufferPointer($0) })
        XCTAssertFalse(loaded.estimator.backgroundPending)
        XCTAssertEqual(loaded.stepCount, 4)
        // The loaded inverses are those of step 0; images taken with work pending hold only
        // committed inverses, whatever the timing: saving again gives the same bytes.
        XCTAssertEqual(try loaded.stateImage(), image)
    }

    /// What the mode does not support is refused at the step with UNSUPPORTED, changing nothing.
    func testUnsupportedCombinationsAreRefused() throws {
        let changes: [(String, (inout KFACParameters) -> Void)] = [
            ("ekfac", { $0.inverseStrategy = .ekfac }),
            ("spread", { $0.inverseSpread = true }),
            ("gamma", { $0.factorDampingPeriod = 2 }),
        ]
        for (name, change) in changes {
            let opt = try makeOptimizer(Double.self, .eigen, mode: .newest)
            var p = opt.parameters
            change(&p)
            try opt.setParameters(p)
            var random = SeededRandom(9)
            XCTAssertThrowsError(try step(opt, &random), name) { error in
                XCTAssertEqual((error as? KFACError)?.status, .unsupported, name)
                XCTAssertTrue((error as? KFACError)?.message.contains("async_inversion") ?? false, name)
            }
            XCTAssertEqual(opt.stepCount, 0, name)
            XCTAssertFalse(try opt.layerInfo(0).hasInverses, name)
        }
    }

    // MARK: Helpers

    private func makeOptimizer<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy,
                                              mode: AsyncInversion) throws -> KFACOptimizer<S> {
        let opt = try KFACOptimizer<S>()
        for s in Self.shapes { try opt.addDense(inFeatures: s.inF, outFeatures: s.outF, hasBias: s.bias) }
        var p = opt.parameters
        p.inverseStrategy = strategy; p.inverseUpdatePeriod = Self.period; p.asyncInversion = mode
        p.factorUpdatePeriod = 1; p.factorDecay = 0.6; p.damping = Self.damping; p.klClip = 0; p.threadCount = 2
        try opt.setParameters(p)
        return opt
    }

    /// Records a batch and steps; returns the gradients given and the directions.
    private func step<S: KFACScalar>(_ opt: KFACOptimizer<S>, _ random: inout SeededRandom, rows: Int = 5,
                                     poison: Bool = false) throws -> (given: [LayerGradient<S>], out: [LayerGradient<S>]) {
        for (l, s) in Self.shapes.enumerated() {
            try opt.recordInputs(layer: l, random.array(rows * s.inF) as [S], rows: rows)
            try opt.recordOutputGradients(layer: l, random.array(rows * s.outF) as [S], rows: rows)
        }
        let grads = Self.shapes.map { s in
            LayerGradient<S>(weight: random.array(s.inF * s.outF), bias: s.bias ? random.array(s.outF) : nil)
        }
        var out = grads
        try opt.step(&out)
        return (grads, out)
    }

    private func run<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy, mode: AsyncInversion, steps: Int = 12,
                                    failAt: Set<Int> = [], waitAfterEachStep: Bool = false,
                                    change: (after: Int, (inout KFACParameters) -> Void)? = nil,
                                    afterStep: ((Int, KFACOptimizer<S>) -> Void)? = nil,
                                    source: ((Int) -> Int)? = nil, strategyAt: ((Int) -> InverseStrategy)? = nil,
                                    allowed: ((Int) -> [Int])? = nil,
                                    check: ((Int, Int, Int) -> Void)? = nil) throws {
        let opt = try makeOptimizer(S.self, strategy, mode: mode)
        var random = SeededRandom(41)
        var factors: [[(a: Dense, g: Dense)]] = []  // per step, per layer: running factors after the step
        for k in 0..<steps {
            let rows = 4 + k % 3
            for (l, s) in Self.shapes.enumerated() {
                try opt.recordInputs(layer: l, random.array(rows * s.inF) as [S], rows: rows)
                try opt.recordOutputGradients(layer: l, random.array(rows * s.outF) as [S], rows: rows)
            }
            let grads = Self.shapes.map { s in
                LayerGradient<S>(weight: random.array(s.inF * s.outF), bias: s.bias ? random.array(s.outF) : nil)
            }
            if failAt.contains(k) {  // a failed step: nothing folded, inverted, committed, launched or counted
                let pending = opt.estimator.backgroundPending
                let before = try opt.stateImage()
                var bad = grads
                bad[1].weight[2] = .nan
                XCTAssertThrowsError(try opt.step(&bad))
                XCTAssertEqual(opt.stepCount, k)
                XCTAssertEqual(opt.estimator.backgroundPending, pending)
                XCTAssertEqual(try opt.stateImage(), before, "step \(k): a failed step changed the state")
            }
            var out = grads
            try opt.step(&out)
            if waitAfterEachStep { opt.waitForBackgroundInversion() }
            afterStep?(k, opt)
            factors.append(try Self.shapes.indices.map { l in
                let f = try opt.factors(layer: l)
                let (da, dg) = (Self.shapes[l].inF + (Self.shapes[l].bias ? 1 : 0), Self.shapes[l].outF)
                return (Dense(rows: da, columns: da, f.a), Dense(rows: dg, columns: dg, f.g))
            })
            let used = strategyAt?(k) ?? strategy
            for (l, s) in Self.shapes.enumerated() {
                let v = parameterMatrix(weight: grads[l].weight, bias: grads[l].bias, out: s.outF, inFeatures: s.inF)
                let actual = parameterMatrix(weight: out[l].weight, bias: out[l].bias, out: s.outF, inFeatures: s.inF)
                let candidates = allowed?(k) ?? [source!(k)]
                let distances = candidates.map { c in
                    let e = expectedDirection(a: factors[c][l].a, g: factors[c][l].g, v: v, damping: Self.damping, strategy: used)
                    return (c, e, actual.maxAbsDifference(e) / Swift.max(e.maxAbs, 1))
                }
                let best = distances.min { $0.2 < $1.2 }!
                assertClose(actual, best.1, tolerance(S.self),
                            "\(S.self) \(strategy) \(mode) step \(k) layer \(l) (inverse of step \(best.0) of \(candidates))")
                check?(k, l, best.0)
            }
            if let change, change.after == k {
                var p = opt.parameters
                change.1(&p)
                try opt.setParameters(p)
            }
        }
    }
}
