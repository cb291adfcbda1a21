import XCTest
@testable import KFAC

/// Tolerances a correct implementation meets and a wrong formula does not: relative to the
/// largest entry, a few hundred ulps of the precision.
func tolerance<S: KFACScalar>(_: S.Type) -> Double { S.self == Float.self ? 1e-4 : 1e-10 }

func assertClose(_ actual: Dense, _ expected: Dense, _ tol: Double, _ message: String,
                 file: StaticString = #filePath, line: UInt = #line) {
    XCTAssertEqual(actual.rows, expected.rows, message, file: file, line: line)
    XCTAssertEqual(actual.columns, expected.columns, message, file: file, line: line)
    let scale = max(1, expected.maxAbs)
    let err = actual.maxAbsDifference(expected) / scale
    XCTAssertLessThan(err, tol, "\(message): relative error \(err)", file: file, line: line)
}

/// A two-layer problem: layer 0 dense 5→4 with bias, layer 1 dense 4→3 without.
struct TwoLayerProblem<S: KFACScalar> {
    static var shapes: [(inF: Int, outF: Int, bias: Bool)] { [(5, 4, true), (4, 3, false)] }
    var random: SeededRandom

    init(seed: UInt64) { random = SeededRandom(seed) }

    func makeOptimizer(_ configure: (inout KFACParameters) -> Void = { _ in }) throws -> KFACOptimizer<S> {
        let opt = try KFACOptimizer<S>()
        for s in Self.shapes { try opt.addDense(inFeatures: s.inF, outFeatures: s.outF, hasBias: s.bias) }
        var p = opt.parameters
        configure(&p)
        try opt.setParameters(p)
        return opt
    }

    /// A batch of inputs and output gradients for every layer.
    mutating func batch(rows: Int) -> [(x: [S], g: [S])] {
        Self.shapes.map { s in (random.array(rows * s.inF), random.array(rows * s.outF)) }
    }

    mutating func gradients() -> [LayerGradient<S>] {
        Self.shapes.map { s in LayerGradient(weight: random.array(s.inF * s.outF), bias: s.bias ? random.array(s.outF) : nil) }
    }

    func record(_ opt: KFACOptimizer<S>, _ b: [(x: [S], g: [S])], rows: Int) throws {
        for (l, d) in b.enumerated() {
            try opt.recordInputs(layer: l, d.x, rows: rows)
            try opt.recordOutputGradients(layer: l, d.g, rows: rows)
        }
    }
}
