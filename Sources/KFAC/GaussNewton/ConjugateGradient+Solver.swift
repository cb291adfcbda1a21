/// The reverse-communication CG driver on the optimizer: begin / vector / supply a product /
/// finish. Every call validates everything, computes into scratch buffers, and commits only when
/// nothing can fail any more: a failed call leaves the solve (and the handle) as it was.
extension KFACOptimizer {
    /// Whether a solve is open (begun and not finished).
    public var conjugateGradientIsOpen: Bool { conjugateGradient.phase != .idle }

    /// Starts a solve of (G + (λ + η) I) s = −g, λ = `parameters.damping`, η = `options.l2`;
    /// `gradient(l)` gives layer l's gradient g (the step's layout), `diagonal(l)` the d of the
    /// diagonal preconditioner (required exactly for `.diagonal`, values ≥ 0). Replaces an open
    /// solve. Returns `.needProduct` (read `conjugateGradientVector`, supply G times it) or
    /// `.done` (g = 0, or a warm start already good enough... the latter only after its product).
    @discardableResult
    public func beginConjugateGradient(_ options: CGOptions, gradient: (Int) -> ParameterGradient<Scalar>,
                                       diagonal: ((Int) -> ParameterGradient<Scalar>)? = nil) throws(KFACError) -> CGRequest {
        if let diagonal { return try beginConjugateGradient(options, gradient: gradient, hasDiagonal: true, diagonal: diagonal) }
        return try beginConjugateGradient(options, gradient: gradient, hasDiagonal: false, diagonal: gradient)
    }

    /// `beginConjugateGradient` with the diagonal as a non-escaping closure (no allocation);
    /// `diagonal` is read only when `hasDiagonal`.
    @discardableResult
    public func beginConjugateGradient(_ options: CGOptions, gradient: (Int) -> ParameterGradient<Scalar>, hasDiagonal: Bool,
                                       diagonal d: (Int) -> ParameterGradient<Scalar>) throws(KFACError) -> CGRequest {
        let cg = conjugateGradient
        try options.validate()
        let layers = estimator.layers
        guard !layers.isEmpty else { throw KFACError(.invalidSize, "no layers are registered") }
        for l in layers.indices {
            let v = gradient(l)
            try checkBias(v.bias, layer: layers[l], index: l, what: "gradient")
            guard Scalar.allFinite(v.weight, count: layers[l].weightCount),
                  v.bias.map({ Scalar.allFinite($0, count: layers[l].layer.outFeatures) }) ?? true else {
                throw KFACError(.nonFinite, "the gradient of layer \(l) contains NaN or Inf")
            }
        }
        switch (options.preconditioner, hasDiagonal) {
        case (.diagonal, false):
            throw KFACError(.nullPointer, "the diagonal preconditioner needs the diagonal buffers")
        case (.diagonal, true):
            for l in layers.indices {
                let v = d(l)
                try checkBias(v.bias, layer: layers[l], index: l, what: "diagonal")
                guard Scalar.allFinite(v.weight, count: layers[l].weightCount),
                      v.bias.map({ Scalar.allFinite($0, count: layers[l].layer.outFeatures) }) ?? true else {
                    throw KFACError(.nonFinite, "the diagonal of layer \(l) contains NaN or Inf")
                }
                guard Self.allNonNegative(v.weight, count: layers[l].weightCount),
                      v.bias.map({ Self.allNonNegative($0, count: layers[l].layer.outFeatures) }) ?? true else {
                    throw KFACError(.invalidArgument, "the diagonal of layer \(l) has a negative value")
                }
            }
        case (_, true):
            throw KFACError(.invalidArgument, "diagonal buffers are given but the preconditioner is not the diagonal one")
        case (.kfac, false):
            for l in layers.indices where !isLinked(layer: l) {
                try estimator.checkReady(layer: l, for: .inverse, strategy: parameters.inverseStrategy)
            }
            if let links = tridiagonal, !links.hasInverses {  // block-tridiagonal links (Tridiagonal/)
                throw KFACError(.noInverses, "the linked layers have no inverses yet")
            }
        case (.none, false):
            break
        }

        // Layout and storage (allocation happens here, before anything is written).
        var layout: [(offset: Int, weights: Int, biases: Int)] = []
        layout.reserveCapacity(layers.count)
        var size = 0
        for b in layers {
            let biases = b.layer.hasBias ? b.layer.outFeatures : 0
            layout.append((size, b.weightCount, biases))
            size += b.weightCount + biases
        }
        typealias State = ConjugateGradientState<Scalar>
        let newX = try State.sized(cg.x, size), newP = try State.sized(cg.p, size)
        let q = try State.sized(cg.q, size), rNext = try State.sized(cg.rNext, size), yNext = try State.sized(cg.yNext, size)
        let newPrevious = try State.sized(cg.previous, size)
        let minvNext = options.preconditioner == .diagonal ? try State.sized(cg.minvNext, size) : cg.minvNext
        // The committed g, r, y (and M⁻¹) are swapped with scratch of the right size at commit.
        let newG = try State.sized(cg.g, size), newR = try State.sized(cg.r, size), newY = try State.sized(cg.y, size)
        let newMinv = options.preconditioner == .diagonal ? try State.sized(cg.minv, size) : cg.minv

        // Scratch: q ← g, rNext ← −g, minvNext ← (d + λ + η)^(−α), yNext ← M⁻¹ rNext.
        let lambda = parameters.damping
        let shift = lambda + options.l2
        Self.gather(gradient, layout, into: q.base)
        let n = size
        typealias K = ConjugateGradientKernels<Scalar>
        K.scaled(rNext.base, q.base, by: -1, count: n)
        if options.preconditioner == .diagonal, hasDiagonal, let m = minvNext {
            Self.gather(d, layout, into: m.base)
            K.diagonalInverse(m.base, shift: shift, exponent: options.diagonalExponent, count: n)
        }
        let gradientNorm = K.dot(q.base, q.base, count: n).squareRoot()
        let warm = options.warmStart && cg.hasPrevious && cg.previous === newPrevious
        let stopsAtStart = !warm && gradientNorm == 0
        let needsPreconditioned = !warm && !stopsAtStart
        if needsPreconditioned {
            try applyPreconditioner(options.preconditioner, layout, from: rNext, into: yNext, minv: minvNext)
        }

        // Commit: nothing below can fail.
        cg.options = options
        cg.layout = layout
        cg.size = size
        cg.lambda = lambda
        cg.gradientNorm = gradientNorm
        cg.iterations = 0
        cg.products = 0
        cg.reason = .running
        cg.phi.removeAll(keepingCapacity: true)
        cg.phi.reserveCapacity(options.maxIterations + 1)
        if !(cg.previous === newPrevious) { cg.hasPrevious = false }
        cg.previous = newPrevious
        cg.x = newX
        cg.p = newP
        cg.g = q; cg.q = newG
        if options.preconditioner == .diagonal { cg.minv = minvNext; cg.minvNext = newMinv }
        if warm {
            // x₀ = decay · previous; its product comes first.
            K.scaled(newX.base, newPrevious.base, by: options.warmStartDecay, count: n)
            cg.r = newR; cg.rNext = rNext
            cg.y = newY; cg.yNext = yNext
            cg.phase = .initialProduct
            return .needProduct
        }
        K.zero(newX.base, count: n)
        cg.r = rNext; cg.rNext = newR
        cg.phi.append(0)
        cg.residualNorm = gradientNorm
        if stopsAtStart {
            cg.y = newY; cg.yNext = yNext
            cg.ry = 0
            cg.reason = .residual
            cg.phase = .stopped
            return .done
        }
        cg.y = yNext; cg.yNext = newY
        newP.base.update(from: yNext.base, count: n)
        cg.ry = K.dot(rNext.base, yNext.base, count: n)
        cg.phase = .iterating
        return .needProduct
    }

    /// Writes the vector the open solve asks G to multiply (x₀ for a warm start's first product,
    /// else the search direction p) into the caller's layer buffers. Changes nothing.
    public func conjugateGradientVector(into vectors: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        let cg = conjugateGradient
        try checkOpen(forProduct: true)
        try checkLayerBuffers(vectors, what: "vector")
        let source = cg.phase == .initialProduct ? cg.x! : cg.p!
        Self.scatter(source.base, cg.layout, into: vectors)
    }

    /// Supplies G times the vector of `conjugateGradientVector` (the caller's G, without λ and
    /// η) and advances the solve. A product with NaN or Inf is refused (`.nonFinite`) and may be
    /// supplied again. Returns `.needProduct` or `.done`.
    @discardableResult
    public func supplyConjugateGradientProduct(_ product: (Int) -> ParameterGradient<Scalar>) throws(KFACError) -> CGRequest {
        let cg = conjugateGradient
        try checkOpen(forProduct: true)
        try checkLayerBuffers(product, what: "product")
        typealias K = ConjugateGradientKernels<Scalar>
        let n = cg.size
        let q = cg.q!, rNext = cg.rNext!, yNext = cg.yNext!
        let g = cg.g!, x = cg.x!, r = cg.r!, p = cg.p!
        let initial = cg.phase == .initialProduct
        let shift = Double(Scalar(cg.lambda + cg.options.l2))
        // One pass per layer: q = G·v (+ (λ + η) p when iterating), pᵀq, and the product's
        // finiteness (q is scratch: a refused product changes nothing).
        var pAp = 0.0
        let interleaved = cg.options.stopRule == .residual
        for l in cg.layout.indices {
            let v = product(l), s = cg.layout[l]
            let w = K.productSegment(q.base + s.offset, v.weight, p.base + s.offset, shift: initial ? 0 : shift,
                                     count: s.weights, sum: pAp,
                                     interleaved: interleaved)
            var finite = w.finite
            pAp = w.pq
            if s.biases > 0, let bias = v.bias {
                let o = s.offset + s.weights
                let b = K.productSegment(q.base + o, bias, p.base + o, shift: initial ? 0 : shift, count: s.biases, sum: pAp,
                                         interleaved: interleaved)
                finite = finite && b.finite
                pAp = b.pq
            }
            guard finite else {
                throw KFACError(.nonFinite, "the product of layer \(l) contains NaN or Inf; the solve is unchanged, supply it again")
            }
        }

        if initial {
            // r₀ = −g − (G + λ + η) x₀.
            K.residual(rNext.base, g: g.base, q: q.base, x: x.base, shift: shift, count: n)
            let residualNorm = K.dot(rNext.base, rNext.base, count: n).squareRoot()
            let phi0 = 0.5 * K.dot(g.base, x.base, count: n) - 0.5 * K.dot(x.base, rNext.base, count: n)
            let reason = stopReason(iteration: 0, phi: phi0, residualNorm: residualNorm)
            var ry = 0.0
            if reason == .running {
                try applyPreconditioner(cg.options.preconditioner, cg.layout, from: rNext, into: yNext, minv: cg.minv)
                ry = K.dot(rNext.base, yNext.base, count: n)
            }
            // Commit.
            swap(&cg.r, &cg.rNext)
            cg.products += 1
            cg.phi.append(phi0)
            cg.residualNorm = residualNorm
            if reason != .running {
                cg.reason = reason
                cg.phase = .stopped
                return .done
            }
            swap(&cg.y, &cg.yNext)
            p.base.update(from: cg.y!.base, count: n)
            cg.ry = ry
            cg.phase = .iterating
            return .needProduct
        }

        guard pAp > 0 && pAp.isFinite else {
            cg.products += 1
            cg.reason = .nonPositiveCurvature
            cg.phase = .stopped
            return .done
        }
        let alpha = cg.ry / pAp
        guard alpha.isFinite else {
            throw KFACError(.nonFinite, "the CG step length is not finite (rᵀy = \(cg.ry), pᵀAp = \(pAp)); the solve is unchanged")
        }
        let kind = cg.options.preconditioner
        let residualNorm: Double, phi: Double
        var ryNext = 0.0
        if cg.options.stopRule == .residual {
            // r_new = r − α q and ‖r_new‖ (and the diagonal's y = M⁻¹ r_new, r_newᵀy) in one pass;
            // φ is not computed (the rule does not read it; the result's values come from x).
            let e = K.residualNormPass(rNext.base, r: r.base, q: q.base, alpha: alpha, diagonal: kind == .diagonal ? cg.minv!.base : nil,
                                       into: yNext.base, count: n)
            (residualNorm, phi) = (e.rr.squareRoot(), .nan)
            ryNext = kind == .none ? e.rr : e.ry
        } else {
            // r_new = r − α q, with φ(x + αp) = ½ gᵀ(x + αp) − ½ (x + αp)ᵀ r_new and ‖r_new‖ in the same pass.
            let d = K.residualPass(rNext.base, r: r.base, q: q.base, g: g.base, x: x.base, p: p.base, alpha: alpha, count: n)
            phi = 0.5 * (d.gx + alpha * d.gp) - 0.5 * (d.xr + alpha * d.pr)
            residualNorm = d.rr.squareRoot()
            switch kind {
            case .none: ryNext = d.rr  // y = r: no copy
            case .diagonal: ryNext = K.diagonalPass(yNext.base, cg.minv!.base, rNext.base, count: n)
            case .kfac: break
            }
        }
        let iteration = cg.iterations + 1
        let reason = stopReason(iteration: iteration, phi: phi, residualNorm: residualNorm)
        if reason == .running && kind == .kfac {
            try applyPreconditioner(kind, cg.layout, from: rNext, into: yNext, minv: cg.minv)
            ryNext = K.dot(rNext.base, yNext.base, count: n)
        }
        // Commit.
        swap(&cg.r, &cg.rNext)
        cg.iterations = iteration
        cg.products += 1
        cg.phi.append(phi)
        cg.residualNorm = residualNorm
        if reason != .running {
            K.axpy(x.base, p.base, alpha: alpha, count: n)
            cg.reason = reason
            cg.phase = .stopped
            return .done
        }
        if kind != .none { swap(&cg.y, &cg.yNext) }
        // x += α p; p = y + β p.
        K.updatePass(x: x.base, p: p.base, y: (kind == .none ? cg.r! : cg.y!).base, alpha: alpha, beta: ryNext / cg.ry,
                     count: n)
        cg.ry = ryNext
        return .needProduct
    }

    /// Ends the open solve: writes its solution s into the caller's layer buffers, keeps s for
    /// the next warm start and the model for `reportNewtonLossChange`, and returns the result. A
    /// solve that has not stopped is ended with reason `.caller`.
    public func finishConjugateGradient(into step: (Int) -> ParameterGradient<Scalar>) throws(KFACError) -> CGResult {
        let cg = conjugateGradient
        try checkOpen(forProduct: false)
        try checkLayerBuffers(step, what: "step")
        let result = conjugateGradientResult()
        // Commit.
        Self.scatter(cg.x!.base, cg.layout, into: step)
        cg.previous!.base.update(from: cg.x!.base, count: cg.size)
        cg.hasPrevious = true
        cg.pendingModel = (result.gradDotStep, result.stepCurvature)
        cg.phase = .idle
        return result
    }

    /// The result the open solve would give if finished now.
    func conjugateGradientResult() -> CGResult {
        let cg = conjugateGradient
        let n = cg.size, x = cg.x!.base, g = cg.g!.base, r = cg.r!.base
        var result = CGResult()
        result.iterations = cg.iterations
        result.products = cg.products
        result.reason = cg.phase == .stopped ? cg.reason : .caller
        typealias K = ConjugateGradientKernels<Scalar>
        let gs = K.dot(g, x, count: n), ss = K.dot(x, x, count: n), xr = K.dot(x, r, count: n)
        result.gradDotStep = gs
        result.dampingTerm = cg.lambda * ss
        result.stepCurvature = -gs - xr - cg.lambda * ss
        result.modelValue = gs + 0.5 * result.stepCurvature
        result.quadraticValue = result.modelValue + 0.5 * result.dampingTerm
        result.residualNorm = cg.residualNorm
        result.gradientNorm = cg.gradientNorm
        result.damping = cg.lambda
        return result
    }

    /// The stop reason at iteration `i` with φ_i and ‖r_i‖ (`.running` to go on); φ_0…φ_{i−1}
    /// are in `phi`.
    private func stopReason(iteration i: Int, phi: Double, residualNorm: Double) -> CGStopReason {
        let cg = conjugateGradient, o = cg.options
        if residualNorm == 0 { return .residual }
        switch o.stopRule {
        case .residual:
            if residualNorm <= o.effectiveTolerance * cg.gradientNorm { return .residual }
        case .relativeProgress:
            let k = Swift.max(10, i / 10)
            if i > k && phi < 0 && (phi - cg.phi[i - k]) / phi < Double(k) * o.effectiveTolerance { return .relativeProgress }
        }
        return i >= o.maxIterations ? .maxIterations : .running
    }

    private func checkOpen(forProduct: Bool) throws(KFACError) {
        let cg = conjugateGradient
        switch cg.phase {
        case .idle:
            throw KFACError(.noSolve, "no conjugate-gradient solve is open: call begin first")
        case .stopped where forProduct:
            throw KFACError(.noSolve, "the solve has stopped (\(cg.reason)); finish it")
        case .initialProduct where !forProduct:
            throw KFACError(.noSolve, "the warm start's initial product has not been supplied yet")
        default:
            break
        }
        guard cg.layout.count == estimator.layerCount else {
            throw KFACError(.invalidSize, "layers were added since the solve began; begin a new solve")
        }
    }

    func checkLayerBuffers(_ buffers: (Int) -> ParameterGradient<Scalar>, what: String) throws(KFACError) {
        for l in estimator.layers.indices { try checkBias(buffers(l).bias, layer: estimator.layers[l], index: l, what: what) }
    }

    /// y = M⁻¹ r (scratch `y`); throws only for the K-FAC preconditioner (non-finite result).
    private func applyPreconditioner(_ kind: CGPreconditioner, _ layout: [(offset: Int, weights: Int, biases: Int)],
                                     from r: AlignedBuffer<Scalar>, into y: AlignedBuffer<Scalar>,
                                     minv: AlignedBuffer<Scalar>?) throws(KFACError) {
        let n = r.count
        switch kind {
        case .none:
            y.base.update(from: r.base, count: n)
        case .diagonal:
            ConjugateGradientKernels<Scalar>.multiply(y.base, minv!.base, r.base, count: n)
        case .kfac:
            y.base.update(from: r.base, count: n)
            let base = y.base
            try multiplyCurvature({ l in
                let s = layout[l]
                return ParameterGradient(weight: base + s.offset, bias: s.biases > 0 ? base + s.offset + s.weights : nil)
            }, power: .inverse)
        }
    }

    static func gather(_ v: (Int) -> ParameterGradient<Scalar>, _ layout: [(offset: Int, weights: Int, biases: Int)],
                       into flat: UnsafeMutablePointer<Scalar>) {
        for l in layout.indices {
            let s = layout[l], b = v(l)
            (flat + s.offset).update(from: b.weight, count: s.weights)
            if s.biases > 0, let bias = b.bias { (flat + s.offset + s.weights).update(from: bias, count: s.biases) }
        }
    }

    static func scatter(_ flat: UnsafePointer<Scalar>, _ layout: [(offset: Int, weights: Int, biases: Int)],
                        into v: (Int) -> ParameterGradient<Scalar>) {
        for l in layout.indices {
            let s = layout[l], b = v(l)
            b.weight.update(from: flat + s.offset, count: s.weights)
            if s.biases > 0, let bias = b.bias { bias.update(from: flat + s.offset + s.weights, count: s.biases) }
        }
    }

    private static func allNonNegative(_ p: UnsafePointer<Scalar>, count: Int) -> Bool {
        ConjugateGradientKernels<Scalar>.nonNegative(p, count: count)
    }
}
