/// How the coordinates of one Kronecker factor split into diagonal blocks.
///
/// Statistics are recorded as rows of `recordedWidth` values whose coordinates form the distinct
/// ("unique") blocks, each kept as its own symmetric matrix. The factor the curvature uses has
/// `dimension` coordinates tiled by copies of those blocks:
/// - a dense factor is one block, tiled once;
/// - channel grouping (Laurent et al. 2018, §2.2) makes consecutive groups of coordinates
///   separate blocks, with a bias coordinate as its own 1×1 block;
/// - SUA (§2.1) records channel statistics once and tiles them over the kernel offsets: the
///   factor I_{kh·kw} ⊗ C (in offset-major order), plus the bias block.
/// Off-block entries are zero. Inverting the factor inverts each unique block once.
struct FactorStructure: Equatable, Sendable {
    /// Sizes of the unique blocks, in recorded-row order.
    let uniqueSizes: [Int]
    /// Where each unique block starts within a recorded row.
    let uniqueOffsets: [Int]
    /// Where each unique block's size×size matrix starts in block storage.
    let storageOffsets: [Int]
    /// Σ uniqueSizes.
    let recordedWidth: Int
    /// Σ size²: the values of one block-diagonal matrix in block storage.
    let storageCount: Int
    /// The factor's blocks along its own coordinates: (first coordinate, unique block).
    let tiles: [Tile]
    /// The factor's dimension (coordinates of the gradient matrix on this side).
    let dimension: Int
    /// For each coordinate, its index in the layer's own parameter order, when the two differ
    /// (SUA orders coordinates offset-major, the weight is channel-major); nil when they agree.
    let externalIndex: [Int]?

    struct Tile: Equatable, Sendable {
        let offset: Int
        let unique: Int
    }

    private init(uniqueSizes: [Int], tiles: [(Int, Int)], externalIndex: [Int]? = nil) {
        self.externalIndex = externalIndex
        self.uniqueSizes = uniqueSizes
        var offsets: [Int] = [], storage: [Int] = []
        var o = 0, s = 0
        for b in uniqueSizes {
            offsets.append(o); storage.append(s)
            o += b; s += b * b
        }
        uniqueOffsets = offsets
        storageOffsets = storage
        recordedWidth = o
        storageCount = s
        self.tiles = tiles.map { Tile(offset: $0.0, unique: $0.1) }
        dimension = tiles.map { $0.0 + uniqueSizes[$0.1] }.max() ?? 0
    }

    /// One full block of dimension d.
    static func dense(_ d: Int) -> FactorStructure {
        FactorStructure(uniqueSizes: [d], tiles: [(0, 0)])
    }

    /// `count` coordinates in groups of `groupSize` (the last may be smaller), then a bias
    /// coordinate as its own block if `bias`. A group size of 0, or one not smaller than
    /// `count`, means no grouping: one block including the bias coordinate.
    static func grouped(count: Int, groupSize: Int, bias: Bool) -> FactorStructure {
        guard groupSize > 0 && groupSize < count else { return .dense(count + (bias ? 1 : 0)) }
        var sizes: [Int] = []
        var start = 0
        while start < count {
            sizes.append(Swift.min(groupSize, count - start))
            start += groupSize
        }
        if bias { sizes.append(1) }
        return FactorStructure(uniqueSizes: sizes, tiles: sizes.indices.map { (sizes[0..<$0].reduce(0, +), $0) })
    }

    /// SUA: `channels` channel coordinates (grouped by `groupSize` channels as in `grouped`)
    /// tiled `repeats` times (once per kernel offset, offset-major), then the bias block.
    static func spatiallyUncorrelated(channels: Int, groupSize: Int, repeats: Int, bias: Bool) -> FactorStructure {
        let channelBlocks = grouped(count: channels, groupSize: groupSize, bias: false).uniqueSizes
        var sizes = channelBlocks
        if bias { sizes.append(1) }
        var tiles: [(Int, Int)] = []
        for p in 0..<repeats {
            var offset = p * channels
            for (q, b) in channelBlocks.enumerated() {
                tiles.append((offset, q))
                offset += b
            }
        }
        if bias { tiles.append((repeats * channels, sizes.count - 1)) }
        // Coordinate p·channels + c is weight coordinate c·repeats + p; the bias stays last.
        var external: [Int] = []
        for p in 0..<repeats { for c in 0..<channels { external.append(c * repeats + p) } }
        if bias { external.append(repeats * channels) }
        return FactorStructure(uniqueSizes: sizes, tiles: tiles, externalIndex: external)
    }
}
