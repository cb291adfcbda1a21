/// A 2-D convolution layer (KFC, Grosse & Martens 2016), one Kronecker block per
/// convolution group g:
///
///     Ω_g = (1/N) Σ_n Σ_t ā_{n,t} ā_{n,t}ᵀ,   Γ_g = (1/(N·|T|)) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ,
///
/// ā the receptive-field patch at output position t (ordered like the flattened weight, then 1
/// for the bias), g the output gradient there, |T| the output positions. The factors see the
/// patches as N·|T| rows scaled by √|T| (and the gradients as N·|T| rows), which the factor
/// machinery averages.
///
/// SUA replaces Ω_g by I_{kh·kw} ⊗ C_g plus a 1×1 bias block |T|, C_g the mean over kernel
/// offsets of Ω_g's diagonal blocks: (1/(N·kh·kw)) Σ_n Σ_pixels m(pixel) x xᵀ with m the number
/// of (position, offset) pairs that read the pixel, so no patch matrix is formed. The gradient
/// matrix of a group is then ordered (offset, channel) so that I ⊗ C is block diagonal.
///
/// Patches (and pixel rows) are formed for chunks of examples of at most `chunkValues` values
/// (or one example), so memory stays bounded whatever the batch.
final class Conv2dLayer<Scalar: KFACScalar>: CurvatureLayer {
    let layer: LayerDescription
    let blocks: [KroneckerBlock<Scalar>]
    let geometry: Conv2dGeometry
    let approximation: ConvApproximation
    /// SUA: the pixels read by at least one kernel tap, and their row scales sqrt(m·P/(kh·kw)).
    private let activePixels: HeapArray<Int>
    private let pixelScales: HeapArray<Scalar>
    private var scratch: AlignedBuffer<Scalar>?
    /// Per group: whether the record call in progress buffers rows (see `KroneckerFactor.prepareRecord`).
    private var recordModes: [Bool]

    static var chunkValues: Int { 1 << 23 }
    /// Output positions from which a channels-first example's gradients are recorded by one syrk
    /// of its own (`KroneckerFactor.addColumns`) rather than gathered into rows first.
    static var columnRecordMinimumPositions: Int { 16 }

    init(_ geometry: Conv2dGeometry, approximation: ConvApproximation, grouping: ChannelGrouping) throws(KFACError) {
        try geometry.validate()
        self.geometry = geometry
        self.approximation = approximation
        layer = .conv2d(geometry, approximation: approximation, grouping: grouping)
        let g = geometry
        let inputStructure: FactorStructure
        switch approximation {
        case .kfc:
            // A channel group covers its channels' kh·kw coordinates, contiguous in [c][i][j] order.
            let channels = grouping.inputGroupSize < g.groupInChannels ? grouping.inputGroupSize : 0  // 0 = none
            inputStructure = .grouped(count: g.patchSize, groupSize: channels * g.kernelPositions, bias: g.hasBias)
        case .sua:
            inputStructure = .spatiallyUncorrelated(channels: g.groupInChannels, groupSize: grouping.inputGroupSize,
                                                    repeats: g.kernelPositions, bias: g.hasBias)
        }
        let outputStructure = FactorStructure.grouped(count: g.groupOutChannels, groupSize: grouping.outputGroupSize, bias: false)
        // Many groups are many small objects, which a Swift array cannot allocate fallibly.
        try probeAllocation(bytes: g.groups.multipliedReportingOverflow(by: 4096).partialValue, what: "\(g.groups) groups")
        var blocks: [KroneckerBlock<Scalar>] = []
        for _ in 0..<g.groups { blocks.append(try KroneckerBlock(input: inputStructure, output: outputStructure)) }
        self.blocks = blocks
        recordModes = Array(repeating: false, count: g.groups)

        guard approximation == .sua else {
            activePixels = try HeapArray(count: 0)
            pixelScales = try HeapArray(count: 0)
            return
        }
        let mh = try Self.multiplicity(size: g.inputHeight, outputs: g.outputHeight, kernel: g.kernelHeight,
                                       stride: g.strideHeight, padding: g.paddingHeight, dilation: g.dilationHeight)
        let mw = try Self.multiplicity(size: g.inputWidth, outputs: g.outputWidth, kernel: g.kernelWidth,
                                       stride: g.strideWidth, padding: g.paddingWidth, dilation: g.dilationWidth)
        var activeRows = 0, activeColumns = 0
        for y in 0..<g.inputHeight where mh[y] > 0 { activeRows += 1 }
        for x in 0..<g.inputWidth where mw[x] > 0 { activeColumns += 1 }
        let pixels = try HeapArray<Int>(count: activeRows * activeColumns)
        let scales = try HeapArray<Scalar>(count: activeRows * activeColumns)
        let active = Double(pixels.count), taps = Double(g.kernelPositions)
        var i = 0
        for y in 0..<g.inputHeight where mh[y] > 0 {
            for x in 0..<g.inputWidth where mw[x] > 0 {
                pixels[i] = y * g.inputWidth + x
                scales[i] = Scalar((Double(mh[y] * mw[x]) * active / taps).squareRoot())
                i += 1
            }
        }
        activePixels = pixels
        pixelScales = scales
    }

    /// Multiplicities of input rows (or columns): how many (output position, kernel offset)
    /// pairs read each. O(size + kernel): for each kernel offset the positions it reads form an
    /// arithmetic progression with step `stride`, added through a difference array along that
    /// step (a loop over outputs × kernel took minutes for long 1-D inputs and wide kernels).
    static func multiplicity(size: Int, outputs: Int, kernel: Int, stride: Int, padding: Int,
                             dilation: Int) throws(KFACError) -> HeapArray<Int> {
        let m = try HeapArray<Int>(count: size)
        for k in 0..<kernel {
            let c = k * dilation - padding  // position read by output o: o·stride + c
            let first = c >= 0 ? 0 : (-c + stride - 1) / stride
            guard size - 1 - c >= 0 else { continue }
            let last = Swift.min(outputs - 1, (size - 1 - c) / stride)
            guard first <= last else { continue }
            m[first * stride + c] += 1
            let end = (last + 1) * stride + c
            if end < size { m[end] -= 1 }
        }
        if stride < size {
            for p in stride..<size { m[p] += m[p - stride] }
        }
        return m
    }

    func inputValueCount(rows: Int) -> Int { rows * geometry.inChannels * geometry.inputHeight * geometry.inputWidth }
    func outputGradientValueCount(rows: Int) -> Int { rows * geometry.outChannels * geometry.outputPositions }
    var weightCount: Int { geometry.outChannels * geometry.patchSize }

    /// Rows per example the input factor records, and their width.
    private var inputRowsPerExample: Int { approximation == .kfc ? geometry.outputPositions : activePixels.count }
    private var inputRowWidth: Int { approximation == .kfc ? geometry.patchSize : geometry.groupInChannels }

    func pendingBound(largest: Double, rows: Int, outputSide: Bool, scale: Double) -> Double {
        let perExample = outputSide ? geometry.outputPositions : inputRowsPerExample
        // Input rows are scaled by at most √|T| (KFC) or √P (SUA, m ≤ kh·kw); bias entries by as much.
        let rowScale2 = outputSide ? scale * scale : Double(perExample)
        let m = Swift.max(largest * largest, 1)
        return m * rowScale2 * Double(rows) * Double(perExample)
    }

    func recordedRows(rows: Int, outputSide: Bool) -> Int {
        rows * (outputSide ? geometry.outputPositions : inputRowsPerExample)
    }

    /// Examples per chunk for rows of `rowsPerExample` × `width` values.
    func chunkExamples(rowsPerExample: Int, width: Int) -> Int {
        Swift.max(1, Self.chunkValues / Swift.max(1, rowsPerExample * width))
    }

    func scratchBuffer(values: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        if let s = scratch, s.count >= values { return s }
        let s = try AlignedBuffer<Scalar>(rows: 1, columns: values)
        scratch = s
        return s
    }

    func recordInputs(_ x: UnsafePointer<Scalar>, rows n: Int, ones: AlignedBuffer<Scalar>) throws(KFACError) {
        let g = geometry
        let (perExample, width) = (inputRowsPerExample, inputRowWidth)
        guard perExample > 0 else { return }
        let chunk = Swift.min(n, chunkExamples(rowsPerExample: perExample, width: width))
        let buffer = try scratchBuffer(values: chunk * perExample * width)
        for group in blocks.indices {
            recordModes[group] = try blocks[group].input.prepareRecord(rows: n * perExample)
        }
        let rootT = Scalar(Double(g.outputPositions).squareRoot())
        for group in 0..<g.groups {
            var first = 0
            while first < n {
                let count = Swift.min(chunk, n - first)
                switch approximation {
                case .kfc:
                    Scalar.extractPatchRows(x, geometry: g, group: group, first: first, count: count, into: buffer.base)
                    blocks[group].input.add(buffer.base, rows: count * perExample, width: width,
                                                appended: g.hasBias ? rootT : nil, scale: rootT, ones: ones,
                                                buffered: recordModes[group])
                case .sua:
                    Scalar.extractPixelRows(x, geometry: g, group: group, first: first, count: count,
                                            pixels: activePixels.base, scales: pixelScales.base,
                                            pixelCount: activePixels.count, into: buffer.base)
                    blocks[group].input.add(buffer.base, rows: count * perExample, width: width,
                                                appended: g.hasBias ? rootT : nil, scale: 1, ones: ones,
                                                buffered: recordModes[group])
                }
                first += count
            }
        }
    }

    func recordOutputGradients(_ gradients: UnsafePointer<Scalar>, rows n: Int, scale: Scalar, ones: AlignedBuffer<Scalar>) throws(KFACError) {
        let g = geometry
        let (t, cg) = (g.outputPositions, g.groupOutChannels)
        for group in blocks.indices {
            recordModes[group] = try blocks[group].output.prepareRecord(rows: n * t)
        }
        if g.layout == .channelsLast {
            // Rows (n, t) are already contiguous; a group is a column slice.
            for group in 0..<g.groups {
                blocks[group].output.add(gradients + group * cg, rows: n * t, width: cg, stride: g.outChannels,
                                             appended: nil, scale: scale, ones: ones, buffered: recordModes[group])
            }
            return
        }
        // Channels-first: each example's group is a contiguous [cg × t] matrix X, and the factor's
        // statistics are Σ X Xᵀ — one syrk per example, without gathering rows, when the
        // statistics are summed and an example has positions enough for a syrk to pay.
        let columnsPay = t >= Self.columnRecordMinimumPositions
        var gathering = false
        for group in 0..<g.groups where !columnsPay || recordModes[group] { gathering = true }
        // Allocated before anything is recorded, so that a failure changes nothing.
        let chunk = Swift.min(n, chunkExamples(rowsPerExample: t, width: cg))
        let buffer = gathering ? try scratchBuffer(values: chunk * t * cg) : nil
        for group in 0..<g.groups {
            guard let buffer, !columnsPay || recordModes[group] else {
                blocks[group].output.addColumns(gradients + group * cg * t, examples: n, columns: t, width: cg,
                                                exampleStride: g.outChannels * t, scale: scale)
                continue
            }
            var first = 0
            while first < n {
                let count = Swift.min(chunk, n - first)
                Scalar.gatherChannelRows(gradients, totalChannels: g.outChannels, positions: t, firstChannel: group * cg,
                                         channels: cg, first: first, count: count, into: buffer.base)
                blocks[group].output.add(buffer.base, rows: count * t, width: cg, appended: nil, scale: scale,
                                             ones: ones, buffered: recordModes[group])
                first += count
            }
        }
    }

    func gatherGradient(weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?) {
        let (cg, p) = (geometry.groupOutChannels, geometry.patchSize)
        for group in blocks.indices {
            let c = blocks[group]
            let w = weight + group * cg * p, b = bias.map { $0 + group * cg }
            switch approximation {
            case .kfc:
                gatherRows(weight: w, bias: b, rows: cg, rowLength: p, into: c.gradient.base)
            case .sua:
                Scalar.gatherOffsetMajor(weight: w, bias: b, rows: cg, channels: geometry.groupInChannels,
                                         taps: geometry.kernelPositions, into: c.gradient.base)
            }
        }
    }

    func scatterDirection(scale: Scalar, weight: UnsafeMutablePointer<Scalar>, bias: UnsafeMutablePointer<Scalar>?) {
        let (cg, p) = (geometry.groupOutChannels, geometry.patchSize)
        for group in blocks.indices {
            let c = blocks[group]
            let w = weight + group * cg * p, b = bias.map { $0 + group * cg }
            switch approximation {
            case .kfc:
                scatterRows(c.direction.base, scale: scale, weight: w, bias: b, rows: cg, rowLength: p)
            case .sua:
                Scalar.scatterOffsetMajor(c.direction.base, scale: scale, weight: w, bias: b, rows: cg,
                                          channels: geometry.groupInChannels, taps: geometry.kernelPositions)
            }
        }
    }
}
