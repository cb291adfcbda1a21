/// Which rank of a distributed run computes each inversion unit — one unique block of one side
/// of one Kronecker block (conv groups are separate Kronecker blocks, channel groups and the
/// bias coordinate separate unique blocks).
///
/// Longest processing time first: units by cost n³ (an eigendecomposition or a Cholesky
/// inverse of an n×n block), largest first, ties in the fixed order (Kronecker block, input
/// side before output side, unique block); each goes to the rank with the least assigned cost,
/// the lowest rank on a tie. Every rank derives the same assignment from the same layers.
struct InverseAssignment: Sendable {
    let size: Int
    /// Per Kronecker block: the index of its first unit (input side's blocks, then output side's).
    let unitBase: [Int]
    let inputUnits: [Int]
    /// Per unit: its rank.
    let owners: [Int]
    /// Per rank: its assigned cost Σ n³.
    let loads: [Double]

    init(sides: [(input: [Int], output: [Int])], size: Int) {
        self.size = size
        var base: [Int] = [], inputs: [Int] = [], sizes: [Int] = []
        for s in sides {
            base.append(sizes.count)
            inputs.append(s.input.count)
            sizes += s.input
            sizes += s.output
        }
        unitBase = base
        inputUnits = inputs
        let order = sizes.indices.sorted { sizes[$0] != sizes[$1] ? sizes[$0] > sizes[$1] : $0 < $1 }
        var owners = [Int](repeating: 0, count: sizes.count)
        var loads = [Double](repeating: 0, count: size)
        for u in order {
            var best = 0
            for r in 1..<Swift.max(size, 1) where loads[r] < loads[best] { best = r }
            owners[u] = best
            let n = Double(sizes[u])
            loads[best] += n * n * n
        }
        self.owners = owners
        self.loads = loads
    }

    func unit(block k: Int, side: FactorSide, unique q: Int) -> Int {
        unitBase[k] + (side == .input ? q : inputUnits[k] + q)
    }

    func owner(block k: Int, side: FactorSide, unique q: Int) -> Int {
        owners[unit(block: k, side: side, unique: q)]
    }

    /// (Σ cost / size) / the largest rank's cost: 1 is a perfect balance.
    var efficiency: Double {
        let total = loads.reduce(0, +), largest = loads.max() ?? 0
        return largest > 0 ? total / Double(size) / largest : 1
    }
}

/// Which inversion units `BlockDiagonalEstimator.stageInverses` computes.
enum InversionUnitFilter {
    /// Every unit (a single process, or inverses not exchanged).
    case all
    /// None: the staging inverses already hold the exchanged ones.
    case none
    /// The units `rank` owns.
    case owned(InverseAssignment, rank: Int)

    func includes(block k: Int, side: FactorSide, unique q: Int) -> Bool {
        switch self {
        case .all: return true
        case .none: return false
        case .owned(let a, let rank): return a.owner(block: k, side: side, unique: q) == rank
        }
    }
}
