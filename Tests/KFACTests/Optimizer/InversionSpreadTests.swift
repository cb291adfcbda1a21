import XCTest
@testable import KFAC

/// `inverseSpread`: each block is re-inverted at the steps of its phase, from the factors of
/// that step. The oracle keeps every step's running factors and forms each block's direction
/// densely from the factors of the step whose inverse the block should hold.
final class InversionSpreadTests: XCTestCase {
    /// Five dense layers of decreasing cost Σ d³: 8³+6³ = 728, 6³+5³ = 341, 6³+4³ = 280,
    /// 4³+3³ = 91, 4³+2³ = 72.
    static let shapes: [(inF: Int, outF: Int, bias: Bool)] = [(7, 6, true), (6, 5, false), (5, 4, true), (4, 3, false), (3, 2, true)]

    /// Longest processing time into Ti = 3 phases, worked by hand: 728 → 0; 341 → 1; 280 → 2;
    /// 91 → 2 (loads 728, 341, 280); 72 → 1 (loads 728, 341, 371).
    func testPhasesAreLongestProcessingTimeFirst() throws {
        let opt = try makeOptimizer(Double.self, strategy: .eigen, period: 3, spread: true)
        opt.spread.prepare(opt.estimator.blocks, period: 3)
        XCTAssertEqual(opt.spread.phase, [0, 1, 2, 2, 1])
        opt.spread.prepare(opt.estimator.blocks, period: 2)
        XCTAssertEqual(opt.spread.phase, [0, 1, 1, 1, 1])  // 728 | 341 + 280 + 91 + 72 = 784
        opt.spread.prepare(opt.estimator.blocks, period: 8)  // more phases than blocks: one each
        XCTAssertEqual(opt.spread.phase, [0, 1, 2, 3, 4])
    }

    func testDirectionsUseTheInversesOfEachBlocksPhase() throws {
        for strategy in InverseStrategy.allCases {
            try spreadRun(Float.self, strategy)
            try spreadRun(Double.self, strategy)
        }
    }

    private func makeOptimizer<S: KFACScalar>(_: S.Type, strategy: InverseStrategy, period: Int, spread: Bool) throws -> KFACOptimizer<S> {
        let opt = try KFACOptimizer<S>()
        for s in Self.shapes { try opt.addDense(inFeatures: s.inF, outFeatures: s.outF, hasBias: s.bias) }
        var p = opt.parameters
        p.inverseStrategy = strategy; p.inverseUpdatePeriod = period; p.inverseSpread = spread
        p.factorUpdatePeriod = 1; p.factorDecay = 0.6; p.damping = 0.05; p.klClip = 0
        try opt.setParameters(p)
        return opt
    }

    /// Ti = 3, phases [0, 1, 2, 2, 1]: at step k block b holds the inverse of the factors of
    /// the last step k' ≤ k with k' ≡ phase(b) mod 3 (step 0 inverts every block: none has an
    /// inverse yet). A step that fails in between changes nothing.
    private func spreadRun<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy) throws {
        let period = 3, phase = [0, 1, 2, 2, 1], damping = 0.05
        let opt = try makeOptimizer(S.self, strategy: strategy, period: period, spread: true)
        var random = SeededRandom(77)
        var factors: [[(a: Dense, g: Dense)]] = []  // per step, per layer: running factors after the step
        for k in 0..<9 {
            for (l, s) in Self.shapes.enumerated() {
                let rows = 4 + k % 3
                try opt.recordInputs(layer: l, random.array(rows * s.inF) as [S], rows: rows)
                try opt.recordOutputGradients(layer: l, random.array(rows * s.outF) as [S], rows: rows)
            }
            let grads = Self.shapes.map { s in
                LayerGradient<S>(weight: random.array(s.inF * s.outF), bias: s.bias ? random.array(s.outF) : nil)
            }
            if k == 4 {  // a failed step: nothing folded, inverted or counted
                var bad = grads
                bad[2].weight[0] = .nan
                XCTAssertThrowsError(try opt.step(&bad))
                XCTAssertEqual(opt.stepCount, 4)
            }
            var out = grads
            try opt.step(&out)
            factors.append(try Self.shapes.indices.map { l in
                let f = try opt.factors(layer: l)
                let (da, dg) = (Self.shapes[l].inF + (Self.shapes[l].bias ? 1 : 0), Self.shapes[l].outF)
                return (Dense(rows: da, columns: da, f.a), Dense(rows: dg, columns: dg, f.g))
            })
            for (l, s) in Self.shapes.enumerated() {
                let source = k < phase[l] ? 0 : k - (k - phase[l]) % period
                let v = parameterMatrix(weight: grads[l].weight, bias: grads[l].bias, out: s.outF, inFeatures: s.inF)
                let expected = expectedDirection(a: factors[source][l].a, g: factors[source][l].g, v: v,
                                                 damping: damping, strategy: strategy)
                let actual = parameterMatrix(weight: out[l].weight, bias: out[l].bias, out: s.outF, inFeatures: s.inF)
                assertClose(actual, expected, tolerance(S.self), "\(S.self) \(strategy) step \(k) layer \(l) (inverse of step \(source))")
            }
        }
    }

    /// Ti = 1 spreads nothing, and an explicit update_inverses inverts every block: both give
    /// the directions of the unspread schedule exactly.
    func testSpreadOffAndPeriodOneAreIdentical() throws {
        for strategy in InverseStrategy.allCases {
            let off = try makeOptimizer(Double.self, strategy: strategy, period: 1, spread: false)
            let on = try makeOptimizer(Double.self, strategy: strategy, period: 1, spread: true)
            var random = SeededRandom(3)
            for _ in 0..<4 {
                for (l, s) in Self.shapes.enumerated() {
                    let x: [Double] = random.array(5 * s.inF), g: [Double] = random.array(5 * s.outF)
                    for opt in [off, on] {
                        try opt.recordInputs(layer: l, x, rows: 5)
                        try opt.recordOutputGradients(layer: l, g, rows: 5)
                    }
                }
                let grads = Self.shapes.map { s in
                    LayerGradient<Double>(weight: random.array(s.inF * s.outF), bias: s.bias ? random.array(s.outF) : nil)
                }
                var a = grads, b = grads
                try off.step(&a)
                try on.step(&b)
                XCTAssertEqual(a, b, "\(strategy)")
            }
        }
    }
}
