// Experimental: distributed runs on the caller's engine, kfac_distributed_* of include/kfac.h.

import KFAC
import _KFACHeader

/// The precision-independent distributed operations, so that functions without buffers are
/// written once.
protocol DistributedOperations: AnyObject {
    var worldRank: Int { get }
    var worldSize: Int { get }
    func setWorld(rank: Int, size: Int) throws(KFACError)
    var statisticsPackCount: Int { get }
    func inversePackCount() throws(KFACError) -> Int
    func exchangeDue(_ what: DistributedExchange) -> Bool
    func inverseOwner(layer: Int, group: Int, outputSide: Bool, unique: Int) throws(KFACError) -> Int
}

extension KFACOptimizer: DistributedOperations {}

private func withDistributed(_ opt: OpaquePointer?, _ body: (any DistributedOperations) throws(KFACError) -> Void) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        switch handle.engine {
        case .float32(let o): try body(o)
        case .float64(let o): try body(o)
        }
    }
}

private func exchange(_ what: Int32) throws(KFACError) -> DistributedExchange {
    guard let w = DistributedExchange(rawValue: what) else {
        throw KFACError(.invalidArgument, "what must be KFAC_DISTRIBUTED_STATISTICS (0) or KFAC_DISTRIBUTED_INVERSES (1), got \(what)")
    }
    return w
}

@c @implementation
public func kfac_distributed_set_world(_ opt: OpaquePointer?, _ rank: Int32, _ size: Int32) -> Int32 {
    withDistributed(opt) { (o) throws(KFACError) in try o.setWorld(rank: Int(rank), size: Int(size)) }
}

@c @implementation
public func kfac_distributed_get_world(_ opt: OpaquePointer?, _ rank: UnsafeMutablePointer<Int32>?,
                                       _ size: UnsafeMutablePointer<Int32>?) -> Int32 {
    withDistributed(opt) { (o) throws(KFACError) in
        rank?.pointee = Int32(o.worldRank)
        size?.pointee = Int32(o.worldSize)
    }
}

@c @implementation
public func kfac_distributed_get_count(_ opt: OpaquePointer?, _ what: Int32, _ count: UnsafeMutablePointer<Int64>?) -> Int32 {
    withDistributed(opt) { (o) throws(KFACError) in
        let out = try required(count, "count")
        switch try exchange(what) {
        case .statistics: out.pointee = Int64(o.statisticsPackCount)
        case .inverses: out.pointee = Int64(try o.inversePackCount())
        }
    }
}

@c @implementation
public func kfac_distributed_get_due(_ opt: OpaquePointer?, _ what: Int32, _ due: UnsafeMutablePointer<Int32>?) -> Int32 {
    withDistributed(opt) { (o) throws(KFACError) in
        let out = try required(due, "due")
        out.pointee = o.exchangeDue(try exchange(what)) ? 1 : 0
    }
}

@c @implementation
public func kfac_distributed_get_owner(_ opt: OpaquePointer?, _ layer: Int32, _ group: Int32, _ side: Int32, _ block: Int32,
                                       _ rank: UnsafeMutablePointer<Int32>?) -> Int32 {
    withDistributed(opt) { (o) throws(KFACError) in
        let out = try required(rank, "rank")
        guard side == 0 || side == 1 else { throw KFACError(.invalidArgument, "side must be 0 (input) or 1 (output), got \(side)") }
        out.pointee = Int32(try o.inverseOwner(layer: Int(layer), group: Int(group), outputSide: side == 1, unique: Int(block)))
    }
}

private func count(_ n: Int64) throws(KFACError) -> Int {
    guard n >= 0 else { throw KFACError(.invalidSize, "count must be >= 0, got \(n)") }
    return Int(n)
}

@c @implementation
public func kfac_distributed_pack_statistics_f32(_ opt: OpaquePointer?, _ buffer: UnsafeMutablePointer<Float>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.packStatistics(into: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_pack_statistics_f64(_ opt: OpaquePointer?, _ buffer: UnsafeMutablePointer<Double>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.packStatistics(into: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_unpack_statistics_f32(_ opt: OpaquePointer?, _ buffer: UnsafePointer<Float>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.unpackStatistics(from: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_unpack_statistics_f64(_ opt: OpaquePointer?, _ buffer: UnsafePointer<Double>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.unpackStatistics(from: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_pack_inverses_f32(_ opt: OpaquePointer?, _ buffer: UnsafeMutablePointer<Float>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.packInverses(into: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_pack_inverses_f64(_ opt: OpaquePointer?, _ buffer: UnsafeMutablePointer<Double>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.packInverses(into: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_unpack_inverses_f32(_ opt: OpaquePointer?, _ buffer: UnsafePointer<Float>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.unpackInverses(from: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_unpack_inverses_f64(_ opt: OpaquePointer?, _ buffer: UnsafePointer<Double>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.unpackInverses(from: buffer, count: try count(n)) }
}
