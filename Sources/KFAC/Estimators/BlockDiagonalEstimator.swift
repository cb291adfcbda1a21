/// The block-diagonal curvature estimator: one or more Kronecker blocks per layer (conv groups),
/// no coupling between layers.
///
/// It owns the layers (`CurvatureLayer`), their blocks, the inversion jobs and the worker pool
/// that runs them. Inversions are staged: they write into each block's staging inverse (or
/// into inverses the caller owns, such as a γ candidate's), and nothing committed changes until
/// `commitStep` or `commitStagedInverses`.
final class BlockDiagonalEstimator<Scalar: KFACScalar>: CurvatureEstimator {
    private(set) var layers: [any CurvatureLayer<Scalar>] = [] {
        didSet { indexBlocks() }
    }
    /// Every layer's blocks, flat, the layer each belongs to, and each layer's blocks.
    private(set) var blocks: [KroneckerBlock<Scalar>] = []
    private(set) var blockLayer: [Int] = []
    private(set) var layerBlocks: [Range<Int>] = []
    /// Layers can no longer be added once statistics were recorded.
    var statisticsStarted = false
    /// Layers whose curvature another estimator inverts and multiplies (block-tridiagonal
    /// links, `TridiagonalLinks`): never inverted here, skipped by `multiplyAll`. Empty when none.
    var excludedLayers: [Bool] = []

    func isExcluded(_ l: Int) -> Bool { l < excludedLayers.count && excludedLayers[l] }

    let ones: AlignedBuffer<Scalar>
    private var workspaces: [EigenWorkspace<Scalar>] = []
    private let workers = WorkerPool()
    // Inversion bookkeeping, sized when layers are added so a step does not allocate.
    /// The blocks the next `stageInverses` inverts.
    var invertBlock: [Bool] = []
    /// One per unique block of each side of each block to invert.
    var inversionJobs: [InversionJob] = []
    /// Per block: the factors the running inversion inverts, and their shifts.
    var jobSources: [InversionSource] = []
    /// One slot per job, written by the worker threads (distinct slots), read after they finish.
    private var jobErrors = UnsafeMutableBufferPointer<KFACError?>(start: nil, count: 0)
    var inversionStrategy = InverseStrategy.eigen
    var inversionTarget = InversionTarget.staging
    /// Distributed runs (Distributed/): which units `stageInverses` computes, and a counter of
    /// its calls (so that inverses exchanged into staging are known to be still there).
    var unitFilter = InversionUnitFilter.all
    private(set) var stagingGeneration = 0
    /// Background inversion (`BlockDiagonalEstimator+Background.swift`): the thread, the blocks
    /// of the work launched last, per block what the current step does with it, and the
    /// snapshots of the factors it inverts.
    let background = BackgroundThread { context in
        // Borrowed, never retained: a release on the thread could be the estimator's last.
        Unmanaged<BlockDiagonalEstimator<Scalar>>.fromOpaque(context)._withUnsafeGuaranteedRef { $0.runBackgroundWork() }
    }
    var backgroundBlock: [Bool] = []
    var consumeBlock: [Bool] = []
    var launchBlock: [Bool] = []
    var snapshots: [(a: AlignedBuffer<Scalar>, g: AlignedBuffer<Scalar>)?] = []
    /// Whether launched work has not been committed or discarded yet (it may have finished).
    var backgroundPending = false
    var backgroundStrategy = InverseStrategy.eigen
    var backgroundThreadCount = 1
    /// Written by the background thread before it reports that it finished.
    var backgroundError: KFACError?

    struct InversionJob {
        var block: Int
        var side: FactorSide
        var unique: Int
        var size: Int
    }

    struct InversionSource {
        var a: AlignedBuffer<Scalar>?
        var g: AlignedBuffer<Scalar>?
        var inputShift: Scalar = 0
        var outputShift: Scalar = 0
    }

    /// Where an inversion writes.
    enum InversionTarget {
        /// Each block's staging inverse.
        case staging
        /// The given inverses, one per block (of the strategy inverted), that the caller owns.
        case inverses([any KroneckerInverse<Scalar>])
    }

    init() throws(KFACError) {
        ones = try AlignedBuffer(rows: 1, columns: 1024)
        for i in 0..<ones.count { ones.base[i] = 1 }
    }

    deinit {
        background.wait()  // it uses the job bookkeeping released below
        releaseJobErrors()
    }

    var layerCount: Int { layers.count }
    var blockCount: Int { blocks.count }

    // MARK: Layers

    /// Largest factor side: keeps every BLAS/LAPACK size and leading dimension within 32 bits.
    static var maximumFactorDimension: Int { 46_340 }

    /// Registers a dense layer and returns its index.
    func addDense(inFeatures: Int, outFeatures: Int, hasBias: Bool, grouping: ChannelGrouping) throws(KFACError) -> Int {
        try checkLayersOpen()
        guard inFeatures >= 1, outFeatures >= 1 else {
            throw KFACError(.invalidSize, "a dense layer needs in_features >= 1 and out_features >= 1, got \(inFeatures) and \(outFeatures)")
        }
        try checkGrouping(grouping)
        guard inFeatures < Self.maximumFactorDimension, outFeatures <= Self.maximumFactorDimension else {
            throw KFACError(.sizeOverflow, "dense layer \(inFeatures)→\(outFeatures) exceeds the largest supported factor (\(Self.maximumFactorDimension))")
        }
        try checkFactorSizes(inputDimension: inFeatures + (hasBias ? 1 : 0), outputDimension: outFeatures,
                             what: "dense layer \(inFeatures)→\(outFeatures)")
        layers.append(try makeLayer(.dense(inFeatures: inFeatures, outFeatures: outFeatures, hasBias: hasBias, grouping: grouping)))
        return layers.count - 1
    }

    /// Registers a 2-D (or, as 1×L, 1-D) convolution and returns its index.
    func addConv2d(_ geometry: Conv2dGeometry, approximation: ConvApproximation, grouping: ChannelGrouping) throws(KFACError) -> Int {
        try checkLayersOpen()
        try geometry.validate()
        try checkGrouping(grouping)
        try checkFactorSizes(inputDimension: geometry.patchSize + (geometry.hasBias ? 1 : 0),
                             outputDimension: geometry.groupOutChannels, what: "convolution")
        layers.append(try makeLayer(.conv2d(geometry, approximation: approximation, grouping: grouping)))
        return layers.count - 1
    }

    private func checkLayersOpen() throws(KFACError) {
        guard !statisticsStarted else {
            throw KFACError(.layersFrozen, "layers must all be added before statistics are recorded")
        }
    }

    private func checkGrouping(_ g: ChannelGrouping) throws(KFACError) {
        guard g.inputGroupSize >= 0, g.outputGroupSize >= 0 else {
            throw KFACError(.invalidSize, "group sizes must be >= 0 (0 = no grouping), got \(g.inputGroupSize) and \(g.outputGroupSize)")
        }
    }

    private func checkFactorSizes(inputDimension a: Int, outputDimension o: Int, what: String) throws(KFACError) {
        guard a <= Self.maximumFactorDimension, o <= Self.maximumFactorDimension, o * a <= Int(Int32.max) else {
            throw KFACError(.sizeOverflow, "\(what) exceeds the largest supported factor (\(Self.maximumFactorDimension)) or 2^31 − 1 parameters per group")
        }
    }

    /// The layer type of a layer kind, built from its description.
    func makeLayer(_ layer: LayerDescription) throws(KFACError) -> any CurvatureLayer<Scalar> {
        switch layer {
        case .dense(let i, let o, let bias, let grouping):
            return try DenseLayer<Scalar>(inFeatures: i, outFeatures: o, hasBias: bias, grouping: grouping)
        case .conv2d(let g, let approximation, let grouping):
            return try Conv2dLayer<Scalar>(g, approximation: approximation, grouping: grouping)
        }
    }

    /// Rebuilds the flat block list and the bookkeeping sized by it (when layers change).
    private func indexBlocks() {
        blocks = []
        blockLayer = []
        layerBlocks = []
        var jobs = 0
        for (l, layer) in layers.enumerated() {
            let first = blocks.count
            for c in layer.blocks {
                blocks.append(c)
                blockLayer.append(l)
                jobs += c.input.structure.uniqueSizes.count + c.output.structure.uniqueSizes.count
            }
            layerBlocks.append(first..<blocks.count)
        }
        let n = blocks.count
        invertBlock = Array(repeating: false, count: n)
        backgroundBlock = Array(repeating: false, count: n)
        consumeBlock = Array(repeating: false, count: n)
        launchBlock = Array(repeating: false, count: n)
        snapshots = Array(repeating: nil, count: n)
        backgroundPending = false
        inversionJobs = []
        inversionJobs.reserveCapacity(jobs)
        jobSources = Array(repeating: InversionSource(), count: n)
        let errors = UnsafeMutableBufferPointer<KFACError?>.allocate(capacity: Swift.max(jobs, 1))
        errors.initialize(repeating: nil)
        releaseJobErrors()
        jobErrors = errors
    }

    private func releaseJobErrors() {
        guard jobErrors.baseAddress != nil else { return }
        jobErrors.deinitialize()
        jobErrors.deallocate()
    }

    func layer(_ l: Int) throws(KFACError) -> any CurvatureLayer<Scalar> {
        guard l >= 0 && l < layers.count else {
            throw KFACError(.unknownLayer, "layer \(l) is not registered (there are \(layers.count) layers)")
        }
        return layers[l]
    }

    /// Block `group` of a layer (0 for dense layers).
    func block(layer l: Int, group: Int) throws(KFACError) -> KroneckerBlock<Scalar> {
        let b = try layer(l)
        guard group >= 0 && group < b.blocks.count else {
            throw KFACError(.invalidArgument, "group \(group) is out of range: layer \(l) has groups 0..<\(b.blocks.count)")
        }
        return b.blocks[group]
    }

    // MARK: Statistics

    /// Validates a record call and returns the layer and the bound its values add to the side's
    /// pending sums: the buffer, the rows, and that the values are finite and small enough that
    /// the pending second-moment sums — those already pending plus this call's, with `scale`
    /// applied to every value — stay finite (so a later fold cannot fail because of them), and
    /// that the pending row count stays below `KroneckerFactor.maximumPendingRows`.
    func checkedRecord(_ p: UnsafePointer<Scalar>?, layer: Int, rows: Int, outputSide: Bool,
                       scale: Double) throws(KFACError) -> (any CurvatureLayer<Scalar>, Double) {
        let b = try self.layer(layer)
        let what = outputSide ? "output gradients" : "inputs"
        guard let p else { throw KFACError(.nullPointer, "\(what) buffer is NULL") }
        guard rows >= 1 else { throw KFACError(.invalidSize, "rows must be >= 1, got \(rows)") }
        let perRow = Swift.max(b.inputValueCount(rows: 1), b.outputGradientValueCount(rows: 1), 1)
        guard rows <= Int.max / perRow else {
            throw KFACError(.sizeOverflow, "\(rows) rows overflow the buffer size")
        }
        let added = b.recordedRows(rows: rows, outputSide: outputSide)
        var pendingRows = 0, pending = 0.0  // over the layer's groups, without allocating
        let blocks = b.blocks
        for k in blocks.indices {
            let f = outputSide ? blocks[k].output : blocks[k].input
            pendingRows = Swift.max(pendingRows, f.pendingRows)
            pending = Swift.max(pending, f.pendingMagnitude)
        }
        guard added <= KroneckerFactor<Scalar>.maximumPendingRows - pendingRows else {
            throw KFACError(.sizeOverflow, "\(what) of layer \(layer): more than 2^53 rows pending; fold or discard the statistics")
        }
        let count = outputSide ? b.outputGradientValueCount(rows: rows) : b.inputValueCount(rows: rows)
        let largest = Double(Scalar.largestMagnitude(p, count: count))
        guard largest.isFinite else { throw KFACError(.nonFinite, "\(what) of layer \(layer) contain NaN or Inf") }
        let bound = b.pendingBound(largest: largest, rows: rows, outputSide: outputSide, scale: scale)
        guard bound + pending <= KroneckerFactor<Scalar>.pendingLimit else {
            throw KFACError(.nonFinite, pending > 0
                            ? "\(what) of layer \(layer) are too large (|x| up to \(largest)) for the statistics already pending: their second moments would overflow \(Scalar.self); fold or discard the pending statistics"
                            : "\(what) of layer \(layer) are too large (|x| up to \(largest)): their second moments would overflow \(Scalar.self)")
        }
        return (b, bound)
    }

    func recordInputs(layer: Int, _ inputs: UnsafePointer<Scalar>?, rows: Int) throws(KFACError) {
        let (b, bound) = try checkedRecord(inputs, layer: layer, rows: rows, outputSide: false, scale: 1)
        try b.recordInputs(inputs!, rows: rows, ones: ones)
        let blocks = b.blocks
        for k in blocks.indices { blocks[k].input.notePending(magnitude: bound) }
        statisticsStarted = true
    }

    func recordOutputGradients(layer: Int, _ gradients: UnsafePointer<Scalar>?, rows: Int, scale: Double) throws(KFACError) {
        let (b, bound) = try checkedRecord(gradients, layer: layer, rows: rows, outputSide: true, scale: scale)
        try b.recordOutputGradients(gradients!, rows: rows, scale: Scalar(scale), ones: ones)
        let blocks = b.blocks
        for k in blocks.indices { blocks[k].output.notePending(magnitude: bound) }
        statisticsStarted = true
    }

    /// Drops every layer's statistics recorded since the last fold; running factors, inverses
    /// and counters stay. Cannot fail.
    func discardPendingStatistics() {
        for c in blocks {
            c.input.discardPending()
            c.output.discardPending()
        }
    }

    /// Throws if folding some block's pending statistics could produce a non-finite factor.
    func validatePendingStatistics() throws(KFACError) {
        for k in blocks.indices {
            let c = blocks[k]
            do {
                try c.input.validatePending()
                try c.output.validatePending()
            } catch {
                throw KFACError(error.status, "layer \(blockLayer[k]): \(error.message)")
            }
        }
    }

    func foldFactors(decay: Double) throws(KFACError) {
        try validatePendingStatistics()
        let decay = Scalar(decay)
        for k in blocks.indices {
            blocks[k].input.fold(decay: decay)
            blocks[k].output.fold(decay: decay)
        }
    }

    // MARK: Inversion

    func invert(_ settings: CurvatureSettings) throws(KFACError) {
        var any = false
        for k in blocks.indices {
            invertBlock[k] = blocks[k].hasFactors && !isExcluded(blockLayer[k])
            any = any || invertBlock[k]
        }
        guard any else {
            if excludedLayers.contains(true) { return }
            throw KFACError(.noStatistics, "no layer has factors yet")
        }
        try stageInverses(foldingPending: false, settings: settings, damping: settings.damping)
        try stageScalings(folding: false, settings: settings)  // EKFAC: S in the new bases
        commitStagedInverses()
        commitPairedStatistics(folding: false)
    }

    /// Before a step: checks that every block has (or, with `foldingPending`, will have) both
    /// factors, marks the blocks `invert(block, hasInverse)` says the step inverts, and checks
    /// that the others have an inverse for the strategy. Returns whether any block is inverted.
    func planInversions(foldingPending: Bool, strategy: InverseStrategy,
                        invert: (_ block: Int, _ hasInverse: Bool) -> Bool) throws(KFACError) -> Bool {
        var anyInversion = false
        for k in blocks.indices {
            let c = blocks[k]
            let inputReady = c.input.hasRunning || (foldingPending && c.input.hasPending)
            let outputReady = c.output.hasRunning || (foldingPending && c.output.hasPending)
            guard inputReady && outputReady else {
                throw KFACError(.noStatistics, "layer \(blockLayer[k]) has no \(inputReady ? "output-gradient" : "input") statistics; record them before the step")
            }
            if isExcluded(blockLayer[k]) {
                invertBlock[k] = false
                continue
            }
            let hasInverse = c.hasInverse(for: strategy)
            invertBlock[k] = invert(k, hasInverse)
            guard invertBlock[k] || hasInverse else {
                throw KFACError(.noInverses, "layer \(blockLayer[k]) has no inverses and the inverse update period is 0; call update_inverses")
            }
            anyInversion = anyInversion || invertBlock[k]
        }
        return anyInversion
    }

    /// Marks every block for the next `stageInverses`.
    func markAllForInversion() {
        for k in blocks.indices { invertBlock[k] = true }
    }

    /// Computes inverses with damping λ = `damping` for the blocks marked in `invertBlock`, from
    /// their running factors or, with `foldingPending`, from out-of-place folds of their pending
    /// statistics, into `target`. Nothing committed changes; on failure throws the first error
    /// in layer order.
    func stageInverses(foldingPending: Bool, into target: InversionTarget = .staging, settings: CurvatureSettings,
                       damping: Double) throws(KFACError) {
        background.wait()  // the worker pool and the job bookkeeping are shared with it
        let strategy = settings.strategy
        let decay = Scalar(settings.factorDecay)
        stagingGeneration &+= 1
        inversionJobs.removeAll(keepingCapacity: true)
        for k in blocks.indices where invertBlock[k] {
            let c = blocks[k]
            let a = foldingPending ? try c.input.stageFold(decay: decay) : c.input.running
            let g = foldingPending ? try c.output.stageFold(decay: decay) : c.output.running
            if case .staging = target { _ = try c.stagingInverse(for: strategy) }
            jobSources[k].a = a
            jobSources[k].g = g
            switch c.damping(strategy, lambda: damping, piDamping: settings.piDamping, a: a.base, g: g.base) {
            case .factored(let inputShift, let outputShift):
                (jobSources[k].inputShift, jobSources[k].outputShift) = (inputShift, outputShift)
            case .exact:
                (jobSources[k].inputShift, jobSources[k].outputShift) = (0, 0)
            }
            for q in c.input.structure.uniqueSizes.indices where unitFilter.includes(block: k, side: .input, unique: q) {
                inversionJobs.append(InversionJob(block: k, side: .input, unique: q, size: c.input.structure.uniqueSizes[q]))
            }
            for q in c.output.structure.uniqueSizes.indices where unitFilter.includes(block: k, side: .output, unique: q) {
                inversionJobs.append(InversionJob(block: k, side: .output, unique: q, size: c.output.structure.uniqueSizes[q]))
            }
        }
        try reserveWorkspaces(threadCount: settings.threadCount, jobCount: inversionJobs.count)
        try runInversionJobs(strategy: strategy, target: target, threadCount: settings.threadCount, selected: invertBlock)
    }

    /// Makes sure there is an eigen workspace for every worker `runInversionJobs` may use.
    func reserveWorkspaces(threadCount: Int, jobCount: Int) throws(KFACError) {
        let threads = threadCount == 0 ? onlineProcessorCount() : threadCount
        while workspaces.count < Swift.max(1, Swift.min(threads, jobCount)) { workspaces.append(try EigenWorkspace()) }
    }

    /// Runs `inversionJobs` (from `jobSources`) on the worker pool into `target`, then finishes
    /// the inverses of the `selected` blocks; throws the first error in layer order.
    func runInversionJobs(strategy: InverseStrategy, target: InversionTarget, threadCount: Int,
                          selected: [Bool]) throws(KFACError) {
        // Largest blocks first, so that striding the jobs over workers balances their cost.
        for i in 1..<Swift.max(inversionJobs.count, 1) {
            var j = i
            let job = inversionJobs[i]
            while j > 0 && inversionJobs[j - 1].size < job.size {
                inversionJobs[j] = inversionJobs[j - 1]
                j -= 1
            }
            inversionJobs[j] = job
        }
        let threads = threadCount == 0 ? onlineProcessorCount() : threadCount
        let workerCount = Swift.max(1, Swift.min(threads, inversionJobs.count, workspaces.count))

        inversionStrategy = strategy
        inversionTarget = target
        workers.run(count: inversionJobs.count, workers: workerCount, self)
        inversionTarget = .staging
        var firstError: (layer: Int, error: KFACError, side: FactorSide)?
        for index in inversionJobs.indices {
            let job = inversionJobs[index]
            if let e = jobErrors[index] {
                jobErrors[index] = nil
                let layer = blockLayer[job.block]
                if firstError == nil || layer < firstError!.layer { firstError = (layer, e, job.side) }
            }
        }
        for k in blocks.indices where selected[k] {
            jobSources[k].a = nil
            jobSources[k].g = nil
        }
        if let f = firstError {
            throw KFACError(f.error.status, "layer \(f.layer), \(f.side == .input ? "input" : "output") factor: \(f.error.message)")
        }
        for k in blocks.indices where selected[k] {
            try inverse(of: k, in: target, strategy: strategy).finish()
        }
    }

    /// The inverse an inversion into `target` writes for block `k`.
    private func inverse(of k: Int, in target: InversionTarget, strategy: InverseStrategy) throws(KFACError) -> any KroneckerInverse<Scalar> {
        switch target {
        case .staging: return try blocks[k].stagingInverse(for: strategy)
        case .inverses(let inverses): return inverses[k]
        }
    }

    /// Makes the staging inverses of the marked blocks the committed ones.
    func commitStagedInverses() {
        for k in blocks.indices where invertBlock[k] { blocks[k].commitStagedInverse() }
    }

    /// A step's commit (nothing here can fail): for each block, its staged fold and staged
    /// inverse when it was inverted, else an in-place fold when folding.
    func commitStep(folding: Bool, decay: Double) {
        let decay = Scalar(decay)
        for k in blocks.indices {
            let c = blocks[k]
            if invertBlock[k] {
                if folding {
                    c.input.commitStagedFold()
                    c.output.commitStagedFold()
                }
                c.commitStagedInverse()
            } else if folding {
                c.input.fold(decay: decay)
                c.output.fold(decay: decay)
            }
        }
    }

    // MARK: Products

    /// Copies layer `l`'s parameter vector into its blocks' `gradient`.
    func gather(layer l: Int, _ v: ParameterGradient<Scalar>) {
        layers[l].gatherGradient(weight: v.weight, bias: v.bias)
    }

    /// Writes `scale ·` layer `l`'s blocks' `direction` into its parameter buffers.
    func scatter(layer l: Int, scale: Scalar, into v: ParameterGradient<Scalar>) {
        layers[l].scatterDirection(scale: scale, weight: v.weight, bias: v.bias)
    }

    /// Preconditions block `k`: its `direction` becomes the damped inverse (the staging one when
    /// `staged`, else the committed one, of `strategy`) times its `gradient`. Throws
    /// `.nonFinite` if the result is not finite.
    func precondition(block k: Int, staged: Bool, strategy: InverseStrategy, damping: Scalar) throws(KFACError) {
        let c = blocks[k]
        let inverse = staged ? try c.stagingInverse(for: strategy) : c.inverse!
        try precondition(block: k, with: inverse, damping: damping, into: c.direction)
    }

    /// u = `inverse` (damping λ for exact damping) times block `k`'s `gradient`; throws
    /// `.nonFinite` if u is not finite.
    func precondition(block k: Int, with inverse: any KroneckerInverse<Scalar>, damping: Scalar,
                      into u: AlignedBuffer<Scalar>) throws(KFACError) {
        let c = blocks[k]
        inverse.multiplyInverse(c.gradient, into: u, scratch: c.scratch, damping: damping)
        guard Scalar.allFinite(u.base, count: u.count) else {
            throw KFACError(.nonFinite, "the preconditioned gradient of layer \(blockLayer[k]) is not finite; increase the damping")
        }
    }

    /// Checks that layer `l` has what `multiply(power:)` needs: factors, and for `.inverse` an
    /// inverse for the strategy.
    func checkReady(layer l: Int, for power: CurvaturePower, strategy: InverseStrategy) throws(KFACError) {
        for k in layerBlocks[l] {
            let c = blocks[k]
            guard c.hasFactors else { throw KFACError(.noStatistics, "layer \(l) has no factors yet") }
            guard (power == .one && !strategy.forwardProductUsesInverse) || c.hasInverse(for: strategy) else {
                throw KFACError(.noInverses, "layer \(l) has no inverses for the current strategy")
            }
        }
    }

    func multiply(layer l: Int, _ vector: ParameterGradient<Scalar>, power: CurvaturePower,
                  _ settings: CurvatureSettings) throws(KFACError) {
        _ = try layer(l)
        try checkReady(layer: l, for: power, strategy: settings.strategy)
        try multiplyGathered(layer: l, vector, power: power, settings)
        scatter(layer: l, scale: 1, into: vector)
    }

    /// `multiply(layer:…)` for every layer, `vectors(l)` giving layer l's buffers: every product
    /// is formed (in the blocks' own buffers) and found finite before any buffer is written, so
    /// a failure leaves the caller's buffers untouched.
    func multiplyAll(_ vectors: (Int) -> ParameterGradient<Scalar>, power: CurvaturePower,
                     _ settings: CurvatureSettings) throws(KFACError) {
        for l in layers.indices where !isExcluded(l) { try checkReady(layer: l, for: power, strategy: settings.strategy) }
        for l in layers.indices where !isExcluded(l) { try multiplyGathered(layer: l, vectors(l), power: power, settings) }
        for l in layers.indices where !isExcluded(l) { scatter(layer: l, scale: 1, into: vectors(l)) }
    }

    /// Gathers layer l's vector into its blocks and forms each block's product in its
    /// `direction`, checking that it is finite. Writes nothing of the caller's.
    private func multiplyGathered(layer l: Int, _ vector: ParameterGradient<Scalar>, power: CurvaturePower,
                                  _ settings: CurvatureSettings) throws(KFACError) {
        gather(layer: l, vector)
        for k in layerBlocks[l] {
            let c = blocks[k]
            c.multiply(c.gradient, into: c.direction, power: power, strategy: settings.strategy,
                       lambda: settings.damping, piDamping: settings.piDamping)
            guard Scalar.allFinite(c.direction.base, count: c.direction.count) else {
                throw KFACError(.nonFinite, power == .inverse
                                ? "the preconditioned gradient of layer \(l) is not finite; increase the damping"
                                : "the curvature product of layer \(l) is not finite")
            }
        }
    }

    /// The explicit damped curvature at `power` of block `group` of layer `l` (oracle tests).
    func denseMatrix(layer l: Int, group: Int, power: CurvaturePower, _ settings: CurvatureSettings) throws(KFACError) -> [Scalar] {
        let c = try block(layer: l, group: group)
        try checkReady(layer: l, for: power, strategy: settings.strategy)
        return c.denseMatrix(power: power, strategy: settings.strategy, lambda: settings.damping, piDamping: settings.piDamping)
    }

    // MARK: State image

    /// Writes the estimator's section: statistics started, the layer descriptions, then per
    /// block its factors (A then G) and its inverse (strategy + 1, 0 = none, then the
    /// representation's own section).
    func write(to w: inout StateWriter) {
        w.u64(statisticsStarted ? 1 : 0)
        w.u64(UInt64(layers.count))
        for b in layers {
            let fields = b.layer.fields
            w.u64(UInt64(fields.count))
            for f in fields { w.i64(f) }
        }
        for c in blocks {
            c.input.write(to: &w)
            c.output.write(to: &w)
            if let inv = c.inverse {
                w.u64(UInt64(inv.strategy.rawValue) + 1)
                inv.write(to: &w)
            } else {
                w.u64(0)
            }
        }
    }

    /// Reads what `write` wrote into fresh layers, checked against this estimator's; installs
    /// nothing (`install` does, once the whole image has been read).
    func read(from r: inout StateReader) throws(KFACError) -> (layers: [any CurvatureLayer<Scalar>], statisticsStarted: Bool) {
        let started = try r.flag()
        let count = try r.u64()
        guard count == UInt64(layers.count) else {
            throw KFACError(.stateMismatch, "state image has \(count) layers, the optimizer \(layers.count)")
        }
        for (l, b) in layers.enumerated() {
            let fieldCount = try r.u64()
            guard fieldCount <= 64 else { throw KFACError(.corruptState, "state image has a bad layer description") }
            var fields: [Int] = []
            for _ in 0..<fieldCount { fields.append(try r.i64()) }
            guard fields == b.layer.fields else {
                throw KFACError(.stateMismatch, "state image layer \(l) is \(LayerDescription(fields: fields).map { "\($0)" } ?? "unreadable"), the optimizer's is \(b.layer)")
            }
        }
        var restored: [any CurvatureLayer<Scalar>] = []
        for b in layers {
            let fresh = try makeLayer(b.layer)
            for c in fresh.blocks {
                try c.input.read(from: &r)
                try c.output.read(from: &r)
                let tag = try r.u64()
                if tag > 0 {
                    guard let s = InverseStrategy(rawValue: Int32(truncatingIfNeeded: tag - 1)) else {
                        throw KFACError(.corruptState, "state image has an unknown inverse strategy")
                    }
                    guard c.hasFactors else {
                        throw KFACError(.corruptState, "state image has inverses for a block without factors")
                    }
                    let inv = try c.makeInverse(s)
                    try inv.read(from: &r)
                    try inv.validateLoaded()
                    c.restoreInverse(inv)
                }
                guard started || !(c.input.hasRunning || c.input.hasPending || c.output.hasRunning || c.output.hasPending) else {
                    throw KFACError(.corruptState, "state image has statistics but says none were recorded")
                }
            }
            restored.append(fresh)
        }
        return (restored, started)
    }

    /// The most bytes `write` can write for these layers (state-file size checks).
    var maximumImageBytes: Int {
        var total = 16
        for b in layers { total += 8 + 8 * b.layer.fields.count }
        for c in blocks {
            let inverse = InverseStrategy.allCases.map {
                $0.representation(Scalar.self).imageScalarCount(input: c.input.structure, output: c.output.structure)
            }.max() ?? 0
            total += c.input.maximumImageBytes + c.output.maximumImageBytes + 8 + inverse * MemoryLayout<Scalar>.stride
        }
        return total
    }

    /// Replaces the layers (and their blocks) with ones `read` restored.
    func install(layers restored: [any CurvatureLayer<Scalar>], statisticsStarted started: Bool) {
        layers = restored
        statisticsStarted = started
    }
}

extension BlockDiagonalEstimator: ParallelJobs {
    /// Inversion job `index` of `stageInverses`: one unique block of one factor of one
    /// Kronecker block, into the target inverse. Errors are kept per job and reported by the
    /// caller.
    func runJob(_ index: Int, worker: Int) {
        let job = inversionJobs[index]
        do throws(KFACError) {
            let inverse = try inverse(of: job.block, in: inversionTarget, strategy: inversionStrategy)
            let source = jobSources[job.block]
            let (factor, shift) = job.side == .input ? (source.a!, source.inputShift) : (source.g!, source.outputShift)
            try inverse.computeBlock(job.side, job.unique, from: factor.base, shift: shift, workspace: workspaces[worker])
            jobErrors[index] = nil
        } catch {
            jobErrors[index] = error
        }
    }
}
