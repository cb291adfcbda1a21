import Foundation
import XCTest
@testable import KFAC

/// A fake world of P ranks on P threads, its SUM-allreduce a barrier: each rank publishes its
/// buffer, every rank sums all of them in rank order (so every rank gets the same bits), and a
/// second barrier lets the buffers be overwritten. A collective can be told to fail on every
/// rank at its n-th call, as an engine that reports an error to the whole group; one whose
/// barrier times out (a rank threw before reaching it) fails too.
final class ThreadWorld: FakeCollectives, @unchecked Sendable {
    let size: Int
    private let barrier: ThreadBarrier
    private var published: [UnsafeMutablePointer<Double>?]
    private(set) var calls: [Int]
    var failingCall: Int?

    init(size: Int) {
        self.size = size
        barrier = ThreadBarrier(size: size)
        published = Array(repeating: nil, count: size)
        calls = Array(repeating: 0, count: size)
    }

    func allreduceSum(rank: Int, _ buffer: UnsafeMutablePointer<Double>, _ count: Int) -> Int32 {
        defer { calls[rank] += 1 }
        if calls[rank] == failingCall { return 7 }
        published[rank] = buffer
        guard barrier.wait() else { return 8 }
        var sum = [Double](repeating: 0, count: count)
        for r in 0..<size { for i in 0..<count { sum[i] += published[r]![i] } }
        guard barrier.wait() else { return 8 }
        buffer.update(from: sum, count: count)
        return 0
    }

    /// The allgatherv: every rank copies each rank's segment to its displacement.
    func allgatherv(rank: Int, _ send: UnsafePointer<Double>, _ receive: UnsafeMutablePointer<Double>,
                    _ counts: UnsafePointer<Int64>, _ displacements: UnsafePointer<Int64>) -> Int32 {
        defer { calls[rank] += 1 }
        if calls[rank] == failingCall { return 7 }
        published[rank] = UnsafeMutablePointer(mutating: send)
        guard barrier.wait() else { return 8 }
        for r in 0..<size { (receive + Int(displacements[r])).update(from: published[r]!, count: Int(counts[r])) }
        guard barrier.wait() else { return 8 }
        return 0
    }

    /// Runs `body(rank)` on `size` threads and waits for all.
    func run(_ body: @escaping @Sendable (Int) -> Void) {
        let group = DispatchGroup()
        for r in 0..<size {
            group.enter()
            Thread.detachNewThread {
                body(r)
                group.leave()
            }
        }
        group.wait()
    }
}

extension FakeWorldTests {
    /// `exchange(through:)` on P threads: the directions of every rank are bit-identical and equal
    /// one handle's on the union batch (uneven slices, eager reduce; equal slices, lazy reduce).
    func testExchangeThroughACollectiveOnThreads() throws {
        let (steps, rows) = (7, 12)
        for strategy in Self.strategies {
            for (reduce, gather) in [(DistributedReduce.eager, false), (.lazy, false), (.eager, true)] {
                for p in 1...4 {
                    let setup: (inout KFACParameters) -> Void = {
                        $0.inverseStrategy = strategy; $0.factorUpdatePeriod = 1; $0.inverseUpdatePeriod = 3
                        $0.distributedReduce = reduce
                    }
                    let reference = try Model.make(setup)
                    var random = SeededRandom(11)
                    let data = (0..<steps).map { _ in (Model.batch(&random, rows: rows), Model.gradients(&random)) }
                    var expected: [[LayerGradient<S>]] = []
                    for (batch, grads) in data {
                        try record(reference, batch, rows: rows, 0, rows)
                        var g = grads
                        try reference.step(&g)
                        expected.append(g)
                    }
                    let cut = slices(rows: rows, ranks: p, even: reduce == .lazy)
                    let ranks = try makeRanks(p) { try Model.make(setup) }
                    let world = ThreadWorld(size: p)
                    let results = Results(p)
                    nonisolated(unsafe) let shared = (ranks, data)
                    world.run { r in
                        do {
                            let o = shared.0[r]
                            for (batch, grads) in shared.1 {
                                try self.record(o, batch, rows: rows, cut[r].0, cut[r].1)
                                try world.exchange(o, rank: r, gathered: gather)
                                var g = grads
                                try o.step(&g)
                                results.append(r, g)
                            }
                        } catch { results.fail(r, error) }
                    }
                    XCTAssertNil(results.error, "\(strategy) \(reduce) gather \(gather) P = \(p)")
                    guard results.error == nil else { continue }
                    var worst = 0.0
                    for k in 0..<steps {
                        for r in 1..<p { XCTAssertEqual(results.steps[r][k], results.steps[0][k], "rank \(r), step \(k)") }
                        worst = max(worst, maxRelativeDifference(results.steps[0][k], expected[k]))
                    }
                    XCTAssertLessThan(worst, 1e-12, "\(strategy) \(reduce) gather \(gather) P = \(p)")
                }
            }
        }
    }

    /// A collective that fails on every rank at its first (statistics) or second (inverse) call:
    /// every rank's exchange throws `.callback` and leaves its handle equal to an untouched twin's;
    /// the retry and the step then agree with one handle on the union batch.
    func testFailedCollectiveLeavesEveryHandleUnchanged() throws {
        let (p, rows) = (3, 9)
        for (failing, gather) in [(0, false), (1, false), (1, true)] {
            let reference = try Model.make { $0.inverseStrategy = .eigen }
            let ranks = try makeRanks(p) { try Model.make { $0.inverseStrategy = .eigen } }
            let twins = try makeRanks(p) { try Model.make { $0.inverseStrategy = .eigen } }
            var random = SeededRandom(4)
            let batch = Model.batch(&random, rows: rows)
            let cut = slices(rows: rows, ranks: p, even: false)
            try record(reference, batch, rows: rows, 0, rows)
            for r in 0..<p {
                try record(ranks[r], batch, rows: rows, cut[r].0, cut[r].1)
                try record(twins[r], batch, rows: rows, cut[r].0, cut[r].1)
            }
            let world = ThreadWorld(size: p)
            try assertFailedExchangeLeavesRanksUnchanged(world, ranks, twins: twins, failing: failing, gathered: gather)
            try assertThreadedStepMatchesUnion(world, ranks, reference: reference, Model.gradients(&random), gathered: gather,
                                               "call \(failing), gather \(gather): retry")
        }
    }
}
