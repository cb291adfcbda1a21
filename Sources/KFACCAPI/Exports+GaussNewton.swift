// Experimental: Gauss-Newton products, kfac_gn_* and kfac_layer_record_output_grad_columns_* of
// include/kfac.h ("Gauss-Newton products").

import KFAC
import _KFACHeader

// MARK: Output-space helpers (no handle)

private func outputSpace<S: KFACScalar>(
    _ outputs: UnsafePointer<S>?, _ vectors: UnsafePointer<S>??, _ rows: Int64, _ dim: Int64, _ dist: Int32,
    _ out: UnsafeMutablePointer<S>?, columns: Bool,
    _ body: (OutputDistribution, UnsafePointer<S>, Int, Int, UnsafeMutablePointer<S>) -> Void
) -> Int32 {
    do throws(KFACError) {
        let z = try required(outputs, "outputs"), o = try required(out, columns ? "columns" : "products")
        if let vectors { _ = try required(vectors, "vectors") }
        guard rows >= 1, dim >= 1 else { throw KFACError(.invalidSize, "rows and output_dim must be >= 1") }
        let (count, o1) = Int(rows).multipliedReportingOverflow(by: Int(dim))
        let (total, o2) = count.multipliedReportingOverflow(by: columns ? Int(dim) : 1)
        guard !o1, !o2, total <= Int.max / 8 else { throw KFACError(.sizeOverflow, "rows × output_dim overflows") }
        let d = try distribution(dist)
        guard S.allFinite(z, count: count) else { throw KFACError(.nonFinite, "outputs contain NaN or Inf") }
        if let v = vectors, !S.allFinite(v!, count: count) { throw KFACError(.nonFinite, "vectors contain NaN or Inf") }
        body(d, z, Int(rows), Int(dim), o)
        return KFACStatus.ok.rawValue
    } catch {
        return error.status.rawValue
    }
}

@c @implementation
public func kfac_gn_output_hessian_multiply_f32(_ outputs: UnsafePointer<Float>?, _ vectors: UnsafePointer<Float>?, _ rows: Int64,
                                                _ dim: Int64, _ dist: Int32, _ products: UnsafeMutablePointer<Float>?) -> Int32 {
    outputSpace(outputs, .some(vectors), rows, dim, dist, products, columns: false) { d, z, r, c, o in
        OutputHessian.multiply(distribution: d, outputs: z, vectors: vectors!, rows: r, dim: c, into: o)
    }
}

@c @implementation
public func kfac_gn_output_hessian_multiply_f64(_ outputs: UnsafePointer<Double>?, _ vectors: UnsafePointer<Double>?, _ rows: Int64,
                                                _ dim: Int64, _ dist: Int32, _ products: UnsafeMutablePointer<Double>?) -> Int32 {
    outputSpace(outputs, .some(vectors), rows, dim, dist, products, columns: false) { d, z, r, c, o in
        OutputHessian.multiply(distribution: d, outputs: z, vectors: vectors!, rows: r, dim: c, into: o)
    }
}

@c @implementation
public func kfac_gn_output_hessian_sqrt_f32(_ outputs: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                            _ columns: UnsafeMutablePointer<Float>?) -> Int32 {
    outputSpace(outputs, nil, rows, dim, dist, columns, columns: true) { d, z, r, c, o in
        OutputHessian.squareRoot(distribution: d, outputs: z, rows: r, dim: c, into: o)
    }
}

@c @implementation
public func kfac_gn_output_hessian_sqrt_f64(_ outputs: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                            _ columns: UnsafeMutablePointer<Double>?) -> Int32 {
    outputSpace(outputs, nil, rows, dim, dist, columns, columns: true) { d, z, r, c, o in
        OutputHessian.squareRoot(distribution: d, outputs: z, rows: r, dim: c, into: o)
    }
}

// MARK: Columns

@c @implementation
public func kfac_layer_record_output_grad_columns_f32(_ opt: OpaquePointer?, _ layer: Int32, _ inputs: UnsafePointer<Float>?,
                                                      _ columns: UnsafePointer<Float>?, _ rows: Int64, _ k: Int32,
                                                      _ uses: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try o.recordOutputGradientColumns(layer: Int(layer), inputs: inputs, columns: columns, rows: Int(rows), k: Int(k),
                                          uses: ColumnUses(rawValue: uses))
    }
}

@c @implementation
public func kfac_layer_record_output_grad_columns_f64(_ opt: OpaquePointer?, _ layer: Int32, _ inputs: UnsafePointer<Double>?,
                                                      _ columns: UnsafePointer<Double>?, _ rows: Int64, _ k: Int32,
                                                      _ uses: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try o.recordOutputGradientColumns(layer: Int(layer), inputs: inputs, columns: columns, rows: Int(rows), k: Int(k),
                                          uses: ColumnUses(rawValue: uses))
    }
}

/// Checks n_layers and hands the product the per-layer buffers (nil where the caller's arrays
/// have NULL; the optimizer checks the covered layers').
private func withProductBuffers<S: KFACScalar>(
    _ o: KFACOptimizer<S>, _ vw: UnsafePointer<UnsafePointer<S>?>?, _ vb: UnsafePointer<UnsafePointer<S>?>?,
    _ pw: UnsafePointer<UnsafeMutablePointer<S>?>?, _ pb: UnsafePointer<UnsafeMutablePointer<S>?>?, _ count: Int32,
    _ body: ((Int) -> ParameterVector<S>?, (Int) -> ParameterGradient<S>?) throws(KFACError) -> Void
) throws(KFACError) {
    let vw = try required(vw, "vector_w"), pw = try required(pw, "product_w")
    guard Int(count) == o.layerCount else {
        throw KFACError(.invalidSize, "n_layers is \(count) but \(o.layerCount) layers are registered")
    }
    try body({ l in vw[l].map { ParameterVector(weight: $0, bias: vb?[l]) } },
             { l in pw[l].map { ParameterGradient(weight: $0, bias: pb?[l]) } })
}

@c @implementation
public func kfac_gn_columns_multiply_f32(_ opt: OpaquePointer?, _ vw: UnsafePointer<UnsafePointer<Float>?>?,
                                         _ vb: UnsafePointer<UnsafePointer<Float>?>?, _ pw: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                         _ pb: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try withProductBuffers(o, vw, vb, pw, pb, count) { (v, p) throws(KFACError) in try o.gaussNewtonProduct(v, into: p) }
    }
}

@c @implementation
public func kfac_gn_columns_multiply_f64(_ opt: OpaquePointer?, _ vw: UnsafePointer<UnsafePointer<Double>?>?,
                                         _ vb: UnsafePointer<UnsafePointer<Double>?>?, _ pw: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                                         _ pb: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try withProductBuffers(o, vw, vb, pw, pb, count) { (v, p) throws(KFACError) in try o.gaussNewtonProduct(v, into: p) }
    }
}

@c @implementation
public func kfac_gn_columns_get_info(_ opt: OpaquePointer?, _ examples: UnsafeMutablePointer<Int64>?,
                                     _ k: UnsafeMutablePointer<Int32>?, _ values: UnsafeMutablePointer<Int64>?) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        let info: (examples: Int, k: Int, values: Int)
        switch handle.engine {
        case .float32(let o): info = o.gaussNewtonColumnInfo
        case .float64(let o): info = o.gaussNewtonColumnInfo
        }
        examples?.pointee = Int64(info.examples)
        k?.pointee = Int32(info.k)
        values?.pointee = Int64(info.values)
    }
}

@c @implementation
public func kfac_gn_columns_clear(_ opt: OpaquePointer?) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        switch handle.engine {
        case .float32(let o): o.clearGaussNewtonColumns()
        case .float64(let o): o.clearGaussNewtonColumns()
        }
    }
}

// MARK: Dense chain

@c @implementation
public func kfac_gn_chain_define(_ opt: OpaquePointer?, _ layers: UnsafePointer<Int32>?, _ activations: UnsafePointer<Int32>?,
                                 _ n: Int32, _ dist: Int32) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        let layers = try required(layers, "layers"), activations = try required(activations, "activations")
        guard n >= 1 else { throw KFACError(.invalidSize, "n must be >= 1, got \(n)") }
        let d = try distribution(dist)
        var acts: [ChainActivation] = []
        for i in 0..<Int(n) {
            guard let a = ChainActivation(rawValue: activations[i]) else {
                throw KFACError(.invalidArgument, "activations[\(i)] = \(activations[i]) is not a kfac_activation")
            }
            acts.append(a)
        }
        let ids = (0..<Int(n)).map { Int(layers[$0]) }
        switch handle.engine {
        case .float32(let o): try o.defineDenseChain(layers: ids, activations: acts, distribution: d)
        case .float64(let o): try o.defineDenseChain(layers: ids, activations: acts, distribution: d)
        }
    }
}

private func chainForward<S: KFACScalar>(_ o: KFACOptimizer<S>, _ w: UnsafePointer<UnsafePointer<S>?>?,
                                         _ b: UnsafePointer<UnsafePointer<S>?>?, _ a: UnsafePointer<UnsafePointer<S>?>?,
                                         _ d: UnsafePointer<UnsafePointer<S>?>?, _ rows: Int64,
                                         _ out: UnsafeMutablePointer<S>?) throws(KFACError) {
    let n = o.denseChainLayers.count
    guard n > 0 else { throw KFACError(.noColumns, "no chain is defined: call kfac_gn_chain_define first") }
    let w = try required(w, "weights"), a = try required(a, "inputs")
    try o.denseChainForward(rows: Int(rows), weights: (0..<n).map { w[$0] }, biases: (0..<n).map { b?[$0] },
                            inputs: (0..<n).map { a[$0] }, derivatives: (0..<n).map { d?[$0] }, outputs: out)
}

@c @implementation
public func kfac_gn_chain_forward_f32(_ opt: OpaquePointer?, _ w: UnsafePointer<UnsafePointer<Float>?>?,
                                      _ b: UnsafePointer<UnsafePointer<Float>?>?, _ a: UnsafePointer<UnsafePointer<Float>?>?,
                                      _ d: UnsafePointer<UnsafePointer<Float>?>?, _ rows: Int64,
                                      _ out: UnsafeMutablePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try chainForward(o, w, b, a, d, rows, out) }
}

@c @implementation
public func kfac_gn_chain_forward_f64(_ opt: OpaquePointer?, _ w: UnsafePointer<UnsafePointer<Double>?>?,
                                      _ b: UnsafePointer<UnsafePointer<Double>?>?, _ a: UnsafePointer<UnsafePointer<Double>?>?,
                                      _ d: UnsafePointer<UnsafePointer<Double>?>?, _ rows: Int64,
                                      _ out: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try chainForward(o, w, b, a, d, rows, out) }
}

@c @implementation
public func kfac_gn_chain_record_columns(_ opt: OpaquePointer?, _ uses: Int32) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        switch handle.engine {
        case .float32(let o): try o.denseChainRecordColumns(uses: ColumnUses(rawValue: uses))
        case .float64(let o): try o.denseChainRecordColumns(uses: ColumnUses(rawValue: uses))
        }
    }
}

@c @implementation
public func kfac_gn_chain_multiply_f32(_ opt: OpaquePointer?, _ vw: UnsafePointer<UnsafePointer<Float>?>?,
                                       _ vb: UnsafePointer<UnsafePointer<Float>?>?, _ pw: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                       _ pb: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try withProductBuffers(o, vw, vb, pw, pb, count) { (v, p) throws(KFACError) in try o.denseChainProduct(v, into: p) }
    }
}

@c @implementation
public func kfac_gn_chain_multiply_f64(_ opt: OpaquePointer?, _ vw: UnsafePointer<UnsafePointer<Double>?>?,
                                       _ vb: UnsafePointer<UnsafePointer<Double>?>?, _ pw: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                                       _ pb: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try withProductBuffers(o, vw, vb, pw, pb, count) { (v, p) throws(KFACError) in try o.denseChainProduct(v, into: p) }
    }
}

// MARK: KFRA on the dense chain

private func chainRecordKFRA<S: KFACScalar>(_ o: KFACOptimizer<S>, _ variant: Int32, _ recordInputs: Int32,
                                            _ grads: UnsafePointer<S>?) throws(KFACError) {
    guard let v = KFRAVariant(rawValue: variant) else {
        throw KFACError(.invalidArgument, "variant must be KFAC_KFRA_GGN (0) or KFAC_KFRA_HESSIAN (1), got \(variant)")
    }
    guard recordInputs == 0 || recordInputs == 1 else {
        throw KFACError(.invalidArgument, "record_inputs must be 0 or 1, got \(recordInputs)")
    }
    try o.denseChainRecordKFRA(variant: v, recordInputs: recordInputs == 1, outputGradients: grads)
}

@c @implementation
public func kfac_gn_chain_record_kfra_f32(_ opt: OpaquePointer?, _ variant: Int32, _ recordInputs: Int32,
                                          _ grads: UnsafePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try chainRecordKFRA(o, variant, recordInputs, grads) }
}

@c @implementation
public func kfac_gn_chain_record_kfra_f64(_ opt: OpaquePointer?, _ variant: Int32, _ recordInputs: Int32,
                                          _ grads: UnsafePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try chainRecordKFRA(o, variant, recordInputs, grads) }
}
