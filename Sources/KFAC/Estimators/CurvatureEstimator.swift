/// What the estimator needs of the optimizer's parameters: how factors are averaged and how
/// the curvature is damped and inverted.
struct CurvatureSettings {
    var strategy: InverseStrategy
    /// λ of the damped curvature (`KFACParameters.inverseDamping`).
    var damping: Double
    var piDamping: Bool
    var factorDecay: Double
    /// Inversion threads, 0 = one per online CPU.
    var threadCount: Int
    /// β_S of EKFAC's scaling (`KFACParameters.ekfacDecay`).
    var ekfacDecay: Double = 0.95
}

extension KFACParameters {
    var curvatureSettings: CurvatureSettings {
        CurvatureSettings(strategy: inverseStrategy, damping: inverseDamping, piDamping: piDamping,
                          factorDecay: factorDecay, threadCount: threadCount, ekfacDecay: ekfacDecay)
    }
}

/// A curvature estimator (kfac-jax's `CurvatureEstimator`): it owns the layers' curvature
/// blocks, their factors and inverses and the inversion work, and multiplies parameter-shaped
/// vectors by the damped curvature at a power. The optimizer holds one and decides when each
/// stage runs.
protocol CurvatureEstimator<Scalar>: AnyObject {
    associatedtype Scalar: KFACScalar

    var layerCount: Int { get }
    /// The curvature blocks, across all layers (a layer owns one or more consecutive blocks).
    var blockCount: Int { get }

    /// Adds `rows` examples' inputs to layer `layer`'s statistics.
    func recordInputs(layer: Int, _ inputs: UnsafePointer<Scalar>?, rows: Int) throws(KFACError)
    /// Adds `rows` examples' output gradients, each multiplied by `scale`.
    func recordOutputGradients(layer: Int, _ gradients: UnsafePointer<Scalar>?, rows: Int, scale: Double) throws(KFACError)
    /// Folds every layer's pending statistics into its running factors.
    func foldFactors(decay: Double) throws(KFACError)
    /// Recomputes the inverses of every block that has factors.
    func invert(_ settings: CurvatureSettings) throws(KFACError)
    /// Replaces one layer's parameter-shaped vector by its product with the damped curvature at
    /// `power`.
    func multiply(layer: Int, _ vector: ParameterGradient<Scalar>, power: CurvaturePower,
                  _ settings: CurvatureSettings) throws(KFACError)
    /// The same for every layer, `vectors(l)` giving layer l's buffers; on error none is written.
    func multiplyAll(_ vectors: (Int) -> ParameterGradient<Scalar>, power: CurvaturePower,
                     _ settings: CurvatureSettings) throws(KFACError)
}
