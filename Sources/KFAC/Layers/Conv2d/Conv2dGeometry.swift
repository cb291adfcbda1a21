/// Where the channel dimension sits in activation buffers (`kfac_layout`).
public enum TensorLayout: Int32, Sendable, CaseIterable {
    /// [N][C][H][W] (PyTorch).
    case channelsFirst = 0
    /// [N][H][W][C] (TensorFlow, JAX).
    case channelsLast = 1
}

/// How a convolution's input-side factor is approximated (`kfac_conv_approximation`).
public enum ConvApproximation: Int32, Sendable, CaseIterable {
    /// KFC (Grosse & Martens 2016): the full second moment of the receptive-field patches.
    case kfc = 0
    /// Spatially uncorrelated activations (Laurent et al. 2018, §2.1): I_{kh·kw} ⊗ C with C the
    /// channel second moment, the mean of KFC's diagonal (same-offset) blocks.
    case sua = 1
}

/// A 2-D convolution as PyTorch defines it: weight [outChannels][inChannels/groups][kh][kw],
/// bias [outChannels], output size (H + 2·padding − dilation·(kernel − 1) − 1) / stride + 1.
/// A 1-D convolution over length L is the 1×L case (kernel (1, k), input (1, L)).
public struct Conv2dGeometry: Equatable, Sendable {
    public var inChannels: Int
    public var outChannels: Int
    public var kernelHeight: Int
    public var kernelWidth: Int
    public var strideHeight: Int
    public var strideWidth: Int
    public var paddingHeight: Int
    public var paddingWidth: Int
    public var dilationHeight: Int
    public var dilationWidth: Int
    public var groups: Int
    public var hasBias: Bool
    public var inputHeight: Int
    public var inputWidth: Int
    public var layout: TensorLayout

    public init(inChannels: Int, outChannels: Int, kernel: (Int, Int), stride: (Int, Int) = (1, 1),
                padding: (Int, Int) = (0, 0), dilation: (Int, Int) = (1, 1), groups: Int = 1,
                hasBias: Bool = true, input: (Int, Int), layout: TensorLayout = .channelsFirst) {
        self.inChannels = inChannels
        self.outChannels = outChannels
        (kernelHeight, kernelWidth) = kernel
        (strideHeight, strideWidth) = stride
        (paddingHeight, paddingWidth) = padding
        (dilationHeight, dilationWidth) = dilation
        self.groups = groups
        self.hasBias = hasBias
        (inputHeight, inputWidth) = input
        self.layout = layout
    }

    public var outputHeight: Int {
        (inputHeight + 2 * paddingHeight - dilationHeight * (kernelHeight - 1) - 1) / strideHeight + 1
    }
    public var outputWidth: Int {
        (inputWidth + 2 * paddingWidth - dilationWidth * (kernelWidth - 1) - 1) / strideWidth + 1
    }
    /// |T|: output positions per example.
    public var outputPositions: Int { outputHeight * outputWidth }
    public var kernelPositions: Int { kernelHeight * kernelWidth }
    public var groupInChannels: Int { inChannels / groups }
    public var groupOutChannels: Int { outChannels / groups }
    /// Weights per output channel: (inChannels/groups)·kh·kw.
    public var patchSize: Int { groupInChannels * kernelPositions }

    /// Throws `.invalidSize` or `.sizeOverflow` naming the first inconsistent value.
    func validate() throws(KFACError) {
        func check(_ ok: Bool, _ message: String) throws(KFACError) {
            if !ok { throw KFACError(.invalidSize, message) }
        }
        try check(inChannels >= 1 && outChannels >= 1, "channels must be >= 1, got \(inChannels) in, \(outChannels) out")
        try check(kernelHeight >= 1 && kernelWidth >= 1, "kernel must be >= 1, got \(kernelHeight)×\(kernelWidth)")
        try check(strideHeight >= 1 && strideWidth >= 1, "stride must be >= 1, got \(strideHeight)×\(strideWidth)")
        try check(dilationHeight >= 1 && dilationWidth >= 1, "dilation must be >= 1, got \(dilationHeight)×\(dilationWidth)")
        try check(paddingHeight >= 0 && paddingWidth >= 0, "padding must be >= 0, got \(paddingHeight)×\(paddingWidth)")
        try check(groups >= 1 && inChannels % groups == 0 && outChannels % groups == 0,
                  "groups (\(groups)) must divide in_channels (\(inChannels)) and out_channels (\(outChannels))")
        try check(inputHeight >= 1 && inputWidth >= 1, "input size must be >= 1, got \(inputHeight)×\(inputWidth)")
        let limit = 1 << 30
        guard [inChannels, outChannels, kernelHeight, kernelWidth, strideHeight, strideWidth, paddingHeight,
               paddingWidth, dilationHeight, dilationWidth, inputHeight, inputWidth].allSatisfy({ $0 <= limit }) else {
            throw KFACError(.sizeOverflow, "a convolution size exceeds 2^30")
        }
        try check(inputHeight + 2 * paddingHeight >= dilationHeight * (kernelHeight - 1) + 1
                  && inputWidth + 2 * paddingWidth >= dilationWidth * (kernelWidth - 1) + 1,
                  "the kernel (with dilation) does not fit the padded \(inputHeight)×\(inputWidth) input")
        // Every product the library forms from the sizes must stay within 32-bit BLAS sizes.
        func product(_ values: Int...) -> Int? {
            var p = 1
            for v in values {
                let (q, overflow) = p.multipliedReportingOverflow(by: v)
                guard !overflow, q <= Int(Int32.max) else { return nil }
                p = q
            }
            return p
        }
        guard product(groupInChannels, kernelHeight, kernelWidth) != nil,
              product(inChannels, inputHeight, inputWidth) != nil,
              product(outChannels, outputHeight, outputWidth) != nil else {
            throw KFACError(.sizeOverflow, "a convolution's patch or example exceeds 2^31 − 1 values")
        }
    }
}
