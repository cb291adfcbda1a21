/// The parameter gradient buffers of one layer for `KFACOptimizer.step`: read, then overwritten
/// with the preconditioned direction. `weight` is [out][in] row-major, `bias` [out] (nil exactly
/// when the layer has no bias).
public struct ParameterGradient<Scalar: KFACScalar> {
    public var weight: UnsafeMutablePointer<Scalar>
    public var bias: UnsafeMutablePointer<Scalar>?

    public init(weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?) {
        self.weight = weight
        self.bias = bias
    }
}
