// Experimental: the candidates for the factor damping γ, kfac_candidates_* of include/kfac.h.

import KFAC
import _KFACHeader

@c @implementation
public func kfac_candidates_get_count(_ opt: OpaquePointer?, _ count: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let c = try required(count, "count")
        c.pointee = Int32(o.candidateCount)
    }
}

private func candidateDirections<S: KFACScalar>(
    _ o: KFACOptimizer<S>, _ candidate: Int32, _ weights: UnsafePointer<UnsafeMutablePointer<S>?>?,
    _ biases: UnsafePointer<UnsafeMutablePointer<S>?>?, _ count: Int32, _ damping: UnsafeMutablePointer<Double>?
) throws(KFACError) {
    try withLayerBuffers(o, weights, biases, count, "weight_dirs") { (buffers) throws(KFACError) in
        let gamma = try o.copyCandidateDirections(Int(candidate), into: buffers)
        damping?.pointee = gamma
    }
}

@c @implementation
public func kfac_candidates_get_directions_f32(_ opt: OpaquePointer?, _ candidate: Int32, _ weights: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                          _ biases: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32,
                                          _ damping: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try candidateDirections(o, candidate, weights, biases, count, damping) }
}

@c @implementation
public func kfac_candidates_get_directions_f64(_ opt: OpaquePointer?, _ candidate: Int32, _ weights: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                                          _ biases: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32,
                                          _ damping: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try candidateDirections(o, candidate, weights, biases, count, damping) }
}

private func solveCandidates<S: KFACScalar>(
    _ o: KFACOptimizer<S>, _ outputs: UnsafePointer<S>?, _ products: UnsafePointer<UnsafePointer<S>?>?, _ count: Int32,
    _ previous: UnsafePointer<S>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ chosen: UnsafeMutablePointer<Int32>?,
    _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?, _ predicted: UnsafeMutablePointer<Double>?
) throws(KFACError) {
    let k = try required(chosen, "chosen"), a = try required(alpha, "alpha"), m = try required(mu, "mu")
    let products = try required(products, "direction_products")
    guard count >= 1 else { throw KFACError(.invalidArgument, "n_candidates must be >= 1, got \(count)") }
    let d = try distribution(dist)
    let result = try o.solveStepSize(outputs: outputs, candidateProducts: { products[$0] }, candidateCount: Int(count),
                                     previousProducts: previous, rows: Int(rows), dim: Int(dim), distribution: d)
    k.pointee = Int32(result.chosen)
    a.pointee = result.alpha
    m.pointee = result.mu
    predicted?.pointee = result.predictedChange
}

@c @implementation
public func kfac_candidates_solve_step_size_f32(
    _ opt: OpaquePointer?, _ outputs: UnsafePointer<Float>?, _ products: UnsafePointer<UnsafePointer<Float>?>?, _ count: Int32,
    _ previous: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ chosen: UnsafeMutablePointer<Int32>?,
    _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?, _ predicted: UnsafeMutablePointer<Double>?
) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try solveCandidates(o, outputs, products, count, previous, rows, dim, dist, chosen, alpha, mu, predicted)
    }
}

@c @implementation
public func kfac_candidates_solve_step_size_f64(
    _ opt: OpaquePointer?, _ outputs: UnsafePointer<Double>?, _ products: UnsafePointer<UnsafePointer<Double>?>?, _ count: Int32,
    _ previous: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ chosen: UnsafeMutablePointer<Int32>?,
    _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?, _ predicted: UnsafeMutablePointer<Double>?
) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try solveCandidates(o, outputs, products, count, previous, rows, dim, dist, chosen, alpha, mu, predicted)
    }
}

