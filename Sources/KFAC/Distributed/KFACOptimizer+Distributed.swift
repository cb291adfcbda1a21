/// Distributed runs without a communication engine in the library (`kfac_distributed_*`): the
/// caller's engine (MPI, torch.distributed, …) sum-allreduces buffers that the optimizer packs
/// and unpacks.
///
/// Per step, on every rank, with the gradient averaged over the union batch by the caller:
/// 1. statistics, when `reduceDue(.statistics)`: `packStatistics`, SUM-allreduce, `unpackStatistics`.
///    Eager mode packs the pending sums Σ x xᵀ (upper triangles) and row counts, so the folded
///    factor is the union batch's whatever the local batch sizes. Lazy mode packs each rank's
///    moving average (with its pending statistics folded in when the step folds; on a step that
///    does not fold they stay pending for their fold, as in one process) and averages them: the union
///    batch's factors only when every rank records the same number of rows per fold.
/// 2. inverses, when `reduceDue(.inverses)`: `packInverses` computes the units this rank owns
///    (`InverseAssignment`) and writes every Kronecker block's inverse image with zeros for the
///    units it does not own; after the SUM-allreduce each unit holds its owner's values exactly
///    (x + 0 = x), so `unpackInverses` gives every rank bit-identical inverses, which the next
///    `step` uses instead of computing them.
/// 3. `step` as in a single process.
/// A call that throws changes nothing committed; a failed `packInverses` fills the buffer with
/// NaN so that the allreduce still runs and `unpackInverses` fails on every rank alike.
struct DistributedState<Scalar: KFACScalar> {
    var rank = 0
    var size = 1
    var assignment: InverseAssignment?
    var assignmentKey: ObjectIdentifier?
    var scratch: AlignedBuffer<Scalar>?
    var zeros: AlignedBuffer<Scalar>?
    var prepared: PreparedInverses?
    /// The step (and layers) whose statistics `unpackStatistics` already replaced by the union's,
    /// so that a retried exchange does not count them again.
    var statisticsReduced: (step: Int, blocks: ObjectIdentifier?)?
    /// The buffers of `exchange(through:)`.
    var collectives = CollectiveBuffers<Scalar>()
    /// The units of the gathered inverse exchange (`planGatheredUnits`), kept with their capacity.
    var gatheredUnits: [GatheredUnit] = []
    /// EKFAC: the union's scaling sums and divisors that `unpackScalings` installed, and the step
    /// (and layers) they are for.
    var scalingSums: AlignedBuffer<Scalar>?
    var preparedScaling: (step: Int, blocks: ObjectIdentifier?)?
    /// Block-tridiagonal links: the step (layers, damping) whose link inverses `unpackInverses`
    /// left in the links' staging set.
    var preparedLinks: (step: Int, blocks: ObjectIdentifier?, damping: Double, pi: Bool)?

    /// Inverses an `unpackInverses` left in the staging inverses, for the step `step`.
    struct PreparedInverses {
        var step: Int
        var strategy: InverseStrategy
        var damping: Double
        var generation: Int
        var blocks: ObjectIdentifier?
    }
}

/// What a distributed exchange carries (`kfac_distributed_what`).
public enum DistributedExchange: Int32, Sendable, CaseIterable {
    case statistics = 0
    case inverses = 1
    /// EKFAC's scaling S: per-example second moments in the (exchanged) bases.
    case scalings = 2
}

extension KFACOptimizer {
    // MARK: World

    public var worldRank: Int { distributed.rank }
    public var worldSize: Int { distributed.size }

    /// Sets this handle's rank among `size` processes (1 = a single process, the default).
    public func setWorld(rank: Int, size: Int) throws(KFACError) {
        guard size >= 1, size <= 1 << 24 else { throw KFACError(.invalidArgument, "world size must be in [1, 2^24], got \(size)") }
        guard rank >= 0, rank < size else { throw KFACError(.invalidArgument, "rank must be in [0, \(size)), got \(rank)") }
        distributed.rank = rank
        distributed.size = size
        distributed.assignment = nil
        distributed.prepared = nil
        distributed.statisticsReduced = nil
        distributed.preparedScaling = nil
        distributed.preparedLinks = nil
    }

    /// The assignment of inversion units to ranks for the current layers.
    func inverseAssignment() -> InverseAssignment {
        let blocks = estimator.blocks
        let key = blocksKey
        if let a = distributed.assignment, a.size == distributed.size, distributed.assignmentKey == key,
           a.unitBase.count == blocks.count {
            return a
        }
        let a = InverseAssignment(sides: blocks.map { ($0.input.structure.uniqueSizes, $0.output.structure.uniqueSizes) },
                                  size: distributed.size)
        distributed.assignment = a
        distributed.assignmentKey = key
        return a
    }

    /// The rank that computes unique block `unique` of side `side` of group `group` of `layer`.
    /// `outputSide`: G's blocks, else A's.
    public func inverseOwner(layer: Int, group: Int, outputSide: Bool, unique: Int) throws(KFACError) -> Int {
        let side: FactorSide = outputSide ? .output : .input
        let c = try estimator.block(layer: layer, group: group)
        let count = (side == .input ? c.input : c.output).structure.uniqueSizes.count
        guard unique >= 0, unique < count else {
            throw KFACError(.invalidArgument, "block \(unique) is out of range: that factor has blocks 0..<\(count)")
        }
        let k = estimator.layerBlocks[layer].lowerBound + group
        return inverseAssignment().owner(block: k, side: side, unique: unique)
    }

    /// The load balance of the inverse assignment: (Σ n³ / size) / the busiest rank's Σ n³.
    public var inverseAssignmentEfficiency: Double { inverseAssignment().efficiency }

    // MARK: Schedule

    /// Whether the next `step` inverts some block (as `planStepInversions` decides, without
    /// marking anything).
    private func stepInvertsAny() -> Bool {
        let p = stepParameters()
        let invertForCandidates = isDampingCandidateStep(at: stepCount) && p.inverseStrategy.dampingIsBakedIn
        if invertForCandidates { return !estimator.blocks.isEmpty }
        guard p.inverseUpdatePeriod > 0 else { return false }
        let phase = spreadPhase(at: stepCount)
        if phase != nil { spread.prepare(estimator.blocks, period: p.inverseUpdatePeriod) }
        let inverting = shouldInvert(at: stepCount)
        for k in estimator.blocks.indices where !estimator.isExcluded(estimator.blockLayer[k]) {
            let due = phase.map { spread.phase[k] == $0 } ?? inverting
            if due || !estimator.blocks[k].hasInverse(for: p.inverseStrategy) { return true }
        }
        return linksInvert()
    }

    /// Whether the next `step` inverts the block-tridiagonal links (as `planTridiagonalStep`).
    func linksInvert() -> Bool {
        guard let links = tridiagonal, !links.links.isEmpty else { return false }
        return parameters.inverseUpdatePeriod > 0 && (shouldInvert(at: stepCount) || !links.hasInverses)
    }

    /// The rank that computes linked layer `l`'s block-tridiagonal inverse (one unit: Ψ, C, D and
    /// Σ⁻¹ of its link up, with its damped factors' inverses): the owner of its input factor's block.
    func linkOwner(layer l: Int) -> Int {
        inverseAssignment().owner(block: estimator.layerBlocks[l].lowerBound, side: .input, unique: 0)
    }

    /// Whether the next `step` needs the exchange `what` (the same answer on every rank).
    public func exchangeDue(_ what: DistributedExchange) -> Bool {
        let inverts = stepInvertsAny()
        switch what {
        case .inverses: return inverts
        case .scalings:
            // S changes at new bases and, between them, at every fold of a block with an EKFAC
            // inverse; whether any rank recorded paired rows is only known after the exchange.
            guard parameters.inverseStrategy == .ekfac, tridiagonal == nil else { return false }
            if let done = distributed.preparedScaling, done.step == stepCount, done.blocks == blocksKey { return false }
            if inverts { return true }
            guard shouldFoldFactors(at: stepCount) else { return false }
            let blocks = estimator.blocks
            for k in blocks.indices where blocks[k].inverse is EKFACInverse<Scalar> { return true }
            return false
        case .statistics:
            if let done = distributed.statisticsReduced, done.step == stepCount,
               done.blocks == blocksKey {
                return false
            }
            return parameters.distributedReduce == .eager ? shouldFoldFactors(at: stepCount) : inverts
        }
    }

    // MARK: Statistics

    /// Values of a statistics pack: per Kronecker block, input then output factor, each unique
    /// block's upper triangle then one count.
    public var statisticsPackCount: Int {
        // (Loops over indices rather than `reduce` or for-in, which allocate in debug builds.)
        let blocks = estimator.blocks
        var n = 0
        for k in blocks.indices { n += blocks[k].input.packCount + blocks[k].output.packCount }
        if let links = tridiagonal {
            for i in 0..<links.links.count { n += links.links[i].inputs.packCount + links.links[i].gradients.packCount }
        }
        return n
    }

    /// Identifies the current layers (a new registration or a load makes new blocks).
    var blocksKey: ObjectIdentifier? {
        estimator.blocks.isEmpty ? nil : ObjectIdentifier(estimator.blocks[0])
    }

    private func packScratch() throws(KFACError) -> AlignedBuffer<Scalar> {
        let blocks = estimator.blocks
        var largest = 1
        for k in blocks.indices {
            largest = Swift.max(largest, blocks[k].input.structure.storageCount, blocks[k].output.structure.storageCount)
        }
        if let links = tridiagonal {
            for i in 0..<links.links.count { largest = Swift.max(largest, links.links[i].inputs.count, links.links[i].gradients.count) }
        }
        if let s = distributed.scratch, s.count >= largest { return s }
        let s = try AlignedBuffer<Scalar>(rows: 1, columns: largest)
        distributed.scratch = s
        return s
    }

    /// Distributed EKFAC needs folds at steps (its S folds through the scaling exchange).
    private func checkStrategySupported() throws(KFACError) {
        guard parameters.inverseStrategy != .ekfac || parameters.factorUpdatePeriod > 0 else {
            throw KFACError(.unsupported, "distributed EKFAC needs KFAC_PARAM_FACTOR_UPDATE_PERIOD >= 1 (update_factors folds S from this rank's examples alone)")
        }
        guard parameters.asyncInversion == .off else {
            throw KFACError(.unsupported, "distributed runs do not support async_inversion (the inverse exchange happens within the due step)")
        }
    }

    private func checkCount(_ count: Int, _ expected: Int, _ what: String) throws(KFACError) {
        guard count == expected else {
            throw KFACError(.invalidSize, "the \(what) buffer must hold exactly \(expected) values, got \(count)")
        }
    }

    /// Writes this rank's statistics for the caller's SUM-allreduce (eager: pending sums and row
    /// counts; lazy: moving averages and 1/0 weights). Changes nothing.
    public func packStatistics(into out: UnsafeMutablePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let out else { throw KFACError(.nullPointer, "statistics buffer is NULL") }
        try checkStrategySupported()
        try checkCount(count, statisticsPackCount, "statistics")
        let scratch = try packScratch()
        let lazy = parameters.distributedReduce == .lazy
        let decay = Scalar(parameters.factorDecay)
        let folding = shouldFoldFactors(at: stepCount)
        var w = 0
        for k in estimator.blocks.indices {
            let c = estimator.blocks[k]
            for s in 0..<2 {
                let f = s == 0 ? c.input : c.output
                if lazy { f.packAverage(into: out + w, scratch: scratch, decay: decay, folding: folding) }
                else { f.packPending(into: out + w, scratch: scratch.base) }
                w += f.packCount
            }
        }
        // Block-tridiagonal links: each cross factor as a full matrix (rectangular), then its count.
        if let links = tridiagonal {
            for i in 0..<links.links.count {
                for s in 0..<2 {
                    let f = s == 0 ? links.links[i].inputs : links.links[i].gradients
                    try f.checkAllPaired(s == 0 ? "input" : "output-gradient")
                    if lazy { f.packAverage(into: out + w, scratch: scratch, decay: decay, folding: folding) }
                    else { f.packPending(into: out + w) }
                    w += f.packCount
                }
            }
        }
    }

    /// Replaces the statistics by the SUM-allreduced pack (the mode must be the pack's): eager,
    /// the pending statistics become the union's sums and rows; lazy, each running factor
    /// becomes the mean of the ranks' averages and nothing stays pending. On error nothing changed.
    public func unpackStatistics(from p: UnsafePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let p else { throw KFACError(.nullPointer, "statistics buffer is NULL") }
        try checkStrategySupported()
        try checkCount(count, statisticsPackCount, "statistics")
        guard Scalar.allFinite(p, count: count) else { throw KFACError(.nonFinite, "the reduced statistics contain NaN or Inf") }
        let lazy = parameters.distributedReduce == .lazy
        // Read and check every count, allocate, then replace.
        var w = 0, anyRows = false
        for k in estimator.blocks.indices {
            let c = estimator.blocks[k]
            for s in 0..<2 {
                let f = s == 0 ? c.input : c.output
                w += f.packCount
                let v = Double(p[w - 1])
                guard v >= 0, v <= 9.007_199_254_740_992e15, v.rounded() == v else {
                    throw KFACError(.invalidArgument, "a reduced \(lazy ? "weight" : "row count") is \(v), not a whole number >= 0")
                }
                if v > 0 {
                    anyRows = true
                    if !lazy { try f.preparePendingReplacement() }
                }
            }
        }
        if let links = tridiagonal {
            for i in 0..<links.links.count {
                for s in 0..<2 {
                    w += (s == 0 ? links.links[i].inputs : links.links[i].gradients).packCount
                    let v = Double(p[w - 1])
                    guard v >= 0, v <= 9.007_199_254_740_992e15, v.rounded() == v else {
                        throw KFACError(.invalidArgument, "a reduced cross \(lazy ? "weight" : "row count") is \(v), not a whole number >= 0")
                    }
                }
            }
        }
        w = 0
        let folding = shouldFoldFactors(at: stepCount)
        for k in estimator.blocks.indices {
            let c = estimator.blocks[k]
            for s in 0..<2 {
                let f = s == 0 ? c.input : c.output
                let n = Int(Double(p[w + f.packCount - 1]))
                if lazy { f.replaceRunning(from: p + w, weight: n, folding: folding) } else { f.replacePending(from: p + w, rows: n) }
                w += f.packCount
            }
        }
        if let links = tridiagonal {
            for i in 0..<links.links.count {
                for s in 0..<2 {
                    let f = s == 0 ? links.links[i].inputs : links.links[i].gradients
                    let n = Int(Double(p[w + f.packCount - 1]))
                    if lazy { f.replaceRunning(from: p + w, weight: n, folding: folding) } else { f.replacePending(from: p + w, rows: n) }
                    w += f.packCount
                }
            }
        }
        if anyRows { estimator.statisticsStarted = true }
        distributed.prepared = nil
        distributed.preparedScaling = nil
        distributed.preparedLinks = nil
        distributed.statisticsReduced = (stepCount, blocksKey)
    }

    // MARK: Inverses

    /// Values of an inverse pack for the current strategy: every Kronecker block's inverse
    /// image (the representation's state-image section), in block order.
    public func inversePackCount() throws(KFACError) -> Int {
        try checkStrategySupported()
        let strategy = parameters.inverseStrategy
        var total = 0
        for k in estimator.blocks.indices {
            let c = estimator.blocks[k]
            var w = StateWriter(nil)
            (c.inverse?.strategy == strategy ? c.inverse! : try c.stagingInverse(for: strategy)).write(to: &w)
            total += w.offset / MemoryLayout<Scalar>.stride
        }
        return total + (tridiagonal?.inversePackCount ?? 0)
    }

    /// Where the link section of an inverse pack starts (after every block's image).
    func blockInversePackCount() throws(KFACError) -> Int {
        try inversePackCount() - (tridiagonal?.inversePackCount ?? 0)
    }

    func imageCount(_ inverse: any KroneckerInverse<Scalar>) -> Int {
        var w = StateWriter(nil)
        inverse.write(to: &w)
        return w.offset / MemoryLayout<Scalar>.stride
    }

    /// Computes the inverses the next `step` would, for the units this rank owns, and writes
    /// every block's image with zeros elsewhere (all zeros for blocks the step does not invert).
    /// Nothing committed changes; on error the buffer is filled with NaN.
    public func packInverses(into out: UnsafeMutablePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let out else { throw KFACError(.nullPointer, "inverse buffer is NULL") }
        try checkCount(count, try inversePackCount(), "inverse")
        distributed.prepared = nil
        distributed.preparedScaling = nil
        distributed.preparedLinks = nil
        do throws(KFACError) {
            try stageOwnedInverses(into: out, count: count)
        } catch {
            out.initialize(repeating: .nan, count: count)
            throw error
        }
    }

    private func stageOwnedInverses(into out: UnsafeMutablePointer<Scalar>, count: Int) throws(KFACError) {
        out.initialize(repeating: 0, count: count)
        let p = stepParameters(), strategy = p.inverseStrategy
        let folding = shouldFoldFactors(at: stepCount)
        let any = try planStepInversions(p, folding: folding)
        let linksInverting = try planTridiagonalStep(folding: folding, inverting: shouldInvert(at: stepCount))
        if folding && (any || linksInverting) { try estimator.validatePendingStatistics() }
        if linksInverting {
            if folding { try tridiagonal!.checkPaired(estimator: estimator) }
            try stageOwnedLinkInverses(into: out + (try blockInversePackCount()), folding: folding, settings: p.curvatureSettings)
        }
        guard any else { return }
        // Zero the staging inverses of the blocks inverted, so that units not owned pack as 0.
        var largest = 1
        for k in estimator.blocks.indices where estimator.invertBlock[k] {
            largest = Swift.max(largest, imageCount(try estimator.blocks[k].stagingInverse(for: strategy)))
        }
        if distributed.zeros == nil || distributed.zeros!.count < largest {
            distributed.zeros = try AlignedBuffer(rows: 1, columns: largest)
        }
        let zeros = UnsafeRawBufferPointer(start: distributed.zeros!.base, count: largest * MemoryLayout<Scalar>.stride)
        for k in estimator.blocks.indices where estimator.invertBlock[k] {
            var r = StateReader(zeros)
            try estimator.blocks[k].stagingInverse(for: strategy).read(from: &r)
        }
        estimator.unitFilter = distributed.size > 1 ? .owned(inverseAssignment(), rank: distributed.rank) : .all
        defer { estimator.unitFilter = .all }
        try estimator.stageInverses(foldingPending: folding, settings: p.curvatureSettings, damping: p.inverseDamping)
        var offset = 0
        for k in estimator.blocks.indices {
            let c = estimator.blocks[k]
            let inverse = try c.stagingInverse(for: strategy)
            let n = imageCount(inverse)
            if estimator.invertBlock[k] {
                var w = StateWriter(UnsafeMutableRawBufferPointer(start: out + offset, count: n * MemoryLayout<Scalar>.stride))
                inverse.write(to: &w)
                // EKFAC: the bases only; S has its own exchange (a sum of the ranks' partial
                // resets would mean nothing).
                if let e = inverse as? EKFACInverse<Scalar> {
                    let r = e.scalingImageRange
                    (out + offset + r.lowerBound).update(repeating: 0, count: r.count)
                }
            }
            offset += n
        }
    }

    /// The link section of this rank's inverse pack: the linked layers it owns (`linkOwner`),
    /// computed into the links' staging set and written in layer order; zeros elsewhere.
    private func stageOwnedLinkInverses(into out: UnsafeMutablePointer<Scalar>, folding: Bool,
                                        settings: CurvatureSettings) throws(KFACError) {
        let links = tridiagonal!
        let rank = distributed.rank
        for i in 0..<links.linkedLayers.count {
            let l = links.linkedLayers[i]
            links.owned[l] = linkOwner(layer: l) == rank
        }
        try links.stageInverses(estimator: estimator, foldingPending: folding, settings: settings, ownedOnly: distributed.size > 1)
        var offset = 0
        for i in 0..<links.linkedLayers.count {
            let l = links.linkedLayers[i]
            if linkOwner(layer: l) == rank { links.transferStaged(layer: l, out + offset, toImage: true) }
            offset += links.inverseImageCount(layer: l)
        }
    }

    /// The step's link inversion: the exchanged link inverses when `unpackInverses` prepared
    /// them for this step, else every linked layer here.
    func stageStepLinkInverses(folding: Bool, settings: CurvatureSettings) throws(KFACError) {
        defer { distributed.preparedLinks = nil }
        if let pr = distributed.preparedLinks, pr.step == stepCount, pr.blocks == blocksKey, pr.damping == settings.damping,
           pr.pi == settings.piDamping {
            return
        }
        try tridiagonal!.stageInverses(estimator: estimator, foldingPending: folding, settings: settings)
    }

    /// Installs the SUM-allreduced inverse pack as the inverses the next `step` commits (instead
    /// of computing them). On error nothing changed.
    public func unpackInverses(from p: UnsafePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let p else { throw KFACError(.nullPointer, "inverse buffer is NULL") }
        try checkCount(count, try inversePackCount(), "inverse")
        guard Scalar.allFinite(p, count: count) else {
            throw KFACError(.nonFinite, "the reduced inverses contain NaN or Inf (an inversion failed on some rank)")
        }
        let params = stepParameters(), strategy = params.inverseStrategy
        let folding = shouldFoldFactors(at: stepCount)
        let any = try planStepInversions(params, folding: folding)
        let linksInverting = try planTridiagonalStep(folding: folding, inverting: shouldInvert(at: stepCount))
        distributed.prepared = nil
        distributed.preparedScaling = nil
        distributed.preparedLinks = nil
        if linksInverting, let links = tridiagonal {
            var offset = try blockInversePackCount()
            for i in 0..<links.linkedLayers.count {
                let l = links.linkedLayers[i]
                links.transferStaged(layer: l, UnsafeMutablePointer(mutating: p) + offset, toImage: false)
                offset += links.inverseImageCount(layer: l)
            }
            let settings = params.curvatureSettings
            distributed.preparedLinks = (stepCount, blocksKey, settings.damping, settings.piDamping)
        }
        guard any else { return }
        var offset = 0
        for k in estimator.blocks.indices {
            let inverse = try estimator.blocks[k].stagingInverse(for: strategy)
            let n = imageCount(inverse)
            if estimator.invertBlock[k] {
                var r = StateReader(UnsafeRawBufferPointer(start: p + offset, count: n * MemoryLayout<Scalar>.stride))
                try inverse.read(from: &r)
            }
            offset += n
        }
        distributed.prepared = .init(step: stepCount, strategy: strategy, damping: params.inverseDamping,
                                     generation: estimator.stagingGeneration,
                                     blocks: blocksKey)
    }

    /// The step's inversion: the exchanged inverses when `unpackInverses` prepared them for this
    /// step (only the staged folds are formed), else every unit here.
    func stageStepInverses(folding: Bool, settings: CurvatureSettings, damping: Double) throws(KFACError) {
        if let pr = distributed.prepared, pr.step == stepCount, pr.strategy == settings.strategy, pr.damping == damping,
           pr.generation == estimator.stagingGeneration, pr.blocks == blocksKey {
            estimator.unitFilter = .none
        }
        defer {
            estimator.unitFilter = .all
            distributed.prepared = nil
        }
        try estimator.stageInverses(foldingPending: folding, settings: settings, damping: damping)
    }
}

// MARK: EKFAC's scaling

extension KFACOptimizer {
    /// Values of a scaling pack: per Kronecker block, o × a sums then one divisor.
    public var scalingPackCount: Int { estimator.scalingPackCount }

    private func checkScalingExchange() throws(KFACError) {
        guard parameters.inverseStrategy == .ekfac else {
            throw KFACError(.invalidArgument, "the scaling exchange is EKFAC's: the inverse strategy is \(parameters.inverseStrategy)")
        }
        try checkStrategySupported()
    }

    /// EKFAC: writes this rank's share of S for a SUM-allreduce — per block whose S the next
    /// step sets (new bases, or a fold between refreshes), Σ_n (Q_Gᵀ G_n Q_A)^∘2 over this
    /// rank's pending paired examples in the bases the step will use, then their divisor; zeros
    /// elsewhere. When the step inverts, the bases are the exchanged ones: unpack the inverses
    /// first (else `.noInverses`). Changes nothing; on an error after the size checks the
    /// buffer is filled with NaN.
    public func packScalings(into out: UnsafeMutablePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let out else { throw KFACError(.nullPointer, "scaling buffer is NULL") }
        try checkScalingExchange()
        try checkCount(count, scalingPackCount, "scaling")
        do throws(KFACError) {
            let p = stepParameters()
            let folding = shouldFoldFactors(at: stepCount)
            let inverting = try planStepInversions(p, folding: folding)
            if inverting {
                guard let pr = distributed.prepared, pr.step == stepCount, pr.strategy == .ekfac,
                      pr.generation == estimator.stagingGeneration, pr.blocks == blocksKey else {
                    throw KFACError(.noInverses, "the next step computes new EKFAC bases: unpack its inverse exchange before packing the scalings")
                }
            }
            try estimator.packScalings(into: out, folding: folding, inverting: inverting)
        } catch {
            out.initialize(repeating: .nan, count: count)
            throw error
        }
    }

    /// EKFAC: takes the SUM-allreduced scaling pack as the union's per-example statistics the
    /// next step forms S from (S_batch = the summed sums / the summed divisor). On error nothing
    /// changed.
    public func unpackScalings(from p: UnsafePointer<Scalar>?, count: Int) throws(KFACError) {
        guard let p else { throw KFACError(.nullPointer, "scaling buffer is NULL") }
        try checkScalingExchange()
        try checkCount(count, scalingPackCount, "scaling")
        guard Scalar.allFinite(p, count: count) else {
            throw KFACError(.nonFinite, "the reduced scalings contain NaN or Inf (a pack failed on some rank)")
        }
        let blocks = estimator.blocks
        var w = 0
        for k in blocks.indices {
            let n = blocks[k].input.dimension * blocks[k].output.dimension
            for i in 0..<n where p[w + i] < 0 {
                throw KFACError(.invalidArgument, "a reduced scaling sum is \(p[w + i]): sums of squares are >= 0")
            }
            let d = Double(p[w + n])
            guard d >= 0, d <= 9.007_199_254_740_992e15, d.rounded() == d else {
                throw KFACError(.invalidArgument, "a reduced divisor is \(d), not a whole number >= 0")
            }
            w += n + 1
        }
        let buffer = try CollectiveBuffers.reserve(&distributed.scalingSums, count)
        buffer.base.update(from: p, count: count)
        distributed.preparedScaling = (stepCount, blocksKey)
    }

    /// The union's scaling sums for the step at hand, when `unpackScalings` installed them.
    func reducedScalings() -> UnsafePointer<Scalar>? {
        guard parameters.inverseStrategy == .ekfac, let done = distributed.preparedScaling, done.step == stepCount,
              done.blocks == blocksKey, let b = distributed.scalingSums else { return nil }
        return UnsafePointer(b.base)
    }
}

// MARK: The adaptive mode's model sums

extension KFACOptimizer {
    /// Values of a model-sum pack for `candidates` candidates: per candidate Σ uᵀFu, Σ uᵀFv,
    /// Σ vᵀFv over this rank's rows, then the rows, then 1 if the previous update takes part.
    public static func modelSumCount(candidates: Int) -> Int { 3 * candidates + 2 }

    /// Writes this rank's output-space sums of the adaptive mode's quadratic model (what
    /// `solveStepSize` forms from the rows it is given) for a SUM-allreduce: `candidates` 1
    /// solves for candidate 0 as `solveStepSize` does, else it must be the candidate count.
    /// `rows` may be 0 (a rank without examples: zeros; the pointers are not read). Changes nothing.
    public func packModelSums(outputs: UnsafePointer<Scalar>?, candidateProducts products: (Int) -> UnsafePointer<Scalar>?,
                              candidates count: Int, previousProducts: UnsafePointer<Scalar>?, rows: Int, dim: Int,
                              distribution: OutputDistribution, into out: UnsafeMutablePointer<Double>?, count values: Int) throws(KFACError) {
        guard let out else { throw KFACError(.nullPointer, "sums buffer is NULL") }
        guard count >= 1 else { throw KFACError(.invalidArgument, "n_candidates must be >= 1, got \(count)") }
        try checkCount(values, Self.modelSumCount(candidates: count), "model sums")
        guard rows != 0 else {
            // A rank without examples this step contributes zeros (and the flag).
            guard adaptive.directionsAvailable else {
                throw KFACError(.noStep, "solve the step size after a successful step (and only once per step)")
            }
            out.initialize(repeating: 0, count: values)
            out[3 * count + 1] = previousProducts != nil && adaptive.hasPreviousUpdate ? 1 : 0
            return
        }
        let usePrevious = try checkModelInputs(outputs: outputs, products: products, count: count, firstOnly: count == 1,
                                               previousProducts: previousProducts, rows: rows, dim: dim)
        for k in 0..<count {
            let f = OutputFisher.quadraticForms(distribution: distribution, outputs: outputs!, rows: rows, dim: dim,
                                                u: products(k)!, v: usePrevious ? previousProducts : nil)
            (out[3 * k], out[3 * k + 1], out[3 * k + 2]) = (f.uu, f.uv, f.vv)
        }
        out[3 * count] = Double(rows)
        out[3 * count + 1] = usePrevious ? 1 : 0
    }

    /// The solve from SUM-allreduced model sums (`packModelSums`): α, μ and M(δ) of the union
    /// batch, and the kept candidate, as `solveStepSize` (one candidate) or its candidate form.
    /// On error nothing changes.
    public func solveModelSums(_ sums: UnsafePointer<Double>?, count values: Int) throws(KFACError)
        -> (chosen: Int, alpha: Double, mu: Double, predictedChange: Double) {
        guard let sums else { throw KFACError(.nullPointer, "sums buffer is NULL") }
        guard values >= 5, (values - 2) % 3 == 0 else {
            throw KFACError(.invalidSize, "model sums hold 3 values per candidate, the rows and a flag, got \(values)")
        }
        let count = (values - 2) / 3
        guard adaptive.directionsAvailable else {
            throw KFACError(.noStep, "solve the step size after a successful step (and only once per step)")
        }
        guard count == 1 || count == candidates.list.count else {
            throw KFACError(.invalidArgument, "the last step has \(candidates.list.count) candidates, got sums for \(count)")
        }
        guard (0..<values).allSatisfy({ sums[$0].isFinite }) else {
            throw KFACError(.nonFinite, "the reduced model sums contain NaN or Inf")
        }
        let rows = sums[values - 2]
        guard rows >= 1, rows.rounded() == rows else {
            throw KFACError(.invalidArgument, "the reduced row count is \(rows), not a whole number >= 1")
        }
        let usePrevious = adaptive.hasPreviousUpdate && sums[values - 1] > 0
        return try solve(count: count, firstOnly: count == 1, usePrevious: usePrevious, rows: rows) { k in
            (sums[3 * k], sums[3 * k + 1], sums[3 * k + 2])
        }
    }
}
