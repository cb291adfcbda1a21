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

/// Checks that about `bytes` bytes of address space can be mapped now (an allocation the
/// caller cannot make fallibly, such as many small objects, would otherwise trap when memory
/// runs out). A mapping, not malloc: the optimiser may delete a malloc whose block is unused,
/// together with its failure check.
func probeAllocation(bytes: Int, what: String) throws(KFACError) {
    let size = Swift.max(bytes, 1)
    let p = mmap(nil, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
    guard let p, p != MAP_FAILED else {
        throw KFACError(.outOfMemory, "could not allocate \(bytes) bytes for \(what)")
    }
    munmap(p, size)
}
