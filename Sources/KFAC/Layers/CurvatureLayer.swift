/// One type per layer kind (kfac-pytorch's module helper). A layer turns the caller's raw
/// buffers into factor statistics and maps its parameter gradients to and from the gradient
/// matrices V of its Kronecker blocks (one per independent group of the layer). Everything
/// that does not depend on the layer kind lives in `KroneckerBlock` and the inverse
/// representations.
protocol CurvatureLayer<Scalar>: AnyObject {
    associatedtype Scalar: KFACScalar
    var layer: LayerDescription { get }
    /// The layer's independent Kronecker blocks (conv groups; one for dense layers).
    var blocks: [KroneckerBlock<Scalar>] { get }

    /// Number of values in an inputs buffer of `rows` rows.
    func inputValueCount(rows: Int) -> Int
    /// Number of values in an output-gradients buffer of `rows` rows.
    func outputGradientValueCount(rows: Int) -> Int
    /// Number of values of the weight gradient (the bias gradient has `outFeatures` values).
    var weightCount: Int { get }
    /// A bound on every entry of what recording `rows` examples whose values are at most
    /// `largest` in magnitude, multiplied by `scale`, adds to a factor's pending second-moment
    /// sums (the factor's `pendingMagnitude` bounds what is already there).
    func pendingBound(largest: Double, rows: Int, outputSide: Bool, scale: Double) -> Double
    /// The rows a factor of the side records for `rows` examples.
    func recordedRows(rows: Int, outputSide: Bool) -> Int

    /// Adds the inputs of `rows` examples (rows of a dense layer) to the input factors' pending
    /// statistics (values already validated). On error nothing changed.
    func recordInputs(_ x: UnsafePointer<Scalar>, rows: Int, ones: AlignedBuffer<Scalar>) throws(KFACError)
    /// Adds the output gradients, each multiplied by `scale`, to the output factors' pending
    /// statistics. On error nothing changed.
    func recordOutputGradients(_ g: UnsafePointer<Scalar>, rows: Int, scale: Scalar, ones: AlignedBuffer<Scalar>) throws(KFACError)

    /// Copies the parameter gradient into every block's `gradient`.
    func gatherGradient(weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?)
    /// Writes `scale *` every block's `direction` into the parameter gradient buffers.
    func scatterDirection(scale: Scalar, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?)
}
