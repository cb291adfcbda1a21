// Experimental: conjugate gradient and Newton-CG, kfac_cg_* of include/kfac.h.

import KFAC
import _KFACHeader

/// `CGOptions` from a `kfac_cg_desc` (NULL = defaults; zeros = defaults).
private func options(_ p: UnsafePointer<kfac_cg_desc>?) throws(KFACError) -> CGOptions {
    guard let p else { return CGOptions() }
    let d = try readGrowable(p, "desc", minimum: MemoryLayout<kfac_cg_desc>.offset(of: \.tolerance)!,
                             empty: kfac_cg_desc())
    var o = CGOptions()
    guard d.max_iterations >= 0 else {
        throw KFACError(.invalidArgument, "max_iterations must be >= 0 (0 = 250), got \(d.max_iterations)")
    }
    if d.max_iterations > 0 { o.maxIterations = Int(d.max_iterations) }
    guard let rule = CGStopRule(rawValue: d.stop_rule) else { throw KFACError(.invalidArgument, "unknown stop_rule \(d.stop_rule)") }
    o.stopRule = rule
    guard !(d.tolerance < 0) && !d.tolerance.isNaN else { throw KFACError(.invalidArgument, "tolerance must be >= 0, got \(d.tolerance)") }
    if d.tolerance != 0 { o.tolerance = d.tolerance }
    guard let pre = CGPreconditioner(rawValue: d.preconditioner) else {
        throw KFACError(.invalidArgument, "unknown preconditioner \(d.preconditioner)")
    }
    o.preconditioner = pre
    o.warmStart = try flag(d.warm_start, "warm_start")
    if d.warm_start_decay != 0 { o.warmStartDecay = d.warm_start_decay }
    if d.diagonal_exponent != 0 { o.diagonalExponent = d.diagonal_exponent }
    o.l2 = d.l2
    return o
}

/// Checks const pointer arrays (read only by the library) as `withLayerBuffers` does.
private func checkConstBuffers<S: KFACScalar>(_ o: KFACOptimizer<S>, _ weights: UnsafePointer<UnsafePointer<S>?>?,
                                              _ count: Int32, _ name: StaticString) throws(KFACError) {
    let w = try required(weights, name)
    guard Int(count) == o.layerCount else {
        throw KFACError(.invalidSize, "n_layers is \(count) but \(o.layerCount) layers are registered")
    }
    for l in 0..<Int(count) where w[l] == nil { throw KFACError(.nullPointer, "\(name)[\(l)] is NULL") }
}

/// Layer l's view of checked const pointer arrays.
@inline(__always)
private func view<S: KFACScalar>(_ weights: UnsafePointer<UnsafePointer<S>?>?, _ biases: UnsafePointer<UnsafePointer<S>?>?,
                                 _ l: Int) -> ParameterGradient<S> {
    ParameterGradient(weight: UnsafeMutablePointer(mutating: weights![l]!), bias: biases?[l].map { UnsafeMutablePointer(mutating: $0) })
}

private func writeRequest(_ r: CGRequest, _ out: UnsafeMutablePointer<Int32>) { out.pointee = r.rawValue }

private func begin<S: KFACScalar>(_ o: KFACOptimizer<S>, _ desc: UnsafePointer<kfac_cg_desc>?,
                                  _ gw: UnsafePointer<UnsafePointer<S>?>?, _ gb: UnsafePointer<UnsafePointer<S>?>?,
                                  _ dw: UnsafePointer<UnsafePointer<S>?>?, _ db: UnsafePointer<UnsafePointer<S>?>?,
                                  _ count: Int32, _ request: UnsafeMutablePointer<Int32>?) throws(KFACError) {
    let out = try required(request, "request")
    let opts = try options(desc)
    try checkConstBuffers(o, gw, count, "grad_w")
    if dw == nil && db != nil { throw KFACError(.nullPointer, "diag_w is NULL but diag_b is not") }
    if dw != nil { try checkConstBuffers(o, dw, count, "diag_w") }
    writeRequest(try o.beginConjugateGradient(opts, gradient: { view(gw, gb, $0) }, hasDiagonal: dw != nil,
                                              diagonal: { view(dw, db, $0) }), out)
}

private func vector<S: KFACScalar>(_ o: KFACOptimizer<S>, _ w: UnsafePointer<UnsafeMutablePointer<S>?>?,
                                   _ b: UnsafePointer<UnsafeMutablePointer<S>?>?, _ count: Int32) throws(KFACError) {
    try withLayerBuffers(o, w, b, count, "vector_w") { (v) throws(KFACError) in try o.conjugateGradientVector(into: v) }
}

private func supply<S: KFACScalar>(_ o: KFACOptimizer<S>, _ w: UnsafePointer<UnsafePointer<S>?>?,
                                   _ b: UnsafePointer<UnsafePointer<S>?>?, _ count: Int32,
                                   _ request: UnsafeMutablePointer<Int32>?) throws(KFACError) {
    let out = try required(request, "request")
    try checkConstBuffers(o, w, count, "product_w")
    writeRequest(try o.supplyConjugateGradientProduct { view(w, b, $0) }, out)
}

/// Where each field of kfac_cg_result ends (offset + size), ascending.
private let resultFieldEnds: [Int] = {
    typealias R = kfac_cg_result
    let ints: [PartialKeyPath<R>] = [\R.iterations, \R.products, \R.reason, \R.reserved]
    let doubles: [PartialKeyPath<R>] = [\R.grad_dot_step, \R.step_curvature, \R.damping_term, \R.model_value,
                                        \R.quadratic_value, \R.residual_norm, \R.gradient_norm, \R.damping]
    return ints.map { MemoryLayout<R>.offset(of: $0)! + 4 } + doubles.map { MemoryLayout<R>.offset(of: $0)! + 8 }
}()

private func cResult(_ r: CGResult) -> kfac_cg_result {
    var c = kfac_cg_result()
    c.struct_size = MemoryLayout<kfac_cg_result>.size
    c.iterations = Int32(r.iterations)
    c.products = Int32(r.products)
    c.reason = r.reason.rawValue
    c.grad_dot_step = r.gradDotStep
    c.step_curvature = r.stepCurvature
    c.damping_term = r.dampingTerm
    c.model_value = r.modelValue
    c.quadratic_value = r.quadraticValue
    c.residual_norm = r.residualNorm
    c.gradient_norm = r.gradientNorm
    c.damping = r.damping
    return c
}

/// Checks a result struct's size before anything commits.
private func checkResult(_ p: UnsafeMutablePointer<kfac_cg_result>?) throws(KFACError) {
    guard let p else { return }
    let size = UnsafeRawPointer(p).load(as: Int.self)
    guard size >= MemoryLayout<kfac_cg_result>.offset(of: \.products)! else {
        throw KFACError(.invalidSize, "result->struct_size \(size) is smaller than \(MemoryLayout<kfac_cg_result>.offset(of: \.products)!)")
    }
}

private func storeResult(_ r: CGResult, _ p: UnsafeMutablePointer<kfac_cg_result>?) throws(KFACError) {
    guard let p else { return }
    // writeGrowable's rule (the whole fields that fit; struct_size ← the bytes filled), without
    // its array concatenation, so that finishing a solve allocates nothing.
    let raw = UnsafeMutableRawPointer(p)
    let size = raw.load(as: Int.self)
    var filled = MemoryLayout<kfac_cg_result>.size
    if size < filled {
        filled = MemoryLayout<kfac_cg_result>.offset(of: \.iterations)!
        for end in resultFieldEnds where end <= size { filled = end }
    }
    var value = cResult(r)
    value.struct_size = filled
    withUnsafeBytes(of: &value) { raw.copyMemory(from: $0.baseAddress!, byteCount: filled) }
}

private func finish<S: KFACScalar>(_ o: KFACOptimizer<S>, _ w: UnsafePointer<UnsafeMutablePointer<S>?>?,
                                   _ b: UnsafePointer<UnsafeMutablePointer<S>?>?, _ count: Int32,
                                   _ result: UnsafeMutablePointer<kfac_cg_result>?) throws(KFACError) {
    try checkResult(result)
    try withLayerBuffers(o, w, b, count, "step_w") { (step) throws(KFACError) in
        let r = try o.finishConjugateGradient(into: step)
        try storeResult(r, result)
    }
}

private func solve<S: KFACScalar>(
    _ o: KFACOptimizer<S>, _ desc: UnsafePointer<kfac_cg_desc>?,
    _ gw: UnsafePointer<UnsafePointer<S>?>?, _ gb: UnsafePointer<UnsafePointer<S>?>?,
    _ dw: UnsafePointer<UnsafePointer<S>?>?, _ db: UnsafePointer<UnsafePointer<S>?>?,
    _ count: Int32, _ result: UnsafeMutablePointer<kfac_cg_result>?,
    _ stepW: UnsafePointer<UnsafeMutablePointer<S>?>?, _ stepB: UnsafePointer<UnsafeMutablePointer<S>?>?,
    _ call: (UnsafePointer<UnsafePointer<S>?>, UnsafePointer<UnsafePointer<S>?>, UnsafePointer<UnsafeMutablePointer<S>?>,
             UnsafePointer<UnsafeMutablePointer<S>?>) -> Int32
) throws(KFACError) {
    try checkResult(result)
    let opts = try options(desc)
    try checkConstBuffers(o, gw, count, "grad_w")
    if dw == nil && db != nil { throw KFACError(.nullPointer, "diag_w is NULL but diag_b is not") }
    if dw != nil { try checkConstBuffers(o, dw, count, "diag_w") }
    // kfac_cg_solve_* allocates per call anyway (its pointer arrays): escaping views are fine here.
    let g: (Int) -> ParameterGradient<S> = { view(gw, gb, $0) }
    let d: ((Int) -> ParameterGradient<S>)? = dw == nil ? nil : { view(dw, db, $0) }
    let n = Int(count)
    // Pointer arrays handed to the product function, filled per call.
    let vw = UnsafeMutablePointer<UnsafePointer<S>?>.allocate(capacity: n), vb = UnsafeMutablePointer<UnsafePointer<S>?>.allocate(capacity: n)
    let pw = UnsafeMutablePointer<UnsafeMutablePointer<S>?>.allocate(capacity: n), pb = UnsafeMutablePointer<UnsafeMutablePointer<S>?>.allocate(capacity: n)
    defer { vw.deallocate(); vb.deallocate(); pw.deallocate(); pb.deallocate() }
    try withLayerBuffers(o, stepW, stepB, count, "step_w") { (step) throws(KFACError) in
        let r = try o.solveConjugateGradient(opts, gradient: g, diagonal: d, product: { (vector, out) throws(KFACError) in
            for l in 0..<n {
                let v = vector(l), p = out(l)
                vw[l] = UnsafePointer(v.weight); vb[l] = v.bias.map { UnsafePointer($0) }
                pw[l] = p.weight; pb[l] = p.bias
            }
            let status = call(vw, vb, pw, pb)
            guard status == 0 else {
                throw KFACError(.callback, "the product function returned \(status); the solve is open at its last iterate")
            }
        }, step: step)
        try storeResult(r, result)
    }
}

@c @implementation
public func kfac_cg_begin_f32(_ opt: OpaquePointer?, _ desc: UnsafePointer<kfac_cg_desc>?, _ gw: UnsafePointer<UnsafePointer<Float>?>?,
                              _ gb: UnsafePointer<UnsafePointer<Float>?>?, _ dw: UnsafePointer<UnsafePointer<Float>?>?,
                              _ db: UnsafePointer<UnsafePointer<Float>?>?, _ count: Int32, _ request: UnsafeMutablePointer<Int32>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try begin(o, desc, gw, gb, dw, db, count, request) }
}

@c @implementation
public func kfac_cg_begin_f64(_ opt: OpaquePointer?, _ desc: UnsafePointer<kfac_cg_desc>?, _ gw: UnsafePointer<UnsafePointer<Double>?>?,
                              _ gb: UnsafePointer<UnsafePointer<Double>?>?, _ dw: UnsafePointer<UnsafePointer<Double>?>?,
                              _ db: UnsafePointer<UnsafePointer<Double>?>?, _ count: Int32, _ request: UnsafeMutablePointer<Int32>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try begin(o, desc, gw, gb, dw, db, count, request) }
}

@c @implementation
public func kfac_cg_get_vector_f32(_ opt: OpaquePointer?, _ w: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                   _ b: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try vector(o, w, b, count) }
}

@c @implementation
public func kfac_cg_get_vector_f64(_ opt: OpaquePointer?, _ w: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                                   _ b: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try vector(o, w, b, count) }
}

@c @implementation
public func kfac_cg_supply_product_f32(_ opt: OpaquePointer?, _ w: UnsafePointer<UnsafePointer<Float>?>?,
                                       _ b: UnsafePointer<UnsafePointer<Float>?>?, _ count: Int32,
                                       _ request: UnsafeMutablePointer<Int32>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try supply(o, w, b, count, request) }
}

@c @implementation
public func kfac_cg_supply_product_f64(_ opt: OpaquePointer?, _ w: UnsafePointer<UnsafePointer<Double>?>?,
                                       _ b: UnsafePointer<UnsafePointer<Double>?>?, _ count: Int32,
                                       _ request: UnsafeMutablePointer<Int32>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try supply(o, w, b, count, request) }
}

@c @implementation
public func kfac_cg_finish_f32(_ opt: OpaquePointer?, _ w: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                               _ b: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32,
                               _ result: UnsafeMutablePointer<kfac_cg_result>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try finish(o, w, b, count, result) }
}

@c @implementation
public func kfac_cg_finish_f64(_ opt: OpaquePointer?, _ w: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                               _ b: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32,
                               _ result: UnsafeMutablePointer<kfac_cg_result>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try finish(o, w, b, count, result) }
}

@c @implementation
public func kfac_cg_report_loss_change(_ opt: OpaquePointer?, _ scale: Double, _ before: Double, _ after: Double,
                                       _ rho: UnsafeMutablePointer<Double>?) -> Int32 {
    withHandle(opt) { (h) throws(KFACError) in
        let r: Double
        switch h.engine {
        case .float32(let o): r = try o.reportNewtonLossChange(stepScale: scale, before: before, after: after)
        case .float64(let o): r = try o.reportNewtonLossChange(stepScale: scale, before: before, after: after)
        }
        rho?.pointee = r
    }
}

@c @implementation
public func kfac_cg_solve_f32(_ opt: OpaquePointer?, _ desc: UnsafePointer<kfac_cg_desc>?, _ gw: UnsafePointer<UnsafePointer<Float>?>?,
                              _ gb: UnsafePointer<UnsafePointer<Float>?>?, _ dw: UnsafePointer<UnsafePointer<Float>?>?,
                              _ db: UnsafePointer<UnsafePointer<Float>?>?, _ product: kfac_cg_product_fn_f32?, _ user: UnsafeMutableRawPointer?,
                              _ sw: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ sb: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                              _ count: Int32, _ result: UnsafeMutablePointer<kfac_cg_result>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        let fn = try required(product, "product")
        try solve(o, desc, gw, gb, dw, db, count, result, sw, sb) { vw, vb, pw, pb in fn(user, vw, vb, pw, pb, count) }
    }
}

@c @implementation
public func kfac_cg_solve_f64(_ opt: OpaquePointer?, _ desc: UnsafePointer<kfac_cg_desc>?, _ gw: UnsafePointer<UnsafePointer<Double>?>?,
                              _ gb: UnsafePointer<UnsafePointer<Double>?>?, _ dw: UnsafePointer<UnsafePointer<Double>?>?,
                              _ db: UnsafePointer<UnsafePointer<Double>?>?, _ product: kfac_cg_product_fn_f64?, _ user: UnsafeMutableRawPointer?,
                              _ sw: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ sb: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                              _ count: Int32, _ result: UnsafeMutablePointer<kfac_cg_result>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        let fn = try required(product, "product")
        try solve(o, desc, gw, gb, dw, db, count, result, sw, sb) { vw, vb, pw, pb in fn(user, vw, vb, pw, pb, count) }
    }
}
