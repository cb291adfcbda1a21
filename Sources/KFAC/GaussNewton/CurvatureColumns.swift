/// Stored Jacobian columns: the backward setting of the Gauss-Newton product (simpleNN's
/// "Jacobian" mode, seed 002), and the recording KFLR's output factor shares with it.
///
/// Per registered layer l and example n the caller back-propagates the K columns of S_n
/// (S_n S_nᵀ = B_n, the output Hessian of the summed loss; `OutputHessian.squareRoot`) to the
/// layer's outputs: C_{l,n} = J_{s_l,n}ᵀ S_n, one output-gradient-shaped buffer per column
/// (dense [out], conv [C_out][H_out][W_out] or channels-last). With ā_{l,n,t} the layer's input
/// (dense) or patch at output position t (conv), V_l = [W | b]-shaped, the library computes
///
///     t_n = Σ_l Σ_t C_{l,n,t}ᵀ (V_l ā_{l,n,t})            (K values per example)
///     (G v)_l = (1/N) Σ_n Σ_t (C_{l,n,t} t_n) ā_{l,n,t}ᵀ
///
/// which is exactly (1/N) Σ_n J_nᵀ B_n J_n v restricted to the layers that have columns (all of
/// them: the full product; some: that principal block). Dense layers do it as two gemms over
/// the batch; convolutions per example and group, over the patches the layer forms anyway.
///
/// Storage per layer: the inputs of every kept example and its K columns, [n][k][values] —
/// |S|·K·Σ_l o_l|T_l| + |S|·Σ_l (input values) scalars in all. Grown geometrically on append,
/// released by `clear`.
final class CurvatureColumns<Scalar: KFACScalar> {
    /// One layer's kept examples.
    final class Layer {
        let k: Int
        let inputWidth: Int
        let columnWidth: Int
        private(set) var examples = 0
        private(set) var inputs: AlignedBuffer<Scalar>
        private(set) var columns: AlignedBuffer<Scalar>

        init(k: Int, inputWidth: Int, columnWidth: Int, capacity: Int) throws(KFACError) {
            (self.k, self.inputWidth, self.columnWidth) = (k, inputWidth, columnWidth)
            inputs = try AlignedBuffer(rows: capacity, columns: inputWidth)
            let (width, overflow) = k.multipliedReportingOverflow(by: columnWidth)
            guard !overflow else { throw KFACError(.sizeOverflow, "\(k) columns of \(columnWidth) values overflow") }
            columns = try AlignedBuffer(rows: capacity, columns: width)
        }

        var capacity: Int { inputs.rows }
        var storedValues: Int { examples * (inputWidth + k * columnWidth) }

        /// Makes room for `rows` more examples, keeping what is stored (no visible change).
        func reserve(_ rows: Int) throws(KFACError) {
            let needed = examples + rows
            guard needed > capacity else { return }
            let grown = Swift.max(needed, 2 * capacity)
            let i = try AlignedBuffer<Scalar>(rows: grown, columns: inputWidth)
            let c = try AlignedBuffer<Scalar>(rows: grown, columns: k * columnWidth)
            i.base.update(from: inputs.base, count: examples * inputWidth)
            c.base.update(from: columns.base, count: examples * k * columnWidth)
            (inputs, columns) = (i, c)
        }

        /// Appends `rows` examples: inputs [rows][inputWidth], columns [k][rows][columnWidth]
        /// multiplied by `scale`. Call `reserve` first.
        func append(inputs x: UnsafePointer<Scalar>, columns c: UnsafePointer<Scalar>, rows: Int, scale: Scalar) {
            (inputs.base + examples * inputWidth).update(from: x, count: rows * inputWidth)
            for n in 0..<rows {
                for j in 0..<k {
                    Scalar.scaledCopy(from: c + (j * rows + n) * columnWidth,
                                      to: columns.base + ((examples + n) * k + j) * columnWidth,
                                      count: columnWidth, scale: scale)
                }
            }
            examples += rows
        }
    }

    private(set) var layers: [Layer?] = []
    /// Scratch reused across products: t (examples × K), per-layer results, patch and work rows.
    private var t: AlignedBuffer<Scalar>?
    private var results: [AlignedBuffer<Scalar>?] = []
    private var work: AlignedBuffer<Scalar>?

    var isEmpty: Bool { firstKept == nil }
    /// The first layer with kept columns (plain loops: no allocation in a product).
    private var firstKept: Layer? {
        for l in 0..<layers.count { if let s = layers[l] { return s } }
        return nil
    }
    /// K of the kept columns (nil when none are kept).
    var columnCount: Int? { firstKept?.k }
    var storedValues: Int {
        var total = 0
        for l in 0..<layers.count { total += layers[l]?.storedValues ?? 0 }
        return total
    }
    /// The examples of the first layer with columns (all must agree for a product).
    var examples: Int { firstKept?.examples ?? 0 }

    func clear() {
        layers = layers.map { _ in nil }
        t = nil
        results = results.map { _ in nil }
        work = nil
    }

    /// The layer's store with room for `rows` more examples (created on first use). On error
    /// nothing visible changed.
    func reserve(layer l: Int, layerCount: Int, k: Int, inputWidth: Int, columnWidth: Int, rows: Int) throws(KFACError) -> Layer {
        if let kept = columnCount, kept != k {
            throw KFACError(.invalidSize, "k = \(k) differs from the \(kept) columns already kept (clear them first)")
        }
        if layers.count < layerCount {
            layers += Array(repeating: nil, count: layerCount - layers.count)
            results += Array(repeating: nil, count: layerCount - results.count)
        }
        if let s = layers[l] {
            try s.reserve(rows)
            return s
        }
        let s = try Layer(k: k, inputWidth: inputWidth, columnWidth: columnWidth, capacity: rows)
        layers[l] = s
        return s
    }

    private func buffer(_ b: inout AlignedBuffer<Scalar>?, values: Int) throws(KFACError) -> AlignedBuffer<Scalar> {
        if let b, b.count >= values { return b }
        let n = try AlignedBuffer<Scalar>(rows: 1, columns: Swift.max(values, 1))
        b = n
        return n
    }

    // MARK: Product

    /// (G v) for every layer with columns: `vector(l)` gives V_l (weight, bias), `output(l)`
    /// where to write. Nothing is written unless the whole product succeeds (so outputs may
    /// alias vectors). Throws `.noColumns` (nothing kept), `.invalidSize` (layers disagree on
    /// the examples), `.nonFinite` (the product), `.outOfMemory`.
    func multiply(layers registered: [any CurvatureLayer<Scalar>],
                  vector: (Int) -> (weight: UnsafePointer<Scalar>, bias: UnsafePointer<Scalar>?),
                  output: (Int) -> ParameterGradient<Scalar>) throws(KFACError) {
        guard let k = columnCount else {
            throw KFACError(.noColumns, "no Jacobian columns are kept: record them with record_output_grad_columns (PRODUCT use)")
        }
        let n = examples
        for l in 0..<layers.count {
            if let s = layers[l], s.examples != n {
                throw KFACError(.invalidSize, "layer \(l) keeps columns of \(s.examples) examples, another layer of \(n): every layer needs the same examples")
            }
        }
        // Scratch sizes: t; per layer a result; the largest work area (patches + Z/Y rows).
        let tb = try buffer(&t, values: n * k)
        var workValues = 0
        for l in 0..<layers.count where layers[l] != nil {
            let b = registered[l]
            switch b.layer {
            case .dense(_, let o, _, _):
                workValues = Swift.max(workValues, n * o)
            case .conv2d(let g, _, _):
                workValues = Swift.max(workValues, g.outputPositions * (g.patchSize + g.groupOutChannels))
            }
            let count = b.weightCount + b.layer.outFeatures
            if results[l] == nil || results[l]!.count < count { results[l] = try AlignedBuffer(rows: 1, columns: count) }
        }
        let wb = try buffer(&work, values: workValues)
        tb.base.initialize(repeating: 0, count: n * k)

        // Phase 1: t_n = Σ_l Σ_t C_{l,n,t}ᵀ (V_l ā_{l,n,t}).
        for l in 0..<layers.count {
            guard let s = layers[l] else { continue }
            let v = vector(l)
            switch registered[l].layer {
            case .dense(let i, let o, _, _):
                ColumnKernels.denseForward(s, in: i, out: o, weight: v.weight, bias: v.bias, work: wb.base, t: tb.base)
            case .conv2d(let g, _, _):
                ColumnKernels.convPass(s, geometry: g, weight: v.weight, bias: v.bias, work: wb.base, t: tb.base,
                                       result: nil)
            }
        }
        // Phase 2: (G v)_l = (1/N) Σ_n Σ_t (C_{l,n,t} t_n) ā_{l,n,t}ᵀ.
        var finite = true
        for l in 0..<layers.count {
            guard let s = layers[l], let r = results[l] else { continue }
            let b = registered[l], wc = b.weightCount, o = b.layer.outFeatures
            r.base.initialize(repeating: 0, count: wc + o)
            switch b.layer {
            case .dense(let i, let o, _, _):
                ColumnKernels.denseBackward(s, in: i, out: o, work: wb.base, t: tb.base, result: r.base)
            case .conv2d(let g, _, _):
                ColumnKernels.convPass(s, geometry: g, weight: nil, bias: nil, work: wb.base, t: tb.base, result: r.base)
            }
            Scalar.scal(count: wc + o, alpha: 1 / Scalar(n), x: r.base)
            finite = finite && Scalar.allFinite(r.base, count: wc + (b.layer.hasBias ? o : 0))
        }
        guard finite else { throw KFACError(.nonFinite, "the Gauss-Newton product is not finite") }
        for l in 0..<layers.count {
            guard layers[l] != nil, let r = results[l] else { continue }
            let b = registered[l], out = output(l)
            out.weight.update(from: r.base, count: b.weightCount)
            out.bias?.update(from: r.base + b.weightCount, count: b.layer.outFeatures)
        }
    }
}

/// The element loops and BLAS calls of the column product, specialised for Float and Double.
enum ColumnKernels {
    /// Dense, phase 1: Z = A V_Wᵀ + 1 b_vᵀ (N × out), then t[n][k] += ⟨C[n][k], Z[n]⟩.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func denseForward<S: KFACScalar>(_ s: CurvatureColumns<S>.Layer, in i: Int, out o: Int,
                                            weight: UnsafePointer<S>, bias: UnsafePointer<S>?,
                                            work z: UnsafeMutablePointer<S>, t: UnsafeMutablePointer<S>) {
        let n = s.examples, k = s.k
        S.gemm(transA: false, transB: true, m: n, n: o, k: i, alpha: 1, a: s.inputs.base, lda: i, b: weight, ldb: i,
               beta: 0, c: z, ldc: o)
        if let bias { for e in 0..<n { S.axpy(count: o, alpha: 1, x: bias, y: z + e * o) } }
        for e in 0..<n {
            for j in 0..<k {
                t[e * k + j] += S.dot(count: o, x: s.columns.base + (e * k + j) * o, y: z + e * o)
            }
        }
    }

    /// Dense, phase 2: Y[n] = Σ_k t[n][k] C[n][k], result_W = Yᵀ A, result_b = Σ_n Y[n].
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func denseBackward<S: KFACScalar>(_ s: CurvatureColumns<S>.Layer, in i: Int, out o: Int,
                                             work y: UnsafeMutablePointer<S>, t: UnsafePointer<S>,
                                             result: UnsafeMutablePointer<S>) {
        let n = s.examples, k = s.k
        y.initialize(repeating: 0, count: n * o)
        for e in 0..<n {
            for j in 0..<k {
                S.axpy(count: o, alpha: t[e * k + j], x: s.columns.base + (e * k + j) * o, y: y + e * o)
            }
        }
        S.gemm(transA: true, transB: false, m: o, n: i, k: n, alpha: 1, a: y, lda: o, b: s.inputs.base, ldb: i,
               beta: 0, c: result, ldc: i)
        let bias = result + o * i
        for e in 0..<n { S.axpy(count: o, alpha: 1, x: y + e * o, y: bias) }
    }

    /// Convolution, per example and group over the patches P_n (|T| × patch). With `weight`
    /// (phase 1): Z = V_g P_nᵀ (+ b) as C's layout has it, t[n][k] += ⟨C[n][k]_g, Z⟩. With
    /// `result` (phase 2): Y = Σ_k t[n][k] C[n][k]_g, result_g += Y P_n (and its bias sums).
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func convPass<S: KFACScalar>(_ s: CurvatureColumns<S>.Layer, geometry g: Conv2dGeometry,
                                        weight: UnsafePointer<S>?, bias: UnsafePointer<S>?,
                                        work: UnsafeMutablePointer<S>, t: UnsafeMutablePointer<S>,
                                        result: UnsafeMutablePointer<S>?) {
        let (tt, p, cg, cout) = (g.outputPositions, g.patchSize, g.groupOutChannels, g.outChannels)
        let k = s.k
        let patches = work, z = work + tt * p
        let first = g.layout == .channelsFirst
        for e in 0..<s.examples {
            for group in 0..<g.groups {
                S.extractPatchRows(s.inputs.base, geometry: g, group: group, first: e, count: 1, into: patches)
                // C[n][k]'s group block: channels-first [cg][T] contiguous at group·cg·T;
                // channels-last rows t of Cout values, the group's cg at offset group·cg.
                func block(_ j: Int) -> UnsafeMutablePointer<S> {
                    s.columns.base + (e * k + j) * s.columnWidth + (first ? group * cg * tt : group * cg)
                }
                if let weight {
                    let w = weight + group * cg * p
                    if first {
                        S.gemm(transA: false, transB: true, m: cg, n: tt, k: p, alpha: 1, a: w, lda: p, b: patches, ldb: p,
                               beta: 0, c: z, ldc: tt)
                        if let bias {
                            for c in 0..<cg { let b = bias[group * cg + c]; for q in 0..<tt { z[c * tt + q] += b } }
                        }
                        for j in 0..<k { t[e * k + j] += S.dot(count: cg * tt, x: block(j), y: z) }
                    } else {
                        S.gemm(transA: false, transB: true, m: tt, n: cg, k: p, alpha: 1, a: patches, lda: p, b: w, ldb: p,
                               beta: 0, c: z, ldc: cg)
                        if let bias { for q in 0..<tt { S.axpy(count: cg, alpha: 1, x: bias + group * cg, y: z + q * cg) } }
                        for j in 0..<k {
                            var sum: S = 0
                            for q in 0..<tt { sum += S.dot(count: cg, x: block(j) + q * cout, y: z + q * cg) }
                            t[e * k + j] += sum
                        }
                    }
                } else if let result {
                    let rw = result + group * cg * p, rb = result + cout * p + group * cg
                    z.initialize(repeating: 0, count: cg * tt)
                    if first {
                        for j in 0..<k { S.axpy(count: cg * tt, alpha: t[e * k + j], x: block(j), y: z) }
                        S.gemm(transA: false, transB: false, m: cg, n: p, k: tt, alpha: 1, a: z, lda: tt, b: patches, ldb: p,
                               beta: 1, c: rw, ldc: p)
                        for c in 0..<cg { var b: S = 0; for q in 0..<tt { b += z[c * tt + q] }; rb[c] += b }
                    } else {
                        for j in 0..<k {
                            let a = t[e * k + j]
                            for q in 0..<tt { S.axpy(count: cg, alpha: a, x: block(j) + q * cout, y: z + q * cg) }
                        }
                        S.gemm(transA: true, transB: false, m: cg, n: p, k: tt, alpha: 1, a: z, lda: cg, b: patches, ldb: p,
                               beta: 1, c: rw, ldc: p)
                        for q in 0..<tt { S.axpy(count: cg, alpha: 1, x: z + q * cg, y: rb) }
                    }
                }
            }
        }
    }
}
