// The element loops of convolution statistics: patch (im2col) rows, pixel rows for SUA, and
// channel rows of output gradients. Like LinearAlgebra.swift, they are `KFACScalar`
// requirements implemented once here, so that generic callers run specialised loops.

extension KFACScalar {
    /// The receptive-field patches of examples [first, first + count) for conv group `group`, as
    /// rows (n, oh, ow) of `patchSize` values ordered like the flattened weight [c][i][j]
    /// (zeros where the kernel reaches into the padding).
    public static func extractPatchRows(
        _ x: UnsafePointer<Self>, geometry g: Conv2dGeometry, group: Int, first: Int, count: Int,
        into out: UnsafeMutablePointer<Self>
    ) {
        let (cin, h, w) = (g.inChannels, g.inputHeight, g.inputWidth)
        let (kh, kw, cg) = (g.kernelHeight, g.kernelWidth, g.groupInChannels)
        let (dh, dw) = (g.dilationHeight, g.dilationWidth)
        let channelOffset = group * cg
        // Element strides of a channel and of a pixel in an example: the layout is decided once
        // here, not per element.
        let (channelStride, pixelStride) = g.layout == .channelsLast ? (1, cin) : (h * w, 1)
        var row = out
        for n in first..<(first + count) {
            let example = x + n * cin * h * w + channelOffset * channelStride
            for oh in 0..<g.outputHeight {
                let top = oh * g.strideHeight - g.paddingHeight
                for ow in 0..<g.outputWidth {
                    let left = ow * g.strideWidth - g.paddingWidth
                    // The kernel's columns all inside the image: no test per element.
                    let inside = left >= 0 && left + (kw - 1) * dw < w
                    for c in 0..<cg {
                        let channel = example + c * channelStride
                        for i in 0..<kh {
                            let y = top + i * dh
                            let destination = row + (c * kh + i) * kw
                            guard y >= 0 && y < h else {
                                destination.initialize(repeating: 0, count: kw)
                                continue
                            }
                            // An offset, not a pointer: `left` may be negative (padding).
                            let start = (y * w + left) * pixelStride, step = dw * pixelStride
                            if inside {
                                for j in 0..<kw { destination[j] = channel[start + j * step] }
                            } else {
                                for j in 0..<kw {
                                    let xx = left + j * dw
                                    destination[j] = xx >= 0 && xx < w ? channel[start + j * step] : 0
                                }
                            }
                        }
                    }
                    row += g.patchSize
                }
            }
        }
    }

    /// SUA's pixel rows of examples [first, first + count) for conv group `group`: for every
    /// pixel of `pixels` (flat indices y·W + x), its channel vector times that pixel's scale.
    public static func extractPixelRows(
        _ x: UnsafePointer<Self>, geometry g: Conv2dGeometry, group: Int, first: Int, count: Int,
        pixels: UnsafePointer<Int>, scales: UnsafePointer<Self>, pixelCount: Int,
        into out: UnsafeMutablePointer<Self>
    ) {
        let (cin, hw, cg) = (g.inChannels, g.inputHeight * g.inputWidth, g.groupInChannels)
        let channelOffset = group * cg
        var row = out
        for n in first..<(first + count) {
            let example = x + n * cin * hw
            for k in 0..<pixelCount {
                let (p, s) = (pixels[k], scales[k])
                if g.layout == .channelsLast {
                    let source = example + p * cin + channelOffset
                    for c in 0..<cg { row[c] = s * source[c] }
                } else {
                    let source = example + channelOffset * hw + p
                    for c in 0..<cg { row[c] = s * source[c * hw] }
                }
                row += cg
            }
        }
    }

    /// Output-gradient rows (n, t) of channels [firstChannel, firstChannel + channels) from a
    /// channels-first buffer [N][totalChannels][positions], for examples [first, first + count).
    public static func gatherChannelRows(
        _ g: UnsafePointer<Self>, totalChannels: Int, positions: Int, firstChannel: Int, channels: Int,
        first: Int, count: Int, into out: UnsafeMutablePointer<Self>
    ) {
        var row = out
        for n in first..<(first + count) {
            let example = g + (n * totalChannels + firstChannel) * positions
            for t in 0..<positions {
                for c in 0..<channels { row[c] = example[c * positions + t] }
                row += channels
            }
        }
    }

    /// SUA's gradient matrix, columns in (offset, channel) order: v[o][k·C + c] = w[o][c·taps + k],
    /// then the bias as the last column if given.
    public static func gatherOffsetMajor(
        weight w: UnsafePointer<Self>, bias b: UnsafePointer<Self>?, rows: Int, channels: Int, taps: Int,
        into v: UnsafeMutablePointer<Self>
    ) {
        let p = channels * taps, stride = p + (b == nil ? 0 : 1)
        for o in 0..<rows {
            let source = w + o * p, destination = v + o * stride
            for c in 0..<channels {
                for k in 0..<taps { destination[k * channels + c] = source[c * taps + k] }
            }
            if let b { destination[p] = b[o] }
        }
    }

    /// The inverse of `gatherOffsetMajor`, times `scale`.
    public static func scatterOffsetMajor(
        _ u: UnsafePointer<Self>, scale: Self, weight w: UnsafeMutablePointer<Self>, bias b: UnsafeMutablePointer<Self>?,
        rows: Int, channels: Int, taps: Int
    ) {
        let p = channels * taps, stride = p + (b == nil ? 0 : 1)
        for o in 0..<rows {
            let source = u + o * stride, destination = w + o * p
            for c in 0..<channels {
                for k in 0..<taps { destination[c * taps + k] = scale * source[k * channels + c] }
            }
            if let b { b[o] = scale * source[p] }
        }
    }
}
