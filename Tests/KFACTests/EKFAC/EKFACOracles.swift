// Reference computations for the EKFAC tests, the slow and obvious way in Double: per-example
// gradients from explicit loops, their empirical Fisher, its diagonal in a given basis.
@testable import KFAC

func transpose(_ m: Dense) -> Dense {
    var t = Dense(rows: m.columns, columns: m.rows)
    for i in 0..<m.rows { for j in 0..<m.columns { t[j, i] = m[i, j] } }
    return t
}

/// ‖m‖_F.
func frobenius(_ m: Dense) -> Double { m.values.reduce(0) { $0 + $1 * $1 }.squareRoot() }

/// The library's EKFAC state of one block: Q_A and Q_G with the eigenvectors as columns, rows in
/// the layer's own parameter order (SUA's offset-major coordinates mapped back), columns in the
/// library's order; S (rows: G's eigenvectors, columns: A's, in those orders).
func ekfacState<S: KFACScalar>(_ opt: KFACOptimizer<S>, layer: Int, group: Int = 0) throws -> (qa: Dense, qg: Dense, s: Dense) {
    let c = try opt.estimator.block(layer: layer, group: group)
    guard let inverse = c.inverse as? EKFACInverse<S> else { throw KFACError(.noInverses, "no EKFAC inverse") }
    func basis(_ side: EigenInverse<S>.Side) -> Dense {
        let st = side.structure
        var q = Dense(rows: st.dimension, columns: st.dimension)
        for tile in st.tiles {
            let b = st.uniqueSizes[tile.unique], block = side.vectors.base + st.storageOffsets[tile.unique]
            for i in 0..<b {
                for r in 0..<b {
                    let coordinate = st.externalIndex?[tile.offset + r] ?? tile.offset + r
                    q[coordinate, tile.offset + i] = Double(block[i * b + r])
                }
            }
        }
        return q
    }
    let s = Dense(rows: c.output.dimension, columns: c.input.dimension, try opt.ekfacScaling(layer: layer, group: group))
    return (basis(inverse.bases.input), basis(inverse.bases.output), s)
}

/// (1/D) Σ_n (Q_Gᵀ G_n Q_A)^∘2: the per-example rotation formula.
func rotatedSecondMoment(_ gradients: [Dense], divisor: Double, qa: Dense, qg: Dense) -> Dense {
    var s = Dense(rows: qg.columns, columns: qa.columns)
    let qgt = transpose(qg)
    for gn in gradients {
        let m = product(product(qgt, gn), qa)
        for i in s.values.indices { s.values[i] += m.values[i] * m.values[i] / divisor }
    }
    return s
}

/// F = (1/D) Σ_n vec(G_n) vec(G_n)ᵀ (column-major vec, as A ⊗ G acts on).
func empiricalFisher(_ gradients: [Dense], divisor: Double) -> Dense {
    let n = gradients[0].rows * gradients[0].columns
    var f = Dense(rows: n, columns: n)
    for gn in gradients {
        let v = vec(gn)
        for i in 0..<n { for j in 0..<n { f[i, j] += v[i] * v[j] / divisor } }
    }
    return f
}

/// Ũ diag(vec S) Ũᵀ with Ũ = Q_A ⊗ Q_G (column j·o + i of Ũ is S[i][j]'s eigenvector).
func ekfacMatrix(qa: Dense, qg: Dense, s: Dense) -> Dense {
    let u = kronecker(qa, qg)
    var scaled = u
    for r in 0..<u.rows { for k in 0..<u.columns { scaled[r, k] *= s[k % s.rows, k / s.rows] } }
    return product(scaled, transpose(u))
}

/// Per-example gradients of a dense layer: G_n = Σ_t scale·g_{n,t} ā_{n,t}ᵀ over T consecutive
/// rows, or (perRow) one per row.
func densePerExampleGradients<S: KFACScalar>(x: [S], g: [S], rows: Int, inFeatures: Int, outFeatures: Int, bias: Bool,
                                             rowsPerExample t: Int, perRow: Bool, scale: Double = 1) -> [Dense] {
    let a = inFeatures + (bias ? 1 : 0)
    var result: [Dense] = []
    let unit = perRow ? 1 : t
    for first in stride(from: 0, to: rows, by: unit) {
        var m = Dense(rows: outFeatures, columns: a)
        for r in first..<(first + unit) {
            for o in 0..<outFeatures {
                for i in 0..<a {
                    let xi = i < inFeatures ? Double(x[r * inFeatures + i]) : 1
                    m[o, i] += scale * Double(g[r * outFeatures + o]) * xi
                }
            }
        }
        result.append(m)
    }
    return result
}

/// Per-position gradients g_{n,t} ā_{n,t}ᵀ of a convolution (the per-row mode's examples).
func convPerPositionGradients<S: KFACScalar>(_ x: [S], _ dy: [S], _ s: ConvCase, examples: Int, group: Int) -> [Dense] {
    var result: [Dense] = []
    for n in 0..<examples {
        for oh in 0..<s.outputHeight {
            for ow in 0..<s.outputWidth {
                let p = ConvOracle.patch(x, s, n: n, group: group, oh: oh, ow: ow)
                var m = Dense(rows: s.outPerGroup, columns: p.count)
                for o in 0..<s.outPerGroup {
                    let go = ConvOracle.outputGradient(dy, s, n: n, o: group * s.outPerGroup + o, oh: oh, ow: ow)
                    for i in p.indices { m[o, i] = go * p[i] }
                }
                result.append(m)
            }
        }
    }
    return result
}
