// The adaptive mode: kfac_adaptive_* of include/kfac.h.

import KFAC
import _KFACHeader

private func solveStepSize<S: KFACScalar>(
    _ o: KFACOptimizer<S>, _ outputs: UnsafePointer<S>?, _ direction: UnsafePointer<S>?, _ previous: UnsafePointer<S>?,
    _ rows: Int64, _ dim: Int64, _ dist: Int32, _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?,
    _ predicted: UnsafeMutablePointer<Double>?
) throws(KFACError) {
    let a = try required(alpha, "alpha"), m = try required(mu, "mu")
    let d = try distribution(dist)
    let result = try o.solveStepSize(outputs: outputs, directionProducts: direction, previousProducts: previous,
                                     rows: Int(rows), dim: Int(dim), distribution: d)
    a.pointee = result.alpha
    m.pointee = result.mu
    predicted?.pointee = result.predictedChange
}

@c @implementation
public func kfac_adaptive_solve_step_size_f32(_ opt: OpaquePointer?, _ outputs: UnsafePointer<Float>?, _ direction: UnsafePointer<Float>?,
                                     _ previous: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                     _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?,
                                     _ predicted: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try solveStepSize(o, outputs, direction, previous, rows, dim, dist, alpha, mu, predicted)
    }
}

@c @implementation
public func kfac_adaptive_solve_step_size_f64(_ opt: OpaquePointer?, _ outputs: UnsafePointer<Double>?, _ direction: UnsafePointer<Double>?,
                                     _ previous: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                     _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?,
                                     _ predicted: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try solveStepSize(o, outputs, direction, previous, rows, dim, dist, alpha, mu, predicted)
    }
}

@c @implementation
public func kfac_adaptive_get_update_f32(_ opt: OpaquePointer?, _ weights: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                _ biases: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try withLayerBuffers(o, weights, biases, count, "weight_updates") { (buffers) throws(KFACError) in try o.copyUpdate(into: buffers) }
    }
}

@c @implementation
public func kfac_adaptive_get_update_f64(_ opt: OpaquePointer?, _ weights: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                                _ biases: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try withLayerBuffers(o, weights, biases, count, "weight_updates") { (buffers) throws(KFACError) in try o.copyUpdate(into: buffers) }
    }
}

@c @implementation
public func kfac_adaptive_report_loss_change(_ opt: OpaquePointer?, _ before: Double, _ after: Double,
                                    _ rho: UnsafeMutablePointer<Double>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let r = try o.reportLossChange(before: before, after: after)
        rho?.pointee = r
    }
}

@c @implementation
public func kfac_adaptive_get_reduction_ratio(_ opt: OpaquePointer?, _ rho: UnsafeMutablePointer<Double>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let out = try required(rho, "rho")
        guard o.hasReportedLossChange else { throw KFACError(.noStep, "there is no reduction ratio before the first reported loss change") }
        out.pointee = o.lastReductionRatio
    }
}

@c @implementation
public func kfac_adaptive_get_report_needed(_ opt: OpaquePointer?, _ needed: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let out = try required(needed, "needed")
        out.pointee = o.nextReportAdjustsDamping ? 1 : 0
    }
}

@c @implementation
public func kfac_adaptive_skip_loss_report(_ opt: OpaquePointer?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.skipLossReport() }
}
