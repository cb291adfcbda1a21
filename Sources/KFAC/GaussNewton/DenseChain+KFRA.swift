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
        let scratch = try kfraScratch(rows: n, hessian: variant == .hessian)
        let factors = scratch.factors
        // Ḡ_{L−1} = (1/N) Σ_n Σ_k c cᵀ over the K columns of S (S Sᵀ = B).
        let columns = scratch.columns!
        OutputHessian.squareRoot(distribution: distribution, outputs: z.base, rows: n, dim: dim, into: columns.base)
        let inv = 1 / Scalar(n)
        Scalar.gemm(transA: true, transB: false, m: dim, n: dim, k: dim * n, alpha: inv, a: columns.base, lda: dim,
                    b: columns.base, ldb: dim, beta: 0, c: factors[count - 1].base, ldc: dim)
        let t = scratch.product, e = scratch.derivativeMoment
        var gradient: AlignedBuffer<Scalar>?, below: AlignedBuffer<Scalar>?
        if variant == .hessian {
            (gradient, below) = (scratch.gradient, scratch.below)
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

/// KFRA's working memory, kept by the chain so that a KFRA recording allocates only the first
/// time (and again only when a forward pass has more rows than any before, or the Hessian variant
/// is first used): Ḡ_i per chain position, the columns of S, the two widest × widest products,
/// the Hessian variant's two gradient blocks, and per layer the pack and scratch of the output
/// factor's pending replacement (`denseChainRecordKFRA`).
final class KFRAScratch<Scalar: KFACScalar> {
    var factors: [AlignedBuffer<Scalar>] = []
    /// S's columns, `dim · rowCapacity` × dim.
    var columns: AlignedBuffer<Scalar>?
    /// T = Ḡ_i W_i and E = mean φ′φ′ᵀ, widest × widest each.
    let product: AlignedBuffer<Scalar>, derivativeMoment: AlignedBuffer<Scalar>
    /// The Hessian variant's g_i and ∂ℓ/∂a_i, `rowCapacity` × widest each.
    var gradient: AlignedBuffer<Scalar>?, below: AlignedBuffer<Scalar>?
    var rowCapacity = 0
    /// Per chain position: the output factor's statistics pack, its storage-sized scratch, and
    /// the factor structure they were sized for.
    var packs: [(pack: AlignedBuffer<Scalar>, scratch: AlignedBuffer<Scalar>, structure: FactorStructure)] = []

    init(widest: Int) throws(KFACError) {
        product = try AlignedBuffer(rows: widest, columns: widest)
        derivativeMoment = try AlignedBuffer(rows: widest, columns: widest)
    }
}

extension DenseChain {
    /// The chain's KFRA scratch for `rows` examples, allocated or grown here (before anything is
    /// written, so a failed allocation changes nothing the caller sees).
    func kfraScratch(rows n: Int, hessian: Bool) throws(KFACError) -> KFRAScratch<Scalar> {
        let widest = widestFeatures, dim = outputDim
        let s: KFRAScratch<Scalar>
        if let kept = kfraBuffers { s = kept } else { s = try KFRAScratch(widest: widest); kfraBuffers = s }
        if s.factors.isEmpty {
            var factors: [AlignedBuffer<Scalar>] = []
            for i in layers.indices { factors.append(try AlignedBuffer(rows: outFeatures[i], columns: outFeatures[i])) }
            s.factors = factors
        }
        if n > s.rowCapacity || s.columns == nil {
            let capacity = Swift.max(n, s.rowCapacity)
            s.columns = try AlignedBuffer(rows: dim * capacity, columns: dim)
            if s.gradient != nil {
                s.gradient = try AlignedBuffer(rows: capacity, columns: widest)
                s.below = try AlignedBuffer(rows: capacity, columns: widest)
            }
            s.rowCapacity = capacity
        }
        if hessian && s.gradient == nil {
            s.gradient = try AlignedBuffer(rows: s.rowCapacity, columns: widest)
            s.below = try AlignedBuffer(rows: s.rowCapacity, columns: widest)
        }
        return s
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
        // (Index loops: iterating the array itself allocates an iterator box per element in
        // unspecialised debug builds, and the allocation test runs those.)
        for i in chain.layers.indices where isLinked(layer: chain.layers[i]) {
            let l = chain.layers[i]
            throw KFACError(.unsupported, "KFRA records no cross statistics: layer \(l) has a block-tridiagonal link")
        }
        let factors = try chain.kfraFactors(variant: variant, outputGradients: outputGradients)
        let n = chain.rows, s = parameters.outputGradScale
        let weight = Double(n) / (s * s)
        // Everything that can fail, before anything is recorded.
        let scratch = try chain.kfraScratch(rows: n, hessian: variant == .hessian)
        // (Sized by each output factor's structure, checked every call: cheap, and a structure
        // change after the first recording cannot write past a pack.)
        var packsFit = scratch.packs.count == chain.layers.count
        for i in chain.layers.indices where packsFit {
            let f = estimator.layers[chain.layers[i]].blocks[0].output
            packsFit = scratch.packs[i].structure == f.structure  // (not packCount: its reduce allocates in debug builds)
        }
        if !packsFit {
            var packs: [(pack: AlignedBuffer<Scalar>, scratch: AlignedBuffer<Scalar>, structure: FactorStructure)] = []
            for l in chain.layers {
                let f = estimator.layers[l].blocks[0].output
                packs.append((try AlignedBuffer(rows: 1, columns: f.packCount), try AlignedBuffer(rows: 1, columns: f.structure.storageCount),
                              f.structure))
            }
            scratch.packs = packs
        }
        for i in chain.layers.indices {
            let l = chain.layers[i], b = estimator.layers[l], o = chain.outFeatures[i]
            let largest = Double(Scalar.largestMagnitude(factors[i].base, count: o * o))
            let f = b.blocks[0].output
            guard largest.isFinite, largest * weight * Double(f.pendingRows + n + 1) <= Double(Scalar.greatestFiniteMagnitude) / 16 else {
                throw KFACError(.nonFinite, "the KFRA factor of layer \(l) is not finite or too large")
            }
            try f.preparePendingReplacement()
            if recordInputs {
                _ = try estimator.checkedRecord(chain.inputs[i].base, layer: l, rows: n, outputSide: false, scale: 1)
                let blocks = b.blocks
                for k in blocks.indices { _ = try blocks[k].input.prepareRecord(rows: n) }
            }
        }
        for i in chain.layers.indices {
            let l = chain.layers[i]
            let f = estimator.layers[l].blocks[0].output, (pack, packScratch, _) = scratch.packs[i]
            let o = chain.outFeatures[i], g = factors[i].base
            let rows = f.pendingRows + n
            f.packPending(into: pack.base, scratch: packScratch.base)
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
