import XCTest
@testable import KFAC

/// Distributed runs in one process: P handles, a fake SUM-allreduce over their packed buffers,
/// each handle recording a disjoint slice of a union batch (uneven unless the lazy mode is
/// tested), the same averaged gradient given to all. Every rank's directions must be
/// bit-identical, and equal to one handle's on the union batch to rtol 1e-12 (float64).
final class FakeWorldTests: XCTestCase {
    typealias S = Double
    /// The strategies distributed runs support (EKFAC's scaling is not exchanged yet).
    static let strategies: [InverseStrategy] = [.cholesky, .eigen]

    /// Layers: a dense layer with channel groups on both sides, a plain dense layer without bias,
    /// a grouped convolution (2 groups, input channel groups), an SUA convolution.
    struct Model {
        static let conv = Conv2dGeometry(inChannels: 4, outChannels: 4, kernel: (3, 3), padding: (1, 1), groups: 2,
                                         hasBias: true, input: (4, 4))
        static let sua = Conv2dGeometry(inChannels: 3, outChannels: 2, kernel: (2, 2), hasBias: true, input: (3, 3))

        static func make(_ configure: (inout KFACParameters) -> Void) throws -> KFACOptimizer<S> {
            let opt = try KFACOptimizer<S>()
            var p = opt.parameters
            p.klClip = 1e-2
            p.learningRate = 0.1
            p.threadCount = 1
            configure(&p)
            try opt.setParameters(p)
            try opt.addDense(inFeatures: 7, outFeatures: 5, hasBias: true, grouping: .init(inputGroupSize: 3, outputGroupSize: 2))
            try opt.addDense(inFeatures: 5, outFeatures: 3, hasBias: false)
            try opt.addConv2d(conv, grouping: .init(inputGroupSize: 1))
            try opt.addConv2d(sua, approximation: .sua)
            return opt
        }

        /// Per layer, per example: inputs and output gradients.
        static func batch(_ r: inout SeededRandom, rows: Int) -> [(x: [S], g: [S])] {
            let sizes = [(7, 5), (5, 3),
                         (4 * 16, 4 * conv.outputPositions),
                         (3 * 9, 2 * sua.outputPositions)]
            return sizes.map { (r.array(rows * $0.0), r.array(rows * $0.1, scale: 0.5)) }
        }

        static func gradients(_ r: inout SeededRandom) -> [LayerGradient<S>] {
            [LayerGradient(weight: r.array(35), bias: r.array(5)), LayerGradient(weight: r.array(15), bias: nil),
             LayerGradient(weight: r.array(4 * 2 * 9), bias: r.array(4)), LayerGradient(weight: r.array(2 * 3 * 4), bias: r.array(2))]
        }
    }

    /// Records rows [lo, hi) of a union batch of `rows` rows.
    func record(_ opt: KFACOptimizer<S>, _ batch: [(x: [S], g: [S])], rows: Int, _ lo: Int, _ hi: Int) throws {
        guard hi > lo else { return }
        for (l, b) in batch.enumerated() {
            let xw = b.x.count / rows, gw = b.g.count / rows
            try opt.recordInputs(layer: l, Array(b.x[lo * xw..<hi * xw]), rows: hi - lo)
            try opt.recordOutputGradients(layer: l, Array(b.g[lo * gw..<hi * gw]), rows: hi - lo)
        }
    }

    /// The fake allreduce: every rank's buffer becomes the sum of all, in rank order.
    func allreduce(_ buffers: inout [[S]]) {
        var sum = buffers[0]
        for r in 1..<buffers.count { for i in sum.indices { sum[i] += buffers[r][i] } }
        for r in buffers.indices { buffers[r] = sum }
    }

    /// Both exchanges, when the step needs them (`gathered`: the inverses as an allgatherv of
    /// each rank's own units, whose volume is added to `gatheredVolume`).
    func exchange(_ ranks: [KFACOptimizer<S>], gathered: Bool = false, gatheredVolume: inout Int) throws {
        if gathered && ranks[0].exchangeDue(.inverses) {
            if ranks[0].exchangeDue(.statistics) {
                let n = ranks[0].statisticsPackCount
                var bufs = [[S]](repeating: [S](repeating: 0, count: n), count: ranks.count)
                for (r, o) in ranks.enumerated() { try bufs[r].withUnsafeMutableBufferPointer { try o.packStatistics(into: $0.baseAddress, count: n) } }
                allreduce(&bufs)
                for (r, o) in ranks.enumerated() { try bufs[r].withUnsafeBufferPointer { try o.unpackStatistics(from: $0.baseAddress, count: n) } }
            }
            let counts = try ranks[0].gatheredInverseCounts()
            for o in ranks { XCTAssertEqual(try o.gatheredInverseCounts(), counts) }
            var all: [S] = []
            for (r, o) in ranks.enumerated() {
                var mine = [S](repeating: 0, count: counts[r])
                try mine.withUnsafeMutableBufferPointer { try o.packOwnedInverses(into: $0.baseAddress, count: counts[r]) }
                all += mine
            }
            gatheredVolume += all.count
            for o in ranks { try all.withUnsafeBufferPointer { try o.unpackGatheredInverses(from: $0.baseAddress, count: $0.count) } }
            return
        }
        try exchange(ranks)
    }

    /// Both exchanges, when the step needs them.
    func exchange(_ ranks: [KFACOptimizer<S>]) throws {
        if ranks[0].exchangeDue(.statistics) {
            let n = ranks[0].statisticsPackCount
            var bufs = [[S]](repeating: [S](repeating: 0, count: n), count: ranks.count)
            for (r, o) in ranks.enumerated() { try bufs[r].withUnsafeMutableBufferPointer { try o.packStatistics(into: $0.baseAddress, count: n) } }
            allreduce(&bufs)
            for (r, o) in ranks.enumerated() { try bufs[r].withUnsafeBufferPointer { try o.unpackStatistics(from: $0.baseAddress, count: n) } }
        }
        if ranks[0].exchangeDue(.inverses) {
            let n = try ranks[0].inversePackCount()
            var bufs = [[S]](repeating: [S](repeating: 0, count: n), count: ranks.count)
            for (r, o) in ranks.enumerated() { try bufs[r].withUnsafeMutableBufferPointer { try o.packInverses(into: $0.baseAddress, count: n) } }
            allreduce(&bufs)
            for (r, o) in ranks.enumerated() { try bufs[r].withUnsafeBufferPointer { try o.unpackInverses(from: $0.baseAddress, count: n) } }
        }
    }

    func slices(rows: Int, ranks p: Int, even: Bool) -> [(Int, Int)] {
        if even { return (0..<p).map { (rows * $0 / p, rows * ($0 + 1) / p) } }
        // Uneven: rank r gets a share proportional to r + 1 (rank 0 may get none when rows are few).
        let weights = (0..<p).map { $0 + 1 }, total = weights.reduce(0, +)
        var bounds = [0], acc = 0
        for w in weights { acc += w; bounds.append(rows * acc / total) }
        return (0..<p).map { (bounds[$0], bounds[$0 + 1]) }
    }

    func maxRelativeDifference(_ a: [LayerGradient<S>], _ b: [LayerGradient<S>]) -> Double {
        var diff = 0.0, scale = 0.0
        for (x, y) in zip(a, b) {
            for (u, v) in zip(x.weight + (x.bias ?? []), y.weight + (y.bias ?? [])) {
                diff = max(diff, abs(u - v)); scale = max(scale, abs(v))
            }
        }
        return diff / max(scale, 1e-300)
    }

    /// Runs `steps` steps on P ranks and on one reference handle; optionally saves every rank
    /// after step `checkpoint` and continues on fresh handles loaded from the images.
    func run(ranks p: Int, strategy: InverseStrategy, reduce: DistributedReduce, steps: Int = 7, rows: Int = 12,
             checkpoint: Int? = nil, seed: UInt64 = 5, recordEveryStep: Bool = false, gathered: Bool = false,
             gatheredVolume: UnsafeMutablePointer<Int>? = nil,
             configure: @escaping (inout KFACParameters) -> Void = { _ in }) throws -> Double {
        let setup: (inout KFACParameters) -> Void = {
            $0.inverseStrategy = strategy; $0.factorUpdatePeriod = 1; $0.inverseUpdatePeriod = 3
            $0.distributedReduce = reduce; configure(&$0)
        }
        let reference = try Model.make(setup)
        var ranks = try makeRanks(p) { try Model.make(setup) }
        var random = SeededRandom(seed)
        let cut = slices(rows: rows, ranks: p, even: reduce == .lazy)
        var worst = 0.0
        for k in 0..<steps {
            let batch = Model.batch(&random, rows: rows)
            let grads = Model.gradients(&random)
            if recordEveryStep || reference.wantsStatistics { try record(reference, batch, rows: rows, 0, rows) }
            if recordEveryStep || ranks[0].wantsStatistics { for (r, o) in ranks.enumerated() { try record(o, batch, rows: rows, cut[r].0, cut[r].1) } }
            var volume = 0
            try exchange(ranks, gathered: gathered, gatheredVolume: &volume)
            gatheredVolume?.pointee += volume
            worst = max(worst, try stepRanks(ranks, reference: reference, grads, step: k))
            if k == checkpoint { ranks = try resumed(ranks) { try Model.make { _ in } } }
        }
        return worst
    }

    func testEagerReduceMatchesUnionBatch() throws {
        for strategy in Self.strategies {
            for p in 1...4 {
                let d = try run(ranks: p, strategy: strategy, reduce: .eager)
                XCTAssertLessThan(d, 1e-12, "eager, \(strategy), P = \(p)")
            }
        }
    }

    func testLazyReduceMatchesUnionBatchForEqualSlices() throws {
        for strategy in Self.strategies {
            for p in 1...4 {
                let d = try run(ranks: p, strategy: strategy, reduce: .lazy)
                XCTAssertLessThan(d, 1e-12, "lazy, \(strategy), P = \(p)")
            }
        }
    }

    func testFactorPeriodAndDampingCandidates() throws {
        // Folds every other step, γ steps every 2 (Cholesky: γ steps invert every factor again).
        for strategy in Self.strategies {
            for reduce in DistributedReduce.allCases {
                let d = try run(ranks: 3, strategy: strategy, reduce: reduce, steps: 8) {
                    $0.factorUpdatePeriod = 2; $0.factorDampingPeriod = 2; $0.factorDamping = 1e-2
                }
                XCTAssertLessThan(d, 1e-12, "\(strategy) \(reduce) with Tf = 2, T₂ = 2")
            }
        }
    }

    /// Statistics recorded on steps that do not fold (Tf = 2) stay pending until the next fold,
    /// also when an inverse step (Ti = 3) that does not fold exchanges the lazy averages in between:
    /// nothing recorded is lost or folded early, so the directions are the union handle's.
    func testLazyReduceKeepsStatisticsOfNonFoldSteps() throws {
        for strategy in Self.strategies {
            for p in [2, 4] {
                let d = try run(ranks: p, strategy: strategy, reduce: .lazy, steps: 10, rows: 8, recordEveryStep: true) {
                    $0.factorUpdatePeriod = 2
                }
                XCTAssertLessThan(d, 1e-12, "lazy, \(strategy), P = \(p), Tf = 2, Ti = 3, recording every step")
            }
        }
    }

    /// The allgatherv-style inverse exchange: each rank packs only its units; every rank's
    /// directions are bit-identical and the union batch's, and P > 1 ranks send less than the
    /// zero-padded SUM route's P full packs would (one full pack in all, split between them).
    func testGatheredInverseExchange() throws {
        for strategy in Self.strategies {
            for reduce in DistributedReduce.allCases {
                for p in 1...4 {
                    var volume = 0
                    let d = try run(ranks: p, strategy: strategy, reduce: reduce, gathered: true, gatheredVolume: &volume)
                    XCTAssertLessThan(d, 1e-12, "gathered, \(strategy), \(reduce), P = \(p)")
                    XCTAssertGreaterThan(volume, 0)
                }
                // Spread inversions: each step gathers only its phase's units.
                let d = try run(ranks: 3, strategy: strategy, reduce: reduce, steps: 8, gathered: true) { $0.inverseSpread = true }
                XCTAssertLessThan(d, 1e-12, "gathered, spread, \(strategy), \(reduce)")
            }
        }
        // The gathered volume of a step that inverts every block is one full inverse pack.
        let opt = try Model.make { $0.inverseStrategy = .eigen }
        try opt.setWorld(rank: 1, size: 3)
        var random = SeededRandom(2)
        try record(opt, Model.batch(&random, rows: 4), rows: 4, 0, 4)
        let counts = try opt.gatheredInverseCounts()
        XCTAssertEqual(counts.reduce(0, +), try opt.inversePackCount())
        XCTAssertTrue(counts.allSatisfy { $0 > 0 })
        var short = [S](repeating: 0, count: counts[1] + 1)
        XCTAssertThrowsError(try short.withUnsafeMutableBufferPointer { try opt.packOwnedInverses(into: $0.baseAddress, count: $0.count) })
        var bad = [S](repeating: .nan, count: counts.reduce(0, +))
        XCTAssertThrowsError(try bad.withUnsafeMutableBufferPointer { try opt.unpackGatheredInverses(from: $0.baseAddress, count: $0.count) }) {
            XCTAssertEqual(($0 as? KFACError)?.status, .nonFinite)
        }
    }

    func testSpreadInversions() throws {
        // Each step re-inverts the blocks of its phase: the exchange carries those only.
        for strategy in Self.strategies {
            let d = try run(ranks: 3, strategy: strategy, reduce: .eager, steps: 8) { $0.inverseSpread = true }
            XCTAssertLessThan(d, 1e-12, "spread, \(strategy)")
        }
    }

    func testCheckpointResumeMidRun() throws {
        for strategy in Self.strategies {
            let d = try run(ranks: 3, strategy: strategy, reduce: .eager, steps: 8, checkpoint: 3)
            XCTAssertLessThan(d, 1e-12, "resume, \(strategy)")
        }
    }

    func testEveryUnitHasOneOwnerAndTheAssignmentIsBalanced() throws {
        let opt = try Model.make { _ in }
        try opt.setWorld(rank: 1, size: 3)
        let a = opt.inverseAssignment()
        XCTAssertEqual(Set(a.owners), [0, 1, 2])
        XCTAssertEqual(a.owners.count, opt.estimator.blocks.reduce(0) { $0 + $1.input.structure.uniqueSizes.count + $1.output.structure.uniqueSizes.count })
        // The C API query agrees with the assignment.
        XCTAssertEqual(try opt.inverseOwner(layer: 2, group: 0, outputSide: false, unique: 0), a.owner(block: 2, side: .input, unique: 0))
        XCTAssertThrowsError(try opt.inverseOwner(layer: 0, group: 0, outputSide: false, unique: 9))
        XCTAssertThrowsError(try opt.setWorld(rank: 3, size: 3))
        XCTAssertEqual(opt.worldRank, 1)
        XCTAssertGreaterThan(opt.inverseAssignmentEfficiency, 0.5)
    }

    func testFailedExchangesChangeNothing() throws {
        let opt = try Model.make { $0.inverseStrategy = .cholesky }
        let twin = try Model.make { $0.inverseStrategy = .cholesky }
        try opt.setWorld(rank: 0, size: 2)
        try twin.setWorld(rank: 0, size: 2)
        var random = SeededRandom(9)
        let batch = Model.batch(&random, rows: 4)
        try record(opt, batch, rows: 4, 0, 4)
        try record(twin, batch, rows: 4, 0, 4)
        let n = opt.statisticsPackCount
        var buf = [S](repeating: 0, count: n)
        try buf.withUnsafeMutableBufferPointer { try opt.packStatistics(into: $0.baseAddress, count: n) }
        XCTAssertThrowsError(try buf.withUnsafeMutableBufferPointer { try opt.packStatistics(into: $0.baseAddress, count: n - 1) })
        var bad = buf; bad[3] = .nan
        XCTAssertThrowsError(try bad.withUnsafeBufferPointer { try opt.unpackStatistics(from: $0.baseAddress, count: n) })
        bad = buf; bad[n - 1] = 2.5
        XCTAssertThrowsError(try bad.withUnsafeBufferPointer { try opt.unpackStatistics(from: $0.baseAddress, count: n) })
        let m = try opt.inversePackCount()
        var inv = [S](repeating: 0, count: m)
        try inv.withUnsafeMutableBufferPointer { try opt.packInverses(into: $0.baseAddress, count: m) }
        inv[0] = .infinity
        XCTAssertThrowsError(try inv.withUnsafeBufferPointer { try opt.unpackInverses(from: $0.baseAddress, count: m) })
        XCTAssertEqual(try opt.stateImage(), try twin.stateImage())
        // Without an exchange the step computes every inverse itself: the same directions.
        var g1 = Model.gradients(&random), g2 = g1
        try opt.step(&g1)
        try twin.step(&g2)
        XCTAssertEqual(g1, g2)
    }

    /// The exchange is really used: unpacking rank 0's pack alone (without rank 1's units) gives
    /// rank 1 different directions than the union handle.
    func testStepUsesTheExchangedInverses() throws {
        let opts = try (0..<2).map { r in
            let o = try Model.make { $0.inverseStrategy = .cholesky }
            try o.setWorld(rank: r, size: 2)
            return o
        }
        let reference = try Model.make { $0.inverseStrategy = .cholesky }
        var random = SeededRandom(3)
        let batch = Model.batch(&random, rows: 6)
        try record(reference, batch, rows: 6, 0, 6)
        try record(opts[0], batch, rows: 6, 0, 2)
        try record(opts[1], batch, rows: 6, 2, 6)
        let n = opts[0].statisticsPackCount
        var bufs = [[S]](repeating: [S](repeating: 0, count: n), count: 2)
        for r in 0..<2 { try bufs[r].withUnsafeMutableBufferPointer { try opts[r].packStatistics(into: $0.baseAddress, count: n) } }
        allreduce(&bufs)
        for r in 0..<2 { try bufs[r].withUnsafeBufferPointer { try opts[r].unpackStatistics(from: $0.baseAddress, count: n) } }
        let m = try opts[0].inversePackCount()
        var only0 = [S](repeating: 0, count: m)
        try only0.withUnsafeMutableBufferPointer { try opts[0].packInverses(into: $0.baseAddress, count: m) }
        XCTAssertTrue(only0.contains(0))
        try only0.withUnsafeBufferPointer { try opts[1].unpackInverses(from: $0.baseAddress, count: m) }
        let grads = Model.gradients(&random)
        var expected = grads, g = grads
        try reference.step(&expected)
        try opts[1].step(&g)
        XCTAssertGreaterThan(maxRelativeDifference(g, expected), 1e-3)
    }

    /// The adaptive mode: a linear softmax model z = W x + b (so J·D = D_W x + D_b), each rank
    /// packing the model sums of its own uneven slice; α, μ and the update on every rank are
    /// bit-identical and equal to one handle's solve on the union batch.
    func testAdaptiveModelSums() throws {
        let (inF, outF, rows) = (5, 3, 11)
        func make(_ r: Int, _ p: Int) throws -> KFACOptimizer<S> {
            let o = try KFACOptimizer<S>()
            var q = o.parameters
            q.klClip = 0; q.inverseUpdatePeriod = 2; q.threadCount = 1
            try o.setParameters(q)
            try o.addDense(inFeatures: inF, outFeatures: outF, hasBias: true)
            try o.setWorld(rank: r, size: p)
            return o
        }
        func products(_ d: LayerGradient<S>, _ x: [S], _ lo: Int, _ hi: Int) -> [S] {
            var out = [S](repeating: 0, count: (hi - lo) * outF)
            for n in lo..<hi { for i in 0..<outF {
                var v = d.bias![i]
                for j in 0..<inF { v += d.weight[i * inF + j] * x[n * inF + j] }
                out[(n - lo) * outF + i] = v
            } }
            return out
        }
        for p in 1...4 {
            var random = SeededRandom(21)
            let reference = try make(0, 1)
            let ranks = try (0..<p).map { try make($0, p) }
            let cut = slices(rows: rows, ranks: p, even: false)
            var previousRef: LayerGradient<S>?
            var previousRanks = [LayerGradient<S>?](repeating: nil, count: p)
            for _ in 0..<4 {
                let x: [S] = random.array(rows * inF), g: [S] = random.array(rows * outF, scale: 0.5)
                let z: [S] = random.array(rows * outF)
                let grads = [LayerGradient<S>(weight: random.array(inF * outF), bias: random.array(outF))]
                try reference.recordInputs(layer: 0, x, rows: rows)
                try reference.recordOutputGradients(layer: 0, g, rows: rows)
                for (r, o) in ranks.enumerated() where cut[r].1 > cut[r].0 {
                    let (lo, hi) = cut[r]
                    try o.recordInputs(layer: 0, Array(x[lo * inF..<hi * inF]), rows: hi - lo)
                    try o.recordOutputGradients(layer: 0, Array(g[lo * outF..<hi * outF]), rows: hi - lo)
                }
                try exchange(ranks)
                var d = grads
                try reference.step(&d)
                let jd = products(d[0], x, 0, rows)
                let jp = previousRef.map { products($0, x, 0, rows) }
                let want = try z.withUnsafeBufferPointer { zp in try jd.withUnsafeBufferPointer { a in
                    try (jp ?? []).withUnsafeBufferPointer { b in
                        try reference.solveStepSize(outputs: zp.baseAddress, directionProducts: a.baseAddress,
                                                    previousProducts: jp == nil ? nil : b.baseAddress, rows: rows, dim: outF,
                                                    distribution: .categorical)
                    } } }
                previousRef = try reference.update()[0]
                // The ranks: local sums, the fake allreduce, the solve.
                let n = KFACOptimizer<S>.modelSumCount(candidates: 1)
                var sums = [[S]](repeating: [S](repeating: 0, count: n), count: p)
                for (r, o) in ranks.enumerated() {
                    var dr = grads
                    try o.step(&dr)
                    let (lo, hi) = cut[r]
                    let zl = Array(z[lo * outF..<hi * outF]) + [0], jl = products(dr[0], x, lo, hi) + [0]
                    let pl = previousRanks[r].map { products($0, x, lo, hi) + [0] }
                    // An empty slice (rows 0) contributes zeros.
                    do {
                        try zl.withUnsafeBufferPointer { zp in try jl.withUnsafeBufferPointer { a in
                            try (pl ?? []).withUnsafeBufferPointer { b in
                                try sums[r].withUnsafeMutableBufferPointer { out in
                                    try o.packModelSums(outputs: zp.baseAddress, candidateProducts: { _ in a.baseAddress }, candidates: 1,
                                                        previousProducts: pl == nil ? nil : b.baseAddress, rows: hi - lo, dim: outF,
                                                        distribution: .categorical, into: out.baseAddress, count: n)
                                } } } }
                    }
                }
                allreduce(&sums)
                var results: [(Double, Double)] = []
                for (r, o) in ranks.enumerated() {
                    let got = try sums[r].withUnsafeBufferPointer { try o.solveModelSums($0.baseAddress, count: n) }
                    results.append((got.alpha, got.mu))
                    previousRanks[r] = try o.update()[0]
                    XCTAssertEqual(previousRanks[r], previousRanks[0], "P = \(p): rank \(r)'s update differs")
                }
                for (a, m) in results {
                    XCTAssertEqual(a.bitPattern, results[0].0.bitPattern)
                    XCTAssertEqual(m.bitPattern, results[0].1.bitPattern)
                }
                XCTAssertLessThan(abs(results[0].0 - want.alpha), 1e-12 * abs(want.alpha), "P = \(p): α")
                XCTAssertLessThan(abs(results[0].1 - want.mu), 1e-12 * max(abs(want.mu), 1e-300) + 1e-300, "P = \(p): μ")
            }
        }
    }

    /// A collective that fails at either call site (the caller then skips the unpack) leaves
    /// every handle as an untouched twin's; the next attempt, and the step, work.
    func testFailedCollectivesLeaveHandlesUnchanged() throws {
        for failAt in [DistributedExchange.statistics, .inverses] {
            let p = 3
            let reference = try Model.make { $0.inverseStrategy = .cholesky }
            let ranks = try (0..<p).map { r in
                let o = try Model.make { $0.inverseStrategy = .cholesky }
                try o.setWorld(rank: r, size: p)
                return o
            }
            let twins = try (0..<p).map { r in
                let o = try Model.make { $0.inverseStrategy = .cholesky }
                try o.setWorld(rank: r, size: p)
                return o
            }
            var random = SeededRandom(4)
            let batch = Model.batch(&random, rows: 9)
            let cut = slices(rows: 9, ranks: p, even: false)
            try record(reference, batch, rows: 9, 0, 9)
            for r in 0..<p {
                try record(ranks[r], batch, rows: 9, cut[r].0, cut[r].1)
                try record(twins[r], batch, rows: 9, cut[r].0, cut[r].1)
            }
            // The failed attempt: pack everything up to the failing collective, unpack nothing after it.
            if failAt == .inverses {
                let n = ranks[0].statisticsPackCount
                var bufs = [[S]](repeating: [S](repeating: 0, count: n), count: p)
                for r in 0..<p { try bufs[r].withUnsafeMutableBufferPointer { try ranks[r].packStatistics(into: $0.baseAddress, count: n) } }
                allreduce(&bufs)
                for r in 0..<p {
                    try bufs[r].withUnsafeBufferPointer { try ranks[r].unpackStatistics(from: $0.baseAddress, count: n) }
                    try bufs[r].withUnsafeBufferPointer { try twins[r].unpackStatistics(from: $0.baseAddress, count: n) }
                }
                let m = try ranks[0].inversePackCount()
                var inv = [S](repeating: 0, count: m)
                for r in 0..<p { try inv.withUnsafeMutableBufferPointer { try ranks[r].packInverses(into: $0.baseAddress, count: m) } }
            } else {
                let n = ranks[0].statisticsPackCount
                var buf = [S](repeating: 0, count: n)
                for r in 0..<p { try buf.withUnsafeMutableBufferPointer { try ranks[r].packStatistics(into: $0.baseAddress, count: n) } }
            }
            for r in 0..<p { XCTAssertEqual(try ranks[r].stateImage(), try twins[r].stateImage(), "\(failAt): rank \(r) changed") }
            // Statistics already reduced are not exchanged again (that would count them twice).
            XCTAssertEqual(ranks[0].exchangeDue(.statistics), failAt == .statistics)
            // The retry: the whole exchange, then the step.
            try exchange(ranks)
            let grads = Model.gradients(&random)
            var expected = grads
            try reference.step(&expected)
            for o in ranks {
                var g = grads
                try o.step(&g)
                XCTAssertLessThan(maxRelativeDifference(g, expected), 1e-12, "\(failAt): retry")
            }
        }
    }

    /// Newton-CG: the caller SUM-allreduces each rank's share of every product G·v (the mean
    /// over the union batch); the solve's state stays replicated, so every rank's step is
    /// bit-identical and equals one handle's with the union's products (K-FAC preconditioner,
    /// inverses from an exchanged run).
    func testNewtonCGWithReducedProducts() throws {
        let (p, rows) = (3, 9)
        let reference = try Model.make { _ in }
        let ranks = try (0..<p).map { r in
            let o = try Model.make { _ in }
            try o.setWorld(rank: r, size: p)
            return o
        }
        var random = SeededRandom(31)
        let cut = slices(rows: rows, ranks: p, even: false)
        for _ in 0..<2 {
            let batch = Model.batch(&random, rows: rows)
            try record(reference, batch, rows: rows, 0, rows)
            for r in 0..<p { try record(ranks[r], batch, rows: rows, cut[r].0, cut[r].1) }
            try exchange(ranks)
            let grads = Model.gradients(&random)
            var g = grads
            try reference.step(&g)
            for o in ranks { g = grads; try o.step(&g) }
        }
        // G = (1/N) Σ_n a_n a_nᵀ over the flattened parameters.
        func flat(_ v: [LayerGradient<S>]) -> [S] { v.flatMap { $0.weight + ($0.bias ?? []) } }
        func shaped(_ x: [S], like v: [LayerGradient<S>]) -> [LayerGradient<S>] {
            var o = 0
            return v.map { l in
                let w = Array(x[o..<o + l.weight.count]); o += l.weight.count
                let b = l.bias.map { b -> [S] in defer { o += b.count }; return Array(x[o..<o + b.count]) }
                return LayerGradient(weight: w, bias: b)
            }
        }
        let gradient = Model.gradients(&random)
        let dim = flat(gradient).count
        let a: [[S]] = (0..<rows).map { _ in random.array(dim) }
        func share(_ v: [LayerGradient<S>], _ lo: Int, _ hi: Int) -> [S] {
            let x = flat(v)
            var u = [S](repeating: 0, count: dim)
            for n in lo..<hi {
                var dot: S = 0
                for i in 0..<dim { dot += a[n][i] * x[i] }
                for i in 0..<dim { u[i] += dot * a[n][i] / S(rows) }
            }
            return u
        }
        var options = CGOptions()
        options.preconditioner = .kfac
        options.maxIterations = 8
        var request = try reference.beginConjugateGradient(options, gradient: gradient)
        while request == .needProduct {
            let v = try reference.conjugateGradientVector()
            request = try reference.supplyConjugateGradientProduct(shaped(share(v, 0, rows), like: v))
        }
        let want = flat(try reference.finishConjugateGradient().step)
        var requests = try ranks.map { try $0.beginConjugateGradient(options, gradient: gradient) }
        while requests[0] == .needProduct {
            let vs = try ranks.map { try $0.conjugateGradientVector() }
            var shares = (0..<p).map { share(vs[$0], cut[$0].0, cut[$0].1) }
            allreduce(&shares)
            requests = try (0..<p).map { try ranks[$0].supplyConjugateGradientProduct(shaped(shares[$0], like: vs[$0])) }
        }
        let steps = try ranks.map { flat(try $0.finishConjugateGradient().step) }
        for r in 1..<p { XCTAssertEqual(steps[r], steps[0], "rank \(r)'s Newton-CG step differs") }
        let scale = want.map { abs($0) }.max()!
        let difference = zip(steps[0], want).map { abs($0 - $1) }.max()! / scale
        XCTAssertLessThan(difference, 1e-12)
    }
}
