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
    private let activePixels: [Int]
    private let pixelScales: [Scalar]
    private var scratch: AlignedBuffer<Scalar>?
    /// Per group: whether the record call in progress buffers rows (see `KroneckerFactor.prepareRecord`).
    private var recordModes: [Bool]

    static var chunkValues: Int { 1 << 23 }

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
        var blocks: [KroneckerBlock<Scalar>] = []
        for _ in 0..<g.groups { blocks.append(try KroneckerBlock(input: inputStructure, output: outputStructure)) }
        self.blocks = blocks
        recordModes = Array(repeating: false, count: g.groups)

        // Multiplicities of input rows and columns: how many (output position, kernel offset)
        // pairs read them.
        func multiplicity(size: Int, outputs: Int, kernel: Int, stride: Int, padding: Int, dilation: Int) -> [Int] {
            var m = [Int](repeating: 0, count: size)
            for o in 0..<outputs {
                for k in 0..<kernel {
                    let p = o * stride - padding + k * dilation
                    if p >= 0 && p < size { m[p] += 1 }
                }
            }
            return m
        }
        let mh = multiplicity(size: g.inputHeight, outputs: g.outputHeight, kernel: g.kernelHeight,
                              stride: g.strideHeight, padding: g.paddingHeight, dilation: g.dilationHeight)
        let mw = multiplicity(size: g.inputWidth, outputs: g.outputWidth, kernel: g.kernelWidth,
                              stride: g.strideWidth, padding: g.paddingWidth, dilation: g.dilationWidth)
        var pixels: [Int] = [], counts: [Int] = []
        if approximation == .sua {
            for y in 0..<g.inputHeight where mh[y] > 0 {
                for x in 0..<g.inputWidth where mw[x] > 0 {
                    pixels.append(y * g.inputWidth + x)
                    counts.append(mh[y] * mw[x])
                }
            }
        }
        let active = Double(pixels.count), taps = Double(g.kernelPositions)
        activePixels = pixels
        pixelScales = counts.map { Scalar((Double($0) * active / taps).squareRoot()) }
    }

    func inputValueCount(rows: Int) -> Int { rows * geometry.inChannels * geometry.inputHeight * geometry.inputWidth }
    func outputGradientValueCount(rows: Int) -> Int { rows * geometry.outChannels * geometry.outputPositions }
    var weightCount: Int { geometry.outChannels * geometry.patchSize }

    /// Rows per example the input factor records, and their width.
    private var inputRowsPerExample: Int { approximation == .kfc ? geometry.outputPositions : activePixels.count }
    private var inputRowWidth: Int { approximation == .kfc ? geometry.patchSize : geometry.groupInChannels }

    func pendingBound(largest: Double, rows: Int, outputSide: Bool, scale: Double) -> Double {
        let factor = outputSide ? blocks[0].output : blocks[0].input
        let perExample = outputSide ? geometry.outputPositions : inputRowsPerExample
        // Input rows are scaled by at most √|T| (KFC) or √P (SUA, m ≤ kh·kw); bias entries by as much.
        let rowScale2 = outputSide ? scale * scale : Double(perExample)
        let m = Swift.max(largest * largest, 1)
        return m * rowScale2 * Double(factor.pendingRows + rows * perExample)
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
                    activePixels.withUnsafeBufferPointer { pixels in
                        pixelScales.withUnsafeBufferPointer { scales in
                            Scalar.extractPixelRows(x, geometry: g, group: group, first: first, count: count,
                                                    pixels: pixels.baseAddress!, scales: scales.baseAddress!,
                                                    pixelCount: pixels.count, into: buffer.base)
                        }
                    }
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
        let chunk = Swift.min(n, chunkExamples(rowsPerExample: t, width: cg))
        let buffer = try scratchBuffer(values: chunk * t * cg)
        for group in 0..<g.groups {
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
