/// When a distributed run reduces its statistics (`kfac_distributed_reduce`).
public enum DistributedReduce: Int32, Sendable, CaseIterable {
    /// The pending statistics (sums and row counts) before every factor update: the factors are
    /// those of the union batch, for any local batch sizes.
    case eager = 0
    /// Only before an inverse update, the ranks' running factors averaged (kfac-jax's lazy
    /// mode): the union batch's factors when every rank records the same number of rows.
    case lazy = 1
}

extension ParameterSpec {
    /// Distributed runs (500–599).
    static let distributedParameters: [ParameterSpec] = [
        ParameterSpec(.distributedReduce, "distributed_reduce", .int, .distributed, lower: 0, upper: 1,
                      default: 0, effect: .nextStep,
                      read: { Double($0.distributedReduce.rawValue) },
                      write: { $0.distributedReduce = DistributedReduce(rawValue: Int32($1)) ?? .eager }),
    ]
}
