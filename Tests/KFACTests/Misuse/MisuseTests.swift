import XCTest
@testable import KFAC

/// Bad input and wrong call order: the right status, and the optimizer unchanged afterwards.
final class MisuseTests: XCTestCase {

    private func status(_ body: () throws -> Void) -> KFACStatus? {
        do { try body(); return nil } catch { return (error as? KFACError)?.status }
    }

    func testFailedCallsLeaveTheOptimizerAsItWas() throws {
        try failedCallsChangeNothing(Float.self)
        try failedCallsChangeNothing(Double.self)
    }

    private func failedCallsChangeNothing<S: KFACScalar>(_: S.Type) throws {
        var problem = TwoLayerProblem<S>(seed: 23)
        let opt = try problem.makeOptimizer { $0.inverseUpdatePeriod = 2 }
        let twin = try problem.makeOptimizer { $0.inverseUpdatePeriod = 2 }
        for _ in 0..<3 {
            let batch = problem.batch(rows: 4)
            for o in [opt, twin] { try problem.record(o, batch, rows: 4) }
            let grads = problem.gradients()
            var bad = grads
            bad[1].weight[2] = .nan
            XCTAssertEqual(status { try opt.step(&bad) }, .nonFinite)
            var inf = grads
            inf[0].bias![0] = .infinity
            XCTAssertEqual(status { try opt.step(&inf) }, .nonFinite)
            var noBias = grads
            noBias[0].bias = nil
            XCTAssertEqual(status { try opt.step(&noBias) }, .nullPointer)
            var extraBias = grads
            extraBias[1].bias = [1, 2, 3]
            XCTAssertEqual(status { try opt.step(&extraBias) }, .invalidArgument)

            var x: [S] = problem.random.array(4 * 5)
            x[7] = .nan
            XCTAssertEqual(status { try opt.recordInputs(layer: 0, x, rows: 4) }, .nonFinite)
            XCTAssertEqual(status { try opt.recordOutputGradients(layer: 1, [S](repeating: .infinity, count: 3), rows: 1) }, .nonFinite)
            XCTAssertEqual(status { try opt.recordInputs(layer: 2, x, rows: 4) }, .unknownLayer)
            XCTAssertEqual(status { try opt.recordInputs(layer: -1, x, rows: 4) }, .unknownLayer)
            XCTAssertEqual(status { try opt.recordInputs(layer: 0, nil, rows: 4) }, .nullPointer)
            XCTAssertEqual(status { try opt.recordInputs(layer: 0, x, rows: 3) }, .invalidSize)
            XCTAssertEqual(status { try opt.recordInputs(layer: 0, x, rows: 0) }, .invalidSize)
            XCTAssertEqual(status { try opt.recordInputs(layer: 0, UnsafePointer(bitPattern: 64), rows: Int.max) }, .sizeOverflow)
            XCTAssertEqual(status { try opt.set(.damping, -1.0) }, .parameterRange)
            XCTAssertEqual(status { try opt.set(.damping, Double.nan) }, .parameterRange)
            XCTAssertEqual(status { try opt.set(.damping, Int64(1)) }, .parameterType)
            XCTAssertEqual(status { try opt.set(.inverseStrategy, Int64(7)) }, .parameterRange)
            XCTAssertEqual(status { try opt.set(.factorDecay, 1.0) }, .parameterRange)
            XCTAssertEqual(status { try opt.addDense(inFeatures: 2, outFeatures: 2, hasBias: true) }, .layersFrozen)

            var g1 = grads, g2 = grads
            try opt.step(&g1)
            try twin.step(&g2)
            XCTAssertEqual(g1, g2, "\(S.self): a failed call changed what the optimizer computes")
        }
        XCTAssertEqual(try opt.stateImage(), try twin.stateImage())
    }

    func testCallOrderErrors() throws {
        var problem = TwoLayerProblem<Double>(seed: 29)
        let opt = try problem.makeOptimizer()
        var grads = problem.gradients()
        XCTAssertEqual(status { try opt.step(&grads) }, .noStatistics)
        XCTAssertEqual(status { try opt.updateInverses() }, .noStatistics)
        XCTAssertEqual(status { _ = try opt.factors(layer: 0) }, .noStatistics)
        // Inputs alone are not enough.
        let batch = problem.batch(rows: 3)
        for (l, d) in batch.enumerated() { try opt.recordInputs(layer: l, d.x, rows: 3) }
        XCTAssertEqual(status { try opt.step(&grads) }, .noStatistics)
        for (l, d) in batch.enumerated() { try opt.recordOutputGradients(layer: l, d.g, rows: 3) }
        var w = grads[1].weight
        XCTAssertEqual(status { try w.withUnsafeMutableBufferPointer { try opt.precondition(layer: 1, weight: $0.baseAddress!, bias: nil) } },
                       .noStatistics)
        try opt.step(&grads)
        XCTAssertEqual(opt.stepCount, 1)
        XCTAssertEqual(status { try opt.addDense(inFeatures: 1, outFeatures: 1, hasBias: false) }, .layersFrozen)
        let empty = try KFACOptimizer<Float>()
        var none: [LayerGradient<Float>] = []
        XCTAssertEqual(status { try empty.step(&none) }, .invalidSize)
        XCTAssertEqual(status { try empty.addDense(inFeatures: 0, outFeatures: 3, hasBias: true) }, .invalidSize)
        XCTAssertEqual(status { try empty.addDense(inFeatures: 50_000, outFeatures: 3, hasBias: true) }, .sizeOverflow)
    }

    func testParametersByIdentifier() throws {
        let opt = try KFACOptimizer<Float>()
        for p in ParameterID.allCases {
            if p.spec.type == .double {
                XCTAssertEqual(status { _ = try opt.parameters.int(p) }, .parameterType)
            } else {
                XCTAssertEqual(status { _ = try opt.parameters.double(p) }, .parameterType)
            }
        }
        try opt.set(.damping, 0.25)
        try opt.set(.inverseUpdatePeriod, Int64(7))
        try opt.set(.inverseStrategy, Int64(InverseStrategy.cholesky.rawValue))
        XCTAssertEqual(try opt.parameters.double(.damping), 0.25)
        XCTAssertEqual(try opt.parameters.int(.inverseUpdatePeriod), 7)
        XCTAssertEqual(opt.parameters.inverseStrategy, .cholesky)
        XCTAssertEqual(KFACParameters().damping, 1e-3, "documented default")
        XCTAssertEqual(KFACParameters().inverseUpdatePeriod, 10, "documented default")
    }
}

extension MisuseTests {
    /// Finite values whose second moments would overflow are refused at record time, so a fold
    /// can never fail on them later and the handle keeps working.
    func testOverflowingStatisticsAreRefusedWhenRecorded() throws {
        var problem = TwoLayerProblem<Float>(seed: 37)
        let opt = try problem.makeOptimizer()
        let huge = [Float](repeating: 3e37, count: 4 * 5)
        XCTAssertThrowsError(try opt.recordInputs(layer: 0, huge, rows: 4)) {
            XCTAssertEqual(($0 as? KFACError)?.status, .nonFinite)
        }
        // A mean reduction multiplies by the rows: moderate gradients can overflow too.
        try opt.set(.lossReduction, Int64(LossReduction.mean.rawValue))
        let big = [Float](repeating: 1e16, count: 3 * 1000)
        let wide = try KFACOptimizer<Float>()
        try wide.addDense(inFeatures: 2, outFeatures: 3, hasBias: false)
        try wide.set(.lossReduction, Int64(LossReduction.mean.rawValue))
        XCTAssertThrowsError(try wide.recordOutputGradients(layer: 0, big, rows: 1000)) {
            XCTAssertEqual(($0 as? KFACError)?.status, .nonFinite)
        }
        try problem.record(opt, problem.batch(rows: 4), rows: 4)
        var g = problem.gradients()
        try opt.step(&g)
        XCTAssertEqual(opt.stepCount, 1)
    }
}

extension MisuseTests {
    /// A float32 workspace query returns lwork as a float, which rounds down above 2^24: the
    /// library must never ask syevd with less than LAPACK's documented minimum.
    func testEigenWorkspaceIsNeverBelowLAPACKsMinimum() {
        for n in [1, 10, 3000, 4609] {
            let minimum = 1 + 6 * n + 2 * n * n
            XCTAssertGreaterThanOrEqual(Float.symmetricEigenWorkspace(n: n).work, minimum, "n = \(n)")
            XCTAssertGreaterThanOrEqual(Double.symmetricEigenWorkspace(n: n).work, minimum, "n = \(n)")
            XCTAssertGreaterThanOrEqual(Float.symmetricEigenWorkspace(n: n).iwork, 3 + 5 * n)
        }
    }
}

extension MisuseTests {
    /// Sizes whose sums or products overflow are refused with `.sizeOverflow`, never a trap.
    func testOverflowingLayerSizesAreRefused() throws {
        let opt = try KFACOptimizer<Float>()
        XCTAssertEqual(status { try opt.addDense(inFeatures: Int.max, outFeatures: 4, hasBias: true) }, .sizeOverflow)
        XCTAssertEqual(status {
            try opt.addConv2d(Conv2dGeometry(inChannels: 1 << 30, outChannels: 4, kernel: (1 << 30, 1 << 30),
                                             input: (1 << 30, 1 << 30)))
        }, .sizeOverflow)
        XCTAssertEqual(status {
            try opt.addConv2d(Conv2dGeometry(inChannels: 1, outChannels: 4, kernel: (1, 1), padding: (1 << 30, 1 << 30),
                                             input: (1, 1)))
        }, .sizeOverflow)
        // A huge group size means no grouping.
        let layer = try opt.addConv2d(Conv2dGeometry(inChannels: 4, outChannels: 4, kernel: (3, 3), input: (5, 5)),
                                      grouping: ChannelGrouping(inputGroupSize: Int.max, outputGroupSize: Int.max))
        XCTAssertEqual(layer, 0)
        XCTAssertEqual(opt.layerCount, 1)
    }
}
