import Foundation
import XCTest
@testable import KFAC

/// A fake world of P ranks on P threads, its SUM-allreduce a barrier: each rank publishes its
/// buffer, every rank sums all of them in rank order (so every rank gets the same bits), and a
/// second barrier lets the buffers be overwritten. A collective can be told to fail on every
/// rank at its n-th call, as an engine that reports an error to the whole group.
final class ThreadWorld: @unchecked Sendable {
    let size: Int
    private let condition = NSCondition()
    private var arrived = 0, generation = 0
    private var published: [UnsafeMutablePointer<Double>?]
    private(set) var calls: [Int]
    var failingCall: Int?

    init(size: Int) {
        self.size = size
        published = Array(repeating: nil, count: size)
        calls = Array(repeating: 0, count: size)
    }

    private func barrier() {
        condition.lock()
        let g = generation
        arrived += 1
        if arrived == size {
            arrived = 0
            generation += 1
            condition.broadcast()
        } else {
            while generation == g { condition.wait() }
        }
        condition.unlock()
    }

    func allreduceSum(rank: Int, _ buffer: UnsafeMutablePointer<Double>, _ count: Int) -> Int32 {
        defer { calls[rank] += 1 }
        if calls[rank] == failingCall { return 7 }
        published[rank] = buffer
        barrier()
        var sum = [Double](repeating: 0, count: count)
        for r in 0..<size { for i in 0..<count { sum[i] += published[r]![i] } }
        barrier()
        buffer.update(from: sum, count: count)
        return 0
    }

    /// The allgatherv: every rank copies each rank's segment to its displacement.
    func allgatherv(rank: Int, _ send: UnsafePointer<Double>, _ receive: UnsafeMutablePointer<Double>,
                    _ counts: UnsafePointer<Int64>, _ displacements: UnsafePointer<Int64>) -> Int32 {
        defer { calls[rank] += 1 }
        if calls[rank] == failingCall { return 7 }
        published[rank] = UnsafeMutablePointer(mutating: send)
        barrier()
        for r in 0..<size { (receive + Int(displacements[r])).update(from: published[r]!, count: Int(counts[r])) }
        barrier()
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
                    let ranks = try (0..<p).map { r in
                        let o = try Model.make(setup)
                        try o.setWorld(rank: r, size: p)
                        return o
                    }
                    let world = ThreadWorld(size: p)
                    let results = Results(p)
                    nonisolated(unsafe) let shared = (ranks, data)
                    world.run { r in
                        do {
                            let o = shared.0[r]
                            for (batch, grads) in shared.1 {
                                try self.record(o, batch, rows: rows, cut[r].0, cut[r].1)
                                if gather {
                                    try o.exchange(through: { world.allreduceSum(rank: r, $0, $1) },
                                                   allgatherv: { world.allgatherv(rank: r, $0, $1, $2, $3) })
                                } else {
                                    try o.exchange(through: { world.allreduceSum(rank: r, $0, $1) })
                                }
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
            let make = { (r: Int) throws -> KFACOptimizer<S> in
                let o = try Model.make { $0.inverseStrategy = .eigen }
                try o.setWorld(rank: r, size: p)
                return o
            }
            let ranks = try (0..<p).map(make), twins = try (0..<p).map(make)
            var random = SeededRandom(4)
            let batch = Model.batch(&random, rows: rows)
            let cut = slices(rows: rows, ranks: p, even: false)
            try record(reference, batch, rows: rows, 0, rows)
            for r in 0..<p {
                try record(ranks[r], batch, rows: rows, cut[r].0, cut[r].1)
                try record(twins[r], batch, rows: rows, cut[r].0, cut[r].1)
            }
            let world = ThreadWorld(size: p)
            world.failingCall = failing
            let results = Results(p)
            nonisolated(unsafe) let shared = ranks
            let exchange = { (r: Int) throws(KFACError) in
                if gather {
                    try shared[r].exchange(through: { world.allreduceSum(rank: r, $0, $1) },
                                           allgatherv: { world.allgatherv(rank: r, $0, $1, $2, $3) })
                } else {
                    try shared[r].exchange(through: { world.allreduceSum(rank: r, $0, $1) })
                }
            }
            world.run { r in
                do { try exchange(r) } catch { results.fail(r, error) }
            }
            for r in 0..<p {
                XCTAssertEqual((results.errors[r] as? KFACError)?.status, .callback, "call \(failing): rank \(r)")
                // (== rather than XCTAssertEqual: a failure would print two whole images)
                XCTAssertTrue(try ranks[r].stateImage() == twins[r].stateImage(), "call \(failing): rank \(r) changed")
                XCTAssertEqual(ranks[r].exchangeDue(.statistics), twins[r].exchangeDue(.statistics))
            }
            world.failingCall = nil
            let retry = Results(p)
            let grads = Model.gradients(&random)
            world.run { r in
                do {
                    try exchange(r)
                    var g = grads
                    try shared[r].step(&g)
                    retry.append(r, g)
                } catch { retry.fail(r, error) }
            }
            XCTAssertNil(retry.error)
            guard retry.error == nil else { continue }
            var expected = grads
            try reference.step(&expected)
            for r in 0..<p {
                XCTAssertEqual(retry.steps[r][0], retry.steps[0][0])
                XCTAssertLessThan(maxRelativeDifference(retry.steps[r][0], expected), 1e-12, "call \(failing): retry")
            }
        }
    }
}

/// What the rank threads report, under a lock.
final class Results: @unchecked Sendable {
    private let lock = NSLock()
    var steps: [[[LayerGradient<Double>]]]
    var errors: [Error?]
    var error: Error? { errors.compactMap { $0 }.first }

    init(_ p: Int) {
        steps = Array(repeating: [], count: p)
        errors = Array(repeating: nil, count: p)
    }

    func append(_ r: Int, _ g: [LayerGradient<Double>]) { lock.lock(); steps[r].append(g); lock.unlock() }
    func fail(_ r: Int, _ e: Error) { lock.lock(); errors[r] = e; lock.unlock() }
}
