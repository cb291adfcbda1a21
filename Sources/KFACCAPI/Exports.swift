// The @_cdecl functions of include/kfac.h. Each one only validates its C arguments and translates
// them to the Swift API (KFACOptimizer); the semantics are documented in the header.

import KFAC

#if canImport(Glibc)
import Glibc
#endif

private let versionString: StaticString = "0.1.0"

@_cdecl("kfac_version_number")
public func kfac_version_number() -> UInt32 { 100 }

@_cdecl("kfac_version_string")
public func kfac_version_string() -> UnsafePointer<CChar> {
    UnsafeRawPointer(versionString.utf8Start).assumingMemoryBound(to: CChar.self)
}

@_cdecl("kfac_status_string")
public func kfac_status_string(_ status: Int32) -> UnsafePointer<CChar> {
    let text: StaticString = KFACStatus(rawValue: status)?.staticDescription ?? "unknown status code"
    return UnsafeRawPointer(text.utf8Start).assumingMemoryBound(to: CChar.self)
}

// MARK: Handles

@_cdecl("kfac_optimizer_create")
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

@_cdecl("kfac_optimizer_free")
public func kfac_optimizer_free(_ opt: OpaquePointer?) {
    guard let opt else { return }
    Unmanaged<OptimizerHandle>.fromOpaque(UnsafeRawPointer(opt)).release()
}

private let nullHandleMessage: StaticString = "the kfac_optimizer handle is NULL"

@_cdecl("kfac_last_error")
public func kfac_last_error(_ opt: OpaquePointer?) -> UnsafePointer<CChar> {
    guard let opt else { return UnsafeRawPointer(nullHandleMessage.utf8Start).assumingMemoryBound(to: CChar.self) }
    return OptimizerHandle.from(opt).lastError
}

@_cdecl("kfac_dtype_of")
public func kfac_dtype_of(_ opt: OpaquePointer?) -> Int32 {
    guard let opt else { return KFACStatus.nullPointer.rawValue }
    return OptimizerHandle.from(opt).dtypeCode
}

// MARK: Parameters

@_cdecl("kfac_set_param_double")
public func kfac_set_param_double(_ opt: OpaquePointer?, _ param: Int32, _ value: Double) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.set(try parameter(param), value) }
}

@_cdecl("kfac_get_param_double")
public func kfac_get_param_double(_ opt: OpaquePointer?, _ param: Int32, _ value: UnsafeMutablePointer<Double>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let v = try o.parameters.double(try parameter(param))
        try required(value, "value").pointee = v
    }
}

@_cdecl("kfac_set_param_int")
public func kfac_set_param_int(_ opt: OpaquePointer?, _ param: Int32, _ value: Int64) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.set(try parameter(param), value) }
}

@_cdecl("kfac_get_param_int")
public func kfac_get_param_int(_ opt: OpaquePointer?, _ param: Int32, _ value: UnsafeMutablePointer<Int64>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let v = try o.parameters.int(try parameter(param))
        try required(value, "value").pointee = v
    }
}

// MARK: Layers

@_cdecl("kfac_add_dense")
public func kfac_add_dense(_ opt: OpaquePointer?, _ inFeatures: Int64, _ outFeatures: Int64, _ hasBias: Int32,
                           _ layerID: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let out = try required(layerID, "layer_id")
        guard hasBias == 0 || hasBias == 1 else { throw KFACError(.invalidArgument, "has_bias must be 0 or 1, got \(hasBias)") }
        out.pointee = Int32(try o.addDense(inFeatures: Int(inFeatures), outFeatures: Int(outFeatures), hasBias: hasBias == 1,
                                           grouping: ChannelGrouping()))
    }
}

@_cdecl("kfac_add_dense_grouped")
public func kfac_add_dense_grouped(_ opt: OpaquePointer?, _ inFeatures: Int64, _ outFeatures: Int64, _ hasBias: Int32,
                                   _ inputGroupSize: Int64, _ outputGroupSize: Int64,
                                   _ layerID: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let out = try required(layerID, "layer_id")
        guard hasBias == 0 || hasBias == 1 else { throw KFACError(.invalidArgument, "has_bias must be 0 or 1, got \(hasBias)") }
        let grouping = ChannelGrouping(inputGroupSize: Int(inputGroupSize), outputGroupSize: Int(outputGroupSize))
        out.pointee = Int32(try o.addDense(inFeatures: Int(inFeatures), outFeatures: Int(outFeatures), hasBias: hasBias == 1,
                                           grouping: grouping))
    }
}

@_cdecl("kfac_add_conv2d")
public func kfac_add_conv2d(_ opt: OpaquePointer?, _ desc: UnsafeRawPointer?, _ layerID: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let raw = try required(desc, "desc")
        let out = try required(layerID, "layer_id")
        let size = raw.load(as: Int.self)
        let minimum = MemoryLayout<CConv2dDescription>.offset(of: \.inputGroupSize)!
        guard size >= minimum else {
            throw KFACError(.invalidSize, "desc->struct_size \(size) is smaller than \(minimum) (all fields up to reserved)")
        }
        // Copy what the caller's struct holds; newer fields it lacks stay 0.
        var d = CConv2dDescription(structSize: 0, inChannels: 0, outChannels: 0, kernelHeight: 0, kernelWidth: 0,
                                   strideHeight: 0, strideWidth: 0, paddingHeight: 0, paddingWidth: 0,
                                   dilationHeight: 0, dilationWidth: 0, groups: 0, inputHeight: 0, inputWidth: 0,
                                   hasBias: 0, layout: 0, approximation: 0, reserved: 0, inputGroupSize: 0, outputGroupSize: 0)
        withUnsafeMutableBytes(of: &d) { $0.baseAddress!.copyMemory(from: raw, byteCount: min(size, MemoryLayout<CConv2dDescription>.size)) }
        guard d.hasBias == 0 || d.hasBias == 1 else { throw KFACError(.invalidArgument, "has_bias must be 0 or 1, got \(d.hasBias)") }
        guard let layout = TensorLayout(rawValue: d.layout) else { throw KFACError(.invalidArgument, "unknown layout \(d.layout)") }
        guard let approximation = ConvApproximation(rawValue: d.approximation) else {
            throw KFACError(.invalidArgument, "unknown approximation \(d.approximation)")
        }
        guard d.reserved == 0 else { throw KFACError(.invalidArgument, "reserved must be 0") }
        func orOne(_ v: Int64) -> Int { v == 0 ? 1 : Int(v) }
        let geometry = Conv2dGeometry(inChannels: Int(d.inChannels), outChannels: Int(d.outChannels),
                                      kernel: (Int(d.kernelHeight), Int(d.kernelWidth)),
                                      stride: (orOne(d.strideHeight), orOne(d.strideWidth)),
                                      padding: (Int(d.paddingHeight), Int(d.paddingWidth)),
                                      dilation: (orOne(d.dilationHeight), orOne(d.dilationWidth)),
                                      groups: orOne(d.groups), hasBias: d.hasBias == 1,
                                      input: (Int(d.inputHeight), Int(d.inputWidth)), layout: layout)
        let grouping = ChannelGrouping(inputGroupSize: Int(d.inputGroupSize), outputGroupSize: Int(d.outputGroupSize))
        out.pointee = Int32(try o.addConv2d(geometry, approximation: approximation, grouping: grouping))
    }
}

@_cdecl("kfac_layer_count")
public func kfac_layer_count(_ opt: OpaquePointer?) -> Int32 {
    var count: Int32 = 0
    let status = withAnyOptimizer(opt) { o in count = Int32(o.layerCount) }
    return status == 0 ? count : status
}

/// Mirrors `kfac_layer_info`; the C layout is fixed by the header.
struct CLayerInfo {
    var structSize: Int
    var kind: Int32
    var hasBias: Int32
    var inFeatures: Int64
    var outFeatures: Int64
    var aDim: Int64
    var gDim: Int64
    var hasFactors: Int32
    var hasInverses: Int32
    var groups: Int64
}

/// Mirrors `kfac_conv2d_desc`; the C layout is fixed by the header.
struct CConv2dDescription {
    var structSize: Int
    var inChannels: Int64
    var outChannels: Int64
    var kernelHeight: Int64, kernelWidth: Int64
    var strideHeight: Int64, strideWidth: Int64
    var paddingHeight: Int64, paddingWidth: Int64
    var dilationHeight: Int64, dilationWidth: Int64
    var groups: Int64
    var inputHeight: Int64, inputWidth: Int64
    var hasBias: Int32
    var layout: Int32
    var approximation: Int32
    var reserved: Int32
    var inputGroupSize: Int64
    var outputGroupSize: Int64
}

@_cdecl("kfac_layer_get_info")
public func kfac_layer_get_info(_ opt: OpaquePointer?, _ layer: Int32, _ info: UnsafeMutableRawPointer?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let out = try required(info, "info")
        let size = out.load(as: Int.self)
        // The ends of the fields, in order: only whole fields are written.
        let fieldEnds = [\CLayerInfo.kind, \.hasBias, \.inFeatures, \.outFeatures, \.aDim, \.gDim, \.hasFactors,
                         \.hasInverses, \.groups]
            .map { MemoryLayout<CLayerInfo>.offset(of: $0)! } + [MemoryLayout<CLayerInfo>.size]
        let minimum = MemoryLayout<CLayerInfo>.offset(of: \.hasBias)!
        guard size >= minimum else {
            throw KFACError(.invalidSize, "info->struct_size \(size) is smaller than \(minimum) (struct_size and kind)")
        }
        let filled = fieldEnds.last { $0 <= size }!
        let i = try o.layerInfo(Int(layer))
        var full = CLayerInfo(structSize: filled, kind: i.layer.kind.rawValue,
                              hasBias: i.layer.hasBias ? 1 : 0,
                              inFeatures: Int64(i.layer.inFeatures), outFeatures: Int64(i.layer.outFeatures),
                              aDim: Int64(i.layer.inputFactorDimension), gDim: Int64(i.layer.outputFactorDimension),
                              hasFactors: i.hasFactors ? 1 : 0, hasInverses: i.hasInverses ? 1 : 0,
                              groups: Int64(i.layer.groups))
        // Fill only what fits in the caller's (possibly older, smaller) struct.
        withUnsafeBytes(of: &full) { bytes in
            out.copyMemory(from: bytes.baseAddress!, byteCount: filled)
        }
    }
}

// MARK: Statistics

@_cdecl("kfac_wants_statistics")
public func kfac_wants_statistics(_ opt: OpaquePointer?) -> Int32 {
    var wants = false
    let status = withAnyOptimizer(opt) { o in wants = o.wantsStatistics }
    return status == 0 ? (wants ? 1 : 0) : status
}

@_cdecl("kfac_record_inputs_f32")
public func kfac_record_inputs_f32(_ opt: OpaquePointer?, _ layer: Int32, _ inputs: UnsafePointer<Float>?, _ rows: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.recordInputs(layer: Int(layer), inputs, rows: Int(rows)) }
}

@_cdecl("kfac_record_inputs_f64")
public func kfac_record_inputs_f64(_ opt: OpaquePointer?, _ layer: Int32, _ inputs: UnsafePointer<Double>?, _ rows: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.recordInputs(layer: Int(layer), inputs, rows: Int(rows)) }
}

@_cdecl("kfac_record_output_grads_f32")
public func kfac_record_output_grads_f32(_ opt: OpaquePointer?, _ layer: Int32, _ grads: UnsafePointer<Float>?, _ rows: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.recordOutputGradients(layer: Int(layer), grads, rows: Int(rows)) }
}

@_cdecl("kfac_record_output_grads_f64")
public func kfac_record_output_grads_f64(_ opt: OpaquePointer?, _ layer: Int32, _ grads: UnsafePointer<Double>?, _ rows: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.recordOutputGradients(layer: Int(layer), grads, rows: Int(rows)) }
}

@_cdecl("kfac_update_factors")
public func kfac_update_factors(_ opt: OpaquePointer?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.updateFactors() }
}

@_cdecl("kfac_update_inverses")
public func kfac_update_inverses(_ opt: OpaquePointer?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.updateInverses() }
}

@_cdecl("kfac_get_factors_f32")
public func kfac_get_factors_f32(_ opt: OpaquePointer?, _ layer: Int32, _ a: UnsafeMutablePointer<Float>?, _ g: UnsafeMutablePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.copyFactors(layer: Int(layer), a: a, g: g) }
}

@_cdecl("kfac_get_factors_f64")
public func kfac_get_factors_f64(_ opt: OpaquePointer?, _ layer: Int32, _ a: UnsafeMutablePointer<Double>?, _ g: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.copyFactors(layer: Int(layer), a: a, g: g) }
}

@_cdecl("kfac_get_group_factors_f32")
public func kfac_get_group_factors_f32(_ opt: OpaquePointer?, _ layer: Int32, _ group: Int32,
                                       _ a: UnsafeMutablePointer<Float>?, _ g: UnsafeMutablePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.copyFactors(layer: Int(layer), group: Int(group), a: a, g: g) }
}

@_cdecl("kfac_get_group_factors_f64")
public func kfac_get_group_factors_f64(_ opt: OpaquePointer?, _ layer: Int32, _ group: Int32,
                                       _ a: UnsafeMutablePointer<Double>?, _ g: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.copyFactors(layer: Int(layer), group: Int(group), a: a, g: g) }
}

// MARK: Preconditioning

/// Validates per-layer pointer arrays (kfac_step_*, kfac_candidate_directions_*,
/// kfac_get_update_*) and runs `body` with them; bias rules are the optimizer's to check.
private func withLayerBuffers<S: KFACScalar>(
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

@_cdecl("kfac_step_f32")
public func kfac_step_f32(_ opt: OpaquePointer?, _ weights: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                          _ biases: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try step(o, weights, biases, count) }
}

@_cdecl("kfac_step_f64")
public func kfac_step_f64(_ opt: OpaquePointer?, _ weights: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                          _ biases: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try step(o, weights, biases, count) }
}

@_cdecl("kfac_precondition_f32")
public func kfac_precondition_f32(_ opt: OpaquePointer?, _ layer: Int32, _ weight: UnsafeMutablePointer<Float>?,
                                  _ bias: UnsafeMutablePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try o.precondition(layer: Int(layer), weight: try required(weight, "weight_grad"), bias: bias)
    }
}

@_cdecl("kfac_precondition_f64")
public func kfac_precondition_f64(_ opt: OpaquePointer?, _ layer: Int32, _ weight: UnsafeMutablePointer<Double>?,
                                  _ bias: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try o.precondition(layer: Int(layer), weight: try required(weight, "weight_grad"), bias: bias)
    }
}

@_cdecl("kfac_step_count")
public func kfac_step_count(_ opt: OpaquePointer?) -> Int64 {
    var count = 0
    let status = withAnyOptimizer(opt) { o in count = o.stepCount }
    return status == 0 ? Int64(count) : Int64(status)
}

@_cdecl("kfac_last_kl_scale")
public func kfac_last_kl_scale(_ opt: OpaquePointer?) -> Double {
    var scale = Double.nan
    _ = withAnyOptimizer(opt) { o in scale = o.lastKLScale }
    return scale
}

// MARK: State

@_cdecl("kfac_state_size")
public func kfac_state_size(_ opt: OpaquePointer?, _ size: UnsafeMutablePointer<Int>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try required(size, "size").pointee = o.stateSize }
}

@_cdecl("kfac_save_state")
public func kfac_save_state(_ opt: OpaquePointer?, _ buffer: UnsafeMutableRawPointer?, _ capacity: Int,
                            _ written: UnsafeMutablePointer<Int>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let base = try required(buffer, "buffer")
        let out = try required(written, "written")
        guard capacity >= 0 else { throw KFACError(.invalidSize, "capacity does not fit in a signed size") }
        out.pointee = try o.saveState(into: UnsafeMutableRawBufferPointer(start: base, count: capacity))
    }
}

@_cdecl("kfac_load_state")
public func kfac_load_state(_ opt: OpaquePointer?, _ buffer: UnsafeRawPointer?, _ size: Int) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let base = try required(buffer, "buffer")
        guard size >= 0 else { throw KFACError(.invalidSize, "size does not fit in a signed size") }
        try o.loadState(from: UnsafeRawBufferPointer(start: base, count: size))
    }
}

@_cdecl("kfac_save_state_file")
public func kfac_save_state_file(_ opt: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.saveState(toFile: String(cString: try required(path, "path"))) }
}

@_cdecl("kfac_load_state_file")
public func kfac_load_state_file(_ opt: OpaquePointer?, _ path: UnsafePointer<CChar>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.loadState(fromFile: String(cString: try required(path, "path"))) }
}

// MARK: Adaptive mode

/// A `OutputDistribution` from its C number, or `KFAC_ERROR_INVALID_ARGUMENT`.
private func distribution(_ raw: Int32) throws(KFACError) -> OutputDistribution {
    guard let d = OutputDistribution(rawValue: raw) else { throw KFACError(.invalidArgument, "unknown distribution \(raw)") }
    return d
}

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

@_cdecl("kfac_solve_step_size_f32")
public func kfac_solve_step_size_f32(_ opt: OpaquePointer?, _ outputs: UnsafePointer<Float>?, _ direction: UnsafePointer<Float>?,
                                     _ previous: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                     _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?,
                                     _ predicted: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try solveStepSize(o, outputs, direction, previous, rows, dim, dist, alpha, mu, predicted)
    }
}

@_cdecl("kfac_solve_step_size_f64")
public func kfac_solve_step_size_f64(_ opt: OpaquePointer?, _ outputs: UnsafePointer<Double>?, _ direction: UnsafePointer<Double>?,
                                     _ previous: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                     _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?,
                                     _ predicted: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try solveStepSize(o, outputs, direction, previous, rows, dim, dist, alpha, mu, predicted)
    }
}

@_cdecl("kfac_candidate_count")
public func kfac_candidate_count(_ opt: OpaquePointer?, _ count: UnsafeMutablePointer<Int32>?) -> Int32 {
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

@_cdecl("kfac_candidate_directions_f32")
public func kfac_candidate_directions_f32(_ opt: OpaquePointer?, _ candidate: Int32, _ weights: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                          _ biases: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32,
                                          _ damping: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try candidateDirections(o, candidate, weights, biases, count, damping) }
}

@_cdecl("kfac_candidate_directions_f64")
public func kfac_candidate_directions_f64(_ opt: OpaquePointer?, _ candidate: Int32, _ weights: UnsafePointer<UnsafeMutablePointer<Double>?>?,
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

@_cdecl("kfac_solve_step_size_candidates_f32")
public func kfac_solve_step_size_candidates_f32(
    _ opt: OpaquePointer?, _ outputs: UnsafePointer<Float>?, _ products: UnsafePointer<UnsafePointer<Float>?>?, _ count: Int32,
    _ previous: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ chosen: UnsafeMutablePointer<Int32>?,
    _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?, _ predicted: UnsafeMutablePointer<Double>?
) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try solveCandidates(o, outputs, products, count, previous, rows, dim, dist, chosen, alpha, mu, predicted)
    }
}

@_cdecl("kfac_solve_step_size_candidates_f64")
public func kfac_solve_step_size_candidates_f64(
    _ opt: OpaquePointer?, _ outputs: UnsafePointer<Double>?, _ products: UnsafePointer<UnsafePointer<Double>?>?, _ count: Int32,
    _ previous: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ chosen: UnsafeMutablePointer<Int32>?,
    _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?, _ predicted: UnsafeMutablePointer<Double>?
) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try solveCandidates(o, outputs, products, count, previous, rows, dim, dist, chosen, alpha, mu, predicted)
    }
}

@_cdecl("kfac_get_update_f32")
public func kfac_get_update_f32(_ opt: OpaquePointer?, _ weights: UnsafePointer<UnsafeMutablePointer<Float>?>?,
                                _ biases: UnsafePointer<UnsafeMutablePointer<Float>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try withLayerBuffers(o, weights, biases, count, "weight_updates") { (buffers) throws(KFACError) in try o.copyUpdate(into: buffers) }
    }
}

@_cdecl("kfac_get_update_f64")
public func kfac_get_update_f64(_ opt: OpaquePointer?, _ weights: UnsafePointer<UnsafeMutablePointer<Double>?>?,
                                _ biases: UnsafePointer<UnsafeMutablePointer<Double>?>?, _ count: Int32) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try withLayerBuffers(o, weights, biases, count, "weight_updates") { (buffers) throws(KFACError) in try o.copyUpdate(into: buffers) }
    }
}

@_cdecl("kfac_report_loss_change")
public func kfac_report_loss_change(_ opt: OpaquePointer?, _ before: Double, _ after: Double,
                                    _ rho: UnsafeMutablePointer<Double>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let r = try o.reportLossChange(before: before, after: after)
        rho?.pointee = r
    }
}

@_cdecl("kfac_last_reduction_ratio")
public func kfac_last_reduction_ratio(_ opt: OpaquePointer?) -> Double {
    var ratio = Double.nan
    _ = withAnyOptimizer(opt) { o in ratio = o.lastReductionRatio }
    return ratio
}

/// Validates the arguments of the handle-less samplers and runs one.
private func sample<S: KFACScalar>(
    _ outputs: UnsafePointer<S>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ out: UnsafeMutablePointer<S>?,
    _ body: (OutputDistribution, UnsafePointer<S>, Int, Int, UnsafeMutablePointer<S>) -> Void
) -> Int32 {
    do throws(KFACError) {
        let z = try required(outputs, "outputs"), o = try required(out, "out")
        guard rows >= 1, dim >= 1 else { throw KFACError(.invalidSize, "rows and output_dim must be >= 1") }
        let (count, overflow) = Int(rows).multipliedReportingOverflow(by: Int(dim))
        guard !overflow else { throw KFACError(.sizeOverflow, "rows × output_dim overflows") }
        let d = try distribution(dist)
        guard S.allFinite(z, count: count) else { throw KFACError(.nonFinite, "outputs contain NaN or Inf") }
        body(d, z, Int(rows), Int(dim), o)
        return KFACStatus.ok.rawValue
    } catch {
        return error.status.rawValue
    }
}

@_cdecl("kfac_sample_targets_f32")
public func kfac_sample_targets_f32(_ outputs: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                    _ seed: UInt64, _ targets: UnsafeMutablePointer<Float>?) -> Int32 {
    sample(outputs, rows, dim, dist, targets) { d, z, r, c, o in
        TargetSampler.sampleTargets(distribution: d, outputs: z, rows: r, dim: c, seed: seed, into: o)
    }
}

@_cdecl("kfac_sample_targets_f64")
public func kfac_sample_targets_f64(_ outputs: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                    _ seed: UInt64, _ targets: UnsafeMutablePointer<Double>?) -> Int32 {
    sample(outputs, rows, dim, dist, targets) { d, z, r, c, o in
        TargetSampler.sampleTargets(distribution: d, outputs: z, rows: r, dim: c, seed: seed, into: o)
    }
}

@_cdecl("kfac_sampled_output_grads_f32")
public func kfac_sampled_output_grads_f32(_ outputs: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                          _ seed: UInt64, _ grads: UnsafeMutablePointer<Float>?) -> Int32 {
    sample(outputs, rows, dim, dist, grads) { d, z, r, c, o in
        TargetSampler.sampledOutputGradients(distribution: d, outputs: z, rows: r, dim: c, seed: seed, into: o)
    }
}

@_cdecl("kfac_sampled_output_grads_f64")
public func kfac_sampled_output_grads_f64(_ outputs: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32,
                                          _ seed: UInt64, _ grads: UnsafeMutablePointer<Double>?) -> Int32 {
    sample(outputs, rows, dim, dist, grads) { d, z, r, c, o in
        TargetSampler.sampledOutputGradients(distribution: d, outputs: z, rows: r, dim: c, seed: seed, into: o)
    }
}
