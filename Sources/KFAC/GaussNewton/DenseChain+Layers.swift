/// The three linear maps of a chain layer on batches of examples (dense: gemms over the batch;
/// convolution: per example and group over its patches, in the layer's layout):
///   apply:          y (+)= layer(x) with weight W and optional bias (the forward pass; the
///                   R operator's V ā with V's bias, and W ṙ without);
///   weightGradient: r = α Σ_n ∂⟨δ_n, layer(x_n)⟩/∂[W | b]   (Σ_n δ_n āᵀ, over positions for a conv);
///   backward:       dx = layer'ᵀ δ                            (Wᵀ δ; col2im of Wᵀ δ for a conv).
extension DenseChain {
    /// Values of the patch scratch the chain's convolutions need (nil without convolutions).
    var patchScratchValues: Int? {
        var size: Int?
        for i in 0..<geometries.count {
            if let g = geometries[i] { size = Swift.max(size ?? 0, 2 * g.outputPositions * g.patchSize) }
        }
        return size
    }

    func apply(_ i: Int, _ x: UnsafePointer<Scalar>, examples n: Int, weight: UnsafePointer<Scalar>,
               bias: UnsafePointer<Scalar>?, accumulate: Bool, into y: UnsafeMutablePointer<Scalar>) {
        let (fi, fo) = (inFeatures[i], outFeatures[i])
        guard let g = geometries[i] else {
            Scalar.gemm(transA: false, transB: true, m: n, n: fo, k: fi, alpha: 1, a: x, lda: fi, b: weight, ldb: fi,
                        beta: accumulate ? 1 : 0, c: y, ldc: fo)
            if let bias { for r in 0..<n { Scalar.axpy(count: fo, alpha: 1, x: bias, y: y + r * fo) } }
            return
        }
        ChainKernels.convApply(x, geometry: g, examples: n, weight: weight, bias: bias, accumulate: accumulate, into: y,
                               patches: patchBuffer)
    }

    func weightGradient(_ i: Int, _ delta: UnsafePointer<Scalar>, inputs x: UnsafePointer<Scalar>, examples n: Int,
                        alpha: Scalar, into r: UnsafeMutablePointer<Scalar>) {
        let (fi, fo) = (inFeatures[i], outFeatures[i])
        guard let g = geometries[i] else {
            Scalar.gemm(transA: true, transB: false, m: fo, n: fi, k: n, alpha: alpha, a: delta, lda: fo, b: x, ldb: fi,
                        beta: 0, c: r, ldc: fi)
            if hasBias[i] {
                (r + fo * fi).initialize(repeating: 0, count: fo)
                for row in 0..<n { Scalar.axpy(count: fo, alpha: alpha, x: delta + row * fo, y: r + fo * fi) }
            }
            return
        }
        ChainKernels.convWeightGradient(delta, inputs: x, geometry: g, examples: n, alpha: alpha, into: r, patches: patchBuffer)
    }

    func backward(_ i: Int, _ delta: UnsafePointer<Scalar>, examples n: Int, weight: UnsafePointer<Scalar>,
                  into dx: UnsafeMutablePointer<Scalar>) {
        let (fi, fo) = (inFeatures[i], outFeatures[i])
        guard let g = geometries[i] else {
            Scalar.gemm(transA: false, transB: false, m: n, n: fi, k: fo, alpha: 1, a: delta, lda: fo, b: weight, ldb: fi,
                        beta: 0, c: dx, ldc: fi)
            return
        }
        ChainKernels.convBackward(delta, geometry: g, examples: n, weight: weight, into: dx, patches: patchBuffer)
    }
}

extension ChainKernels {
    /// y_n (+)= conv(x_n; W) (+ b) for every example, y in the layer's layout.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func convApply<S: KFACScalar>(_ x: UnsafePointer<S>, geometry g: Conv2dGeometry, examples n: Int,
                                         weight: UnsafePointer<S>, bias: UnsafePointer<S>?, accumulate: Bool,
                                         into y: UnsafeMutablePointer<S>, patches: UnsafeMutablePointer<S>) {
        let (t, p, cg, cout) = (g.outputPositions, g.patchSize, g.groupOutChannels, g.outChannels)
        let first = g.layout == .channelsFirst
        for e in 0..<n {
            let ye = y + e * cout * t
            for group in 0..<g.groups {
                S.extractPatchRows(x, geometry: g, group: group, first: e, count: 1, into: patches)
                let w = weight + group * cg * p
                if first {
                    S.gemm(transA: false, transB: true, m: cg, n: t, k: p, alpha: 1, a: w, lda: p, b: patches, ldb: p,
                           beta: accumulate ? 1 : 0, c: ye + group * cg * t, ldc: t)
                } else {
                    S.gemm(transA: false, transB: true, m: t, n: cg, k: p, alpha: 1, a: patches, lda: p, b: w, ldb: p,
                           beta: accumulate ? 1 : 0, c: ye + group * cg, ldc: cout)
                }
            }
            if let bias {
                for c in 0..<cout {
                    let b = bias[c]
                    if first { for q in 0..<t { ye[c * t + q] += b } } else { for q in 0..<t { ye[q * cout + c] += b } }
                }
            }
        }
    }

    /// r = α Σ_n Σ_t δ_{n,t} patch_{n,t}ᵀ per group (weight layout), then α Σ δ per channel.
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func convWeightGradient<S: KFACScalar>(_ delta: UnsafePointer<S>, inputs x: UnsafePointer<S>,
                                                  geometry g: Conv2dGeometry, examples n: Int, alpha: S,
                                                  into r: UnsafeMutablePointer<S>, patches: UnsafeMutablePointer<S>) {
        let (t, p, cg, cout) = (g.outputPositions, g.patchSize, g.groupOutChannels, g.outChannels)
        let first = g.layout == .channelsFirst
        r.initialize(repeating: 0, count: cout * p + (g.hasBias ? cout : 0))
        for e in 0..<n {
            let de = delta + e * cout * t
            for group in 0..<g.groups {
                S.extractPatchRows(x, geometry: g, group: group, first: e, count: 1, into: patches)
                let rw = r + group * cg * p
                if first {
                    S.gemm(transA: false, transB: false, m: cg, n: p, k: t, alpha: alpha, a: de + group * cg * t, lda: t,
                           b: patches, ldb: p, beta: 1, c: rw, ldc: p)
                } else {
                    S.gemm(transA: true, transB: false, m: cg, n: p, k: t, alpha: alpha, a: de + group * cg, lda: cout,
                           b: patches, ldb: p, beta: 1, c: rw, ldc: p)
                }
            }
            if g.hasBias {
                let rb = r + cout * p
                for c in 0..<cout {
                    var sum: S = 0
                    if first { for q in 0..<t { sum += de[c * t + q] } } else { for q in 0..<t { sum += de[q * cout + c] } }
                    rb[c] += alpha * sum
                }
            }
        }
    }

    /// dx_n = col2im(patch gradients δ_nᵀ W) for every example (inputs' layout; padding dropped).
    @_specialize(where S == Float)
    @_specialize(where S == Double)
    static func convBackward<S: KFACScalar>(_ delta: UnsafePointer<S>, geometry g: Conv2dGeometry, examples n: Int,
                                            weight: UnsafePointer<S>, into dx: UnsafeMutablePointer<S>,
                                            patches: UnsafeMutablePointer<S>) {
        let (t, p, cg, cout) = (g.outputPositions, g.patchSize, g.groupOutChannels, g.outChannels)
        let (cin, h, w) = (g.inChannels, g.inputHeight, g.inputWidth)
        let (kh, kw, cgIn) = (g.kernelHeight, g.kernelWidth, g.groupInChannels)
        let first = g.layout == .channelsFirst
        dx.initialize(repeating: 0, count: n * cin * h * w)
        for e in 0..<n {
            let de = delta + e * cout * t, xe = dx + e * cin * h * w
            for group in 0..<g.groups {
                let wg = weight + group * cg * p
                if first {
                    S.gemm(transA: true, transB: false, m: t, n: p, k: cg, alpha: 1, a: de + group * cg * t, lda: t,
                           b: wg, ldb: p, beta: 0, c: patches, ldc: p)
                } else {
                    S.gemm(transA: false, transB: false, m: t, n: p, k: cg, alpha: 1, a: de + group * cg, lda: cout,
                           b: wg, ldb: p, beta: 0, c: patches, ldc: p)
                }
                // col2im: the transpose of extractPatchRows.
                var row = UnsafePointer(patches)
                for oh in 0..<g.outputHeight {
                    let top = oh * g.strideHeight - g.paddingHeight
                    for ow in 0..<g.outputWidth {
                        let left = ow * g.strideWidth - g.paddingWidth
                        for c in 0..<cgIn {
                            let channel = group * cgIn + c
                            for i in 0..<kh {
                                let y = top + i * g.dilationHeight
                                guard y >= 0 && y < h else { continue }
                                for j in 0..<kw {
                                    let xx = left + j * g.dilationWidth
                                    guard xx >= 0 && xx < w else { continue }
                                    let index = first ? (channel * h + y) * w + xx : (y * w + xx) * cin + channel
                                    xe[index] += row[(c * kh + i) * kw + j]
                                }
                            }
                        }
                        row += p
                    }
                }
            }
        }
    }
}
