// The reference for the Gauss-Newton tests: tiny dense and convolutional networks evaluated the
// slow and obvious way in Double, per example, their Jacobians by central differences, the
// output Hessian B and its square root S written out from p, and G·v = (1/N) Σ_n J_nᵀ B_n J_n v as
// explicit matrix products. Nothing here calls the code under test.
@testable import KFAC

struct TinyNet {
    enum Kind {
        case dense(inF: Int, outF: Int)
        case conv(Conv2dGeometry)   // channels-first here; tests convert to channels-last
    }
    struct Layer {
        var kind: Kind
        var hasBias: Bool
        var activation: ChainActivation   // after the layer (.identity for the last)
        var grouping = ChannelGrouping()
        var inValues: Int {
            switch kind {
            case .dense(let i, _): return i
            case .conv(let g): return g.inChannels * g.inputHeight * g.inputWidth
            }
        }
        var outValues: Int {
            switch kind {
            case .dense(_, let o): return o
            case .conv(let g): return g.outChannels * g.outputPositions
            }
        }
        var outFeatures: Int {
            switch kind {
            case .dense(_, let o): return o
            case .conv(let g): return g.outChannels
            }
        }
        var weightCount: Int {
            switch kind {
            case .dense(let i, let o): return i * o
            case .conv(let g): return g.outChannels * g.patchSize
            }
        }
        var parameterCount: Int { weightCount + (hasBias ? outFeatures : 0) }
    }

    var layers: [Layer]
    /// Per layer: weight (library layout) then bias.
    var parameters: [[Double]]
    var distribution: OutputDistribution

    init(_ layers: [Layer], distribution: OutputDistribution, random: inout SeededRandom) {
        self.layers = layers
        self.distribution = distribution
        parameters = layers.map { l in (0..<l.parameterCount).map { _ in 0.8 * random.uniform() } }
    }

    var outputDim: Int { layers.last!.outValues }

    static func phi(_ f: ChainActivation, _ s: Double) -> Double {
        switch f {
        case .identity: return s
        case .relu: return max(s, 0)
        case .tanh: return Foundation_tanh(s)
        case .logistic: return 1 / (1 + Foundation_exp(-s))
        case .custom: return Foundation_log(1 + Foundation_exp(s))   // softplus in the tests
        }
    }

    static func phiPrime(_ f: ChainActivation, _ s: Double) -> Double {
        switch f {
        case .identity: return 1
        case .relu: return s > 0 ? 1 : 0
        case .tanh: let t = Foundation_tanh(s); return 1 - t * t
        case .logistic: let p = 1 / (1 + Foundation_exp(-s)); return p * (1 - p)
        case .custom: return 1 / (1 + Foundation_exp(-s))
        }
    }

    /// s = layer(a) for one example, parameters p.
    static func apply(_ layer: Layer, _ p: [Double], _ a: [Double]) -> [Double] {
        switch layer.kind {
        case .dense(let i, let o):
            return (0..<o).map { r in
                var s = layer.hasBias ? p[i * o + r] : 0
                for c in 0..<i { s += p[r * i + c] * a[c] }
                return s
            }
        case .conv(let g):
            var s = [Double](repeating: 0, count: g.outChannels * g.outputPositions)
            let (cgIn, cgOut) = (g.groupInChannels, g.groupOutChannels)
            for o in 0..<g.outChannels {
                let group = o / cgOut
                for oh in 0..<g.outputHeight {
                    for ow in 0..<g.outputWidth {
                        var v = layer.hasBias ? p[g.outChannels * g.patchSize + o] : 0
                        for c in 0..<cgIn {
                            for i in 0..<g.kernelHeight {
                                for j in 0..<g.kernelWidth {
                                    let y = oh * g.strideHeight - g.paddingHeight + i * g.dilationHeight
                                    let x = ow * g.strideWidth - g.paddingWidth + j * g.dilationWidth
                                    guard y >= 0, y < g.inputHeight, x >= 0, x < g.inputWidth else { continue }
                                    let ch = group * cgIn + c
                                    v += p[((o * cgIn + c) * g.kernelHeight + i) * g.kernelWidth + j]
                                        * a[(ch * g.inputHeight + y) * g.inputWidth + x]
                                }
                            }
                        }
                        s[(o * g.outputHeight + oh) * g.outputWidth + ow] = v
                    }
                }
            }
            return s
        }
    }

    /// The inputs a_l and pre-activations s_l of every layer for one example.
    func pass(_ x: [Double], parameters p: [[Double]]? = nil) -> (inputs: [[Double]], pre: [[Double]]) {
        let p = p ?? parameters
        var a = x, inputs: [[Double]] = [], pre: [[Double]] = []
        for (l, layer) in layers.enumerated() {
            inputs.append(a)
            let s = Self.apply(layer, p[l], a)
            pre.append(s)
            a = s.map { Self.phi(layer.activation, $0) }
        }
        return (inputs, pre)
    }

    /// z from layer l's pre-activation s_l on.
    func output(from l: Int, _ s: [Double]) -> [Double] {
        var s = s
        for m in (l + 1)..<layers.count {
            s = Self.apply(layers[m], parameters[m], s.map { Self.phi(layers[m - 1].activation, $0) })
        }
        return s
    }

    func output(_ x: [Double], parameters p: [[Double]]) -> [Double] { pass(x, parameters: p).pre.last! }

    static let h = 1e-5

    /// J = ∂z/∂θ for one example: outputDim × (all parameters, layer by layer), central differences.
    func jacobian(_ x: [Double]) -> Dense {
        let total = layers.reduce(0) { $0 + $1.parameterCount }
        var j = Dense(rows: outputDim, columns: total)
        var column = 0
        for l in layers.indices {
            for q in 0..<layers[l].parameterCount {
                var plus = parameters, minus = parameters
                plus[l][q] += Self.h
                minus[l][q] -= Self.h
                let (zp, zm) = (output(x, parameters: plus), output(x, parameters: minus))
                for r in 0..<outputDim { j[r, column] = (zp[r] - zm[r]) / (2 * Self.h) }
                column += 1
            }
        }
        return j
    }

    /// ∂z/∂s_l: outputDim × outValues(l).
    func outputJacobian(layer l: Int, _ x: [Double]) -> Dense {
        let s = pass(x).pre[l]
        var j = Dense(rows: outputDim, columns: s.count)
        for q in s.indices {
            var plus = s, minus = s
            plus[q] += Self.h
            minus[q] -= Self.h
            let (zp, zm) = (output(from: l, plus), output(from: l, minus))
            for r in 0..<outputDim { j[r, q] = (zp[r] - zm[r]) / (2 * Self.h) }
        }
        return j
    }

    static func probabilities(_ d: OutputDistribution, _ z: [Double]) -> [Double] {
        switch d {
        case .categorical:
            let m = z.max()!, e = z.map { Foundation_exp($0 - m) }, t = e.reduce(0, +)
            return e.map { $0 / t }
        case .bernoulli: return z.map { 1 / (1 + Foundation_exp(-$0)) }
        case .gaussian: return z
        }
    }

    /// B at outputs z, written out.
    static func outputHessian(_ d: OutputDistribution, _ z: [Double]) -> Dense {
        let p = probabilities(d, z), k = z.count
        var b = Dense(rows: k, columns: k)
        for i in 0..<k {
            for j in 0..<k {
                switch d {
                case .categorical: b[i, j] = (i == j ? p[i] : 0) - p[i] * p[j]
                case .bernoulli: b[i, j] = i == j ? p[i] * (1 - p[i]) : 0
                case .gaussian: b[i, j] = i == j ? 1 : 0
                }
            }
        }
        return b
    }

    /// S with S Sᵀ = B, written out: √p_k (e_k − p) columns, √(p(1−p)) diagonal, I.
    static func outputHessianRoot(_ d: OutputDistribution, _ z: [Double]) -> Dense {
        let p = probabilities(d, z), k = z.count
        var s = Dense(rows: k, columns: k)
        for i in 0..<k {
            for c in 0..<k {
                switch d {
                case .categorical: s[i, c] = p[c].squareRoot() * ((i == c ? 1 : 0) - p[i])
                case .bernoulli: s[i, c] = i == c ? (p[i] * (1 - p[i])).squareRoot() : 0
                case .gaussian: s[i, c] = i == c ? 1 : 0
                }
            }
        }
        return s
    }

    /// (1/N) Σ_n J_nᵀ B_n J_n v, per layer (weight then bias), for examples xs.
    func gaussNewtonProduct(_ xs: [[Double]], _ v: [[Double]]) -> [[Double]] {
        let flat = v.flatMap { $0 }
        var out = [Double](repeating: 0, count: flat.count)
        for x in xs {
            let j = jacobian(x), b = Self.outputHessian(distribution, output(x, parameters: parameters))
            let jv = (0..<j.rows).map { r in (0..<j.columns).reduce(0.0) { $0 + j[r, $1] * flat[$1] } }
            let bjv = (0..<b.rows).map { r in (0..<b.columns).reduce(0.0) { $0 + b[r, $1] * jv[$1] } }
            for c in 0..<j.columns { for r in 0..<j.rows { out[c] += j[r, c] * bjv[r] / Double(xs.count) } }
        }
        var result: [[Double]] = [], offset = 0
        for l in layers { result.append(Array(out[offset..<offset + l.parameterCount])); offset += l.parameterCount }
        return result
    }

    /// The GGN block of layer l, (1/N) Σ J_lᵀ B J_l, parameterCount × parameterCount.
    func gaussNewtonBlock(layer l: Int, _ xs: [[Double]]) -> Dense {
        let offset = layers[..<l].reduce(0) { $0 + $1.parameterCount }, p = layers[l].parameterCount
        var g = Dense(rows: p, columns: p)
        for x in xs {
            let j = jacobian(x), b = Self.outputHessian(distribution, output(x, parameters: parameters))
            for a in 0..<p {
                for c in 0..<p {
                    var s = 0.0
                    for r in 0..<j.rows { for q in 0..<j.rows { s += j[r, offset + a] * b[r, q] * j[q, offset + c] } }
                    g[a, c] += s / Double(xs.count)
                }
            }
        }
        return g
    }

    /// Layer l's K = outputDim columns C = (∂z/∂s_l)ᵀ S of every example, as the record call takes
    /// them: [k][rows][outValues] (channels-first for convolutions).
    func columns(layer l: Int, _ xs: [[Double]]) -> [Double] {
        let k = outputDim, w = layers[l].outValues
        var c = [Double](repeating: 0, count: k * xs.count * w)
        for (n, x) in xs.enumerated() {
            let j = outputJacobian(layer: l, x), s = Self.outputHessianRoot(distribution, output(x, parameters: parameters))
            for col in 0..<k {
                for q in 0..<w {
                    var v = 0.0
                    for r in 0..<k { v += j[r, q] * s[r, col] }
                    c[(col * xs.count + n) * w + q] = v
                }
            }
        }
        return c
    }
}

/// [N][C][H][W] → [N][H][W][C] (or [K·N][C][T] → [K·N][T][C] for columns).
func toChannelsLast(_ x: [Double], examples: Int, channels: Int, positions: Int) -> [Double] {
    var out = x
    for n in 0..<examples {
        for c in 0..<channels {
            for t in 0..<positions { out[(n * positions + t) * channels + c] = x[(n * channels + c) * positions + t] }
        }
    }
    return out
}

#if canImport(Glibc)
import Glibc
#endif
func Foundation_exp(_ x: Double) -> Double { exp(x) }
func Foundation_log(_ x: Double) -> Double { log(x) }
func Foundation_tanh(_ x: Double) -> Double { tanh(x) }
