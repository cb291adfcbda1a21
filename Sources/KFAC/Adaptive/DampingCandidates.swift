/// Where a γ candidate's directions are.
enum CandidateSlot: Int, Sendable {
    /// The step's own directions (the current γ): `AdaptiveState.stepDirection`.
    case current = 0
    /// γ·ω₂.
    case larger = 1
    /// γ/ω₂.
    case smaller = 2
}

/// One candidate for the factor damping γ of a step: where its directions U are, its γ, KL
/// scale ν and the inner products ⟨V, U⟩, ‖U‖², ⟨U, δ₀⟩ the quadratic model needs.
struct DampingCandidate {
    var slot: CandidateSlot
    var damping: Double
    var klScale: Double
    var vu = 0.0, uu = 0.0, up = 0.0
}

/// The re-choice of the factor damping γ (Martens & Grosse 2015, §6.6): the candidates of the
/// last step and, per block, the directions of candidates `.larger` and `.smaller` and, for a
/// representation whose damping is baked in, the inverses they were computed with.
final class DampingCandidates<Scalar: KFACScalar> {
    /// The candidates of the last step, `.current` first.
    var list: [DampingCandidate] = []
    /// The strategy the last step's candidates were computed with.
    var strategy = InverseStrategy.eigen
    /// Per slot (`.larger`, `.smaller`), per block.
    private(set) var directions: [[AlignedBuffer<Scalar>]] = []
    private(set) var inverses: [[any KroneckerInverse<Scalar>]] = []
    /// The strategy of `inverses` (kept apart: reading it through an inverse existential
    /// allocates).
    private var inverseStrategy: InverseStrategy?

    init() {
        list.reserveCapacity(3)
    }

    /// Index into `directions` and `inverses` of a slot other than `.current`.
    private func index(_ slot: CandidateSlot) -> Int { slot.rawValue - 1 }

    /// Allocates the candidates' buffers (before a γ step commits).
    func reserve(_ blocks: [KroneckerBlock<Scalar>], strategy: InverseStrategy) throws(KFACError) {
        if directions.isEmpty || directions[0].count != blocks.count {
            var d: [[AlignedBuffer<Scalar>]] = [[], []]
            for slot in 0..<2 {
                for c in blocks { d[slot].append(try AlignedBuffer(rows: c.direction.rows, columns: c.direction.columns)) }
            }
            directions = d
        }
        if strategy.dampingIsBakedIn
            && (inverses.isEmpty || inverses[0].count != blocks.count || inverseStrategy != strategy) {
            var i: [[any KroneckerInverse<Scalar>]] = [[], []]
            for slot in 0..<2 {
                for c in blocks { i[slot].append(try c.makeInverse(strategy)) }
            }
            inverses = i
            inverseStrategy = strategy
        }
    }

    func directions(_ slot: CandidateSlot) -> [AlignedBuffer<Scalar>] { directions[index(slot)] }
    func inverses(_ slot: CandidateSlot) -> [any KroneckerInverse<Scalar>] { inverses[index(slot)] }

    /// Makes candidate `slot`'s inverses the committed ones of `blocks`, and the committed ones
    /// that candidate's.
    func adoptInverses(_ slot: CandidateSlot, into blocks: [KroneckerBlock<Scalar>]) {
        let s = index(slot)
        for k in blocks.indices { blocks[k].exchangeInverse(&inverses[s][k]) }
    }
}
