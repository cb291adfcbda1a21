import XCTest
@testable import KFAC

/// Products with the damped curvature at a power (`multiply(power:)`, `denseMatrix(power:)`)
/// against explicit Kronecker matrices built here from the copied factors, for every block
/// kind and both inverse strategies, in Float and Double.
final class CurvatureProductTests: XCTestCase {
    func testForwardProductMatchesExplicitDampedKronecker() throws {
        try Float.checkForwardProductMatchesExplicitDampedKronecker()
        try Double.checkForwardProductMatchesExplicitDampedKronecker()
    }

    func testForwardThenInverseProductIsIdentity() throws {
        try Float.checkForwardThenInverseProductIsIdentity()
        try Double.checkForwardThenInverseProductIsIdentity()
    }

    func testDenseMatrixIsExplicitDampedKronecker() throws {
        try Float.checkDenseMatrixIsExplicitDampedKronecker()
        try Double.checkDenseMatrixIsExplicitDampedKronecker()
    }
}

/// One block kind: its layer, and how a group's gradient matrix [W_g | b_g] (in the factors'
/// order) is read from the layer's parameter buffers.
struct ProductCase {
    var name: String
    var layer: LayerDescription
    var inputValues: Int, outputValues: Int
    var weightCount: Int, outFeatures: Int, hasBias: Bool, groups: Int
    var matrix: (_ weight: [Double], _ bias: [Double]?, _ group: Int) -> Dense

    static func dense(_ inF: Int, _ outF: Int, grouping: ChannelGrouping = .init()) -> ProductCase {
        ProductCase(name: "dense \(inF)→\(outF) grouped \(grouping.inputGroupSize)/\(grouping.outputGroupSize)",
                    layer: .dense(inFeatures: inF, outFeatures: outF, hasBias: true, grouping: grouping),
                    inputValues: inF, outputValues: outF, weightCount: inF * outF, outFeatures: outF, hasBias: true, groups: 1,
                    matrix: { w, b, _ in parameterMatrix(weight: w, bias: b, out: outF, inFeatures: inF) })
    }

    static func conv(_ s: ConvCase, _ approximation: ConvApproximation) -> ProductCase {
        let g = Conv2dGeometry(inChannels: s.inChannels, outChannels: s.outChannels, kernel: (s.kernelHeight, s.kernelWidth),
                               stride: (s.strideHeight, s.strideWidth), padding: (s.paddingHeight, s.paddingWidth),
                               groups: s.groups, hasBias: s.hasBias, input: (s.inputHeight, s.inputWidth))
        return ProductCase(name: "\(s) \(approximation)", layer: .conv2d(g, approximation: approximation, grouping: .init()),
                           inputValues: s.inputCount, outputValues: s.outputCount, weightCount: s.weightCount,
                           outFeatures: s.outChannels, hasBias: s.hasBias, groups: s.groups,
                           matrix: { w, b, group in ConvOracle.parameterMatrix(weight: w, bias: b, s, group: group) })
    }

    static var all: [ProductCase] {
        [.dense(5, 4),
         .dense(7, 5, grouping: ChannelGrouping(inputGroupSize: 3, outputGroupSize: 2)),
         .conv(ConvCase(inChannels: 2, outChannels: 3, kernel: (2, 2), padding: (1, 0), input: (4, 3)), .kfc),
         .conv(ConvCase(inChannels: 3, outChannels: 2, kernel: (2, 2), stride: (2, 1), input: (4, 4)), .sua),
         .conv(ConvCase(inChannels: 4, outChannels: 4, kernel: (1, 2), groups: 2, input: (3, 3)), .kfc)]
    }
}

extension KFACScalar {
    static var productTolerance: Double { tolerance(Self.self) }

    /// An optimizer with one layer of `c`, factors from random statistics and inverses of
    /// `strategy`, λ = 0.1 (factored damping with π).
    static func productProblem(_ c: ProductCase, _ strategy: InverseStrategy, seed: UInt64) throws -> (KFACOptimizer<Self>, SeededRandom) {
        var random = SeededRandom(seed)
        let opt = try KFACOptimizer<Self>()
        switch c.layer {
        case .dense(let i, let o, let bias, let grouping): try opt.addDense(inFeatures: i, outFeatures: o, hasBias: bias, grouping: grouping)
        case .conv2d(let g, let approximation, let grouping): try opt.addConv2d(g, approximation: approximation, grouping: grouping)
        }
        var p = opt.parameters
        p.inverseStrategy = strategy; p.damping = 0.1; p.factorDamping = 0; p.piDamping = true
        try opt.setParameters(p)
        let rows = 6
        try opt.recordInputs(layer: 0, random.array(rows * c.inputValues) as [Self], rows: rows)
        try opt.recordOutputGradients(layer: 0, random.array(rows * c.outputValues, scale: 2) as [Self], rows: rows)
        try opt.updateFactors()
        try opt.updateInverses()
        return (opt, random)
    }

    /// The damped matrix the strategy inverts, from the copied factors of group `group`:
    /// A ⊗ G + λI (eigen) or (A + π√λ I) ⊗ (G + √λ/π I) (Cholesky).
    static func explicitCurvature(_ opt: KFACOptimizer<Self>, group: Int) throws -> Dense {
        let (a, g) = try opt.factors(layer: 0, group: group)
        let da = Int(Double(a.count).squareRoot()), dg = Int(Double(g.count).squareRoot())
        let A = Dense(rows: da, columns: da, a), G = Dense(rows: dg, columns: dg, g)
        let lambda = opt.parameters.inverseDamping
        switch opt.parameters.inverseStrategy {
        case .eigen, .ekfac:  // EKFAC without paired recording: S = d_G d_Aᵀ
            return kronecker(A, G) + lambda * Dense.identity(da * dg)
        case .cholesky:
            let pi = ((A.trace / Double(da)) / (G.trace / Double(dg))).squareRoot()
            return kronecker(A + (pi * lambda.squareRoot()) * Dense.identity(da), G + (lambda.squareRoot() / pi) * Dense.identity(dg))
        }
    }

    /// Applies `power` to a random parameter vector through `multiply(layer:)`; returns the
    /// vector before and after, as arrays.
    static func multiplied(_ opt: KFACOptimizer<Self>, _ c: ProductCase, _ w: [Self], _ b: [Self]?,
                           powers: [CurvaturePower]) throws -> (weight: [Self], bias: [Self]?) {
        var w = w, b = b
        for power in powers {
            try w.withUnsafeMutableBufferPointer { pw in
                if b != nil {
                    try b!.withUnsafeMutableBufferPointer { pb in
                        try opt.multiply(layer: 0, weight: pw.baseAddress!, bias: pb.baseAddress!, power: power)
                    }
                } else {
                    try opt.multiply(layer: 0, weight: pw.baseAddress!, bias: nil, power: power)
                }
            }
        }
        return (w, b)
    }

    static func checkForwardProductMatchesExplicitDampedKronecker() throws {
        for c in ProductCase.all {
            for strategy in InverseStrategy.allCases {
                var (opt, random) = try productProblem(c, strategy, seed: 71)
                let w: [Self] = random.array(c.weightCount), b: [Self]? = c.hasBias ? random.array(c.outFeatures) : nil
                let u = try multiplied(opt, c, w, b, powers: [.one])
                for group in 0..<c.groups {
                    let v = c.matrix(w.map(Double.init), b?.map(Double.init), group)
                    let m = try explicitCurvature(opt, group: group)
                    let expected = unvec(times(m, vec(v)), rows: v.rows, columns: v.columns)
                    assertClose(c.matrix(u.weight.map(Double.init), u.bias?.map(Double.init), group), expected, productTolerance,
                                "\(Self.self) \(strategy) \(c.name) group \(group): (damped A ⊗ G) v")
                }
            }
        }
    }

    static func checkForwardThenInverseProductIsIdentity() throws {
        for c in ProductCase.all {
            for strategy in InverseStrategy.allCases {
                var (opt, random) = try productProblem(c, strategy, seed: 72)
                let w: [Self] = random.array(c.weightCount), b: [Self]? = c.hasBias ? random.array(c.outFeatures) : nil
                let u = try multiplied(opt, c, w, b, powers: [.one, .inverse])
                for group in 0..<c.groups {
                    assertClose(c.matrix(u.weight.map(Double.init), u.bias?.map(Double.init), group),
                                c.matrix(w.map(Double.init), b?.map(Double.init), group), productTolerance,
                                "\(Self.self) \(strategy) \(c.name) group \(group): inverse after forward")
                }
            }
        }
    }

    static func checkDenseMatrixIsExplicitDampedKronecker() throws {
        for c in ProductCase.all {
            for strategy in InverseStrategy.allCases {
                let (opt, _) = try productProblem(c, strategy, seed: 73)
                let settings = opt.parameters.curvatureSettings
                for group in 0..<c.groups {
                    let m = try explicitCurvature(opt, group: group)
                    let one = Dense(rows: m.rows, columns: m.columns,
                                    try opt.estimator.denseMatrix(layer: 0, group: group, power: .one, settings))
                    assertClose(one, m, productTolerance, "\(Self.self) \(strategy) \(c.name) group \(group): dense matrix")
                    let inverse = Dense(rows: m.rows, columns: m.columns,
                                        try opt.estimator.denseMatrix(layer: 0, group: group, power: .inverse, settings))
                    assertClose(product(m, inverse), Dense.identity(m.rows), productTolerance,
                                "\(Self.self) \(strategy) \(c.name) group \(group): explicit matrix times dense inverse")
                }
            }
        }
    }
}

func times(_ m: Dense, _ v: [Double]) -> [Double] {
    (0..<m.rows).map { i in (0..<m.columns).reduce(0.0) { $0 + m[i, $1] * v[$1] } }
}

func product(_ a: Dense, _ b: Dense) -> Dense {
    var c = Dense(rows: a.rows, columns: b.columns)
    for i in 0..<a.rows { for k in 0..<a.columns { let x = a[i, k]; for j in 0..<b.columns { c[i, j] += x * b[k, j] } } }
    return c
}
