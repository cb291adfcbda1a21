#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif

/// A dense row-major matrix (or vector, with one row) in 64-byte aligned memory the library
/// owns. Allocation failure throws `.outOfMemory` instead of trapping, so that a caller of the
/// C ABI gets a status. The contents start zeroed.
final class AlignedBuffer<Scalar: KFACScalar> {
    let rows: Int
    let columns: Int
    let base: UnsafeMutablePointer<Scalar>

    var count: Int { rows * columns }

    init(rows: Int, columns: Int) throws(KFACError) {
        let (count, overflow) = rows.multipliedReportingOverflow(by: columns)
        let (bytes, overflow2) = Swift.max(count, 1).multipliedReportingOverflow(by: MemoryLayout<Scalar>.stride)
        guard rows >= 0, columns >= 0, !overflow, !overflow2 else {
            throw KFACError(.sizeOverflow, "a \(rows)×\(columns) matrix does not fit in memory")
        }
        var raw: UnsafeMutableRawPointer?
        guard posix_memalign(&raw, 64, bytes) == 0, let raw else {
            throw KFACError(.outOfMemory, "could not allocate \(bytes) bytes for a \(rows)×\(columns) matrix")
        }
        memset(raw, 0, bytes)
        self.rows = rows
        self.columns = columns
        self.base = raw.bindMemory(to: Scalar.self, capacity: Swift.max(count, 1))
    }

    func copyContents(from other: AlignedBuffer) {
        precondition(other.count == count)
        base.update(from: other.base, count: count)
    }

    deinit { free(base) }
}
