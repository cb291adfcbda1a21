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
    var scalingPackCount: Int { get }
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
        throw KFACError(.invalidArgument, "what must be KFAC_DISTRIBUTED_STATISTICS (0), KFAC_DISTRIBUTED_INVERSES (1) or KFAC_DISTRIBUTED_SCALINGS (2), got \(what)")
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
        case .scalings: out.pointee = Int64(o.scalingPackCount)
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
public func kfac_distributed_pack_scalings_f32(_ opt: OpaquePointer?, _ buffer: UnsafeMutablePointer<Float>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.packScalings(into: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_pack_scalings_f64(_ opt: OpaquePointer?, _ buffer: UnsafeMutablePointer<Double>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.packScalings(into: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_unpack_scalings_f32(_ opt: OpaquePointer?, _ buffer: UnsafePointer<Float>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.unpackScalings(from: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_unpack_scalings_f64(_ opt: OpaquePointer?, _ buffer: UnsafePointer<Double>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.unpackScalings(from: buffer, count: try count(n)) }
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

private func packModelSums<S: KFACScalar>(
    _ o: KFACOptimizer<S>, _ outputs: UnsafePointer<S>?, _ products: UnsafePointer<UnsafePointer<S>?>?, _ candidates: Int32,
    _ previous: UnsafePointer<S>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ sums: UnsafeMutablePointer<Double>?, _ n: Int64
) throws(KFACError) {
    let d = try distribution(dist)
    guard rows >= 0 else { throw KFACError(.invalidSize, "rows must be >= 0, got \(rows)") }
    let table = rows > 0 ? try required(products, "direction_products") : products
    try o.packModelSums(outputs: outputs, candidateProducts: { table?[$0] }, candidates: Int(candidates),
                        previousProducts: previous, rows: Int(rows), dim: Int(dim), distribution: d,
                        into: sums, count: try count(n))
}

@c @implementation
public func kfac_distributed_pack_model_sums_f32(
    _ opt: OpaquePointer?, _ outputs: UnsafePointer<Float>?, _ products: UnsafePointer<UnsafePointer<Float>?>?, _ candidates: Int32,
    _ previous: UnsafePointer<Float>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ sums: UnsafeMutablePointer<Double>?, _ n: Int64
) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in
        try packModelSums(o, outputs, products, candidates, previous, rows, dim, dist, sums, n)
    }
}

@c @implementation
public func kfac_distributed_pack_model_sums_f64(
    _ opt: OpaquePointer?, _ outputs: UnsafePointer<Double>?, _ products: UnsafePointer<UnsafePointer<Double>?>?, _ candidates: Int32,
    _ previous: UnsafePointer<Double>?, _ rows: Int64, _ dim: Int64, _ dist: Int32, _ sums: UnsafeMutablePointer<Double>?, _ n: Int64
) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in
        try packModelSums(o, outputs, products, candidates, previous, rows, dim, dist, sums, n)
    }
}

/// The precision-independent solve from reduced model sums.
private protocol ModelSumSolver: AnyObject {
    func solveModelSums(_ sums: UnsafePointer<Double>?, count: Int) throws(KFACError) -> (chosen: Int, alpha: Double, mu: Double, predictedChange: Double)
}

extension KFACOptimizer: ModelSumSolver {}

@c @implementation
public func kfac_distributed_solve_model_sums(
    _ opt: OpaquePointer?, _ sums: UnsafePointer<Double>?, _ n: Int64, _ chosen: UnsafeMutablePointer<Int32>?,
    _ alpha: UnsafeMutablePointer<Double>?, _ mu: UnsafeMutablePointer<Double>?, _ predicted: UnsafeMutablePointer<Double>?
) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        let a = try required(alpha, "alpha"), m = try required(mu, "mu")
        let solver: any ModelSumSolver
        switch handle.engine {
        case .float32(let o): solver = o
        case .float64(let o): solver = o
        }
        let r = try solver.solveModelSums(sums, count: try count(n))
        chosen?.pointee = Int32(r.chosen)
        a.pointee = r.alpha
        m.pointee = r.mu
        predicted?.pointee = r.predictedChange
    }
}

// MARK: Caller-supplied collectives

@c @implementation
public func kfac_distributed_synchronize(_ opt: OpaquePointer?, _ collectives: UnsafePointer<kfac_collectives>?) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        let c = try readGrowable(collectives, "collectives", minimum: MemoryLayout<kfac_collectives>.offset(of: \.allreduce_sum_f64)!,
                                 empty: kfac_collectives())
        let user = c.user
        switch handle.engine {
        case .float32(let o):
            let fn = try required(c.allreduce_sum_f32, "collectives->allreduce_sum_f32")
            if let gather = c.allgatherv_f32 {
                try o.exchange(through: { fn($0, Int64($1), user) }, allgatherv: { gather($0, $1, $2, $3, user) })
            } else {
                try o.exchange { fn($0, Int64($1), user) }
            }
        case .float64(let o):
            let fn = try required(c.allreduce_sum_f64, "collectives->allreduce_sum_f64")
            if let gather = c.allgatherv_f64 {
                try o.exchange(through: { fn($0, Int64($1), user) }, allgatherv: { gather($0, $1, $2, $3, user) })
            } else {
                try o.exchange { fn($0, Int64($1), user) }
            }
        }
    }
}

// MARK: The inverse exchange as an allgatherv

/// The precision-independent layout query.
private protocol GatheredLayout: AnyObject {
    var worldSize: Int { get }
    func gatheredInverseLayout(counts: UnsafeMutablePointer<Int64>, displacements: UnsafeMutablePointer<Int64>?) throws(KFACError)
}

extension KFACOptimizer: GatheredLayout {}

@c @implementation
public func kfac_distributed_get_inverse_layout(_ opt: OpaquePointer?, _ counts: UnsafeMutablePointer<Int64>?,
                                                _ displacements: UnsafeMutablePointer<Int64>?, _ n: Int32) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        let out = try required(counts, "counts")
        let o: any GatheredLayout
        switch handle.engine {
        case .float32(let x): o = x
        case .float64(let x): o = x
        }
        guard Int(n) == o.worldSize else {
            throw KFACError(.invalidSize, "n_ranks must be the world size \(o.worldSize), got \(n)")
        }
        try o.gatheredInverseLayout(counts: out, displacements: displacements)
    }
}

@c @implementation
public func kfac_distributed_pack_owned_inverses_f32(_ opt: OpaquePointer?, _ buffer: UnsafeMutablePointer<Float>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.packOwnedInverses(into: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_pack_owned_inverses_f64(_ opt: OpaquePointer?, _ buffer: UnsafeMutablePointer<Double>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.packOwnedInverses(into: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_unpack_gathered_inverses_f32(_ opt: OpaquePointer?, _ buffer: UnsafePointer<Float>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Float.self) { (o) throws(KFACError) in try o.unpackGatheredInverses(from: buffer, count: try count(n)) }
}

@c @implementation
public func kfac_distributed_unpack_gathered_inverses_f64(_ opt: OpaquePointer?, _ buffer: UnsafePointer<Double>?, _ n: Int64) -> Int32 {
    withOptimizer(opt, Double.self) { (o) throws(KFACError) in try o.unpackGatheredInverses(from: buffer, count: try count(n)) }
}
