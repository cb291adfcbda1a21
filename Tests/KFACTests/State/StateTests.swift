import XCTest
@testable import KFAC

/// State images: round trip, bit-exact resume, and rejection of bad images without side effects.
final class StateTests: XCTestCase {

    func testResumeFromCheckpointIsBitIdentical() throws {
        for strategy in InverseStrategy.allCases {
            try resumeIsBitIdentical(Float.self, strategy)
            try resumeIsBitIdentical(Double.self, strategy)
        }
    }

    /// Runs 7 steps (factor period 2, inverse period 3, pending statistics across the save)
    /// straight through, and again with a save after step 4 loaded into a new optimizer.
    private func resumeIsBitIdentical<S: KFACScalar>(_: S.Type, _ strategy: InverseStrategy) throws {
        var problem = TwoLayerProblem<S>(seed: 13)
        let data = (0..<7).map { _ in (problem.batch(rows: 6), problem.gradients()) }
        let configure: (inout KFACParameters) -> Void = {
            $0.factorUpdatePeriod = 2; $0.inverseUpdatePeriod = 3; $0.inverseStrategy = strategy; $0.klClip = 1e-3
        }
        let straight = try problem.makeOptimizer(configure)
        var straightDirections: [[LayerGradient<S>]] = []
        var image: [UInt8] = []
        for (k, (batch, grads)) in data.enumerated() {
            try problem.record(straight, batch, rows: 6)
            var g = grads
            try straight.step(&g)
            straightDirections.append(g)
            if k == 4 {
                // Pending statistics are part of the state: record the next batch before saving.
                image = try straight.stateImage()
            }
        }
        let resumed = try problem.makeOptimizer()  // default parameters: the image brings its own
        try image.withUnsafeBytes { try resumed.loadState(from: $0) }
        XCTAssertEqual(resumed.stepCount, 5)
        XCTAssertEqual(resumed.parameters, straight.parameters)
        for k in 5..<7 {
            try problem.record(resumed, data[k].0, rows: 6)
            var g = data[k].1
            try resumed.step(&g)
            XCTAssertEqual(g, straightDirections[k], "\(S.self) \(strategy) step \(k) differs after resume")
        }
        XCTAssertEqual(resumed.lastKLScale.bitPattern, straight.lastKLScale.bitPattern)
        XCTAssertEqual(try resumed.stateImage(), try straight.stateImage())
    }

    func testFileRoundTripIsAtomic() throws {
        var problem = TwoLayerProblem<Double>(seed: 17)
        let opt = try problem.makeOptimizer()
        try problem.record(opt, problem.batch(rows: 4), rows: 4)
        var g = problem.gradients()
        try opt.step(&g)
        let dir = FileManagerFree.temporaryDirectory()
        let path = dir + "/state.kfac"
        try opt.saveState(toFile: path)
        try opt.saveState(toFile: path)  // overwriting goes through the same rename
        XCTAssertEqual(FileManagerFree.list(dir), ["state.kfac"], "no temporary file may be left behind")
        let other = try problem.makeOptimizer()
        try other.loadState(fromFile: path)
        XCTAssertEqual(try other.stateImage(), try opt.stateImage())
        XCTAssertThrowsError(try opt.saveState(toFile: dir + "/missing-directory/state.kfac")) {
            XCTAssertEqual(($0 as? KFACError)?.status, .io)
        }
        XCTAssertThrowsError(try opt.loadState(fromFile: dir + "/nope")) { XCTAssertEqual(($0 as? KFACError)?.status, .io) }
    }

    func testBadImagesAreRejectedAndChangeNothing() throws {
        var problem = TwoLayerProblem<Float>(seed: 19)
        let opt = try problem.makeOptimizer()
        let twin = try problem.makeOptimizer()
        let batch = problem.batch(rows: 5)
        for o in [opt, twin] { try problem.record(o, batch, rows: 5) }
        let grads = problem.gradients()
        var g1 = grads, g2 = grads
        try opt.step(&g1)
        try twin.step(&g2)
        let image = try opt.stateImage()

        func expect(_ bytes: [UInt8], _ status: KFACStatus, _ label: String) {
            XCTAssertThrowsError(try bytes.withUnsafeBytes { try opt.loadState(from: $0) }, label) {
                XCTAssertEqual(($0 as? KFACError)?.status, status, label)
            }
        }
        var flipped = image
        flipped[image.count / 2] ^= 0x10
        expect(flipped, .corruptState, "flipped byte")
        expect(Array(image.prefix(image.count - 9)), .corruptState, "truncated")
        expect(Array(image.prefix(20)), .corruptState, "header only")
        expect([], .corruptState, "empty")
        var badMagic = image
        badMagic[0] = UInt8(ascii: "X")
        expect(badMagic, .corruptState, "magic")
        var newer = image
        newer[8] = UInt8(StateImage.formatVersion + 1)
        expect(newer, .stateVersion, "format version")

        let otherLayers = try KFACOptimizer<Float>()
        try otherLayers.addDense(inFeatures: 5, outFeatures: 4, hasBias: false)
        try otherLayers.addDense(inFeatures: 4, outFeatures: 3, hasBias: false)
        expect(try otherLayers.stateImage(), .stateMismatch, "different layers")
        let double = try TwoLayerProblem<Double>(seed: 1).makeOptimizer()
        expect(try double.stateImage(), .stateMismatch, "other precision")

        var tooSmall = [UInt8](repeating: 0, count: image.count - 1)
        XCTAssertThrowsError(try tooSmall.withUnsafeMutableBytes { try opt.saveState(into: $0) }) {
            XCTAssertEqual(($0 as? KFACError)?.status, .bufferTooSmall)
        }
        XCTAssertEqual(tooSmall, [UInt8](repeating: 0, count: image.count - 1), "nothing written")

        // After all that, the optimizer continues exactly like its twin.
        XCTAssertEqual(try opt.stateImage(), image)
        let next = problem.batch(rows: 5)
        for o in [opt, twin] { try problem.record(o, next, rows: 5) }
        let more = problem.gradients()
        var h1 = more, h2 = more
        try opt.step(&h1)
        try twin.step(&h2)
        XCTAssertEqual(h1, h2)
    }
}

/// Minimal temporary-directory helpers on Glibc (the library does not depend on Foundation).
enum FileManagerFree {
    static func temporaryDirectory() -> String {
        var template = Array("/tmp/kfac-test-XXXXXX".utf8CString)
        return template.withUnsafeMutableBufferPointer { String(cString: mkdtemp($0.baseAddress!)) }
    }

    static func list(_ dir: String) -> [String] {
        guard let d = opendir(dir) else { return [] }
        defer { closedir(d) }
        var names: [String] = []
        while let e = readdir(d) {
            let name = withUnsafeBytes(of: e.pointee.d_name) { String(cString: $0.bindMemory(to: CChar.self).baseAddress!) }
            if name != "." && name != ".." { names.append(name) }
        }
        return names.sorted()
    }
}

extension StateTests {
    /// Convolutions (KFC with groups, SUA with channel grouping, channels-last) and a grouped
    /// dense layer resume bit for bit too, and their descriptions must match the image.
    func testConvolutionResumeIsBitIdentical() throws {
        try convolutionResume(Float.self)
        try convolutionResume(Double.self)
    }

    private func convolutionResume<S: KFACScalar>(_: S.Type) throws {
        var random = SeededRandom(43)
        let convA = Conv2dGeometry(inChannels: 4, outChannels: 6, kernel: (3, 3), stride: (2, 1), padding: (1, 1),
                                   groups: 2, input: (5, 4))
        let convB = Conv2dGeometry(inChannels: 6, outChannels: 4, kernel: (1, 3), padding: (0, 1), hasBias: false,
                                   input: (3, 4), layout: .channelsLast)
        func make() throws -> KFACOptimizer<S> {
            let o = try KFACOptimizer<S>()
            try o.addConv2d(convA)
            try o.addConv2d(convB, approximation: .sua, grouping: ChannelGrouping(inputGroupSize: 4, outputGroupSize: 3))
            try o.addDense(inFeatures: 5, outFeatures: 4, hasBias: true, grouping: ChannelGrouping(inputGroupSize: 2, outputGroupSize: 3))
            var p = o.parameters
            p.factorUpdatePeriod = 2; p.inverseUpdatePeriod = 3
            try o.setParameters(p)
            return o
        }
        let n = 2
        let data: [([[S]], [[S]], [LayerGradient<S>])] = (0..<6).map { _ in
            let inputs: [[S]] = [random.array(n * 4 * 5 * 4), random.array(n * 6 * 3 * 4), random.array(n * 5)]
            let outputs: [[S]] = [random.array(n * 6 * convA.outputPositions), random.array(n * 4 * convB.outputPositions),
                                  random.array(n * 4)]
            let grads = [LayerGradient<S>(weight: random.array(6 * convA.patchSize), bias: random.array(6)),
                         LayerGradient<S>(weight: random.array(4 * convB.patchSize), bias: nil),
                         LayerGradient<S>(weight: random.array(20), bias: random.array(4))]
            return (inputs, outputs, grads)
        }
        func run(_ o: KFACOptimizer<S>, _ k: Int) throws -> [LayerGradient<S>] {
            for l in 0..<3 {
                try o.recordInputs(layer: l, data[k].0[l], rows: n)
                try o.recordOutputGradients(layer: l, data[k].1[l], rows: n)
            }
            var g = data[k].2
            try o.step(&g)
            return g
        }
        let straight = try make()
        var expected: [[LayerGradient<S>]] = []
        var image: [UInt8] = []
        for k in 0..<6 {
            expected.append(try run(straight, k))
            if k == 2 { image = try straight.stateImage() }
        }
        let resumed = try make()
        try image.withUnsafeBytes { try resumed.loadState(from: $0) }
        for k in 3..<6 {
            XCTAssertEqual(try run(resumed, k), expected[k], "\(S.self): step \(k) differs after resume")
        }
        // An optimizer whose convolution differs in one option refuses the image.
        let other = try KFACOptimizer<S>()
        try other.addConv2d(convA)
        try other.addConv2d(convB, approximation: .kfc, grouping: ChannelGrouping(inputGroupSize: 4, outputGroupSize: 3))
        try other.addDense(inFeatures: 5, outFeatures: 4, hasBias: true, grouping: ChannelGrouping(inputGroupSize: 2, outputGroupSize: 3))
        XCTAssertThrowsError(try image.withUnsafeBytes { try other.loadState(from: $0) }) {
            XCTAssertEqual(($0 as? KFACError)?.status, .stateMismatch)
        }
    }
}
