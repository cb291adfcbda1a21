// Reference computations for the convolution tests, written the slow and obvious way in Double:
// loops over examples, output positions and kernel offsets, explicit block-diagonal parts and the
// SUA transform applied to an explicit KFC factor. They share no code with the library (not even
// its geometry type: `ConvCase` recomputes the output size itself).
@testable import KFAC

/// A 2-D convolution as the oracles see it (PyTorch semantics). A Conv1d of length L is a case
/// with kernel (1, k) and input (1, L).
struct ConvCase: CustomStringConvertible, Sendable {
    var inChannels: Int, outChannels: Int
    var kernelHeight: Int, kernelWidth: Int
    var strideHeight = 1, strideWidth = 1
    var paddingHeight = 0, paddingWidth = 0
    var dilationHeight = 1, dilationWidth = 1
    var groups = 1
    var hasBias = true
    var inputHeight: Int, inputWidth: Int
    /// NHWC activations and output gradients instead of NCHW.
    var channelsLast = false

    init(inChannels: Int, outChannels: Int, kernel: (Int, Int), stride: (Int, Int) = (1, 1),
         padding: (Int, Int) = (0, 0), dilation: (Int, Int) = (1, 1), groups: Int = 1,
         hasBias: Bool = true, input: (Int, Int), channelsLast: Bool = false) {
        self.inChannels = inChannels; self.outChannels = outChannels
        (kernelHeight, kernelWidth) = kernel
        (strideHeight, strideWidth) = stride
        (paddingHeight, paddingWidth) = padding
        (dilationHeight, dilationWidth) = dilation
        self.groups = groups; self.hasBias = hasBias
        (inputHeight, inputWidth) = input
        self.channelsLast = channelsLast
    }

    /// PyTorch: ⌊(H + 2p − d(k − 1) − 1) / s⌋ + 1.
    var outputHeight: Int { (inputHeight + 2 * paddingHeight - dilationHeight * (kernelHeight - 1) - 1) / strideHeight + 1 }
    var outputWidth: Int { (inputWidth + 2 * paddingWidth - dilationWidth * (kernelWidth - 1) - 1) / strideWidth + 1 }
    /// |T|, the number of output positions.
    var positions: Int { outputHeight * outputWidth }
    var inPerGroup: Int { inChannels / groups }
    var outPerGroup: Int { outChannels / groups }
    var offsets: Int { kernelHeight * kernelWidth }
    /// Length of one patch without the bias coordinate: (C_in/G)·kh·kw.
    var patchSize: Int { inPerGroup * offsets }
    /// Dimension of Ω_g.
    var omegaDimension: Int { patchSize + (hasBias ? 1 : 0) }
    /// Values of one example's input and output gradient.
    var inputCount: Int { inChannels * inputHeight * inputWidth }
    var outputCount: Int { outChannels * positions }
    /// Values of the weight [C_out][C_in/G][kh][kw].
    var weightCount: Int { outChannels * patchSize }

    var description: String {
        "conv \(inChannels)→\(outChannels) k\(kernelHeight)×\(kernelWidth) s\(strideHeight),\(strideWidth) "
            + "p\(paddingHeight),\(paddingWidth) d\(dilationHeight),\(dilationWidth) G\(groups) "
            + "bias=\(hasBias) in \(inputHeight)×\(inputWidth) \(channelsLast ? "NHWC" : "NCHW")"
    }
}

/// The oracles of the convolution tests.
enum ConvOracle {
    // MARK: Tensor access

    /// x[n, c, h, w] of a batch of inputs in the case's layout; 0 outside the image (padding).
    static func input<S: KFACScalar>(_ x: [S], _ s: ConvCase, n: Int, c: Int, h: Int, w: Int) -> Double {
        guard h >= 0, h < s.inputHeight, w >= 0, w < s.inputWidth else { return 0 }
        let index = s.channelsLast
            ? ((n * s.inputHeight + h) * s.inputWidth + w) * s.inChannels + c
            : ((n * s.inChannels + c) * s.inputHeight + h) * s.inputWidth + w
        return Double(x[index])
    }

    /// dy[n, o, oh, ow] of a batch of output gradients in the case's layout.
    static func outputGradient<S: KFACScalar>(_ dy: [S], _ s: ConvCase, n: Int, o: Int, oh: Int, ow: Int) -> Double {
        let index = s.channelsLast
            ? ((n * s.outputHeight + oh) * s.outputWidth + ow) * s.outChannels + o
            : ((n * s.outChannels + o) * s.outputHeight + oh) * s.outputWidth + ow
        return Double(dy[index])
    }

    /// An NCHW batch [n][c][h][w] rearranged as NHWC [n][h][w][c].
    static func channelsLast<S>(_ x: [S], n: Int, c: Int, h: Int, w: Int) -> [S] {
        var y = x
        for i in 0..<n { for k in 0..<c { for a in 0..<h { for b in 0..<w {
            y[((i * h + a) * w + b) * c + k] = x[((i * c + k) * h + a) * w + b]
        } } } }
        return y
    }

    // MARK: KFC factors

    /// The patch ā of example n at output position (oh, ow) for conv group `group`, in the order
    /// of the flattened weight (c, i, j), then 1 with a bias.
    static func patch<S: KFACScalar>(_ x: [S], _ s: ConvCase, n: Int, group: Int, oh: Int, ow: Int) -> [Double] {
        var v: [Double] = []
        for c in 0..<s.inPerGroup {
            for i in 0..<s.kernelHeight {
                for j in 0..<s.kernelWidth {
                    v.append(input(x, s, n: n, c: group * s.inPerGroup + c,
                                   h: oh * s.strideHeight - s.paddingHeight + i * s.dilationHeight,
                                   w: ow * s.strideWidth - s.paddingWidth + j * s.dilationWidth))
                }
            }
        }
        if s.hasBias { v.append(1) }
        return v
    }

    /// Ω_g = (1/N) Σ_n Σ_t ā_{n,t} ā_{n,t}ᵀ.
    static func omega<S: KFACScalar>(_ x: [S], _ s: ConvCase, examples: Int, group: Int) -> Dense {
        let d = s.omegaDimension
        var m = Dense(rows: d, columns: d)
        for n in 0..<examples {
            for oh in 0..<s.outputHeight {
                for ow in 0..<s.outputWidth {
                    let v = patch(x, s, n: n, group: group, oh: oh, ow: ow)
                    for i in 0..<d { for j in 0..<d { m[i, j] += v[i] * v[j] / Double(examples) } }
                }
            }
        }
        return m
    }

    /// Γ_g = (1/(N·|T|)) Σ_n Σ_t g_{n,t} g_{n,t}ᵀ over the group's output channels, every
    /// gradient multiplied by `scale` (mean reduction, loss scale).
    static func gamma<S: KFACScalar>(_ dy: [S], _ s: ConvCase, examples: Int, group: Int, scale: Double = 1) -> Dense {
        let d = s.outPerGroup
        var m = Dense(rows: d, columns: d)
        let weight = 1 / Double(examples * s.positions)
        for n in 0..<examples {
            for oh in 0..<s.outputHeight {
                for ow in 0..<s.outputWidth {
                    let g = (0..<d).map { scale * outputGradient(dy, s, n: n, o: group * d + $0, oh: oh, ow: ow) }
                    for i in 0..<d { for j in 0..<d { m[i, j] += g[i] * g[j] * weight } }
                }
            }
        }
        return m
    }

    // MARK: Gradients

    /// The gradient of example n's loss with respect to [W_g | b_g], computed as the backward
    /// pass of the convolution does it (for every weight, the sum over the output positions its
    /// tap touches), not through patches: [C_out/G] × [(C_in/G)·kh·kw (+1)].
    static func parameterGradient<S: KFACScalar>(_ x: [S], _ dy: [S], _ s: ConvCase, n: Int, group: Int) -> Dense {
        var m = Dense(rows: s.outPerGroup, columns: s.omegaDimension)
        for o in 0..<s.outPerGroup {
            let oc = group * s.outPerGroup + o
            for c in 0..<s.inPerGroup {
                for i in 0..<s.kernelHeight {
                    for j in 0..<s.kernelWidth {
                        var sum = 0.0
                        for oh in 0..<s.outputHeight {
                            for ow in 0..<s.outputWidth {
                                let h = oh * s.strideHeight - s.paddingHeight + i * s.dilationHeight
                                let w = ow * s.strideWidth - s.paddingWidth + j * s.dilationWidth
                                sum += outputGradient(dy, s, n: n, o: oc, oh: oh, ow: ow)
                                    * input(x, s, n: n, c: group * s.inPerGroup + c, h: h, w: w)
                            }
                        }
                        m[o, (c * s.kernelHeight + i) * s.kernelWidth + j] = sum
                    }
                }
            }
            if s.hasBias {
                var sum = 0.0
                for oh in 0..<s.outputHeight { for ow in 0..<s.outputWidth {
                    sum += outputGradient(dy, s, n: n, o: oc, oh: oh, ow: ow)
                } }
                m[o, s.patchSize] = sum
            }
        }
        return m
    }

    /// [W_g | b_g] of a conv weight [C_out][C_in/G][kh][kw] (row-major) and bias [C_out]: the
    /// group's output-channel rows, the bias slice as the last column.
    static func parameterMatrix<S: KFACScalar>(weight: [S], bias: [S]?, _ s: ConvCase, group: Int) -> Dense {
        var m = Dense(rows: s.outPerGroup, columns: s.patchSize + (bias == nil ? 0 : 1))
        for o in 0..<s.outPerGroup {
            let oc = group * s.outPerGroup + o
            for k in 0..<s.patchSize { m[o, k] = Double(weight[oc * s.patchSize + k]) }
            if let bias { m[o, s.patchSize] = Double(bias[oc]) }
        }
        return m
    }

    // MARK: SUA

    /// The SUA input factor from the KFC one: Ω_SUA[(c,p),(c',p')] = δ_pp' · (1/(kh·kw)) Σ_q
    /// Ω[(c,q),(c',q)] — cross-offset blocks dropped, each diagonal block replaced by their mean;
    /// the bias coordinate keeps Ω_bb and loses its cross terms.
    static func sua(_ kfc: Dense, _ s: ConvCase) -> Dense {
        let k = s.offsets
        var m = Dense(rows: kfc.rows, columns: kfc.columns)
        for c in 0..<s.inPerGroup {
            for c2 in 0..<s.inPerGroup {
                var mean = 0.0
                for q in 0..<k { mean += kfc[c * k + q, c2 * k + q] }
                mean /= Double(k)
                for p in 0..<k { m[c * k + p, c2 * k + p] = mean }
            }
        }
        if s.hasBias { m[s.patchSize, s.patchSize] = kfc[s.patchSize, s.patchSize] }
        return m
    }

    // MARK: Channel grouping

    /// The entries of m whose row and column fall in the same block (`block` maps a coordinate
    /// to its block id); zeros elsewhere.
    static func blockDiagonalPart(_ m: Dense, block: (Int) -> Int) -> Dense {
        var b = Dense(rows: m.rows, columns: m.columns)
        for i in 0..<m.rows { for j in 0..<m.columns where block(i) == block(j) { b[i, j] = m[i, j] } }
        return b
    }

    /// Block ids of the input-factor coordinates (c, offset) with `offsets` offsets per channel
    /// (1 for a dense layer): channel groups of `size` consecutive channels, the bias coordinate
    /// (`biasIndex`, if any) alone. Size 0 (no grouping): one block, bias included.
    static func inputBlocks(size: Int, offsets: Int, biasIndex: Int?) -> (Int) -> Int {
        guard size > 0 else { return { _ in 0 } }
        return { i in i == biasIndex ? -1 : (i / offsets) / size }
    }

    /// Block ids of the output-factor coordinates: groups of `size` consecutive channels.
    static func outputBlocks(size: Int) -> (Int) -> Int {
        guard size > 0 else { return { _ in 0 } }
        return { $0 / size }
    }
}
