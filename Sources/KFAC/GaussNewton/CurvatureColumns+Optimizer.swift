/// What a recording of output-gradient columns is used for (`kfac_columns_use`, a bit set).
public struct ColumnUses: OptionSet, Sendable {
    public let rawValue: Int32
    public init(rawValue: Int32) { self.rawValue = rawValue }
    /// Add Σ_k c cᵀ per example, the example counted once, to the layer's pending output
    /// factor: KFLR with the K columns of S, the Monte-Carlo Fisher with S sampled gradients / √S.
    public static let factor = ColumnUses(rawValue: 1)
    /// Keep the inputs and columns for `gaussNewtonProduct` (stored Jacobian columns).
    public static let product = ColumnUses(rawValue: 2)
}

/// A parameter-shaped vector read by a product: weight [out][in] (conv: PyTorch's weight
/// layout) and bias [out] (nil exactly when the layer has no bias).
public struct ParameterVector<Scalar: KFACScalar> {
    public var weight: UnsafePointer<Scalar>
    public var bias: UnsafePointer<Scalar>?

    public init(weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?) {
        self.weight = weight
        self.bias = bias
    }
}

extension KFACOptimizer {
    /// Records K back-propagated columns per example for layer `layer`: columns [k][rows][out…]
    /// (block j is a batch of output gradients, dense [rows][out], conv [rows][C_out][H_out][W_out]
    /// or channels-last), the columns of a SUMMED loss (`OutputHessian.squareRoot`), divided by
    /// `outputGradScale`; `lossReduction` does not apply (a mean-reduced loss's square roots
    /// are S/√N: multiply them by √N, not N).
    /// - `.factor`: the pending output factor gains Σ_k c cᵀ per example with the example counted
    ///   once (recorded as k·rows rows scaled by √k, so all output-side records of the layer
    ///   between two factor updates should use the same k; `recordOutputGradients` is k = 1).
    /// - `.product`: the layer's `inputs` (as `recordInputs` takes them; not added to A) and the
    ///   columns are kept for `gaussNewtonProduct` until `clearGaussNewtonColumns`; successive
    ///   calls append examples; every layer must keep the same k.
    /// On error nothing changed.
    public func recordOutputGradientColumns(layer l: Int, inputs: UnsafePointer<Scalar>?, columns: UnsafePointer<Scalar>?,
                                            rows: Int, k: Int, uses: ColumnUses) throws(KFACError) {
        let b = try layer(l)
        guard uses.rawValue >= 1 && uses.rawValue <= 3 else {
            throw KFACError(.invalidArgument, "uses must be FACTOR (1), PRODUCT (2) or both (3), got \(uses.rawValue)")
        }
        guard let columns else { throw KFACError(.nullPointer, "columns is NULL") }
        let keep = uses.contains(.product)
        if keep && inputs == nil { throw KFACError(.nullPointer, "inputs is NULL (needed to keep columns for products)") }
        guard rows >= 1, k >= 1 else { throw KFACError(.invalidSize, "rows and k must be >= 1, got \(rows) and \(k)") }
        let inputWidth = b.inputValueCount(rows: 1), columnWidth = b.outputGradientValueCount(rows: 1)
        let (kRows, o1) = rows.multipliedReportingOverflow(by: k)
        let (values, o2) = kRows.multipliedReportingOverflow(by: Swift.max(columnWidth, inputWidth))
        guard !o1, !o2, values <= Int.max / 8 else { throw KFACError(.sizeOverflow, "\(k) columns of \(rows) rows overflow") }
        guard Scalar.allFinite(columns, count: kRows * columnWidth) else {
            throw KFACError(.nonFinite, "columns of layer \(l) contain NaN or Inf")
        }
        let scale = 1 / parameters.outputGradScale
        var kept: CurvatureColumns<Scalar>.Layer?
        if keep {
            guard Scalar.allFinite(inputs!, count: rows * inputWidth) else {
                throw KFACError(.nonFinite, "inputs of layer \(l) contain NaN or Inf")
            }
            guard Double(Scalar.largestMagnitude(columns, count: kRows * columnWidth)) * scale
                    <= Double(Scalar.greatestFiniteMagnitude) / 16 else {
                throw KFACError(.nonFinite, "columns of layer \(l) overflow \(Scalar.self) once divided by the loss scale")
            }
            kept = try gaussNewtonColumns.reserve(layer: l, layerCount: layerCount, k: k, inputWidth: inputWidth,
                                                  columnWidth: columnWidth, rows: rows)
        }
        if uses.contains(.factor) {
            try estimator.recordOutputGradients(layer: l, columns, rows: kRows, scale: Double(k).squareRoot() * scale)
        }
        if let kept {
            kept.append(inputs: inputs!, columns: columns, rows: rows, scale: Scalar(scale))
            estimator.statisticsStarted = true
        }
    }

    /// Drops every kept column and input and releases their memory.
    public func clearGaussNewtonColumns() {
        gaussNewtonColumns.clear()
    }

    /// The kept examples N, columns K (0 if none) and stored values (inputs and columns).
    public var gaussNewtonColumnInfo: (examples: Int, k: Int, values: Int) {
        (gaussNewtonColumns.examples, gaussNewtonColumns.columnCount ?? 0, gaussNewtonColumns.storedValues)
    }

    /// Which layers a column product covers: `true` for the layers with kept columns.
    public var gaussNewtonColumnLayers: [Bool] {
        (0..<layerCount).map { l in l < gaussNewtonColumns.layers.count && gaussNewtonColumns.layers[l] != nil }
    }

    /// Checks the vector and output buffers of the layers `covered` says a product covers.
    func checkProductBuffers(covered: (Int) -> Bool, _ vector: (Int) -> ParameterVector<Scalar>?,
                             _ output: (Int) -> ParameterGradient<Scalar>?) throws(KFACError) {
        for l in 0..<layerCount where covered(l) {
            let b = estimator.layers[l]
            guard let v = vector(l) else { throw KFACError(.nullPointer, "the vector's weight of layer \(l) is NULL") }
            guard let out = output(l) else { throw KFACError(.nullPointer, "the product's weight of layer \(l) is NULL") }
            try checkBias(v.bias.map { UnsafeMutablePointer(mutating: $0) }, layer: b, index: l, what: "vector")
            try checkBias(out.bias, layer: b, index: l, what: "product")
            guard Scalar.allFinite(v.weight, count: b.weightCount),
                  v.bias.map({ Scalar.allFinite($0, count: b.layer.outFeatures) }) ?? true else {
                throw KFACError(.nonFinite, "the vector of layer \(l) contains NaN or Inf")
            }
        }
    }

    /// The exact Gauss-Newton product G·v = (1/N) Σ_n J_nᵀ B_n J_n v from the kept columns, for
    /// every layer with kept columns (`vector(l)`/`output(l)` are not called for the others).
    /// Outputs may alias the vectors; nothing is written on error. Changes nothing in the optimizer.
    public func gaussNewtonProduct(_ vector: (Int) -> ParameterVector<Scalar>?,
                                   into output: (Int) -> ParameterGradient<Scalar>?) throws(KFACError) {
        guard !gaussNewtonColumns.isEmpty else {
            throw KFACError(.noColumns, "no Jacobian columns are kept: record them with uses PRODUCT first")
        }
        let kept = gaussNewtonColumns.layers
        try checkProductBuffers(covered: { l in l < kept.count && kept[l] != nil }, vector, output)
        try gaussNewtonColumns.multiply(layers: estimator.layers, vector: { l in
            let v = vector(l)!
            return (v.weight, v.bias)
        }, output: { l in output(l)! })
    }

    /// `recordOutputGradientColumns` with arrays (inputs may be nil for `.factor` alone).
    public func recordOutputGradientColumns(layer l: Int, inputs: [Scalar]?, columns: [Scalar], rows: Int, k: Int,
                                            uses: ColumnUses) throws(KFACError) {
        let b = try layer(l)
        guard columns.count == k * b.outputGradientValueCount(rows: rows),
              inputs.map({ $0.count == b.inputValueCount(rows: rows) }) ?? true else {
            throw KFACError(.invalidSize, "columns or inputs have the wrong number of values for \(rows) rows and k = \(k)")
        }
        try asKFACError {
            try columns.withUnsafeBufferPointer { c in
                if let inputs {
                    try inputs.withUnsafeBufferPointer { i in
                        try recordOutputGradientColumns(layer: l, inputs: i.baseAddress, columns: c.baseAddress, rows: rows, k: k, uses: uses)
                    }
                } else {
                    try recordOutputGradientColumns(layer: l, inputs: nil, columns: c.baseAddress, rows: rows, k: k, uses: uses)
                }
            }
        }
    }

    /// `gaussNewtonProduct` on arrays: one `LayerGradient` per registered layer in, the product
    /// out (zeros for layers the product does not cover).
    public func gaussNewtonProduct(_ v: [LayerGradient<Scalar>]) throws(KFACError) -> [LayerGradient<Scalar>] {
        try arrayProduct(v) { (vector, output) throws(KFACError) in try gaussNewtonProduct(vector, into: output) }
    }

    /// Runs a product over array vectors through temporary buffers.
    func arrayProduct(_ v: [LayerGradient<Scalar>],
                      _ body: ((Int) -> ParameterVector<Scalar>?, (Int) -> ParameterGradient<Scalar>?) throws(KFACError) -> Void)
    throws(KFACError) -> [LayerGradient<Scalar>] {
        guard v.count == layerCount else { throw KFACError(.invalidSize, "\(v.count) vectors for \(layerCount) layers") }
        for (l, b) in estimator.layers.enumerated() {
            guard v[l].weight.count == b.weightCount, (v[l].bias?.count ?? b.layer.outFeatures) == b.layer.outFeatures else {
                throw KFACError(.invalidSize, "the vector of layer \(l) has the wrong size")
            }
        }
        var out = v.map { LayerGradient(weight: [Scalar](repeating: 0, count: $0.weight.count),
                                        bias: $0.bias.map { [Scalar](repeating: 0, count: $0.count) }) }
        let wIn = v.map { p -> UnsafeMutablePointer<Scalar> in
            let q = UnsafeMutablePointer<Scalar>.allocate(capacity: p.weight.count); q.initialize(from: p.weight, count: p.weight.count); return q }
        let bIn = v.map { p -> UnsafeMutablePointer<Scalar>? in
            p.bias.map { b in let q = UnsafeMutablePointer<Scalar>.allocate(capacity: b.count); q.initialize(from: b, count: b.count); return q } }
        let wOut = v.map { p -> UnsafeMutablePointer<Scalar> in
            let q = UnsafeMutablePointer<Scalar>.allocate(capacity: p.weight.count); q.initialize(repeating: 0, count: p.weight.count); return q }
        let bOut = v.map { p -> UnsafeMutablePointer<Scalar>? in
            p.bias.map { b in let q = UnsafeMutablePointer<Scalar>.allocate(capacity: b.count); q.initialize(repeating: 0, count: b.count); return q } }
        defer { (wIn + wOut).forEach { $0.deallocate() }; (bIn + bOut).forEach { $0?.deallocate() } }
        try body({ l in ParameterVector(weight: wIn[l], bias: bIn[l].map { UnsafePointer($0) }) },
                 { l in ParameterGradient(weight: wOut[l], bias: bOut[l]) })
        for l in out.indices {
            out[l].weight = Array(UnsafeBufferPointer(start: wOut[l], count: v[l].weight.count))
            if let b = bOut[l] { out[l].bias = Array(UnsafeBufferPointer(start: b, count: v[l].bias!.count)) }
        }
        return out
    }
}
