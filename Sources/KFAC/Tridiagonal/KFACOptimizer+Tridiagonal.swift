/// Block-tridiagonal K-FAC on the optimizer: links, cross factors, and the hooks the step,
/// the inverse update and the products call when links exist (`tridiagonal != nil`).
extension KFACOptimizer {
    /// Links dense layer `lower` with layer `upper` = `lower` + 1, which consumes `lower`'s
    /// activation (upper.inFeatures == lower.outFeatures, both ungrouped dense layers), before
    /// any statistics are recorded. Linking every consecutive pair links the whole chain.
    public func linkLayers(lower: Int, upper: Int) throws(KFACError) {
        let links = tridiagonal ?? TridiagonalLinks<Scalar>()
        try links.link(lower: lower, upper: upper, estimator: estimator)
        tridiagonal = links
        estimator.excludedLayers = (0..<estimator.layerCount).map { links.isLinked($0) }
    }

    /// The links, as (lower, upper) pairs ascending.
    public var layerLinks: [(lower: Int, upper: Int)] {
        tridiagonal?.links.map { ($0.lower, $0.upper) } ?? []
    }

    /// Whether layer `l` belongs to a link.
    public func isLinked(layer l: Int) -> Bool { tridiagonal?.isLinked(l) ?? false }

    /// Copies the running cross factors of the link from `lower` to `lower + 1`: A_{l,l+1}
    /// ((i_l + 1) × (i_{l+1} + 1) with biases) and G_{l,l+1} (o_l × o_{l+1}), row-major.
    public func copyCrossFactors(lower: Int, a: UnsafeMutablePointer<Scalar>?, g: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        _ = try layer(lower)
        guard let link = tridiagonal?.link(lowerOf: lower) else {
            throw KFACError(.invalidArgument, "layer \(lower) has no link to layer \(lower + 1)")
        }
        guard link.inputs.hasRunning && link.gradients.hasRunning else {
            throw KFACError(.noStatistics, "the link \(lower)–\(lower + 1) has no cross factors yet")
        }
        if let a { a.update(from: link.inputs.running.base, count: link.inputs.count) }
        if let g { g.update(from: link.gradients.running.base, count: link.gradients.count) }
    }

    /// The running cross factors of the link from `lower` as row-major arrays.
    public func crossFactors(lower: Int) throws(KFACError) -> (a: [Scalar], g: [Scalar]) {
        _ = try layer(lower)
        guard let link = tridiagonal?.link(lowerOf: lower) else {
            throw KFACError(.invalidArgument, "layer \(lower) has no link to layer \(lower + 1)")
        }
        var a = [Scalar](repeating: 0, count: link.inputs.count), g = [Scalar](repeating: 0, count: link.gradients.count)
        try a.withUnsafeMutableBufferPointer { (pa) throws(KFACError) in
            try g.withUnsafeMutableBufferPointer { (pg) throws(KFACError) in
                try copyCrossFactors(lower: lower, a: pa.baseAddress, g: pg.baseAddress)
            }
        }
        return (a, g)
    }

    // MARK: Hooks

    /// `updateInverses` with links: the tridiagonal inverse is staged first, the block-diagonal
    /// layers inverted and committed, then the tridiagonal one committed (a failure changes
    /// nothing).
    func updateInverses(_ links: TridiagonalLinks<Scalar>) throws(KFACError) {
        guard parameters.inverseStrategy != .ekfac else {
            throw KFACError(.unsupported, "the EKFAC strategy is not supported with block-tridiagonal links")
        }
        let settings = parameters.curvatureSettings
        let linkedReady = links.hasFactors(estimator: estimator)
        let othersReady = estimator.blocks.indices.contains { !estimator.isExcluded(estimator.blockLayer[$0]) && estimator.blocks[$0].hasFactors }
        guard linkedReady || othersReady else { throw KFACError(.noStatistics, "no layer has factors yet") }
        if linkedReady { try links.stageInverses(estimator: estimator, foldingPending: false, settings: settings) }
        try estimator.invert(settings)
        if linkedReady { links.commit() }
    }

    /// Whether this step inverts the linked layers; throws when it cannot run with links.
    func planTridiagonalStep(folding: Bool, inverting: Bool) throws(KFACError) -> Bool {
        guard let links = tridiagonal else { return false }
        let p = parameters
        guard p.inverseStrategy != .ekfac else {
            throw KFACError(.unsupported, "the EKFAC strategy is not supported with block-tridiagonal links")
        }
        guard p.factorDampingPeriod == 0 else {
            throw KFACError(.unsupported, "re-choosing γ (KFAC_PARAM_FACTOR_DAMPING_PERIOD) is not supported with block-tridiagonal links")
        }
        for k in links.links.indices {
            let link = links.links[k]
            if link.inputs.hasRunning, link.gradients.hasRunning { continue }
            if folding, link.inputs.pairedRows > 0, link.gradients.pairedRows > 0 { continue }
            throw KFACError(.noStatistics, "the link \(link.lower)–\(link.upper) has no cross statistics; record both layers before the step")
        }
        let invert = p.inverseUpdatePeriod > 0 && (inverting || !links.hasInverses)
        guard invert || links.hasInverses else {
            throw KFACError(.noInverses, "the linked layers have no inverses and the inverse update period is 0; call update_inverses")
        }
        return invert
    }

    /// The linked layers' directions (blocks already gathered) and their Σ |⟨U, V⟩|.
    func preconditionLinked(_ links: TridiagonalLinks<Scalar>, staged: Bool) throws(KFACError) -> Double {
        try links.precondition(estimator: estimator, staged: staged)
        var inner = 0.0
        for i in 0..<links.linkedLayers.count {
            let l = links.linkedLayers[i]
            let c = estimator.blocks[estimator.layerBlocks[l].lowerBound]
            inner += Double(Scalar.dot(count: c.direction.count, x: c.direction.base, y: c.gradient.base)).magnitude
        }
        return inner
    }

    func commitTridiagonalStep(_ links: TridiagonalLinks<Scalar>, folding: Bool, inverted: Bool) {
        if folding { links.fold(decay: parameters.factorDecay) }
        if inverted { links.commit() }
    }

    /// The damped curvature at `power` on every layer's buffers (checked by the caller): the
    /// block-diagonal estimator's product, or with links `multiplyLinked` (used by CG's K-FAC
    /// preconditioner too).
    func multiplyCurvature(_ vectors: (Int) -> ParameterGradient<Scalar>, power: CurvaturePower) throws(KFACError) {
        guard let links = tridiagonal else {
            return try estimator.multiplyAll(vectors, power: power, parameters.curvatureSettings)
        }
        try multiplyLinked(links, power: power, vectors)
    }

    /// The all-layer product with links: the linked layers by the chain recursions (both powers
    /// need the current tridiagonal inverse), the others by the block-diagonal estimator; no
    /// buffer is written unless every product succeeded.
    func multiplyLinked(_ links: TridiagonalLinks<Scalar>, power: CurvaturePower,
                        _ vectors: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        for i in 0..<links.linkedLayers.count where !estimator.blocks[estimator.layerBlocks[links.linkedLayers[i]].lowerBound].hasFactors {
            let l = links.linkedLayers[i]
            throw KFACError(.noStatistics, "layer \(l) has no factors yet")
        }
        guard links.hasInverses else { throw KFACError(.noInverses, "the linked layers have no inverses yet") }
        for i in 0..<links.linkedLayers.count { estimator.gather(layer: links.linkedLayers[i], vectors(links.linkedLayers[i])) }
        switch power {
        case .inverse: try links.precondition(estimator: estimator, staged: false)
        case .one: try links.multiplyForward(estimator: estimator)
        }
        try estimator.multiplyAll(vectors, power: power, parameters.curvatureSettings)
        for i in 0..<links.linkedLayers.count {
            estimator.scatter(layer: links.linkedLayers[i], scale: 1, into: vectors(links.linkedLayers[i]))
        }
    }
}
