import XCTest
@testable import KFAC

/// Distributed EKFAC: statistics → bases (the eigen inverses, by their owners) → the scaling
/// exchange (each rank's Σ_n (Q_Gᵀ G_n Q_A)^∘2 and example count, SUM-allreduced). Every rank's
/// directions must be bit-identical and equal one handle's on the union batch (rtol 1e-12,
/// float64) over steps that both refresh the bases and fold S between refreshes.
extension FakeWorldTests {
    /// Layer 0's examples are sequences of this many rows (per-example sums before squaring).
    static let ekfacSequence = 2

    /// Per layer, per example: inputs and output gradients (layer 0: `ekfacSequence` rows each).
    func ekfacBatch(_ r: inout SeededRandom, examples: Int) -> [(x: [S], g: [S])] {
        var b = Model.batch(&r, rows: examples)
        let t = Self.ekfacSequence
        b[0] = (r.array(examples * t * 7), r.array(examples * t * 5, scale: 0.5))
        return b
    }

    /// Records examples [lo, hi) with paired recording.
    func recordEKFAC(_ opt: KFACOptimizer<S>, _ batch: [(x: [S], g: [S])], examples: Int, _ lo: Int, _ hi: Int) throws {
        guard hi > lo else { return }
        for (l, b) in batch.enumerated() {
            let xw = b.x.count / examples, gw = b.g.count / examples
            let t = l == 0 ? Self.ekfacSequence : 1
            try opt.recordExamples(layer: l, inputs: Array(b.x[lo * xw..<hi * xw]), outputGradients: Array(b.g[lo * gw..<hi * gw]),
                                   rows: (hi - lo) * t, rowsPerExample: t)
        }
    }

    /// The three exchanges by the pack and unpack calls (`gathered`: the inverses by the
    /// allgatherv route).
    func exchangeEKFAC(_ ranks: [KFACOptimizer<S>], gathered: Bool) throws {
        var volume = 0
        try exchange(ranks, gathered: gathered, gatheredVolume: &volume)
        let due = ranks.map { $0.exchangeDue(.scalings) }
        XCTAssertTrue(due.allSatisfy { $0 == due[0] })
        guard due[0] else { return }
        let n = ranks[0].scalingPackCount
        var bufs = [[S]](repeating: [S](repeating: 0, count: n), count: ranks.count)
        for (r, o) in ranks.enumerated() { try bufs[r].withUnsafeMutableBufferPointer { try o.packScalings(into: $0.baseAddress, count: n) } }
        allreduce(&bufs)
        for (r, o) in ranks.enumerated() { try bufs[r].withUnsafeBufferPointer { try o.unpackScalings(from: $0.baseAddress, count: n) } }
        for o in ranks { XCTAssertFalse(o.exchangeDue(.scalings)) }
    }

    /// `steps` EKFAC steps (Tf = 1, Ti = 3: new bases at steps 0, 3, 6, S folded at the others)
    /// on P ranks and one union handle; returns the largest relative difference of directions.
    func runEKFAC(ranks p: Int, reduce: DistributedReduce = .eager, steps: Int = 8, examples: Int = 10, gathered: Bool = false,
                  checkpoint: Int? = nil, seed: UInt64 = 7, configure: @escaping (inout KFACParameters) -> Void = { _ in })
        throws -> Double {
        let setup: (inout KFACParameters) -> Void = {
            $0.inverseStrategy = .ekfac; $0.factorUpdatePeriod = 1; $0.inverseUpdatePeriod = 3; $0.ekfacDecay = 0.8
            $0.distributedReduce = reduce; configure(&$0)
        }
        let reference = try Model.make(setup)
        var ranks = try makeRanks(p) { try Model.make(setup) }
        var random = SeededRandom(seed)
        let cut = slices(rows: examples, ranks: p, even: reduce == .lazy)
        var worst = 0.0
        for k in 0..<steps {
            let batch = ekfacBatch(&random, examples: examples)
            let grads = Model.gradients(&random)
            try recordEKFAC(reference, batch, examples: examples, 0, examples)
            for (r, o) in ranks.enumerated() { try recordEKFAC(o, batch, examples: examples, cut[r].0, cut[r].1) }
            try exchangeEKFAC(ranks, gathered: gathered)
            worst = max(worst, try stepRanks(ranks, reference: reference, grads, step: k))
            // S itself: the union handle's (the scaling the directions come from).
            for l in 0..<4 {
                let want = try reference.ekfacScaling(layer: l)
                for o in ranks {
                    let got = try o.ekfacScaling(layer: l)
                    let scale = want.map { abs($0) }.max()!
                    let d = zip(got, want).map { abs($0 - $1) }.max()! / scale
                    XCTAssertLessThan(d, 1e-12, "S of layer \(l) at step \(k), P = \(p)")
                }
            }
            if k == checkpoint { ranks = try resumed(ranks) { try Model.make { _ in } } }
        }
        return worst
    }

    func testEKFACMatchesUnionBatch() throws {
        for p in 1...4 {
            let d = try runEKFAC(ranks: p)
            XCTAssertLessThan(d, 1e-12, "EKFAC, eager, P = \(p)")
        }
    }

    func testEKFACGatheredInverses() throws {
        for p in [2, 3] {
            let d = try runEKFAC(ranks: p, gathered: true)
            XCTAssertLessThan(d, 1e-12, "EKFAC, gathered, P = \(p)")
        }
    }

    func testEKFACLazyReduceEqualSlices() throws {
        let d = try runEKFAC(ranks: 2, reduce: .lazy)
        XCTAssertLessThan(d, 1e-12, "EKFAC, lazy, P = 2")
    }

    func testEKFACPerRowModeAndSpread() throws {
        let d = try runEKFAC(ranks: 3) { $0.ekfacMode = .perRow }
        XCTAssertLessThan(d, 1e-12, "EKFAC, per-row, P = 3")
        let e = try runEKFAC(ranks: 3) { $0.inverseSpread = true }
        XCTAssertLessThan(e, 1e-12, "EKFAC, spread, P = 3")
    }

    func testEKFACCheckpointResumeMidRun() throws {
        // Saved after step 4: between refreshes, with S folded once since the last bases.
        let d = try runEKFAC(ranks: 3, checkpoint: 4)
        XCTAssertLessThan(d, 1e-12, "EKFAC resume")
    }

    /// The scaling exchange is really used: without it a rank's S comes from its own examples
    /// only, and differs from the union's.
    func testEKFACStepUsesTheExchangedScalings() throws {
        let setup: (inout KFACParameters) -> Void = { $0.inverseStrategy = .ekfac }
        let reference = try Model.make(setup)
        let ranks = try makeRanks(2) { try Model.make(setup) }
        var random = SeededRandom(9)
        let batch = ekfacBatch(&random, examples: 6)
        try recordEKFAC(reference, batch, examples: 6, 0, 6)
        try recordEKFAC(ranks[0], batch, examples: 6, 0, 2)
        try recordEKFAC(ranks[1], batch, examples: 6, 2, 6)
        var volume = 0
        try exchange(ranks, gathered: false, gatheredVolume: &volume)
        XCTAssertTrue(ranks[1].exchangeDue(.scalings))
        // Packing the scalings before the inverse exchange of an inverting step is refused.
        let fresh = try Model.make(setup)
        try fresh.setWorld(rank: 0, size: 2)
        try recordEKFAC(fresh, batch, examples: 6, 0, 2)
        var early = [S](repeating: 0, count: fresh.scalingPackCount)
        XCTAssertThrowsError(try early.withUnsafeMutableBufferPointer { try fresh.packScalings(into: $0.baseAddress, count: $0.count) }) {
            XCTAssertEqual(($0 as? KFACError)?.status, .noInverses)
        }
        XCTAssertTrue(early.allSatisfy { $0.isNaN })
        let grads = Model.gradients(&random)
        var expected = grads, g = grads
        try reference.step(&expected)
        try ranks[1].step(&g)  // no scaling exchange: its own 4 examples
        XCTAssertGreaterThan(maxRelativeDifference(g, expected), 1e-6)
        XCTAssertGreaterThan(maxRelativeDifference([LayerGradient(weight: try ranks[1].ekfacScaling(layer: 0), bias: nil)],
                                                   [LayerGradient(weight: try reference.ekfacScaling(layer: 0), bias: nil)]), 1e-6)
    }

    /// Bad scaling packs: the wrong strategy, size, NaN, a negative sum, a fractional count —
    /// each a status, the handle unchanged.
    func testEKFACScalingPackErrors() throws {
        let opt = try Model.make { $0.inverseStrategy = .ekfac }
        try opt.setWorld(rank: 0, size: 2)
        var random = SeededRandom(2)
        try recordEKFAC(opt, ekfacBatch(&random, examples: 4), examples: 4, 0, 4)
        let before = try opt.stateImage()
        let n = opt.scalingPackCount
        func unpack(_ v: [S]) -> KFACStatus? {
            do { try v.withUnsafeBufferPointer { try opt.unpackScalings(from: $0.baseAddress, count: $0.count) }; return nil }
            catch { return (error as? KFACError)?.status }
        }
        XCTAssertEqual(unpack([S](repeating: 0, count: n + 1)), .invalidSize)
        var bad = [S](repeating: 0, count: n)
        bad[0] = .nan
        XCTAssertEqual(unpack(bad), .nonFinite)
        bad[0] = -1
        XCTAssertEqual(unpack(bad), .invalidArgument)
        bad[0] = 0
        let firstCount = opt.estimator.blocks[0].input.dimension * opt.estimator.blocks[0].output.dimension
        bad[firstCount] = 0.5
        XCTAssertEqual(unpack(bad), .invalidArgument)
        XCTAssertTrue(opt.exchangeDue(.scalings))
        XCTAssertEqual(try opt.stateImage(), before)
        let other = try Model.make { $0.inverseStrategy = .eigen }
        XCTAssertFalse(other.exchangeDue(.scalings))
        var buf = [S](repeating: 0, count: other.scalingPackCount)
        XCTAssertThrowsError(try buf.withUnsafeMutableBufferPointer { try other.packScalings(into: $0.baseAddress, count: $0.count) }) {
            XCTAssertEqual(($0 as? KFACError)?.status, .invalidArgument)
        }
        let period0 = try Model.make { $0.inverseStrategy = .ekfac; $0.factorUpdatePeriod = 0 }
        XCTAssertThrowsError(try period0.inversePackCount()) { XCTAssertEqual(($0 as? KFACError)?.status, .unsupported) }
    }
}

extension FakeWorldTests {
    /// `exchange(through:)` (kfac_distributed_synchronize) with EKFAC on P threads: several steps
    /// equal to the union handle's, both inverse routes; then a collective failing at each of its
    /// three call sites (statistics, inverses, scalings) leaves every handle as an untouched
    /// twin's, and the retry and step agree with the union handle.
    func testEKFACExchangeThroughACollective() throws {
        let (p, examples, steps) = (3, 9, 5)
        let setup: (inout KFACParameters) -> Void = {
            $0.inverseStrategy = .ekfac; $0.factorUpdatePeriod = 1; $0.inverseUpdatePeriod = 2
        }
        for gather in [false, true] {
            for failing in [0, 1, 2] {
                let reference = try Model.make(setup)
                let ranks = try makeRanks(p) { try Model.make(setup) }, twins = try makeRanks(p) { try Model.make(setup) }
                let cut = slices(rows: examples, ranks: p, even: false)
                let world = ThreadWorld(size: p)
                var random = SeededRandom(13)
                for k in 0..<steps {
                    let batch = ekfacBatch(&random, examples: examples)
                    let grads = Model.gradients(&random)
                    try recordEKFAC(reference, batch, examples: examples, 0, examples)
                    for r in 0..<p {
                        try recordEKFAC(ranks[r], batch, examples: examples, cut[r].0, cut[r].1)
                        try recordEKFAC(twins[r], batch, examples: examples, cut[r].0, cut[r].1)
                    }
                    if k == steps - 1 {
                        // The failing attempt on the last step (which inverts: Ti = 2, k = 4).
                        XCTAssertTrue(ranks[0].exchangeDue(.scalings) && ranks[0].exchangeDue(.inverses))
                        try assertFailedExchangeLeavesRanksUnchanged(world, ranks, twins: twins, failing: failing, gathered: gather)
                        for r in 0..<p { XCTAssertTrue(ranks[r].exchangeDue(.scalings), "call \(failing): rank \(r)") }
                    }
                    // The union handle steps here, on the same gradients.
                    try assertThreadedStepMatchesUnion(world, ranks, reference: reference, grads, gathered: gather,
                                                       "gather \(gather), step \(k)")
                    // The twins follow through the pack calls (they take part only to compare images).
                    try exchangeEKFAC(twins, gathered: gather)
                    for r in 0..<p {
                        var g = grads
                        try twins[r].step(&g)
                    }
                }
            }
        }
    }
}
