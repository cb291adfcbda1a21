// libkfac benchmarks. Every figure is a ratio of two measurements taken in this one process:
// kernels against the sgemm rate, inversions against the bare LAPACK calls, a K-FAC training
// step against the plain SGD step of the same model. Times are medians of repeated runs.
//
//     make bench        (or: swift run -c release kfac-bench [--quick] [--dense-only | --conv-only |
//                        --ekfac-only | --no-ekfac | --cg-only | --no-cg | --tridiagonal-only |
//                        --no-tridiagonal | --curvature | --no-curvature])

import AllocationCounter
import CBLAS
import CLAPACKE
import KFAC

#if canImport(Glibc)
import Glibc
#endif

setvbuf(stdout, nil, _IOLBF, 0)  // progress, also when piped to a file
let quick = CommandLine.arguments.contains("--quick")
let widths = quick ? [512] : [512, 1024, 2048]
let batch = 256

// MARK: Measurement helpers

func now() -> Double {
    var t = timespec()
    clock_gettime(CLOCK_MONOTONIC, &t)
    return Double(t.tv_sec) + Double(t.tv_nsec) * 1e-9
}

/// Median seconds of `body` over `repeats` runs after one warm-up run.
func median(repeats: Int, _ body: () throws -> Void) rethrows -> Double {
    try body()
    var times: [Double] = []
    for _ in 0..<repeats {
        let t = now()
        try body()
        times.append(now() - t)
    }
    times.sort()
    return times[times.count / 2]
}

/// A buffer of n Floats, uniform in [-1, 1), from a fixed seed.
func randomBuffer(_ n: Int, seed: UInt64) -> UnsafeMutablePointer<Float> {
    let p = UnsafeMutablePointer<Float>.allocate(capacity: n)
    var s = seed
    for i in 0..<n {
        s = s &* 6364136223846793005 &+ 1442695040888963407
        p[i] = Float(s >> 40) / Float(1 << 23) - 1
    }
    return p
}

func gflops(_ flops: Double, _ seconds: Double) -> Double { flops / seconds / 1e9 }
func pad(_ s: String, _ n: Int) -> String { s.count >= n ? s : s + String(repeating: " ", count: n - s.count) }
func f(_ x: Double, _ digits: Int = 2) -> String {
    var r = x
    let m = pow(10.0, Double(digits))
    r = (r * m).rounded() / m
    return "\(r)"
}

/// sgemm GFLOP/s for C[m×n] = A[m×k] B[k×n].
func sgemmRate(m: Int, n: Int, k: Int, transA: Bool = false) -> Double {
    let a = randomBuffer(m * k, seed: 1), b = randomBuffer(k * n, seed: 2), c = randomBuffer(m * n, seed: 3)
    defer { a.deallocate(); b.deallocate(); c.deallocate() }
    let t = median(repeats: 5) {
        cblas_sgemm(CblasRowMajor, transA ? CblasTrans : CblasNoTrans, CblasNoTrans, Int32(m), Int32(n), Int32(k), 1,
                    a, Int32(transA ? m : k), b, Int32(n), 0, c, Int32(n))
    }
    return gflops(2 * Double(m) * Double(n) * Double(k), t)
}

// MARK: 1. Reference rate

let cgOnly = CommandLine.arguments.contains("--cg-only")  // section 7 alone
let tridiagonalOnly = CommandLine.arguments.contains("--tridiagonal-only")  // section 8 alone
let ekfacOnly = CommandLine.arguments.contains("--ekfac-only")
let runDense = !CommandLine.arguments.contains("--conv-only") && !ekfacOnly && !cgOnly && !tridiagonalOnly
let runConv = !CommandLine.arguments.contains("--dense-only") && !ekfacOnly && !cgOnly && !tridiagonalOnly
let runCG = !CommandLine.arguments.contains("--conv-only") && !ekfacOnly && !tridiagonalOnly && !CommandLine.arguments.contains("--no-cg")
print("libkfac benchmarks — \(openblas_get_num_threads()) OpenBLAS threads, float32, batch \(batch)")
print("reference: sgemm 2048³, measured again before every row (each row's fractions use its own)\n")

// MARK: 2. Kernels per layer width

if runDense {
print("Dense layer W→W with bias, batch \(batch) rows")
print(pad("W", 6) + pad("sgemm GF/s", 12) + pad("factor update", 15) + pad("sgemm W×256×W", 15) + pad("precond chol", 14)
      + pad("precond eigen", 15) + pad("inv chol/LAPACK", 17) + pad("inv eigen/LAPACK", 18) + "parallel: chol, eigen")

}
for w in runDense ? widths : [] {
    let peak = sgemmRate(m: 2048, n: 2048, k: 2048)
    let x = randomBuffer(batch * w, seed: 10), g = randomBuffer(batch * w, seed: 11)
    let weight = randomBuffer(w * w, seed: 12), bias = randomBuffer(w, seed: 13)
    defer { x.deallocate(); g.deallocate(); weight.deallocate(); bias.deallocate() }
    let opt = try KFACOptimizer<Float>()
    try opt.addDense(inFeatures: w, outFeatures: w, hasBias: true)
    try opt.set(.damping, 0.1)

    // Factor update: both statistics of one batch and the fold into the moving average. Useful
    // FLOPs: the two symmetric rank-N updates, N·d·(d+1) each.
    let tFactor = try median(repeats: 5) {
        try opt.recordInputs(layer: 0, x, rows: batch)
        try opt.recordOutputGradients(layer: 0, g, rows: batch)
        try opt.updateFactors()
    }
    let factorFlops = Double(batch) * (Double(w + 1) * Double(w + 2) + Double(w) * Double(w + 1))
    let factorRate = gflops(factorFlops, tFactor)
    // What sgemm itself reaches on this shape (W×N times N×W).
    let shapeRate = sgemmRate(m: w, n: w, k: batch, transA: true)

    // Preconditioning one gradient: 2 (Cholesky) or 4 (eigen) products of out×(in+1) matrices.
    var precondition: [InverseStrategy: Double] = [:]
    var inverseRatio: [InverseStrategy: Double] = [:]
    var parallelRatio: [InverseStrategy: Double] = [:]
    for strategy in [InverseStrategy.cholesky, .eigen] {
        try opt.set(.inverseStrategy, Int64(strategy.rawValue))
        try opt.updateInverses()
        let t = try median(repeats: 5) { try opt.precondition(layer: 0, weight: weight, bias: bias) }
        let (o, a) = (Double(w), Double(w + 1))
        let products = 2 * o * a * a + 2 * o * o * a
        precondition[strategy] = gflops((strategy == .cholesky ? 1 : 2) * products, t) / peak

        // The library's inversion of both factors against the bare LAPACK calls on the same
        // matrices, one after the other.
        let tLibrary = try median(repeats: 3) { try opt.updateInverses() }
        // With OpenBLAS single-threaded the library inverts A and G in parallel on its workers.
        let blasThreads = openblas_get_num_threads()
        openblas_set_num_threads(1)
        let tParallel = try median(repeats: 3) { try opt.updateInverses() }
        openblas_set_num_threads(blasThreads)
        let (fa, fg) = try opt.factors(layer: 0)
        var bare: [[Float]] = [fa, fg]
        let sqrtLambda = Float(0.1).squareRoot()
        let tLapack = median(repeats: 3) {
            for (k, factor) in [fa, fg].enumerated() {
                let n = Int32(k == 0 ? w + 1 : w)
                bare[k] = factor
                bare[k].withUnsafeMutableBufferPointer { m in
                    let p = m.baseAddress!
                    if strategy == .cholesky {
                        for i in 0..<Int(n) { p[i * Int(n) + i] += sqrtLambda }
                        _ = LAPACKE_spotrf(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "L")), n, p, n)
                        _ = LAPACKE_spotri(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "L")), n, p, n)
                    } else {
                        var values = [Float](repeating: 0, count: Int(n))
                        _ = LAPACKE_ssyevd(LAPACK_COL_MAJOR, CChar(UInt8(ascii: "V")), CChar(UInt8(ascii: "L")), n, p, n, &values)
                    }
                }
            }
        }
        inverseRatio[strategy] = tLibrary / tLapack
        parallelRatio[strategy] = tParallel / tLapack
    }
    print(pad("\(w)", 6) + pad("\(f(peak, 1))", 12)
          + pad("\(f(factorRate / peak))", 15) + pad("\(f(shapeRate / peak))", 15)
          + pad("\(f(precondition[.cholesky]!))", 14) + pad("\(f(precondition[.eigen]!))", 15)
          + pad("\(f(inverseRatio[.cholesky]!))×", 17) + pad("\(f(inverseRatio[.eigen]!))×", 18)
          + "\(f(parallelRatio[.cholesky]!))×, \(f(parallelRatio[.eigen]!))×")
}
if runDense { print("""
  Fractions of the sgemm 2048³ rate (useful FLOPs): factor update = recording a batch of inputs
  and output gradients and folding it into the moving averages (two symmetric rank-256 updates,
  N·d(d+1) FLOPs each; the fold is the syrk's beta, no extra pass over the factors);
  sgemm W×256×W = what sgemm itself reaches on that shape; precond = preconditioning one
  gradient (2 or 4 products). inv/LAPACK = the library's time to invert A and G divided by the bare LAPACK
  calls (potrf+potri, or syevd) on the same matrices with OpenBLAS's threads; parallel = the same
  ratio with OpenBLAS single-threaded and A, G inverted at once on the library's two workers.

""") }

// MARK: 3. A training step of a 784-W-W-10 MLP

/// A tanh MLP with preallocated buffers and BLAS forward/backward passes, so that a step is
/// nothing but the arithmetic.
final class MLP {
    let sizes: [Int]
    let rows: Int
    var weights: [UnsafeMutablePointer<Float>] = []
    var biases: [UnsafeMutablePointer<Float>] = []
    var weightGrads: [UnsafeMutablePointer<Float>] = []
    var biasGrads: [UnsafeMutablePointer<Float>] = []
    var activations: [UnsafeMutablePointer<Float>] = []  // input of layer l (rows × sizes[l])
    var deltas: [UnsafeMutablePointer<Float>] = []       // gradient at the output of layer l
    let input: UnsafeMutablePointer<Float>
    let labels: [Int]

    init(sizes: [Int], rows: Int) {
        self.sizes = sizes
        self.rows = rows
        input = randomBuffer(rows * sizes[0], seed: 99)
        labels = (0..<rows).map { $0 % sizes.last! }
        for l in 0..<(sizes.count - 1) {
            let (i, o) = (sizes[l], sizes[l + 1])
            let wl = randomBuffer(i * o, seed: UInt64(l))
            for k in 0..<(i * o) { wl[k] /= Float(i).squareRoot() }
            weights.append(wl)
            biases.append(randomBuffer(o, seed: UInt64(100 + l)))
            weightGrads.append(randomBuffer(i * o, seed: 0))
            biasGrads.append(randomBuffer(o, seed: 0))
            activations.append(l == 0 ? input : randomBuffer(rows * i, seed: 0))
            deltas.append(randomBuffer(rows * o, seed: 0))
        }
        activations.append(randomBuffer(rows * sizes.last!, seed: 0))  // logits
    }

    var layerCount: Int { sizes.count - 1 }

    /// FLOPs of forward + backward (weight and input gradients) + SGD update.
    var flops: Double {
        var total = 0.0
        for l in 0..<layerCount {
            let (i, o) = (Double(sizes[l]), Double(sizes[l + 1]))
            total += 2 * Double(rows) * i * o * (l == 0 ? 2 : 3) + 2 * i * o
        }
        return total
    }

    func forwardBackward() {
        let n = Int32(rows)
        for l in 0..<layerCount {
            let (i, o) = (Int32(sizes[l]), Int32(sizes[l + 1]))
            let out = activations[l + 1]
            for r in 0..<rows { (out + r * Int(o)).update(from: biases[l], count: Int(o)) }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, o, i, 1, activations[l], i, weights[l], i, 1, out, o)
            if l < layerCount - 1 { for k in 0..<(rows * Int(o)) { out[k] = tanhf(out[k]) } }
        }
        // Softmax cross-entropy gradient of the summed loss at the logits.
        let c = sizes.last!
        let z = activations[layerCount], dz = deltas[layerCount - 1]
        for r in 0..<rows {
            var m = -Float.infinity
            for k in 0..<c { m = max(m, z[r * c + k]) }
            var s: Float = 0
            for k in 0..<c { dz[r * c + k] = expf(z[r * c + k] - m); s += dz[r * c + k] }
            for k in 0..<c { dz[r * c + k] = dz[r * c + k] / s - (k == labels[r] ? 1 : 0) }
        }
        for l in stride(from: layerCount - 1, through: 0, by: -1) {
            let (i, o) = (Int32(sizes[l]), Int32(sizes[l + 1]))
            // Gradients of the mean loss.
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, o, i, n, 1 / Float(rows), deltas[l], o,
                        activations[l], i, 0, weightGrads[l], i)
            for k in 0..<Int(o) { biasGrads[l][k] = 0 }
            for r in 0..<rows { for k in 0..<Int(o) { biasGrads[l][k] += deltas[l][r * Int(o) + k] / Float(rows) } }
            if l > 0 {
                let d = deltas[l - 1], a = activations[l]
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, i, o, 1, deltas[l], o, weights[l], i, 0, d, i)
                for k in 0..<(rows * Int(i)) { d[k] *= 1 - a[k] * a[k] }
            }
        }
    }

    func update(rate: Float) {
        for l in 0..<layerCount {
            cblas_saxpy(Int32(sizes[l] * sizes[l + 1]), -rate, weightGrads[l], 1, weights[l], 1)
            cblas_saxpy(Int32(sizes[l + 1]), -rate, biasGrads[l], 1, biases[l], 1)
        }
    }
}

if runDense { print("Training step of a 784-W-W-10 tanh MLP, batch \(batch): factors every step, inverses every 10")
print(pad("W", 6) + pad("strategy", 10) + pad("SGD step", 11) + pad("K-FAC step", 12) + pad("K-FAC/SGD", 11)
      + pad("FLOP floor", 12) + pad("measured/floor", 16) + "allocations/step: OpenBLAS threaded / single") }
let stepWidths = !runDense ? [] : quick ? [512] : [512, 1024, 2048]
for w in stepWidths {
    for strategy in [InverseStrategy.cholesky, .eigen] {
        let mlp = MLP(sizes: [784, w, w, 10], rows: batch)
        let opt = try KFACOptimizer<Float>()
        for l in 0..<mlp.layerCount { try opt.addDense(inFeatures: mlp.sizes[l], outFeatures: mlp.sizes[l + 1], hasBias: true) }
        var p = opt.parameters
        p.inverseStrategy = strategy
        p.inverseUpdatePeriod = 10
        p.factorUpdatePeriod = 1
        p.damping = 0.01
        try opt.setParameters(p)

        /// Allocations made inside library calls (counted only while the library runs).
        var libraryAllocations: Int64 = 0
        func kfacStep() throws {
            mlp.forwardBackward()
            allocation_counter_start()
            for l in 0..<mlp.layerCount {
                try opt.recordInputs(layer: l, mlp.activations[l], rows: batch)
                try opt.recordOutputGradients(layer: l, mlp.deltas[l], rows: batch)
            }
            try opt.step { l in ParameterGradient(weight: mlp.weightGrads[l], bias: mlp.biasGrads[l]) }
            libraryAllocations += allocation_counter_stop()
            mlp.update(rate: 1e-3)
        }
        let steps = 10  // one inversion per 10 steps, as in the schedule
        let tSGD = median(repeats: 5) { for _ in 0..<steps { mlp.forwardBackward(); mlp.update(rate: 1e-3) } } / Double(steps)
        for _ in 0..<steps { try kfacStep() }  // warm-up
        libraryAllocations = 0
        let tKFAC = try median(repeats: 3) { for _ in 0..<steps { try kfacStep() } } / Double(steps)
        let allocations = Double(libraryAllocations) / Double(4 * steps)
        // The same steps with OpenBLAS single-threaded (inversions on the library's workers).
        let blasThreads = openblas_get_num_threads()
        openblas_set_num_threads(1)
        for _ in 0..<steps { try kfacStep() }
        libraryAllocations = 0
        for _ in 0..<steps { try kfacStep() }
        let allocationsSingle = Double(libraryAllocations) / Double(steps)
        openblas_set_num_threads(blasThreads)

        // The FLOPs K-FAC adds per step: statistics, preconditioning, and a tenth of an
        // inversion (potrf + potri ≈ d³; syevd ≈ 10/3 d³: tridiagonal reduction and
        // back-transformation, a lower bound for the divide-and-conquer eigenvectors).
        var extra = 0.0
        for l in 0..<mlp.layerCount {
            let (a, o) = (Double(mlp.sizes[l] + 1), Double(mlp.sizes[l + 1]))
            extra += Double(batch) * (a * (a + 1) + o * (o + 1))
            extra += (strategy == .cholesky ? 1 : 2) * (2 * o * a * a + 2 * o * o * a)
            extra += (strategy == .cholesky ? 1 : 10.0 / 3) * (a * a * a + o * o * o) / 10
        }
        let floor = (mlp.flops + extra) / mlp.flops
        let ratio = tKFAC / tSGD
        print(pad("\(w)", 6) + pad("\(strategy)", 10) + pad("\(f(tSGD * 1e3)) ms", 11) + pad("\(f(tKFAC * 1e3)) ms", 12)
              + pad("\(f(ratio))×", 11) + pad("\(f(floor))×", 12) + pad("\(f(ratio / floor))", 16) + "\(f(allocations, 1)) / \(f(allocationsSingle, 1))")
    }
}
if runDense { print("""
  FLOP floor = (FLOPs of the SGD step + FLOPs K-FAC adds) / FLOPs of the SGD step: the ratio if every
  FLOP ran at the SGD step's rate. measured/floor is the K-FAC step's overhead beyond its arithmetic.
  allocations/step counts every heap allocation in the process while libkfac calls run (record +
  step), with OpenBLAS threaded and with OpenBLAS single-threaded. The allocations traced so far
  are all inside OpenBLAS (its threaded syrk/gemm/potrf dispatch, and the small-matrix sgemm kernel
  that syevd's divide and conquer calls); libkfac's own code allocates nothing after warm-up
  (Tests/KFACTests/AllocationTests.swift checks that with a zero count).
""") }

// MARK: 4. Convolutions (VGG-like layers)

if runConv {
    print("""

    Convolutions: VGG-like 3×3 layers, C_in = C_out = C, padding 1, float32
    """)
    print(pad("layer", 26) + pad("sgemm GF/s", 12) + pad("factor update", 15) + pad("precond KFC", 13) + "precond SUA (× faster than KFC)")
    let convCases: [(c: Int, size: Int, batch: Int)] = quick ? [(64, 8, 32)]
        : [(64, 32, 128), (256, 8, 128), (256, 32, 32), (512, 8, 64)]
    for (c, size, n) in convCases {
        let peak = sgemmRate(m: 2048, n: 2048, k: 2048)
        let geometry = Conv2dGeometry(inChannels: c, outChannels: c, kernel: (3, 3), padding: (1, 1), input: (size, size))
        let x = randomBuffer(n * c * size * size, seed: 20), g = randomBuffer(n * c * geometry.outputPositions, seed: 21)
        let weight = randomBuffer(c * geometry.patchSize, seed: 22), bias = randomBuffer(c, seed: 23)
        defer { x.deallocate(); g.deallocate(); weight.deallocate(); bias.deallocate() }
        var preconditionTimes: [ConvApproximation: Double] = [:]
        var factorRate = 0.0
        for approximation in ConvApproximation.allCases {
            let opt = try KFACOptimizer<Float>()
            try opt.addConv2d(geometry, approximation: approximation)
            try opt.set(.damping, 0.1)
            try opt.set(.inverseStrategy, Int64(InverseStrategy.cholesky.rawValue))
            let tFactor = try median(repeats: 3) {
                try opt.recordInputs(layer: 0, x, rows: n)
                try opt.recordOutputGradients(layer: 0, g, rows: n)
                try opt.updateFactors()
            }
            if approximation == .kfc {
                // Useful FLOPs: the patch second moment (N·|T| rows of d = 9C + 1) and Γ (N·|T| rows of C).
                let rows = Double(n * geometry.outputPositions), d = Double(geometry.patchSize + 1)
                factorRate = gflops(rows * (d * (d + 1) + Double(c) * Double(c + 1)), tFactor)
            }
            try opt.updateInverses()
            let t = try median(repeats: 3) { try opt.precondition(layer: 0, weight: weight, bias: bias) }
            preconditionTimes[approximation] = t
        }
        let (o, a) = (Double(c), Double(geometry.patchSize + 1))
        let kfcPrecondition = gflops(2 * o * a * a + 2 * o * o * a, preconditionTimes[.kfc]!) / peak
        print(pad("C=\(c) \(size)×\(size) batch \(n)", 26) + pad("\(f(peak, 1))", 12) + pad("\(f(factorRate / peak))", 15)
              + pad("\(f(kfcPrecondition))", 13) + "\(f(preconditionTimes[.kfc]! / preconditionTimes[.sua]!, 1))×")
    }
    print("""
      factor update = recording a batch and folding it (KFC: patches formed in chunks and reduced
      by syrk), as a fraction of sgemm (useful FLOPs of Ω and Γ); precond KFC = preconditioning one
      gradient with KFC's dense factors (Cholesky strategy) as a fraction of sgemm; SUA = how many
      times faster the same step is with SUA's block-diagonal input factor.

    """)

    // Inversion of the input-side factor: KFC against SUA and channel grouping, on the layer of
    // seed 003's comparison (VGG11's 512-channel 3×3 layers: 4608×4608 against 512×512).
    let c = quick ? 64 : 512
    let geometry = Conv2dGeometry(inChannels: c, outChannels: c, kernel: (3, 3), padding: (1, 1), input: (4, 4))
    let n = 16
    let x = randomBuffer(n * c * 16, seed: 30), g = randomBuffer(n * c * 16, seed: 31)
    defer { x.deallocate(); g.deallocate() }
    print("Inverting one \(c)-channel 3×3 layer's factors (A: \(geometry.patchSize + 1)×\(geometry.patchSize + 1) for KFC), time relative to KFC")
    print(pad("variant", 24) + pad("Cholesky", 22) + "eigen")
    let variants: [(String, ConvApproximation, Int)] = [("KFC", .kfc, 0), ("KFC, groups of 64", .kfc, 64),
                                                        ("KFC, groups of 32", .kfc, 32), ("SUA", .sua, 0),
                                                        ("SUA, groups of 64", .sua, 64), ("SUA, groups of 32", .sua, 32)]
    var reference: [InverseStrategy: Double] = [:]
    for (name, approximation, group) in variants {
        var cells: [String] = []
        for strategy in [InverseStrategy.cholesky, .eigen] {
            let opt = try KFACOptimizer<Float>()
            try opt.addConv2d(geometry, approximation: approximation,
                              grouping: ChannelGrouping(inputGroupSize: group, outputGroupSize: group))
            try opt.set(.damping, 0.1)
            try opt.set(.inverseStrategy, Int64(strategy.rawValue))
            try opt.recordInputs(layer: 0, x, rows: n)
            try opt.recordOutputGradients(layer: 0, g, rows: n)
            try opt.updateFactors()
            let t = try median(repeats: approximation == .kfc && group == 0 ? 1 : 3) { try opt.updateInverses() }
            if reference[strategy] == nil { reference[strategy] = t }
            cells.append("\(f(t * 1e3, 1)) ms = 1/\(f(reference[strategy]! / t, 0))")
        }
        print(pad(name, 24) + pad(cells[0], 22) + cells[1])
    }
    print("""
      Both factors of the layer are inverted (A and the 512×512 Γ, grouped alike); 1/x is KFC's
      time over the variant's.
    """)
}

// MARK: 5. Gauss-Newton products (experimental)

if (CommandLine.arguments.contains("--gauss-newton") || !(CommandLine.arguments.contains("--no-gauss-newton") || ekfacOnly)) && !cgOnly && !tridiagonalOnly {
    print("\nGauss-Newton products G·v of a 784-W-W-10 tanh MLP, softmax outputs, batch \(batch), against one")
    print("gradient (forward + backward) of the same batch")
    print(pad("W", 6) + pad("gradient", 11) + pad("R-op G·v", 16) + pad("columns G·v (K=10)", 22)
          + pad("recording (K=10)", 20) + pad("kept values", 13) + "columns/gradient FLOPs")
    for w in quick ? [512] : [512, 1024] {
        let mlp = MLP(sizes: [784, w, w, 10], rows: batch)
        let tGrad = median(repeats: 7) { mlp.forwardBackward() }
        let opt = try KFACOptimizer<Float>()
        for l in 0..<mlp.layerCount { try opt.addDense(inFeatures: mlp.sizes[l], outFeatures: mlp.sizes[l + 1], hasBias: true) }
        // R operator: the chain's forward pass once (it copies θ and the inputs), then products.
        try opt.defineDenseChain(layers: [0, 1, 2], activations: [.tanh, .tanh, .identity], distribution: .categorical)
        mlp.forwardBackward()
        try opt.denseChainForward(rows: batch, weights: mlp.weights.map { UnsafePointer($0) }, biases: mlp.biases.map { UnsafePointer($0) },
                                  inputs: [UnsafePointer(mlp.input), nil, nil], derivatives: [nil, nil, nil], outputs: nil)
        let vectors = (0..<mlp.layerCount).map { l in
            (randomBuffer(mlp.sizes[l] * mlp.sizes[l + 1], seed: 7 + UInt64(l)), randomBuffer(mlp.sizes[l + 1], seed: 17 + UInt64(l)))
        }
        let outputs = (0..<mlp.layerCount).map { l in
            (randomBuffer(mlp.sizes[l] * mlp.sizes[l + 1], seed: 0), randomBuffer(mlp.sizes[l + 1], seed: 0))
        }
        let vector = { (l: Int) -> ParameterVector<Float>? in ParameterVector(weight: vectors[l].0, bias: vectors[l].1) }
        let output = { (l: Int) -> ParameterGradient<Float>? in ParameterGradient(weight: outputs[l].0, bias: outputs[l].1) }
        let tChain = try median(repeats: 7) { try opt.denseChainProduct(vector, into: output) }
        // Stored columns: S's K = 10 columns back-propagated through the MLP (K backward passes),
        // recorded with the inputs; this one-off cost is the "recording" column.
        let k = 10, c = mlp.sizes.last!
        let columns = (0..<mlp.layerCount).map { l in UnsafeMutablePointer<Float>.allocate(capacity: k * batch * mlp.sizes[l + 1]) }
        let roots = UnsafeMutablePointer<Float>.allocate(capacity: c * batch * c)
        let tRecord = try median(repeats: 3) {
            opt.clearGaussNewtonColumns()
            OutputHessian.squareRoot(distribution: .categorical, outputs: mlp.activations[mlp.layerCount], rows: batch, dim: c, into: roots)
            for j in 0..<k {
                (columns[mlp.layerCount - 1] + j * batch * c).update(from: roots + j * batch * c, count: batch * c)
                for l in stride(from: mlp.layerCount - 1, to: 0, by: -1) {
                    let (i, o) = (Int32(mlp.sizes[l]), Int32(mlp.sizes[l + 1]))
                    let d = columns[l - 1] + j * batch * Int(i), a = mlp.activations[l]
                    cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(batch), i, o, 1, columns[l] + j * batch * Int(o), o,
                                mlp.weights[l], i, 0, d, i)
                    for q in 0..<(batch * Int(i)) { d[q] *= 1 - a[q] * a[q] }
                }
            }
            for l in 0..<mlp.layerCount {
                try opt.recordOutputGradientColumns(layer: l, inputs: mlp.activations[l], columns: columns[l], rows: batch, k: k,
                                                    uses: .product)
            }
        }
        let tColumns = try median(repeats: 7) { try opt.gaussNewtonProduct(vector, into: output) }
        print(pad("\(w)", 6) + pad("\(f(tGrad * 1e3)) ms", 11) + pad("\(f(tChain / tGrad))× (≤ 2)", 16)
              + pad("\(f(tColumns / tGrad))× (≤ 0.5)", 22) + pad("\(f(tRecord / tGrad))× once", 20)
              + pad("\(opt.gaussNewtonColumnInfo.values)", 13)
              + f(4 * Double(batch) * (0..<mlp.layerCount).reduce(0.0) { $0 + Double(mlp.sizes[$1] * mlp.sizes[$1 + 1]) } / mlp.flops))
        columns.forEach { $0.deallocate() }
        roots.deallocate()
    }
    print("""
      Ratios to the gradient of the same batch, measured in this run. The R-op product includes the
      output Hessian; the chain's forward pass (copies of θ and the inputs) is made once per batch
      and not counted. The recording is S, K = 10 backward passes through the MLP and the record calls.
      Stored columns cost two gemms per layer (V ā and its transpose) whatever K is; the gradient
      costs two for the first layer and three for the others: the last column is that FLOP ratio.
    """)
}

// MARK: 5b. Curvature sources of the output factors (experimental): KFLR, MC, KFRA

if (CommandLine.arguments.contains("--curvature") || !(CommandLine.arguments.contains("--no-curvature") || ekfacOnly))
    && !cgOnly && !tridiagonalOnly {
    print("\nRecording the output factors of a 784-W-W-10 tanh MLP, softmax outputs, batch \(batch), against one")
    print("gradient (forward + backward) of the same batch; all three record G of every layer")
    print(pad("W", 6) + pad("gradient", 11) + pad("Fisher record", 15) + pad("MC S=1", 10) + pad("KFLR (K=10)", 13)
          + pad("KFRA", 10) + "chain forward")
    for w in quick ? [512] : [512, 1024] {
        let mlp = MLP(sizes: [784, w, w, 10], rows: batch)
        let tGrad = median(repeats: 7) { mlp.forwardBackward() }
        let opt = try KFACOptimizer<Float>()
        for l in 0..<mlp.layerCount { try opt.addDense(inFeatures: mlp.sizes[l], outFeatures: mlp.sizes[l + 1], hasBias: true) }
        try opt.defineDenseChain(layers: [0, 1, 2], activations: [.tanh, .tanh, .identity], distribution: .categorical)
        mlp.forwardBackward()
        func chainForward() throws {
            try opt.denseChainForward(rows: batch, weights: mlp.weights.map { UnsafePointer($0) },
                                      biases: mlp.biases.map { UnsafePointer($0) },
                                      inputs: [UnsafePointer(mlp.input), nil, nil], derivatives: [nil, nil, nil], outputs: nil)
        }
        // The default Fisher: the gradients the backward pass already has, recorded per layer.
        let tFisher = try median(repeats: 7) {
            for l in 0..<mlp.layerCount { try opt.recordOutputGradients(layer: l, mlp.deltas[l], rows: batch) }
        }
        try opt.updateFactors()
        // MC with one sample: sampled output gradients, one backward pass, FACTOR columns (k = 1).
        let c = mlp.sizes.last!
        let columns = (0..<mlp.layerCount).map { l in UnsafeMutablePointer<Float>.allocate(capacity: batch * mlp.sizes[l + 1]) }
        var seed: UInt64 = 0
        let tMC = try median(repeats: 7) {
            seed += 1
            TargetSampler.sampledOutputGradients(distribution: .categorical, outputs: mlp.activations[mlp.layerCount], rows: batch,
                                                 dim: c, seed: seed, into: columns[mlp.layerCount - 1])
            for l in stride(from: mlp.layerCount - 1, to: 0, by: -1) {
                let (i, o) = (Int32(mlp.sizes[l]), Int32(mlp.sizes[l + 1]))
                let d = columns[l - 1], a = mlp.activations[l]
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(batch), i, o, 1, columns[l], o, mlp.weights[l], i, 0, d, i)
                for q in 0..<(batch * Int(i)) { d[q] *= 1 - a[q] * a[q] }
            }
            for l in 0..<mlp.layerCount {
                try opt.recordOutputGradientColumns(layer: l, inputs: nil, columns: columns[l], rows: batch, k: 1, uses: .factor)
            }
        }
        try opt.updateFactors()
        let tForward = try median(repeats: 7) { try chainForward() }
        let tKFLR = try median(repeats: 5) { try chainForward(); try opt.denseChainRecordColumns(uses: .factor) }
        try opt.updateFactors()
        let tKFRA = try median(repeats: 7) {
            try chainForward(); try opt.denseChainRecordKFRA(variant: .gaussNewton, recordInputs: false, outputGradients: nil)
        }
        try opt.updateFactors()
        print(pad("\(w)", 6) + pad("\(f(tGrad * 1e3)) ms", 11) + pad("\(f(tFisher / tGrad))×", 15) + pad("\(f(tMC / tGrad))×", 10)
              + pad("\(f(tKFLR / tGrad))×", 13) + pad("\(f(tKFRA / tGrad))×", 10) + "\(f(tForward / tGrad))×")
        columns.forEach { $0.deallocate() }
    }
    print("""
      Ratios to the gradient of the same batch, measured in this run. Fisher: the default record of
      the gradients a backward pass already computed. MC S=1: sampling, one extra backward pass
      (the caller's, here BLAS) and the FACTOR record. KFLR and KFRA include the chain's forward pass
      (copies of θ and the inputs, s and φ′: last column): KFLR back-propagates K = 10 columns (one
      gemm of K·N rows per layer) and records K·N rows per layer; KFRA's recursion is two o×o×i
      gemms and one N×i² gemm per layer, independent of K.
    """)
}

// MARK: 6. EKFAC's extra cost per step

if !CommandLine.arguments.contains("--no-ekfac") && !cgOnly && !tridiagonalOnly {
    print("""

    EKFAC against the eigen strategy, same layers and data, float32: time of one training step's
    library calls (record + step; factors every step, inverses every 10), as a ratio to eigen's
    """)
    print(pad("layers", 40) + pad("eigen", 11) + pad("EKFAC per example", 19) + "EKFAC per row")
    struct EKFACCase { var name: String; var dense: [(Int, Int)]; var conv: Conv2dGeometry?; var rows: Int; var perExample: Int }
    var ekfacCases: [EKFACCase] = (quick ? [512] : [512, 1024]).map {
        EKFACCase(name: "MLP 784-\($0)-\($0)-10, batch \(batch)", dense: [(784, $0), ($0, $0), ($0, 10)], conv: nil, rows: batch, perExample: 1)
    }
    ekfacCases.append(EKFACCase(name: "dense 512-512, 32 sequences × 8", dense: [(512, 512)], conv: nil, rows: 256, perExample: 8))
    ekfacCases.append(EKFACCase(name: "conv 64→64 3×3 on 16×16, batch 32", dense: [],
                                conv: Conv2dGeometry(inChannels: 64, outChannels: 64, kernel: (3, 3), padding: (1, 1), input: (16, 16)),
                                rows: 32, perExample: 1))
    for c in ekfacCases {
        var buffers: [(x: UnsafeMutablePointer<Float>, g: UnsafeMutablePointer<Float>, w: UnsafeMutablePointer<Float>, b: UnsafeMutablePointer<Float>)] = []
        func layerSizes(_ opt: KFACOptimizer<Float>) throws {
            for (i, o) in c.dense { try opt.addDense(inFeatures: i, outFeatures: o, hasBias: true) }
            if let g = c.conv { try opt.addConv2d(g) }
        }
        let probe = try KFACOptimizer<Float>()
        try layerSizes(probe)
        for l in 0..<probe.layerCount {
            let d = try probe.layerInfo(l).layer
            let xCount = c.conv != nil ? c.rows * d.inFeatures * 16 * 16 : c.rows * d.inFeatures
            let gCount = c.conv != nil ? c.rows * d.outFeatures * 16 * 16 : c.rows * d.outFeatures
            let wCount = c.conv != nil ? d.outFeatures * (d.inputFactorDimension - 1) : d.inFeatures * d.outFeatures
            buffers.append((randomBuffer(xCount, seed: UInt64(40 + l)), randomBuffer(gCount, seed: UInt64(50 + l)),
                            randomBuffer(wCount, seed: 0), randomBuffer(d.outFeatures, seed: 0)))
        }
        defer { for b in buffers { b.x.deallocate(); b.g.deallocate(); b.w.deallocate(); b.b.deallocate() } }
        // The three optimizers run in turns (5 rounds of 10 steps each, after a warm-up round),
        // so that a load change on the machine hits them alike; medians per optimizer.
        let variants = [(InverseStrategy.eigen, EKFACMode.perExample), (.ekfac, .perExample), (.ekfac, .perRow)]
        var optimizers: [KFACOptimizer<Float>] = []
        for (strategy, mode) in variants {
            let opt = try KFACOptimizer<Float>()
            try layerSizes(opt)
            var p = opt.parameters
            p.inverseStrategy = strategy; p.ekfacMode = mode; p.inverseUpdatePeriod = 10; p.damping = 0.01
            try opt.setParameters(p)
            optimizers.append(opt)
        }
        func run(_ opt: KFACOptimizer<Float>) throws {
            for _ in 0..<10 {
                for l in 0..<opt.layerCount {
                    if opt.parameters.inverseStrategy == .ekfac {
                        try opt.recordExamples(layer: l, inputs: buffers[l].x, outputGradients: buffers[l].g, rows: c.rows,
                                               rowsPerExample: c.perExample)
                    } else {
                        try opt.recordInputs(layer: l, buffers[l].x, rows: c.rows)
                        try opt.recordOutputGradients(layer: l, buffers[l].g, rows: c.rows)
                    }
                }
                try opt.step { l in ParameterGradient(weight: buffers[l].w, bias: buffers[l].b) }
            }
        }
        for opt in optimizers { try run(opt) }
        var samples = [[Double]](repeating: [], count: optimizers.count)
        for _ in 0..<5 {
            for (k, opt) in optimizers.enumerated() {
                let t = now()
                try run(opt)
                samples[k].append((now() - t) / 10)
            }
        }
        let times = samples.map { $0.sorted()[$0.count / 2] }
        print(pad(c.name, 40) + pad("\(f(times[0] * 1e3)) ms", 11) + pad("\(f(times[1] / times[0]))×", 19) + "\(f(times[2] / times[0]))×")
    }
    print("""
      EKFAC records the rows paired (kept until the step) and re-estimates S at every factor update
      in the current bases: rotations of all rows (dense, per-row) or of every per-example gradient
      (sequences, convolutions: one o×|T|×a gemm to form it, two block products to rotate it).
    """)
}

// MARK: 7. Conjugate gradient: the solver's own work per iteration against one product

/// G·v = (1/rows) Σ Jᵀ (diag(p) − ppᵀ) J v of a 784-W-W-10 tanh MLP at the activations of its
/// last forward pass: R-op forward, the softmax Hessian, backward (the product a Newton-CG
/// trainer supplies for every CG iteration).
final class GaussNewtonProduct {
    let mlp: MLP
    var r: [UnsafeMutablePointer<Float>] = []
    let probs: UnsafeMutablePointer<Float>

    init(_ mlp: MLP) {
        self.mlp = mlp
        for l in 0..<mlp.layerCount { r.append(randomBuffer(mlp.rows * mlp.sizes[l + 1], seed: 0)) }
        probs = randomBuffer(mlp.rows * mlp.sizes.last!, seed: 0)
    }

    /// After mlp.forwardBackward(): the softmax of the logits.
    func prepare() {
        let c = mlp.sizes.last!, z = mlp.activations[mlp.layerCount]
        for row in 0..<mlp.rows {
            var m = -Float.infinity
            for k in 0..<c { m = max(m, z[row * c + k]) }
            var s: Float = 0
            for k in 0..<c { probs[row * c + k] = expf(z[row * c + k] - m); s += probs[row * c + k] }
            for k in 0..<c { probs[row * c + k] /= s }
        }
    }

    func multiply(vW: [UnsafeMutablePointer<Float>], vb: [UnsafeMutablePointer<Float>],
                  outW: [UnsafeMutablePointer<Float>], outb: [UnsafeMutablePointer<Float>]) {
        let rows = mlp.rows, n = Int32(rows), L = mlp.layerCount
        for l in 0..<L {
            let (i, o) = (Int32(mlp.sizes[l]), Int32(mlp.sizes[l + 1]))
            for row in 0..<rows { (r[l] + row * Int(o)).update(from: vb[l], count: Int(o)) }
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, o, i, 1, mlp.activations[l], i, vW[l], i, 1, r[l], o)
            if l > 0 { cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, o, i, 1, r[l - 1], i, mlp.weights[l], i, 1, r[l], o) }
            if l < L - 1 { let a = mlp.activations[l + 1]; for k in 0..<(rows * Int(o)) { r[l][k] *= 1 - a[k] * a[k] } }
        }
        let c = mlp.sizes.last!, q = r[L - 1], dz = mlp.deltas[L - 1]
        for row in 0..<rows {
            var s: Float = 0
            for k in 0..<c { s += probs[row * c + k] * q[row * c + k] }
            for k in 0..<c { dz[row * c + k] = probs[row * c + k] * (q[row * c + k] - s) }
        }
        for l in stride(from: L - 1, through: 0, by: -1) {
            let (i, o) = (Int32(mlp.sizes[l]), Int32(mlp.sizes[l + 1]))
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, o, i, n, 1 / Float(rows), mlp.deltas[l], o,
                        mlp.activations[l], i, 0, outW[l], i)
            for k in 0..<Int(o) { outb[l][k] = 0 }
            for row in 0..<rows { for k in 0..<Int(o) { outb[l][k] += mlp.deltas[l][row * Int(o) + k] / Float(rows) } }
            if l > 0 {
                let d = mlp.deltas[l - 1], a = mlp.activations[l]
                cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, i, o, 1, mlp.deltas[l], o, mlp.weights[l], i, 0, d, i)
                for k in 0..<(rows * Int(i)) { d[k] *= 1 - a[k] * a[k] }
            }
        }
    }
}

/// The same product in float64: double copies of the MLP's weights, activations and softmax
/// outputs, dgemm instead of sgemm (what a float64 Newton-CG trainer supplies).
final class DoubleGaussNewtonProduct {
    let sizes: [Int], rows: Int
    let weights: [UnsafeMutablePointer<Double>], activations: [UnsafeMutablePointer<Double>]
    let r: [UnsafeMutablePointer<Double>], deltas: [UnsafeMutablePointer<Double>]
    let probs: UnsafeMutablePointer<Double>

    static func copy(_ p: UnsafeMutablePointer<Float>, _ n: Int) -> UnsafeMutablePointer<Double> {
        let d = UnsafeMutablePointer<Double>.allocate(capacity: n)
        for i in 0..<n { d[i] = Double(p[i]) }
        return d
    }

    init(_ gn: GaussNewtonProduct) {
        let mlp = gn.mlp
        (sizes, rows) = (mlp.sizes, mlp.rows)
        weights = (0..<mlp.layerCount).map { Self.copy(mlp.weights[$0], mlp.sizes[$0] * mlp.sizes[$0 + 1]) }
        activations = (0...mlp.layerCount).map { Self.copy(mlp.activations[$0], mlp.rows * mlp.sizes[$0]) }
        r = (0..<mlp.layerCount).map { Self.copy(gn.r[$0], mlp.rows * mlp.sizes[$0 + 1]) }
        deltas = (0..<mlp.layerCount).map { Self.copy(mlp.deltas[$0], mlp.rows * mlp.sizes[$0 + 1]) }
        probs = Self.copy(gn.probs, mlp.rows * mlp.sizes.last!)
    }

    func multiply(vW: [UnsafeMutablePointer<Double>], vb: [UnsafeMutablePointer<Double>],
                  outW: [UnsafeMutablePointer<Double>], outb: [UnsafeMutablePointer<Double>]) {
        let n = Int32(rows), L = sizes.count - 1
        for l in 0..<L {
            let (i, o) = (Int32(sizes[l]), Int32(sizes[l + 1]))
            for row in 0..<rows { (r[l] + row * Int(o)).update(from: vb[l], count: Int(o)) }
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, o, i, 1, activations[l], i, vW[l], i, 1, r[l], o)
            if l > 0 { cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, n, o, i, 1, r[l - 1], i, weights[l], i, 1, r[l], o) }
            if l < L - 1 { let a = activations[l + 1]; for k in 0..<(rows * Int(o)) { r[l][k] *= 1 - a[k] * a[k] } }
        }
        let c = sizes.last!, q = r[L - 1], dz = deltas[L - 1]
        for row in 0..<rows {
            var s = 0.0
            for k in 0..<c { s += probs[row * c + k] * q[row * c + k] }
            for k in 0..<c { dz[row * c + k] = probs[row * c + k] * (q[row * c + k] - s) }
        }
        for l in stride(from: L - 1, through: 0, by: -1) {
            let (i, o) = (Int32(sizes[l]), Int32(sizes[l + 1]))
            cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, o, i, n, 1 / Double(rows), deltas[l], o, activations[l], i, 0, outW[l], i)
            for k in 0..<Int(o) { outb[l][k] = 0 }
            for row in 0..<rows { for k in 0..<Int(o) { outb[l][k] += deltas[l][row * Int(o) + k] / Double(rows) } }
            if l > 0 {
                let d = deltas[l - 1], a = activations[l]
                cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, i, o, 1, deltas[l], o, weights[l], i, 0, d, i)
                for k in 0..<(rows * Int(i)) { d[k] *= 1 - a[k] * a[k] }
            }
        }
    }
}

/// Times the library's calls per CG iteration (vector out, product in) and the caller's product
/// `multiply` (which reads `vW, vb` and writes `pW, pb`), rounds 1–3 after a warm-up round.
func measureCG<S: KFACScalar>(_ opt: KFACOptimizer<S>, layers: Int, preconditioner: CGPreconditioner,
                              grads: [(UnsafeMutablePointer<S>, UnsafeMutablePointer<S>)],
                              vectors: [(UnsafeMutablePointer<S>, UnsafeMutablePointer<S>)],
                              products: [(UnsafeMutablePointer<S>, UnsafeMutablePointer<S>)],
                              steps: [(UnsafeMutablePointer<S>, UnsafeMutablePointer<S>)],
                              diagonals: [(UnsafeMutablePointer<S>, UnsafeMutablePointer<S>)],
                              multiply: () -> Void) throws -> (solver: Double, product: Double, allocations: Double) {
    func view(_ b: [(UnsafeMutablePointer<S>, UnsafeMutablePointer<S>)]) -> (Int) -> ParameterGradient<S> {
        { l in ParameterGradient(weight: b[l].0, bias: b[l].1) }
    }
    let options = CGOptions(maxIterations: 20, tolerance: 1e-9, preconditioner: preconditioner)
    var solver = 0.0, product = 0.0, iterations = 0
    var allocations: Int64 = 0
    for round in 0..<4 {  // round 0 warms up
        var request = try opt.beginConjugateGradient(options, gradient: view(grads),
                                                     diagonal: preconditioner == .diagonal ? view(diagonals) : nil)
        while request == .needProduct {
            var t = now()
            if round > 0 { allocation_counter_start() }
            try opt.conjugateGradientVector(into: view(vectors))
            if round > 0 { allocations += allocation_counter_stop(); solver += now() - t }
            t = now()
            multiply()
            if round > 0 { product += now() - t }
            t = now()
            if round > 0 { allocation_counter_start() }
            request = try opt.supplyConjugateGradientProduct(view(products))
            if round > 0 { allocations += allocation_counter_stop(); solver += now() - t; iterations += 1 }
        }
        _ = try opt.finishConjugateGradient(into: view(steps))
    }
    _ = layers
    let count = Double(iterations)
    return (solver / count, product / count, Double(allocations) / count)
}

let cgCases: [(width: Int, rows: Int)] = !runCG ? [] : quick ? [(512, 256), (512, 1024)] : [(512, 256), (512, 1024), (1024, 256), (1024, 1024)]
if !cgCases.isEmpty {
    print("\nConjugate gradient on a 784-W-W-10 tanh MLP: the library's work per CG iteration")
    print("(kfac_cg_get_vector + kfac_cg_supply_product) against one Gauss-Newton product (R-op, softmax Hessian, backward)")
    print(pad("W", 6) + pad("rows", 6) + pad("dtype", 9) + pad("preconditioner", 16) + pad("product", 11) + pad("solver/iter", 13)
          + pad("solver/product", 16) + "allocations/iter")
}
for (w, rows) in cgCases {
    let mlp = MLP(sizes: [784, w, w, 10], rows: rows)
    let gn = GaussNewtonProduct(mlp)
    mlp.forwardBackward()
    gn.prepare()
    let gn64 = DoubleGaussNewtonProduct(gn)
    let shapes = (0..<mlp.layerCount).map { (mlp.sizes[$0 + 1] * mlp.sizes[$0], mlp.sizes[$0 + 1]) }
    func buffers(_ seed: UInt64) -> [(UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>)] {
        shapes.map { (randomBuffer($0.0, seed: seed), randomBuffer($0.1, seed: seed + 1)) }
    }
    func double(_ b: [(UnsafeMutablePointer<Float>, UnsafeMutablePointer<Float>)]) -> [(UnsafeMutablePointer<Double>, UnsafeMutablePointer<Double>)] {
        b.indices.map { (DoubleGaussNewtonProduct.copy(b[$0].0, shapes[$0].0), DoubleGaussNewtonProduct.copy(b[$0].1, shapes[$0].1)) }
    }
    let v = buffers(3), p = buffers(5), st = buffers(7), d = buffers(9)
    for l in 0..<shapes.count { for k in 0..<shapes[l].0 { d[l].0[k] = abs(d[l].0[k]) }; for k in 0..<shapes[l].1 { d[l].1[k] = abs(d[l].1[k]) } }
    let grads = (0..<mlp.layerCount).map { (mlp.weightGrads[$0], mlp.biasGrads[$0]) }
    let (v64, p64, st64, d64, grads64) = (double(v), double(p), double(st), double(d), double(grads))
    // Factors and inverses from one batch (the K-FAC preconditioner), in each precision.
    let opt = try KFACOptimizer<Float>(), opt64 = try KFACOptimizer<Double>()
    for l in 0..<mlp.layerCount {
        try opt.addDense(inFeatures: mlp.sizes[l], outFeatures: mlp.sizes[l + 1], hasBias: true)
        try opt64.addDense(inFeatures: mlp.sizes[l], outFeatures: mlp.sizes[l + 1], hasBias: true)
    }
    for l in 0..<mlp.layerCount {
        try opt.recordInputs(layer: l, mlp.activations[l], rows: rows)
        try opt.recordOutputGradients(layer: l, mlp.deltas[l], rows: rows)
        try opt64.recordInputs(layer: l, gn64.activations[l], rows: rows)
        try opt64.recordOutputGradients(layer: l, DoubleGaussNewtonProduct.copy(mlp.deltas[l], rows * mlp.sizes[l + 1]), rows: rows)
    }
    try opt.set(.damping, 1.0); try opt.updateFactors(); try opt.updateInverses()
    try opt64.set(.damping, 1.0); try opt64.updateFactors(); try opt64.updateInverses()
    for precond in CGPreconditioner.allCases {
        let r32 = try measureCG(opt, layers: mlp.layerCount, preconditioner: precond, grads: grads, vectors: v, products: p, steps: st,
                                diagonals: d) { gn.multiply(vW: v.map(\.0), vb: v.map(\.1), outW: p.map(\.0), outb: p.map(\.1)) }
        let r64 = try measureCG(opt64, layers: mlp.layerCount, preconditioner: precond, grads: grads64, vectors: v64, products: p64,
                                steps: st64, diagonals: d64) {
            gn64.multiply(vW: v64.map(\.0), vb: v64.map(\.1), outW: p64.map(\.0), outb: p64.map(\.1))
        }
        for (dtype, r) in [("float32", r32), ("float64", r64)] {
            print(pad("\(w)", 6) + pad("\(rows)", 6) + pad(dtype, 9) + pad("\(precond)", 16) + pad("\(f(r.product * 1e3)) ms", 11)
                  + pad("\(f(r.solver * 1e3, 3)) ms", 13) + pad("\(f(100 * r.solver / r.product, 1))%", 16) + "\(f(r.allocations, 1))")
        }
    }
}
if !cgCases.isEmpty { print("""
  solver/iter = the library's time per CG iteration (copying the vector out, reading the product,
  the CG recurrences, the preconditioner: none, the diagonal, or the K-FAC inverses of all three
  layers); product = the caller's Gauss-Newton product on a curvature batch of `rows` (its cost grows
  with the rows, the solver's does not: simpleNN's 5% of CIFAR-10 is 2500 rows). Goal: ≤ 5% without
  a preconditioner (the K-FAC preconditioner adds two products with the Kronecker inverses per
  layer, which is its point). allocations/iter counts heap allocations during the library's calls
  (OpenBLAS's threaded dispatch included). float64 rows: a float64 handle and the same product
  with dgemm on double copies of the network (so both sides of the ratio are float64).
""") }

// MARK: 8. Block-tridiagonal K-FAC against block-diagonal (experimental)

if !CommandLine.arguments.contains("--no-tridiagonal") && !cgOnly && !ekfacOnly {
    print("""

    Block-tridiagonal K-FAC (both pairs of a 3-layer W-W-W-W chain linked, eq. 8 by sygvd) against the
    block-diagonal Cholesky strategy (the same factored π damping), same factors, float32, batch \(batch):
    medians of kfac_optimizer_update_inverses and of kfac_curvature_multiply(−1) over all layers
    """)
    print(pad("width", 8) + pad("invert: diag", 15) + pad("tridiagonal", 14) + pad("ratio", 9)
          + pad("apply: diag", 14) + pad("tridiagonal", 14) + "ratio")
    for w in widths {
        let layers = 3
        let x = (0..<layers).map { randomBuffer(batch * w, seed: UInt64(70 + $0)) }
        let g = (0..<layers).map { randomBuffer(Swift.max(batch, w) * w, seed: UInt64(80 + $0)) }
        let weights = (0..<layers).map { _ in randomBuffer(w * w, seed: 1) }
        let biases = (0..<layers).map { _ in randomBuffer(w, seed: 2) }
        defer { for p in x + g + weights + biases { p.deallocate() } }
        var optimizers: [KFACOptimizer<Float>] = []
        for linked in [false, true] {
            let opt = try KFACOptimizer<Float>()
            for _ in 0..<layers { try opt.addDense(inFeatures: w, outFeatures: w, hasBias: true) }
            if linked { for l in 0..<(layers - 1) { try opt.linkLayers(lower: l, upper: l + 1) } }
            var p = opt.parameters
            p.inverseStrategy = .cholesky; p.piDamping = true; p.damping = 0.01
            try opt.setParameters(p)
            for l in 0..<layers { try opt.recordInputs(layer: l, x[l], rows: batch) }
            for l in stride(from: layers - 1, through: 0, by: -1) {
                for i in 0..<(batch * w) { g[l][i] *= 0.01 }  // output-gradient scale of a real net
                try opt.recordOutputGradients(layer: l, g[l], rows: batch)
                for i in 0..<(batch * w) { g[l][i] *= 100 }
            }
            try opt.updateFactors()
            optimizers.append(opt)
        }
        let repeats = w >= 2048 ? 3 : 5
        let invert = try optimizers.map { opt in try median(repeats: repeats) { try opt.updateInverses() } }
        let apply = try optimizers.map { opt in
            // Fresh inputs every time (the product is in place); the copy is timed on both sides.
            try median(repeats: repeats * 4) {
                for l in 0..<layers {
                    weights[l].update(from: g[l], count: w * w)
                    biases[l].update(from: x[l], count: w)
                }
                try opt.multiply(power: .inverse) { ParameterGradient(weight: weights[$0], bias: biases[$0]) }
            }
        }
        print(pad("\(w)", 8) + pad("\(f(invert[0] * 1e3)) ms", 15) + pad("\(f(invert[1] * 1e3)) ms", 14)
              + pad("\(f(invert[1] / invert[0]))×", 9) + pad("\(f(apply[0] * 1e3)) ms", 14)
              + pad("\(f(apply[1] * 1e3)) ms", 14) + "\(f(apply[1] / apply[0]))×")
    }
    print("""
      Per linked layer with a link up the inversion adds Ψ and C (or D) (2 gemms per side) and two
      sygvd (a Cholesky, two congruences and a syevd each) to the two Cholesky inversions; applying
      F̂⁻¹ costs 8–10 gemms per layer against 2 for the Cholesky strategy.
    """)
}
