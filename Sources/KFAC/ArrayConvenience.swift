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
        let b = try block(layer)
        try expect(inputs.count, b.inputValueCount(rows: rows), "inputs")
        try asKFACError { try inputs.withUnsafeBufferPointer { p in try recordInputs(layer: layer, p.baseAddress, rows: rows) } }
    }

    /// Adds output gradients given as an array (dense: rows × outFeatures values; convolution:
    /// rows examples of its output shape).
    public func recordOutputGradients(layer: Int, _ gradients: [Scalar], rows: Int) throws(KFACError) {
        let b = try block(layer)
        try expect(gradients.count, b.outputGradientValueCount(rows: rows), "output gradients")
        try asKFACError {
            try gradients.withUnsafeBufferPointer { p in try recordOutputGradients(layer: layer, p.baseAddress, rows: rows) }
        }
    }

    /// `step` on gradients held in arrays; on success they hold the directions.
    public func step(_ gradients: inout [LayerGradient<Scalar>]) throws(KFACError) {
        guard gradients.count == blocks.count else {
            throw KFACError(.invalidSize, "\(gradients.count) gradients for \(blocks.count) layers")
        }
        for (l, b) in blocks.enumerated() {
            try expect(gradients[l].weight.count, b.weightCount, "weight gradient of layer \(l)")
            if let bias = gradients[l].bias { try expect(bias.count, b.layer.outFeatures, "bias gradient of layer \(l)") }
        }
        let weights = gradients.map { g in
            let p = UnsafeMutablePointer<Scalar>.allocate(capacity: g.weight.count)
            p.initialize(from: g.weight, count: g.weight.count)
            return p
        }
        let biases = gradients.map { g in
            g.bias.map { bias in
                let p = UnsafeMutablePointer<Scalar>.allocate(capacity: bias.count)
                p.initialize(from: bias, count: bias.count)
                return p
            }
        }
        defer {
            weights.forEach { $0.deallocate() }
            biases.forEach { $0?.deallocate() }
        }
        try step { l in ParameterGradient(weight: weights[l], bias: biases[l]) }
        for l in gradients.indices {
            gradients[l].weight = Array(UnsafeBufferPointer(start: weights[l], count: gradients[l].weight.count))
            if let b = biases[l] { gradients[l].bias = Array(UnsafeBufferPointer(start: b, count: blocks[l].layer.outFeatures)) }
        }
    }
}

extension KFACOptimizer {
    /// Layer-shaped arrays that `fill` writes through pointers (temporary buffers, copied out).
    private func layerArrays(_ fill: ((Int) -> ParameterGradient<Scalar>) throws(KFACError) -> Void) throws(KFACError) -> [LayerGradient<Scalar>] {
        let weights = blocks.map { UnsafeMutablePointer<Scalar>.allocate(capacity: $0.weightCount) }
        let biases = blocks.map { $0.layer.hasBias ? UnsafeMutablePointer<Scalar>.allocate(capacity: $0.layer.outFeatures) : nil }
        defer {
            weights.forEach { $0.deallocate() }
            biases.forEach { $0?.deallocate() }
        }
        try fill { l in ParameterGradient(weight: weights[l], bias: biases[l]) }
        return blocks.indices.map { l in
            LayerGradient(weight: Array(UnsafeBufferPointer(start: weights[l], count: blocks[l].weightCount)),
                          bias: biases[l].map { Array(UnsafeBufferPointer(start: $0, count: blocks[l].layer.outFeatures)) })
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
