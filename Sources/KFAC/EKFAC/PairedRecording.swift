/// A layer kind that records paired rows — inputs and output gradients of the same examples —
/// so that EKFAC can form per-example gradients. A paired call also records A and G exactly as
/// the two unpaired calls do.
protocol PairedRecordingLayer<Scalar>: CurvatureLayer {
    /// Records `rows` rows of inputs and of output gradients (the latter multiplied by `scale`)
    /// into the factors and, when `keep`, into each block's `PairedStatistics`: as rows when
    /// an example is one row (or `perExample` is false: per-row mode), else as per-example
    /// gradients of `rowsPerExample` rows. Values are validated. On error nothing changed.
    func recordPaired(_ x: UnsafePointer<Scalar>, _ g: UnsafePointer<Scalar>, rows: Int, rowsPerExample: Int,
                      scale: Scalar, perExample: Bool, keep: Bool, ones: AlignedBuffer<Scalar>) throws(KFACError)
}

extension KroneckerBlock {
    /// The block's paired statistics, created on first use.
    func pairedStatistics() throws(KFACError) -> PairedStatistics<Scalar> {
        if let p = paired { return p }
        let p = try PairedStatistics<Scalar>(inputDimension: input.dimension, outputDimension: output.dimension)
        paired = p
        return p
    }
}

extension DenseLayer: PairedRecordingLayer {
    /// Rows ā_r = [a_r; 1] and g_r, in examples of T = `rowsPerExample` consecutive rows (per-example
    /// mode; 1 per row), or when T is large the per-example gradients G_n = Σ_t g_{n,t} ā_{n,t}ᵀ
    /// themselves (`PairedStatistics.prefersMatrices`). The divisor is the rows.
    func recordPaired(_ x: UnsafePointer<Scalar>, _ g: UnsafePointer<Scalar>, rows: Int, rowsPerExample t: Int,
                      scale: Scalar, perExample: Bool, keep: Bool, ones: AlignedBuffer<Scalar>) throws(KFACError) {
        let (i, o, bias) = (layer.inFeatures, layer.outFeatures, layer.hasBias)
        let a = i + (bias ? 1 : 0)
        let c = blocks[0]
        let unit = perExample ? t : 1
        let examples = rows / t
        var stats: PairedStatistics<Scalar>?
        var asMatrices = false
        if keep {
            let p = try c.pairedStatistics()
            asMatrices = p.prefersMatrices(unit: unit)
            try p.reserve(rows: asMatrices ? 0 : rows, matrices: asMatrices ? examples : 0, workValues: asMatrices ? t * a : 0)
            stats = p
        }
        _ = try c.output.prepareRecord(rows: rows)  // so that recording G below cannot fail
        try recordInputs(x, rows: rows, ones: ones)
        try recordOutputGradients(g, rows: rows, scale: scale, ones: ones)
        guard let p = stats else { return }

        /// ā rows of rows [first, first + count) into `out`.
        func extendedRows(_ first: Int, _ count: Int, into out: UnsafeMutablePointer<Scalar>) {
            for r in 0..<count {
                (out + r * a).update(from: x + (first + r) * i, count: i)
                if bias { out[r * a + i] = 1 }
            }
        }
        if !asMatrices {
            let (xa, ga) = p.nextRows()
            extendedRows(0, rows, into: xa)
            Scalar.scaledCopy(from: g, to: ga, count: rows * o, scale: scale)
            p.commit(rows: rows, unit: unit, matrices: 0, divisor: rows)
        } else {
            let w = p.work!.base
            for n in 0..<examples {
                extendedRows(n * t, t, into: w)
                Scalar.gemm(transA: true, transB: false, m: o, n: a, k: t, alpha: scale, a: g + n * t * o, lda: o,
                            b: w, ldb: a, beta: 0, c: p.nextMatrix(), ldc: a)
                p.commit(rows: 0, matrices: 1, divisor: 0)
            }
            p.commit(rows: 0, matrices: 0, divisor: rows)
        }
    }
}

extension Conv2dLayer: PairedRecordingLayer {
    /// Per group: the |T| patch rows of an example (KFC's [c][i][j] order, SUA's offset-major
    /// order, then 1 for the bias) and its |T| output-gradient rows; per-example gradients
    /// G_n = Σ_t g_{n,t} ā_{n,t}ᵀ, or in per-row mode every position as its own pair. The
    /// divisor is the examples (KFC's |T| split: S ≈ d_Γ d_Ωᵀ when positions are uncorrelated).
    func recordPaired(_ x: UnsafePointer<Scalar>, _ g: UnsafePointer<Scalar>, rows n: Int, rowsPerExample: Int,
                      scale: Scalar, perExample: Bool, keep: Bool, ones: AlignedBuffer<Scalar>) throws(KFACError) {
        guard rowsPerExample == 1 else {
            throw KFACError(.invalidSize, "a convolution's rows are its examples (positions come from the geometry): rows_per_example must be 1, got \(rowsPerExample)")
        }
        let geo = geometry
        let (t, p, cg) = (geo.outputPositions, geo.patchSize, geo.groupOutChannels)
        let a = p + (geo.hasBias ? 1 : 0)
        let (channels, taps) = (geo.groupInChannels, geo.kernelPositions)
        let unit = perExample ? t : 1
        if keep {
            for group in blocks.indices {
                let s = try blocks[group].pairedStatistics()
                let asMatrices = s.prefersMatrices(unit: unit)
                try s.reserve(rows: asMatrices ? 0 : n * t, matrices: asMatrices ? n : 0, workValues: t * (p + a + cg))
            }
        }
        // So that recording Γ below cannot fail once Ω changed: its pending storage, and the
        // scratch its channels-first gather uses (recording Ω only ever grows the scratch).
        for group in blocks.indices { _ = try blocks[group].output.prepareRecord(rows: n * t) }
        if geo.layout == .channelsFirst {
            _ = try scratchBuffer(values: Swift.min(n, chunkExamples(rowsPerExample: t, width: cg)) * t * cg)
        }
        try recordInputs(x, rows: n, ones: ones)
        try recordOutputGradients(g, rows: n, scale: scale, ones: ones)
        guard keep else { return }

        for group in 0..<geo.groups {
            let s = blocks[group].paired!
            let asMatrices = s.prefersMatrices(unit: unit)
            let patches = s.work!.base, extended = patches + t * p, grads = extended + t * a
            for e in 0..<n {
                Scalar.extractPatchRows(x, geometry: geo, group: group, first: e, count: 1, into: patches)
                for r in 0..<t {
                    let source = patches + r * p, destination = extended + r * a
                    switch approximation {
                    case .kfc:
                        destination.update(from: source, count: p)
                    case .sua:
                        for ch in 0..<channels {
                            for k in 0..<taps { destination[k * channels + ch] = source[ch * taps + k] }
                        }
                    }
                    if geo.hasBias { destination[p] = 1 }
                }
                if geo.layout == .channelsLast {
                    for r in 0..<t { (grads + r * cg).update(from: g + (e * t + r) * geo.outChannels + group * cg, count: cg) }
                } else {
                    Scalar.gatherChannelRows(g, totalChannels: geo.outChannels, positions: t, firstChannel: group * cg,
                                             channels: cg, first: e, count: 1, into: grads)
                }
                if !asMatrices {
                    let (xa, ga) = s.nextRows()
                    xa.update(from: extended, count: t * a)
                    Scalar.scaledCopy(from: grads, to: ga, count: t * cg, scale: scale)
                    s.commit(rows: t, unit: unit, matrices: 0, divisor: 1)
                } else {
                    Scalar.gemm(transA: true, transB: false, m: cg, n: a, k: t, alpha: scale, a: grads, lda: cg,
                                b: extended, ldb: a, beta: 0, c: s.nextMatrix(), ldc: a)
                    s.commit(rows: 0, matrices: 1, divisor: 1)
                }
            }
        }
    }
}
