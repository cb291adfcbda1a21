import Foundation
import XCTest
@testable import KFAC

/// A barrier for the threads of a fake world, on one condition variable (nothing allocated after
/// init, so the allocation-counting tests can use it). A wait gives up after `timeout` seconds and
/// breaks the barrier: a rank that threw before reaching it then fails the test instead of hanging
/// the whole run, and every later wait returns false at once.
final class ThreadBarrier: @unchecked Sendable {
    let size: Int
    private let timeout: TimeInterval
    private let condition = NSCondition()
    private var arrived = 0, generation = 0, broken = false

    init(size: Int, timeout: TimeInterval = 120) {
        self.size = size
        self.timeout = timeout
    }

    /// Waits until all `size` threads have arrived; false when the barrier is or becomes broken.
    @discardableResult
    func wait() -> Bool {
        condition.lock()
        defer { condition.unlock() }
        if broken { return false }
        let g = generation
        arrived += 1
        if arrived == size {
            arrived = 0
            generation += 1
            condition.broadcast()
            return true
        }
        let deadline = Date(timeIntervalSinceNow: timeout)
        while generation == g && !broken {
            if !condition.wait(until: deadline) && generation == g {
                broken = true
                condition.broadcast()
            }
        }
        return generation != g
    }
}

/// The collectives of a fake world, as a caller of `exchange(through:)` supplies them.
protocol FakeCollectives: AnyObject, Sendable {
    associatedtype Scalar: KFACScalar
    func allreduceSum(rank: Int, _ buffer: UnsafeMutablePointer<Scalar>, _ count: Int) -> Int32
    func allgatherv(rank: Int, _ send: UnsafePointer<Scalar>, _ receive: UnsafeMutablePointer<Scalar>,
                    _ counts: UnsafePointer<Int64>, _ displacements: UnsafePointer<Int64>) -> Int32
}

extension FakeCollectives {
    /// `opt.exchange(through:)` as rank `rank` of this world (`gathered`: the inverses by the
    /// allgatherv route).
    func exchange(_ opt: KFACOptimizer<Scalar>, rank: Int, gathered: Bool) throws(KFACError) {
        if gathered {
            try opt.exchange(through: { self.allreduceSum(rank: rank, $0, $1) },
                             allgatherv: { self.allgatherv(rank: rank, $0, $1, $2, $3) })
        } else {
            try opt.exchange(through: { self.allreduceSum(rank: rank, $0, $1) })
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

/// Rank handles, stepping them against a union handle, and the threaded exchange, shared by the
/// fake-world tests of every strategy and model.
extension FakeWorldTests {
    /// P handles made by `make`, each told its rank of P.
    func makeRanks(_ p: Int, _ make: () throws -> KFACOptimizer<S>) throws -> [KFACOptimizer<S>] {
        try (0..<p).map { r in
            let o = try make()
            try o.setWorld(rank: r, size: p)
            return o
        }
    }

    /// Every rank saved and loaded into a fresh handle from `make` (the image carries the
    /// parameters and layers' state), told its rank again.
    func resumed(_ ranks: [KFACOptimizer<S>], _ make: () throws -> KFACOptimizer<S>) throws -> [KFACOptimizer<S>] {
        let images = try ranks.map { try $0.stateImage() }
        return try (0..<ranks.count).map { r in
            let o = try make()
            try images[r].withUnsafeBytes { try o.loadState(from: $0) }
            try o.setWorld(rank: r, size: ranks.count)
            return o
        }
    }

    /// Steps the union handle and every rank on `grads`: the ranks' directions must be
    /// bit-identical; returns their largest relative difference to the union handle's.
    func stepRanks(_ ranks: [KFACOptimizer<S>], reference: KFACOptimizer<S>, _ grads: [LayerGradient<S>],
                   step k: Int) throws -> Double {
        var expected = grads
        try reference.step(&expected)
        var first: [LayerGradient<S>]?
        for (r, o) in ranks.enumerated() {
            var g = grads
            try o.step(&g)
            if let first {
                XCTAssertEqual(g, first, "rank \(r) of \(ranks.count) differs from rank 0 at step \(k)")
            } else {
                first = g
            }
        }
        return maxRelativeDifference(first!, expected)
    }

    /// The exchange on one thread per rank with the collective failing on every rank at its
    /// `failing`-th call from now: each rank's exchange throws `.callback` and leaves its handle's
    /// state image equal to its untouched twin's.
    func assertFailedExchangeLeavesRanksUnchanged(_ world: ThreadWorld, _ ranks: [KFACOptimizer<S>],
                                                  twins: [KFACOptimizer<S>], failing: Int, gathered: Bool,
                                                  file: StaticString = #filePath, line: UInt = #line) throws {
        world.failingCall = world.calls[0] + failing
        defer { world.failingCall = nil }
        let results = Results(ranks.count)
        nonisolated(unsafe) let shared = ranks
        world.run { r in
            do { try world.exchange(shared[r], rank: r, gathered: gathered) } catch { results.fail(r, error) }
        }
        for r in ranks.indices {
            XCTAssertEqual((results.errors[r] as? KFACError)?.status, .callback, "call \(failing): rank \(r)", file: file, line: line)
            // (== rather than XCTAssertEqual: a failure would print two whole images)
            XCTAssertTrue(try ranks[r].stateImage() == twins[r].stateImage(), "call \(failing): rank \(r) changed",
                          file: file, line: line)
            XCTAssertEqual(ranks[r].exchangeDue(.statistics), twins[r].exchangeDue(.statistics), file: file, line: line)
        }
    }

    /// The exchange and a step on one thread per rank: the ranks' directions must be bit-identical
    /// and equal the union handle's (stepped here on the same gradients) to rtol 1e-12.
    func assertThreadedStepMatchesUnion(_ world: ThreadWorld, _ ranks: [KFACOptimizer<S>], reference: KFACOptimizer<S>,
                                        _ grads: [LayerGradient<S>], gathered: Bool, _ label: String,
                                        file: StaticString = #filePath, line: UInt = #line) throws {
        let results = Results(ranks.count)
        nonisolated(unsafe) let shared = ranks
        world.run { r in
            do {
                try world.exchange(shared[r], rank: r, gathered: gathered)
                var g = grads
                try shared[r].step(&g)
                results.append(r, g)
            } catch { results.fail(r, error) }
        }
        XCTAssertNil(results.error, label, file: file, line: line)
        guard results.error == nil else { return }
        var expected = grads
        try reference.step(&expected)
        for r in ranks.indices {
            XCTAssertEqual(results.steps[r][0], results.steps[0][0], "\(label): rank \(r)", file: file, line: line)
            XCTAssertLessThan(maxRelativeDifference(results.steps[r][0], expected), 1e-12, label, file: file, line: line)
        }
    }
}

extension FakeWorldTests {
    /// A rank that never arrives breaks the barrier after the timeout: the waiting rank gets
    /// false (its collective then fails with a status) instead of hanging the test run, and so
    /// does every later wait; a full barrier before that passes.
    func testBarrierTimesOutInsteadOfHanging() {
        let barrier = ThreadBarrier(size: 2, timeout: 0.2)
        let passed = Results(2)
        let world = ThreadWorld(size: 2)
        world.run { r in if !barrier.wait() { passed.fail(r, KFACError(.callback, "broken")) } }
        XCTAssertNil(passed.error, "both ranks arrived")
        let start = Date()
        XCTAssertFalse(barrier.wait(), "the other rank never arrives")
        XCTAssertGreaterThanOrEqual(Date().timeIntervalSince(start), 0.2)
        XCTAssertFalse(barrier.wait(), "a broken barrier stays broken")
    }
}
