#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A fixed-size array of trivial values (Int, Float, Double) in memory the library allocates fallibly: for arrays
/// whose size a caller's sizes drive (a Swift Array traps when memory runs out; this throws
/// `.outOfMemory`). The contents start zeroed.
final class HeapArray<Element> {
    let count: Int
    let base: UnsafeMutablePointer<Element>

    init(count: Int) throws(KFACError) {
        let (bytes, overflow) = Swift.max(count, 1).multipliedReportingOverflow(by: MemoryLayout<Element>.stride)
        guard count >= 0, !overflow else { throw KFACError(.sizeOverflow, "an array of \(count) values does not fit in memory") }
        guard let raw = calloc(1, bytes) else {
            throw KFACError(.outOfMemory, "could not allocate \(bytes) bytes")
        }
        self.count = count
        base = raw.bindMemory(to: Element.self, capacity: Swift.max(count, 1))
    }

    subscript(i: Int) -> Element {
        get { base[i] }
        set { base[i] = newValue }
    }

    deinit { free(base) }
}

/// Checks that about `bytes` bytes can be allocated now (an allocation the caller cannot make
/// fallibly, such as many small objects, would otherwise trap when memory runs out).
func probeAllocation(bytes: Int, what: String) throws(KFACError) {
    guard let p = malloc(Swift.max(bytes, 1)) else {
        throw KFACError(.outOfMemory, "could not allocate \(bytes) bytes for \(what)")
    }
    free(p)
}
