/// Channel grouping (Laurent et al. 2018, §2.2): factors restricted to a block diagonal of
/// consecutive channel groups. 0, or a size not smaller than the channel count, means none.
public struct ChannelGrouping: Equatable, Sendable {
    /// Input channels (dense: input features) per group of the input-side factor.
    public var inputGroupSize: Int
    /// Output channels (dense: output features) per group of the output-side factor.
    public var outputGroupSize: Int

    public init(inputGroupSize: Int = 0, outputGroupSize: Int = 0) {
        self.inputGroupSize = inputGroupSize
        self.outputGroupSize = outputGroupSize
    }
}
