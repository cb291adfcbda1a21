/// One of the two Kronecker factors of a block: the input side A or the output side G.
enum FactorSide: CaseIterable, Sendable {
    case input
    case output
}

/// The damped curvature of a Kronecker block that an inverse representation inverts, so that
/// the forward product (`KroneckerBlock.multiply(power: .one)`) multiplies by the same matrix.
enum KroneckerDamping<Scalar: KFACScalar> {
    /// A ⊗ G + λ I (exact damping).
    case exact(Scalar)
    /// (A + input·I) ⊗ (G + output·I) (factored Tikhonov damping).
    case factored(input: Scalar, output: Scalar)
}

/// The inverse of a damped Kronecker block A ⊗ G in one representation (one type per
/// `InverseStrategy`), computed block by block of each factor's
/// `FactorStructure` (each unique block once) and applied to gradient matrices V
/// (output dimension × input dimension, row-major).
///
/// The lifecycle: `damping` says which damped matrix the representation inverts; the
/// estimator computes every unique block of both sides (`computeBlock`, possibly concurrently,
/// with the side's shift from `damping`), then calls `finish`. A representation writes and
/// reads its own state-image section.
protocol KroneckerInverse<Scalar>: AnyObject {
    associatedtype Scalar: KFACScalar

    /// The inverse-strategy parameter's value that selects this representation.
    static var strategy: InverseStrategy { get }

    /// Whether the damping is part of the computed blocks (then a different λ needs its own
    /// inverse, as the γ candidates of a damping step do), rather than applied when multiplying.
    static var dampingIsBakedIn: Bool { get }

    /// The damped block this representation inverts for damping λ; `pi` is π of factored
    /// damping (evaluated only by representations that use it).
    static func damping(_ lambda: Double, pi: () -> Scalar) -> KroneckerDamping<Scalar>

    /// Empty (zeroed) storage for the blocks of factors with these structures.
    init(input: FactorStructure, output: FactorStructure) throws(KFACError)

    var inputStructure: FactorStructure { get }
    var outputStructure: FactorStructure { get }

    /// Inverts unique block `q` of one side's factor, whose blocks are in `factor` (block
    /// storage, upper triangles); `shift` is that side's Tikhonov term for factored damping.
    /// Different blocks may be computed concurrently.
    func computeBlock(_ side: FactorSide, _ q: Int, from factor: UnsafePointer<Scalar>, shift: Scalar,
                      workspace: EigenWorkspace<Scalar>) throws(KFACError)

    /// After every block of both sides is computed (or read).
    func finish()

    /// u = (damped A ⊗ G)⁻¹ v with `scratch` of v's shape; `damping` is λ for exact damping
    /// (factored damping was applied when the blocks were computed).
    func multiplyInverse(_ v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, scratch: AlignedBuffer<Scalar>,
                         damping: Scalar)

    /// Writes the representation's state-image section.
    func write(to w: inout StateWriter)
    /// Reads what `write` wrote into this (fresh) inverse, then finishes it.
    func read(from r: inout StateReader) throws(KFACError)
    /// After `read` from a state image: throws `.corruptState` unless the contents are an
    /// inverse the representation can compute (issue 15). (The distributed exchange reads packs
    /// of zeros and sums through `read` alone.)
    func validateLoaded() throws(KFACError)

    /// Whether the damped curvature this representation inverts is not A ⊗ G itself (EKFAC's
    /// re-scaled eigenbasis), so that the forward product (`multiplyCurvature`) needs the
    /// inverse rather than the running factors. Default false.
    static var forwardProductUsesInverse: Bool { get }
    /// u = (the damped curvature this representation inverts) v, for representations whose
    /// `forwardProductUsesInverse`.
    func multiplyCurvature(_ v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, scratch: AlignedBuffer<Scalar>,
                           damping: Scalar)
    /// The number of scalars `write` writes for factors of these structures.
    static func imageScalarCount(input: FactorStructure, output: FactorStructure) -> Int
    /// Where unique block `q` of side `side` lies in `write`'s section (scalar ranges, in
    /// order), so that a distributed exchange can carry the units a rank computed alone; nil
    /// when the representation cannot be split by unit. Default nil.
    func unitRanges(_ side: FactorSide, _ q: Int) -> InverseUnitRanges?
}

extension KroneckerInverse {
    func unitRanges(_ side: FactorSide, _ q: Int) -> InverseUnitRanges? { nil }
}

/// Where one inversion unit lies in an inverse's state-image section: one or two scalar
/// ranges, in order (a struct rather than an array, so that the exchange does not allocate).
struct InverseUnitRanges: Equatable {
    var first: Range<Int>
    var second: Range<Int>

    init(_ first: Range<Int>, _ second: Range<Int>? = nil) {
        self.first = first
        self.second = second ?? first.upperBound..<first.upperBound
    }

    var count: Int { first.count + second.count }

    /// The ranges moved by `offset` scalars.
    func shifted(by offset: Int) -> InverseUnitRanges {
        InverseUnitRanges(first.lowerBound + offset..<first.upperBound + offset,
                          second.lowerBound + offset..<second.upperBound + offset)
    }
}

extension KroneckerInverse {
    var strategy: InverseStrategy { Self.strategy }

    static var forwardProductUsesInverse: Bool { false }
    func multiplyCurvature(_ v: AlignedBuffer<Scalar>, into u: AlignedBuffer<Scalar>, scratch: AlignedBuffer<Scalar>,
                           damping: Scalar) {
        preconditionFailure("\(Self.self) forms its forward product from the running factors")
    }
}

extension InverseStrategy {
    /// Whether this strategy's inverses hold their damping (see `KroneckerInverse.dampingIsBakedIn`).
    var dampingIsBakedIn: Bool { representation(Float.self).dampingIsBakedIn }
    /// Whether this strategy's forward product needs its inverse (see
    /// `KroneckerInverse.forwardProductUsesInverse`).
    var forwardProductUsesInverse: Bool { representation(Float.self).forwardProductUsesInverse }
}

extension InverseStrategy {
    /// The representation type of the strategy: the one place a strategy value becomes a type.
    func representation<Scalar: KFACScalar>(_: Scalar.Type) -> any KroneckerInverse<Scalar>.Type {
        switch self {
        case .cholesky: return CholeskyInverse<Scalar>.self
        case .eigen: return EigenInverse<Scalar>.self
        case .ekfac: return EKFACInverse<Scalar>.self
        }
    }

    /// A fresh inverse of this strategy's representation.
    func makeInverse<Scalar: KFACScalar>(input: FactorStructure, output: FactorStructure) throws(KFACError) -> any KroneckerInverse<Scalar> {
        try representation(Scalar.self).init(input: input, output: output)
    }
}

/// Products of a gradient matrix with a block-diagonal factor-shaped matrix, tile by tile of a
/// `FactorStructure`: `blocks` holds each unique block as a full b×b row-major matrix
/// (`storageOffsets`), or for the symmetric forms only its upper triangle.
enum BlockDiagonalProduct {
    /// c = v · op(M), v and c o×dim row-major (M acts on the columns: the input side).
    static func right<S: KFACScalar>(_ v: UnsafePointer<S>, _ m: UnsafePointer<S>, structure s: FactorStructure,
                                     transposed: Bool, into c: UnsafeMutablePointer<S>, rows o: Int) {
        let a = s.dimension
        for t in s.tiles.indices {
            let tile = s.tiles[t], b = s.uniqueSizes[tile.unique]
            S.gemm(transA: false, transB: transposed, m: o, n: b, k: b, alpha: 1, a: v + tile.offset, lda: a,
                   b: m + s.storageOffsets[tile.unique], ldb: b, beta: 0, c: c + tile.offset, ldc: a)
        }
    }

    /// c = op(M) · v, v and c dim×a row-major (M acts on the rows: the output side).
    static func left<S: KFACScalar>(_ v: UnsafePointer<S>, _ m: UnsafePointer<S>, structure s: FactorStructure,
                                    transposed: Bool, into c: UnsafeMutablePointer<S>, columns a: Int) {
        for t in s.tiles.indices {
            let tile = s.tiles[t], b = s.uniqueSizes[tile.unique]
            S.gemm(transA: transposed, transB: false, m: b, n: a, k: b, alpha: 1,
                   a: m + s.storageOffsets[tile.unique], lda: b,
                   b: v + tile.offset * a, ldb: a, beta: 0, c: c + tile.offset * a, ldc: a)
        }
    }

    /// c = v · M for M symmetric, its blocks' upper triangles in `m` (a factor's block storage).
    static func rightSymmetric<S: KFACScalar>(_ v: UnsafePointer<S>, _ m: UnsafePointer<S>, structure s: FactorStructure,
                                              into c: UnsafeMutablePointer<S>, rows o: Int) {
        let a = s.dimension
        for t in s.tiles.indices {
            let tile = s.tiles[t], b = s.uniqueSizes[tile.unique]
            S.symm(aOnLeft: false, m: o, n: b, alpha: 1, a: m + s.storageOffsets[tile.unique], lda: b,
                   b: v + tile.offset, ldb: a, beta: 0, c: c + tile.offset, ldc: a)
        }
    }

    /// c = M · v for M symmetric, its blocks' upper triangles in `m`.
    static func leftSymmetric<S: KFACScalar>(_ v: UnsafePointer<S>, _ m: UnsafePointer<S>, structure s: FactorStructure,
                                             into c: UnsafeMutablePointer<S>, columns a: Int) {
        for t in s.tiles.indices {
            let tile = s.tiles[t], b = s.uniqueSizes[tile.unique]
            S.symm(aOnLeft: true, m: b, n: a, alpha: 1, a: m + s.storageOffsets[tile.unique], lda: b,
                   b: v + tile.offset * a, ldb: a, beta: 0, c: c + tile.offset * a, ldc: a)
        }
    }
}

/// LAPACK workspace for eigendecompositions, one per worker thread, grown to the largest
/// block on first use and then reused.
final class EigenWorkspace<Scalar: KFACScalar> {
    private(set) var work: AlignedBuffer<Scalar>
    private(set) var iwork: UnsafeMutablePointer<Int32>
    private(set) var iworkCount = 0
    private var dimension = -1

    init() throws(KFACError) {
        work = try AlignedBuffer(rows: 1, columns: 1)
        iwork = .allocate(capacity: 1)
    }

    func reserve(dimension n: Int) throws(KFACError) {
        guard n > dimension else { return }
        let (w, iw) = Scalar.symmetricEigenWorkspace(n: n)
        guard w <= Int(Int32.max), iw <= Int(Int32.max) else {
            throw KFACError(.sizeOverflow, "the eigensolver's workspace for a \(n)×\(n) factor exceeds LAPACK's 32-bit sizes; use the Cholesky strategy")
        }
        work = try AlignedBuffer(rows: 1, columns: w)
        iwork.deallocate()
        iwork = .allocate(capacity: Swift.max(iw, 1))
        iworkCount = iw
        dimension = n
    }

    deinit { iwork.deallocate() }
}
