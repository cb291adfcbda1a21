import XCTest
@testable import KFAC

/// Issue 15: an eigensolver failure (injected: no finite data makes LAPACK's syevd fail on
/// demand) retries the block in double precision with LAPACK's QR driver; if that fails too, the
/// update fails with `.eigenFailed` and the committed inverses (and everything else) stay.
final class EigenRetryTests: XCTestCase {
    override func tearDown() {
        EigenFaultInjection.failingAttempts = 0
        super.tearDown()
    }

    private func retry<S: KFACScalar>(_: S.Type) throws {
        var problem = TwoLayerProblem<S>(seed: 41)
        let reference = try problem.makeOptimizer { $0.inverseStrategy = .eigen; $0.inverseUpdatePeriod = 1 }
        let retried = try problem.makeOptimizer { $0.inverseStrategy = .eigen; $0.inverseUpdatePeriod = 1 }
        let batch = problem.batch(rows: 8)
        for o in [reference, retried] { try problem.record(o, batch, rows: 8) }
        let g = problem.gradients()
        var g1 = g, g2 = g
        try reference.step(&g1)
        EigenFaultInjection.failingAttempts = 1
        try retried.step(&g2)
        EigenFaultInjection.failingAttempts = 0
        for (a, b) in zip(g1, g2) {
            for (x, y) in zip(a.weight, b.weight) {
                XCTAssertEqual(Double(x), Double(y), accuracy: 1e3 * tolerance(S.self) * max(1, abs(Double(x))),
                               "\(S.self): the retried decomposition gives the same directions")
            }
        }

        // Both attempts fail: EIGEN_FAILED, and the handle is exactly as before.
        try problem.record(retried, problem.batch(rows: 8), rows: 8)
        let before = try retried.stateImage()
        EigenFaultInjection.failingAttempts = 2
        var g3 = problem.gradients()
        let g3Before = g3
        XCTAssertThrowsError(try retried.step(&g3)) { XCTAssertEqual(($0 as? KFACError)?.status, .eigenFailed) }
        XCTAssertThrowsError(try retried.updateInverses()) { XCTAssertEqual(($0 as? KFACError)?.status, .eigenFailed) }
        EigenFaultInjection.failingAttempts = 0
        XCTAssertEqual(try retried.stateImage(), before, "\(S.self): a failed inversion keeps the last good inverses")
        XCTAssertEqual(g3, g3Before, "no gradient written")
        try retried.step(&g3)  // and once the solver works again, so does the step
    }

    func testEigensolverFailureRetriesInDoublePrecisionThenKeepsTheLastInverse() throws {
        try retry(Float.self)
        try retry(Double.self)
    }
}
