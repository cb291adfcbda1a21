import AllocationCounter
import CBLAS
import Foundation
import XCTest
@testable import KFAC

/// After warm-up, a distributed step allocates nothing: packing and unpacking the statistics,
/// the inverses (the SUM route and the allgatherv route) and, with EKFAC (paired recording), the
/// scalings, and
/// `exchange(through:)` (kfac_distributed_synchronize) on two threads with non-allocating
/// collectives. Allocations inside OpenBLAS are told apart as in `AllocationTests`.
final class DistributedAllocationTests: XCTestCase {
    /// A grouped dense layer, a plain dense layer and a grouped convolution, with uneven slices
    /// of a 7-row union batch per rank (rank 0: 3 rows, rank 1: 4).
    final class Rank<S: KFACScalar> {
        static var conv: Conv2dGeometry {
            Conv2dGeometry(inChannels: 4, outChannels: 4, kernel: (3, 3), padding: (1, 1), groups: 2, hasBias: true, input: (4, 4))
        }
        let opt: KFACOptimizer<S>
        let rows: Int
        let inputs: [[S]], outputs: [[S]]
        let weights: [UnsafeMutablePointer<S>], biases: [UnsafeMutablePointer<S>?]
        let weightCounts: [Int], biasCounts: [Int]
        let paired: Bool

        init(rank: Int, size: Int, strategy: InverseStrategy, paired: Bool = false, linked: Bool = false) throws {
            let opt = try KFACOptimizer<S>()
            var p = opt.parameters
            p.inverseStrategy = strategy
            p.inverseUpdatePeriod = 2
            p.threadCount = 2
            p.klClip = 1e-2
            if linked { p.damping = 0.05 }
            try opt.setParameters(p)
            // Linked (block-tridiagonal): the two dense layers ungrouped and linked.
            try opt.addDense(inFeatures: 7, outFeatures: 5, hasBias: true,
                             grouping: linked ? .init() : .init(inputGroupSize: 3, outputGroupSize: 2))
            try opt.addDense(inFeatures: 5, outFeatures: 3, hasBias: false)
            try opt.addConv2d(Self.conv, grouping: .init(inputGroupSize: 1))
            if linked { try opt.linkLayers(lower: 0, upper: 1) }
            try opt.setWorld(rank: rank, size: size)
            self.opt = opt
            self.paired = paired
            let rows = size == 1 ? 7 : [3, 4][rank]
            self.rows = rows
            var random = SeededRandom(UInt64(11 + rank))
            let shapes = [(7, 5, 35, 5), (5, 3, 15, 0), (4 * 16, 4 * Self.conv.outputPositions, 4 * 2 * 9, 4)]
            var x: [[S]] = [], g: [[S]] = []
            for s in shapes {
                x.append(random.array(rows * s.0))
                g.append(random.array(rows * s.1, scale: 0.5))
            }
            inputs = x
            outputs = g
            weightCounts = shapes.map { $0.2 }
            biasCounts = shapes.map { $0.3 }
            weights = shapes.map { .allocate(capacity: $0.2) }
            biases = shapes.map { $0.3 > 0 ? .allocate(capacity: $0.3) : nil }
        }

        deinit {
            weights.forEach { $0.deallocate() }
            biases.forEach { $0?.deallocate() }
        }

        func record() throws {
            for l in inputs.indices {
                if paired {
                    try inputs[l].withUnsafeBufferPointer { x in
                        try outputs[l].withUnsafeBufferPointer { g in
                            try opt.recordExamples(layer: l, inputs: x.baseAddress, outputGradients: g.baseAddress, rows: rows)
                        }
                    }
                } else {
                    try inputs[l].withUnsafeBufferPointer { try opt.recordInputs(layer: l, $0.baseAddress, rows: rows) }
                    try outputs[l].withUnsafeBufferPointer { try opt.recordOutputGradients(layer: l, $0.baseAddress, rows: rows) }
                }
            }
        }

        func step() throws {
            for l in weights.indices {
                for i in 0..<weightCounts[l] { weights[l][i] = S(i % 7) / 7 - 0.5 }
                if let b = biases[l] { for i in 0..<biasCounts[l] { b[i] = S(i % 3) / 3 } }
            }
            try opt.step { l in ParameterGradient(weight: self.weights[l], bias: self.biases[l]) }
        }
    }

    /// Buffers the caller owns, large enough for every pack.
    final class Buffers<S: KFACScalar> {
        let capacity: Int
        let a: UnsafeMutablePointer<S>, b: UnsafeMutablePointer<S>, gathered: UnsafeMutablePointer<S>
        let counts: UnsafeMutablePointer<Int64>, displacements: UnsafeMutablePointer<Int64>

        init(capacity: Int) {
            self.capacity = capacity
            a = .allocate(capacity: capacity); b = .allocate(capacity: capacity); gathered = .allocate(capacity: capacity)
            counts = .allocate(capacity: 2); displacements = .allocate(capacity: 2)
        }

        deinit {
            a.deallocate(); b.deallocate(); gathered.deallocate(); counts.deallocate(); displacements.deallocate()
        }

        /// The fake SUM-allreduce of two buffers of `n` values.
        func sum(_ n: Int) {
            for i in 0..<n { a[i] += b[i] }
            b.update(from: a, count: n)
        }
    }

    /// One step of both ranks through the pack and unpack calls (`gathered`: the inverses by
    /// the allgatherv route), in one thread.
    private func manualStep<S: KFACScalar>(_ ranks: [Rank<S>], _ buffers: Buffers<S>, gathered: Bool) throws {
        for r in ranks.indices { try ranks[r].record() }
        let (o0, o1) = (ranks[0].opt, ranks[1].opt)
        if o0.exchangeDue(.statistics) {
            let n = o0.statisticsPackCount
            try o0.packStatistics(into: buffers.a, count: n)
            try o1.packStatistics(into: buffers.b, count: n)
            buffers.sum(n)
            try o0.unpackStatistics(from: buffers.a, count: n)
            try o1.unpackStatistics(from: buffers.b, count: n)
        }
        if o0.exchangeDue(.inverses) {
            if gathered {
                try o0.gatheredInverseLayout(counts: buffers.counts, displacements: buffers.displacements)
                let (c0, c1) = (Int(buffers.counts[0]), Int(buffers.counts[1]))
                try o0.packOwnedInverses(into: buffers.gathered, count: c0)
                try o1.packOwnedInverses(into: buffers.gathered + c0, count: c1)
                try o0.unpackGatheredInverses(from: buffers.gathered, count: c0 + c1)
                try o1.unpackGatheredInverses(from: buffers.gathered, count: c0 + c1)
            } else {
                let n = try o0.inversePackCount()
                try o0.packInverses(into: buffers.a, count: n)
                try o1.packInverses(into: buffers.b, count: n)
                buffers.sum(n)
                try o0.unpackInverses(from: buffers.a, count: n)
                try o1.unpackInverses(from: buffers.b, count: n)
            }
        }
        if o0.exchangeDue(.scalings) {
            let n = o0.scalingPackCount
            try o0.packScalings(into: buffers.a, count: n)
            try o1.packScalings(into: buffers.b, count: n)
            buffers.sum(n)
            try o0.unpackScalings(from: buffers.a, count: n)
            try o1.unpackScalings(from: buffers.b, count: n)
        }
        for r in ranks.indices { try ranks[r].step() }
    }

    private func counted(_ body: () throws -> Void) rethrows -> Int64 {
        allocation_counter_start()
        try body()
        let count = allocation_counter_stop(), openblas = allocation_counter_openblas()
        return count - openblas
    }

    private func manual<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy, gathered: Bool, linked: Bool = false) throws {
        let ranks = try (0..<2).map { try Rank<S>(rank: $0, size: 2, strategy: strategy, paired: strategy == .ekfac, linked: linked) }
        let buffers = Buffers<S>(capacity: 1 << 16)
        for _ in 0..<4 { try manualStep(ranks, buffers, gathered: gathered) }
        let n = try counted { for _ in 0..<6 { try manualStep(ranks, buffers, gathered: gathered) } }  // three inverse steps
        XCTAssertEqual(n, 0, "\(S.self) \(strategy) gathered \(gathered) linked \(linked): \(n) allocations outside OpenBLAS in 6 distributed steps")
    }

    func testPackAndUnpackStepsDoNotAllocate() throws {
        let blasThreads = openblas_get_num_threads()
        defer { openblas_set_num_threads(blasThreads) }
        for threads in [blasThreads, 1] {
            openblas_set_num_threads(threads)
            for strategy in [InverseStrategy.cholesky, .eigen, .ekfac] {
                for gathered in [false, true] {
                    try manual(Float.self, strategy, gathered: gathered)
                    try manual(Double.self, strategy, gathered: gathered)
                    if strategy != .ekfac {  // block-tridiagonal links (not with EKFAC)
                        try manual(Float.self, strategy, gathered: gathered, linked: true)
                        try manual(Double.self, strategy, gathered: gathered, linked: true)
                    }
                }
            }
        }
    }
}

/// A two-thread world whose collectives allocate nothing: a barrier on a condition variable and
/// sums into the callers' buffers.
final class NonAllocatingWorld<S: KFACScalar>: FakeCollectives, @unchecked Sendable {
    let size: Int
    private let gate: ThreadBarrier
    private let published: UnsafeMutablePointer<UnsafeMutablePointer<S>?>
    private let scratch: UnsafeMutablePointer<S>

    init(size: Int, capacity: Int) {
        self.size = size
        gate = ThreadBarrier(size: size)
        published = .allocate(capacity: size)
        published.initialize(repeating: nil, count: size)
        scratch = .allocate(capacity: capacity)
    }

    deinit {
        published.deallocate()
        scratch.deallocate()
    }

    /// False when a rank did not arrive in time (it threw before the barrier).
    @discardableResult
    func barrier() -> Bool { gate.wait() }

    func allreduceSum(rank: Int, _ buffer: UnsafeMutablePointer<S>, _ count: Int) -> Int32 {
        published[rank] = buffer
        guard barrier() else { return 8 }
        if rank == 0 {
            scratch.update(from: published[0]!, count: count)
            for r in 1..<size { for i in 0..<count { scratch[i] += published[r]![i] } }
        }
        guard barrier() else { return 8 }
        buffer.update(from: scratch, count: count)
        guard barrier() else { return 8 }
        return 0
    }

    func allgatherv(rank: Int, _ send: UnsafePointer<S>, _ receive: UnsafeMutablePointer<S>, _ counts: UnsafePointer<Int64>,
                    _ displacements: UnsafePointer<Int64>) -> Int32 {
        published[rank] = UnsafeMutablePointer(mutating: send)
        guard barrier() else { return 8 }
        for r in 0..<size { (receive + Int(displacements[r])).update(from: published[r]!, count: Int(counts[r])) }
        guard barrier() else { return 8 }
        return 0
    }
}

extension DistributedAllocationTests {
    /// `exchange(through:)` on two threads: warm-up, then six counted steps on both ranks (the
    /// counter counts every thread; rank 0 starts and stops it between barriers).
    private func synchronized<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy, gathered: Bool, paired: Bool = false) throws {
        let ranks = try (0..<2).map { try Rank<S>(rank: $0, size: 2, strategy: strategy, paired: paired) }
        let world = NonAllocatingWorld<S>(size: 2, capacity: 1 << 16)
        let errors = UnsafeMutablePointer<Int>.allocate(capacity: 2)
        errors.initialize(repeating: 0, count: 2)
        defer { errors.deallocate() }
        let result = UnsafeMutablePointer<Int64>.allocate(capacity: 1)
        defer { result.deallocate() }
        nonisolated(unsafe) let shared = (ranks: ranks, errors: errors, result: result)
        let group = DispatchGroup()
        for r in 0..<2 {
            group.enter()
            Thread.detachNewThread {
                defer { group.leave() }
                let me = shared.ranks[r]
                func oneStep() throws {
                    try me.record()
                    try world.exchange(me.opt, rank: r, gathered: gathered)
                    try me.step()
                }
                do {
                    for _ in 0..<4 { try oneStep() }
                    world.barrier()
                    if r == 0 { allocation_counter_start() }
                    world.barrier()
                    for _ in 0..<6 { try oneStep() }
                    world.barrier()
                    if r == 0 { shared.result.pointee = allocation_counter_stop() - allocation_counter_openblas() }
                    world.barrier()
                } catch {
                    shared.errors[r] = 1
                }
            }
        }
        group.wait()
        XCTAssertEqual(errors[0] + errors[1], 0, "a rank failed")
        XCTAssertEqual(result.pointee, 0, "\(S.self) \(strategy) gathered \(gathered) paired \(paired): \(result.pointee) allocations outside OpenBLAS in 6 synchronized steps")
    }

    func testSynchronizedStepsDoNotAllocate() throws {
        let blasThreads = openblas_get_num_threads()
        defer { openblas_set_num_threads(blasThreads) }
        openblas_set_num_threads(1)
        for strategy in [InverseStrategy.cholesky, .eigen, .ekfac] {
            for gathered in [false, true] {
                try synchronized(Float.self, strategy, gathered: gathered, paired: strategy == .ekfac)
                try synchronized(Double.self, strategy, gathered: gathered, paired: strategy == .ekfac)
            }
        }
    }
}



