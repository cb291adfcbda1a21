/// The inverse exchange as an allgatherv (`kfac_distributed_*_gathered_inverses_*`): each rank
/// sends only the units it computed, instead of every block's image with zeros elsewhere.
///
/// Layout: the units the next step inverts (of the blocks `planStepInversions` marks), in the
/// fixed order (block, input side before output side, unique block), each unit as the scalar
/// ranges of its block's inverse image (`KroneckerInverse.unitRanges`). Rank r's segment holds
/// its own units in that order; the segments are concatenated in rank order, as MPI_Allgatherv
/// with displacements = prefix sums of the counts. The unpack scatters every unit back into a
/// full image pack and installs it as `unpackInverses` does: the same bits as the SUM route.
/// One unit of the gathered exchange: its scalar ranges in the full image pack, its owner.
struct GatheredUnit {
    var ranges: InverseUnitRanges
    var owner: Int
    var count: Int { ranges.count }
}

extension KFACOptimizer {
    /// The units the next step inverts, in exchange order, into `distributed.gatheredUnits`
    /// (kept with its capacity: after warm-up nothing is allocated); returns the full image
    /// pack's length.
    @discardableResult
    private func planGatheredUnits() throws(KFACError) -> Int {
        let full = try inversePackCount()
        let params = stepParameters(), strategy = params.inverseStrategy
        let any = try planStepInversions(params, folding: shouldFoldFactors(at: stepCount))
        let assignment = inverseAssignment()
        distributed.gatheredUnits.removeAll(keepingCapacity: true)
        var offset = 0
        for k in estimator.blocks.indices {
            let c = estimator.blocks[k]
            let inverse = try c.stagingInverse(for: strategy)
            if any && estimator.invertBlock[k] {
                for s in 0..<2 {
                    let side: FactorSide = s == 0 ? .input : .output
                    let count = (side == .input ? c.input : c.output).structure.uniqueSizes.count
                    for q in 0..<count {
                        guard let ranges = inverse.unitRanges(side, q) else {
                            throw KFACError(.unsupported, "the \(strategy) inverses cannot be exchanged by unit")
                        }
                        distributed.gatheredUnits.append(GatheredUnit(ranges: ranges.shifted(by: offset),
                                                                      owner: assignment.owner(block: k, side: side, unique: q)))
                    }
                }
            }
            offset += imageCount(inverse)
        }
        // Block-tridiagonal links: one unit per linked layer, its whole image.
        if let links = tridiagonal, try planTridiagonalStep(folding: shouldFoldFactors(at: stepCount), inverting: shouldInvert(at: stepCount)) {
            for i in 0..<links.linkedLayers.count {
                let l = links.linkedLayers[i], n = links.inverseImageCount(layer: l)
                distributed.gatheredUnits.append(GatheredUnit(ranges: InverseUnitRanges(offset..<offset + n), owner: linkOwner(layer: l)))
                offset += n
            }
        }
        return full
    }

    /// Values per rank of the gathered inverse exchange the next step needs (all zero when it
    /// inverts nothing); the displacements are their prefix sums.
    public func gatheredInverseCounts() throws(KFACError) -> [Int] {
        try planGatheredUnits()
        var counts = [Int](repeating: 0, count: distributed.size)
        let units = distributed.gatheredUnits
        for i in units.indices { counts[units[i].owner] += units[i].count }
        return counts
    }

    /// `gatheredInverseCounts` into the caller's counts[size] and, when not nil,
    /// displacements[size] (their prefix sums), without allocating after warm-up.
    public func gatheredInverseLayout(counts: UnsafeMutablePointer<Int64>, displacements: UnsafeMutablePointer<Int64>?) throws(KFACError) {
        try planGatheredUnits()
        counts.initialize(repeating: 0, count: distributed.size)
        let units = distributed.gatheredUnits
        for i in units.indices { counts[units[i].owner] += Int64(units[i].count) }
        if let displacements {
            var total: Int64 = 0
            for r in 0..<distributed.size {
                displacements[r] = total
                total += counts[r]
            }
        }
    }

    private func fullInverseScratch(_ count: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        try CollectiveBuffers.reserve(&distributed.collectives.fullInverses, count)
    }

    /// Copies unit `u`'s scalars between a full image pack and a segment cursor.
    private static func copyUnit(_ u: GatheredUnit, full: UnsafeMutablePointer<Scalar>, segment: UnsafeMutablePointer<Scalar>,
                                 toSegment: Bool) {
        let (a, b) = (u.ranges.first, u.ranges.second)
        if toSegment {
            segment.update(from: full + a.lowerBound, count: a.count)
            (segment + a.count).update(from: full + b.lowerBound, count: b.count)
        } else {
            (full + a.lowerBound).update(from: segment, count: a.count)
            (full + b.lowerBound).update(from: segment + a.count, count: b.count)
        }
    }

    /// Computes this rank's units (as `packInverses`) and writes only them, in exchange order:
    /// `gatheredInverseCounts()[rank]` values. Nothing committed changes; on an error after the
    /// size checks the buffer is filled with NaN.
    public func packOwnedInverses(into out: UnsafeMutablePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let out else { throw KFACError(.nullPointer, "inverse buffer is NULL") }
        let full = try planGatheredUnits()
        var mine = 0
        let planned = distributed.gatheredUnits
        for i in planned.indices where planned[i].owner == distributed.rank { mine += planned[i].count }
        guard count == mine else {
            throw KFACError(.invalidSize, "this rank's gathered inverse buffer must hold exactly \(mine) values, got \(count)")
        }
        do throws(KFACError) {
            let scratch = try fullInverseScratch(full)
            try packInverses(into: scratch.base, count: full)
            // packInverses re-plans the same units (the same step, layers and parameters).
            var w = 0
            let units = distributed.gatheredUnits
            for i in units.indices where units[i].owner == distributed.rank {
                Self.copyUnit(units[i], full: scratch.base, segment: out + w, toSegment: true)
                w += units[i].count
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
        let full = try planGatheredUnits()
        let size = distributed.size
        if distributed.collectives.cursor.count != size + 1 {
            distributed.collectives.cursor = [Int](repeating: 0, count: size + 1)
        }
        var cursor = distributed.collectives.cursor  // moved out while `distributed` changes below
        distributed.collectives.cursor = []
        defer { distributed.collectives.cursor = cursor }
        let units = distributed.gatheredUnits
        for r in 0...size { cursor[r] = 0 }
        for i in units.indices { cursor[units[i].owner + 1] += units[i].count }
        for r in 0..<size { cursor[r + 1] += cursor[r] }
        guard count == cursor[size] else {
            throw KFACError(.invalidSize, "the gathered inverse buffer must hold exactly \(cursor[size]) values, got \(count)")
        }
        guard Scalar.allFinite(p, count: count) else {
            throw KFACError(.nonFinite, "the gathered inverses contain NaN or Inf (an inversion failed on some rank)")
        }
        let scratch = try fullInverseScratch(full)
        scratch.base.initialize(repeating: 0, count: full)
        for i in units.indices {
            let u = units[i]
            Self.copyUnit(u, full: scratch.base, segment: UnsafeMutablePointer(mutating: p) + cursor[u.owner], toSegment: false)
            cursor[u.owner] += u.count
        }
        try unpackInverses(from: try fullInverseScratch(full).base, count: full)
    }
}
