/// The curvature block of a dense layer s = W a (+ b), W of shape [out][in] row-major.
///
/// The parameter matrix is Θ = [W | b] (bias as the last column), the input factor is
/// A = E[ā āᵀ] with ā = [a; 1], the output factor G = E[g gᵀ].
final class DenseBlock<Scalar: KFACScalar>: CurvatureBlock {
    let layer: LayerDescription
    let curvature: KroneckerCurvature<Scalar>

    init(inFeatures: Int, outFeatures: Int, hasBias: Bool) throws(KFACError) {
        layer = LayerDescription(kind: .dense, inFeatures: inFeatures, outFeatures: outFeatures, hasBias: hasBias)
        curvature = try KroneckerCurvature(inputDimension: layer.inputFactorDimension,
                                           outputDimension: layer.outputFactorDimension)
    }

    func inputValueCount(rows: Int) -> Int { rows * layer.inFeatures }
    func outputGradientValueCount(rows: Int) -> Int { rows * layer.outFeatures }
    var weightCount: Int { layer.inFeatures * layer.outFeatures }

    func recordInputs(_ x: UnsafePointer<Scalar>, rows: Int, ones: Matrix<Scalar>) throws(KFACError) {
        try curvature.input.record(x, rows: rows, width: layer.inFeatures, appendOne: layer.hasBias, scale: 1, ones: ones)
    }

    func recordOutputGradients(_ g: UnsafePointer<Scalar>, rows: Int, scale: Scalar, ones: Matrix<Scalar>) throws(KFACError) {
        try curvature.output.record(g, rows: rows, width: layer.outFeatures, appendOne: false, scale: scale, ones: ones)
    }

    func gatherGradient(weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?) {
        let v = curvature.gradient.base, n = layer.inFeatures
        guard layer.hasBias, let bias else {
            v.update(from: weight, count: weightCount)
            return
        }
        for o in 0..<layer.outFeatures {
            (v + o * (n + 1)).update(from: weight + o * n, count: n)
            v[o * (n + 1) + n] = bias[o]
        }
    }

    func scatterDirection(scale: Scalar, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?) {
        let u = curvature.direction.base, n = layer.inFeatures
        if layer.hasBias, let bias {
            for o in 0..<layer.outFeatures {
                (weight + o * n).update(from: u + o * (n + 1), count: n)
                bias[o] = u[o * (n + 1) + n]
            }
            if scale != 1 { Scalar.scal(count: layer.outFeatures, alpha: scale, x: bias) }
        } else {
            weight.update(from: u, count: weightCount)
        }
        if scale != 1 { Scalar.scal(count: weightCount, alpha: scale, x: weight) }
    }
}
