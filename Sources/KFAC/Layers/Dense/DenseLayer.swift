/// A dense layer s = W a (+ b), W of shape [out][in] row-major, with one Kronecker block.
///
/// The parameter matrix is Θ = [W | b] (bias as the last column), the input factor is
/// A = E[ā āᵀ] with ā = [a; 1], the output factor G = E[g gᵀ]; with channel grouping both are
/// restricted to their block diagonals.
final class DenseLayer<Scalar: KFACScalar>: CurvatureLayer {
    let layer: LayerDescription
    let blocks: [KroneckerBlock<Scalar>]
    private let inFeatures: Int, outFeatures: Int, hasBias: Bool

    init(inFeatures: Int, outFeatures: Int, hasBias: Bool, grouping: ChannelGrouping = .init()) throws(KFACError) {
        layer = .dense(inFeatures: inFeatures, outFeatures: outFeatures, hasBias: hasBias, grouping: grouping)
        (self.inFeatures, self.outFeatures, self.hasBias) = (inFeatures, outFeatures, hasBias)
        blocks = [try KroneckerBlock(
            input: .grouped(count: inFeatures, groupSize: grouping.inputGroupSize, bias: hasBias),
            output: .grouped(count: outFeatures, groupSize: grouping.outputGroupSize, bias: false))]
    }

    private var block: KroneckerBlock<Scalar> { blocks[0] }

    func inputValueCount(rows: Int) -> Int { rows * inFeatures }
    func outputGradientValueCount(rows: Int) -> Int { rows * outFeatures }
    var weightCount: Int { inFeatures * outFeatures }

    func pendingBound(largest: Double, rows: Int, outputSide: Bool, scale: Double) -> Double {
        Swift.max(largest * largest, 1) * scale * scale * Double(rows)
    }

    func recordedRows(rows: Int, outputSide: Bool) -> Int { rows }

    func recordInputs(_ x: UnsafePointer<Scalar>, rows: Int, ones: AlignedBuffer<Scalar>) throws(KFACError) {
        try block.input.record(x, rows: rows, width: inFeatures, appended: hasBias ? 1 : nil, scale: 1, ones: ones)
    }

    func recordOutputGradients(_ g: UnsafePointer<Scalar>, rows: Int, scale: Scalar, ones: AlignedBuffer<Scalar>) throws(KFACError) {
        try block.output.record(g, rows: rows, width: outFeatures, appended: nil, scale: scale, ones: ones)
    }

    func gatherGradient(weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?) {
        gatherRows(weight: weight, bias: bias, rows: outFeatures, rowLength: inFeatures, into: block.gradient.base)
    }

    func scatterDirection(scale: Scalar, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?) {
        scatterRows(block.direction.base, scale: scale, weight: weight, bias: bias, rows: outFeatures, rowLength: inFeatures)
    }
}

/// v = [W | b] for `rows` weight rows of `rowLength` values (and a bias value per row, if given).
func gatherRows<Scalar: KFACScalar>(weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?, rows: Int, rowLength n: Int,
                                    into v: UnsafeMutablePointer<Scalar>) {
    guard let bias else {
        v.update(from: weight, count: rows * n)
        return
    }
    for o in 0..<rows {
        (v + o * (n + 1)).update(from: weight + o * n, count: n)
        v[o * (n + 1) + n] = bias[o]
    }
}

/// [W | b] = scale · u, the inverse of `gatherRows`.
func scatterRows<Scalar: KFACScalar>(_ u: UnsafePointer<Scalar>, scale: Scalar, weight: UnsafeMutablePointer<Scalar>,
                                     bias: UnsafeMutablePointer<Scalar>?, rows: Int, rowLength n: Int) {
    if let bias {
        for o in 0..<rows {
            (weight + o * n).update(from: u + o * (n + 1), count: n)
            bias[o] = u[o * (n + 1) + n]
        }
        if scale != 1 { Scalar.scal(count: rows, alpha: scale, x: bias) }
    } else {
        weight.update(from: u, count: rows * n)
    }
    if scale != 1 { Scalar.scal(count: rows * n, alpha: scale, x: weight) }
}
