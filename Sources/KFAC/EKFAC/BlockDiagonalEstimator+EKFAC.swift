/// EKFAC in the block-diagonal estimator: paired recording, and S staged with the step's other
/// staged state so that a failing step leaves it as it was.
///
/// Schedule of S (per block, strategy EKFAC):
/// - new bases (an inversion: the step's, or update_inverses): S = S_batch of the pending paired
///   statistics in the new bases if any are pending, else d_G d_Aᵀ; the pending ones are used up;
/// - a factor update without new bases, with paired statistics pending: S ← β_S S + (1 − β_S)
///   S_batch in the current bases (the block's inverse is re-staged with copied bases, so that
///   the step commits it like an inversion);
/// - every factor update clears the paired statistics (like the factors' pending rows).
extension BlockDiagonalEstimator {
    /// Validates and records a paired call (see `PairedRecordingLayer`); `keep` says whether
    /// the per-example gradients are kept (only the EKFAC strategy uses them).
    func recordPaired(layer l: Int, inputs: UnsafePointer<Scalar>?, outputGradients: UnsafePointer<Scalar>?, rows: Int,
                      rowsPerExample: Int, scale: Double, perExample: Bool, keep: Bool) throws(KFACError) {
        let (b, inputBound) = try checkedRecord(inputs, layer: l, rows: rows, outputSide: false, scale: 1)
        let (_, gradientBound) = try checkedRecord(outputGradients, layer: l, rows: rows, outputSide: true, scale: scale)
        guard rowsPerExample >= 1, rows % rowsPerExample == 0 else {
            throw KFACError(.invalidSize, "rows_per_example must be >= 1 and divide rows (\(rows)), got \(rowsPerExample)")
        }
        guard let layer = b as? any PairedRecordingLayer<Scalar> else {
            throw KFACError(.invalidArgument, "layer \(l) does not support paired recording")
        }
        var pairedBound = 0.0
        if keep {
            // S sums the squares of rotated per-example gradients, each entry at most ‖G_n‖_F:
            // bound them as the factors' pending sums are bounded — with what earlier calls
            // left pending (issue 15: every call within the bound could overflow together).
            var positions = rowsPerExample
            if case .conv2d(let g, _, _) = b.layer { positions = g.outputPositions }
            let mx = Swift.max(Double(Scalar.largestMagnitude(inputs!, count: b.inputValueCount(rows: rows))), 1)
            let mg = Double(Scalar.largestMagnitude(outputGradients!, count: b.outputGradientValueCount(rows: rows)))
            let m = Swift.max(mx * mg * scale * Double(positions), 1)
            let bound = m * m * Double(b.layer.inputFactorDimension) * Double(b.layer.outputFactorDimension) * Double(rows)
            var pending = 0.0
            let blocks = b.blocks  // (indices, not for-in: iterating allocates in debug builds)
            for k in blocks.indices { pending = Swift.max(pending, blocks[k].paired?.pendingMagnitude ?? 0) }
            guard bound + pending <= KroneckerFactor<Scalar>.pendingLimit else {
                throw KFACError(.nonFinite, pending > 0
                                ? "inputs and output gradients of layer \(l) are too large for the paired statistics already pending: the second moments of their per-example gradients would overflow \(Scalar.self); fold or discard the pending statistics"
                                : "inputs and output gradients of layer \(l) are too large: the second moments of their per-example gradients would overflow \(Scalar.self)")
            }
            pairedBound = bound
        }
        try layer.recordPaired(inputs!, outputGradients!, rows: rows, rowsPerExample: rowsPerExample, scale: Scalar(scale),
                               perExample: perExample, keep: keep, ones: ones)
        let blocks = b.blocks  // the factors' pending sums grew as with two record calls (issue 15)
        for k in blocks.indices {
            blocks[k].input.notePending(magnitude: inputBound)
            blocks[k].output.notePending(magnitude: gradientBound)
            if keep { blocks[k].paired?.notePending(magnitude: pairedBound) }
        }
        statisticsStarted = true
    }

    /// After `stageInverses` of a step (or of update_inverses), for the EKFAC strategy: S of
    /// every block inverted now (into its staging inverse), and, when `folding`, S folded for
    /// blocks with paired statistics that are not inverted (marking them inverted: their
    /// factors' folds and a staging inverse with copied bases are staged).
    ///
    /// `reduced` (a distributed run, after `kfac_distributed_unpack_scalings_*`): per block, the
    /// union's Σ_n (Q_Gᵀ G_n Q_A)^∘2 (o × a) and its divisor, used instead of this rank's paired
    /// statistics (`scalingPackOffsets` order).
    func stageScalings(folding: Bool, settings: CurvatureSettings, reduced: UnsafePointer<Scalar>? = nil) throws(KFACError) {
        guard settings.strategy == .ekfac else { return }
        if let reduced { return try stageReducedScalings(reduced, folding: folding, settings: settings) }
        let decay = Scalar(settings.ekfacDecay)
        for k in blocks.indices {
            let c = blocks[k]
            if let p = c.paired { p.consumed = false }
            let pending = c.paired?.hasPending ?? false
            if invertBlock[k] {
                guard pending, let p = c.paired else { continue }
                let staged = try c.stagingInverse(for: .ekfac) as! EKFACInverse<Scalar>
                p.batchScaling(in: staged, into: staged.scaling.base)
                p.consumed = true
            } else if folding, pending, let p = c.paired, let committed = c.inverse as? EKFACInverse<Scalar> {
                let factorDecay = Scalar(settings.factorDecay)
                _ = try c.input.stageFold(decay: factorDecay)
                _ = try c.output.stageFold(decay: factorDecay)
                let staged = try c.stagingInverse(for: .ekfac) as! EKFACInverse<Scalar>
                staged.copyBases(from: committed)
                p.foldedScaling(committed.scaling.base, decay: decay, in: committed, into: staged.scaling.base)
                p.consumed = true
                invertBlock[k] = true
            }
        }
    }

    /// `stageScalings` from the union's sums and divisors (see there).
    private func stageReducedScalings(_ reduced: UnsafePointer<Scalar>, folding: Bool, settings: CurvatureSettings) throws(KFACError) {
        let decay = Scalar(settings.ekfacDecay)
        var w = 0
        for k in blocks.indices {
            let c = blocks[k]
            let n = c.input.dimension * c.output.dimension
            let sums = reduced + w, divisor = reduced[w + n]
            w += n + 1
            if let p = c.paired { p.consumed = false }
            guard divisor > 0 else { continue }
            let scale = 1 / divisor
            if invertBlock[k] {
                // New bases: S = the union's S_batch in them.
                let staged = try c.stagingInverse(for: .ekfac) as! EKFACInverse<Scalar>
                for i in 0..<n { staged.scaling.base[i] = scale * sums[i] }
            } else if folding, let committed = c.inverse as? EKFACInverse<Scalar> {
                // S ← β S + (1 − β) S_batch in the committed bases (staged like an inversion).
                let factorDecay = Scalar(settings.factorDecay)
                _ = try c.input.stageFold(decay: factorDecay)
                _ = try c.output.stageFold(decay: factorDecay)
                let staged = try c.stagingInverse(for: .ekfac) as! EKFACInverse<Scalar>
                staged.copyBases(from: committed)
                let s = committed.scaling.base, out = staged.scaling.base
                for i in 0..<n { out[i] = (1 - decay) * (scale * sums[i]) + decay * s[i] }
                invertBlock[k] = true
            } else {
                continue
            }
            c.paired?.consumed = true
        }
    }

    /// This rank's share of the scaling exchange, into `out` (`scalingPackCount` values, block by
    /// block: o × a sums Σ_n (Q_Gᵀ G_n Q_A)^∘2 over this rank's pending examples, then their
    /// divisor), for the blocks whose S the step at hand sets: those it inverts (in the staged
    /// bases, `staged`) and, when `folding`, those with an EKFAC inverse (in the committed
    /// bases). Zeros elsewhere. Changes nothing but scratch.
    func packScalings(into out: UnsafeMutablePointer<Scalar>, folding: Bool, inverting: Bool) throws(KFACError) {
        var w = 0
        for k in blocks.indices {
            let c = blocks[k]
            let n = c.input.dimension * c.output.dimension
            (out + w).initialize(repeating: 0, count: n + 1)
            defer { w += n + 1 }
            guard let p = c.paired, p.hasPending else { continue }
            let bases: EKFACInverse<Scalar>
            if inverting && invertBlock[k] {
                bases = try c.stagingInverse(for: .ekfac) as! EKFACInverse<Scalar>
            } else if folding, let committed = c.inverse as? EKFACInverse<Scalar> {
                bases = committed
            } else {
                continue
            }
            p.batchScaling(in: bases, into: out + w, unscaled: true)
            out[w + n] = Scalar(p.pendingDivisor)
        }
    }

    /// Values of a scaling pack: per block, o × a then one divisor.
    var scalingPackCount: Int {
        var total = 0
        for k in blocks.indices { total += blocks[k].input.dimension * blocks[k].output.dimension + 1 }
        return total
    }

    /// After a step's (or update_inverses') commit: clears the paired statistics it used, and all
    /// of them at a factor update.
    func commitPairedStatistics(folding: Bool) {
        for k in blocks.indices {
            guard let p = blocks[k].paired else { continue }
            if folding || p.consumed { p.clear() }
        }
    }

    /// kfac_optimizer_discard_statistics: drops the per-example gradients recorded since the
    /// last fold, with the factors' pending rows they were recorded with.
    func discardPairedStatistics() {
        for k in blocks.indices { blocks[k].paired?.clear() }
    }

    /// update_factors with the EKFAC strategy, before the factors fold: S folded into each
    /// block's staged buffer where the block has an EKFAC inverse and paired statistics.
    /// Returns whether any was staged.
    func stageScalingFolds(settings: CurvatureSettings) throws(KFACError) {
        guard settings.strategy == .ekfac else { return }
        let decay = Scalar(settings.ekfacDecay)
        for k in blocks.indices {
            let c = blocks[k]
            if let p = c.paired { p.consumed = false }
            guard let p = c.paired, p.hasPending, let inverse = c.inverse as? EKFACInverse<Scalar> else { continue }
            let s = try p.reserveStagedScaling()
            p.foldedScaling(inverse.scaling.base, decay: decay, in: inverse, into: s.base)
            p.consumed = true
        }
    }

    /// update_factors' commit (after the factors folded): installs the staged S and clears the
    /// paired statistics used. Blocks without an EKFAC inverse keep theirs for the first bases,
    /// unless `clearingAll` (another strategy: nothing will use them).
    func commitScalingFolds(clearingAll: Bool) {
        if clearingAll {
            commitPairedStatistics(folding: true)
            return
        }
        for k in blocks.indices {
            let c = blocks[k]
            guard let p = c.paired, p.consumed, let inverse = c.inverse as? EKFACInverse<Scalar>,
                  let s = p.stagedScaling else { continue }
            inverse.scaling.copyContents(from: s)
            p.clear()
        }
    }

    /// S of block `group` of layer `l` (output × input dimension, the bases' coordinates).
    func ekfacScaling(layer l: Int, group: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        let c = try block(layer: l, group: group)
        guard let inverse = c.inverse as? EKFACInverse<Scalar> else {
            throw KFACError(.noInverses, "layer \(l) has no EKFAC inverse (set the EKFAC strategy and update the inverses)")
        }
        return inverse.scaling
    }

    // MARK: State image

    /// The EKFAC section: per block, u64 has paired statistics, then their section.
    func writePaired(to w: inout StateWriter) {
        for k in blocks.indices {
            if let p = blocks[k].paired, p.hasPending {
                w.u64(1)
                p.write(to: &w)
            } else {
                w.u64(0)
            }
        }
    }

    /// Reads the EKFAC section into the blocks of `restored` layers (fresh, from `read`).
    func readPaired(from r: inout StateReader, into restored: [any CurvatureLayer<Scalar>]) throws(KFACError) {
        for layer in restored {
            for c in layer.blocks where try r.flag() {
                try c.pairedStatistics().read(from: &r)
            }
        }
    }
}
