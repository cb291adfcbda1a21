/// Appends little-endian values to a caller buffer (or only counts them when it has none).
struct StateWriter {
    let buffer: UnsafeMutableRawBufferPointer?
    private(set) var offset = 0

    init(_ buffer: UnsafeMutableRawBufferPointer?) { self.buffer = buffer }

    mutating func bytes(_ p: UnsafeRawPointer, count: Int) {
        if let buffer { (buffer.baseAddress! + offset).copyMemory(from: p, byteCount: count) }
        offset += count
    }
    mutating func u64(_ v: UInt64) { var x = v.littleEndian; bytes(&x, count: 8) }
    mutating func i64(_ v: Int) { u64(UInt64(bitPattern: Int64(v))) }
    mutating func f64(_ v: Double) { u64(v.bitPattern) }
    mutating func scalars<S: KFACScalar>(_ p: UnsafePointer<S>, count: Int) {
        bytes(p, count: count * MemoryLayout<S>.stride)
    }
}

/// Reads little-endian values back, throwing `.corruptState` past the end.
struct StateReader {
    let buffer: UnsafeRawBufferPointer
    private(set) var offset = 0

    init(_ buffer: UnsafeRawBufferPointer) { self.buffer = buffer }

    /// Throws `.corruptState` unless `count` scalars of `S` (each of `values` numbers) are still
    /// in the image: checked before allocating room for them, so that a small crafted image
    /// cannot make the loader allocate (and touch) gigabytes it then fails to fill.
    func ensureRemaining<S: KFACScalar>(_ count: Int, of _: S.Type, values: Int = 1) throws(KFACError) {
        let (perItem, o1) = values.multipliedReportingOverflow(by: MemoryLayout<S>.stride)
        let (bytes, o2) = count.multipliedReportingOverflow(by: perItem)
        guard count >= 0, values >= 0, !o1, !o2, bytes <= buffer.count - offset else {
            throw KFACError(.corruptState, "state image is truncated at byte \(offset)")
        }
    }

    mutating func take(_ count: Int) throws(KFACError) -> UnsafeRawPointer {
        guard count >= 0, count <= buffer.count - offset else {
            throw KFACError(.corruptState, "state image is truncated at byte \(offset)")
        }
        defer { offset += count }
        return buffer.baseAddress! + offset
    }
    mutating func u64() throws(KFACError) -> UInt64 { UInt64(littleEndian: try take(8).loadUnaligned(as: UInt64.self)) }
    mutating func i64() throws(KFACError) -> Int { Int(Int64(bitPattern: try u64())) }
    mutating func f64() throws(KFACError) -> Double { Double(bitPattern: try u64()) }
    mutating func flag() throws(KFACError) -> Bool {
        let v = try u64()
        guard v <= 1 else { throw KFACError(.corruptState, "state image has a bad flag at byte \(offset - 8)") }
        return v == 1
    }
    /// Copies `count` scalars into `destination`.
    mutating func scalars<S: KFACScalar>(into destination: UnsafeMutablePointer<S>, count: Int) throws(KFACError) {
        let (bytes, overflow) = count.multipliedReportingOverflow(by: MemoryLayout<S>.stride)
        guard !overflow else { throw KFACError(.corruptState, "state image has an impossible size") }
        UnsafeMutableRawPointer(destination).copyMemory(from: try take(bytes), byteCount: bytes)
    }
}
