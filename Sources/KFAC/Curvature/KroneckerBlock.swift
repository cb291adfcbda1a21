/// The powers of a damped curvature block that products are taken with.
public enum CurvaturePower: Sendable {
    /// The damped curvature itself: the forward product (for CG, and for tests).
    case one
    /// Its inverse: preconditioning.
    case inverse
}

/// One Kronecker-factored curvature block A ⊗ G (kfac-jax's "curvature block"): its two
/// factors, the committed inverse and a staging inverse (so an inversion that fails part-way
/// leaves the committed one), and preallocated buffers for one gradient matrix V and its
/// product U (output dimension × input dimension, row-major), plus scratch.
///
/// Whatever the layer kind: a layer (`CurvatureLayer`) owns one block per independent group and
/// maps its parameter buffers to and from `gradient` and `direction`.
final class KroneckerBlock<Scalar: KFACScalar> {
    let input: KroneckerFactor<Scalar>
    let output: KroneckerFactor<Scalar>
    private(set) var inverse: (any KroneckerInverse<Scalar>)?
    private var staged: (any KroneckerInverse<Scalar>)?
    /// The gradient V, the direction U and a scratch matrix, all output × input dimension.
    let gradient: AlignedBuffer<Scalar>
    let direction: AlignedBuffer<Scalar>
    let scratch: AlignedBuffer<Scalar>
    /// EKFAC's pending paired rows (per-example gradients), from the first paired record call.
    var paired: PairedStatistics<Scalar>?

    init(input inputStructure: FactorStructure, output outputStructure: FactorStructure) throws(KFACError) {
        input = try KroneckerFactor(structure: inputStructure)
        output = try KroneckerFactor(structure: outputStructure)
        let (o, a) = (outputStructure.dimension, inputStructure.dimension)
        gradient = try AlignedBuffer(rows: o, columns: a)
        direction = try AlignedBuffer(rows: o, columns: a)
        scratch = try AlignedBuffer(rows: o, columns: a)
    }

    var hasFactors: Bool { input.hasRunning && output.hasRunning }

    func hasInverse(for strategy: InverseStrategy) -> Bool { inverse?.strategy == strategy }

    /// A fresh inverse of `strategy`'s representation shaped for this block.
    func makeInverse(_ strategy: InverseStrategy) throws(KFACError) -> any KroneckerInverse<Scalar> {
        try strategy.makeInverse(input: input.structure, output: output.structure)
    }

    /// The staging inverse for `strategy`, allocated on first use or when the strategy changed.
    func stagingInverse(for strategy: InverseStrategy) throws(KFACError) -> any KroneckerInverse<Scalar> {
        if let s = staged, s.strategy == strategy { return s }
        let s = try makeInverse(strategy)
        staged = s
        return s
    }

    /// Makes the staging inverse the committed one; the old committed one becomes staging.
    func commitStagedInverse() {
        swap(&inverse, &staged)
    }

    /// Makes `other` the committed inverse and hands back the committed one (when there is one).
    func exchangeInverse(_ other: inout any KroneckerInverse<Scalar>) {
        guard let current = inverse else { return }
        inverse = other
        other = current
    }

    /// Installs an inverse read from a state image.
    func restoreInverse(_ i: (any KroneckerInverse<Scalar>)?) {
        inverse = i
    }
}

extension KroneckerBlock {
    /// π of factored Tikhonov damping (Martens & Grosse 2015, §6.3) for the factors in block
    /// storage `a` and `g`: sqrt((tr A / dim A) / (tr G / dim G)), or 1 when either trace is not a
    /// positive finite number (π would be meaningless).
    func factoredDampingPi(a: UnsafePointer<Scalar>, g: UnsafePointer<Scalar>) -> Scalar {
        let ta = input.trace(of: a) / Scalar(input.dimension), tg = output.trace(of: g) / Scalar(output.dimension)
        let pi = (ta / tg).squareRoot()
        return ta > 0 && tg > 0 && pi.isFinite && pi > 0 ? pi : 1
    }

    /// The damped block `strategy` inverts for damping λ and the factors in `a` and `g`.
    func damping(_ strategy: InverseStrategy, lambda: Double, piDamping: Bool,
                 a: UnsafePointer<Scalar>, g: UnsafePointer<Scalar>) -> KroneckerDamping<Scalar> {
        strategy.representation(Scalar.self).damping(lambda, pi: { piDamping ? factoredDampingPi(a: a, g: g) : 1 })
    }

    /// u = (damped A ⊗ G)^power v for gradient-shaped v and u (distinct, and distinct from
    /// `scratch`), the damping being the one `strategy` inverts with λ = `lambda`:
    /// - `.one`: from the running factors (block products with their upper triangles), exact
    ///   damping G V A + λ V, factored damping (G + s_G I)(V (A + s_A I)) with π from the running
    ///   factors. Needs factors.
    /// - `.inverse`: through the committed inverse (which must be `strategy`'s); for factored
    ///   damping the λ and π it was computed with.
    func multiply(_ v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, power: CurvaturePower,
                  strategy: InverseStrategy, lambda: Double, piDamping: Bool) {
        switch power {
        case .inverse:
            inverse!.multiplyInverse(v, into: u, scratch: scratch, damping: Scalar(lambda))
        case .one where strategy.forwardProductUsesInverse:
            inverse!.multiplyCurvature(v, into: u, scratch: scratch, damping: Scalar(lambda))
        case .one:
            let (a, g) = (input.running.base, output.running.base)
            let (o, n) = (output.dimension, input.dimension)
            let count = o * n
            BlockDiagonalProduct.rightSymmetric(v.base, a, structure: input.structure, into: scratch.base, rows: o)
            switch damping(strategy, lambda: lambda, piDamping: piDamping, a: a, g: g) {
            case .exact(let lambda):
                BlockDiagonalProduct.leftSymmetric(scratch.base, g, structure: output.structure, into: u.base, columns: n)
                Scalar.axpy(count: count, alpha: lambda, x: v.base, y: u.base)
            case .factored(let inputShift, let outputShift):
                Scalar.axpy(count: count, alpha: inputShift, x: v.base, y: scratch.base)
                BlockDiagonalProduct.leftSymmetric(scratch.base, g, structure: output.structure, into: u.base, columns: n)
                Scalar.axpy(count: count, alpha: outputShift, x: scratch.base, y: u.base)
            }
        }
    }

    /// The explicit matrix of `multiply(power:)` on this block (for oracle tests only): the
    /// (out·in)² matrix acting on vec([W | b]) of the block's group, column-major vec of the
    /// gradient matrix in the layer's own parameter order (`FactorStructure.externalIndex`),
    /// row-major.
    /// Uses `gradient` and `direction` as scratch.
    func denseMatrix(power: CurvaturePower, strategy: InverseStrategy, lambda: Double, piDamping: Bool) -> [Scalar] {
        let (o, n) = (output.dimension, input.dimension), size = o * n
        // Internal column j is the layer's column `external(j)`.
        let external = { (j: Int) -> Int in self.input.structure.externalIndex?[j] ?? j }
        var m = [Scalar](repeating: 0, count: size * size)
        for j in 0..<n {
            for i in 0..<o {
                gradient.base.initialize(repeating: 0, count: size)
                gradient.base[i * n + j] = 1
                multiply(gradient, into: direction, power: power, strategy: strategy, lambda: lambda, piDamping: piDamping)
                let column = external(j) * o + i
                for jj in 0..<n {
                    for ii in 0..<o { m[(external(jj) * o + ii) * size + column] = direction.base[ii * n + jj] }
                }
            }
        }
        return m
    }
}
