/// The kinds of layers the library has curvature blocks for (`kfac_layer_kind`).
public enum LayerKind: Int32, Sendable {
    case dense = 1
    case conv2d = 2
}

/// What a layer is: enough to rebuild its block, and to check that a state image belongs to it.
public enum LayerDescription: Equatable, Sendable {
    case dense(inFeatures: Int, outFeatures: Int, hasBias: Bool, grouping: ChannelGrouping)
    case conv2d(Conv2dGeometry, approximation: ConvApproximation, grouping: ChannelGrouping)

    public var kind: LayerKind {
        switch self {
        case .dense: return .dense
        case .conv2d: return .conv2d
        }
    }

    public var hasBias: Bool {
        switch self {
        case .dense(_, _, let bias, _): return bias
        case .conv2d(let g, _, _): return g.hasBias
        }
    }

    /// Input features (dense) or input channels (conv).
    public var inFeatures: Int {
        switch self {
        case .dense(let i, _, _, _): return i
        case .conv2d(let g, _, _): return g.inChannels
        }
    }

    /// Output features (dense) or output channels (conv).
    public var outFeatures: Int {
        switch self {
        case .dense(_, let o, _, _): return o
        case .conv2d(let g, _, _): return g.outChannels
        }
    }

    /// Independent Kronecker blocks of the layer (conv groups; 1 for dense).
    public var groups: Int {
        switch self {
        case .dense: return 1
        case .conv2d(let g, _, _): return g.groups
        }
    }

    /// Dimension of the input-side factor A of one group.
    public var inputFactorDimension: Int {
        switch self {
        case .dense(let i, _, let bias, _): return i + (bias ? 1 : 0)
        case .conv2d(let g, _, _): return g.patchSize + (g.hasBias ? 1 : 0)
        }
    }

    /// Dimension of the output-side factor G of one group.
    public var outputFactorDimension: Int { outFeatures / groups }

    /// The description as integers, for state images: kind, then its sizes and options.
    var fields: [Int] {
        switch self {
        case .dense(let i, let o, let bias, let grouping):
            return [Int(LayerKind.dense.rawValue), i, o, bias ? 1 : 0, grouping.inputGroupSize, grouping.outputGroupSize]
        case .conv2d(let g, let approximation, let grouping):
            return [Int(LayerKind.conv2d.rawValue), g.inChannels, g.outChannels, g.kernelHeight, g.kernelWidth,
                    g.strideHeight, g.strideWidth, g.paddingHeight, g.paddingWidth, g.dilationHeight, g.dilationWidth,
                    g.groups, g.hasBias ? 1 : 0, g.inputHeight, g.inputWidth, Int(g.layout.rawValue),
                    Int(approximation.rawValue), grouping.inputGroupSize, grouping.outputGroupSize]
        }
    }

    /// The description `fields` encodes, if it is well formed.
    init?(fields f: [Int]) {
        guard let kind = f.first.flatMap({ Int32(exactly: $0) }).flatMap(LayerKind.init(rawValue:)) else { return nil }
        switch kind {
        case .dense:
            guard f.count == 6 else { return nil }
            self = .dense(inFeatures: f[1], outFeatures: f[2], hasBias: f[3] == 1,
                          grouping: ChannelGrouping(inputGroupSize: f[4], outputGroupSize: f[5]))
        case .conv2d:
            guard f.count == 19, let layout = Int32(exactly: f[15]).flatMap(TensorLayout.init(rawValue:)),
                  let approximation = Int32(exactly: f[16]).flatMap(ConvApproximation.init(rawValue:)) else { return nil }
            let g = Conv2dGeometry(inChannels: f[1], outChannels: f[2], kernel: (f[3], f[4]), stride: (f[5], f[6]),
                                   padding: (f[7], f[8]), dilation: (f[9], f[10]), groups: f[11], hasBias: f[12] == 1,
                                   input: (f[13], f[14]), layout: layout)
            self = .conv2d(g, approximation: approximation, grouping: ChannelGrouping(inputGroupSize: f[17], outputGroupSize: f[18]))
        }
    }
}

extension LayerDescription: CustomStringConvertible {
    public var description: String {
        switch self {
        case .dense(let i, let o, let bias, let grouping):
            return "dense \(i)→\(o)\(bias ? " with bias" : "")\(grouping == .init() ? "" : " grouped \(grouping.inputGroupSize)/\(grouping.outputGroupSize)")"
        case .conv2d(let g, let approximation, let grouping):
            return "conv \(g.inChannels)→\(g.outChannels) \(g.kernelHeight)×\(g.kernelWidth) on \(g.inputHeight)×\(g.inputWidth), groups \(g.groups), \(approximation)\(grouping == .init() ? "" : " grouped \(grouping.inputGroupSize)/\(grouping.outputGroupSize)")"
        }
    }
}

/// A registered layer as seen from outside: its description and how far its curvature is.
public struct LayerInfo: Equatable, Sendable {
    public var layer: LayerDescription
    public var hasFactors: Bool
    public var hasInverses: Bool
}
