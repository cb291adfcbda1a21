/// K-FAC's adaptive mode (Martens & Grosse 2015, §6–7): the step size α and momentum μ chosen
/// by minimising the quadratic model of the loss, and the Levenberg–Marquardt adjustment of λ
/// from the reduction ratio ρ.
///
/// With D the directions the last `step` wrote (KL-clipped, if clipping is on), δ₀ the previous
/// update and F the exact Fisher of the mean loss (from the caller's output-space products J·D,
/// J·δ₀), the update is δ = −α D + μ δ₀ where (α, μ) minimise
///     M(δ) = ½ δᵀ (F + λ I) δ + ∇hᵀ δ,
/// a 2×2 linear system (α alone when there is no previous update). ρ = (h(θ + δ) − h(θ)) / M(δ).
/// On a γ step (§6.6) the model is minimised for each candidate damping's directions and the
/// candidate with the lowest M(δ) is kept.
extension KFACOptimizer {
    /// At a successful step's commit: keeps its directions and the inner products the quadratic
    /// model needs (a failed step or a standalone `precondition` later cannot change them).
    func keepStepForModel(klScale: Double, damping: Double) {
        var vp = 0.0, pp = 0.0
        let blocks = estimator.blocks
        for k in blocks.indices {
            let c = blocks[k], n = c.direction.count
            if let p = adaptive.previous(k) {
                vp += Double(Scalar.dot(count: n, x: c.gradient.base, y: p.base))
                pp += Double(Scalar.dot(count: n, x: p.base, y: p.base))
            }
            adaptive.stepDirection[k]?.copyContents(from: c.direction)
        }
        adaptive.previousProducts = (vp, pp)
        candidates.list.removeAll(keepingCapacity: true)
        addCandidate(slot: .current, damping: damping, klScale: klScale)
    }

    /// The directions of candidate `slot` of block `k`.
    private func candidateDirection(block k: Int, slot: CandidateSlot) -> AlignedBuffer<Scalar> {
        slot == .current ? adaptive.stepDirection[k]! : candidates.directions(slot)[k]
    }

    /// Adds a candidate whose directions are in place, with its inner products.
    func addCandidate(slot: CandidateSlot, damping: Double, klScale: Double) {
        var candidate = DampingCandidate(slot: slot, damping: damping, klScale: klScale)
        let blocks = estimator.blocks
        for k in blocks.indices {
            let c = blocks[k], u = candidateDirection(block: k, slot: slot), n = u.count
            candidate.vu += Double(Scalar.dot(count: n, x: c.gradient.base, y: u.base))
            candidate.uu += Double(Scalar.dot(count: n, x: u.base, y: u.base))
            if let p = adaptive.previous(k) {
                candidate.up += Double(Scalar.dot(count: n, x: u.base, y: p.base))
            }
        }
        candidates.list.append(candidate)
    }

    /// On a γ step, after the commit: the directions for γ·ω₂ and γ/ω₂ (inverting the factors
    /// again when the strategy's inverses hold their damping), those within [λ/r, λ·r]
    /// (`factorDampingRatio`) only. A candidate that fails (a factor
    /// not positive definite, directions not finite) is left out; nothing here changes the
    /// committed state.
    func prepareDampingCandidates() {
        let p = parameters, settings = p.curvatureSettings
        let gamma = p.inverseDamping
        let omega = LibM.exp(Double(p.factorDampingPeriod) * LibM.log(p.factorDampingDecay))
        let baked = p.inverseStrategy.dampingIsBakedIn
        candidates.strategy = p.inverseStrategy
        if baked { estimator.markAllForInversion() }
        let blocks = estimator.blocks
        for raw in CandidateSlot.larger.rawValue...CandidateSlot.smaller.rawValue {
            let slot = CandidateSlot(rawValue: raw)!
            let damping = slot == .larger ? gamma * omega : gamma / omega
            guard damping > 0 && damping.isFinite && p.factorDampingInBand(damping) else { continue }
            if baked {
                do {
                    try estimator.stageInverses(foldingPending: false, into: .inverses(candidates.inverses(slot)),
                                                settings: settings, damping: damping)
                } catch { continue }
            }
            var inner = 0.0, finite = true
            for k in blocks.indices {
                let c = blocks[k], u = candidates.directions(slot)[k]
                let inverse = baked ? candidates.inverses(slot)[k] : c.inverse!
                inverse.multiplyInverse(c.gradient, into: u, scratch: c.scratch, damping: Scalar(damping))
                guard Scalar.allFinite(u.base, count: u.count) else { finite = false; break }
                inner += Double(Scalar.dot(count: u.count, x: u.base, y: c.gradient.base)).magnitude
            }
            if finite { addCandidate(slot: slot, damping: damping, klScale: klScale(inner: inner)) }
        }
    }

    /// The number of candidates awaiting the solve: 1, up to 3 on a γ step; 0 when none await.
    public var candidateCount: Int { adaptive.directionsAvailable ? candidates.list.count : 0 }

    /// Whether a loss change was ever reported (so `lastReductionRatio` is a reported ρ, which
    /// may itself be NaN when that solve's M(δ) was not negative).
    public var hasReportedLossChange: Bool { adaptive.lossReports > 0 }

    /// ρ of the last `reportLossChange`, NaN before the first.
    public var lastReductionRatio: Double { adaptive.lastReductionRatio }

    /// Chooses α (and μ when `previousProducts` is given) for the directions of the last step.
    ///
    /// - `outputs`: the network's outputs on the batch, `rows` × `dim` (logits, or means for
    ///   `.gaussian`), at the parameters the step's gradients were taken at;
    /// - `directionProducts`: J·D per example, the forward-mode (R-op) derivative of the outputs
    ///   along the directions the step wrote (weights and biases), same shape;
    /// - `previousProducts`: J·δ₀ for the previous update, or nil to choose α alone.
    ///
    /// Returns (α, μ, M(δ)); the caller applies θ ← θ − α·D + μ·δ₀. The library remembers δ as the
    /// next δ₀ and M(δ) for `reportLossChange`. Gradients given to `step` must be those of the
    /// mean loss over the batch (the Fisher here is the mean over the rows). On a γ step this
    /// solves for candidate 0 (the current γ) only.
    public func solveStepSize(outputs: UnsafePointer<Scalar>?, directionProducts: UnsafePointer<Scalar>?,
                              previousProducts: UnsafePointer<Scalar>?, rows: Int, dim: Int,
                              distribution: OutputDistribution) throws(KFACError) -> (alpha: Double, mu: Double, predictedChange: Double) {
        let r = try solve(outputs: outputs, products: { _ in directionProducts }, count: 1, firstOnly: true,
                          previousProducts: previousProducts, rows: rows, dim: dim, distribution: distribution)
        return (r.alpha, r.mu, r.predictedChange)
    }

    /// `solveStepSize` over every candidate of the last step (`candidateCount` of them):
    /// `directionProducts(k)` is J·D_k for candidate k's directions (`copyCandidateDirections`).
    /// Keeps the candidate with the lowest M(δ): on a γ step its γ becomes `factorDamping` (and
    /// with the Cholesky strategy its inverses the committed ones). Returns its index, α, μ, M(δ).
    public func solveStepSize(outputs: UnsafePointer<Scalar>?, candidateProducts directionProducts: (Int) -> UnsafePointer<Scalar>?,
                              candidateCount count: Int, previousProducts: UnsafePointer<Scalar>?, rows: Int, dim: Int,
                              distribution: OutputDistribution) throws(KFACError) -> (chosen: Int, alpha: Double, mu: Double, predictedChange: Double) {
        try solve(outputs: outputs, products: directionProducts, count: count, firstOnly: false,
                  previousProducts: previousProducts, rows: rows, dim: dim, distribution: distribution)
    }

    private func solve(outputs: UnsafePointer<Scalar>?, products: (Int) -> UnsafePointer<Scalar>?, count: Int, firstOnly: Bool,
                       previousProducts: UnsafePointer<Scalar>?, rows: Int, dim: Int,
                       distribution: OutputDistribution) throws(KFACError) -> (chosen: Int, alpha: Double, mu: Double, predictedChange: Double) {
        let usePrevious = try checkModelInputs(outputs: outputs, products: products, count: count, firstOnly: firstOnly,
                                               previousProducts: previousProducts, rows: rows, dim: dim)
        return try solve(count: count, firstOnly: firstOnly, usePrevious: usePrevious, rows: Double(rows)) { k in
            OutputFisher.quadraticForms(distribution: distribution, outputs: outputs!, rows: rows, dim: dim,
                                        u: products(k)!, v: usePrevious ? previousProducts : nil)
        }
    }

    /// Checks the arguments of a solve (or of packing its model sums); returns whether the
    /// previous update takes part (μ).
    func checkModelInputs(outputs: UnsafePointer<Scalar>?, products: (Int) -> UnsafePointer<Scalar>?, count: Int, firstOnly: Bool,
                          previousProducts: UnsafePointer<Scalar>?, rows: Int, dim: Int) throws(KFACError) -> Bool {
        guard adaptive.directionsAvailable else {
            throw KFACError(.noStep, "solve the step size after a successful step (and only once per step)")
        }
        guard firstOnly || count == candidates.list.count else {
            throw KFACError(.invalidArgument, "the last step has \(candidates.list.count) candidates, got products for \(count)")
        }
        guard let outputs else { throw KFACError(.nullPointer, "outputs are NULL") }
        for k in 0..<count where products(k) == nil {
            throw KFACError(.nullPointer, count == 1 ? "direction products are NULL" : "direction_products[\(k)] is NULL")
        }
        guard rows >= 1, dim >= 1 else { throw KFACError(.invalidSize, "rows and dim must be >= 1, got \(rows) and \(dim)") }
        let (size, overflow) = rows.multipliedReportingOverflow(by: dim)
        guard !overflow else { throw KFACError(.sizeOverflow, "rows × dim overflows") }
        let usePrevious = previousProducts != nil && adaptive.hasPreviousUpdate
        guard Scalar.allFinite(outputs, count: size), previousProducts.map({ Scalar.allFinite($0, count: size) }) ?? true else {
            throw KFACError(.nonFinite, "outputs or Jacobian products contain NaN or Inf")
        }
        for k in 0..<count where !Scalar.allFinite(products(k)!, count: size) {
            throw KFACError(.nonFinite, "outputs or Jacobian products contain NaN or Inf")
        }
        return usePrevious
    }

    /// The solve from the model's output-space sums over `rows` examples: `forms(k)` is
    /// (Σ uᵀFu, Σ uᵀFv, Σ vᵀFv) of candidate k (u = J·D_k, v = J·δ₀). Distributed runs pass
    /// sums reduced over the ranks (Distributed/).
    func solve(count: Int, firstOnly: Bool, usePrevious: Bool, rows n: Double,
               forms: (Int) -> (uu: Double, uv: Double, vv: Double)) throws(KFACError) -> (chosen: Int, alpha: Double, mu: Double, predictedChange: Double) {
        let lambda = parameters.damping
        var best: (index: Int, alpha: Double, mu: Double, predicted: Double)?
        var smallest = Double.infinity
        for k in 0..<count {
            let c = candidates.list[k]
            let forms = forms(k)
            // Coefficients of Δ = −D = −ν U and δ₀.
            let nu = c.klScale, (vp, pp) = adaptive.previousProducts
            let (vd, dd, dp) = (nu * c.vu, nu * nu * c.uu, nu * c.up)
            let a11 = forms.uu / n + lambda * dd
            let b1 = -vd
            var alpha = -b1 / a11, mu = 0.0
            if usePrevious {
                let a12 = -forms.uv / n - lambda * dp
                let a22 = forms.vv / n + lambda * pp
                let b2 = vp
                let det = a11 * a22 - a12 * a12
                // δ₀ parallel to D: α alone.
                if det > 1e-12 * a11 * a22 && det.isFinite {
                    alpha = -(a22 * b1 - a12 * b2) / det
                    mu = -(a11 * b2 - a12 * b1) / det
                }
            }
            guard a11 > 0, alpha.isFinite, mu.isFinite else { continue }
            let predicted = 0.5 * (b1 * alpha + (usePrevious ? vp * mu : 0))
            if best == nil || predicted < smallest {
                best = (k, alpha, mu, predicted)
                smallest = predicted
            }
        }
        guard let best else {
            throw KFACError(.nonFinite, "the quadratic model is degenerate (Dᵀ(F + λI)D is not positive); increase the damping")
        }
        try adaptive.reservePreviousUpdates(estimator.blocks)
        // Commit: nothing below can fail. δ = −α ν U + μ δ₀ becomes the next δ₀.
        let chosen = candidates.list[best.index]
        if !firstOnly && candidates.list.count > 1 {
            parameters.factorDamping = chosen.damping
            if chosen.slot != .current && candidates.strategy.dampingIsBakedIn {
                candidates.adoptInverses(chosen.slot, into: estimator.blocks)
            }
        }
        for k in estimator.blocks.indices {
            let p = adaptive.previousUpdate[k]!
            Scalar.scal(count: p.count, alpha: Scalar(adaptive.hasPreviousUpdate ? best.mu : 0), x: p.base)
            Scalar.axpy(count: p.count, alpha: Scalar(-best.alpha * chosen.klScale), x: candidateDirection(block: k, slot: chosen.slot).base, y: p.base)
        }
        adaptive.hasPreviousUpdate = true
        adaptive.directionsAvailable = false
        adaptive.predictedChange = best.predicted
        return (best.index, best.alpha, best.mu, best.predicted)
    }

    /// Writes candidate `candidate`'s directions of the last step (KL-clipped with its own ν)
    /// into the layers' buffers, as `step` writes candidate 0's. Returns the candidate's γ.
    @discardableResult
    public func copyCandidateDirections(_ candidate: Int, into buffers: (Int) -> ParameterGradient<Scalar>) throws(KFACError) -> Double {
        guard adaptive.directionsAvailable else {
            throw KFACError(.noStep, "candidate directions are available after a successful step, until its solve")
        }
        guard candidate >= 0 && candidate < candidates.list.count else {
            throw KFACError(.invalidArgument, "candidate \(candidate) is out of range: the last step has \(candidates.list.count)")
        }
        try checkBiases(buffers)
        let c = candidates.list[candidate]
        write(buffers, scale: c.klScale) { k in candidateDirection(block: k, slot: c.slot) }
        return c.damping
    }

    /// Writes the update δ = −α·D + μ·δ₀ of the last solve (the next δ₀) into the layers'
    /// buffers: the caller applies θ ← θ + δ.
    public func copyUpdate(into buffers: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        guard adaptive.hasPreviousUpdate else { throw KFACError(.noStep, "there is no update before the first solve") }
        try checkBiases(buffers)
        write(buffers, scale: 1) { k in adaptive.previousUpdate[k]! }
    }

    private func checkBiases(_ buffers: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        for l in 0..<estimator.layerCount {
            try checkBias(buffers(l).bias, layer: estimator.layers[l], index: l, what: "buffer")
        }
    }

    /// Writes `scale ·` the matrices `source` gives per block index into the layers' buffers
    /// (through each block's `direction`, free between steps).
    private func write(_ buffers: (Int) -> ParameterGradient<Scalar>, scale: Double,
                       _ source: (Int) -> AlignedBuffer<Scalar>) {
        for l in 0..<estimator.layerCount {
            for k in estimator.layerBlocks[l] { estimator.blocks[k].direction.copyContents(from: source(k)) }
            estimator.scatter(layer: l, scale: Scalar(scale), into: buffers(l))
        }
    }

    /// Reports the mean loss before and after the update of the last `solveStepSize`: returns
    /// ρ = (after − before) / M(δ) and, every `lmInterval` reports, adjusts λ (ρ > 3/4: λ·ω, but
    /// not below `dampingMin` (nor below λ if λ already is); ρ < 1/4: λ/ω; ω = lmDecay^lmInterval).
    @discardableResult
    public func reportLossChange(before: Double, after: Double) throws(KFACError) -> Double {
        guard let predicted = adaptive.predictedChange else {
            throw KFACError(.noStep, "report the loss change after solveStepSize (once per solve)")
        }
        // A divergent step may report +Inf after: ρ = −Inf, and λ grows.
        guard before.isFinite, !after.isNaN, after != -.infinity else {
            throw KFACError(.nonFinite, "the loss before must be finite and the loss after finite or +Inf, got \(before) and \(after)")
        }
        let rho = predicted < 0 ? (after - before) / predicted : .nan
        applyLevenbergMarquardt(rho: rho, reports: closeReport(rho: rho))
        return rho
    }

    /// Whether the next `reportLossChange` adjusts λ: `lmInterval > 0` and it is the interval's
    /// last report. Martens & Grosse (§6.5) compute ρ only on those steps; the other solves may
    /// end with `skipLossReport`, which saves the caller a forward pass.
    public var nextReportAdjustsDamping: Bool {
        let t = parameters.lmInterval
        return t > 0 && (adaptive.lossReports + 1) % t == 0
    }

    /// Ends the last solve without a loss report: it counts as a report for the
    /// Levenberg–Marquardt interval, with ρ NaN (`lastReductionRatio`), and λ is unchanged.
    /// Refused (`.noStep`) without a solve to report, and when the report would adjust λ
    /// (`nextReportAdjustsDamping`): that report needs the losses.
    public func skipLossReport() throws(KFACError) {
        guard adaptive.predictedChange != nil else {
            throw KFACError(.noStep, "skip the loss report after solveStepSize (once per solve)")
        }
        guard !nextReportAdjustsDamping else {
            throw KFACError(.noStep, "this report adjusts λ (every lmInterval-th report): evaluate the loss after the update and report it")
        }
        closeReport(rho: .nan)
    }

    /// Ends the last solve's report (made or skipped) with `rho`; returns the reports counted.
    @discardableResult
    private func closeReport(rho: Double) -> Int {
        adaptive.predictedChange = nil
        adaptive.lastReductionRatio = rho
        adaptive.lossReports += 1
        return adaptive.lossReports
    }

    /// The Levenberg–Marquardt rule, shared by the adaptive mode and Newton-CG: on every
    /// `lmInterval`-th report (`reports` counts them), λ·ω if ρ > 3/4 and λ/ω if ρ < 1/4,
    /// ω = lmDecay^lmInterval; a NaN ρ, or a λ that would leave (0, ∞), changes nothing.
    func applyLevenbergMarquardt(rho: Double, reports: Int) {
        let t = parameters.lmInterval
        guard t > 0 && reports % t == 0 && !rho.isNaN else { return }
        let omega = LibM.exp(Double(t) * LibM.log(parameters.lmDecay))
        var p = parameters
        // Never below λ_min (`dampingMin`), nor from below it further down.
        let lambda = p.damping, floor = Swift.min(lambda, p.dampingMin)
        if rho > 0.75 { p.damping = Swift.max(lambda * omega, floor) } else if rho < 0.25 { p.damping /= omega }
        if p.damping > 0 && p.damping.isFinite { parameters = p }
    }
}
