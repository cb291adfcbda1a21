/// A K-FAC optimizer: the schedule, the KL clip and the step that turns the layers' gradients
/// into preconditioned directions, over a curvature estimator (`BlockDiagonalEstimator`) that
/// owns the layers, their factors and inverses. The adaptive mode and the γ re-choice keep
/// their state apart (`AdaptiveState`, `DampingCandidates`).
///
/// The conventions (factor definitions, damping, KL clip, schedule) are those documented in
/// `include/kfac.h`; this class is what the C ABI is built on. One instance is used by one thread
/// at a time. Every throwing method leaves the optimizer as it was when it throws: a step stages
/// its folds and inverses and commits them only once nothing can fail any more.
public final class KFACOptimizer<Scalar: KFACScalar> {
    public internal(set) var parameters = KFACParameters() {
        // EKFAC's per-example gradients are kept only under its strategy (KFACOptimizer+EKFAC).
        didSet { if parameters.inverseStrategy != oldValue.inverseStrategy { leftStrategy(oldValue.inverseStrategy) } }
    }
    /// The step counter k: the number of successful `step` calls (or as restored from a state).
    public internal(set) var stepCount = 0
    /// ν of the last successful `step` (1 when not clipped), NaN before the first.
    public internal(set) var lastKLScale = Double.nan

    /// The curvature: layers, blocks, factors, inverses, inversion work.
    let estimator: BlockDiagonalEstimator<Scalar>
    /// The adaptive mode's state (replaced as a whole when a state image is loaded).
    var adaptive = AdaptiveState<Scalar>()
    /// The γ candidates of the last step.
    var candidates = DampingCandidates<Scalar>()
    /// Gauss-Newton products: the kept Jacobian columns and the dense chain (GaussNewton/).
    var gaussNewtonColumns = CurvatureColumns<Scalar>()
    var denseChain: DenseChain<Scalar>?
    /// The conjugate-gradient solver's state (Gauss-Newton family, `GaussNewton/`).
    let conjugateGradient = ConjugateGradientState<Scalar>()
    /// The blocks' phases when the inversions of a period are spread over its steps.
    let spread = InversionSpread()
    /// A distributed run's rank, size and exchanged inverses (Distributed/).
    var distributed = DistributedState<Scalar>()
    /// Block-tridiagonal links between consecutive dense layers (Tridiagonal/), nil when none.
    var tridiagonal: TridiagonalLinks<Scalar>?

    public init() throws(KFACError) {
        estimator = try BlockDiagonalEstimator()
    }

    /// Joins background work first, so that the estimator is released here, never on its thread.
    deinit { estimator.waitForBackground() }

    // MARK: Parameters

    /// Replaces all parameters after validating them (`.parameterRange` names the bad one).
    public func setParameters(_ p: KFACParameters) throws(KFACError) {
        try p.validate()
        parameters = p
    }

    public func set(_ p: ParameterID, _ value: Double) throws(KFACError) {
        parameters = try parameters.setting(p, value)
    }

    public func set(_ p: ParameterID, _ value: Int64) throws(KFACError) {
        parameters = try parameters.setting(p, value)
    }

    // MARK: Schedule

    /// Whether the step with counter `k` folds the recorded statistics into the factors.
    func shouldFoldFactors(at k: Int) -> Bool {
        parameters.factorUpdatePeriod > 0 && k % parameters.factorUpdatePeriod == 0
    }

    /// Whether the step with counter `k` recomputes every layer's inverses.
    func shouldInvert(at k: Int) -> Bool {
        parameters.inverseUpdatePeriod > 0 && k % parameters.inverseUpdatePeriod == 0
    }

    /// When the inversions are spread (`inverseSpread`, Ti > 1): the phase whose blocks the step
    /// with counter `k` re-inverts, k mod Ti. Nil otherwise (every block at k ≡ 0 mod Ti).
    func spreadPhase(at k: Int) -> Int? {
        let t = parameters.inverseUpdatePeriod
        return parameters.inverseSpread && t > 1 ? k % t : nil
    }

    /// Whether the step with counter `k` prepares γ candidates (a γ step).
    func isDampingCandidateStep(at k: Int) -> Bool {
        parameters.factorDampingPeriod > 0 && k % parameters.factorDampingPeriod == 0
    }

    // MARK: Layers

    /// Registers a dense layer and returns its index.
    @discardableResult
    public func addDense(inFeatures: Int, outFeatures: Int, hasBias: Bool,
                         grouping: ChannelGrouping = .init()) throws(KFACError) -> Int {
        try estimator.addDense(inFeatures: inFeatures, outFeatures: outFeatures, hasBias: hasBias, grouping: grouping)
    }

    /// Registers a 2-D (or, as 1×L, 1-D) convolution and returns its index.
    @discardableResult
    public func addConv2d(_ geometry: Conv2dGeometry, approximation: ConvApproximation = .kfc,
                          grouping: ChannelGrouping = .init()) throws(KFACError) -> Int {
        try estimator.addConv2d(geometry, approximation: approximation, grouping: grouping)
    }

    public var layerCount: Int { estimator.layerCount }

    func layer(_ l: Int) throws(KFACError) -> any CurvatureLayer<Scalar> {
        try estimator.layer(l)
    }

    public func layerInfo(_ layer: Int) throws(KFACError) -> LayerInfo {
        let b = try self.layer(layer)
        if let links = tridiagonal, links.isLinked(layer) {
            return LayerInfo(layer: b.layer, hasFactors: b.blocks.allSatisfy(\.hasFactors), hasInverses: links.hasInverses)
        }
        return LayerInfo(layer: b.layer, hasFactors: b.blocks.allSatisfy(\.hasFactors),
                         hasInverses: b.blocks.allSatisfy { $0.hasInverse(for: parameters.inverseStrategy) })
    }

    // MARK: Statistics

    /// Whether statistics recorded now are folded at the next `step`.
    public var wantsStatistics: Bool {
        let t = parameters.factorUpdatePeriod
        return t == 0 || stepCount % t == 0
    }

    /// Adds the inputs of `rows` examples to the layer's input statistics: dense [rows][inFeatures];
    /// convolution [rows][C][H][W] or [rows][H][W][C], as its layout says.
    public func recordInputs(layer: Int, _ inputs: UnsafePointer<Scalar>?, rows: Int) throws(KFACError) {
        guard let links = tridiagonal, links.isLinked(layer) else {
            return try estimator.recordInputs(layer: layer, inputs, rows: rows)
        }
        if rows >= 1 && inputs != nil { try links.prepareRecord(layer: layer, outputSide: false, rows: rows) }
        try estimator.recordInputs(layer: layer, inputs, rows: rows)
        links.record(layer: layer, inputs!, rows: rows, outputSide: false, scale: 1)
    }

    /// Adds the output gradients of `rows` examples to the layer's gradient statistics (dense
    /// [rows][outFeatures]; convolution [rows][C_out][H_out][W_out] or channels-last), scaled as
    /// `lossReduction` and `outputGradScale` say.
    public func recordOutputGradients(layer: Int, _ gradients: UnsafePointer<Scalar>?, rows: Int) throws(KFACError) {
        let reduction = parameters.lossReduction == .mean ? Double(rows) : 1
        let scale = reduction / parameters.outputGradScale
        guard let links = tridiagonal, links.isLinked(layer) else {
            return try estimator.recordOutputGradients(layer: layer, gradients, rows: rows, scale: scale)
        }
        if rows >= 1 && gradients != nil { try links.prepareRecord(layer: layer, outputSide: true, rows: rows) }
        try estimator.recordOutputGradients(layer: layer, gradients, rows: rows, scale: scale)
        links.record(layer: layer, gradients!, rows: rows, outputSide: true, scale: Scalar(scale))
    }

    /// Folds every layer's pending statistics into its running factors now.
    public func updateFactors() throws(KFACError) {
        try estimator.validatePendingStatistics()
        if let links = tridiagonal { try links.checkPaired(estimator: estimator) }
        try estimator.stageScalingFolds(settings: parameters.curvatureSettings)  // EKFAC's S
        try estimator.foldFactors(decay: parameters.factorDecay)
        estimator.commitScalingFolds(clearingAll: parameters.inverseStrategy != .ekfac)
        tridiagonal?.fold(decay: parameters.factorDecay)
    }

    /// Drops every layer's statistics recorded since the last fold (`kfac_optimizer_discard_statistics`):
    /// the way out of pending statistics that make every fold or inversion fail. Running
    /// factors, inverses, counters and parameters stay. Cannot fail.
    public func discardStatistics() {
        estimator.discardPendingStatistics()
        estimator.discardPairedStatistics()  // EKFAC's per-example gradients are pending statistics too
        tridiagonal?.discardPending()        // and so are the links' cross rows (else every fold stays unpaired)
    }

    /// Recomputes the inverses of every layer that has factors, in parallel across layers and blocks.
    public func updateInverses() throws(KFACError) {
        estimator.discardBackground()  // every block is re-inverted from newer factors
        // Exchanged link inverses and scaling sums were for the inverses this replaces (the
        // blocks' exchanged inverses are invalidated by the staging generation).
        distributed.preparedLinks = nil
        distributed.preparedScaling = nil
        guard let links = tridiagonal else { return try estimator.invert(parameters.curvatureSettings) }
        try updateInverses(links)
    }

    /// Copies the running factors of group `group` of a layer (0 for dense layers) as full
    /// symmetric row-major matrices (zeros off the blocks of a grouped or SUA factor).
    public func copyFactors(layer: Int, group: Int = 0, a: UnsafeMutablePointer<Scalar>?, g: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        let c = try estimator.block(layer: layer, group: group)
        guard c.hasFactors else { throw KFACError(.noStatistics, "layer \(layer) has no factors yet") }
        if let a { c.input.copyRunning(into: a) }
        if let g { c.output.copyRunning(into: g) }
    }

    /// The running factors (A, G) of group `group` of a layer as full symmetric row-major arrays.
    public func factors(layer: Int, group: Int = 0) throws(KFACError) -> (a: [Scalar], g: [Scalar]) {
        let b = try self.layer(layer)
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

    // MARK: Step

    /// One optimizer step over all layers (the schedule of `include/kfac.h`): fold statistics
    /// and recompute inverses when due, precondition every layer's gradient, KL-clip, write the
    /// directions back into the gradient buffers, advance the step counter.
    /// `gradient(l)` returns layer l's buffers.
    ///
    /// Stages: validate → plan inversions → stage folds and inverses → precondition (with the
    /// inverses this step will commit) → commit → KL clip and write → keep for the adaptive
    /// model (and prepare γ candidates on a γ step).
    public func step(_ gradient: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        guard estimator.layerCount > 0 else { throw KFACError(.invalidSize, "no layers are registered") }
        for l in 0..<estimator.layerCount {
            try checkGradient(gradient(l), layer: estimator.layers[l], index: l)
        }
        let dampingStep = isDampingCandidateStep(at: stepCount)
        let p = stepParameters()
        let settings = p.curvatureSettings
        let folding = shouldFoldFactors(at: stepCount)
        let asyncOn = try asyncInversionApplies(p)
        var joined = settleBackground(p, asyncOn: asyncOn)
        var anyInversion = try planStepInversions(p, folding: folding, asyncOn: asyncOn, joined: joined)
        if anyInversion && estimator.backgroundPending && !joined {  // the pool is busy: wait, then re-plan
            estimator.waitForBackground()
            joined = true
            anyInversion = try planStepInversions(p, folding: folding, asyncOn: asyncOn, joined: joined)
        }
        let launching = estimator.planBackground(joined: joined, launching: asyncOn && shouldInvert(at: stepCount),
                                                 strategy: p.inverseStrategy)
        if launching { try estimator.reserveBackground(strategy: p.inverseStrategy, threadCount: p.threadCount) }
        let linksInverting = try planTridiagonalStep(folding: folding, inverting: shouldInvert(at: stepCount))
        if folding { try estimator.validatePendingStatistics() }
        if folding, let links = tridiagonal { try links.checkPaired(estimator: estimator) }
        try adaptive.reserveStepDirections(estimator.blocks)
        if dampingStep { try candidates.reserve(estimator.blocks, strategy: p.inverseStrategy) }
        if anyInversion { try stageStepInverses(folding: folding, settings: settings, damping: p.inverseDamping) }
        // EKFAC's S (BlockDiagonalEstimator+EKFAC), from the union's sums in a distributed run.
        try estimator.stageScalings(folding: folding, settings: settings, reduced: reducedScalings())
        if linksInverting { try stageStepLinkInverses(folding: folding, settings: settings) }  // exchanged ones if prepared

        var inner = try preconditionGradients(gradient, strategy: p.inverseStrategy, damping: Scalar(p.inverseDamping))
        if let links = tridiagonal { inner += try preconditionLinked(links, staged: linksInverting) }

        // Commit: nothing below can fail.
        estimator.commitStep(folding: folding, decay: p.factorDecay)
        estimator.commitBackground(joined: joined)
        if launching { estimator.launchBackground(settings: settings, damping: p.inverseDamping) }
        if dampingStep { parameters.factorDamping = p.factorDamping }
        estimator.commitPairedStatistics(folding: folding)
        if let links = tridiagonal { commitTridiagonalStep(links, folding: folding, inverted: linksInverting) }
        let nu = klScale(inner: inner)
        for l in 0..<estimator.layerCount { estimator.scatter(layer: l, scale: Scalar(nu), into: gradient(l)) }
        keepStepForModel(klScale: nu, damping: p.inverseDamping)
        if dampingStep { prepareDampingCandidates() }
        lastKLScale = nu
        stepCount += 1
        adaptive.directionsAvailable = true
        distributed.preparedScaling = nil
        distributed.preparedLinks = nil
    }

    /// The parameters the step at the current counter uses: on a γ step, γ brought into
    /// [λ/r, λ·r] (`factorDampingRatio`), kept at the commit.
    func stepParameters() -> KFACParameters {
        var p = parameters
        if isDampingCandidateStep(at: stepCount) && p.factorDamping > 0 { p.factorDamping = p.bandedFactorDamping }
        return p
    }

    /// Marks the blocks the step at the current counter inverts (`estimator.invertBlock`);
    /// returns whether there is any. Also used by the distributed inverse exchange.
    /// With `asyncOn` a block is inverted in the step only when it has no inverse for the
    /// strategy or its background inversion failed (`joined`: the caller waited for it); the
    /// due blocks go to the background (`BlockDiagonalEstimator.planBackground`).
    func planStepInversions(_ p: KFACParameters, folding: Bool, asyncOn: Bool = false,
                            joined: Bool = false) throws(KFACError) -> Bool {
        if asyncOn {
            return try estimator.planInversions(foldingPending: folding, strategy: p.inverseStrategy) { k, hasInverse in
                !hasInverse || (joined && estimator.backgroundFailed(block: k))
            }
        }
        let inverting = shouldInvert(at: stepCount)
        // A γ step whose inverses hold their damping inverts every factor for each candidate γ.
        let invertForCandidates = isDampingCandidateStep(at: stepCount) && p.inverseStrategy.dampingIsBakedIn
        // Spread inversions: a block is due at the steps of its phase instead of at k ≡ 0.
        let phase = spreadPhase(at: stepCount)
        if phase != nil { spread.prepare(estimator.blocks, period: p.inverseUpdatePeriod) }
        return try estimator.planInversions(foldingPending: folding, strategy: p.inverseStrategy) { k, hasInverse in
            let due = phase.map { spread.phase[k] == $0 } ?? inverting
            return (p.inverseUpdatePeriod > 0 && (due || !hasInverse)) || invertForCandidates
        }
    }

    /// Preconditions every layer's gradient into its blocks' directions with the inverses the
    /// step will commit (staged where the step inverts). Returns Σ |⟨U, V⟩| over layers, then
    /// blocks, in order (the KL clip's sum).
    private func preconditionGradients(_ gradient: (Int) -> ParameterGradient<Scalar>, strategy: InverseStrategy,
                                       damping: Scalar) throws(KFACError) -> Double {
        var inner = 0.0
        for l in 0..<estimator.layerCount {
            estimator.gather(layer: l, gradient(l))
            if estimator.isExcluded(l) { continue }
            for k in estimator.layerBlocks[l] {
                try estimator.precondition(block: k, staged: estimator.usesStagedInverse(k), strategy: strategy, damping: damping)
                let c = estimator.blocks[k]
                inner += Double(Scalar.dot(count: c.direction.count, x: c.direction.base, y: c.gradient.base)).magnitude
            }
        }
        return inner
    }

    /// ν = min(1, sqrt(κ / (η² Σ|⟨U, V⟩|))), 1 when clipping is off.
    func klScale(inner: Double) -> Double {
        let kappa = parameters.klClip, eta = parameters.learningRate
        guard kappa > 0, inner > 0 else { return 1 }
        return Swift.min(1, (kappa / (eta * eta * inner)).squareRoot())
    }

    /// Checks that a layer's bias buffer is given exactly when the layer has a bias.
    func checkBias(_ bias: UnsafeMutablePointer<Scalar>?, layer b: any CurvatureLayer<Scalar>, index l: Int,
                   what: String) throws(KFACError) {
        guard b.layer.hasBias != (bias != nil) else { return }
        throw KFACError(b.layer.hasBias ? .nullPointer : .invalidArgument,
                        b.layer.hasBias ? "layer \(l) has a bias but its bias \(what) is NULL"
                                        : "layer \(l) has no bias but a bias \(what) was given")
    }

    private func checkGradient(_ g: ParameterGradient<Scalar>, layer b: any CurvatureLayer<Scalar>, index l: Int) throws(KFACError) {
        try checkBias(g.bias, layer: b, index: l, what: "gradient")
        guard Scalar.allFinite(g.weight, count: b.weightCount),
              g.bias.map({ Scalar.allFinite($0, count: b.layer.outFeatures) }) ?? true else {
            throw KFACError(.nonFinite, "the gradient of layer \(l) contains NaN or Inf")
        }
    }

    // MARK: Curvature products

    /// Preconditions one layer's gradient in place with the current inverses: no schedule, no
    /// KL clip, no change to the optimizer.
    public func precondition(layer: Int, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        try multiply(layer: layer, weight: weight, bias: bias, power: .inverse)
    }

    /// Replaces one layer's parameter-shaped vector (weight [out][in] row-major, bias [out]) by
    /// its product with the layer's damped curvature block at `power`, the damped matrix being
    /// the one the inverse strategy inverts: exact damping A ⊗ G + λI, factored damping
    /// (A + π√λ I) ⊗ (G + √λ/π I), λ = `inverseDamping`. `.one` uses the running factors;
    /// `.inverse` the current inverses (with factored damping, the λ and π they were computed
    /// with). No schedule, no KL clip, no change to the optimizer.
    public func multiply(layer: Int, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?,
                         power: CurvaturePower) throws(KFACError) {
        let b = try self.layer(layer)
        let v = ParameterGradient(weight: weight, bias: bias)
        try checkGradient(v, layer: b, index: layer)
        if let links = tridiagonal, links.isLinked(layer) {
            throw KFACError(.unsupported, "layer \(layer) is block-tridiagonally linked: its product needs its neighbours (use the all-layer product or the step)")
        }
        try estimator.multiply(layer: layer, v, power: power, parameters.curvatureSettings)
    }

    /// `multiply(layer:…)` for every layer; `vectors(l)` returns layer l's buffers. On any
    /// error (a bad buffer, a layer not ready, a product that is not finite) no buffer has been
    /// written.
    public func multiply(power: CurvaturePower, _ vectors: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        guard estimator.layerCount > 0 else { throw KFACError(.invalidSize, "no layers are registered") }
        for l in 0..<estimator.layerCount {
            try checkGradient(vectors(l), layer: estimator.layers[l], index: l)
        }
        guard let links = tridiagonal else {
            return try estimator.multiplyAll(vectors, power: power, parameters.curvatureSettings)
        }
        try multiplyLinked(links, power: power, vectors)
    }
}
