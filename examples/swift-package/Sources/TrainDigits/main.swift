// Trains a 64-32-10 tanh MLP on the 8×8 digits (data/digits.bin of libkfac) with K-FAC through
// the Swift API of the `KFAC` product, from a package that only depends on libkfac.
//
//     swift run -c release TrainDigits [path/to/digits.bin] [epochs]

import Foundation
import KFAC

/// DIGITS01 / DIGITS02 (libkfac's data/README.md): magic, n, d (little-endian uint32; DIGITS02
/// then the largest pixel value), n·d pixel bytes, n label bytes.
func loadDigits(_ path: String) throws -> (pixels: [Float], labels: [Int]) {
    struct BadFile: Error, CustomStringConvertible { var description: String }
    guard let bytes = FileManager.default.contents(atPath: path).map(Array.init) else {
        throw BadFile(description: "cannot open \(path)")
    }
    func u32(_ at: Int) -> Int { (0..<4).reduce(0) { $0 | Int(bytes[at + $1]) << (8 * $1) } }
    let magic = bytes.count >= 20 ? String(decoding: bytes[0..<8], as: UTF8.self) : ""
    guard magic == "DIGITS01" || magic == "DIGITS02" else { throw BadFile(description: "\(path): not a digits file") }
    let header = magic == "DIGITS01" ? 16 : 20
    let (n, d) = (u32(8), u32(12))
    let maxValue = Float(magic == "DIGITS01" ? 16 : u32(16))
    guard d == 64, bytes.count == header + n * (d + 1) else { throw BadFile(description: "\(path): unexpected sizes") }
    return (bytes[header..<(header + n * d)].map { Float($0) / maxValue }, bytes[(header + n * d)...].map(Int.init))
}

struct Dense {
    let inF: Int, outF: Int
    var weight: [Float], bias: [Float]

    init(_ inF: Int, _ outF: Int, state: inout UInt64) {
        (self.inF, self.outF) = (inF, outF)
        weight = (0..<(inF * outF)).map { _ in
            state = state &* 6364136223846793005 &+ 1442695040888963407
            return (Float(state >> 40) / Float(1 << 24) * 2 - 1) / Float(inF).squareRoot()
        }
        bias = [Float](repeating: 0, count: outF)
    }

    func forward(_ a: [Float], rows: Int) -> [Float] {
        var s = [Float](repeating: 0, count: rows * outF)
        for r in 0..<rows { for o in 0..<outF {
            var sum = bias[o]
            for i in 0..<inF { sum += weight[o * inF + i] * a[r * inF + i] }
            s[r * outF + o] = sum
        } }
        return s
    }

    /// Gradients of the mean loss from per-example output gradients g (of the summed loss).
    func gradient(_ a: [Float], _ g: [Float], rows: Int) -> LayerGradient<Float> {
        var w = [Float](repeating: 0, count: inF * outF), b = [Float](repeating: 0, count: outF)
        for r in 0..<rows { for o in 0..<outF {
            let go = g[r * outF + o] / Float(rows)
            b[o] += go
            for i in 0..<inF { w[o * inF + i] += go * a[r * inF + i] }
        } }
        return LayerGradient(weight: w, bias: b)
    }
}

let arguments = CommandLine.arguments
let path = arguments.count > 1 ? arguments[1] : "data/digits.bin"
let epochs = arguments.count > 2 ? Int(arguments[2]) ?? 5 : 5
do {
    let (pixels, labels) = try loadDigits(path)
    let (trainCount, batch) = (labels.count - 297, 100)
    var seed: UInt64 = 42
    var layers = [Dense(64, 32, state: &seed), Dense(32, 10, state: &seed)]
    let kfac = try KFACOptimizer<Float>()
    for layer in layers { try kfac.addDense(inFeatures: layer.inF, outFeatures: layer.outF, hasBias: true) }
    var parameters = kfac.parameters
    parameters.damping = 0.03
    parameters.learningRate = 0.2
    parameters.klClip = 0.01
    try kfac.setParameters(parameters)
    print("libkfac Swift API as a package dependency: \(labels.count) digits, \(trainCount) for training")

    func lossAndGradients(_ start: Int, _ rows: Int) -> (Float, Int, [[Float]], [[Float]], [LayerGradient<Float>]) {
        let x = Array(pixels[(start * 64)..<((start + rows) * 64)])
        let h = layers[0].forward(x, rows: rows).map { tanhf($0) }
        let z = layers[1].forward(h, rows: rows)
        var dz = [Float](repeating: 0, count: rows * 10), loss: Float = 0, correct = 0
        for r in 0..<rows {
            let row = z[(r * 10)..<(r * 10 + 10)], top = row.max()!, label = labels[start + r]
            let sum = row.reduce(0) { $0 + expf($1 - top) }
            loss += logf(sum) + top - row[r * 10 + label]
            if row.firstIndex(of: top)! - r * 10 == label { correct += 1 }
            for k in 0..<10 { dz[r * 10 + k] = expf(z[r * 10 + k] - top) / sum - (k == label ? 1 : 0) }
        }
        var dh = [Float](repeating: 0, count: rows * 32)
        for r in 0..<rows { for i in 0..<32 {
            var sum: Float = 0
            for o in 0..<10 { sum += dz[r * 10 + o] * layers[1].weight[o * 32 + i] }
            dh[r * 32 + i] = sum * (1 - h[r * 32 + i] * h[r * 32 + i])
        } }
        return (loss / Float(rows), correct, [x, h], [dh, dz],
                [layers[0].gradient(x, dh, rows: rows), layers[1].gradient(h, dz, rows: rows)])
    }

    var first: Float = 0, last: Float = 0
    for epoch in 1...epochs {
        var total: Float = 0
        for start in stride(from: 0, to: trainCount - batch + 1, by: batch) {
            let (loss, _, inputs, outputGrads, gradients) = lossAndGradients(start, batch)
            var grads = gradients
            total += loss
            for l in 0..<2 {
                try kfac.recordInputs(layer: l, inputs[l], rows: batch)
                try kfac.recordOutputGradients(layer: l, outputGrads[l], rows: batch)
            }
            try kfac.step(&grads)
            for l in 0..<2 {
                for i in layers[l].weight.indices { layers[l].weight[i] -= 0.2 * grads[l].weight[i] }
                for i in layers[l].bias.indices { layers[l].bias[i] -= 0.2 * grads[l].bias![i] }
            }
        }
        let mean = total / Float(trainCount / batch)
        if epoch == 1 { first = mean }
        last = mean
        let (_, correct, _, _, _) = lossAndGradients(trainCount, labels.count - trainCount)
        print("epoch \(epoch): train loss \(mean), test accuracy \(Float(correct) / Float(labels.count - trainCount))")
    }
    guard last < first else { print("error: the training loss did not fall"); exit(1) }
} catch {
    print("error: \(error)")
    exit(1)
}
