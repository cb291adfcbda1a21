/// The output-space Hessian B of the per-example loss (for the library's three distributions it
/// is also the output Fisher, see `OutputFisher`) and its square root: the handle-free helpers
/// of the Gauss-Newton products (`kfac_gn_output_hessian_*`).
///
///   categorical (softmax cross-entropy): B = diag(p) − p pᵀ,   S = diag(√p) − p √pᵀ
///   bernoulli (independent sigmoids):    B = diag(p(1 − p)),   S = diag(√(p(1 − p)))
///   gaussian (½‖y − μ‖²):                 B = I,                S = I
///
/// S is dim×dim with S Sᵀ = B (K = dim columns for every distribution; the categorical S has
/// rank dim − 1). Everything is per example of the SUMMED loss; arithmetic in Double.
public enum OutputHessian {
    /// u = B q for every row: outputs z, vectors q and products u are [rows][dim] row-major.
    /// `products` may be `vectors`.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    public static func multiply<S: KFACScalar>(
        distribution: OutputDistribution, outputs z: UnsafePointer<S>, vectors q: UnsafePointer<S>,
        rows: Int, dim: Int, into u: UnsafeMutablePointer<S>
    ) {
        for n in 0..<rows {
            let row = n * dim
            switch distribution {
            case .gaussian:
                if UnsafePointer(u) != q { (u + row).update(from: q + row, count: dim) }
            case .bernoulli:
                for i in 0..<dim {
                    let p = OutputFisher.logistic(Double(z[row + i]))
                    u[row + i] = S(p * (1 - p) * Double(q[row + i]))
                }
            case .categorical:
                let (m, total) = OutputFisher.softmaxNormalizer(z + row, dim: dim)
                var pq = 0.0
                for i in 0..<dim { pq += LibM.exp(Double(z[row + i]) - m) / total * Double(q[row + i]) }
                for i in 0..<dim {
                    let p = LibM.exp(Double(z[row + i]) - m) / total
                    u[row + i] = S(p * (Double(q[row + i]) - pq))
                }
            }
        }
    }

    /// The K = dim columns of S_n for every row, [dim][rows][dim]: column k of example n is
    /// columns[(k·rows + n)·dim ..< +dim], so each block [k] is a batch of output gradients.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    public static func squareRoot<S: KFACScalar>(
        distribution: OutputDistribution, outputs z: UnsafePointer<S>, rows: Int, dim: Int,
        into columns: UnsafeMutablePointer<S>
    ) {
        columns.initialize(repeating: 0, count: dim * rows * dim)
        for n in 0..<rows {
            let row = n * dim
            func column(_ k: Int) -> UnsafeMutablePointer<S> { columns + (k * rows + n) * dim }
            switch distribution {
            case .gaussian:
                for k in 0..<dim { column(k)[k] = 1 }
            case .bernoulli:
                for k in 0..<dim {
                    let p = OutputFisher.logistic(Double(z[row + k]))
                    column(k)[k] = S((p * (1 - p)).squareRoot())
                }
            case .categorical:
                // Column k: √p_k (e_k − p).
                let (m, total) = OutputFisher.softmaxNormalizer(z + row, dim: dim)
                for k in 0..<dim {
                    let pk = LibM.exp(Double(z[row + k]) - m) / total, root = pk.squareRoot()
                    let c = column(k)
                    for i in 0..<dim {
                        let pi = LibM.exp(Double(z[row + i]) - m) / total
                        c[i] = S(root * ((i == k ? 1 : 0) - pi))
                    }
                }
            }
        }
    }
}
