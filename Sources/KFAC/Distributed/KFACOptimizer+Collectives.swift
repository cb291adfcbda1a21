/// A step's whole exchange through a caller-supplied collective (`kfac_distributed_exchange`):
/// pack → SUM-allreduce → unpack for the statistics and then the inverses, with buffers the
/// handle owns, and every handle left as it was when any part fails.
///
/// Why a snapshot: the inverses are computed from the union statistics, so the statistics must
/// be unpacked before the inverse pack; when the inverse collective (or some rank's inversion)
/// then fails, the factors are put back from a copy taken before the unpack. The copy and both
/// pack buffers are allocated before the first collective, so that an allocation failure never
/// leaves a rank out of a collective the others entered (it fails before any, on that rank).
struct CollectiveBuffers<Scalar: KFACScalar> {
    var statistics: AlignedBuffer<Scalar>?
    var inverses: AlignedBuffer<Scalar>?
    /// EKFAC's scaling pack.
    var scalings: AlignedBuffer<Scalar>?
    var snapshot: AlignedBuffer<Scalar>?
    /// A full inverse pack for the gathered exchange's pack and unpack.
    var fullInverses: AlignedBuffer<Scalar>?
    /// The gathered exchange's counts and displacements (world size each).
    var layout: [Int64] = []
    /// The gathered unpack's per-rank cursors (world size + 1).
    var cursor: [Int] = []

    /// `buffer` if it holds `count` values, else a new one (kept for the next exchange).
    static func reserve(_ buffer: inout AlignedBuffer<Scalar>?, _ count: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        if let b = buffer, b.count >= count { return b }
        let b = try AlignedBuffer<Scalar>(rows: 1, columns: Swift.max(count, 1))
        buffer = b
        return b
    }
}

extension KFACOptimizer {
    /// Bytes of a snapshot of every factor's statistics (`saveStatistics`).
    func snapshotBytesNeeded() -> Int {
        let blocks = estimator.blocks
        var n = 0
        for k in blocks.indices { n += blocks[k].input.maximumSnapshotBytes + blocks[k].output.maximumSnapshotBytes }
        if let links = tridiagonal {
            for i in 0..<links.links.count { n += links.links[i].inputs.exchangedBytes + links.links[i].gradients.exchangedBytes }
        }
        return n
    }

    /// Does the exchanges the next `step` needs (`exchangeDue`: statistics, then inverses) through
    /// `allreduceSum(buffer, count)`, a SUM-allreduce in place over every rank that returns 0 on
    /// success. Every rank calls this at the same point and the collective is called the same
    /// number of times with the same counts on every rank, also when a pack fails on some rank
    /// (its buffer then holds NaN, so the unpack fails on every rank alike).
    /// Errors: `.callback` when the collective returns non-zero, the pack's and unpack's errors;
    /// on any error the handle is as it was before the call, and a retry (or a step without
    /// the exchange, which computes every inverse itself) works.
    /// `allgatherv(send, receive, counts, displacements)`, when given, exchanges the inverses as
    /// an allgatherv of each rank's own units (`gatheredInverseCounts`) instead of a zero-padded
    /// SUM-allreduce.
    public func exchange(through allreduceSum: (UnsafeMutablePointer<Scalar>, Int) -> Int32) throws(KFACError) {
        try exchange(allreduceSum, gathered: false) { _, _, _, _ in 0 }
    }

    /// `exchange(through:)` with the inverses as an allgatherv of each rank's own units.
    /// (Non-optional, non-escaping closures: a call allocates nothing after warm-up.)
    public func exchange(through allreduceSum: (UnsafeMutablePointer<Scalar>, Int) -> Int32,
                         allgatherv: (UnsafePointer<Scalar>, UnsafeMutablePointer<Scalar>, UnsafePointer<Int64>,
                                      UnsafePointer<Int64>) -> Int32) throws(KFACError) {
        try exchange(allreduceSum, gathered: true, allgatherv)
    }

    private func exchange(_ allreduceSum: (UnsafeMutablePointer<Scalar>, Int) -> Int32, gathered: Bool,
                          _ allgatherv: (UnsafePointer<Scalar>, UnsafeMutablePointer<Scalar>, UnsafePointer<Int64>,
                                         UnsafePointer<Int64>) -> Int32) throws(KFACError) {
        let statisticsDue = exchangeDue(.statistics), inversesDue = exchangeDue(.inverses)
        let scalingsDue = exchangeDue(.scalings)
        guard statisticsDue || inversesDue || scalingsDue else { return }
        // Every allocation and count first (the same outcome on every rank of a consistent run).
        let statisticsCount = statisticsDue ? statisticsPackCount : 0
        let gathered = inversesDue && gathered
        var inverseCount = inversesDue ? try inversePackCount() : 0
        if gathered {
            // The segments are known only after the statistics unpack (a rank may have recorded
            // nothing yet); the gathered buffer and this rank's segment take a full pack each at most.
            inverseCount *= 2
            if distributed.collectives.layout.count != 2 * distributed.size {
                distributed.collectives.layout = [Int64](repeating: 0, count: 2 * distributed.size)
            }
        }
        let statistics = try CollectiveBuffers.reserve(&distributed.collectives.statistics, statisticsCount)
        let inverses = try CollectiveBuffers.reserve(&distributed.collectives.inverses, inverseCount)
        let scalingCount = scalingsDue ? scalingPackCount : 0
        let scalings = try CollectiveBuffers.reserve(&distributed.collectives.scalings, scalingCount)
        if scalingsDue { _ = try CollectiveBuffers.reserve(&distributed.scalingSums, scalingCount) }
        let snapshotBytes = statisticsDue && (inversesDue || scalingsDue)
            ? snapshotBytesNeeded() : 0
        let snapshot = try CollectiveBuffers.reserve(&distributed.collectives.snapshot,
                                                     (snapshotBytes + MemoryLayout<Scalar>.stride - 1) / MemoryLayout<Scalar>.stride)
        let before = (prepared: distributed.prepared, reduced: distributed.statisticsReduced,
                      started: estimator.statisticsStarted, scaling: distributed.preparedScaling, links: distributed.preparedLinks)

        if statisticsDue {
            var packError: KFACError?
            do throws(KFACError) { try packStatistics(into: statistics.base, count: statisticsCount) } catch {
                packError = error
                statistics.base.initialize(repeating: .nan, count: statisticsCount)
            }
            let status = allreduceSum(statistics.base, statisticsCount)
            guard status == 0 else {
                throw KFACError(.callback, "the statistics allreduce returned \(status); the handle is unchanged")
            }
            if let packError { throw packError }
            if inversesDue || scalingsDue {
                var w = StateWriter(UnsafeMutableRawBufferPointer(start: snapshot.base, count: snapshotBytes))
                for k in estimator.blocks.indices {
                    let c = estimator.blocks[k]
                    c.input.saveStatistics(to: &w)
                    c.output.saveStatistics(to: &w)
                }
                if let links = tridiagonal {
                    for i in 0..<links.links.count {
                        links.links[i].inputs.saveExchanged(to: &w)
                        links.links[i].gradients.saveExchanged(to: &w)
                    }
                }
            }
            try unpackStatistics(from: statistics.base, count: statisticsCount)
        }
        guard inversesDue || scalingsDue else { return }
        do throws(KFACError) {
            var packError: KFACError?
            if inversesDue {
            // A failed pack after its size checks fills the buffer with NaN itself.
            if gathered {
                let size = distributed.size
                var layout = distributed.collectives.layout  // moved out: the calls below modify `distributed`
                distributed.collectives.layout = []
                defer { distributed.collectives.layout = layout }
                try layout.withUnsafeMutableBufferPointer { (l) throws(KFACError) in
                    try gatheredInverseLayout(counts: l.baseAddress!, displacements: l.baseAddress! + size)
                }
                let total = Int(layout[size - 1] + layout[2 * size - 1])
                let send = inverses.base + total, mine = Int(layout[distributed.rank])
                do throws(KFACError) { try packOwnedInverses(into: send, count: mine) } catch { packError = error }
                let status = layout.withUnsafeBufferPointer { allgatherv(send, inverses.base, $0.baseAddress!, $0.baseAddress! + size) }
                guard status == 0 else {
                    throw KFACError(.callback, "the inverse allgatherv returned \(status); the handle is unchanged")
                }
                if let packError { throw packError }
                try unpackGatheredInverses(from: inverses.base, count: total)
            } else {
                do throws(KFACError) { try packInverses(into: inverses.base, count: inverseCount) } catch { packError = error }
                let status = allreduceSum(inverses.base, inverseCount)
                guard status == 0 else {
                    throw KFACError(.callback, "the inverse allreduce returned \(status); the handle is unchanged")
                }
                if let packError { throw packError }
                try unpackInverses(from: inverses.base, count: inverseCount)
            }
            }
            // EKFAC: S's per-example sums in the bases just exchanged (or the committed ones).
            if scalingsDue {
                packError = nil
                do throws(KFACError) { try packScalings(into: scalings.base, count: scalingCount) } catch { packError = error }
                let status = allreduceSum(scalings.base, scalingCount)
                guard status == 0 else {
                    throw KFACError(.callback, "the scaling allreduce returned \(status); the handle is unchanged")
                }
                if let packError { throw packError }
                try unpackScalings(from: scalings.base, count: scalingCount)
            }
        } catch {
            if statisticsDue {
                var r = StateReader(UnsafeRawBufferPointer(start: snapshot.base, count: snapshotBytes))
                for k in estimator.blocks.indices {
                    let c = estimator.blocks[k]
                    // Reads back what this call wrote; it cannot fail validation.
                    try? c.input.restoreStatistics(from: &r)
                    try? c.output.restoreStatistics(from: &r)
                }
                if let links = tridiagonal {
                    for i in 0..<links.links.count {
                        try? links.links[i].inputs.restoreExchanged(from: &r)
                        try? links.links[i].gradients.restoreExchanged(from: &r)
                    }
                }
            }
            distributed.prepared = before.prepared
            distributed.preparedScaling = before.scaling
            distributed.preparedLinks = before.links
            distributed.statisticsReduced = before.reduced
            estimator.statisticsStarted = before.started
            throw error
        }
    }
}
