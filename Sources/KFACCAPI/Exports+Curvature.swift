// Experimental: products with the damped curvature, kfac_curvature_* of include/kfac.h.

import KFAC
import _KFACHeader

/// A `CurvaturePower` from its C integer (+1 or −1), or `KFAC_ERROR_INVALID_ARGUMENT`.
private func curvaturePower(_ raw: Int32) throws(KFACError) -> CurvaturePower {
    switch raw {
    case 1: return .one
    case -1: return .inverse
    default: throw KFACError(.invalidArgument, "power must be +1 or -1, got \(raw)")
    }
}

private func multiply<S: KFACScalar>(_ o: KFACOptimizer<S>, _ power: Int32, _ weights: UnsafePointer<UnsafeMutablePointer<S>?>?,
                                     _ biases: UnsafePointer<UnsafeMutablePointer<S>?>?, _ count: Int32) throws(KFACError) {
    let p = try curvaturePower(power)
    try withLayerBuffers(o, weights, biases, count, "weights") { (buffers) throws(KFACError) in try o.multiply(power: p, buffers) }
}

@c @implementation
public func kfac_curvature_multiply_f32(_ opt: OpaquePointer?, _ power: Int32, _ weights: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                        _ biases: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try multiply(o, power, weights, biases, count) }
}

@c @implementation
public func kfac_curvature_multiply_f64(_ opt: OpaquePointer?, _ power: Int32, _ weights: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                                        _ biases: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try multiply(o, power, weights, biases, count) }
}
