// Trains a 64-64-10 tanh MLP on scikit-learn's digits (data/digits.bin) with the Swift API of
// libkfac, once with K-FAC and once with plain SGD from the same initial weights, and prints
// the training loss and test accuracy of each.
//
//     swift run -c release kfac-swift-example [path/to/digits.bin]

import CBLAS
import KFAC

#if canImport(Glibc)
import Glibc
#endif

/// Why the data file could not be read: the example's own error, not the library's (its
/// status codes describe the library's inputs, such as state images).
struct DataFileError: Error, CustomStringConvertible {
    var description: String
}

/// The digits: 1797 images of 64 pixels (0…16) and their labels.
struct Digits {
    var pixels: [Float]
    var labels: [Int]
    var count: Int { labels.count }

    init(path: String) throws {
        guard let f = fopen(path, "rb") else { throw DataFileError(description: "cannot open \(path)") }
        defer { fclose(f) }
        var header = [UInt8](repeating: 0, count: 16)
        guard fread(&header, 1, 16, f) == 16, Array(header[0..<8]) == Array("DIGITS01".utf8) else {
            throw DataFileError(description: "\(path) is not a digits file")
        }
        let n = Int(header[8]) | Int(header[9]) << 8 | Int(header[10]) << 16 | Int(header[11]) << 24
        let d = Int(header[12]) | Int(header[13]) << 8
        var raw = [UInt8](repeating: 0, count: n * d + n)
        guard d == 64, fread(&raw, 1, raw.count, f) == raw.count else { throw DataFileError(description: "truncated \(path)") }
        pixels = raw[0..<(n * d)].map { Float($0) / 16 }
        labels = raw[(n * d)...].map(Int.init)
    }
}

/// A two-layer tanh MLP with its own forward and backward passes (CBLAS).
struct MLP {
    static let sizes = [64, 64, 10]
    var weights: [[Float]]
    var biases: [[Float]]

    init(seed: UInt64) {
        var state = seed
        func uniform() -> Float {
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return Float(state >> 40) / Float(1 << 24) * 2 - 1
        }
        weights = (0..<2).map { l in
            let (i, o) = (MLP.sizes[l], MLP.sizes[l + 1])
            return (0..<(i * o)).map { _ in uniform() / Float(i).squareRoot() }
        }
        biases = (0..<2).map { l in [Float](repeating: 0, count: MLP.sizes[l + 1]) }
    }

    /// y[n][o] = x[n][·] · W[o][·] + b[o].
    static func affine(_ x: [Float], _ w: [Float], _ b: [Float], rows: Int, inF: Int, outF: Int) -> [Float] {
        var y = [Float](repeating: 0, count: rows * outF)
        for n in 0..<rows { for o in 0..<outF { y[n * outF + o] = b[o] } }
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, Int32(rows), Int32(outF), Int32(inF), 1,
                    x, Int32(inF), w, Int32(inF), 1, &y, Int32(outF))
        return y
    }

    /// Mean cross-entropy, and per layer: input, gradient at the output (of the summed loss), and
    /// the weight and bias gradients of the mean loss.
    func lossAndGradients(_ x: [Float], _ labels: ArraySlice<Int>, rows: Int)
        -> (loss: Float, inputs: [[Float]], outputGrads: [[Float]], gradients: [LayerGradient<Float>]) {
        let h = MLP.affine(x, weights[0], biases[0], rows: rows, inF: 64, outF: 64).map { tanhf($0) }
        let z = MLP.affine(h, weights[1], biases[1], rows: rows, inF: 64, outF: 10)
        var dz = [Float](repeating: 0, count: rows * 10)
        var loss: Float = 0
        for (n, label) in labels.enumerated() {
            let row = z[(n * 10)..<(n * 10 + 10)]
            let m = row.max()!
            let sum = row.reduce(0) { $0 + expf($1 - m) }
            loss += logf(sum) + m - row[n * 10 + label]
            for k in 0..<10 { dz[n * 10 + k] = expf(z[n * 10 + k] - m) / sum - (k == label ? 1 : 0) }
        }
        // dh = dz W2, then through tanh.
        var dh = [Float](repeating: 0, count: rows * 64)
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, Int32(rows), 64, 10, 1, dz, 10, weights[1], 64, 0, &dh, 64)
        for i in dh.indices { dh[i] *= 1 - h[i] * h[i] }
        func weightGradient(_ g: [Float], _ a: [Float], outF: Int, inF: Int) -> LayerGradient<Float> {
            var w = [Float](repeating: 0, count: outF * inF)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, Int32(outF), Int32(inF), Int32(rows), 1 / Float(rows),
                        g, Int32(outF), a, Int32(inF), 0, &w, Int32(inF))
            var b = [Float](repeating: 0, count: outF)
            for n in 0..<rows { for o in 0..<outF { b[o] += g[n * outF + o] / Float(rows) } }
            return LayerGradient(weight: w, bias: b)
        }
        return (loss / Float(rows), [x, h], [dh, dz],
                [weightGradient(dh, x, outF: 64, inF: 64), weightGradient(dz, h, outF: 10, inF: 64)])
    }

    func accuracy(_ data: Digits, _ range: Range<Int>) -> Float {
        let x = Array(data.pixels[(range.lowerBound * 64)..<(range.upperBound * 64)])
        let h = MLP.affine(x, weights[0], biases[0], rows: range.count, inF: 64, outF: 64).map { tanhf($0) }
        let z = MLP.affine(h, weights[1], biases[1], rows: range.count, inF: 64, outF: 10)
        var correct = 0
        for n in 0..<range.count {
            let row = Array(z[(n * 10)..<(n * 10 + 10)])
            if row.firstIndex(of: row.max()!)! == data.labels[range.lowerBound + n] { correct += 1 }
        }
        return Float(correct) / Float(range.count)
    }
}

func train(_ data: Digits, useKFAC: Bool, epochs: Int) throws -> (loss: Float, accuracy: Float) {
    var model = MLP(seed: 42)
    let kfac = try KFACOptimizer<Float>()
    for l in 0..<2 { try kfac.addDense(inFeatures: MLP.sizes[l], outFeatures: MLP.sizes[l + 1], hasBias: true) }
    var p = kfac.parameters
    p.damping = 0.03
    p.learningRate = 0.2
    p.klClip = 0.01
    p.inverseUpdatePeriod = 5
    try kfac.setParameters(p)
    let lr: Float = useKFAC ? 0.2 : 0.5
    let (batch, trainCount) = (100, 1500)
    var loss: Float = 0
    for epoch in 0..<epochs {
        var total: Float = 0
        for start in stride(from: 0, to: trainCount, by: batch) {
            let x = Array(data.pixels[(start * 64)..<((start + batch) * 64)])
            let out = model.lossAndGradients(x, data.labels[start..<(start + batch)], rows: batch)
            var grads = out.gradients
            total += out.loss
            if useKFAC {
                for l in 0..<2 {
                    try kfac.recordInputs(layer: l, out.inputs[l], rows: batch)
                    try kfac.recordOutputGradients(layer: l, out.outputGrads[l], rows: batch)
                }
                try kfac.step(&grads)
            }
            for l in 0..<2 {
                for i in model.weights[l].indices { model.weights[l][i] -= lr * grads[l].weight[i] }
                for i in model.biases[l].indices { model.biases[l][i] -= lr * grads[l].bias![i] }
            }
        }
        loss = total / Float(trainCount / batch)
        if epoch % 5 == 4 { print("  \(useKFAC ? "K-FAC" : "SGD  ") epoch \(epoch + 1): train loss \(loss)") }
    }
    return (loss, model.accuracy(data, trainCount..<data.count))
}

let path = CommandLine.arguments.count > 1 ? CommandLine.arguments[1] : "data/digits.bin"
do {
    let data = try Digits(path: path)
    print("digits: \(data.count) images; 1500 for training, \(data.count - 1500) held out")
    let k = try train(data, useKFAC: true, epochs: 20)
    let s = try train(data, useKFAC: false, epochs: 20)
    print("final  K-FAC: train loss \(k.loss), test accuracy \(k.accuracy)")
    print("final  SGD:   train loss \(s.loss), test accuracy \(s.accuracy)")
} catch {
    print("error: \(error)")
    exit(1)
}
