/// KFRA (Botev, Ritter & Barber 2017): the output factor of every layer of a dense chain from the
/// batch-averaged pre-activation curvature, propagated backwards with the kept weights and φ′:
///
///     Ḡ_{L−1} = (1/N) Σ_n B_n
///     Ḡ_{i−1} = (W_iᵀ Ḡ_i W_i) ⊙ (1/N) Σ_n φ′_{i−1,n} φ′_{i−1,n}ᵀ   [+ D̄_{i−1}]
///     D̄_{i−1} = diag((1/N) Σ_n φ″_{i−1,n} ⊙ ∂ℓ_n/∂a_{i,n})            (Hessian variant only)
///
/// with ∂ℓ_n/∂a_i = W_iᵀ g_{i,n}, g_{L−1} the caller's output gradients and
/// g_{i−1} = φ′_{i−1} ⊙ W_iᵀ g_i. φ″ comes from φ′ and the next layer's kept inputs a_i = φ(s):
/// tanh φ″ = −2 a φ′, logistic φ″ = φ′ (1 − 2a), ReLU and identity 0.
/// Dense layers only: for a convolution the recursion needs [C·H·W]² matrices per layer.

/// Which curvature KFRA propagates (`kfac_kfra_variant`).
public enum KFRAVariant: Int32, Sendable, CaseIterable {
    /// The Gauss-Newton recursion (no D̄ term; PSD).
    case gaussNewton = 0
    /// The Hessian recursion with the D̄ term (may be indefinite; needs the output gradients).
    case hessian = 1
}

extension DenseChain {
    /// Ḡ_i for every chain position, o_i × o_i full symmetric, from the last forward pass.
    /// `outputGradients` ([rows][output_dim], ∂ℓ_n/∂z_n) is required for `.hessian`.
    func kfraFactors(variant: KFRAVariant, outputGradients: UnsafePointer<Scalar>?) throws(KFACError) -> [AlignedBuffer<Scalar>] {
        guard let z = outputs else { throw KFACError(.noColumns, "no chain forward pass: call the chain's forward first") }
        for i in geometries.indices where geometries[i] != nil {
            throw KFACError(.unsupported, "KFRA is for dense chains only: chain layer \(i) (layer \(layers[i])) is a convolution")
        }
        let n = rows, count = layers.count, dim = outputDim
        if variant == .hessian {
            for i in 0..<(count - 1) where activations[i] == .custom {
                throw KFACError(.unsupported, "the Hessian variant of KFRA needs φ″, unknown for the CUSTOM activation of chain layer \(i)")
            }
            guard let g = outputGradients else { throw KFACError(.nullPointer, "the Hessian variant of KFRA needs the output gradients") }
            guard Scalar.allFinite(g, count: n * dim) else { throw KFACError(.nonFinite, "the output gradients contain NaN or Inf") }
        }
        var factors: [AlignedBuffer<Scalar>] = []
        for i in 0..<count { factors.append(try AlignedBuffer(rows: outFeatures[i], columns: outFeatures[i])) }
        // Ḡ_{L−1} = (1/N) Σ_n Σ_k c cᵀ over the K columns of S (S Sᵀ = B).
        let columns = try AlignedBuffer<Scalar>(rows: dim * n, columns: dim)
        OutputHessian.squareRoot(distribution: distribution, outputs: z.base, rows: n, dim: dim, into: columns.base)
        let inv = 1 / Scalar(n)
        Scalar.gemm(transA: true, transB: false, m: dim, n: dim, k: dim * n, alpha: inv, a: columns.base, lda: dim,
                    b: columns.base, ldb: dim, beta: 0, c: factors[count - 1].base, ldc: dim)
        let widest = (inFeatures + outFeatures).max()!
        let t = try AlignedBuffer<Scalar>(rows: widest, columns: widest)
        let e = try AlignedBuffer<Scalar>(rows: widest, columns: widest)
        var gradient: AlignedBuffer<Scalar>?, below: AlignedBuffer<Scalar>?
        if variant == .hessian {
            gradient = try AlignedBuffer(rows: n, columns: widest)
            below = try AlignedBuffer(rows: n, columns: widest)
            gradient!.base.update(from: outputGradients!, count: n * dim)
        }
        for back in 0..<(count - 1) {
            let i = count - 1 - back, (fi, fo) = (inFeatures[i], outFeatures[i])
            let h = factors[i].base, w = weights[i].base, m = factors[i - 1].base
            // T = Ḡ_i W_i (o × in), M = W_iᵀ T (in × in).
            Scalar.gemm(transA: false, transB: false, m: fo, n: fi, k: fo, alpha: 1, a: h, lda: fo, b: w, ldb: fi,
                        beta: 0, c: t.base, ldc: fi)
            Scalar.gemm(transA: true, transB: false, m: fi, n: fi, k: fo, alpha: 1, a: w, lda: fi, b: t.base, ldb: fi,
                        beta: 0, c: m, ldc: fi)
            // E = (1/N) Σ_n φ′ φ′ᵀ, then Ḡ_{i−1} = M ⊙ E.
            let d = derivatives[i - 1].base
            Scalar.gemm(transA: true, transB: false, m: fi, n: fi, k: n, alpha: inv, a: d, lda: fi, b: d, ldb: fi,
                        beta: 0, c: e.base, ldc: fi)
            ChainKernels.multiply(m, by: e.base, count: fi * fi)
            if variant == .hessian, let g = gradient, let q = below {
                // q = ∂ℓ/∂a_i = g_i W_i; D̄ += (1/N) Σ_n φ″ ⊙ q; g_{i−1} = φ′ ⊙ q.
                Scalar.gemm(transA: false, transB: false, m: n, n: fi, k: fo, alpha: 1, a: g.base, lda: fo, b: w, ldb: fi,
                            beta: 0, c: q.base, ldc: fi)
                let a = inputs[i].base, f = activations[i - 1]
                for j in 0..<fi {
                    var sum: Double = 0
                    for r in 0..<n {
                        let p = Double(d[r * fi + j]), x = Double(a[r * fi + j])
                        let second: Double
                        switch f {
                        case .tanh: second = -2 * x * p
                        case .logistic: second = p * (1 - 2 * x)
                        case .identity, .relu, .custom: second = 0
                        }
                        sum += second * Double(q.base[r * fi + j])
                    }
                    m[j * fi + j] += Scalar(sum / Double(n))
                }
                ChainKernels.multiply(q.base, by: d, count: n * fi)
                (gradient, below) = (q, g)
            }
        }
        return factors
    }
}

extension KFACOptimizer {
    /// KFRA from the chain's last forward pass (`kfac_gn_chain_record_kfra_*`): adds Ḡ_i / s²
    /// (s = `outputGradScale`) to the pending output factor of every chain layer with weight N =
    /// the forward pass's rows (so that, alone, it folds to G = Ḡ / s²), and, with
    /// `recordInputs`, the chain's kept inputs to the layers' input factors as `recordInputs`
    /// would. `outputGradients` ([rows][output_dim], ∂ℓ_n/∂z_n of the summed loss) is needed by
    /// `.hessian` and ignored by `.gaussNewton`. Dense chains only (`.unsupported` with a
    /// convolution). All chain layers or none: on error nothing is recorded.
    public func denseChainRecordKFRA(variant: KFRAVariant, recordInputs: Bool,
                                     outputGradients: UnsafePointer<Scalar>?) throws(KFACError) {
        guard let chain = denseChain, chain.hasForward else {
            throw KFACError(.noColumns, "no chain forward pass: define the chain and run its forward first")
        }
        for l in chain.layers where isLinked(layer: l) {
            throw KFACError(.unsupported, "KFRA records no cross statistics: layer \(l) has a block-tridiagonal link")
        }
        let factors = try chain.kfraFactors(variant: variant, outputGradients: outputGradients)
        let n = chain.rows, s = parameters.outputGradScale
        let weight = Double(n) / (s * s)
        // Everything that can fail, before anything is recorded.
        var packs: [(KroneckerFactor<Scalar>, AlignedBuffer<Scalar>, AlignedBuffer<Scalar>)] = []
        for (i, l) in chain.layers.enumerated() {
            let b = estimator.layers[l], o = chain.outFeatures[i]
            let largest = Double(Scalar.largestMagnitude(factors[i].base, count: o * o))
            let f = b.blocks[0].output
            guard largest.isFinite, largest * weight * Double(f.pendingRows + n + 1) <= Double(Scalar.greatestFiniteMagnitude) / 16 else {
                throw KFACError(.nonFinite, "the KFRA factor of layer \(l) is not finite or too large")
            }
            try f.preparePendingReplacement()
            packs.append((f, try AlignedBuffer(rows: 1, columns: f.packCount), try AlignedBuffer(rows: 1, columns: f.structure.storageCount)))
            if recordInputs {
                _ = try estimator.checkedRecord(chain.inputs[i].base, layer: l, rows: n, outputSide: false, scale: 1)
                for block in b.blocks { _ = try block.input.prepareRecord(rows: n) }
            }
        }
        for (i, l) in chain.layers.enumerated() {
            let (f, pack, scratch) = packs[i], o = chain.outFeatures[i], g = factors[i].base
            let rows = f.pendingRows + n
            f.packPending(into: pack.base, scratch: scratch.base)
            // Add N Ḡ / s² to the upper triangle of each unique block (the layout of packPending).
            var w = 0
            let st = f.structure
            for q in st.uniqueSizes.indices {
                let (lo, size) = (st.uniqueOffsets[q], st.uniqueSizes[q])
                for r in 0..<size {
                    for c in r..<size {
                        // (symmetrised: Wᵀ Ḡ W is symmetric up to rounding)
                        let v = 0.5 * (Double(g[(lo + r) * o + lo + c]) + Double(g[(lo + c) * o + lo + r]))
                        pack.base[w + c - r] += Scalar(weight * v)
                    }
                    w += size - r
                }
            }
            f.replacePending(from: pack.base, rows: rows)
            if recordInputs { try estimator.recordInputs(layer: l, UnsafePointer(chain.inputs[i].base), rows: n) }
        }
        estimator.statisticsStarted = true
    }
}
