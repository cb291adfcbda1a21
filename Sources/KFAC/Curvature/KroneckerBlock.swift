/// The curvature state every Kronecker-factored block has, whatever the layer kind: its two
/// factors, the committed inverse and a staging inverse (so an inversion that fails part-way
/// leaves the committed one), and preallocated buffers for preconditioning one gradient.
final class KroneckerBlock<Scalar: KFACScalar> {
    let input: KroneckerFactor<Scalar>
    let output: KroneckerFactor<Scalar>
    private(set) var inverse: KroneckerInverse<Scalar>?
    private var staged: KroneckerInverse<Scalar>?
    /// The gradient V, the direction U and a scratch matrix, all output × input dimension.
    let gradient: AlignedBuffer<Scalar>
    let direction: AlignedBuffer<Scalar>
    let scratch: AlignedBuffer<Scalar>
    /// The adaptive mode's previous update δ₀ (same layout), allocated on first use.
    var previousUpdate: AlignedBuffer<Scalar>?
    /// The directions U of the last successful step, kept for the adaptive mode's solve so that
    /// a later failed step or a standalone `precondition` cannot change them.
    var stepDirection: AlignedBuffer<Scalar>?

    /// Allocates `stepDirection` (before a step commits, so the commit cannot fail).
    func reserveStepDirection() throws(KFACError) {
        if stepDirection == nil { stepDirection = try AlignedBuffer(rows: direction.rows, columns: direction.columns) }
    }

    /// The re-choice of the factor damping γ: the directions U of candidates 1 and 2 (γ·ω₂, γ/ω₂)
    /// and, for the Cholesky strategy, the inverses they were computed with.
    private(set) var candidateDirections: [AlignedBuffer<Scalar>] = []
    private(set) var candidateInverses: [KroneckerInverse<Scalar>] = []

    /// Allocates the candidates' buffers (before a γ step commits).
    func reserveCandidates(strategy: InverseStrategy) throws(KFACError) {
        if candidateDirections.isEmpty {
            candidateDirections = [try AlignedBuffer(rows: direction.rows, columns: direction.columns),
                                   try AlignedBuffer(rows: direction.rows, columns: direction.columns)]
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
        gradient = try AlignedBuffer(rows: o, columns: a)
        direction = try AlignedBuffer(rows: o, columns: a)
        scratch = try AlignedBuffer(rows: o, columns: a)
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

extension KroneckerBlock {
    /// π of factored Tikhonov damping (Martens & Grosse 2015, §6.3) for the factors in block
    /// storage `a` and `g`: sqrt((tr A / dim A) / (tr G / dim G)), or 1 when either trace is not a
    /// positive finite number (π would be meaningless).
    func factoredDampingPi(a: UnsafePointer<Scalar>, g: UnsafePointer<Scalar>) -> Scalar {
        let ta = input.trace(of: a) / Scalar(input.dimension), tg = output.trace(of: g) / Scalar(output.dimension)
        let pi = (ta / tg).squareRoot()
        return ta > 0 && tg > 0 && pi.isFinite && pi > 0 ? pi : 1
    }
}
