extension KFACOptimizer {
    /// Defines the chain of the R-op product: `layers[i]` (registered dense or conv2d layers, each
    /// one's output buffer the next one's input: value counts must match), `activations[i]` between layers[i] and layers[i+1] (the last must be
    /// `.identity`: the last layer's outputs are the network's, under `distribution`). Replaces
    /// a previous chain and its forward pass. On error the previous chain is kept.
    public func defineDenseChain(layers: [Int], activations: [ChainActivation], distribution: OutputDistribution) throws(KFACError) {
        denseChain = try DenseChain(layers: layers, activations: activations, distribution: distribution,
                                    registered: estimator.layers)
    }

    /// The chain's forward pass on `rows` examples: copies every chain layer's weight (its layer's
    /// layout) and bias, the inputs (`inputs[i]`: rows examples; nil for i > 0 computes
    /// a_i = φ(s_{i−1}), named activations only) and φ′ (`derivatives[i]`, for CUSTOM activations,
    /// else ignored), computes z = s_{L−1} into `outputs` ([rows][out], may be nil). Every
    /// product until the next forward uses these. On error the previous forward pass is kept.
    public func denseChainForward(rows: Int, weights: [UnsafePointer<Scalar>?], biases: [UnsafePointer<Scalar>?],
                                  inputs: [UnsafePointer<Scalar>?], derivatives: [UnsafePointer<Scalar>?],
                                  outputs: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        guard let chain = denseChain else { throw KFACError(.noColumns, "no chain is defined: define it first") }
        let count = chain.layers.count
        guard weights.count == count, biases.count == count, inputs.count == count, derivatives.count == count else {
            throw KFACError(.invalidSize, "the chain has \(count) layers: give that many weights, biases, inputs and derivatives")
        }
        guard rows >= 1 else { throw KFACError(.invalidSize, "rows must be >= 1, got \(rows)") }
        let widest = (chain.inFeatures + chain.outFeatures).max()!
        guard rows <= Int.max / 8 / widest else { throw KFACError(.sizeOverflow, "\(rows) rows overflow") }
        guard inputs[0] != nil else { throw KFACError(.nullPointer, "the chain's inputs (inputs[0]) are NULL") }
        for i in 0..<count {
            let l = chain.layers[i], b = estimator.layers[l]
            guard let w = weights[i] else { throw KFACError(.nullPointer, "the weight of chain layer \(i) (layer \(l)) is NULL") }
            try checkBias(biases[i].map { UnsafeMutablePointer(mutating: $0) }, layer: b, index: l, what: "")
            guard Scalar.allFinite(w, count: b.weightCount),
                  biases[i].map({ Scalar.allFinite($0, count: b.layer.outFeatures) }) ?? true else {
                throw KFACError(.nonFinite, "the weights of chain layer \(i) (layer \(l)) contain NaN or Inf")
            }
            if i > 0 && inputs[i] == nil && chain.activations[i - 1] == .custom {
                throw KFACError(.nullPointer, "chain layer \(i) follows a CUSTOM activation: its inputs are needed")
            }
            if i < count - 1 && chain.activations[i] == .custom && derivatives[i] == nil {
                throw KFACError(.nullPointer, "chain layer \(i) has a CUSTOM activation but its derivatives are NULL")
            }
        }
        try chain.forward(rows: rows, weight: { weights[$0]! }, bias: { biases[$0] }, input: { inputs[$0] },
                          derivative: { derivatives[$0] }, outputs: outputs)
    }

    /// The chain's layers (registered indices), empty without a chain.
    public var denseChainLayers: [Int] { denseChain?.layers ?? [] }

    /// G v = (1/N) Σ_n J_nᵀ B_n J_n v over the chain's layers, by the R operator, from the last
    /// forward pass. `vector(l)`/`output(l)` are by registered layer and called for chain layers
    /// only. Outputs may alias vectors; nothing is written on error.
    public func denseChainProduct(_ vector: (Int) -> ParameterVector<Scalar>?,
                                  into output: (Int) -> ParameterGradient<Scalar>?) throws(KFACError) {
        guard let chain = denseChain, chain.hasForward else {
            throw KFACError(.noColumns, "no chain forward pass: define the chain and run its forward first")
        }
        let layers = chain.layers
        try checkProductBuffers(covered: { l in
            for i in 0..<layers.count where layers[i] == l { return true }  // (no iterator: no allocation)
            return false
        }, vector, output)
        try chain.multiply(vector: { vector(chain.layers[$0])! }, output: { output(chain.layers[$0])! })
    }

    /// Records, for every chain layer, the K = output_dim columns of S back-propagated by the
    /// library from the last forward pass (C_{L−1} = S, C_{i−1} = (C_i W_i) ⊙ φ′_{i−1}) with the
    /// layer's kept inputs, exactly as `recordOutputGradientColumns` would with `uses`: `.factor`
    /// gives every chain layer's KFLR output factor, `.product` keeps them for
    /// `gaussNewtonProduct`. The input factors are not recorded. All layers or none: on error
    /// nothing is recorded or kept.
    public func denseChainRecordColumns(uses: ColumnUses) throws(KFACError) {
        guard let chain = denseChain, chain.hasForward else {
            throw KFACError(.noColumns, "no chain forward pass: define the chain and run its forward first")
        }
        guard uses.rawValue >= 1 && uses.rawValue <= 3 else {
            throw KFACError(.invalidArgument, "uses must be FACTOR (1), PRODUCT (2) or both (3), got \(uses.rawValue)")
        }
        let (columns, inputs, k) = try chain.backPropagatedColumns()
        let n = chain.rows, scale = 1 / parameters.outputGradScale
        if uses.contains(.product), let kept = gaussNewtonColumns.columnCount, kept != k {
            throw KFACError(.invalidSize, "the chain's k = \(k) differs from the \(kept) columns already kept (clear them first)")
        }
        // Everything that can fail, for every layer, before anything is recorded: values,
        // the factors' pending-sum bounds, and the memory both uses will need.
        for (i, l) in chain.layers.enumerated() {
            let b = estimator.layers[l], count = k * n * chain.outFeatures[i]
            let largest = Double(Scalar.largestMagnitude(columns[i].base, count: count))
            guard largest.isFinite,
                  b.pendingBound(largest: largest, rows: k * n, outputSide: true, scale: Double(k).squareRoot() * scale)
                    <= Double(Scalar.greatestFiniteMagnitude) / 16 else {
                throw KFACError(.nonFinite, "the back-propagated columns of layer \(l) are not finite or too large")
            }
            if uses.contains(.factor) { for block in b.blocks { _ = try block.output.prepareRecord(rows: k * n) } }
            if uses.contains(.product) {
                _ = try gaussNewtonColumns.reserve(layer: l, layerCount: layerCount, k: k, inputWidth: chain.inFeatures[i],
                                                   columnWidth: chain.outFeatures[i], rows: n)
            }
        }
        for (i, l) in chain.layers.enumerated() {
            try recordOutputGradientColumns(layer: l, inputs: inputs[i], columns: UnsafePointer(columns[i].base), rows: n, k: k,
                                            uses: uses)
        }
    }

    /// `denseChainProduct` on arrays (one per registered layer; zeros outside the chain).
    public func denseChainProduct(_ v: [LayerGradient<Scalar>]) throws(KFACError) -> [LayerGradient<Scalar>] {
        try arrayProduct(v) { (vector, output) throws(KFACError) in try denseChainProduct(vector, into: output) }
    }
}
