/// The inverse exchange as an allgatherv (`kfac_distributed_*_gathered_inverses_*`): each rank
/// sends only the units it computed, instead of every block's image with zeros elsewhere.
///
/// Layout: the units the next step inverts (of the blocks `planStepInversions` marks), in the
/// fixed order (block, input side before output side, unique block), each unit as the scalar
/// ranges of its block's inverse image (`KroneckerInverse.unitRanges`). Rank r's segment holds
/// its own units in that order; the segments are concatenated in rank order, as MPI_Allgatherv
/// with displacements = prefix sums of the counts. The unpack scatters every unit back into a
/// full image pack and installs it as `unpackInverses` does: the same bits as the SUM route.
extension KFACOptimizer {
    /// One unit of the gathered exchange.
    struct GatheredUnit {
        var imageOffset: Int
        var ranges: [Range<Int>]
        var owner: Int
        var count: Int { ranges.reduce(0) { $0 + $1.count } }
    }

    /// The units the next step inverts, in exchange order, and the full image pack's length.
    private func gatheredUnits() throws(KFACError) -> (units: [GatheredUnit], fullCount: Int) {
        let full = try inversePackCount()
        let params = stepParameters(), strategy = params.inverseStrategy
        let any = try planStepInversions(params, folding: shouldFoldFactors(at: stepCount))
        let assignment = inverseAssignment()
        var units: [GatheredUnit] = []
        var offset = 0
        for k in estimator.blocks.indices {
            let c = estimator.blocks[k]
            let inverse = try c.stagingInverse(for: strategy)
            if any && estimator.invertBlock[k] {
                for side in [FactorSide.input, .output] {
                    let count = (side == .input ? c.input : c.output).structure.uniqueSizes.count
                    for q in 0..<count {
                        guard let ranges = inverse.unitRanges(side, q) else {
                            throw KFACError(.unsupported, "the \(strategy) inverses cannot be exchanged by unit")
                        }
                        units.append(GatheredUnit(imageOffset: offset, ranges: ranges,
                                                  owner: assignment.owner(block: k, side: side, unique: q)))
                    }
                }
            }
            offset += imageCount(inverse)
        }
        return (units, full)
    }

    /// Values per rank of the gathered inverse exchange the next step needs (all zero when it
    /// inverts nothing); the displacements are their prefix sums.
    public func gatheredInverseCounts() throws(KFACError) -> [Int] {
        var counts = [Int](repeating: 0, count: distributed.size)
        for u in try gatheredUnits().units { counts[u.owner] += u.count }
        return counts
    }

    private func fullInverseScratch(_ count: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        try CollectiveBuffers.reserve(&distributed.collectives.fullInverses, count)
    }

    /// Computes this rank's units (as `packInverses`) and writes only them, in exchange order:
    /// `gatheredInverseCounts()[rank]` values. Nothing committed changes; on an error after the
    /// size checks the buffer is filled with NaN.
    public func packOwnedInverses(into out: UnsafeMutablePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let out else { throw KFACError(.nullPointer, "inverse buffer is NULL") }
        let (units, full) = try gatheredUnits()
        let mine = units.reduce(0) { $0 + ($1.owner == distributed.rank ? $1.count : 0) }
        guard count == mine else {
            throw KFACError(.invalidSize, "this rank's gathered inverse buffer must hold exactly \(mine) values, got \(count)")
        }
        do throws(KFACError) {
            let scratch = try fullInverseScratch(full)
            try packInverses(into: scratch.base, count: full)
            var w = 0
            for u in units where u.owner == distributed.rank {
                for r in u.ranges {
                    (out + w).update(from: scratch.base + u.imageOffset + r.lowerBound, count: r.count)
                    w += r.count
                }
            }
        } catch {
            out.initialize(repeating: .nan, count: count)
            throw error
        }
    }

    /// Installs the gathered segments of every rank (rank order, `gatheredInverseCounts()`
    /// values each) as the inverses the next `step` commits. On error nothing changed.
    public func unpackGatheredInverses(from p: UnsafePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let p else { throw KFACError(.nullPointer, "inverse buffer is NULL") }
        let (units, full) = try gatheredUnits()
        var cursor = [Int](repeating: 0, count: distributed.size + 1)
        for u in units { cursor[u.owner + 1] += u.count }
        for r in 0..<distributed.size { cursor[r + 1] += cursor[r] }
        guard count == cursor[distributed.size] else {
            throw KFACError(.invalidSize, "the gathered inverse buffer must hold exactly \(cursor[distributed.size]) values, got \(count)")
        }
        guard Scalar.allFinite(p, count: count) else {
            throw KFACError(.nonFinite, "the gathered inverses contain NaN or Inf (an inversion failed on some rank)")
        }
        let scratch = try fullInverseScratch(full)
        scratch.base.initialize(repeating: 0, count: full)
        for u in units {
            for r in u.ranges {
                (scratch.base + u.imageOffset + r.lowerBound).update(from: p + cursor[u.owner], count: r.count)
                cursor[u.owner] += r.count
            }
        }
        try unpackInverses(from: scratch.base, count: full)
    }
}
