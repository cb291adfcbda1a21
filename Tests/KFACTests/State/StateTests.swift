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
        // The checksum is checked before the version: an edited version field is corruption,
        // another format's image with its own valid checksum is a version mismatch.
        expect(newer, .corruptState, "format version edited")
        expect(sealed(newer), .stateVersion, "format version")

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

extension StateTests {
    /// Re-seals an edited image: its size field and checksum, as the library writes them.
    private func sealed(_ bytes: [UInt8]) -> [UInt8] {
        var b = bytes
        withUnsafeBytes(of: UInt64(b.count).littleEndian) { for i in 0..<8 { b[24 + i] = $0[i] } }
        let sum = b.withUnsafeBytes { StateImage.checksum(UnsafeRawBufferPointer(rebasing: $0[0..<(b.count - 8)])) }
        withUnsafeBytes(of: sum.littleEndian) { for i in 0..<8 { b[b.count - 8 + i] = $0[i] } }
        return b
    }

    /// The parameters section is (id, value) pairs: a parameter an image lacks loads as its
    /// default, an id this library does not know is a newer format, ids out of order are corrupt.
    func testParameterSectionIsSelfDescribing() throws {
        let problem = TwoLayerProblem<Double>(seed: 23)
        let opt = try problem.makeOptimizer { $0.damping = 0.25; $0.lmDecay = 0.5; $0.inverseUpdatePeriod = 3 }
        let image = try opt.stateImage()
        func u64(_ b: [UInt8], _ at: Int) -> UInt64 { b[at..<(at + 8)].reversed().reduce(0) { $0 << 8 | UInt64($1) } }
        func put(_ b: inout [UInt8], _ at: Int, _ v: UInt64) { for i in 0..<8 { b[at + i] = UInt8(truncatingIfNeeded: v >> (8 * UInt64(i))) } }
        let count = Int(u64(image, 32))
        XCTAssertEqual(count, ParameterSpec.table.count)
        let rowOf = { (id: ParameterID) in ParameterSpec.table.firstIndex { $0.id == id }! }
        XCTAssertEqual(u64(image, 40 + 16 * rowOf(.damping)), UInt64(ParameterID.damping.rawValue))
        XCTAssertEqual(Double(bitPattern: u64(image, 48 + 16 * rowOf(.damping))), 0.25)

        // Without its damping row, the image loads with the default damping and everything else.
        var withoutDamping = image
        withoutDamping.removeSubrange((40 + 16 * rowOf(.damping))..<(56 + 16 * rowOf(.damping)))
        put(&withoutDamping, 32, UInt64(count - 1))
        let fresh = try problem.makeOptimizer()
        try sealed(withoutDamping).withUnsafeBytes { try fresh.loadState(from: $0) }
        XCTAssertEqual(fresh.parameters.damping, KFACParameters().damping)
        XCTAssertEqual(fresh.parameters.lmDecay, 0.5)
        XCTAssertEqual(fresh.parameters.inverseUpdatePeriod, 3)

        func status(_ bytes: [UInt8]) -> KFACStatus? {
            let before = try? fresh.stateImage()
            defer { XCTAssertEqual(try? fresh.stateImage(), before, "a refused image changes nothing") }
            do { try bytes.withUnsafeBytes { try fresh.loadState(from: $0) }; return nil } catch { return (error as? KFACError)?.status }
        }
        var unknown = image
        put(&unknown, 40 + 16 * (count - 1), 999)  // the last id becomes one no family has
        XCTAssertEqual(status(sealed(unknown)), .stateVersion)
        var swapped = image
        put(&swapped, 40, UInt64(ParameterID.damping.rawValue))  // row 0 now repeats a later id
        XCTAssertEqual(status(sealed(swapped)), .corruptState)
        var outOfRange = image
        put(&outOfRange, 48 + 16 * rowOf(.damping), (-1.0).bitPattern)
        XCTAssertEqual(status(sealed(outOfRange)), .corruptState)
        var huge = image
        put(&huge, 32, UInt64.max)
        XCTAssertEqual(status(sealed(huge)), .corruptState)
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
