/// EKFAC (George, Laurent, Bouthillier, Ballas & Vincent 2018): the eigenbases of the two
/// factors exactly as `EigenInverse` computes them (Q_A, Q_G, the same LAPACK calls), and a
/// scaling S (output × input dimension, row-major) that replaces the Kronecker eigenvalues
/// d_G d_Aᵀ:
///
///     U = Q_G [(Q_Gᵀ V Q_A) ⊘ (S + λ)] Q_Aᵀ = (Ũ diag(vec S) Ũᵀ + λI)⁻¹ vec(V),  Ũ = Q_A ⊗ Q_G.
///
/// `finish` (new bases) resets S to d_G d_Aᵀ; the estimator then replaces it by the second
/// moments of the pending per-example gradients in the new bases when paired rows are pending
/// (`PairedStatistics`), and folds S at factor updates between basis refreshes. λ is applied
/// when multiplying, as for the eigen strategy, and the forward product is Ũ diag(S + λ) Ũᵀ v
/// (not A ⊗ G + λI): it needs the inverse.
///
/// State-image section: the eigen strategy's section (per side: eigenvector blocks, eigenvalues),
/// then S (output × input dimension scalars).
final class EKFACInverse<Scalar: KFACScalar>: KroneckerInverse {
    static var strategy: InverseStrategy { .ekfac }
    static var dampingIsBakedIn: Bool { false }
    static var forwardProductUsesInverse: Bool { true }

    /// Q_A, Q_G and the factors' eigenvalues (for the reset of S).
    let bases: EigenInverse<Scalar>
    /// S, in the coordinates of the bases: S[i][j] belongs to output eigenvector i and input
    /// eigenvector j (each in the factor's own coordinate order, tile by tile).
    let scaling: AlignedBuffer<Scalar>

    var inputStructure: FactorStructure { bases.inputStructure }
    var outputStructure: FactorStructure { bases.outputStructure }

    static func damping(_ lambda: Double, pi: () -> Scalar) -> KroneckerDamping<Scalar> {
        .exact(Scalar(lambda))
    }

    init(input: FactorStructure, output: FactorStructure) throws(KFACError) {
        bases = try EigenInverse(input: input, output: output)
        scaling = try AlignedBuffer(rows: output.dimension, columns: input.dimension)
    }

    func computeBlock(_ side: FactorSide, _ q: Int, from factor: UnsafePointer<Scalar>, shift: Scalar,
                      workspace: EigenWorkspace<Scalar>) throws(KFACError) {
        try bases.computeBlock(side, q, from: factor, shift: shift, workspace: workspace)
    }

    /// New bases: S = d_G d_Aᵀ (the authors' reset when no per-example gradients are at hand).
    func finish() {
        bases.finish()
        resetScaling()
    }

    /// S = d_G d_Aᵀ of the current bases.
    func resetScaling() {
        let (o, a) = (outputStructure.dimension, inputStructure.dimension)
        let dg = bases.output.tileValues.base, da = bases.input.tileValues.base
        for i in 0..<o {
            let row = scaling.base + i * a, g = dg[i]
            for j in 0..<a { row[j] = g * da[j] }
        }
    }

    /// Makes this inverse's bases (and eigenvalues) a copy of `other`'s; S is left as it is.
    func copyBases(from other: EKFACInverse<Scalar>) {
        func copy(_ mine: EigenInverse<Scalar>.Side, _ theirs: EigenInverse<Scalar>.Side) {
            mine.vectors.base.update(from: theirs.vectors.base, count: mine.vectors.count)
            mine.values.base.update(from: theirs.values.base, count: mine.values.count)
            mine.tileValues.base.update(from: theirs.tileValues.base, count: mine.tileValues.count)
        }
        copy(bases.input, other.bases.input)
        copy(bases.output, other.bases.output)
    }

    /// u = Q_Gᵀ v Q_A (`t` scratch): v in the bases' coordinates.
    func rotate(_ v: UnsafePointer<Scalar>, into u: UnsafeMutablePointer<Scalar>, scratch t: UnsafeMutablePointer<Scalar>) {
        let o = outputStructure.dimension, a = inputStructure.dimension
        // The bases hold Q_Aᵀ and Q_Gᵀ block by block.
        BlockDiagonalProduct.right(v, bases.input.vectors.base, structure: inputStructure, transposed: true, into: t, rows: o)
        BlockDiagonalProduct.left(t, bases.output.vectors.base, structure: outputStructure, transposed: false, into: u, columns: a)
    }

    /// u = Q_G u Q_Aᵀ in place (`t` scratch): back from the bases' coordinates.
    private func rotateBack(_ u: UnsafeMutablePointer<Scalar>, scratch t: UnsafeMutablePointer<Scalar>) {
        let o = outputStructure.dimension, a = inputStructure.dimension
        BlockDiagonalProduct.right(u, bases.input.vectors.base, structure: inputStructure, transposed: false, into: t, rows: o)
        BlockDiagonalProduct.left(t, bases.output.vectors.base, structure: outputStructure, transposed: true, into: u, columns: a)
    }

    func multiplyInverse(_ v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, scratch t: AlignedBuffer<Scalar>,
                         damping: Scalar) {
        rotate(v.base, into: u.base, scratch: t.base)
        Scalar.applyScaling(u.base, scaling.base, count: u.count, damping: damping, divide: true)
        rotateBack(u.base, scratch: t.base)
    }

    func multiplyCurvature(_ v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, scratch t: AlignedBuffer<Scalar>,
                           damping: Scalar) {
        rotate(v.base, into: u.base, scratch: t.base)
        Scalar.applyScaling(u.base, scaling.base, count: u.count, damping: damping, divide: false)
        rotateBack(u.base, scratch: t.base)
    }

    func write(to w: inout StateWriter) {
        bases.write(to: &w)
        w.scalars(scaling.base, count: scaling.count)
    }

    func read(from r: inout StateReader) throws(KFACError) {
        try bases.read(from: &r)
        try r.scalars(into: scaling.base, count: scaling.count)
    }

    /// The bases as the eigen strategy's, and S a second moment (or d_G d_Aᵀ): finite and
    /// non-negative.
    func validateLoaded() throws(KFACError) {
        try bases.validateLoaded()
        guard Scalar.allFinite(scaling.base, count: scaling.count),
              (0..<scaling.count).allSatisfy({ scaling.base[$0] >= 0 }) else {
            throw KFACError(.corruptState, "state image has an EKFAC scaling that is not finite or is negative")
        }
    }

    static func imageScalarCount(input: FactorStructure, output: FactorStructure) -> Int {
        EigenInverse<Scalar>.imageScalarCount(input: input, output: output) + input.dimension * output.dimension
    }

    /// The bases' units (the eigen section comes first). S belongs to no unit: the distributed
    /// inverse exchange carries the bases only, and S has its own exchange (issue 12).
    func unitRanges(_ side: FactorSide, _ q: Int) -> InverseUnitRanges? {
        bases.unitRanges(side, q)
    }

    /// Where S lies in `write`'s section (its last scalars).
    var scalingImageRange: Range<Int> {
        let e = EigenInverse<Scalar>.imageScalarCount(input: inputStructure, output: outputStructure)
        return e..<e + scaling.count
    }
}

// Requirements of `KFACScalar` (so that generic callers run specialised loops, as in
// LinearAlgebra.swift), implemented once here.
extension KFACScalar {
    /// v[i] /= s[i] + damping (`divide`), else v[i] *= s[i] + damping.
    public static func applyScaling(_ v: UnsafeMutablePointer<Self>, _ s: UnsafePointer<Self>, count: Int, damping: Self,
                                    divide: Bool) {
        if divide {
            for i in 0..<count { v[i] /= s[i] + damping }
        } else {
            for i in 0..<count { v[i] *= s[i] + damping }
        }
    }

    /// s[i] += alpha · m[i]².
    public static func accumulateSquares(_ m: UnsafePointer<Self>, into s: UnsafeMutablePointer<Self>, count: Int, alpha: Self) {
        for i in 0..<count { s[i] += alpha * m[i] * m[i] }
    }

    /// m[i] = m[i]².
    public static func squareInPlace(_ m: UnsafeMutablePointer<Self>, count: Int) {
        for i in 0..<count { m[i] *= m[i] }
    }
}
