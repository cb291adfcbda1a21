import XCTest
@testable import KFAC

/// A linear softmax classifier z = W x + b on a fixed batch, written out for the adaptive-mode
/// oracles: its mean cross-entropy, the output gradients and parameter gradient [W | b], and its
/// exact Fisher (1/N) Σ J_nᵀ B_n J_n with J_n u = u ā_n (column-major vec of [W | b]).
struct LinearSoftmaxOracle {
    let inputs: [[Double]]   // N rows of in
    let labels: [Int]
    let out: Int
    var inF: Int { inputs[0].count }

    func logits(_ theta: Dense, _ n: Int) -> [Double] {
        (0..<out).map { o in (0..<inF).reduce(theta[o, inF]) { $0 + theta[o, $1] * inputs[n][$1] } }
    }
    func loss(_ theta: Dense) -> Double {
        inputs.indices.reduce(0.0) { $0 - LibM.log(oracleSoftmax(logits(theta, $1))[labels[$1]]) } / Double(inputs.count)
    }
    /// Output gradients of the summed loss, [N][out].
    func outputGradients(_ theta: Dense) -> [Double] {
        inputs.indices.flatMap { n in
            var p = oracleSoftmax(logits(theta, n))
            p[labels[n]] -= 1
            return p
        }
    }
    /// The gradient of the mean loss.
    func gradient(_ theta: Dense) -> Dense {
        var g = Dense(rows: out, columns: inF + 1)
        let d = outputGradients(theta), scale = 1 / Double(inputs.count)
        for n in inputs.indices {
            for o in 0..<out {
                for i in 0..<inF { g[o, i] += d[n * out + o] * inputs[n][i] * scale }
                g[o, inF] += d[n * out + o] * scale
            }
        }
        return g
    }
    /// uᵀ F v, F the exact Fisher of the mean loss.
    func fisher(_ theta: Dense, _ u: Dense, _ v: Dense) -> Double {
        inputs.indices.reduce(0.0) { total, n in
            let p = oracleSoftmax(logits(theta, n)), ju = logits(u, n), jv = logits(v, n)
            var pu = 0.0, pv = 0.0, puv = 0.0
            for o in 0..<out { pu += p[o] * ju[o]; pv += p[o] * jv[o]; puv += p[o] * ju[o] * jv[o] }
            return total + puv - pu * pv
        } / Double(inputs.count)
    }
    /// J·u per example, row-major [N][out].
    func products(_ u: Dense) -> [Double] { inputs.indices.flatMap { logits(u, $0) } }
}

/// Softmax of a row, the slow and obvious way.
func oracleSoftmax(_ z: [Double]) -> [Double] {
    let m = z.max()!
    let e = z.map { LibM.exp($0 - m) }
    let s = e.reduce(0, +)
    return e.map { $0 / s }
}
