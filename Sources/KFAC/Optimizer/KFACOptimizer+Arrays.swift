/// Array-based forms of the pointer API, for Swift callers that hold their buffers in arrays.
/// They check the array sizes (`.invalidSize`). The pointer-based methods are the
/// allocation-free path; `step(_: inout [LayerGradient])` copies through temporary buffers.
extension KFACOptimizer {
    private func expect(_ count: Int, _ expected: Int, _ what: String) throws(KFACError) {
        guard count == expected else {
            throw KFACError(.invalidSize, "\(what) has \(count) values, expected \(expected)")
        }
    }

    /// Adds layer inputs given as an array (dense: rows × inFeatures values; convolution: rows
    /// examples of its input shape).
    public func recordInputs(layer: Int, _ inputs: [Scalar], rows: Int) throws(KFACError) {
        let b = try self.layer(layer)
        try expect(inputs.count, b.inputValueCount(rows: rows), "inputs")
        try asKFACError { try inputs.withUnsafeBufferPointer { p in try recordInputs(layer: layer, p.baseAddress, rows: rows) } }
    }

    /// Adds output gradients given as an array (dense: rows × outFeatures values; convolution:
    /// rows examples of its output shape).
    public func recordOutputGradients(layer: Int, _ gradients: [Scalar], rows: Int) throws(KFACError) {
        let b = try self.layer(layer)
        try expect(gradients.count, b.outputGradientValueCount(rows: rows), "output gradients")
        try asKFACError {
            try gradients.withUnsafeBufferPointer { p in try recordOutputGradients(layer: layer, p.baseAddress, rows: rows) }
        }
    }

    /// `step` on gradients held in arrays; on success they hold the directions.
    public func step(_ gradients: inout [LayerGradient<Scalar>]) throws(KFACError) {
        guard gradients.count == estimator.layers.count else {
            throw KFACError(.invalidSize, "\(gradients.count) gradients for \(estimator.layers.count) layers")
        }
        for (l, b) in estimator.layers.enumerated() {
            try expect(gradients[l].weight.count, b.weightCount, "weight gradient of layer \(l)")
            if let bias = gradients[l].bias { try expect(bias.count, b.layer.outFeatures, "bias gradient of layer \(l)") }
        }
        gradients = try layerArrays(from: gradients) { (buffers) throws(KFACError) in try step(buffers) }
    }
}

extension KFACOptimizer {
    /// Runs `body` on temporary layer-shaped buffers (holding `initial`, or zeros) and returns
    /// their contents afterwards; on error nothing is returned. With `initial`, a layer has a
    /// bias buffer when `initial` has a bias array for it (so `body` sees the caller's mistakes).
    private func layerArrays(from initial: [LayerGradient<Scalar>]? = nil,
                             _ body: ((Int) -> ParameterGradient<Scalar>) throws(KFACError) -> Void) throws(KFACError) -> [LayerGradient<Scalar>] {
        let weights = estimator.layers.indices.map { l in
            let p = UnsafeMutablePointer<Scalar>.allocate(capacity: estimator.layers[l].weightCount)
            if let initial { p.initialize(from: initial[l].weight, count: estimator.layers[l].weightCount) }
            else { p.initialize(repeating: 0, count: estimator.layers[l].weightCount) }
            return p
        }
        let biases = estimator.layers.indices.map { l -> UnsafeMutablePointer<Scalar>? in
            guard initial.map({ $0[l].bias != nil }) ?? estimator.layers[l].layer.hasBias else { return nil }
            let p = UnsafeMutablePointer<Scalar>.allocate(capacity: estimator.layers[l].layer.outFeatures)
            if let bias = initial?[l].bias { p.initialize(from: bias, count: estimator.layers[l].layer.outFeatures) }
            else { p.initialize(repeating: 0, count: estimator.layers[l].layer.outFeatures) }
            return p
        }
        defer {
            weights.forEach { $0.deallocate() }
            biases.forEach { $0?.deallocate() }
        }
        try body { l in ParameterGradient(weight: weights[l], bias: biases[l]) }
        return estimator.layers.indices.map { l in
            LayerGradient(weight: Array(UnsafeBufferPointer(start: weights[l], count: estimator.layers[l].weightCount)),
                          bias: biases[l].map { Array(UnsafeBufferPointer(start: $0, count: estimator.layers[l].layer.outFeatures)) })
        }
    }

    /// Candidate `candidate`'s directions of the last step, per layer, and its γ.
    public func candidateDirections(_ candidate: Int) throws(KFACError) -> (directions: [LayerGradient<Scalar>], factorDamping: Double) {
        var damping = 0.0
        let d = try layerArrays { (buffers) throws(KFACError) in damping = try copyCandidateDirections(candidate, into: buffers) }
        return (d, damping)
    }

    /// The update δ of the last solve, per layer (apply θ ← θ + δ).
    public func update() throws(KFACError) -> [LayerGradient<Scalar>] {
        try layerArrays { (buffers) throws(KFACError) in try copyUpdate(into: buffers) }
    }
}

/// One layer's parameter gradient held in arrays: weight [out][in] row-major, bias [out].
public struct LayerGradient<Scalar: KFACScalar>: Equatable {
    public var weight: [Scalar]
    public var bias: [Scalar]?

    public init(weight: [Scalar], bias: [Scalar]?) {
        self.weight = weight
        self.bias = bias
    }
}
