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

    var blocks: [any CurvatureBlock<Scalar>] = []
    /// Layers can no longer be added once statistics were recorded.
    var statisticsStarted = false

    private let ones: Matrix<Scalar>
    fileprivate var workspaces: [EigenWorkspace<Scalar>] = []
    private let workers = WorkerPool()
    // Per-step bookkeeping, sized when layers are added so a step does not allocate.
    private var invertLayer: [Bool] = []
    fileprivate var inversionJobs: [Int] = []
    fileprivate var jobSources: [Matrix<Scalar>?] = []
    fileprivate var jobShifts: [Scalar] = []
    /// One slot per job, written by the worker threads (distinct slots), read after they finish.
    fileprivate var jobErrors = UnsafeMutableBufferPointer<KFACError?>(start: nil, count: 0)
    fileprivate var inversionStrategy = InverseStrategy.eigen

    public init() throws(KFACError) {
        ones = try Matrix(rows: 1, columns: 1024)
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
    public func addDense(inFeatures: Int, outFeatures: Int, hasBias: Bool) throws(KFACError) -> Int {
        guard !statisticsStarted else {
            throw KFACError(.layersFrozen, "layers must all be added before statistics are recorded")
        }
        guard inFeatures >= 1, outFeatures >= 1 else {
            throw KFACError(.invalidSize, "a dense layer needs in_features >= 1 and out_features >= 1, got \(inFeatures) and \(outFeatures)")
        }
        let aDim = inFeatures + (hasBias ? 1 : 0)
        guard aDim <= Self.maximumFactorDimension, outFeatures <= Self.maximumFactorDimension,
              outFeatures * aDim <= Int(Int32.max) else {
            throw KFACError(.sizeOverflow, "dense layer \(inFeatures)→\(outFeatures) exceeds the largest supported factor (\(Self.maximumFactorDimension)) or 2^31 − 1 parameters")
        }
        let block = try DenseBlock<Scalar>(inFeatures: inFeatures, outFeatures: outFeatures, hasBias: hasBias)
        try append(block)
        return blocks.count - 1
    }

    private func append(_ block: any CurvatureBlock<Scalar>) throws(KFACError) {
        blocks.append(block)
        let n = blocks.count
        invertLayer = Array(repeating: false, count: n)
        inversionJobs.reserveCapacity(2 * n)
        jobSources = Array(repeating: nil, count: 2 * n)
        jobShifts = Array(repeating: 0, count: 2 * n)
        let errors = UnsafeMutableBufferPointer<KFACError?>.allocate(capacity: 2 * n)
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

    func block(_ layer: Int) throws(KFACError) -> any CurvatureBlock<Scalar> {
        guard layer >= 0 && layer < blocks.count else {
            throw KFACError(.unknownLayer, "layer \(layer) is not registered (there are \(blocks.count) layers)")
        }
        return blocks[layer]
    }

    public func layerInfo(_ layer: Int) throws(KFACError) -> LayerInfo {
        let b = try block(layer)
        return LayerInfo(layer: b.layer, hasFactors: b.curvature.hasFactors,
                         hasInverses: b.curvature.hasInverse(for: parameters.inverseStrategy))
    }

    // MARK: Statistics

    /// Whether statistics recorded now are folded at the next `step`.
    public var wantsStatistics: Bool {
        let t = parameters.factorUpdatePeriod
        return t == 0 || stepCount % t == 0
    }

    /// Validates a record call and returns the block: the buffer, the rows, and that the values are
    /// finite and small enough that the pending second-moment sum, with `scale` applied to every
    /// value, stays finite (so a later fold cannot fail because of it).
    private func checkedRecord(_ p: UnsafePointer<Scalar>?, layer: Int, rows: Int, outputSide: Bool,
                               scale: Double) throws(KFACError) -> any CurvatureBlock<Scalar> {
        let b = try block(layer)
        let what = outputSide ? "output gradients" : "inputs"
        guard let p else { throw KFACError(.nullPointer, "\(what) buffer is NULL") }
        guard rows >= 1 else { throw KFACError(.invalidSize, "rows must be >= 1, got \(rows)") }
        guard rows <= Int.max / Swift.max(b.layer.inFeatures, b.layer.outFeatures) else {
            throw KFACError(.sizeOverflow, "\(rows) rows overflow the buffer size")
        }
        let count = outputSide ? b.outputGradientValueCount(rows: rows) : b.inputValueCount(rows: rows)
        let largest = Double(Scalar.largestMagnitude(p, count: count))
        guard largest.isFinite else { throw KFACError(.nonFinite, "\(what) of layer \(layer) contain NaN or Inf") }
        let factor = outputSide ? b.curvature.output : b.curvature.input
        let bound = largest * scale * largest * scale * Double(factor.pendingRows + rows)
        guard bound <= Double(Scalar.greatestFiniteMagnitude) / 16 else {
            throw KFACError(.nonFinite, "\(what) of layer \(layer) are too large (|x| up to \(largest)): their second moments would overflow \(Scalar.self)")
        }
        return b
    }

    /// Adds `rows` layer inputs ([rows][inFeatures] row-major) to the layer's input statistics.
    public func recordInputs(layer: Int, _ inputs: UnsafePointer<Scalar>?, rows: Int) throws(KFACError) {
        let b = try checkedRecord(inputs, layer: layer, rows: rows, outputSide: false, scale: 1)
        try b.recordInputs(inputs!, rows: rows, ones: ones)
        statisticsStarted = true
    }

    /// Adds `rows` output gradients ([rows][outFeatures] row-major) to the layer's gradient
    /// statistics, scaled as `lossReduction` and `outputGradScale` say.
    public func recordOutputGradients(layer: Int, _ gradients: UnsafePointer<Scalar>?, rows: Int) throws(KFACError) {
        let reduction = parameters.lossReduction == .mean ? Double(rows) : 1
        let scale = reduction / parameters.outputGradScale
        let b = try checkedRecord(gradients, layer: layer, rows: rows, outputSide: true, scale: scale)
        try b.recordOutputGradients(gradients!, rows: rows, scale: Scalar(scale), ones: ones)
        statisticsStarted = true
    }

    private func validatePendingStatistics() throws(KFACError) {
        for l in blocks.indices {
            let b = blocks[l]
            do {
                try b.curvature.input.validatePending()
                try b.curvature.output.validatePending()
            } catch {
                throw KFACError(error.status, "layer \(l): \(error.message)")
            }
        }
    }

    /// Folds every layer's pending statistics into its running factors now.
    public func updateFactors() throws(KFACError) {
        try validatePendingStatistics()
        let decay = Scalar(parameters.factorDecay)
        for b in blocks {
            b.curvature.input.fold(decay: decay)
            b.curvature.output.fold(decay: decay)
        }
    }

    /// Recomputes the inverses of every layer that has factors, in parallel across layers.
    public func updateInverses() throws(KFACError) {
        var any = false
        for l in blocks.indices {
            let b = blocks[l]
            invertLayer[l] = b.curvature.hasFactors
            any = any || invertLayer[l]
        }
        guard any else { throw KFACError(.noStatistics, "no layer has factors yet") }
        try computeStagedInverses(foldingPending: false)
        for l in blocks.indices where invertLayer[l] {
            blocks[l].curvature.commitStagedInverse()
        }
    }

    /// Copies the layer's running factors as full symmetric row-major matrices.
    public func copyFactors(layer: Int, a: UnsafeMutablePointer<Scalar>?, g: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        let c = try block(layer).curvature
        guard c.hasFactors else { throw KFACError(.noStatistics, "layer \(layer) has no factors yet") }
        if let a { c.input.copyRunning(into: a) }
        if let g { c.output.copyRunning(into: g) }
    }

    /// The layer's running factors (A, G) as full symmetric row-major arrays.
    public func factors(layer: Int) throws(KFACError) -> (a: [Scalar], g: [Scalar]) {
        let c = try block(layer).curvature
        var a = [Scalar](repeating: 0, count: c.input.dimension * c.input.dimension)
        var g = [Scalar](repeating: 0, count: c.output.dimension * c.output.dimension)
        try a.withUnsafeMutableBufferPointer { (pa) throws(KFACError) in
            try g.withUnsafeMutableBufferPointer { (pg) throws(KFACError) in
                try copyFactors(layer: layer, a: pa.baseAddress, g: pg.baseAddress)
            }
        }
        return (a, g)
    }

    // MARK: Inversion

    /// Computes staging inverses for the layers marked in `invertLayer`, from their running
    /// factors or, with `foldingPending`, from out-of-place folds of their pending statistics.
    /// Nothing committed changes; on failure throws the first error in layer order.
    private func computeStagedInverses(foldingPending: Bool) throws(KFACError) {
        let strategy = parameters.inverseStrategy
        let decay = Scalar(parameters.factorDecay)
        let sqrtDamping = Scalar(parameters.damping.squareRoot())
        inversionJobs.removeAll(keepingCapacity: true)
        for l in blocks.indices where invertLayer[l] {
            let b = blocks[l]
            let c = b.curvature
            let a = foldingPending ? try c.input.stageFold(decay: decay) : c.input.running
            let g = foldingPending ? try c.output.stageFold(decay: decay) : c.output.running
            _ = try c.stagingInverse(for: strategy)
            let pi = strategy == .cholesky && parameters.piDamping
                ? factoredDampingPi(a: a.base, aDim: c.input.dimension, g: g.base, gDim: c.output.dimension) : 1
            jobSources[2 * l] = a
            jobSources[2 * l + 1] = g
            jobShifts[2 * l] = pi * sqrtDamping
            jobShifts[2 * l + 1] = sqrtDamping / pi
            inversionJobs.append(2 * l)
            inversionJobs.append(2 * l + 1)
        }
        // Largest factors first, so that striding the jobs over workers balances their cost.
        func dimension(_ job: Int) -> Int { jobSources[job]!.rows }
        for i in 1..<Swift.max(inversionJobs.count, 1) {
            var j = i
            while j > 0 && dimension(inversionJobs[j - 1]) < dimension(inversionJobs[j]) {
                inversionJobs.swapAt(j - 1, j)
                j -= 1
            }
        }
        let threads = parameters.threadCount == 0 ? onlineProcessorCount() : parameters.threadCount
        let workerCount = Swift.max(1, Swift.min(threads, inversionJobs.count))
        while workspaces.count < workerCount { workspaces.append(try EigenWorkspace()) }

        inversionStrategy = strategy
        workers.run(count: inversionJobs.count, workers: workerCount, self)
        for job in 0..<(2 * blocks.count) where invertLayer[job / 2] {
            jobSources[job] = nil
            if let e = jobErrors[job] {
                jobErrors[job] = nil
                throw KFACError(e.status, "layer \(job / 2), \(job % 2 == 0 ? "input" : "output") factor: \(e.message)")
            }
        }
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
        var anyInversion = false
        for l in blocks.indices {
            let b = blocks[l]
            let c = b.curvature
            let inputReady = c.input.hasRunning || (foldNow && c.input.hasPending)
            let outputReady = c.output.hasRunning || (foldNow && c.output.hasPending)
            guard inputReady && outputReady else {
                throw KFACError(.noStatistics, "layer \(l) has no \(inputReady ? "output-gradient" : "input") statistics; record them before the step")
            }
            let hasInverse = c.hasInverse(for: p.inverseStrategy)
            invertLayer[l] = p.inverseUpdatePeriod > 0 && (inverseStep || !hasInverse)
            guard invertLayer[l] || hasInverse else {
                throw KFACError(.noInverses, "layer \(l) has no inverses and the inverse update period is 0; call update_inverses")
            }
            anyInversion = anyInversion || invertLayer[l]
        }
        if foldNow { try validatePendingStatistics() }
        if anyInversion { try computeStagedInverses(foldingPending: foldNow) }

        // Precondition with the inverses this step will commit, before committing anything.
        let damping = Scalar(p.damping)
        var inner = 0.0
        for l in blocks.indices {
            let b = blocks[l]
            let c = b.curvature
            let g = gradient(l)
            b.gatherGradient(weight: g.weight, bias: g.bias)
            let inverse = invertLayer[l] ? try c.stagingInverse(for: p.inverseStrategy) : c.inverse!
            inverse.apply(to: c.gradient, into: c.direction, scratch: c.scratch, damping: damping)
            guard Scalar.allFinite(c.direction.base, count: c.direction.count) else {
                throw KFACError(.nonFinite, "the preconditioned gradient of layer \(l) is not finite; increase the damping")
            }
            inner += Double(Scalar.dot(count: c.direction.count, x: c.direction.base, y: c.gradient.base)).magnitude
        }

        // Commit: nothing below can fail.
        let decay = Scalar(p.factorDecay)
        for l in blocks.indices {
            let b = blocks[l]
            let c = b.curvature
            if invertLayer[l] {
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
            let b = blocks[l]
            let g = gradient(l)
            b.scatterDirection(scale: Scalar(nu), weight: g.weight, bias: g.bias)
        }
        lastKLScale = nu
        stepCount += 1
    }

    /// ν = min(1, sqrt(κ / (η² Σ|⟨U, V⟩|))), 1 when clipping is off.
    private func klScale(inner: Double) -> Double {
        let kappa = parameters.klClip, eta = parameters.learningRate
        guard kappa > 0, inner > 0 else { return 1 }
        return Swift.min(1, (kappa / (eta * eta * inner)).squareRoot())
    }

    private func checkGradient(_ g: ParameterGradient<Scalar>, block b: any CurvatureBlock<Scalar>, layer l: Int) throws(KFACError) {
        if b.layer.hasBias != (g.bias != nil) {
            throw KFACError(b.layer.hasBias ? .nullPointer : .invalidArgument,
                            b.layer.hasBias ? "layer \(l) has a bias but its bias gradient is NULL"
                                            : "layer \(l) has no bias but a bias gradient was given")
        }
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
        let c = b.curvature
        guard c.hasFactors else { throw KFACError(.noStatistics, "layer \(layer) has no factors yet") }
        guard let inverse = c.inverse, inverse.strategy == parameters.inverseStrategy else {
            throw KFACError(.noInverses, "layer \(layer) has no inverses for the current strategy")
        }
        b.gatherGradient(weight: weight, bias: bias)
        inverse.apply(to: c.gradient, into: c.direction, scratch: c.scratch, damping: Scalar(parameters.damping))
        guard Scalar.allFinite(c.direction.base, count: c.direction.count) else {
            throw KFACError(.nonFinite, "the preconditioned gradient of layer \(layer) is not finite; increase the damping")
        }
        b.scatterDirection(scale: 1, weight: weight, bias: bias)
    }
}

extension KFACOptimizer: ParallelJobs {
    /// Inversion job `index` of `computeStagedInverses`: one factor of one layer, into the
    /// layer's staging inverse. Errors are kept per job and reported by the caller.
    func runJob(_ index: Int, worker: Int) {
        let job = inversionJobs[index]
        let c = blocks[job / 2].curvature
        do throws(KFACError) {
            let inverse = try c.stagingInverse(for: inversionStrategy)
            let side = job % 2 == 0 ? inverse.input : inverse.output
            try side.compute(from: jobSources[job]!.base, shift: jobShifts[job], workspace: workspaces[worker])
            jobErrors[job] = nil
        } catch {
            jobErrors[job] = error
        }
    }
}
