import KFAC
import _KFACHeader

/// A `ParameterID` from its C number, or `KFAC_ERROR_UNKNOWN_PARAMETER`.
func parameter(_ raw: Int32) throws(KFACError) -> ParameterID {
    guard let p = ParameterID(rawValue: raw) else {
        throw KFACError(.unknownParameter, "unknown parameter \(raw)")
    }
    return p
}

/// An `OutputDistribution` from its C number, or `KFAC_ERROR_INVALID_ARGUMENT`.
func distribution(_ raw: Int32) throws(KFACError) -> OutputDistribution {
    guard let d = OutputDistribution(rawValue: raw) else { throw KFACError(.invalidArgument, "unknown distribution \(raw)") }
    return d
}

/// A non-NULL pointer argument, or `KFAC_ERROR_NULL_POINTER` naming it.
func required<T>(_ p: T?, _ name: StaticString) throws(KFACError) -> T {
    guard let p else { throw KFACError(.nullPointer, "\(name) is NULL") }
    return p
}

/// Reads a growable input struct (its first field is `struct_size`): at least `minimum` bytes
/// must be given; fields past the caller's struct_size (an older, smaller struct) read as the
/// zero value `empty` has.
func readGrowable<T>(_ p: UnsafePointer<T>?, _ name: StaticString, minimum: Int, empty: T) throws(KFACError) -> T {
    let raw = UnsafeRawPointer(try required(p, name))
    let size = raw.load(as: Int.self)
    guard size >= minimum else {
        throw KFACError(.invalidSize, "\(name)->struct_size \(size) is smaller than \(minimum)")
    }
    var value = empty
    withUnsafeMutableBytes(of: &value) { $0.baseAddress!.copyMemory(from: raw, byteCount: Swift.min(size, MemoryLayout<T>.size)) }
    return value
}

/// Writes a growable output struct: only the whole fields (ending at `fieldEnds`, ascending)
/// that fit in the caller's struct_size, which is set to the bytes filled. At least `minimum`
/// bytes must be given.
func writeGrowable<T>(_ value: T, to p: UnsafeMutablePointer<T>?, _ name: StaticString, minimum: Int,
                      fieldEnds: [Int]) throws(KFACError) {
    let raw = UnsafeMutableRawPointer(try required(p, name))
    let size = raw.load(as: Int.self)
    guard size >= minimum else {
        throw KFACError(.invalidSize, "\(name)->struct_size \(size) is smaller than \(minimum)")
    }
    let filled = (fieldEnds + [MemoryLayout<T>.size]).last { $0 <= size }!
    var full = value
    withUnsafeMutableBytes(of: &full) { bytes in
        bytes.storeBytes(of: filled, toByteOffset: 0, as: Int.self)
        raw.copyMemory(from: bytes.baseAddress!, byteCount: filled)
    }
}

/// A C boolean flag argument: 0 or 1, else `KFAC_ERROR_INVALID_ARGUMENT` naming it.
func flag(_ value: Int32, _ name: StaticString) throws(KFACError) -> Bool {
    guard value == 0 || value == 1 else { throw KFACError(.invalidArgument, "\(name) must be 0 or 1, got \(value)") }
    return value == 1
}

/// A static C string.
func cString(_ s: StaticString) -> UnsafePointer<CChar> {
    UnsafeRawPointer(s.utf8Start).assumingMemoryBound(to: CChar.self)
}
