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

    /// The largest step count or loss-report count an image may carry: far beyond any run, and
    /// far enough from Int.max that counting on from it cannot overflow.
    static var maximumCounter: Int { 1 << 62 }

    /// The number of bytes `saveState` writes now.
    public var stateSize: Int {
        var w = StateWriter(nil)
        write(to: &w)
        return w.offset + 8
    }

    /// An upper bound on the size of any image this optimizer could write with its layers
    /// (every factor with running, buffered and summed statistics, the largest inverse
    /// representation, δ₀): a larger file is refused before it is read.
    public var maximumStateSize: Int {
        var w = StateWriter(nil)
        w.bytes(StateImage.magic, count: 8)
        w.u64(0); w.u64(0); w.u64(0)
        writeParameters(parameters, to: &w)
        w.i64(0); w.f64(0)
        var total = w.offset + estimator.maximumImageBytes + AdaptiveState<Scalar>.maximumImageBytes(blocks: estimator.blocks) + 8
        total += 4096  // parameter rows of a library with more parameters are refused after reading
        return total
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
    ///
    /// Order: magic, size, checksum (so that any accidental change, the version field's
    /// included, is `.corruptState`), version, precision, then every section, each field
    /// checked against what the API can produce (counters in range, flags 0 or 1, sizes that
    /// match the layers, finite factors with non-negative diagonals, pending sums within the
    /// record limit, valid inverses) — the checksum does not protect against a deliberate edit.
    public func loadState(from image: UnsafeRawBufferPointer) throws(KFACError) {
        guard image.count >= StateImage.headerSize + 8, image.baseAddress != nil else {
            throw KFACError(.corruptState, "state image of \(image.count) bytes is too short")
        }
        var r = StateReader(image)
        guard memcmp(try r.take(8), StateImage.magic, 8) == 0 else {
            throw KFACError(.corruptState, "not a libkfac state image (bad magic)")
        }
        let version = try r.u64()
        let dtype = try r.u64()
        let size = try r.u64()
        guard size == UInt64(image.count) else {
            throw KFACError(.corruptState, "state image says it has \(size) bytes, got \(image.count) (truncated?)")
        }
        let stored = UInt64(littleEndian: (image.baseAddress! + image.count - 8).loadUnaligned(as: UInt64.self))
        guard StateImage.checksum(UnsafeRawBufferPointer(rebasing: image[0..<(image.count - 8)])) == stored else {
            throw KFACError(.corruptState, "state image checksum mismatch (corrupted)")
        }
        guard version == StateImage.formatVersion else {
            throw KFACError(.stateVersion, "state image format \(version), this library reads format \(StateImage.formatVersion)")
        }
        guard dtype == UInt64(Scalar.dtypeCode) else {
            throw KFACError(dtype == 1 || dtype == 2 ? .stateMismatch : .corruptState,
                            "state image precision \(dtype == 1 ? "float32" : dtype == 2 ? "float64" : "\(dtype) (unknown)") differs from the optimizer's")
        }

        let p = try readParameters(from: &r)
        let steps = try r.i64()
        guard steps >= 0 && steps <= Self.maximumCounter else {
            throw KFACError(.corruptState, "state image has an impossible step count \(steps)")
        }
        let klScale = try r.f64()
        guard steps == 0 ? klScale.isNaN : (klScale >= 0 && klScale <= 1) else {
            throw KFACError(.corruptState, "state image has an impossible KL scale \(klScale) after \(steps) steps")
        }
        // Read into fresh owners; the optimizer's own are replaced only once all of it is read.
        let restored = try estimator.read(from: &r)
        let adaptiveState = try AdaptiveState<Scalar>.read(from: &r, blocks: restored.layers.flatMap { $0.blocks })
        if p.inverseStrategy == .ekfac { try estimator.readPaired(from: &r, into: restored.layers) }
        var installLinks: (() -> Void)?
        if let links = tridiagonal {
            guard r.offset < image.count - 8 else {
                throw KFACError(.stateMismatch, "state image has no block-tridiagonal links, the optimizer has \(links.links.count)")
            }
            installLinks = try links.read(from: &r, estimator: estimator, restored: restored.layers)
        } else if r.offset < image.count - 8, let count = try? r.u64(), count > 0, count < UInt64(estimator.layerCount) {
            // A links section (the checksum held): an image of a handle with links.
            throw KFACError(.stateMismatch, "state image has \(count) block-tridiagonal links, the optimizer none")
        }
        guard r.offset == image.count - 8 else {
            throw KFACError(.corruptState, "state image has \(image.count - 8 - r.offset) unexpected trailing bytes")
        }
        guard !adaptiveState.hasPreviousUpdate || steps > 0 else {
            throw KFACError(.corruptState, "state image has a previous update but no step")
        }
        estimator.discardBackground()  // its blocks are replaced; the image has committed inverses only
        estimator.install(layers: restored.layers, statisticsStarted: restored.statisticsStarted)
        parameters = p
        stepCount = steps
        lastKLScale = klScale
        adaptive = adaptiveState
        candidates = DampingCandidates()
        installLinks?()
    }

    /// Writes the state image to `path` atomically (see `saveState(toFilePath:)`).
    public func saveState(toFile path: String) throws(KFACError) {
        try asKFACError { try path.withCString { p in try saveState(toFilePath: p) } }
    }

    /// Loads a state image written by `saveState(toFile:)` (see `loadState(fromFilePath:)`).
    public func loadState(fromFile path: String) throws(KFACError) {
        try asKFACError { try path.withCString { p in try loadState(fromFilePath: p) } }
    }

    /// Writes the state image to the file `path` (bytes, passed to the system unchanged)
    /// atomically: into a new temporary file `<path>.kfac-tmp-<pid>-<random>` created
    /// exclusively (O_EXCL, never through a link) in the same directory, flushed, renamed over
    /// `path`, then the directory flushed. On failure `path` is unchanged and the temporary file
    /// removed; a process killed mid-save may leave one, recognisable by its name.
    public func saveState(toFilePath path: UnsafePointer<CChar>) throws(KFACError) {
        let size = stateSize
        guard let raw = malloc(size) else { throw KFACError(.outOfMemory, "could not allocate \(size) bytes for the state image") }
        defer { free(raw) }
        _ = try saveState(into: UnsafeMutableRawBufferPointer(start: raw, count: size))

        let pathLength = strlen(path)
        // "<path>.kfac-tmp-<pid>-<16 hex digits>\0"
        guard let temporary = malloc(pathLength + 64)?.assumingMemoryBound(to: CChar.self) else {
            throw KFACError(.outOfMemory, "could not allocate a file name")
        }
        defer { free(temporary) }
        var fd: Int32 = -1
        for _ in 0..<16 {
            let suffix = ".kfac-tmp-\(getpid())-\(String(UInt64.random(in: 0...UInt64.max), radix: 16))"
            memcpy(temporary, path, pathLength)
            suffix.withCString { s in _ = strcpy(temporary + pathLength, s) }
            fd = open(temporary, O_WRONLY | O_CREAT | O_EXCL | O_NOFOLLOW | O_CLOEXEC, 0o644)
            if fd >= 0 || errno != EEXIST { break }
        }
        guard fd >= 0 else { throw KFACError(.io, "cannot create a temporary file next to \(String(cString: path)): \(String(cString: strerror(errno)))") }
        var done = 0
        var failure: Int32 = 0
        while done < size {
            let n = Glibc.write(fd, raw + done, Swift.min(size - done, 1 << 20))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { failure = n < 0 ? errno : EIO; break }
            done += n
        }
        if failure == 0 && fsync(fd) != 0 { failure = errno }
        if close(fd) != 0 && failure == 0 { failure = errno }
        if failure == 0 && rename(temporary, path) != 0 { failure = errno }
        guard failure == 0 else {
            unlink(temporary)
            throw KFACError(.io, "cannot write \(String(cString: path)): \(String(cString: strerror(failure)))")
        }
        // Make the rename itself durable: flush the directory that holds `path`.
        if let slash = strrchr(path, Int32(UInt8(ascii: "/"))) {
            let length = slash == path ? 1 : path.distance(to: UnsafePointer(slash))
            memcpy(temporary, path, length)
            temporary[length] = 0
        } else {
            strcpy(temporary, ".")
        }
        let dfd = open(temporary, O_RDONLY | O_DIRECTORY | O_CLOEXEC)
        if dfd >= 0 { fsync(dfd); close(dfd) }
    }

    /// Loads a state image from the file `path` (bytes, passed to the system unchanged): only a
    /// regular file (a FIFO or device is `.io`, without blocking); a file larger than
    /// `maximumStateSize` is judged from its header and parameter section alone (only an image
    /// with the EKFAC strategy, whose pending per-example gradients have no bound the layers
    /// set, is read further); the rest is read in pieces into memory the library allocates
    /// fallibly (`.outOfMemory`).
    public func loadState(fromFilePath path: UnsafePointer<CChar>) throws(KFACError) {
        let fd = open(path, O_RDONLY | O_CLOEXEC | O_NONBLOCK | O_NOCTTY)
        guard fd >= 0 else { throw KFACError(.io, "cannot open \(String(cString: path)): \(String(cString: strerror(errno)))") }
        defer { close(fd) }
        var st = stat()
        guard fstat(fd, &st) == 0 else { throw KFACError(.io, "cannot stat \(String(cString: path))") }
        guard (st.st_mode & S_IFMT) == S_IFREG else {
            throw KFACError(.io, "\(String(cString: path)) is not a regular file")
        }
        let size = Int(st.st_size)
        if size > maximumStateSize {
            try checkLargeImage(fd: fd, size: size, path: String(cString: path))
            // EKFAC's per-example gradients and the links' unpaired rows: the image's own counts
            // say how large it is; a file of another size is refused before it is read whole.
            let claimed = try claimedImageSize(fd: fd, size: size)
            guard claimed == size else {
                throw KFACError(.corruptState, "\(String(cString: path)) has \(size) bytes, but the image's row counts make \(claimed)")
            }
        }
        guard let raw = malloc(Swift.max(size, 1)) else { throw KFACError(.outOfMemory, "could not allocate \(size) bytes to read \(String(cString: path))") }
        defer { free(raw) }
        var done = 0
        while done < size {
            let n = read(fd, raw + done, Swift.min(size - done, 1 << 20))
            if n < 0 && (errno == EINTR || errno == EAGAIN) { continue }
            guard n >= 0 else { throw KFACError(.io, "cannot read \(String(cString: path)): \(String(cString: strerror(errno)))") }
            guard n > 0 else { break }  // shrank while reading: the image check reports it
            done += n
        }
        try loadState(from: UnsafeRawBufferPointer(start: raw, count: done))
    }

    /// The size the image in `fd` claims through its row counts (issue 15): the sections before
    /// EKFAC's and the links' fit in `maximumStateSize` bytes, so they are read (at most that
    /// many bytes) and parsed as `loadState` parses them; the EKFAC and links sections are then
    /// walked field by field from the file (their row counts times the layers' widths), without
    /// reading their rows. Throws `.corruptState` for counts whose sizes overflow.
    private func claimedImageSize(fd: Int32, size: Int) throws(KFACError) -> Int {
        let prefixLength = Swift.min(size, maximumStateSize)
        guard let prefix = malloc(prefixLength) else {
            throw KFACError(.outOfMemory, "could not allocate \(prefixLength) bytes to read a state image's header")
        }
        defer { free(prefix) }
        var done = 0
        while done < prefixLength {
            let n = pread(fd, prefix + done, prefixLength - done, off_t(done))
            if n < 0 && errno == EINTR { continue }
            guard n > 0 else { throw KFACError(.io, "cannot read a state image: \(String(cString: strerror(errno)))") }
            done += n
        }
        var r = StateReader(UnsafeRawBufferPointer(start: prefix, count: prefixLength))
        _ = try r.take(StateImage.headerSize)
        let p = try readParameters(from: &r)
        _ = try r.i64()
        _ = try r.f64()
        let restored = try estimator.read(from: &r)
        _ = try AdaptiveState<Scalar>.read(from: &r, blocks: restored.layers.flatMap { $0.blocks })
        var offset = r.offset
        let field = { (at: Int) throws(KFACError) -> Int in
            var v: UInt64 = 0
            guard pread(fd, &v, 8, off_t(at)) == 8 else { throw KFACError(.corruptState, "state image is truncated at byte \(at)") }
            let value = Int(truncatingIfNeeded: UInt64(littleEndian: v))
            guard value >= 0 && value <= 1 << 53 else { throw KFACError(.corruptState, "state image has an impossible count \(value) at byte \(at)") }
            return value
        }
        // offset += count · width scalars, refusing sizes that overflow.
        let skip = { (count: Int, width: Int) throws(KFACError) in
            let (values, o1) = count.multipliedReportingOverflow(by: width)
            let (bytes, o2) = values.multipliedReportingOverflow(by: MemoryLayout<Scalar>.stride)
            let (end, o3) = offset.addingReportingOverflow(bytes)
            guard !o1, !o2, !o3 else { throw KFACError(.corruptState, "state image has an impossible size") }
            offset = end
        }
        if p.inverseStrategy == .ekfac {
            for c in restored.layers.flatMap({ $0.blocks }) {
                let present = try field(offset)
                offset += 8
                guard present == 1 else { continue }
                let (a, o) = (c.input.dimension, c.output.dimension)
                let rows = try field(offset + 8)  // after the divisor
                offset += 16
                try skip(rows, a + o)
                let segments = try field(offset)
                offset += 8
                try skip(segments, 16 / MemoryLayout<Scalar>.stride)
                let matrices = try field(offset)
                offset += 8
                try skip(matrices, a * o)
            }
        }
        if let links = tridiagonal {
            offset += 8  // the link count (checked on load)
            for k in links.links {
                offset += 8  // lower
                for cross in [k.inputs, k.gradients] {
                    if try field(offset) == 1 { offset += 8; try skip(1, cross.count) } else { offset += 8 }
                    if try field(offset) > 0 { offset += 8; try skip(1, cross.count) } else { offset += 8 }
                    let lowerRows = try field(offset)
                    offset += 8
                    try skip(lowerRows, cross.lowerWidth)
                    let upperRows = try field(offset)
                    offset += 8
                    try skip(upperRows, cross.upperWidth)
                }
            }
            let hasInverses = try field(offset)
            offset += 8
            if hasInverses == 1 { try skip(1, links.inverseValueCount) }
        }
        let (total, overflow) = offset.addingReportingOverflow(8)  // the checksum
        guard !overflow else { throw KFACError(.corruptState, "state image has an impossible size") }
        return total
    }

    /// For a file larger than any image without EKFAC's per-example gradients or block-tridiagonal
    /// links could be: reads its header and parameter section only (at most 64 KiB) and throws
    /// unless it is a well-formed image header of this format and precision whose inverse
    /// strategy is EKFAC (or the handle has links).
    private func checkLargeImage(fd: Int32, size: Int, path: String) throws(KFACError) {
        let what = "\(path) has \(size) bytes, more than any state image of this optimizer's layers (\(maximumStateSize))"
        let prefix = Swift.min(size, StateImage.headerSize + 8 + 16 * 4096)
        var bytes = [UInt8](repeating: 0, count: prefix)
        let n = bytes.withUnsafeMutableBytes { pread(fd, $0.baseAddress!, prefix, 0) }
        let field = { (at: Int) -> UInt64 in
            at + 8 <= n ? bytes[at..<(at + 8)].reversed().reduce(UInt64(0)) { $0 << 8 | UInt64($1) } : UInt64.max
        }
        guard n >= StateImage.headerSize, Array(bytes[0..<8]) == StateImage.magic else {
            throw KFACError(.corruptState, "\(what) and is not a libkfac state image")
        }
        guard field(24) == UInt64(size) else { throw KFACError(.corruptState, "\(what); its size field disagrees") }
        guard field(8) == StateImage.formatVersion else {
            throw KFACError(.stateVersion, "\(what); it has format \(field(8)), this library reads format \(StateImage.formatVersion)")
        }
        guard field(16) == UInt64(Scalar.dtypeCode) else {
            throw KFACError(.stateMismatch, "\(what); its precision differs from the optimizer's")
        }
        // Block-tridiagonal links add a section whose pending cross statistics the layers do not
        // bound either.
        if tridiagonal != nil { return }
        let rows = field(StateImage.headerSize)
        var strategy = UInt64.max
        if rows <= 4096 {
            for i in 0..<Int(rows) where field(StateImage.headerSize + 8 + 16 * i) == UInt64(ParameterID.inverseStrategy.rawValue) {
                strategy = field(StateImage.headerSize + 16 + 16 * i)
            }
        }
        guard strategy == UInt64(InverseStrategy.ekfac.rawValue) else {
            throw KFACError(.stateMismatch, "\(what): it is the image of other layers")
        }
    }
}
