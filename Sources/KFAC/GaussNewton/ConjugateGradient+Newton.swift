/// Newton-CG with Levenberg–Marquardt (Martens 2010; simpleNN): ρ of the step the caller took
/// against the CG model without λ, and the library's Levenberg–Marquardt rule on λ; and the
/// convenience solve that takes a product function (for Swift callers and the C wrapper).
extension KFACOptimizer {
    /// Reports the mean loss before and after applying `stepScale` · s, s the solution of the last
    /// finished solve (`stepScale` < 1 after a backtracking line search). The model is
    ///     m(α) = α gᵀs + ½ α² sᵀ(G + ηI)s      (no λ, as Martens 2010 and simpleNN define ρ)
    /// and ρ = (after − before) / m(α) (NaN if m(α) is not negative). Every `lmInterval` reports
    /// (counted apart from the adaptive mode's) λ = `damping` is adjusted by the library's rule:
    /// λ·ω if ρ > 3/4, λ/ω if ρ < 1/4, ω = lmDecay^lmInterval — lmDecay = 2/3 and lmInterval = 1
    /// are simpleNN's 2/3 and 3/2. One report per finished solve. `after` may be +Inf.
    @discardableResult
    public func reportNewtonLossChange(stepScale: Double, before: Double, after: Double) throws(KFACError) -> Double {
        let cg = conjugateGradient
        guard let model = cg.pendingModel else {
            throw KFACError(.noSolve, "report the loss change after a finished solve (once per solve)")
        }
        guard stepScale.isFinite && stepScale > 0 else {
            throw KFACError(.invalidArgument, "step_scale must be finite and > 0, got \(stepScale)")
        }
        guard before.isFinite, !after.isNaN, after != -.infinity else {
            throw KFACError(.nonFinite, "the loss before must be finite and the loss after finite or +Inf, got \(before) and \(after)")
        }
        let predicted = Self.newtonModel(stepScale: stepScale, gradDotStep: model.gs, stepCurvature: model.sGs)
        let rho = predicted < 0 ? (after - before) / predicted : .nan
        cg.pendingModel = nil
        cg.lastReductionRatio = rho
        cg.lossReports += 1
        applyLevenbergMarquardt(rho: rho, reports: cg.lossReports)
        return rho
    }

    /// m(α) = α gᵀs + ½ α² sᵀ(G + ηI)s.
    public static func newtonModel(stepScale a: Double, gradDotStep gs: Double, stepCurvature sGs: Double) -> Double {
        a * gs + 0.5 * a * a * sGs
    }

    /// ρ of the last `reportNewtonLossChange`, NaN before the first.
    public var lastNewtonReductionRatio: Double { conjugateGradient.lastReductionRatio }
    public var hasReportedNewtonLossChange: Bool { conjugateGradient.lossReports > 0 }

    /// A whole solve with a product function: begin, then `product(vector, out)` (write G ·
    /// vector into out; both in the step's layer layout, views into the solver's own buffers) for
    /// every request, then finish into `step`. An error thrown by `product` ends nothing: the
    /// solve stays open at its last iterate (finish it, or begin another) and the error is
    /// rethrown.
    public func solveConjugateGradient(_ options: CGOptions, gradient: (Int) -> ParameterGradient<Scalar>,
                                       diagonal: ((Int) -> ParameterGradient<Scalar>)? = nil,
                                       product: (_ vector: (Int) -> ParameterGradient<Scalar>,
                                                 _ out: (Int) -> ParameterGradient<Scalar>) throws(KFACError) -> Void,
                                       step: (Int) -> ParameterGradient<Scalar>) throws(KFACError) -> CGResult {
        try checkLayerBuffers(step, what: "step")
        var request = try beginConjugateGradient(options, gradient: gradient, diagonal: diagonal)
        let cg = conjugateGradient
        let out = try ConjugateGradientState<Scalar>.sized(cg.productScratch, cg.size)
        cg.productScratch = out
        let layout = cg.layout
        func view(_ base: UnsafeMutablePointer<Scalar>) -> (Int) -> ParameterGradient<Scalar> {
            { l in
                let s = layout[l]
                return ParameterGradient(weight: base + s.offset, bias: s.biases > 0 ? base + s.offset + s.weights : nil)
            }
        }
        while request == .needProduct {
            let source = cg.phase == .initialProduct ? cg.x! : cg.p!
            try product(view(source.base), view(out.base))
            request = try supplyConjugateGradientProduct(view(out.base))
        }
        return try finishConjugateGradient(into: step)
    }
}

/// Array forms for Swift callers holding their vectors in arrays (they copy; the pointer forms
/// are the allocation-free path).
extension KFACOptimizer {
    private func withArrays<R>(_ arrays: [LayerGradient<Scalar>], _ what: String,
                               _ body: (@escaping (Int) -> ParameterGradient<Scalar>) throws(KFACError) -> R) throws(KFACError) -> R {
        guard arrays.count == estimator.layerCount else {
            throw KFACError(.invalidSize, "\(arrays.count) \(what) layers for \(estimator.layerCount) layers")
        }
        for (l, b) in estimator.layers.enumerated() {
            guard arrays[l].weight.count == b.weightCount, (arrays[l].bias?.count ?? b.layer.outFeatures) == b.layer.outFeatures else {
                throw KFACError(.invalidSize, "the \(what) of layer \(l) has the wrong size")
            }
        }
        let weights = arrays.map { a -> UnsafeMutablePointer<Scalar> in
            let p = UnsafeMutablePointer<Scalar>.allocate(capacity: Swift.max(a.weight.count, 1))
            p.initialize(from: a.weight, count: a.weight.count)
            return p
        }
        let biases = arrays.map { a -> UnsafeMutablePointer<Scalar>? in
            guard let b = a.bias else { return nil }
            let p = UnsafeMutablePointer<Scalar>.allocate(capacity: Swift.max(b.count, 1))
            p.initialize(from: b, count: b.count)
            return p
        }
        defer { weights.forEach { $0.deallocate() }; biases.forEach { $0?.deallocate() } }
        return try body { l in ParameterGradient(weight: weights[l], bias: biases[l]) }
    }

    /// Zero-filled arrays in the layers' shapes.
    public func zeroLayerArrays() -> [LayerGradient<Scalar>] {
        estimator.layers.map { b in
            LayerGradient(weight: Array(repeating: 0, count: b.weightCount),
                          bias: b.layer.hasBias ? Array(repeating: 0, count: b.layer.outFeatures) : nil)
        }
    }

    private func readArrays(_ body: ((Int) -> ParameterGradient<Scalar>) throws(KFACError) -> Void) throws(KFACError) -> [LayerGradient<Scalar>] {
        var out = zeroLayerArrays()
        try withArrays(out, "output") { (v) throws(KFACError) in
            try body(v)
            for l in out.indices {
                out[l].weight = Array(UnsafeBufferPointer(start: v(l).weight, count: out[l].weight.count))
                if let b = v(l).bias { out[l].bias = Array(UnsafeBufferPointer(start: b, count: out[l].bias!.count)) }
            }
        }
        return out
    }

    @discardableResult
    public func beginConjugateGradient(_ options: CGOptions, gradient: [LayerGradient<Scalar>],
                                       diagonal: [LayerGradient<Scalar>]? = nil) throws(KFACError) -> CGRequest {
        try withArrays(gradient, "gradient") { (g) throws(KFACError) in
            if let diagonal {
                return try withArrays(diagonal, "diagonal") { (d) throws(KFACError) in
                    try beginConjugateGradient(options, gradient: g, diagonal: d)
                }
            }
            return try beginConjugateGradient(options, gradient: g)
        }
    }

    public func conjugateGradientVector() throws(KFACError) -> [LayerGradient<Scalar>] {
        try readArrays { (v) throws(KFACError) in try conjugateGradientVector(into: v) }
    }

    @discardableResult
    public func supplyConjugateGradientProduct(_ product: [LayerGradient<Scalar>]) throws(KFACError) -> CGRequest {
        try withArrays(product, "product") { (v) throws(KFACError) in try supplyConjugateGradientProduct(v) }
    }

    public func finishConjugateGradient() throws(KFACError) -> (step: [LayerGradient<Scalar>], result: CGResult) {
        var result = CGResult()
        let step = try readArrays { (v) throws(KFACError) in result = try finishConjugateGradient(into: v) }
        return (step, result)
    }
}
