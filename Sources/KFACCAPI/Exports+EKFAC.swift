// Experimental: EKFAC's paired recording and scaling readout, the "EKFAC" section of
// include/kfac.h (the strategy itself is a value of KFAC_PARAM_INVERSE_STRATEGY).

import KFAC
import _KFACHeader

private func recordExamples<S: KFACScalar>(_ o: KFACOptimizer<S>, _ layer: Int32, _ inputs: UnsafePointer<S>?,
                                           _ grads: UnsafePointer<S>?, _ rows: Int64, _ rowsPerExample: Int64) throws(KFACError) {
    guard rows >= 1, rows <= Int64(Int.max) else { throw KFACError(.invalidSize, "rows must be >= 1, got \(rows)") }
    guard rowsPerExample >= 1, rows % rowsPerExample == 0 else {
        throw KFACError(.invalidSize, "rows_per_example must be >= 1 and divide rows (\(rows)), got \(rowsPerExample)")
    }
    try o.recordExamples(layer: Int(layer), inputs: inputs, outputGradients: grads, rows: Int(rows),
                         rowsPerExample: Int(rowsPerExample))
}

@c @implementation
public func kfac_layer_record_examples_f32(_ opt: OpaquePointer?, _ layer: Int32, _ inputs: UnsafePointer<Float>?,
                                           _ grads: UnsafePointer<Float>?, _ rows: Int64, _ rowsPerExample: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try recordExamples(o, layer, inputs, grads, rows, rowsPerExample) }
}

@c @implementation
public func kfac_layer_record_examples_f64(_ opt: OpaquePointer?, _ layer: Int32, _ inputs: UnsafePointer<Double>?,
                                           _ grads: UnsafePointer<Double>?, _ rows: Int64, _ rowsPerExample: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try recordExamples(o, layer, inputs, grads, rows, rowsPerExample) }
}

@c @implementation
public func kfac_layer_get_ekfac_scaling_f32(_ opt: OpaquePointer?, _ layer: Int32, _ group: Int32,
                                             _ scaling: UnsafeMutablePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try o.copyEKFACScaling(layer: Int(layer), group: Int(group), into: scaling)
    }
}

@c @implementation
public func kfac_layer_get_ekfac_scaling_f64(_ opt: OpaquePointer?, _ layer: Int32, _ group: Int32,
                                             _ scaling: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try o.copyEKFACScaling(layer: Int(layer), group: Int(group), into: scaling)
    }
}
