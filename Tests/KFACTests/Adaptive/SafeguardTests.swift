import XCTest
@testable import KFAC

/// The adaptive mode's safeguards (`dampingMin`, `factorDampingRatio`): the runaways they stop,
/// shown with the safeguard off and on.
final class SafeguardTests: XCTestCase {
    /// Scripted reports with ρ = 0.9 every time (the model always right): without a floor the
    /// Levenberg–Marquardt rule halves λ at every report, 1e-6 → 1e-6 / 2^20 ≈ 9.5e-13; with
    /// λ_min = 1e-8 it stops there, and moves again when ρ falls.
    func testDampingFloorStopsTheCollapse() throws {
        func run(floor: Double, start: Double = 1e-6, ratios: [Double]) throws -> [Double] {
            let opt = try KFACOptimizer<Double>()
            try opt.addDense(inFeatures: 2, outFeatures: 2, hasBias: false)
            var p = opt.parameters
            p.lmInterval = 1; p.lmDecay = 0.5; p.damping = start; p.klClip = 0; p.dampingMin = floor
            try opt.setParameters(p)
            let x: [Double] = [1, 0.5, -0.3, 0.8], g: [Double] = [0.2, -0.4, 0.5, 0.1]
            var lambdas: [Double] = []
            for ratio in ratios {
                try opt.recordInputs(layer: 0, x, rows: 2)
                try opt.recordOutputGradients(layer: 0, g, rows: 2)
                var grads = [LayerGradient<Double>(weight: [0.3, -0.2, 0.1, 0.4], bias: nil)]
                try opt.step(&grads)
                let outputs: [Double] = [0.1, 0.2, -0.1, 0.3], jd: [Double] = [0.5, -0.2, 0.3, 0.1]
                let m = try opt.solveStepSize(outputs: outputs, directionProducts: jd, previousProducts: nil, rows: 2, dim: 2,
                                              distribution: .gaussian).predictedChange
                try opt.reportLossChange(before: 1, after: 1 + ratio * m)
                lambdas.append(opt.parameters.damping)
            }
            return lambdas
        }
        let good = [Double](repeating: 0.9, count: 20)
        let off = try run(floor: 0, ratios: good)
        XCTAssertEqual(off.last!, 1e-6 / 1_048_576, accuracy: 1e-24, "no floor: λ collapses")
        let on = try run(floor: 1e-8, ratios: good + [0.1, 0.9])
        XCTAssertEqual(Array(on[0..<6]), Array(off[0..<6]), "above the floor: the same λ, bit for bit")
        XCTAssertEqual(on[6], 1e-8, "1e-6 / 2^7 < 1e-8: stopped at the floor")
        XCTAssertEqual(on[19], 1e-8)
        XCTAssertEqual(on[20], 2e-8, "ρ < 1/4 raises λ from the floor")
        XCTAssertEqual(on[21], 1e-8)
        let below = try run(floor: 1e-8, start: 1e-9, ratios: [0.9, 0.1])
        XCTAssertEqual(below, [1e-9, 2e-9], "a λ set below the floor is not raised by a good ρ")
    }


    /// A deterministic adaptive run with λ = γ0 = 100 fixed and a γ step every step (ω₂ = 0.5),
    /// whose recorded statistics do not match the batch's Fisher (as a curvature estimate gone
    /// stale or noisy): the model keeps preferring the candidate nearer the gradient, and
    /// without the band γ climbs to 2^7 λ in 12 steps (and on: nothing bounds it). With r = 10
    /// it stays within [λ/10, 10 λ]. Returns γ after each step's solve.
    private func gammaTrace(ratio: Double, steps: Int = 12) throws -> [Double] {
        var random = SeededRandom(91)
        let (n, inF, out) = (16, 3, 4)
        let net = LinearSoftmaxOracle(inputs: (0..<n).map { _ in (0..<inF).map { _ in random.uniform() } },
                          labels: (0..<n).map { ($0 * 7) % out }, out: out)
        let opt = try KFACOptimizer<Double>()
        try opt.addDense(inFeatures: inF, outFeatures: out, hasBias: true)
        var p = opt.parameters
        p.klClip = 0; p.damping = 100; p.factorDamping = 100; p.factorDecay = 0.5
        p.inverseUpdatePeriod = 1; p.factorDampingPeriod = 1; p.factorDampingDecay = 0.5; p.lmInterval = 0
        p.factorDampingRatio = ratio
        try opt.setParameters(p)
        var theta = Dense(rows: out, columns: inF + 1)
        for i in theta.values.indices { theta.values[i] = 0.3 * random.uniform() }
        var previous: Dense?
        var trace: [Double] = []
        for _ in 0..<steps {
            try opt.recordInputs(layer: 0, net.inputs.flatMap { $0 }, rows: n)
            // Statistics that do not match this batch's Fisher (a curvature estimate gone stale).
            try opt.recordOutputGradients(layer: 0, (0..<(n * out)).map { i in i % out == 0 ? 3 * random.uniform() : 0.01 * random.uniform() }, rows: n)
            let grad = net.gradient(theta)
            var grads = [LayerGradient<Double>(weight: (0..<out).flatMap { o in (0..<inF).map { grad[o, $0] } },
                                               bias: (0..<out).map { grad[$0, inF] })]
            try opt.step(&grads)
            let products: [[Double]] = try (0..<opt.candidateCount).map { j in
                let d = try opt.candidateDirections(j).directions[0]
                return net.products(parameterMatrix(weight: d.weight, bias: d.bias, out: out, inFeatures: inF))
            }
            let outputs = (0..<n).flatMap { net.logits(theta, $0) }
            let jp = previous.map { net.products($0) }
            let all = products.flatMap { $0 }, size = n * out
            _ = try all.withUnsafeBufferPointer { a in
                try outputs.withUnsafeBufferPointer { o in
                    try (jp ?? []).withUnsafeBufferPointer { b in
                        try opt.solveStepSize(outputs: o.baseAddress, candidateProducts: { a.baseAddress! + $0 * size },
                                              candidateCount: products.count, previousProducts: jp == nil ? nil : b.baseAddress,
                                              rows: n, dim: out, distribution: .categorical)
                    }
                }
            }
            let u = try opt.update()[0]
            let update = parameterMatrix(weight: u.weight, bias: u.bias, out: out, inFeatures: inF)
            let before = net.loss(theta)
            theta = theta + update
            try opt.reportLossChange(before: before, after: net.loss(theta))
            previous = update
            trace.append(opt.parameters.factorDamping)
        }
        return trace
    }

    func testFactorDampingBandStopsTheDrift() throws {
        let off = try gammaTrace(ratio: 1e300)
        XCTAssertEqual(Array(off[0..<9]), [200, 400, 800, 1600, 1600, 3200, 3200, 6400, 6400], "no band: γ drifts up")
        // From step 10 two candidates' M(δ) nearly tie, and which wins depends on the BLAS kernels'
        // rounding (12800 then 6400 on two machines, 6400 twice on a Zen 4); either way γ stays up.
        XCTAssertTrue(off[9...].allSatisfy { $0 >= 6400 }, "no band: γ stays drifted: \(off)")
        XCTAssertEqual(off.last, 12800)
        let on = try gammaTrace(ratio: 10)
        XCTAssertEqual(Array(on[0..<3]), Array(off[0..<3]), "inside the band: the same γ, bit for bit")
        XCTAssertEqual(on.max(), 800, "γ·2 = 1600 > λ·r is dropped at every γ step: \(on)")
        XCTAssertGreaterThanOrEqual(on.min()!, 10)
    }

    /// A γ set far outside the band is brought to its edge by the next γ step, which uses that
    /// value for its own directions (candidate 0); a step that is not a γ step leaves it.
    func testGammaStepBringsFactorDampingIntoTheBand() throws {
        var problem = TwoLayerProblem<Double>(seed: 12)
        let opt = try problem.makeOptimizer {
            $0.klClip = 0; $0.damping = 0.01; $0.factorDamping = 50; $0.factorDampingPeriod = 2; $0.factorDampingRatio = 100
        }
        try problem.record(opt, problem.batch(rows: 5), rows: 5)
        var grads = problem.gradients()
        try opt.step(&grads)
        XCTAssertEqual(opt.parameters.factorDamping, 1, "γ step: 50 → λ·r = 1")
        XCTAssertEqual(try opt.candidateDirections(0).factorDamping, 1)
        XCTAssertEqual(opt.candidateCount, 2, "γ/ω₂ > λ·r is dropped")
        var p = opt.parameters
        p.factorDamping = 1e-6
        try opt.setParameters(p)
        try problem.record(opt, problem.batch(rows: 5), rows: 5)
        try opt.step(&grads)
        XCTAssertEqual(opt.parameters.factorDamping, 1e-6, "not a γ step: γ as set")
    }
}
