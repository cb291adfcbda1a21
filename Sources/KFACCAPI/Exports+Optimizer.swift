// The handle, its schedule and its step: kfac_optimizer_* of include/kfac.h.

import KFAC
import _KFACHeader

@c @implementation
public func kfac_optimizer_create(_ dtype: Int32, _ out: UnsafeMutablePointer<OpaquePointer?>?) -> Int32 {
    guard let out else { return KFACStatus.nullPointer.rawValue }
    out.pointee = nil
    let engine: OptimizerHandle.Engine
    do {
        switch dtype {
        case Float.dtypeCode: engine = .float32(try KFACOptimizer<Float>())
        case Double.dtypeCode: engine = .float64(try KFACOptimizer<Double>())
        default: return KFACStatus.invalidArgument.rawValue
        }
    } catch {
        return error.status.rawValue
    }
    out.pointee = OpaquePointer(Unmanaged.passRetained(OptimizerHandle(engine: engine)).toOpaque())
    return KFACStatus.ok.rawValue
}

@c @implementation
public func kfac_optimizer_free(_ opt: OpaquePointer?) {
    guard let opt else { return }
    Unmanaged<OptimizerHandle>.fromOpaque(UnsafeRawPointer(opt)).release()
}

@c @implementation
public func kfac_optimizer_last_error(_ opt: OpaquePointer?) -> UnsafePointer<CChar>! {
    guard let opt else { return cString("the kfac_optimizer handle is NULL") }
    return OptimizerHandle.from(opt).lastError
}

@c @implementation
public func kfac_optimizer_get_dtype(_ opt: OpaquePointer?, _ dtype: UnsafeMutablePointer<Int32>?) -> Int32 {
    withHandle(opt) { (h) throws(KFACError) in try required(dtype, "dtype").pointee = h.dtypeCode }
}

@c @implementation
public func kfac_optimizer_wants_statistics(_ opt: OpaquePointer?, _ wanted: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try required(wanted, "wanted").pointee = o.wantsStatistics ? 1 : 0 }
}

@c @implementation
public func kfac_optimizer_update_factors(_ opt: OpaquePointer?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.updateFactors() }
}

@c @implementation
public func kfac_optimizer_update_inverses(_ opt: OpaquePointer?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.updateInverses() }
}

@c @implementation
public func kfac_optimizer_discard_statistics(_ opt: OpaquePointer?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in o.discardStatistics() }
}

/// Validates per-layer pointer arrays (the step, candidate directions, updates, curvature
/// products) and runs `body` with them; the bias rules are the optimizer's to check.
func withLayerBuffers<S: KFACScalar>(
    _ o: KFACOptimizer<S>, _ weights: UnsafePointer<UnsafeMutablePointer<S>?>?, _ biases: UnsafePointer<UnsafeMutablePointer<S>?>?,
    _ count: Int32, _ name: StaticString, _ body: ((Int) -> ParameterGradient<S>) throws(KFACError) -> Void
) throws(KFACError) {
    let weights = try required(weights, name)
    guard Int(count) == o.layerCount else {
        throw KFACError(.invalidSize, "n_layers is \(count) but \(o.layerCount) layers are registered")
    }
    for l in 0..<Int(count) where weights[l] == nil {
        throw KFACError(.nullPointer, "\(name)[\(l)] is NULL")
    }
    try body { l in ParameterGradient(weight: weights[l]!, bias: biases?[l]) }
}

private func step<S: KFACScalar>(_ o: KFACOptimizer<S>, _ weights: UnsafePointer<UnsafeMutablePointer<S>?>?,
                                 _ biases: UnsafePointer<UnsafeMutablePointer<S>?>?, _ count: Int32) throws(KFACError) {
    try withLayerBuffers(o, weights, biases, count, "weight_grads") { (buffers) throws(KFACError) in try o.step(buffers) }
}

@c @implementation
public func kfac_optimizer_step_f32(_ opt: OpaquePointer?, _ weights: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                    _ biases: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try step(o, weights, biases, count) }
}

@c @implementation
public func kfac_optimizer_step_f64(_ opt: OpaquePointer?, _ weights: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                                    _ biases: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try step(o, weights, biases, count) }
}

@c @implementation
public func kfac_optimizer_get_step_count(_ opt: OpaquePointer?, _ count: UnsafeMutablePointer<Int64>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try required(count, "count").pointee = Int64(o.stepCount) }
}

@c @implementation
public func kfac_optimizer_get_kl_scale(_ opt: OpaquePointer?, _ scale: UnsafeMutablePointer<Double>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let out = try required(scale, "scale")
        guard !o.lastKLScale.isNaN else { throw KFACError(.noStep, "there is no KL scale before the first successful step") }
        out.pointee = o.lastKLScale
    }
}
