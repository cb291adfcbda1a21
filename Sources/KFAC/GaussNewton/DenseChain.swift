/// An elementwise activation between two layers of a dense chain (`kfac_activation`).
public enum ChainActivation: Int32, Sendable, CaseIterable {
    case identity = 0
    case relu = 1
    case tanh = 2
    case logistic = 3
    /// φ′ given by the caller at every forward pass (any elementwise activation).
    case custom = 4
}

/// The forward + backward setting of the Gauss-Newton product (seed 002, the R operator) for a
/// sequential chain of registered dense layers l_0 → φ_0 → l_1 → … → l_{L−1}, whose last output
/// s_{L−1} is the network output z (the distribution's logits or means):
///
///     R-op forward:  ṙ_0 = 0,  ṡ_i = W_i ṙ_i + V_i ā_i,  ṙ_{i+1} = φ′_i(s_i) ⊙ ṡ_i
///     output:        u_n = B_n ṡ_{L−1,n}
///     backward:      δ_{L−1} = u,  (G v)_i = (1/N) Σ_n δ_{i,n} ā_{i,n}ᵀ,  δ_{i−1} = φ′_{i−1} ⊙ (W_iᵀ δ_i)
///
/// `forward` copies the weights, the layer inputs and φ′ so that every product of a solve uses
/// the same θ; memory is that of one training step's activations of the N examples.
final class DenseChain<Scalar: KFACScalar> {
    let layers: [Int]
    let activations: [ChainActivation]
    let distribution: OutputDistribution
    let inFeatures: [Int], outFeatures: [Int], hasBias: [Bool]

    /// After `forward`: N, the copied W (and b), the inputs a_i, φ′_i (i < L−1) and z.
    private(set) var rows = 0
    private var weights: [AlignedBuffer<Scalar>] = []
    private var biases: [AlignedBuffer<Scalar>?] = []
    private var inputs: [AlignedBuffer<Scalar>] = []
    private var derivatives: [AlignedBuffer<Scalar>] = []
    private var outputs: AlignedBuffer<Scalar>?
    /// Scratch for products: ṡ/δ (two N × widest), per-layer results.
    private var scratch: [AlignedBuffer<Scalar>] = []
    private var results: [AlignedBuffer<Scalar>] = []

    var hasForward: Bool { outputs != nil }

    init(layers: [Int], activations: [ChainActivation], distribution: OutputDistribution,
         registered: [any CurvatureLayer<Scalar>]) throws(KFACError) {
        guard !layers.isEmpty, activations.count == layers.count else {
            throw KFACError(.invalidSize, "a chain needs n >= 1 layers and as many activations")
        }
        var ins: [Int] = [], outs: [Int] = [], bias: [Bool] = []
        for (i, l) in layers.enumerated() {
            guard l >= 0 && l < registered.count else {
                throw KFACError(.unknownLayer, "layer \(l) is not registered (there are \(registered.count) layers)")
            }
            guard layers.firstIndex(of: l) == i else { throw KFACError(.invalidArgument, "layer \(l) appears twice in the chain") }
            guard case .dense(let a, let o, let b, _) = registered[l].layer else {
                throw KFACError(.unsupported, "layer \(l) is not dense: chains hold dense layers only")
            }
            if i > 0 && outs[i - 1] != a {
                throw KFACError(.invalidSize, "layer \(layers[i - 1]) has \(outs[i - 1]) outputs but layer \(l) takes \(a) inputs")
            }
            ins.append(a); outs.append(o); bias.append(b)
        }
        guard activations.last == .identity else {
            throw KFACError(.invalidArgument, "the last layer's activation must be IDENTITY (its outputs are the network's)")
        }
        (self.layers, self.activations, self.distribution) = (layers, activations, distribution)
        (inFeatures, outFeatures, hasBias) = (ins, outs, bias)
    }

    /// The network's output dimension (out of the last layer).
    var outputDim: Int { outFeatures[outFeatures.count - 1] }  // (not .last: no allocation in debug builds)

    private static func make(_ rows: Int, _ columns: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        try AlignedBuffer(rows: rows, columns: columns)
    }

    /// Copies W_i, b_i and the inputs and computes s_i, φ′_i and z. `input(i)` is nil for
    /// i > 0 when a_i should be computed as φ_{i−1}(s_{i−1}) (named activations only);
    /// `derivative(i)` gives φ′_i for custom activations. On error the previous forward pass
    /// is kept.
    func forward(rows n: Int, weight: (Int) -> UnsafePointer<Scalar>, bias: (Int) -> UnsafePointer<Scalar>?,
                 input: (Int) -> UnsafePointer<Scalar>?, derivative: (Int) -> UnsafePointer<Scalar>?,
                 outputs out: UnsafeMutablePointer<Scalar>?) throws(KFACError) {
        let count = layers.count
        var w: [AlignedBuffer<Scalar>] = [], b: [AlignedBuffer<Scalar>?] = [], a: [AlignedBuffer<Scalar>] = [],
            d: [AlignedBuffer<Scalar>] = []
        let z = try Self.make(n, outputDim)
        for i in 0..<count {
            let (fi, fo) = (inFeatures[i], outFeatures[i])
            let wi = try Self.make(fo, fi)
            wi.base.update(from: weight(i), count: fo * fi)
            let bi: AlignedBuffer<Scalar>? = hasBias[i] ? try Self.make(1, fo) : nil
            if let bi, let src = bias(i) { bi.base.update(from: src, count: fo) }
            let ai = try Self.make(n, fi)
            if let x = input(i) {
                ai.base.update(from: x, count: n * fi)
            } else {
                // a_i = φ_{i−1}(s_{i−1}): s is in d[i−1] until φ′ replaces it below.
                let s = d[i - 1].base
                for j in 0..<(n * fi) { ai.base[j] = Self.activate(activations[i - 1], s[j]) }
                Self.derivativeInPlace(activations[i - 1], d[i - 1].base, count: n * fi)
            }
            guard Scalar.allFinite(ai.base, count: n * fi) else {
                throw KFACError(.nonFinite, "the inputs of chain layer \(i) (layer \(layers[i])) contain NaN or Inf")
            }
            // s_i = a_i W_iᵀ + b_i.
            let s = i == count - 1 ? z : try Self.make(n, fo)
            Scalar.gemm(transA: false, transB: true, m: n, n: fo, k: fi, alpha: 1, a: ai.base, lda: fi, b: wi.base, ldb: fi,
                        beta: 0, c: s.base, ldc: fo)
            if let bi { for r in 0..<n { Scalar.axpy(count: fo, alpha: 1, x: bi.base, y: s.base + r * fo) } }
            if i < count - 1 {
                if activations[i] == .custom {
                    guard let phi = derivative(i) else {
                        throw KFACError(.nullPointer, "chain layer \(i) has a CUSTOM activation but its derivative buffer is NULL")
                    }
                    guard Scalar.allFinite(phi, count: n * fo) else {
                        throw KFACError(.nonFinite, "the derivatives of chain layer \(i) contain NaN or Inf")
                    }
                    if input(i + 1) == nil {
                        throw KFACError(.nullPointer, "chain layer \(i + 1) follows a CUSTOM activation: its inputs are needed")
                    }
                    s.base.update(from: phi, count: n * fo)
                } else if input(i + 1) != nil {
                    Self.derivativeInPlace(activations[i], s.base, count: n * fo)
                }
                // (else: the next iteration turns s into a_{i+1} and φ′.)
                d.append(s)
            }
            w.append(wi); b.append(bi); a.append(ai)
        }
        guard Scalar.allFinite(z.base, count: n * outputDim) else {
            throw KFACError(.nonFinite, "the chain's outputs are not finite")
        }
        var sc: [AlignedBuffer<Scalar>] = []
        let widest = (inFeatures + outFeatures).max()!
        for _ in 0..<2 { sc.append(try Self.make(n, widest)) }
        var rs: [AlignedBuffer<Scalar>] = []
        for i in 0..<count { rs.append(try Self.make(1, outFeatures[i] * (inFeatures[i] + 1))) }
        (weights, biases, inputs, derivatives, outputs, scratch, results, rows) = (w, b, a, d, z, sc, rs, n)
        out?.update(from: z.base, count: n * outputDim)
    }

    static func activate(_ f: ChainActivation, _ s: Scalar) -> Scalar {
        switch f {
        case .identity, .custom: return s
        case .relu: return s > 0 ? s : 0
        case .tanh: return Scalar(ChainKernels.tanh(Double(s)))
        case .logistic: return Scalar(OutputFisher.logistic(Double(s)))
        }
    }

    /// s ← φ′(s).
    static func derivativeInPlace(_ f: ChainActivation, _ s: UnsafeMutablePointer<Scalar>, count: Int) {
        for j in 0..<count {
            let x = Double(s[j])
            switch f {
            case .identity, .custom: s[j] = 1
            case .relu: s[j] = x > 0 ? 1 : 0
            case .tanh: let t = ChainKernels.tanh(x); s[j] = Scalar(1 - t * t)
            case .logistic: let p = OutputFisher.logistic(x); s[j] = Scalar(p * (1 - p))
            }
        }
    }

    /// G v for the chain's layers: `vector(i)` and `output(i)` by chain position. Nothing is
    /// written on error; outputs may alias vectors.
    func multiply(vector: (Int) -> ParameterVector<Scalar>, output: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        guard let z = outputs else { throw KFACError(.noColumns, "no chain forward pass: call the chain's forward first") }
        let n = rows, count = layers.count
        var sdot = scratch[0].base, rdot = scratch[1].base
        // R-op forward.
        for i in 0..<count {
            let (fi, fo) = (inFeatures[i], outFeatures[i]), v = vector(i)
            Scalar.gemm(transA: false, transB: true, m: n, n: fo, k: fi, alpha: 1, a: inputs[i].base, lda: fi, b: v.weight,
                        ldb: fi, beta: 0, c: sdot, ldc: fo)
            if let vb = v.bias { for r in 0..<n { Scalar.axpy(count: fo, alpha: 1, x: vb, y: sdot + r * fo) } }
            if i > 0 {
                Scalar.gemm(transA: false, transB: true, m: n, n: fo, k: fi, alpha: 1, a: rdot, lda: fi, b: weights[i].base,
                            ldb: fi, beta: 1, c: sdot, ldc: fo)
            }
            if i < count - 1 {
                ChainKernels.multiply(sdot, by: derivatives[i].base, count: n * fo)
                (sdot, rdot) = (rdot, sdot)
            }
        }
        // u = B ṡ (in place), then the backward pass with δ = u.
        OutputHessian.multiply(distribution: distribution, outputs: z.base, vectors: sdot, rows: n, dim: outputDim, into: sdot)
        var delta = sdot, next = rdot
        let inv = 1 / Scalar(n)
        var finite = true
        for back in 0..<count {
            let i = count - 1 - back
            let (fi, fo) = (inFeatures[i], outFeatures[i]), r = results[i].base
            Scalar.gemm(transA: true, transB: false, m: fo, n: fi, k: n, alpha: inv, a: delta, lda: fo, b: inputs[i].base,
                        ldb: fi, beta: 0, c: r, ldc: fi)
            if hasBias[i] {
                (r + fo * fi).initialize(repeating: 0, count: fo)
                for row in 0..<n { Scalar.axpy(count: fo, alpha: inv, x: delta + row * fo, y: r + fo * fi) }
            }
            finite = finite && Scalar.allFinite(r, count: fo * (fi + (hasBias[i] ? 1 : 0)))
            if i > 0 {
                Scalar.gemm(transA: false, transB: false, m: n, n: fi, k: fo, alpha: 1, a: delta, lda: fo, b: weights[i].base,
                            ldb: fi, beta: 0, c: next, ldc: fi)
                ChainKernels.multiply(next, by: derivatives[i - 1].base, count: n * fi)
                (delta, next) = (next, delta)
            }
        }
        guard finite else { throw KFACError(.nonFinite, "the Gauss-Newton product is not finite") }
        for i in 0..<count {
            let (fi, fo) = (inFeatures[i], outFeatures[i]), out = output(i)
            out.weight.update(from: results[i].base, count: fo * fi)
            out.bias?.update(from: results[i].base + fo * fi, count: fo)
        }
    }
}

extension DenseChain {
    /// The K = output_dim back-propagated columns of S (S Sᵀ = B at the last forward pass's z) at
    /// every chain layer's outputs, [K][rows][out_i] per chain position:
    ///     C_{L−1} = S,   C_{i−1} = (C_i W_i) ⊙ φ′_{i−1}   (one gemm of K·rows rows per layer).
    /// Also returns the kept inputs a_i. Throws `.noColumns` without a forward pass.
    func backPropagatedColumns() throws(KFACError) -> (columns: [AlignedBuffer<Scalar>], inputs: [UnsafePointer<Scalar>], k: Int) {
        guard let z = outputs else { throw KFACError(.noColumns, "no chain forward pass: call the chain's forward first") }
        let n = rows, k = outputDim, count = layers.count
        var columns: [AlignedBuffer<Scalar>] = []
        for i in 0..<count { columns.append(try AlignedBuffer(rows: k * n, columns: outFeatures[i])) }
        OutputHessian.squareRoot(distribution: distribution, outputs: z.base, rows: n, dim: k, into: columns[count - 1].base)
        for back in 0..<(count - 1) {
            let i = count - 1 - back, (fi, fo) = (inFeatures[i], outFeatures[i])
            let below = columns[i - 1].base
            Scalar.gemm(transA: false, transB: false, m: k * n, n: fi, k: fo, alpha: 1, a: columns[i].base, lda: fo,
                        b: weights[i].base, ldb: fi, beta: 0, c: below, ldc: fi)
            for j in 0..<k { ChainKernels.multiply(below + j * n * fi, by: derivatives[i - 1].base, count: n * fi) }
        }
        return (columns, (0..<count).map { UnsafePointer(inputs[$0].base) }, k)
    }
}

enum ChainKernels {
    /// tanh from exp (the core's LibM has no tanh): sign(x)·(1 − e^{−2|x|})/(1 + e^{−2|x|}).
    static func tanh(_ x: Double) -> Double {
        let e = LibM.exp(-2 * Swift.abs(x)), t = (1 - e) / (1 + e)
        return x < 0 ? -t : t
    }

    /// x ⊙= d.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func multiply<S: KFACScalar>(_ x: UnsafeMutablePointer<S>, by d: UnsafePointer<S>, count: Int) {
        for j in 0..<count { x[j] *= d[j] }
    }
}
