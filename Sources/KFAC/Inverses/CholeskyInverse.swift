/// Factored Tikhonov damping (Martens & Grosse 2015, §6.3) inverted by Cholesky factorisation:
/// each side holds its blocks' (F_b + shift·I)⁻¹ as full symmetric matrices, formed by LAPACK
/// potrf/potri, with shifts π√λ (input) and √λ/π (output).
///
/// State-image section: the input side's blocks, then the output side's (block storage).
final class CholeskyInverse<Scalar: KFACScalar>: KroneckerInverse {
    static var strategy: InverseStrategy { .cholesky }
    static var dampingIsBakedIn: Bool { true }

    let inputStructure: FactorStructure
    let outputStructure: FactorStructure
    private let inputBlocks: AlignedBuffer<Scalar>
    private let outputBlocks: AlignedBuffer<Scalar>

    static func damping(_ lambda: Double, pi: () -> Scalar) -> KroneckerDamping<Scalar> {
        let sqrtDamping = Scalar(lambda.squareRoot()), pi = pi()
        return .factored(input: pi * sqrtDamping, output: sqrtDamping / pi)
    }

    init(input: FactorStructure, output: FactorStructure) throws(KFACError) {
        inputStructure = input
        outputStructure = output
        inputBlocks = try AlignedBuffer(rows: 1, columns: input.storageCount)
        outputBlocks = try AlignedBuffer(rows: 1, columns: output.storageCount)
    }

    func computeBlock(_ side: FactorSide, _ q: Int, from factor: UnsafePointer<Scalar>, shift: Scalar,
                      workspace: EigenWorkspace<Scalar>) throws(KFACError) {
        let structure = side == .input ? inputStructure : outputStructure
        let n = structure.uniqueSizes[q], o = structure.storageOffsets[q]
        let block = (side == .input ? inputBlocks : outputBlocks).base + o
        Scalar.copyUpperTriangle(from: factor + o, to: block, n: n, diagonalShift: shift)
        let info = Scalar.choleskyFactor(n: n, a: block)
        guard info == 0 else {
            throw KFACError(.notPositiveDefinite,
                            "damped \(n)×\(n) factor block is not positive definite (potrf info \(info)); increase the damping")
        }
        let info2 = Scalar.choleskyInverse(n: n, a: block)
        guard info2 == 0 else {
            throw KFACError(.notPositiveDefinite, "damped \(n)×\(n) factor block is singular (potri info \(info2))")
        }
        Scalar.symmetrizeFromUpper(block, n: n)
    }

    func finish() {}

    func multiplyInverse(_ v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, scratch t: AlignedBuffer<Scalar>,
                         damping: Scalar) {
        // U = G⁻¹ (V A⁻¹)
        BlockDiagonalProduct.right(v.base, inputBlocks.base, structure: inputStructure, transposed: false,
                                   into: t.base, rows: outputStructure.dimension)
        BlockDiagonalProduct.left(t.base, outputBlocks.base, structure: outputStructure, transposed: false,
                                  into: u.base, columns: inputStructure.dimension)
    }

    func write(to w: inout StateWriter) {
        w.scalars(inputBlocks.base, count: inputBlocks.count)
        w.scalars(outputBlocks.base, count: outputBlocks.count)
    }

    func read(from r: inout StateReader) throws(KFACError) {
        try r.scalars(into: inputBlocks.base, count: inputBlocks.count)
        try r.scalars(into: outputBlocks.base, count: outputBlocks.count)
        finish()
    }

    /// potri of a positive definite block, symmetrised: finite, symmetric, positive diagonal.
    func validateLoaded() throws(KFACError) {
        for (blocks, structure) in [(inputBlocks, inputStructure), (outputBlocks, outputStructure)] {
            guard Scalar.allFinite(blocks.base, count: blocks.count) else {
                throw KFACError(.corruptState, "state image has a Cholesky inverse that is not finite")
            }
            for q in structure.uniqueSizes.indices {
                let (o, b) = (structure.storageOffsets[q], structure.uniqueSizes[q])
                let m = blocks.base + o
                for i in 0..<b {
                    guard m[i * b + i] > 0 else { throw KFACError(.corruptState, "state image has a Cholesky inverse that is not positive definite") }
                    for j in (i + 1)..<Swift.max(b, i + 1) where m[i * b + j] != m[j * b + i] {
                        throw KFACError(.corruptState, "state image has a Cholesky inverse that is not symmetric")
                    }
                }
            }
        }
    }

    static func imageScalarCount(input: FactorStructure, output: FactorStructure) -> Int {
        input.storageCount + output.storageCount
    }

    /// Input blocks, then output blocks, each unique block b×b at its storage offset.
    func unitRanges(_ side: FactorSide, _ q: Int) -> InverseUnitRanges? {
        let structure = side == .input ? inputStructure : outputStructure
        let base = side == .input ? 0 : inputStructure.storageCount
        let o = base + structure.storageOffsets[q], b = structure.uniqueSizes[q]
        return InverseUnitRanges(o..<o + b * b)
    }
}
