#if canImport(Glibc)
import Glibc
#endif

extension KFACOptimizer {
    private func write(to w: inout StateWriter) {
        let p = parameters
        w.bytes(StateImage.magic, count: 8)
        w.u64(StateImage.formatVersion)
        w.u64(UInt64(Scalar.dtypeCode))
        w.u64(0)  // image size, patched by saveState
        writeParameters(p, to: &w)
        w.i64(stepCount)
        w.f64(lastKLScale)
        estimator.write(to: &w)
        adaptive.write(to: &w)
        if p.inverseStrategy == .ekfac { estimator.writePaired(to: &w) }
        tridiagonal?.write(to: &w)
    }

    /// The parameters section: the number of rows, then per row of `ParameterSpec.table` its id
    /// (i64) and value (f64 for a double parameter, i64 for an int one). Ids make the section
    /// self-describing, so a family that adds parameters does not change the format.
    private func writeParameters(_ p: KFACParameters, to w: inout StateWriter) {
        w.u64(UInt64(ParameterSpec.table.count))
        for spec in ParameterSpec.table {
            let v = spec.read(p)
            w.i64(Int(spec.id.rawValue))
            if spec.type == .double { w.f64(v) } else { w.i64(Int(v)) }
        }
    }

    /// Reads what `writeParameters` wrote: ids ascending and known to this library (an unknown
    /// one is `.stateVersion`: the image comes from a library with more parameters), each value
    /// one its row accepts, the whole set valid. A parameter the image lacks keeps its default.
    private func readParameters(from r: inout StateReader) throws(KFACError) -> KFACParameters {
        var p = KFACParameters()
        let count = try r.u64()
        guard count <= 4096 else { throw KFACError(.corruptState, "state image has an impossible parameter count \(count)") }
        var previous = Int.min
        for _ in 0..<Int(count) {
            let raw = try r.i64()
            guard raw > previous else { throw KFACError(.corruptState, "state image parameters are not in ascending order") }
            previous = raw
            guard let id = Int32(exactly: raw).flatMap(ParameterID.init(rawValue:)) else {
                throw KFACError(.stateVersion, "state image has parameter \(raw), which this library does not know")
            }
            let spec = id.spec
            let v = spec.type == .double ? try r.f64() : Double(try r.i64())
            guard spec.accepts(v) else {
                throw KFACError(.corruptState, "state image parameter \(spec.name) = \(v) is out of range \(spec.rangeDescription)")
            }
            spec.write(&p, v)
        }
        do { try p.validate() } catch { throw KFACError(.corruptState, "state image parameters: \(error.message)") }
        return p
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

        let p = try readParameters(from: &r)
        let steps = try r.i64()
        let klScale = try r.f64()
        // Read into fresh owners; the optimizer's own are replaced only once all of it is read.
        let restored = try estimator.read(from: &r)
        let adaptiveState = try AdaptiveState<Scalar>.read(from: &r, blocks: restored.layers.flatMap { $0.blocks })
        if p.inverseStrategy == .ekfac { try estimator.readPaired(from: &r, into: restored.layers) }
        var installLinks: (() -> Void)?
        if let links = tridiagonal {
            guard r.offset < image.count - 8 else {
                throw KFACError(.stateMismatch, "state image has no block-tridiagonal links, the optimizer has \(links.links.count)")
            }
            installLinks = try links.read(from: &r, estimator: estimator)
        } else if r.offset < image.count - 8, let count = try? r.u64(), count > 0, count < UInt64(estimator.layerCount) {
            // A links section (the checksum held): an image of a handle with links.
            throw KFACError(.stateMismatch, "state image has \(count) block-tridiagonal links, the optimizer none")
        }
        guard r.offset == image.count - 8 else {
            throw KFACError(.corruptState, "state image has \(image.count - 8 - r.offset) unexpected trailing bytes")
        }
        estimator.install(layers: restored.layers, statisticsStarted: restored.statisticsStarted)
        parameters = p
        stepCount = steps
        lastKLScale = klScale
        adaptive = adaptiveState
        candidates = DampingCandidates()
        installLinks?()
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
