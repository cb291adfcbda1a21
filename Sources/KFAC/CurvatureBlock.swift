/// The kinds of layers the library has curvature blocks for (`kfac_layer_kind`).
public enum LayerKind: Int32, Sendable {
    case dense = 1
}

/// What a layer is: enough to rebuild its block, and to check that a state image belongs to it.
public struct LayerDescription: Equatable, Sendable {
    public var kind: LayerKind
    public var inFeatures: Int
    public var outFeatures: Int
    public var hasBias: Bool

    /// Dimension of the input-side factor A.
    public var inputFactorDimension: Int { inFeatures + (hasBias ? 1 : 0) }
    /// Dimension of the output-side factor G.
    public var outputFactorDimension: Int { outFeatures }
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

    init(inputDimension: Int, outputDimension: Int) throws(KFACError) {
        input = try KroneckerFactor(dimension: inputDimension)
        output = try KroneckerFactor(dimension: outputDimension)
        gradient = try Matrix(rows: outputDimension, columns: inputDimension)
        direction = try Matrix(rows: outputDimension, columns: inputDimension)
        scratch = try Matrix(rows: outputDimension, columns: inputDimension)
    }

    var hasFactors: Bool { input.hasRunning && output.hasRunning }

    func hasInverse(for strategy: InverseStrategy) -> Bool { inverse?.strategy == strategy }

    /// The staging inverse for `strategy`, allocated on first use or when the strategy changed.
    func stagingInverse(for strategy: InverseStrategy) throws(KFACError) -> KroneckerInverse<Scalar> {
        if let s = staged, s.strategy == strategy { return s }
        let s = try KroneckerInverse<Scalar>(strategy: strategy, inputDimension: input.dimension,
                                             outputDimension: output.dimension)
        staged = s
        return s
    }

    /// Makes the staging inverse the committed one; the old committed one becomes staging.
    func commitStagedInverse() {
        swap(&inverse, &staged)
    }

    /// Drops the committed inverse (e.g. after the strategy changed).
    func discardInverse() {
        inverse = nil
    }

    /// Installs an inverse read from a state image.
    func restoreInverse(_ i: KroneckerInverse<Scalar>?) {
        inverse = i
    }
}

/// π of factored Tikhonov damping (Martens & Grosse 2015, §6.3) for factors A (upper triangle,
/// aDim) and G (gDim): sqrt((tr A / aDim) / (tr G / gDim)), or 1 when either trace is not a
/// positive finite number (π would be meaningless).
func factoredDampingPi<Scalar: KFACScalar>(a: UnsafePointer<Scalar>, aDim: Int, g: UnsafePointer<Scalar>, gDim: Int) -> Scalar {
    let ta = Scalar.trace(a, n: aDim) / Scalar(aDim), tg = Scalar.trace(g, n: gDim) / Scalar(gDim)
    let pi = (ta / tg).squareRoot()
    return ta > 0 && tg > 0 && pi.isFinite && pi > 0 ? pi : 1
}

/// One block type per layer kind. A block turns the caller's raw buffers into factor statistics
/// and maps the layer's parameter gradients to and from the gradient matrix V on which the
/// Kronecker inverse acts. Everything that does not depend on the layer kind lives in
/// `KroneckerCurvature` and the inverse strategy.
protocol CurvatureBlock<Scalar>: AnyObject {
    associatedtype Scalar: KFACScalar
    var layer: LayerDescription { get }
    var curvature: KroneckerCurvature<Scalar> { get }

    /// Number of values in an inputs buffer of `rows` rows.
    func inputValueCount(rows: Int) -> Int
    /// Number of values in an output-gradients buffer of `rows` rows.
    func outputGradientValueCount(rows: Int) -> Int
    /// Number of values of the weight gradient (the bias gradient has `outFeatures` values).
    var weightCount: Int { get }

    /// Adds the input rows to the input factor's pending statistics (inputs already validated).
    /// On error nothing changed.
    func recordInputs(_ x: UnsafePointer<Scalar>, rows: Int, ones: Matrix<Scalar>) throws(KFACError)
    /// Adds the output-gradient rows, each multiplied by `scale`, to the output factor's pending
    /// statistics. On error nothing changed.
    func recordOutputGradients(_ g: UnsafePointer<Scalar>, rows: Int, scale: Scalar, ones: Matrix<Scalar>) throws(KFACError)

    /// Copies the parameter gradient into `curvature.gradient`.
    func gatherGradient(weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?)
    /// Writes `scale * curvature.direction` into the parameter gradient buffers.
    func scatterDirection(scale: Scalar, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?)
}
