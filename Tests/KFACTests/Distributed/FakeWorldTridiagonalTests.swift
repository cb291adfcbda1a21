import XCTest
@testable import KFAC

/// Distributed block-tridiagonal K-FAC: the cross factors join the statistics exchange (full
/// matrices and their paired rows), each linked layer's inverse (Ψ, C, D, Σ⁻¹ of its link up) is
/// a unit computed by one rank and shared by the inverse exchange (both routes). Every rank's
/// directions must be bit-identical and equal one handle's on the union batch (rtol 1e-12).
extension FakeWorldTests {
    /// A chain of three linked dense layers (7 → 5 → 4 → 3, biases on the first two) and an
    /// unlinked grouped convolution.
    func makeLinked(_ configure: (inout KFACParameters) -> Void) throws -> KFACOptimizer<S> {
        let opt = try KFACOptimizer<S>()
        var p = opt.parameters
        p.klClip = 1e-2
        p.learningRate = 0.1
        p.threadCount = 1
        p.damping = 0.05
        p.piDamping = true
        configure(&p)
        try opt.setParameters(p)
        try opt.addDense(inFeatures: 7, outFeatures: 5, hasBias: true)
        try opt.addDense(inFeatures: 5, outFeatures: 4, hasBias: true)
        try opt.addDense(inFeatures: 4, outFeatures: 3, hasBias: false)
        try opt.addConv2d(Model.conv, grouping: .init(inputGroupSize: 1))
        try opt.linkLayers(lower: 0, upper: 1)
        try opt.linkLayers(lower: 1, upper: 2)
        return opt
    }

    func linkedBatch(_ r: inout SeededRandom, rows: Int) -> [(x: [S], g: [S])] {
        let sizes = [(7, 5), (5, 4), (4, 3), (4 * 16, 4 * Model.conv.outputPositions)]
        return sizes.map { (r.array(rows * $0.0), r.array(rows * $0.1, scale: 0.5)) }
    }

    func linkedGradients(_ r: inout SeededRandom) -> [LayerGradient<S>] {
        [LayerGradient(weight: r.array(35), bias: r.array(5)), LayerGradient(weight: r.array(20), bias: r.array(4)),
         LayerGradient(weight: r.array(12), bias: nil), LayerGradient(weight: r.array(4 * 2 * 9), bias: r.array(4))]
    }

    func runLinked(ranks p: Int, reduce: DistributedReduce = .eager, steps: Int = 7, rows: Int = 12, gathered: Bool = false,
                   checkpoint: Int? = nil, configure: @escaping (inout KFACParameters) -> Void = { _ in }) throws -> Double {
        let setup: (inout KFACParameters) -> Void = {
            $0.factorUpdatePeriod = 1; $0.inverseUpdatePeriod = 3; $0.distributedReduce = reduce; configure(&$0)
        }
        let reference = try makeLinked(setup)
        var ranks = try makeRanks(p) { try makeLinked(setup) }
        var random = SeededRandom(17)
        let cut = slices(rows: rows, ranks: p, even: reduce == .lazy)
        var worst = 0.0
        for k in 0..<steps {
            let batch = linkedBatch(&random, rows: rows)
            let grads = linkedGradients(&random)
            try record(reference, batch, rows: rows, 0, rows)
            for (r, o) in ranks.enumerated() { try record(o, batch, rows: rows, cut[r].0, cut[r].1) }
            var volume = 0
            try exchange(ranks, gathered: gathered, gatheredVolume: &volume)
            worst = max(worst, try stepRanks(ranks, reference: reference, grads, step: k))
            // The cross factors are the union's (eager; the lazy reduce leaves each rank's own
            // factors between inverse updates, as for the diagonal factors).
            for lower in 0..<2 where reduce == .eager {
                let want = try reference.crossFactors(lower: lower)
                for o in ranks {
                    let got = try o.crossFactors(lower: lower)
                    for (x, y) in [(got.a, want.a), (got.g, want.g)] {
                        let scale = y.map { abs($0) }.max()!
                        XCTAssertLessThan(zip(x, y).map { abs($0 - $1) }.max()! / scale, 1e-12, "cross factors of link \(lower), step \(k)")
                    }
                }
            }
            if k == checkpoint { ranks = try resumed(ranks) { try makeLinked { _ in } } }
        }
        return worst
    }

    func testLinkedLayersMatchUnionBatch() throws {
        for p in 1...4 {
            let d = try runLinked(ranks: p)
            XCTAssertLessThan(d, 1e-12, "links, eager, P = \(p)")
        }
        for p in [2, 3] {
            let d = try runLinked(ranks: p, gathered: true)
            XCTAssertLessThan(d, 1e-12, "links, gathered, P = \(p)")
        }
        let lazy = try runLinked(ranks: 2, reduce: .lazy)
        XCTAssertLessThan(lazy, 1e-12, "links, lazy, P = 2")
        let resumed = try runLinked(ranks: 3, checkpoint: 3)
        XCTAssertLessThan(resumed, 1e-12, "links, resume")
    }

    /// The link inverses are really exchanged: each linked layer's unit has one owner, the units
    /// spread over the ranks, and a rank given only rank 0's pack gets different directions.
    func testLinkInversesAreSplitAndExchanged() throws {
        let ranks = try makeRanks(3) { try makeLinked { $0.inverseUpdatePeriod = 1 } }
        XCTAssertGreaterThan(Set((0..<3).map { ranks[0].linkOwner(layer: $0) }).count, 1, "the linked layers go to different ranks")
        let reference = try makeLinked { $0.inverseUpdatePeriod = 1 }
        var random = SeededRandom(3)
        let batch = linkedBatch(&random, rows: 6)
        try record(reference, batch, rows: 6, 0, 6)
        for r in 0..<3 { try record(ranks[r], batch, rows: 6, 2 * r, 2 * r + 2) }
        let n = ranks[0].statisticsPackCount
        var bufs = [[S]](repeating: [S](repeating: 0, count: n), count: 3)
        for r in 0..<3 { try bufs[r].withUnsafeMutableBufferPointer { try ranks[r].packStatistics(into: $0.baseAddress, count: n) } }
        allreduce(&bufs)
        for r in 0..<3 { try bufs[r].withUnsafeBufferPointer { try ranks[r].unpackStatistics(from: $0.baseAddress, count: n) } }
        let m = try ranks[0].inversePackCount()
        var only0 = [S](repeating: 0, count: m)
        try only0.withUnsafeMutableBufferPointer { try ranks[0].packInverses(into: $0.baseAddress, count: m) }
        try only0.withUnsafeBufferPointer { try ranks[1].unpackInverses(from: $0.baseAddress, count: m) }
        let grads = linkedGradients(&random)
        var expected = grads, g = grads
        try reference.step(&expected)
        try ranks[1].step(&g)
        // The linked layers' directions (layers 0–2), not only the convolution's.
        XCTAssertGreaterThan(maxRelativeDifference(Array(g[0..<3]), Array(expected[0..<3])), 1e-3)
        // update_inverses between an exchange and the step replaces the staged link inverses:
        // the exchanged ones are dropped, and the step computes its own.
        for r in [0, 2] { var h = grads; try ranks[r].step(&h) }  // every rank at the same step again
        let batch2 = linkedBatch(&random, rows: 6)
        for r in 0..<3 { try record(ranks[r], batch2, rows: 6, 2 * r, 2 * r + 2) }
        try exchange(Array(ranks))
        XCTAssertNotNil(ranks[2].distributed.preparedLinks)
        try ranks[2].updateInverses()
        XCTAssertNil(ranks[2].distributed.preparedLinks)
        var g2 = grads
        try ranks[2].step(&g2)  // its own inversion (Ti = 1), not the dropped exchanged one
        XCTAssertTrue(g2.allSatisfy { $0.weight.allSatisfy(\.isFinite) })
    }

    /// A collective failing at the statistics or the inverse call (both routes) on 3 threads
    /// leaves every handle (cross factors included) as an untouched twin's; retry and step agree
    /// with the union handle.
    func testLinkedFailedCollectiveLeavesEveryHandleUnchanged() throws {
        let (p, rows) = (3, 9)
        for (failing, gather) in [(0, false), (1, false), (1, true)] {
            let reference = try makeLinked { _ in }
            let ranks = try makeRanks(p) { try makeLinked { _ in } }, twins = try makeRanks(p) { try makeLinked { _ in } }
            var random = SeededRandom(4)
            let batch = linkedBatch(&random, rows: rows)
            let cut = slices(rows: rows, ranks: p, even: false)
            try record(reference, batch, rows: rows, 0, rows)
            for r in 0..<p {
                try record(ranks[r], batch, rows: rows, cut[r].0, cut[r].1)
                try record(twins[r], batch, rows: rows, cut[r].0, cut[r].1)
            }
            let world = ThreadWorld(size: p)
            try assertFailedExchangeLeavesRanksUnchanged(world, ranks, twins: twins, failing: failing, gathered: gather)
            try assertThreadedStepMatchesUnion(world, ranks, reference: reference, linkedGradients(&random), gathered: gather,
                                               "links, call \(failing), gather \(gather): retry")
        }
    }
}
