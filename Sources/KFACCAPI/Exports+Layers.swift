// Registration, statistics, factors and per-layer preconditioning: kfac_layer_* of
// include/kfac.h.

import KFAC
import _KFACHeader

/// Channel grouping from a descriptor's group sizes (0 = none), refusing negative sizes.
private func grouping(_ input: Int64, _ output: Int64) -> ChannelGrouping {
    ChannelGrouping(inputGroupSize: Int(input), outputGroupSize: Int(output))
}

@c @implementation
public func kfac_layer_add_dense(_ opt: OpaquePointer?, _ desc: UnsafePointer<kfac_dense_desc>?,
                                 _ layerID: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let d = try readGrowable(desc, "desc", minimum: MemoryLayout<kfac_dense_desc>.offset(of: \.input_group_size)!,
                                 empty: kfac_dense_desc())
        let out = try required(layerID, "layer_id")
        let bias = try flag(d.has_bias, "has_bias")
        guard d.reserved == 0 else { throw KFACError(.invalidArgument, "reserved must be 0") }
        out.pointee = Int32(try o.addDense(inFeatures: Int(d.in_features), outFeatures: Int(d.out_features), hasBias: bias,
                                           grouping: grouping(d.input_group_size, d.output_group_size)))
    }
}

@c @implementation
public func kfac_layer_add_conv2d(_ opt: OpaquePointer?, _ desc: UnsafePointer<kfac_conv2d_desc>?,
                                  _ layerID: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let d = try readGrowable(desc, "desc", minimum: MemoryLayout<kfac_conv2d_desc>.offset(of: \.input_group_size)!,
                                 empty: kfac_conv2d_desc())
        let out = try required(layerID, "layer_id")
        let bias = try flag(d.has_bias, "has_bias")
        guard let layout = TensorLayout(rawValue: d.layout) else { throw KFACError(.invalidArgument, "unknown layout \(d.layout)") }
        guard let approximation = ConvApproximation(rawValue: d.approximation) else {
            throw KFACError(.invalidArgument, "unknown approximation \(d.approximation)")
        }
        guard d.reserved == 0 else { throw KFACError(.invalidArgument, "reserved must be 0") }
        func orOne(_ v: Int64) -> Int { v == 0 ? 1 : Int(v) }
        let geometry = Conv2dGeometry(inChannels: Int(d.in_channels), outChannels: Int(d.out_channels),
                                      kernel: (Int(d.kernel_h), Int(d.kernel_w)),
                                      stride: (orOne(d.stride_h), orOne(d.stride_w)),
                                      padding: (Int(d.padding_h), Int(d.padding_w)),
                                      dilation: (orOne(d.dilation_h), orOne(d.dilation_w)),
                                      groups: orOne(d.groups), hasBias: bias,
                                      input: (Int(d.input_h), Int(d.input_w)), layout: layout)
        out.pointee = Int32(try o.addConv2d(geometry, approximation: approximation,
                                            grouping: grouping(d.input_group_size, d.output_group_size)))
    }
}

@c @implementation
public func kfac_layer_count(_ opt: OpaquePointer?, _ count: UnsafeMutablePointer<Int32>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try required(count, "count").pointee = Int32(o.layerCount) }
}

@c @implementation
public func kfac_layer_get_info(_ opt: OpaquePointer?, _ layer: Int32, _ info: UnsafeMutablePointer<kfac_layer_info>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        _ = try required(info, "info")
        let minimum = MemoryLayout<kfac_layer_info>.offset(of: \.has_bias)!
        guard UnsafeRawPointer(info!).load(as: Int.self) >= minimum else {
            throw KFACError(.invalidSize, "info->struct_size \(UnsafeRawPointer(info!).load(as: Int.self)) is smaller than \(minimum) (struct_size and kind)")
        }
        let i = try o.layerInfo(Int(layer))
        let value = kfac_layer_info(
            struct_size: 0, kind: i.layer.kind.rawValue, has_bias: i.layer.hasBias ? 1 : 0,
            in_features: Int64(i.layer.inFeatures), out_features: Int64(i.layer.outFeatures),
            a_dim: Int64(i.layer.inputFactorDimension), g_dim: Int64(i.layer.outputFactorDimension),
            has_factors: i.hasFactors ? 1 : 0, has_inverses: i.hasInverses ? 1 : 0, groups: Int64(i.layer.groups))
        try writeGrowable(value, to: info, "info", minimum: minimum,
                          fieldEnds: [\kfac_layer_info.kind, \.has_bias, \.in_features, \.out_features, \.a_dim, \.g_dim,
                                      \.has_factors, \.has_inverses, \.groups]
                              .map { MemoryLayout<kfac_layer_info>.offset(of: $0)! })
    }
}

@c @implementation
public func kfac_layer_record_inputs_f32(_ opt: OpaquePointer?, _ layer: Int32, _ inputs: UnsafePointer<Float>?, _ rows: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.recordInputs(layer: Int(layer), inputs, rows: Int(rows)) }
}

@c @implementation
public func kfac_layer_record_inputs_f64(_ opt: OpaquePointer?, _ layer: Int32, _ inputs: UnsafePointer<Double>?, _ rows: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.recordInputs(layer: Int(layer), inputs, rows: Int(rows)) }
}

@c @implementation
public func kfac_layer_record_output_grads_f32(_ opt: OpaquePointer?, _ layer: Int32, _ grads: UnsafePointer<Float>?,
                                               _ rows: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.recordOutputGradients(layer: Int(layer), grads, rows: Int(rows)) }
}

@c @implementation
public func kfac_layer_record_output_grads_f64(_ opt: OpaquePointer?, _ layer: Int32, _ grads: UnsafePointer<Double>?,
                                               _ rows: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.recordOutputGradients(layer: Int(layer), grads, rows: Int(rows)) }
}

@c @implementation
public func kfac_layer_get_factors_f32(_ opt: OpaquePointer?, _ layer: Int32, _ group: Int32,
                                       _ a: UnsafeMutablePointer<Float>?, _ g: UnsafeMutablePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.copyFactors(layer: Int(layer), group: Int(group), a: a, g: g) }
}

@c @implementation
public func kfac_layer_get_factors_f64(_ opt: OpaquePointer?, _ layer: Int32, _ group: Int32,
                                       _ a: UnsafeMutablePointer<Double>?, _ g: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.copyFactors(layer: Int(layer), group: Int(group), a: a, g: g) }
}

@c @implementation
public func kfac_layer_precondition_f32(_ opt: OpaquePointer?, _ layer: Int32, _ weight: UnsafeMutablePointer<Float>?,
                                        _ bias: UnsafeMutablePointer<Float>?) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try o.precondition(layer: Int(layer), weight: try required(weight, "weight_grad"), bias: bias)
    }
}

@c @implementation
public func kfac_layer_precondition_f64(_ opt: OpaquePointer?, _ layer: Int32, _ weight: UnsafeMutablePointer<Double>?,
                                        _ bias: UnsafeMutablePointer<Double>?) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try o.precondition(layer: Int(layer), weight: try required(weight, "weight_grad"), bias: bias)
    }
}
