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
/// sequential chain of registered dense and conv2d layers l_0 → φ_0 → l_1 → … → l_{L−1} (each
/// layer's output buffer the next one's input; convolutions over their patches, the transpose by
/// col2im: `DenseChain+Layers.swift`), whose last output
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
    /// Per chain position: values per example in and out (dense: features; convolution:
    /// C·H·W and C_out·H_out·W_out in its layout), the bias, and a convolution's geometry.
    let inFeatures: [Int], outFeatures: [Int], hasBias: [Bool]
    let geometries: [Conv2dGeometry?]
    let weightCounts: [Int], biasCounts: [Int]

    /// After `forward`: N, the copied W (and b), the inputs a_i, φ′_i (i < L−1) and z.
    private(set) var rows = 0
    private(set) var weights: [AlignedBuffer<Scalar>] = []
    private var biases: [AlignedBuffer<Scalar>?] = []
    private(set) var inputs: [AlignedBuffer<Scalar>] = []
    private(set) var derivatives: [AlignedBuffer<Scalar>] = []
    private(set) var outputs: AlignedBuffer<Scalar>?
    /// Scratch for products: ṡ/δ (two N × widest), per-layer results.
    private var scratch: [AlignedBuffer<Scalar>] = []
    private var results: [AlignedBuffer<Scalar>] = []
    /// Convolutions: one example's patches and their gradient (|T| × patch each).
    private var patchScratch: AlignedBuffer<Scalar>?
    /// The patch scratch (allocated by `forward` when the chain has convolutions).
    var patchBuffer: UnsafeMutablePointer<Scalar> { patchScratch!.base }  // (used for convolutions only)

    /// KFRA's working memory (`DenseChain+KFRA.swift`), allocated by its first use.
    var kfraBuffers: KFRAScratch<Scalar>?
    /// The largest per-example width in or out of any chain layer.
    let widestFeatures: Int

    var hasForward: Bool { outputs != nil }

    init(layers: [Int], activations: [ChainActivation], distribution: OutputDistribution,
         registered: [any CurvatureLayer<Scalar>]) throws(KFACError) {
        guard !layers.isEmpty, activations.count == layers.count else {
            throw KFACError(.invalidSize, "a chain needs n >= 1 layers and as many activations")
        }
        var ins: [Int] = [], outs: [Int] = [], bias: [Bool] = [], geos: [Conv2dGeometry?] = [], wc: [Int] = [], bc: [Int] = []
        for (i, l) in layers.enumerated() {
            guard l >= 0 && l < registered.count else {
                throw KFACError(.unknownLayer, "layer \(l) is not registered (there are \(registered.count) layers)")
            }
            guard layers.firstIndex(of: l) == i else { throw KFACError(.invalidArgument, "layer \(l) appears twice in the chain") }
            let b = registered[l]
            let (a, o) = (b.inputValueCount(rows: 1), b.outputGradientValueCount(rows: 1))
            if i > 0 && outs[i - 1] != a {
                throw KFACError(.invalidSize, "layer \(layers[i - 1]) has \(outs[i - 1]) output values but layer \(l) takes \(a) input values")
            }
            switch b.layer {
            case .dense: geos.append(nil)
            case .conv2d(let g, _, _): geos.append(g)
            }
            ins.append(a); outs.append(o); bias.append(b.layer.hasBias); wc.append(b.weightCount); bc.append(b.layer.outFeatures)
        }
        guard activations.last == .identity else {
            throw KFACError(.invalidArgument, "the last layer's activation must be IDENTITY (its outputs are the network's)")
        }
        (self.layers, self.activations, self.distribution) = (layers, activations, distribution)
        (inFeatures, outFeatures, hasBias, geometries, weightCounts, biasCounts) = (ins, outs, bias, geos, wc, bc)
        widestFeatures = (ins + outs).max()!
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
            let wi = try Self.make(1, weightCounts[i])
            wi.base.update(from: weight(i), count: weightCounts[i])
            let bi: AlignedBuffer<Scalar>? = hasBias[i] ? try Self.make(1, biasCounts[i]) : nil
            if let bi, let src = bias(i) { bi.base.update(from: src, count: biasCounts[i]) }
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
            // s_i = layer_i(a_i) with W_i, b_i.
            let s = i == count - 1 ? z : try Self.make(n, fo)
            if patchScratch == nil, let size = patchScratchValues { patchScratch = try Self.make(1, size) }
            apply(i, ai.base, examples: n, weight: wi.base, bias: bi.map { UnsafePointer($0.base) }, accumulate: false, into: s.base)
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
        for i in 0..<count { rs.append(try Self.make(1, weightCounts[i] + biasCounts[i])) }
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
            let fo = outFeatures[i], v = vector(i)
            apply(i, inputs[i].base, examples: n, weight: v.weight, bias: v.bias, accumulate: false, into: sdot)
            if i > 0 { apply(i, rdot, examples: n, weight: weights[i].base, bias: nil, accumulate: true, into: sdot) }
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
            let fi = inFeatures[i], r = results[i].base
            weightGradient(i, delta, inputs: inputs[i].base, examples: n, alpha: inv, into: r)
            finite = finite && Scalar.allFinite(r, count: weightCounts[i] + (hasBias[i] ? biasCounts[i] : 0))
            if i > 0 {
                backward(i, delta, examples: n, weight: weights[i].base, into: next)
                ChainKernels.multiply(next, by: derivatives[i - 1].base, count: n * fi)
                (delta, next) = (next, delta)
            }
        }
        guard finite else { throw KFACError(.nonFinite, "the Gauss-Newton product is not finite") }
        for i in 0..<count {
            let out = output(i)
            out.weight.update(from: results[i].base, count: weightCounts[i])
            out.bias?.update(from: results[i].base + weightCounts[i], count: biasCounts[i])
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
            let i = count - 1 - back, fi = inFeatures[i]
            let below = columns[i - 1].base
            backward(i, columns[i].base, examples: k * n, weight: weights[i].base, into: below)
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
