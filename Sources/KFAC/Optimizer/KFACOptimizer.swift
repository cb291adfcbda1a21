/// The parameter gradient buffers of one layer for `KFACOptimizer.step`: read, then overwritten
/// with the preconditioned direction. `weight` is [out][in] row-major, `bias` [out] (nil exactly
/// when the layer has no bias).
public struct ParameterGradient<Scalar: KFACScalar> {
    public var weight: UnsafeMutablePointer<Scalar>
    public var bias: UnsafeMutablePointer<Scalar>?

    public init(weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?) {
        self.weight = weight
        self.bias = bias
    }
}

/// A K-FAC optimizer: the curvature state of a set of layers, and the step that turns their
/// gradients into preconditioned directions.
///
/// The conventions (factor definitions, damping, KL clip, schedule) are those documented in
/// `include/kfac.h`; this class is what the C ABI is built on. One instance is used by one thread
/// at a time. Every throwing method leaves the optimizer as it was when it throws.
public final class KFACOptimizer<Scalar: KFACScalar> {
    public internal(set) var parameters = KFACParameters()
    /// The step counter k: the number of successful `step` calls (or as restored from a state).
    public internal(set) var stepCount = 0
    /// ν of the last successful `step` (1 when not clipped), NaN before the first.
    public internal(set) var lastKLScale = Double.nan
    /// The adaptive mode's state: whether the last step's directions await `solveStepSize`,
    /// whether there is a previous update δ₀, the model's predicted change of the last solve
    /// (awaiting `reportLossChange`), the last ρ and the number of reports.
    var directionsAvailable = false
    /// Inner products of the last step for the quadratic model that do not depend on its
    /// directions: ⟨V, δ₀⟩, ‖δ₀‖² (the rest are per candidate, `DampingCandidate`).
    var previousProducts = (vp: 0.0, pp: 0.0)
    var hasPreviousUpdate = false
    var predictedChange: Double?
    public internal(set) var lastReductionRatio = Double.nan
    var lossReports = 0

    var blocks: [any CurvatureLayer<Scalar>] = [] {
        didSet { indexCurvatures() }
    }
    /// Every layer's curvatures, flat, and the layer each belongs to.
    private(set) var curvatures: [KroneckerBlock<Scalar>] = []
    private var curvatureLayer: [Int] = []
    /// Layers can no longer be added once statistics were recorded.
    var statisticsStarted = false

    private let ones: AlignedBuffer<Scalar>
    fileprivate var workspaces: [EigenWorkspace<Scalar>] = []
    private let workers = WorkerPool()
    // Per-step bookkeeping, sized when layers are added so a step does not allocate.
    private var invertCurvature: [Bool] = []
    /// Inversion jobs: one per unique block of each side of each curvature to invert.
    fileprivate var inversionJobs: [InversionJob] = []
    /// Per curvature and side (2c, 2c + 1): the factor to invert and its Tikhonov shift.
    fileprivate var jobSources: [AlignedBuffer<Scalar>?] = []
    fileprivate var jobShifts: [Scalar] = []
    /// One slot per job, written by the worker threads (distinct slots), read after they finish.
    fileprivate var jobErrors = UnsafeMutableBufferPointer<KFACError?>(start: nil, count: 0)
    fileprivate var inversionStrategy = InverseStrategy.eigen
    /// Where the running inversion writes: 0 = the staging inverses, 1 or 2 = a γ candidate's.
    fileprivate var inversionTarget = 0
    /// The γ candidates of the last step (candidate 0 first), with what their solve needs.
    var candidates: [DampingCandidate] = []
    /// The strategy the last step's candidates were computed with.
    var candidateStrategy = InverseStrategy.eigen

    struct InversionJob {
        var curvature: Int
        var side: Int  // 0 = input, 1 = output
        var block: Int
        var size: Int
    }

    public init() throws(KFACError) {
        candidates.reserveCapacity(3)
        ones = try AlignedBuffer(rows: 1, columns: 1024)
        for i in 0..<ones.count { ones.base[i] = 1 }
    }

    // MARK: Parameters

    /// Replaces all parameters after validating them (`.parameterRange` names the bad one).
    public func setParameters(_ p: KFACParameters) throws(KFACError) {
        try p.validate()
        parameters = p
    }

    public func set(_ p: KFACParameter, _ value: Double) throws(KFACError) {
        parameters = try parameters.setting(p, value)
    }

    public func set(_ p: KFACParameter, _ value: Int64) throws(KFACError) {
        parameters = try parameters.setting(p, value)
    }

    // MARK: Layers

    /// Largest factor side: keeps every BLAS/LAPACK size and leading dimension within 32 bits.
    static var maximumFactorDimension: Int { 46_340 }

    /// Registers a dense layer and returns its index.
    @discardableResult
    public func addDense(inFeatures: Int, outFeatures: Int, hasBias: Bool,
                         grouping: ChannelGrouping = .init()) throws(KFACError) -> Int {
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
        try append(try makeBlock(.dense(inFeatures: inFeatures, outFeatures: outFeatures, hasBias: hasBias, grouping: grouping)))
        return blocks.count - 1
    }

    /// Registers a 2-D (or, as 1×L, 1-D) convolution and returns its index.
    @discardableResult
    public func addConv2d(_ geometry: Conv2dGeometry, approximation: ConvApproximation = .kfc,
                          grouping: ChannelGrouping = .init()) throws(KFACError) -> Int {
        try checkLayersOpen()
        try geometry.validate()
        try checkGrouping(grouping)
        try checkFactorSizes(inputDimension: geometry.patchSize + (geometry.hasBias ? 1 : 0),
                             outputDimension: geometry.groupOutChannels, what: "convolution")
        try append(try makeBlock(.conv2d(geometry, approximation: approximation, grouping: grouping)))
        return blocks.count - 1
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

    private func append(_ block: any CurvatureLayer<Scalar>) throws(KFACError) {
        blocks.append(block)
    }

    /// The block type of a layer kind, built from its description.
    func makeBlock(_ layer: LayerDescription) throws(KFACError) -> any CurvatureLayer<Scalar> {
        switch layer {
        case .dense(let i, let o, let bias, let grouping):
            return try DenseLayer<Scalar>(inFeatures: i, outFeatures: o, hasBias: bias, grouping: grouping)
        case .conv2d(let g, let approximation, let grouping):
            return try Conv2dLayer<Scalar>(g, approximation: approximation, grouping: grouping)
        }
    }

    /// Rebuilds the flat curvature list and the bookkeeping sized by it (when layers change).
    private func indexCurvatures() {
        curvatures = []
        curvatureLayer = []
        var jobs = 0
        for (l, b) in blocks.enumerated() {
            for c in b.curvatures {
                curvatures.append(c)
                curvatureLayer.append(l)
                jobs += c.input.structure.uniqueSizes.count + c.output.structure.uniqueSizes.count
            }
        }
        let n = curvatures.count
        invertCurvature = Array(repeating: false, count: n)
        inversionJobs = []
        inversionJobs.reserveCapacity(jobs)
        jobSources = Array(repeating: nil, count: 2 * n)
        jobShifts = Array(repeating: 0, count: 2 * n)
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

    deinit { releaseJobErrors() }

    public var layerCount: Int { blocks.count }

    func block(_ layer: Int) throws(KFACError) -> any CurvatureLayer<Scalar> {
        guard layer >= 0 && layer < blocks.count else {
            throw KFACError(.unknownLayer, "layer \(layer) is not registered (there are \(blocks.count) layers)")
        }
        return blocks[layer]
    }

    public func layerInfo(_ layer: Int) throws(KFACError) -> LayerInfo {
        let b = try block(layer)
        return LayerInfo(layer: b.layer, hasFactors: b.curvatures.allSatisfy(\.hasFactors),
                         hasInverses: b.curvatures.allSatisfy { $0.hasInverse(for: parameters.inverseStrategy) })
    }

    // MARK: Statistics

    /// Whether statistics recorded now are folded at the next `step`.
    public var wantsStatistics: Bool {
        let t = parameters.factorUpdatePeriod
        return t == 0 || stepCount % t == 0
    }

    /// Validates a record call and returns the block: the buffer, the rows, and that the values are
    /// finite and small enough that the pending second-moment sums, with `scale` applied to every
    /// value, stay finite (so a later fold cannot fail because of them).
    private func checkedRecord(_ p: UnsafePointer<Scalar>?, layer: Int, rows: Int, outputSide: Bool,
                               scale: Double) throws(KFACError) -> any CurvatureLayer<Scalar> {
        let b = try block(layer)
        let what = outputSide ? "output gradients" : "inputs"
        guard let p else { throw KFACError(.nullPointer, "\(what) buffer is NULL") }
        guard rows >= 1 else { throw KFACError(.invalidSize, "rows must be >= 1, got \(rows)") }
        let perRow = Swift.max(b.inputValueCount(rows: 1), b.outputGradientValueCount(rows: 1), 1)
        guard rows <= Int.max / perRow else {
            throw KFACError(.sizeOverflow, "\(rows) rows overflow the buffer size")
        }
        let count = outputSide ? b.outputGradientValueCount(rows: rows) : b.inputValueCount(rows: rows)
        let largest = Double(Scalar.largestMagnitude(p, count: count))
        guard largest.isFinite else { throw KFACError(.nonFinite, "\(what) of layer \(layer) contain NaN or Inf") }
        let bound = b.pendingBound(largest: largest, rows: rows, outputSide: outputSide, scale: scale)
        guard bound <= Double(Scalar.greatestFiniteMagnitude) / 16 else {
            throw KFACError(.nonFinite, "\(what) of layer \(layer) are too large (|x| up to \(largest)): their second moments would overflow \(Scalar.self)")
        }
        return b
    }

    /// Adds the inputs of `rows` examples to the layer's input statistics: dense [rows][inFeatures];
    /// convolution [rows][C][H][W] or [rows][H][W][C], as its layout says.
    public func recordInputs(layer: Int, _ inputs: UnsafePointer<Scalar>?, rows: Int) throws(KFACError) {
        let b = try checkedRecord(inputs, layer: layer, rows: rows, outputSide: false, scale: 1)
        try b.recordInputs(inputs!, rows: rows, ones: ones)
        statisticsStarted = true
    }

    /// Adds the output gradients of `rows` examples to the layer's gradient statistics (dense
    /// [rows][outFeatures]; convolution [rows][C_out][H_out][W_out] or channels-last), scaled as
    /// `lossReduction` and `outputGradScale` say.
    public func recordOutputGradients(layer: Int, _ gradients: UnsafePointer<Scalar>?, rows: Int) throws(KFACError) {
        let reduction = parameters.lossReduction == .mean ? Double(rows) : 1
        let scale = reduction / parameters.outputGradScale
        let b = try checkedRecord(gradients, layer: layer, rows: rows, outputSide: true, scale: scale)
        try b.recordOutputGradients(gradients!, rows: rows, scale: Scalar(scale), ones: ones)
        statisticsStarted = true
    }

    private func validatePendingStatistics() throws(KFACError) {
        for k in curvatures.indices {
            let c = curvatures[k]
            do {
                try c.input.validatePending()
                try c.output.validatePending()
            } catch {
                throw KFACError(error.status, "layer \(curvatureLayer[k]): \(error.message)")
            }
        }
    }

    /// Folds every layer's pending statistics into its running factors now.
    public func updateFactors() throws(KFACError) {
        try validatePendingStatistics()
        let decay = Scalar(parameters.factorDecay)
        for k in curvatures.indices {
            curvatures[k].input.fold(decay: decay)
            curvatures[k].output.fold(decay: decay)
        }
    }

    /// Recomputes the inverses of every layer that has factors, in parallel across layers and blocks.
    public func updateInverses() throws(KFACError) {
        var any = false
        for k in curvatures.indices {
            invertCurvature[k] = curvatures[k].hasFactors
            any = any || invertCurvature[k]
        }
        guard any else { throw KFACError(.noStatistics, "no layer has factors yet") }
        try computeStagedInverses(foldingPending: false, damping: parameters.inverseDamping)
        for k in curvatures.indices where invertCurvature[k] { curvatures[k].commitStagedInverse() }
    }

    /// Copies the running factors of group `group` of a layer (0 for dense layers) as full
    /// symmetric row-major matrices (zeros off the blocks of a grouped or SUA factor).
    public func copyFactors(layer: Int, group: Int = 0, a: UnsafeMutablePointer<Scalar>?, g: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        let b = try block(layer)
        guard group >= 0 && group < b.curvatures.count else {
            throw KFACError(.invalidArgument, "group \(group) is out of range: layer \(layer) has groups 0..<\(b.curvatures.count)")
        }
        let c = b.curvatures[group]
        guard c.hasFactors else { throw KFACError(.noStatistics, "layer \(layer) has no factors yet") }
        if let a { c.input.copyRunning(into: a) }
        if let g { c.output.copyRunning(into: g) }
    }

    /// The running factors (A, G) of group `group` of a layer as full symmetric row-major arrays.
    public func factors(layer: Int, group: Int = 0) throws(KFACError) -> (a: [Scalar], g: [Scalar]) {
        let b = try block(layer)
        let (da, dg) = (b.layer.inputFactorDimension, b.layer.outputFactorDimension)
        var a = [Scalar](repeating: 0, count: da * da)
        var g = [Scalar](repeating: 0, count: dg * dg)
        try a.withUnsafeMutableBufferPointer { (pa) throws(KFACError) in
            try g.withUnsafeMutableBufferPointer { (pg) throws(KFACError) in
                try copyFactors(layer: layer, group: group, a: pa.baseAddress, g: pg.baseAddress)
            }
        }
        return (a, g)
    }

    // MARK: Inversion

    /// Computes staging inverses (or, with `target` 1 or 2, the inverses of a γ candidate, whose
    /// buffers must be reserved) with damping `damping` for the curvatures marked in
    /// `invertCurvature`, from their running factors or, with `foldingPending`, from out-of-place
    /// folds of their pending statistics. Nothing committed changes; on failure throws the first
    /// error in layer order.
    private func computeStagedInverses(foldingPending: Bool, target: Int = 0, damping: Double) throws(KFACError) {
        let strategy = parameters.inverseStrategy
        let decay = Scalar(parameters.factorDecay)
        let sqrtDamping = Scalar(damping.squareRoot())
        inversionJobs.removeAll(keepingCapacity: true)
        for k in curvatures.indices where invertCurvature[k] {
            let c = curvatures[k]
            let a = foldingPending ? try c.input.stageFold(decay: decay) : c.input.running
            let g = foldingPending ? try c.output.stageFold(decay: decay) : c.output.running
            if target == 0 { _ = try c.stagingInverse(for: strategy) }
            let pi = strategy == .cholesky && parameters.piDamping ? c.factoredDampingPi(a: a.base, g: g.base) : 1
            jobSources[2 * k] = a
            jobSources[2 * k + 1] = g
            jobShifts[2 * k] = pi * sqrtDamping
            jobShifts[2 * k + 1] = sqrtDamping / pi
            for side in 0..<2 {
                let sizes = side == 0 ? c.input.structure.uniqueSizes : c.output.structure.uniqueSizes
                for q in sizes.indices {
                    inversionJobs.append(InversionJob(curvature: k, side: side, block: q, size: sizes[q]))
                }
            }
        }
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
        let threads = parameters.threadCount == 0 ? onlineProcessorCount() : parameters.threadCount
        let workerCount = Swift.max(1, Swift.min(threads, inversionJobs.count))
        while workspaces.count < workerCount { workspaces.append(try EigenWorkspace()) }

        inversionStrategy = strategy
        inversionTarget = target
        workers.run(count: inversionJobs.count, workers: workerCount, self)
        var firstError: (layer: Int, error: KFACError, side: Int)?
        for index in inversionJobs.indices {
            let job = inversionJobs[index]
            if let e = jobErrors[index] {
                jobErrors[index] = nil
                let layer = curvatureLayer[job.curvature]
                if firstError == nil || layer < firstError!.layer { firstError = (layer, e, job.side) }
            }
        }
        for k in curvatures.indices where invertCurvature[k] {
            jobSources[2 * k] = nil
            jobSources[2 * k + 1] = nil
        }
        if let f = firstError {
            throw KFACError(f.error.status, "layer \(f.layer), \(f.side == 0 ? "input" : "output") factor: \(f.error.message)")
        }
        for k in curvatures.indices where invertCurvature[k] {
            let inverse = try inverse(of: curvatures[k], target: target, strategy: strategy)
            inverse.input.finish()
            inverse.output.finish()
        }
    }

    /// The inverse an inversion into `target` writes for curvature `c`.
    fileprivate func inverse(of c: KroneckerBlock<Scalar>, target: Int, strategy: InverseStrategy) throws(KFACError) -> KroneckerInverse<Scalar> {
        target == 0 ? try c.stagingInverse(for: strategy) : c.candidateInverses[target - 1]
    }

    // MARK: Preconditioning

    /// One optimizer step over all layers (the schedule of `include/kfac.h`): fold statistics
    /// and recompute inverses when due, precondition every layer's gradient, KL-clip, write the
    /// directions back into the gradient buffers, advance the step counter.
    /// `gradient(l)` returns layer l's buffers.
    public func step(_ gradient: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        guard !blocks.isEmpty else { throw KFACError(.invalidSize, "no layers are registered") }
        for l in blocks.indices {
            try checkGradient(gradient(l), block: blocks[l], layer: l)
        }

        let p = parameters
        let foldNow = p.factorUpdatePeriod > 0 && stepCount % p.factorUpdatePeriod == 0
        let inverseStep = p.inverseUpdatePeriod > 0 && stepCount % p.inverseUpdatePeriod == 0
        // A γ step with the Cholesky strategy inverts every factor for each candidate γ.
        let dampingStep = p.factorDampingPeriod > 0 && stepCount % p.factorDampingPeriod == 0
        let invertForCandidates = dampingStep && p.inverseStrategy == .cholesky
        var anyInversion = false
        for k in curvatures.indices {
            let c = curvatures[k]
            let inputReady = c.input.hasRunning || (foldNow && c.input.hasPending)
            let outputReady = c.output.hasRunning || (foldNow && c.output.hasPending)
            guard inputReady && outputReady else {
                throw KFACError(.noStatistics, "layer \(curvatureLayer[k]) has no \(inputReady ? "output-gradient" : "input") statistics; record them before the step")
            }
            let hasInverse = c.hasInverse(for: p.inverseStrategy)
            invertCurvature[k] = (p.inverseUpdatePeriod > 0 && (inverseStep || !hasInverse)) || invertForCandidates
            guard invertCurvature[k] || hasInverse else {
                throw KFACError(.noInverses, "layer \(curvatureLayer[k]) has no inverses and the inverse update period is 0; call update_inverses")
            }
            anyInversion = anyInversion || invertCurvature[k]
        }
        if foldNow { try validatePendingStatistics() }
        for k in curvatures.indices {
            try curvatures[k].reserveStepDirection()
            if dampingStep { try curvatures[k].reserveCandidates(strategy: p.inverseStrategy) }
        }
        if anyInversion { try computeStagedInverses(foldingPending: foldNow, damping: p.inverseDamping) }

        // Precondition with the inverses this step will commit, before committing anything.
        let damping = Scalar(p.inverseDamping)
        var inner = 0.0
        var k = 0
        for l in blocks.indices {
            let b = blocks[l]
            let g = gradient(l)
            b.gatherGradient(weight: g.weight, bias: g.bias)
            for j in b.curvatures.indices {
                let c = b.curvatures[j]
                let inverse = invertCurvature[k] ? try c.stagingInverse(for: p.inverseStrategy) : c.inverse!
                inverse.apply(to: c.gradient, into: c.direction, scratch: c.scratch, damping: damping)
                guard Scalar.allFinite(c.direction.base, count: c.direction.count) else {
                    throw KFACError(.nonFinite, "the preconditioned gradient of layer \(l) is not finite; increase the damping")
                }
                inner += Double(Scalar.dot(count: c.direction.count, x: c.direction.base, y: c.gradient.base)).magnitude
                k += 1
            }
        }

        // Commit: nothing below can fail.
        let decay = Scalar(p.factorDecay)
        for k in curvatures.indices {
            let c = curvatures[k]
            if invertCurvature[k] {
                if foldNow {
                    c.input.commitStagedFold()
                    c.output.commitStagedFold()
                }
                c.commitStagedInverse()
            } else if foldNow {
                c.input.fold(decay: decay)
                c.output.fold(decay: decay)
            }
        }
        let nu = klScale(inner: inner)
        for l in blocks.indices {
            let g = gradient(l)
            blocks[l].scatterDirection(scale: Scalar(nu), weight: g.weight, bias: g.bias)
        }
        keepStepForModel(klScale: nu, damping: p.inverseDamping)
        if dampingStep { prepareDampingCandidates() }
        lastKLScale = nu
        stepCount += 1
        directionsAvailable = true
    }

    /// On a γ step, after the commit: the directions for γ·ω₂ and γ/ω₂ (inverting the factors
    /// again for the Cholesky strategy). A candidate that fails (a factor not positive definite,
    /// directions not finite) is left out; nothing here changes the committed state.
    private func prepareDampingCandidates() {
        let p = parameters
        let gamma = p.inverseDamping
        let omega = LibM.exp(Double(p.factorDampingPeriod) * LibM.log(p.factorDampingDecay))
        candidateStrategy = p.inverseStrategy
        if p.inverseStrategy == .cholesky {
            for k in curvatures.indices { invertCurvature[k] = true }
        }
        for slot in 1...2 {
            let damping = slot == 1 ? gamma * omega : gamma / omega
            guard damping > 0 && damping.isFinite else { continue }
            if p.inverseStrategy == .cholesky {
                do { try computeStagedInverses(foldingPending: false, target: slot, damping: damping) } catch { continue }
            }
            var inner = 0.0, finite = true
            for k in curvatures.indices {
                let c = curvatures[k], u = c.candidateDirections[slot - 1]
                let inverse = p.inverseStrategy == .cholesky ? c.candidateInverses[slot - 1] : c.inverse!
                inverse.apply(to: c.gradient, into: u, scratch: c.scratch, damping: Scalar(damping))
                guard Scalar.allFinite(u.base, count: u.count) else { finite = false; break }
                inner += Double(Scalar.dot(count: u.count, x: u.base, y: c.gradient.base)).magnitude
            }
            if finite { addCandidate(slot: slot, damping: damping, klScale: klScale(inner: inner)) }
        }
    }

    /// ν = min(1, sqrt(κ / (η² Σ|⟨U, V⟩|))), 1 when clipping is off.
    private func klScale(inner: Double) -> Double {
        let kappa = parameters.klClip, eta = parameters.learningRate
        guard kappa > 0, inner > 0 else { return 1 }
        return Swift.min(1, (kappa / (eta * eta * inner)).squareRoot())
    }

    /// Checks that a layer's bias buffer is given exactly when the layer has a bias.
    func checkBias(_ bias: UnsafeMutablePointer<Scalar>?, block b: any CurvatureLayer<Scalar>, layer l: Int,
                   what: String) throws(KFACError) {
        guard b.layer.hasBias != (bias != nil) else { return }
        throw KFACError(b.layer.hasBias ? .nullPointer : .invalidArgument,
                        b.layer.hasBias ? "layer \(l) has a bias but its bias \(what) is NULL"
                                        : "layer \(l) has no bias but a bias \(what) was given")
    }

    private func checkGradient(_ g: ParameterGradient<Scalar>, block b: any CurvatureLayer<Scalar>, layer l: Int) throws(KFACError) {
        try checkBias(g.bias, block: b, layer: l, what: "gradient")
        guard Scalar.allFinite(g.weight, count: b.weightCount),
              g.bias.map({ Scalar.allFinite($0, count: b.layer.outFeatures) }) ?? true else {
            throw KFACError(.nonFinite, "the gradient of layer \(l) contains NaN or Inf")
        }
    }

    /// Preconditions one layer's gradient in place with the current inverses: no schedule, no
    /// KL clip, no change to the optimizer.
    public func precondition(layer: Int, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        let b = try block(layer)
        let g = ParameterGradient(weight: weight, bias: bias)
        try checkGradient(g, block: b, layer: layer)
        for j in b.curvatures.indices {
            let c = b.curvatures[j]
            guard c.hasFactors else { throw KFACError(.noStatistics, "layer \(layer) has no factors yet") }
            guard c.hasInverse(for: parameters.inverseStrategy) else {
                throw KFACError(.noInverses, "layer \(layer) has no inverses for the current strategy")
            }
        }
        b.gatherGradient(weight: weight, bias: bias)
        for j in b.curvatures.indices {
            let c = b.curvatures[j]
            c.inverse!.apply(to: c.gradient, into: c.direction, scratch: c.scratch, damping: Scalar(parameters.inverseDamping))
            guard Scalar.allFinite(c.direction.base, count: c.direction.count) else {
                throw KFACError(.nonFinite, "the preconditioned gradient of layer \(layer) is not finite; increase the damping")
            }
        }
        b.scatterDirection(scale: 1, weight: weight, bias: bias)
    }
}

extension KFACOptimizer: ParallelJobs {
    /// Inversion job `index` of `computeStagedInverses`: one unique block of one factor of one
    /// curvature, into the curvature's staging inverse. Errors are kept per job and reported by
    /// the caller.
    func runJob(_ index: Int, worker: Int) {
        let job = inversionJobs[index]
        let c = curvatures[job.curvature]
        do throws(KFACError) {
            let inverse = try inverse(of: c, target: inversionTarget, strategy: inversionStrategy)
            let side = job.side == 0 ? inverse.input : inverse.output
            let source = 2 * job.curvature + job.side
            try side.computeBlock(job.block, from: jobSources[source]!.base, shift: jobShifts[source], workspace: workspaces[worker])
            jobErrors[index] = nil
        } catch {
            jobErrors[index] = error
        }
    }
}
