import AllocationCounter
import CBLAS
import XCTest
@testable import KFAC

/// After warm-up, a training step — recording statistics, folding them, inverting (in parallel)
/// and preconditioning — makes no heap allocation, in either precision and inverse strategy.
/// Allocations made inside OpenBLAS (its threaded dispatch and some small-matrix kernels allocate
/// per call) are told apart by their call stacks and not counted against the library.
final class AllocationTests: XCTestCase {
    func testSteadyStateStepDoesNotAllocate() throws {
        // Both inversion paths: OpenBLAS threaded (inversions one after the other) and OpenBLAS
        // single-threaded (inversions on the worker pool).
        let blasThreads = openblas_get_num_threads()
        defer { openblas_set_num_threads(blasThreads) }
        for threads in [blasThreads, 1] {
            openblas_set_num_threads(threads)
            for strategy in InverseStrategy.allCases {
                for spread in [false, true] {  // spread: one layer inverted per step
                    try steadyState(Float.self, strategy, spread: spread)
                    try steadyState(Double.self, strategy, spread: spread)
                }
                for mode in [AsyncInversion.newest, .deterministic] where strategy != .ekfac {  // background inversion
                    try steadyState(Float.self, strategy, async: mode)
                    try steadyState(Double.self, strategy, async: mode)
                }
            }
            // EKFAC with paired recording, both modes, sequences of 2 rows.
            for mode in EKFACMode.allCases {
                try steadyState(Float.self, .ekfac, paired: mode)
                try steadyState(Double.self, .ekfac, paired: mode)
            }
        }
    }

    private func steadyState<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy, spread: Bool = false,
                                            paired: EKFACMode? = nil, async: AsyncInversion = .off) throws {
        var problem = TwoLayerProblem<S>(seed: 31)
        let opt = try problem.makeOptimizer {
            $0.inverseStrategy = strategy; $0.inverseUpdatePeriod = 2; $0.threadCount = 2; $0.inverseSpread = spread
            $0.asyncInversion = async
            if let paired { $0.ekfacMode = paired }
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
                if paired != nil {
                    try d.x.withUnsafeBufferPointer { x in
                        try d.g.withUnsafeBufferPointer { g in
                            try opt.recordExamples(layer: l, inputs: x.baseAddress, outputGradients: g.baseAddress, rows: 8, rowsPerExample: 2)
                        }
                    }
                    continue
                }
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
        // Warm-up: buffers, staging inverses, workspaces; with background inversion also the
        // snapshots, the thread and the runtime's first use of each path of the schedule (a
        // due step that finds work pending, a newest-mode step that commits finished work).
        for _ in 0..<(async == .off ? 4 : 8) { try oneStep() }
        opt.waitForBackgroundInversion()
        allocation_counter_start()
        for _ in 0..<6 { try oneStep() }  // includes three inversion steps
        let count = allocation_counter_stop(), openblas = allocation_counter_openblas()
        XCTAssertEqual(count - openblas, 0, "\(S.self) \(strategy) spread \(spread) async \(async) paired \(paired.map { "\($0)" } ?? "no"): \(count - openblas) allocations outside OpenBLAS in 6 steady-state steps")
    }
}

extension AllocationTests {
    /// The same for convolutions: KFC with groups, SUA with channel grouping, channels-last.
    func testSteadyStateConvolutionStepDoesNotAllocate() throws {
        let blasThreads = openblas_get_num_threads()
        defer { openblas_set_num_threads(blasThreads) }
        for threads in [blasThreads, 1] {
            openblas_set_num_threads(threads)
            for strategy in InverseStrategy.allCases {
                try convolutionSteadyState(Float.self, strategy)
                try convolutionSteadyState(Double.self, strategy)
            }
            for mode in EKFACMode.allCases {
                try convolutionSteadyState(Float.self, .ekfac, paired: mode)
                try convolutionSteadyState(Double.self, .ekfac, paired: mode)
            }
        }
    }

    private func convolutionSteadyState<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy, paired: EKFACMode? = nil) throws {
        var random = SeededRandom(41)
        let layers = [
            (Conv2dGeometry(inChannels: 4, outChannels: 6, kernel: (3, 3), padding: (1, 1), groups: 2, input: (5, 5)),
             ConvApproximation.kfc, ChannelGrouping()),
            (Conv2dGeometry(inChannels: 6, outChannels: 4, kernel: (2, 3), stride: (2, 1), hasBias: false, input: (5, 5),
                            layout: .channelsLast),
             ConvApproximation.sua, ChannelGrouping(inputGroupSize: 4, outputGroupSize: 3)),
        ]
        let opt = try KFACOptimizer<S>()
        var p = opt.parameters
        p.inverseStrategy = strategy
        p.inverseUpdatePeriod = 2
        p.threadCount = 2
        if let paired { p.ekfacMode = paired }
        try opt.setParameters(p)
        let batch = 3
        var inputs: [[S]] = [], outputs: [[S]] = []
        var weights: [UnsafeMutablePointer<S>] = [], biases: [UnsafeMutablePointer<S>?] = []
        for (g, approximation, grouping) in layers {
            try opt.addConv2d(g, approximation: approximation, grouping: grouping)
            inputs.append(random.array(batch * g.inChannels * g.inputHeight * g.inputWidth))
            outputs.append(random.array(batch * g.outChannels * g.outputPositions))
            weights.append(.allocate(capacity: g.outChannels * g.patchSize))
            biases.append(g.hasBias ? .allocate(capacity: g.outChannels) : nil)
        }
        defer {
            weights.forEach { $0.deallocate() }
            biases.forEach { $0?.deallocate() }
        }
        func oneStep() throws {
            for l in layers.indices {
                if paired != nil {
                    try inputs[l].withUnsafeBufferPointer { x in
                        try outputs[l].withUnsafeBufferPointer { g in
                            try opt.recordExamples(layer: l, inputs: x.baseAddress, outputGradients: g.baseAddress, rows: batch)
                        }
                    }
                } else {
                    try inputs[l].withUnsafeBufferPointer { try opt.recordInputs(layer: l, $0.baseAddress, rows: batch) }
                    try outputs[l].withUnsafeBufferPointer { try opt.recordOutputGradients(layer: l, $0.baseAddress, rows: batch) }
                }
                let g = layers[l].0
                for i in 0..<(g.outChannels * g.patchSize) { weights[l][i] = S(i % 7) / 7 - 0.5 }
                if let b = biases[l] { for i in 0..<g.outChannels { b[i] = S(i % 3) / 3 } }
            }
            try opt.step { l in ParameterGradient(weight: weights[l], bias: biases[l]) }
        }
        for _ in 0..<4 { try oneStep() }
        allocation_counter_start()
        for _ in 0..<6 { try oneStep() }
        let count = allocation_counter_stop(), openblas = allocation_counter_openblas()
        // OpenBLAS's small-matrix gemm kernels allocate on their own for some shapes; the rest
        // would be libkfac's.
        XCTAssertEqual(count - openblas, 0, "\(S.self) \(strategy) paired \(paired.map { "\($0)" } ?? "no"): \(count - openblas) allocations outside OpenBLAS in 6 steady-state convolution steps")
    }
}

extension AllocationTests {
    /// The adaptive mode's loop with the re-choice of γ: step, every candidate's directions, the
    /// candidate solve, the update, the loss report — allocation-free after warm-up too.
    func testSteadyStateAdaptiveStepDoesNotAllocate() throws {
        for strategy in InverseStrategy.allCases {
            try adaptiveSteadyState(Float.self, strategy)
            try adaptiveSteadyState(Double.self, strategy)
        }
    }

    private func adaptiveSteadyState<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy) throws {
        var problem = TwoLayerProblem<S>(seed: 32)
        let opt = try problem.makeOptimizer {
            $0.inverseStrategy = strategy; $0.inverseUpdatePeriod = 2; $0.threadCount = 2
            $0.klClip = 0; $0.factorDampingPeriod = 2; $0.lmInterval = 1; $0.damping = 0.1; $0.factorDamping = 0.1
        }
        let (rows, dim) = (8, 3)
        let batch = problem.batch(rows: rows)
        let g = problem.gradients()
        let sizes = TwoLayerProblem<S>.shapes
        let w = sizes.map { UnsafeMutablePointer<S>.allocate(capacity: $0.inF * $0.outF) }
        let b = UnsafeMutablePointer<S>.allocate(capacity: sizes[0].outF)
        let outputs = UnsafeMutablePointer<S>.allocate(capacity: rows * dim)
        let products = (0..<4).map { _ in UnsafeMutablePointer<S>.allocate(capacity: rows * dim) }
        let pointers = UnsafeMutablePointer<UnsafePointer<S>?>.allocate(capacity: 3)
        defer {
            w.forEach { $0.deallocate() }; b.deallocate(); outputs.deallocate()
            products.forEach { $0.deallocate() }; pointers.deallocate()
        }
        var random = SeededRandom(5)
        for i in 0..<(rows * dim) {
            outputs[i] = S(random.uniform())
            for p in products { p[i] = S(random.uniform()) }
        }
        for k in 0..<3 { pointers[k] = UnsafePointer(products[k]) }
        let buffers: (Int) -> ParameterGradient<S> = { l in ParameterGradient(weight: w[l], bias: l == 0 ? b : nil) }
        func oneStep() throws {
            for l in batch.indices {
                let d = batch[l]
                try d.x.withUnsafeBufferPointer { try opt.recordInputs(layer: l, $0.baseAddress, rows: rows) }
                try d.g.withUnsafeBufferPointer { try opt.recordOutputGradients(layer: l, $0.baseAddress, rows: rows) }
            }
            for l in sizes.indices { w[l].update(from: g[l].weight, count: g[l].weight.count) }
            b.update(from: g[0].bias!, count: sizes[0].outF)
            try opt.step(buffers)
            for k in 0..<opt.candidateCount { try opt.copyCandidateDirections(k, into: buffers) }
            let r = try opt.solveStepSize(outputs: outputs, candidateProducts: { pointers[$0] }, candidateCount: opt.candidateCount,
                                          previousProducts: products[3], rows: rows, dim: dim, distribution: .categorical)
            try opt.copyUpdate(into: buffers)
            _ = try opt.reportLossChange(before: 1, after: 1 + 0.5 * r.predictedChange)
        }
        for _ in 0..<4 { try oneStep() }
        allocation_counter_start()
        for _ in 0..<6 { try oneStep() }  // three γ steps
        let count = allocation_counter_stop(), openblas = allocation_counter_openblas()
        XCTAssertEqual(count - openblas, 0, "\(S.self) \(strategy): \(count - openblas) allocations outside OpenBLAS in 6 adaptive steps")
    }
}

extension AllocationTests {
    /// The same with block-tridiagonal links (a 3-layer chain, both pairs linked): recording
    /// (cross rows paired), folding, the two inversion rounds and the chain application.
    func testSteadyStateLinkedStepDoesNotAllocate() throws {
        let blasThreads = openblas_get_num_threads()
        defer { openblas_set_num_threads(blasThreads) }
        for threads in [blasThreads, 1] {
            openblas_set_num_threads(threads)
            try linkedSteadyState(Float.self)
            try linkedSteadyState(Double.self)
        }
    }

    private func linkedSteadyState<S: KFACScalar>(_: S.Type) throws {
        var net = ChainNet<S>(layers: 3, seed: 17)
        let opt = try net.makeOptimizer { $0.inverseUpdatePeriod = 2; $0.factorUpdatePeriod = 1; $0.threadCount = 2 }
        let batch = net.batch(rows: 8)
        let weights = net.shapes.map { s in UnsafeMutablePointer<S>.allocate(capacity: s.inF * s.outF) }
        let biases = net.shapes.map { s in s.bias ? UnsafeMutablePointer<S>.allocate(capacity: s.outF) : nil }
        let counts = net.shapes.map { (weights: $0.inF * $0.outF, outputs: $0.outF) }
        defer { weights.forEach { $0.deallocate() }; biases.forEach { $0?.deallocate() } }
        func oneStep() throws {
            for l in batch.indices {
                try batch[l].x.withUnsafeBufferPointer { try opt.recordInputs(layer: l, $0.baseAddress, rows: 8) }
            }
            // Index loops: a debug build's generic iterators (reversed, enumerated) allocate.
            for l in stride(from: batch.count - 1, through: 0, by: -1) {
                try batch[l].g.withUnsafeBufferPointer { try opt.recordOutputGradients(layer: l, $0.baseAddress, rows: 8) }
            }
            for l in 0..<counts.count {
                weights[l].initialize(repeating: 1, count: counts[l].weights)
                biases[l]?.initialize(repeating: 1, count: counts[l].outputs)
            }
            try opt.step { ParameterGradient(weight: weights[$0], bias: biases[$0]) }
        }
        for _ in 0..<4 { try oneStep() }
        allocation_counter_start()
        for _ in 0..<6 { try oneStep() }
        let count = allocation_counter_stop(), openblas = allocation_counter_openblas()
        XCTAssertEqual(count - openblas, 0, "\(S.self) linked: \(count - openblas) allocations outside OpenBLAS in 6 steady-state steps")
    }
}
