import AllocationCounter
import CBLAS
import XCTest
@testable import KFAC

/// After warm-up, a training step — recording statistics, folding them, inverting (in parallel)
/// and preconditioning — makes no heap allocation, in either precision and inverse strategy.
final class AllocationTests: XCTestCase {
    func testSteadyStateStepDoesNotAllocate() throws {
        // Both inversion paths: OpenBLAS threaded (inversions one after the other) and OpenBLAS
        // single-threaded (inversions on the worker pool).
        let blasThreads = openblas_get_num_threads()
        defer { openblas_set_num_threads(blasThreads) }
        for threads in [blasThreads, 1] {
            openblas_set_num_threads(threads)
            for strategy in InverseStrategy.allCases {
                try steadyState(Float.self, strategy)
                try steadyState(Double.self, strategy)
            }
        }
    }

    private func steadyState<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy) throws {
        var problem = TwoLayerProblem<S>(seed: 31)
        let opt = try problem.makeOptimizer {
            $0.inverseStrategy = strategy; $0.inverseUpdatePeriod = 2; $0.threadCount = 2
        }
        let batch = problem.batch(rows: 8)
        // Gradient buffers the trainer owns; their contents are irrelevant to allocation.
        let g = problem.gradients()
        let w0 = UnsafeMutablePointer<S>.allocate(capacity: g[0].weight.count)
        let b0 = UnsafeMutablePointer<S>.allocate(capacity: g[0].bias!.count)
        let w1 = UnsafeMutablePointer<S>.allocate(capacity: g[1].weight.count)
        defer { w0.deallocate(); b0.deallocate(); w1.deallocate() }
        func oneStep() throws {
            for l in batch.indices {
                let d = batch[l]
                try d.x.withUnsafeBufferPointer { try opt.recordInputs(layer: l, $0.baseAddress, rows: 8) }
                try d.g.withUnsafeBufferPointer { try opt.recordOutputGradients(layer: l, $0.baseAddress, rows: 8) }
            }
            w0.update(from: g[0].weight, count: g[0].weight.count)
            b0.update(from: g[0].bias!, count: g[0].bias!.count)
            w1.update(from: g[1].weight, count: g[1].weight.count)
            try opt.step { l in
                l == 0 ? ParameterGradient(weight: w0, bias: b0) : ParameterGradient(weight: w1, bias: nil)
            }
        }
        for _ in 0..<4 { try oneStep() }  // warm-up: buffers, staging inverses, workspaces
        allocation_counter_start()
        for _ in 0..<6 { try oneStep() }  // includes three inversion steps
        let count = allocation_counter_stop()
        XCTAssertEqual(count, 0, "\(S.self) \(strategy): \(count) allocations in 6 steady-state steps")
    }
}
