// The parameter table and the typed getters and setters: kfac_param_* of include/kfac.h.

import KFAC
import _KFACHeader

@c @implementation
public func kfac_param_get_info(_ param: Int32, _ info: UnsafeMutablePointer<kfac_param_info>?) -> Int32 {
    do throws(KFACError) {
        let spec = try parameter(param).spec
        let value = kfac_param_info(
            struct_size: MemoryLayout<kfac_param_info>.size, name: cString(spec.name),
            type: spec.type.rawValue, family: spec.family.rawValue, lower: spec.lower, upper: spec.upper,
            lower_inclusive: spec.lowerInclusive ? 1 : 0, upper_inclusive: spec.upperInclusive ? 1 : 0,
            default_value: spec.defaultValue, effect: spec.effect.rawValue, reserved: 0)
        try writeGrowable(value, to: info, "info", minimum: MemoryLayout<kfac_param_info>.offset(of: \.type)!,
                          fieldEnds: [\kfac_param_info.name, \.type, \.family, \.lower, \.upper, \.lower_inclusive,
                                      \.upper_inclusive, \.default_value, \.effect, \.reserved]
                              .map { MemoryLayout<kfac_param_info>.offset(of: $0)! })
        return KFACStatus.ok.rawValue
    } catch {
        return error.status.rawValue
    }
}

@c @implementation
public func kfac_param_list(_ params: UnsafeMutablePointer<Int32>?, _ capacity: Int32, _ count: UnsafeMutablePointer<Int32>?) -> Int32 {
    guard let count else { return KFACStatus.nullPointer.rawValue }
    guard capacity >= 0 else { return KFACStatus.invalidSize.rawValue }
    let table = ParameterSpec.table
    if let params {
        for i in 0..<Swift.min(Int(capacity), table.count) { params[i] = table[i].id.rawValue }
    }
    count.pointee = Int32(table.count)
    return KFACStatus.ok.rawValue
}

@c @implementation
public func kfac_param_set_double(_ opt: OpaquePointer?, _ param: Int32, _ value: Double) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.set(try parameter(param), value) }
}

@c @implementation
public func kfac_param_get_double(_ opt: OpaquePointer?, _ param: Int32, _ value: UnsafeMutablePointer<Double>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let v = try o.parameters.double(try parameter(param))
        try required(value, "value").pointee = v
    }
}

@c @implementation
public func kfac_param_set_int(_ opt: OpaquePointer?, _ param: Int32, _ value: Int64) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in try o.set(try parameter(param), value) }
}

@c @implementation
public func kfac_param_get_int(_ opt: OpaquePointer?, _ param: Int32, _ value: UnsafeMutablePointer<Int64>?) -> Int32 {
    withAnyOptimizer(opt) { (o) throws(KFACError) in
        let v = try o.parameters.int(try parameter(param))
        try required(value, "value").pointee = v
    }
}
