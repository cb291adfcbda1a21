#if canImport(Glibc)
import Glibc
#endif

/// The state image: everything an optimizer needs to continue bit for bit.
///
/// Layout (little-endian, all header fields 8 bytes wide):
///
///     "KFACSTAT"  u64 format version  u64 dtype  u64 image size
///     parameters: 8 × f64 (learning rate, damping, decay, KL clip, output-grad scale, LM decay,
///                 factor damping, factor damping decay),
///                 8 × i64 (factor period, inverse period, strategy, π flag, reduction, threads,
///                 LM interval, factor damping period)
///     i64 step count  f64 last ν  u64 has previous update  u64 has prediction  f64 prediction
///     f64 last ρ  i64 loss reports  u64 statistics started  u64 layer count
///     per layer: u64 field count, i64 fields (`LayerDescription.fields`: kind, then its sizes)
///     per layer, per group (curvature): per factor (A then G): u64 has running [block scalars],
///                u64 buffered rows [rows·width scalars], u64 summed rows [block scalars];
///                u64 inverse strategy + 1 (0 = none) [A blocks, A values, G blocks, G values]
///                [previous update, out × in scalars, if there is one]
///     u64 checksum of all preceding bytes
///
/// Factors are stored as their diagonal blocks (`FactorStructure`), each whole and row-major;
/// eigenvalue vectors only for `.eigen`.
enum StateImage {
    static let magic: [UInt8] = Array("KFACSTAT".utf8)
    static let formatVersion: UInt64 = 4
    /// Bytes before the checksum-protected payload that `load` reads to validate the rest.
    static let headerSize = 32

    /// A 64-bit FNV-1a variant over 8-byte words: every step is a bijection of the running
    /// hash, so any change to a single word (or byte) always changes the result.
    static func checksum(_ bytes: UnsafeRawBufferPointer) -> UInt64 {
        var h: UInt64 = 0xcbf2_9ce4_8422_2325
        let prime: UInt64 = 0x0000_0100_0000_01b3
        let words = bytes.count / 8
        for i in 0..<words {
            h = (h ^ bytes.loadUnaligned(fromByteOffset: i * 8, as: UInt64.self)) &* prime
        }
        for i in (words * 8)..<bytes.count { h = (h ^ UInt64(bytes[i])) &* prime }
        return h ^ (h >> 29)
    }
}

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

extension KFACOptimizer {
    private func write(to w: inout StateWriter) {
        let p = parameters
        w.bytes(StateImage.magic, count: 8)
        w.u64(StateImage.formatVersion)
        w.u64(UInt64(Scalar.dtypeCode))
        w.u64(0)  // image size, patched by saveState
        for v in [p.learningRate, p.damping, p.factorDecay, p.klClip, p.outputGradScale, p.lmDecay, p.factorDamping,
                  p.factorDampingDecay] { w.f64(v) }
        for v in [p.factorUpdatePeriod, p.inverseUpdatePeriod, Int(p.inverseStrategy.rawValue),
                  p.piDamping ? 1 : 0, Int(p.lossReduction.rawValue), p.threadCount, p.lmInterval,
                  p.factorDampingPeriod] { w.i64(v) }
        w.i64(stepCount)
        w.f64(lastKLScale)
        w.u64(hasPreviousUpdate ? 1 : 0)
        w.u64(predictedChange == nil ? 0 : 1)
        w.f64(predictedChange ?? 0)
        w.f64(lastReductionRatio)
        w.i64(lossReports)
        w.u64(statisticsStarted ? 1 : 0)
        w.u64(UInt64(blocks.count))
        for b in blocks {
            let fields = b.layer.fields
            w.u64(UInt64(fields.count))
            for f in fields { w.i64(f) }
        }
        for c in curvatures {
            c.input.write(to: &w)
            c.output.write(to: &w)
            if let inv = c.inverse {
                w.u64(UInt64(inv.strategy.rawValue) + 1)
                for side in [inv.input, inv.output] {
                    w.scalars(side.matrix.base, count: side.matrix.count)
                    w.scalars(side.values.base, count: side.values.count)
                }
            } else {
                w.u64(0)
            }
            if hasPreviousUpdate, let previous = c.previousUpdate { w.scalars(previous.base, count: previous.count) }
        }
    }

    /// The number of bytes `saveState` writes now.
    public var stateSize: Int {
        var w = StateWriter(nil)
        write(to: &w)
        return w.offset + 8
    }

    /// Writes the state image into `buffer` and returns its size; throws `.bufferTooSmall`
    /// (writing nothing) if it does not fit.
    public func saveState(into buffer: UnsafeMutableRawBufferPointer) throws(KFACError) -> Int {
        let size = stateSize
        guard buffer.count >= size, let base = buffer.baseAddress else {
            throw KFACError(.bufferTooSmall, "the state image needs \(size) bytes, the buffer has \(buffer.count)")
        }
        var w = StateWriter(UnsafeMutableRawBufferPointer(start: base, count: size))
        write(to: &w)
        (base + 24).storeBytes(of: UInt64(size).littleEndian, as: UInt64.self)
        let sum = StateImage.checksum(UnsafeRawBufferPointer(start: base, count: size - 8))
        w.u64(sum)
        return size
    }

    /// The state image as bytes.
    public func stateImage() throws(KFACError) -> [UInt8] {
        var bytes = [UInt8](repeating: 0, count: stateSize)
        _ = try asKFACError { try bytes.withUnsafeMutableBytes { b in try saveState(into: b) } }
        return bytes
    }

    /// Replaces the optimizer's state with an image from `saveState`. The image must come from
    /// an optimizer of the same precision and layers. On error nothing changes.
    public func loadState(from image: UnsafeRawBufferPointer) throws(KFACError) {
        guard image.count >= StateImage.headerSize + 8, image.baseAddress != nil else {
            throw KFACError(.corruptState, "state image of \(image.count) bytes is too short")
        }
        var r = StateReader(image)
        guard memcmp(try r.take(8), StateImage.magic, 8) == 0 else {
            throw KFACError(.corruptState, "not a libkfac state image (bad magic)")
        }
        let version = try r.u64()
        guard version == StateImage.formatVersion else {
            throw KFACError(.stateVersion, "state image format \(version), this library reads format \(StateImage.formatVersion)")
        }
        let dtype = try r.u64()
        let size = try r.u64()
        guard size == UInt64(image.count) else {
            throw KFACError(.corruptState, "state image says it has \(size) bytes, got \(image.count) (truncated?)")
        }
        let stored = UInt64(littleEndian: (image.baseAddress! + image.count - 8).loadUnaligned(as: UInt64.self))
        guard StateImage.checksum(UnsafeRawBufferPointer(rebasing: image[0..<(image.count - 8)])) == stored else {
            throw KFACError(.corruptState, "state image checksum mismatch (corrupted)")
        }
        guard dtype == UInt64(Scalar.dtypeCode) else {
            throw KFACError(.stateMismatch, "state image precision \(dtype == 1 ? "float32" : "float64") differs from the optimizer's")
        }

        var p = KFACParameters()
        p.learningRate = try r.f64(); p.damping = try r.f64(); p.factorDecay = try r.f64()
        p.klClip = try r.f64(); p.outputGradScale = try r.f64(); p.lmDecay = try r.f64(); p.factorDamping = try r.f64()
        p.factorDampingDecay = try r.f64()
        p.factorUpdatePeriod = try r.i64(); p.inverseUpdatePeriod = try r.i64()
        guard let strategy = InverseStrategy(rawValue: Int32(truncatingIfNeeded: try r.i64())) else {
            throw KFACError(.corruptState, "state image has an unknown inverse strategy")
        }
        p.inverseStrategy = strategy
        p.piDamping = try r.i64() == 1
        guard let reduction = LossReduction(rawValue: Int32(truncatingIfNeeded: try r.i64())) else {
            throw KFACError(.corruptState, "state image has an unknown loss reduction")
        }
        p.lossReduction = reduction
        p.threadCount = try r.i64()
        p.lmInterval = try r.i64()
        p.factorDampingPeriod = try r.i64()
        do { try p.validate() } catch { throw KFACError(.corruptState, "state image parameters: \(error.message)") }
        let steps = try r.i64()
        let klScale = try r.f64()
        let previous = try r.flag()
        let hasPrediction = try r.flag()
        let prediction = try r.f64()
        let reductionRatio = try r.f64()
        let reports = try r.i64()
        let started = try r.flag()
        let count = try r.u64()
        guard count == UInt64(blocks.count) else {
            throw KFACError(.stateMismatch, "state image has \(count) layers, the optimizer \(blocks.count)")
        }
        for (l, b) in blocks.enumerated() {
            let fieldCount = try r.u64()
            guard fieldCount <= 64 else { throw KFACError(.corruptState, "state image has a bad layer description") }
            var fields: [Int] = []
            for _ in 0..<fieldCount { fields.append(try r.i64()) }
            guard fields == b.layer.fields else {
                throw KFACError(.stateMismatch, "state image layer \(l) is \(LayerDescription(fields: fields).map { "\($0)" } ?? "unreadable"), the optimizer's is \(b.layer)")
            }
        }
        // Build fresh blocks from the image; the optimizer's own are replaced only on success.
        var restored: [any CurvatureLayer<Scalar>] = []
        for b in blocks {
            let fresh = try makeBlock(b.layer)
            for c in fresh.curvatures {
                try c.input.read(from: &r)
                try c.output.read(from: &r)
                let tag = try r.u64()
                if tag > 0 {
                    guard let s = InverseStrategy(rawValue: Int32(truncatingIfNeeded: tag - 1)) else {
                        throw KFACError(.corruptState, "state image has an unknown inverse strategy")
                    }
                    let inv = try KroneckerInverse<Scalar>(strategy: s, input: c.input.structure, output: c.output.structure)
                    for side in [inv.input, inv.output] {
                        try r.scalars(into: side.matrix.base, count: side.matrix.count)
                        try r.scalars(into: side.values.base, count: side.values.count)
                        side.finish()
                    }
                    c.restoreInverse(inv)
                }
                if previous {
                    let p = try AlignedBuffer<Scalar>(rows: c.direction.rows, columns: c.direction.columns)
                    try r.scalars(into: p.base, count: p.count)
                    c.previousUpdate = p
                }
            }
            restored.append(fresh)
        }
        guard r.offset == image.count - 8 else {
            throw KFACError(.corruptState, "state image has \(image.count - 8 - r.offset) unexpected trailing bytes")
        }
        blocks = restored
        parameters = p
        stepCount = steps
        lastKLScale = klScale
        hasPreviousUpdate = previous
        predictedChange = hasPrediction ? prediction : nil
        lastReductionRatio = reductionRatio
        lossReports = reports
        directionsAvailable = false
        statisticsStarted = started
    }

    /// Writes the state image to `path` atomically: a temporary file in the same directory,
    /// flushed, then renamed over `path`.
    public func saveState(toFile path: String) throws(KFACError) {
        let image = try stateImage()
        let temporary = "\(path).tmp.\(getpid())"
        let fd = open(temporary, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        guard fd >= 0 else { throw KFACError(.io, "cannot create \(temporary): \(String(cString: strerror(errno)))") }
        var ok = image.withUnsafeBytes { bytes -> Bool in
            var done = 0
            while done < bytes.count {
                let n = Glibc.write(fd, bytes.baseAddress! + done, bytes.count - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return false }
                done += n
            }
            return true
        }
        let reason = ok ? "" : String(cString: strerror(errno))
        ok = ok && fsync(fd) == 0
        close(fd)
        guard ok, rename(temporary, path) == 0 else {
            let why = reason.isEmpty ? String(cString: strerror(errno)) : reason
            unlink(temporary)
            throw KFACError(.io, "cannot write \(path): \(why)")
        }
        // Make the rename itself durable.
        let directory = path.contains("/") ? String(path[..<path.lastIndex(of: "/")!]) : "."
        let dfd = open(directory.isEmpty ? "/" : directory, O_RDONLY | O_CLOEXEC)
        if dfd >= 0 { fsync(dfd); close(dfd) }
    }

    /// Loads a state image written by `saveState(toFile:)`.
    public func loadState(fromFile path: String) throws(KFACError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        guard fd >= 0 else { throw KFACError(.io, "cannot open \(path): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0, st.st_size >= 0 else { throw KFACError(.io, "cannot stat \(path)") }
        var bytes = [UInt8](repeating: 0, count: Int(st.st_size))
        let complete = bytes.withUnsafeMutableBytes { b -> Bool in
            var done = 0
            while done < b.count {
                let n = read(fd, b.baseAddress! + done, b.count - done)
                if n < 0 && errno == EINTR { continue }
                guard n > 0 else { return false }
                done += n
            }
            return true
        }
        guard complete else { throw KFACError(.io, "cannot read \(path)") }
        try asKFACError { try bytes.withUnsafeBytes { b in try loadState(from: b) } }
    }
}
