/// K-FAC's adaptive mode (Martens & Grosse 2015, §6–7): the step size α and momentum μ chosen
/// by minimising the quadratic model of the loss, and the Levenberg–Marquardt adjustment of λ
/// from the reduction ratio ρ.
///
/// With D the directions the last `step` wrote (KL-clipped, if clipping is on), δ₀ the previous
/// update and F the exact Fisher of the mean loss (from the caller's output-space products J·D,
/// J·δ₀), the update is δ = −α D + μ δ₀ where (α, μ) minimise
///     M(δ) = ½ δᵀ (F + λ I) δ + ∇hᵀ δ,
/// a 2×2 linear system (α alone when there is no previous update). ρ = (h(θ + δ) − h(θ)) / M(δ).
extension KFACOptimizer {
    /// At a successful step's commit: keeps its directions and the inner products the quadratic
    /// model needs (a failed step or a standalone `precondition` later cannot change them).
    func keepStepForModel() {
        var vu = 0.0, uu = 0.0, vp = 0.0, up = 0.0, pp = 0.0
        for k in curvatures.indices {
            let c = curvatures[k], n = c.direction.count
            vu += Double(Scalar.dot(count: n, x: c.gradient.base, y: c.direction.base))
            uu += Double(Scalar.dot(count: n, x: c.direction.base, y: c.direction.base))
            if hasPreviousUpdate, let p = c.previousUpdate {
                vp += Double(Scalar.dot(count: n, x: c.gradient.base, y: p.base))
                up += Double(Scalar.dot(count: n, x: c.direction.base, y: p.base))
                pp += Double(Scalar.dot(count: n, x: p.base, y: p.base))
            }
            c.stepDirection?.copyContents(from: c.direction)
        }
        stepProducts = (vu, uu, vp, up, pp)
    }

    /// The quadratic model's ingredients for the directions D = ν U the last step wrote.
    private func modelInnerProducts() -> (vd: Double, dd: Double, vp: Double, dp: Double, pp: Double) {
        let nu = lastKLScale.isFinite ? lastKLScale : 1
        let s = stepProducts
        return (nu * s.vu, nu * nu * s.uu, s.vp, nu * s.up, s.pp)
    }

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
    /// mean loss over the batch (the Fisher here is the mean over the rows).
    public func solveStepSize(outputs: UnsafePointer<Scalar>?, directionProducts: UnsafePointer<Scalar>?,
                              previousProducts: UnsafePointer<Scalar>?, rows: Int, dim: Int,
                              distribution: OutputDistribution) throws(KFACError) -> (alpha: Double, mu: Double, predictedChange: Double) {
        guard directionsAvailable else {
            throw KFACError(.noStep, "solve the step size after a successful step (and only once per step)")
        }
        guard let outputs, let directionProducts else { throw KFACError(.nullPointer, "outputs or direction products are NULL") }
        guard rows >= 1, dim >= 1 else { throw KFACError(.invalidSize, "rows and dim must be >= 1, got \(rows) and \(dim)") }
        let (count, overflow) = rows.multipliedReportingOverflow(by: dim)
        guard !overflow else { throw KFACError(.sizeOverflow, "rows × dim overflows") }
        let usePrevious = previousProducts != nil && hasPreviousUpdate
        guard Scalar.allFinite(outputs, count: count), Scalar.allFinite(directionProducts, count: count),
              previousProducts.map({ Scalar.allFinite($0, count: count) }) ?? true else {
            throw KFACError(.nonFinite, "outputs or Jacobian products contain NaN or Inf")
        }
        let forms = OutputFisher.quadraticForms(distribution: distribution, outputs: outputs, rows: rows, dim: dim,
                                                u: directionProducts, v: usePrevious ? previousProducts : nil)
        let (vd, dd, vp, dp, pp) = modelInnerProducts()
        let lambda = parameters.damping, n = Double(rows)
        // Coefficients of Δ = −D and δ₀.
        let a11 = forms.uu / n + lambda * dd
        let b1 = -vd
        var alpha: Double, mu = 0.0
        if usePrevious {
            let a12 = -forms.uv / n - lambda * dp
            let a22 = forms.vv / n + lambda * pp
            let b2 = vp
            let det = a11 * a22 - a12 * a12
            if det > 1e-12 * a11 * a22 && det.isFinite {
                alpha = -(a22 * b1 - a12 * b2) / det
                mu = -(a11 * b2 - a12 * b1) / det
            } else {
                alpha = -b1 / a11  // δ₀ parallel to D: α alone
            }
        } else {
            alpha = -b1 / a11
        }
        guard a11 > 0, alpha.isFinite, mu.isFinite else {
            throw KFACError(.nonFinite, "the quadratic model is degenerate (Dᵀ(F + λI)D = \(a11)); increase the damping")
        }
        let predicted = 0.5 * (b1 * alpha + (usePrevious ? vp * mu : 0))
        // δ = −α D + μ δ₀ = −α ν U + μ δ₀ becomes the next δ₀.
        let nu = lastKLScale.isFinite ? lastKLScale : 1
        for k in curvatures.indices where curvatures[k].previousUpdate == nil {
            let c = curvatures[k]
            c.previousUpdate = try Matrix(rows: c.direction.rows, columns: c.direction.columns)
        }
        for k in curvatures.indices {
            let c = curvatures[k], p = c.previousUpdate!
            Scalar.scal(count: p.count, alpha: Scalar(hasPreviousUpdate ? mu : 0), x: p.base)
            Scalar.axpy(count: p.count, alpha: Scalar(-alpha * nu), x: c.stepDirection!.base, y: p.base)
        }
        hasPreviousUpdate = true
        directionsAvailable = false
        predictedChange = predicted
        return (alpha, mu, predicted)
    }

    /// Reports the mean loss before and after the update of the last `solveStepSize`: returns
    /// ρ = (after − before) / M(δ) and, every `lmInterval` reports, adjusts λ (ρ > 3/4: λ·ω;
    /// ρ < 1/4: λ/ω; ω = lmDecay^lmInterval).
    @discardableResult
    public func reportLossChange(before: Double, after: Double) throws(KFACError) -> Double {
        guard let predicted = predictedChange else {
            throw KFACError(.noStep, "report the loss change after solveStepSize (once per solve)")
        }
        // A divergent step may report +Inf after: ρ = −Inf, and λ grows.
        guard before.isFinite, !after.isNaN, after != -.infinity else {
            throw KFACError(.nonFinite, "the loss before must be finite and the loss after finite or +Inf, got \(before) and \(after)")
        }
        let rho = predicted < 0 ? (after - before) / predicted : .nan
        predictedChange = nil
        lastReductionRatio = rho
        lossReports += 1
        let t = parameters.lmInterval
        if t > 0 && lossReports % t == 0 && !rho.isNaN {
            let omega = Foundationless.exp(Double(t) * Foundationless.log(parameters.lmDecay))
            var p = parameters
            if rho > 0.75 { p.damping *= omega } else if rho < 0.25 { p.damping /= omega }
            if p.damping > 0 && p.damping.isFinite { parameters = p }
        }
        return rho
    }
}
