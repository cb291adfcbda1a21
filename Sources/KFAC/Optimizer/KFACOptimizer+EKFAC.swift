/// EKFAC's public surface on the optimizer: paired recording and the scaling readout. The
/// strategy itself is `InverseStrategy.ekfac` (`EKFACInverse`), its schedule
/// `BlockDiagonalEstimator+EKFAC`.
extension KFACOptimizer {
    /// Records `rows` rows of inputs and the output gradients of the same rows (the layouts of
    /// `recordInputs` and `recordOutputGradients`, scaled as they are): the input and gradient
    /// statistics exactly as those two calls, and — while the strategy is `.ekfac` — the
    /// per-example gradients EKFAC's scaling S is estimated from. Dense layers: an example is
    /// `rowsPerExample` consecutive rows (a sequence of T tokens; `rows` a multiple of it);
    /// convolutions: an example is a row and `rowsPerExample` must be 1. `ekfacMode` says
    /// whether an example's rows are summed before squaring (`.perExample`) or each counts
    /// alone (`.perRow`). On error nothing changed.
    public func recordExamples(layer: Int, inputs: UnsafePointer<Scalar>?, outputGradients: UnsafePointer<Scalar>?,
                               rows: Int, rowsPerExample: Int = 1) throws(KFACError) {
        let reduction = parameters.lossReduction == .mean ? Double(rows) : 1
        let scale = reduction / parameters.outputGradScale
        try estimator.recordPaired(layer: layer, inputs: inputs, outputGradients: outputGradients, rows: rows,
                                   rowsPerExample: rowsPerExample, scale: scale,
                                   perExample: parameters.ekfacMode == .perExample,
                                   keep: parameters.inverseStrategy == .ekfac)
    }

    /// Copies EKFAC's scaling S of group `group` of a layer (out × in(+1) of the group, row-major
    /// in the eigenbases' coordinates: S[i][j] belongs to the i-th eigenvector of G and the j-th
    /// of A, in the orders `kfac_layer_get_factors` eigendecomposes them). Throws `.noInverses`
    /// when the layer has no EKFAC inverse.
    public func copyEKFACScaling(layer: Int, group: Int = 0, into out: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        _ = try self.layer(layer)
        guard let out else { throw KFACError(.nullPointer, "scaling is NULL") }
        let s = try estimator.ekfacScaling(layer: layer, group: group)
        out.update(from: s.base, count: s.count)
    }

    /// EKFAC's scaling S of group `group` of a layer as a row-major array (see `copyEKFACScaling`).
    public func ekfacScaling(layer: Int, group: Int = 0) throws(KFACError) -> [Scalar] {
        let s = try estimator.ekfacScaling(layer: layer, group: group)
        return Array(UnsafeBufferPointer(start: s.base, count: s.count))
    }
}

extension KFACOptimizer {
    /// When the strategy changes away from EKFAC its pending per-example gradients are
    /// discarded (nothing else would use them, and the state image holds them only under EKFAC).
    func leftStrategy(_ old: InverseStrategy) {
        if old == .ekfac { estimator.commitPairedStatistics(folding: true) }
    }

    /// `recordExamples` with arrays (the sizes of `recordInputs(layer:_:rows:)` and
    /// `recordOutputGradients(layer:_:rows:)`).
    public func recordExamples(layer: Int, inputs: [Scalar], outputGradients: [Scalar], rows: Int,
                               rowsPerExample: Int = 1) throws(KFACError) {
        let b = try self.layer(layer)
        guard rows >= 1, inputs.count == b.inputValueCount(rows: rows),
              outputGradients.count == b.outputGradientValueCount(rows: rows) else {
            throw KFACError(.invalidSize, "inputs (\(inputs.count) values) and output gradients (\(outputGradients.count)) do not hold \(rows) rows of layer \(layer)")
        }
        try asKFACError {
            try inputs.withUnsafeBufferPointer { x in
                try outputGradients.withUnsafeBufferPointer { g in
                    try recordExamples(layer: layer, inputs: x.baseAddress, outputGradients: g.baseAddress, rows: rows,
                                       rowsPerExample: rowsPerExample)
                }
            }
        }
    }
}
