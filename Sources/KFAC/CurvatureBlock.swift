/// The kinds of layers the library has curvature blocks for (`kfac_layer_kind`).
public enum LayerKind: Int32, Sendable {
    case dense = 1
    case conv2d = 2
}

/// What a layer is: enough to rebuild its block, and to check that a state image belongs to it.
public enum LayerDescription: Equatable, Sendable {
    case dense(inFeatures: Int, outFeatures: Int, hasBias: Bool, grouping: ChannelGrouping)
    case conv2d(Conv2dGeometry, approximation: ConvApproximation, grouping: ChannelGrouping)

    public var kind: LayerKind {
        switch self {
        case .dense: return .dense
        case .conv2d: return .conv2d
        }
    }

    public var hasBias: Bool {
        switch self {
        case .dense(_, _, let bias, _): return bias
        case .conv2d(let g, _, _): return g.hasBias
        }
    }

    /// Input features (dense) or input channels (conv).
    public var inFeatures: Int {
        switch self {
        case .dense(let i, _, _, _): return i
        case .conv2d(let g, _, _): return g.inChannels
        }
    }

    /// Output features (dense) or output channels (conv).
    public var outFeatures: Int {
        switch self {
        case .dense(_, let o, _, _): return o
        case .conv2d(let g, _, _): return g.outChannels
        }
    }

    /// Independent Kronecker blocks of the layer (conv groups; 1 for dense).
    public var groups: Int {
        switch self {
        case .dense: return 1
        case .conv2d(let g, _, _): return g.groups
        }
    }

    /// Dimension of the input-side factor A of one group.
    public var inputFactorDimension: Int {
        switch self {
        case .dense(let i, _, let bias, _): return i + (bias ? 1 : 0)
        case .conv2d(let g, _, _): return g.patchSize + (g.hasBias ? 1 : 0)
        }
    }

    /// Dimension of the output-side factor G of one group.
    public var outputFactorDimension: Int { outFeatures / groups }

    /// The description as integers, for state images: kind, then its sizes and options.
    var fields: [Int] {
        switch self {
        case .dense(let i, let o, let bias, let grouping):
            return [Int(LayerKind.dense.rawValue), i, o, bias ? 1 : 0, grouping.inputGroupSize, grouping.outputGroupSize]
        case .conv2d(let g, let approximation, let grouping):
            return [Int(LayerKind.conv2d.rawValue), g.inChannels, g.outChannels, g.kernelHeight, g.kernelWidth,
                    g.strideHeight, g.strideWidth, g.paddingHeight, g.paddingWidth, g.dilationHeight, g.dilationWidth,
                    g.groups, g.hasBias ? 1 : 0, g.inputHeight, g.inputWidth, Int(g.layout.rawValue),
                    Int(approximation.rawValue), grouping.inputGroupSize, grouping.outputGroupSize]
        }
    }

    /// The description `fields` encodes, if it is well formed.
    init?(fields f: [Int]) {
        guard let kind = f.first.flatMap({ Int32(exactly: $0) }).flatMap(LayerKind.init(rawValue:)) else { return nil }
        switch kind {
        case .dense:
            guard f.count == 6 else { return nil }
            self = .dense(inFeatures: f[1], outFeatures: f[2], hasBias: f[3] == 1,
                          grouping: ChannelGrouping(inputGroupSize: f[4], outputGroupSize: f[5]))
        case .conv2d:
            guard f.count == 19, let layout = Int32(exactly: f[15]).flatMap(TensorLayout.init(rawValue:)),
                  let approximation = Int32(exactly: f[16]).flatMap(ConvApproximation.init(rawValue:)) else { return nil }
            let g = Conv2dGeometry(inChannels: f[1], outChannels: f[2], kernel: (f[3], f[4]), stride: (f[5], f[6]),
                                   padding: (f[7], f[8]), dilation: (f[9], f[10]), groups: f[11], hasBias: f[12] == 1,
                                   input: (f[13], f[14]), layout: layout)
            self = .conv2d(g, approximation: approximation, grouping: ChannelGrouping(inputGroupSize: f[17], outputGroupSize: f[18]))
        }
    }
}

extension LayerDescription: CustomStringConvertible {
    public var description: String {
        switch self {
        case .dense(let i, let o, let bias, let grouping):
            return "dense \(i)→\(o)\(bias ? " with bias" : "")\(grouping == .init() ? "" : " grouped \(grouping.inputGroupSize)/\(grouping.outputGroupSize)")"
        case .conv2d(let g, let approximation, let grouping):
            return "conv \(g.inChannels)→\(g.outChannels) \(g.kernelHeight)×\(g.kernelWidth) on \(g.inputHeight)×\(g.inputWidth), groups \(g.groups), \(approximation)\(grouping == .init() ? "" : " grouped \(grouping.inputGroupSize)/\(grouping.outputGroupSize)")"
        }
    }
}

/// A registered layer as seen from outside: its description and how far its curvature is.
public struct LayerInfo: Equatable, Sendable {
    public var layer: LayerDescription
    public var hasFactors: Bool
    public var hasInverses: Bool
}

/// The curvature state every Kronecker-factored block has, whatever the layer kind: its two
/// factors, the committed inverse and a staging inverse (so an inversion that fails part-way
/// leaves the committed one), and preallocated buffers for preconditioning one gradient.
final class KroneckerCurvature<Scalar: KFACScalar> {
    let input: KroneckerFactor<Scalar>
    let output: KroneckerFactor<Scalar>
    private(set) var inverse: KroneckerInverse<Scalar>?
    private var staged: KroneckerInverse<Scalar>?
    /// The gradient V, the direction U and a scratch matrix, all output × input dimension.
    let gradient: Matrix<Scalar>
    let direction: Matrix<Scalar>
    let scratch: Matrix<Scalar>
    /// The adaptive mode's previous update δ₀ (same layout), allocated on first use.
    var previousUpdate: Matrix<Scalar>?
    /// The directions U of the last successful step, kept for the adaptive mode's solve so that
    /// a later failed step or a standalone `precondition` cannot change them.
    var stepDirection: Matrix<Scalar>?

    /// Allocates `stepDirection` (before a step commits, so the commit cannot fail).
    func reserveStepDirection() throws(KFACError) {
        if stepDirection == nil { stepDirection = try Matrix(rows: direction.rows, columns: direction.columns) }
    }

    /// The re-choice of the factor damping γ: the directions U of candidates 1 and 2 (γ·ω₂, γ/ω₂)
    /// and, for the Cholesky strategy, the inverses they were computed with.
    private(set) var candidateDirections: [Matrix<Scalar>] = []
    private(set) var candidateInverses: [KroneckerInverse<Scalar>] = []

    /// Allocates the candidates' buffers (before a γ step commits).
    func reserveCandidates(strategy: InverseStrategy) throws(KFACError) {
        if candidateDirections.isEmpty {
            candidateDirections = [try Matrix(rows: direction.rows, columns: direction.columns),
                                   try Matrix(rows: direction.rows, columns: direction.columns)]
        }
        if strategy == .cholesky && (candidateInverses.isEmpty || candidateInverses[0].strategy != .cholesky) {
            candidateInverses = [try KroneckerInverse(strategy: strategy, input: input.structure, output: output.structure),
                                 try KroneckerInverse(strategy: strategy, input: input.structure, output: output.structure)]
        }
    }

    /// Makes candidate `slot`'s inverse (1 or 2) the committed one, and the committed one that
    /// candidate's.
    func adoptCandidateInverse(_ slot: Int) {
        guard let current = inverse else { return }
        inverse = candidateInverses[slot - 1]
        candidateInverses[slot - 1] = current
    }

    init(input inputStructure: FactorStructure, output outputStructure: FactorStructure) throws(KFACError) {
        input = try KroneckerFactor(structure: inputStructure)
        output = try KroneckerFactor(structure: outputStructure)
        let (o, a) = (outputStructure.dimension, inputStructure.dimension)
        gradient = try Matrix(rows: o, columns: a)
        direction = try Matrix(rows: o, columns: a)
        scratch = try Matrix(rows: o, columns: a)
    }

    var hasFactors: Bool { input.hasRunning && output.hasRunning }

    func hasInverse(for strategy: InverseStrategy) -> Bool { inverse?.strategy == strategy }

    /// The staging inverse for `strategy`, allocated on first use or when the strategy changed.
    func stagingInverse(for strategy: InverseStrategy) throws(KFACError) -> KroneckerInverse<Scalar> {
        if let s = staged, s.strategy == strategy { return s }
        let s = try KroneckerInverse<Scalar>(strategy: strategy, input: input.structure, output: output.structure)
        staged = s
        return s
    }

    /// Makes the staging inverse the committed one; the old committed one becomes staging.
    func commitStagedInverse() {
        swap(&inverse, &staged)
    }

    /// Installs an inverse read from a state image.
    func restoreInverse(_ i: KroneckerInverse<Scalar>?) {
        inverse = i
    }
}

extension KroneckerCurvature {
    /// π of factored Tikhonov damping (Martens & Grosse 2015, §6.3) for the factors in block
    /// storage `a` and `g`: sqrt((tr A / dim A) / (tr G / dim G)), or 1 when either trace is not a
    /// positive finite number (π would be meaningless).
    func factoredDampingPi(a: UnsafePointer<Scalar>, g: UnsafePointer<Scalar>) -> Scalar {
        let ta = input.trace(of: a) / Scalar(input.dimension), tg = output.trace(of: g) / Scalar(output.dimension)
        let pi = (ta / tg).squareRoot()
        return ta > 0 && tg > 0 && pi.isFinite && pi > 0 ? pi : 1
    }
}

/// One block type per layer kind. A block turns the caller's raw buffers into factor statistics
/// and maps the layer's parameter gradients to and from the gradient matrices V on which the
/// Kronecker inverses act (one per independent group of the layer). Everything that does not
/// depend on the layer kind lives in `KroneckerCurvature` and the inverse strategy.
protocol CurvatureBlock<Scalar>: AnyObject {
    associatedtype Scalar: KFACScalar
    var layer: LayerDescription { get }
    /// The layer's independent Kronecker blocks (conv groups; one for dense layers).
    var curvatures: [KroneckerCurvature<Scalar>] { get }

    /// Number of values in an inputs buffer of `rows` rows.
    func inputValueCount(rows: Int) -> Int
    /// Number of values in an output-gradients buffer of `rows` rows.
    func outputGradientValueCount(rows: Int) -> Int
    /// Number of values of the weight gradient (the bias gradient has `outFeatures` values).
    var weightCount: Int { get }
    /// A bound on every entry of a factor's pending second-moment sums after recording `rows`
    /// more examples whose values are at most `largest` in magnitude, multiplied by `scale`.
    func pendingBound(largest: Double, rows: Int, outputSide: Bool, scale: Double) -> Double

    /// Adds the inputs of `rows` examples (rows of a dense layer) to the input factors' pending
    /// statistics (values already validated). On error nothing changed.
    func recordInputs(_ x: UnsafePointer<Scalar>, rows: Int, ones: Matrix<Scalar>) throws(KFACError)
    /// Adds the output gradients, each multiplied by `scale`, to the output factors' pending
    /// statistics. On error nothing changed.
    func recordOutputGradients(_ g: UnsafePointer<Scalar>, rows: Int, scale: Scalar, ones: Matrix<Scalar>) throws(KFACError)

    /// Copies the parameter gradient into every curvature's `gradient`.
    func gatherGradient(weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?)
    /// Writes `scale *` every curvature's `direction` into the parameter gradient buffers.
    func scatterDirection(scale: Scalar, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?)
}
