// Experimental: block-tridiagonal links, kfac_layer_link and kfac_layer_get_cross_factors_* of
// include/kfac.h ("Block-tridiagonal").

import KFAC
import _KFACHeader

@c @implementation
public func kfac_layer_link(_ opt: OpaquePointer?, _ lower: Int32, _ upper: Int32) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.linkLayers(lower: Int(lower), upper: Int(upper)) }
}

@c @implementation
public func kfac_layer_get_cross_factors_f32(_ opt: OpaquePointer?, _ lower: Int32,
                                             _ a: UnsafeMutablePointer<Float>?, _ g: UnsafeMutablePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.copyCrossFactors(lower: Int(lower), a: a, g: g) }
}

@c @implementation
public func kfac_layer_get_cross_factors_f64(_ opt: OpaquePointer?, _ lower: Int32,
                                             _ a: UnsafeMutablePointer<Double>?, _ g: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.copyCrossFactors(lower: Int(lower), a: a, g: g) }
}
