import KFAC

#if canImport(Glibc)
import Glibc
#endif

/// What a `kfac_optimizer *` points to: an optimizer of the precision chosen at creation and the
/// message of the last failed call. The pointer is an unmanaged, retained reference.
final class OptimizerHandle {
    enum Engine {
        case float32(KFACOptimizer<Float>)
        case float64(KFACOptimizer<Double>)
    }

    let engine: Engine
    /// NUL-terminated message buffer, reused so that successful calls never allocate.
    private let message: UnsafeMutablePointer<CChar>
    private static let messageCapacity = 1024

    init(engine: Engine) {
        self.engine = engine
        message = .allocate(capacity: Self.messageCapacity)
        message[0] = 0
    }

    deinit { message.deallocate() }

    var lastError: UnsafePointer<CChar> { UnsafePointer(message) }

    func clearError() { message[0] = 0 }

    func setError(_ error: KFACError) {
        var utf8 = Array(error.message.utf8.prefix(Self.messageCapacity - 1))
        // Do not cut a multi-byte character in half.
        while let last = utf8.last, last & 0xC0 == 0x80 || (last >= 0xC0 && utf8.count == Self.messageCapacity - 1) {
            utf8.removeLast()
            if last >= 0xC0 { break }
        }
        for (i, byte) in utf8.enumerated() { message[i] = CChar(bitPattern: byte) }
        message[utf8.count] = 0
    }

    var dtypeCode: Int32 {
        switch engine {
        case .float32: return Float.dtypeCode
        case .float64: return Double.dtypeCode
        }
    }

    static func from(_ p: OpaquePointer) -> OptimizerHandle {
        Unmanaged<OptimizerHandle>.fromOpaque(UnsafeRawPointer(p)).takeUnretainedValue()
    }
}

/// Runs `body` on the handle behind `opt`: a NULL handle gives `KFAC_ERROR_NULL_POINTER`, a thrown
/// error is recorded as the handle's last error and returned as its status, success clears the
/// last error and returns 0.
@inline(__always)
func withHandle(_ opt: OpaquePointer?, _ body: (OptimizerHandle) throws(KFACError) -> Void) -> Int32 {
    guard let opt else { return KFACStatus.nullPointer.rawValue }
    let handle = OptimizerHandle.from(opt)
    do {
        try body(handle)
        handle.clearError()
        return KFACStatus.ok.rawValue
    } catch {
        handle.setError(error)
        return error.status.rawValue
    }
}

/// Like `withHandle`, for the `_f32`/`_f64` buffer functions: `body` receives the optimizer of
/// precision `S`, and a handle of the other precision gives `KFAC_ERROR_DTYPE_MISMATCH`.
@inline(__always)
func withOptimizer<S: KFACScalar>(_ opt: OpaquePointer?, _: S.Type,
                                  _ body: (KFACOptimizer<S>) throws(KFACError) -> Void) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        switch handle.engine {
        case .float32(let o as KFACOptimizer<S>): try body(o)
        case .float64(let o as KFACOptimizer<S>): try body(o)
        default:
            throw KFACError(.dtypeMismatch, "a \(S.self == Float.self ? "_f32" : "_f64") function was called on a \(handle.dtypeCode == 1 ? "float32" : "float64") optimizer")
        }
    }
}

/// Runs `body` on the optimizer whatever its precision.
@inline(__always)
func withAnyOptimizer(_ opt: OpaquePointer?, _ body: (any OptimizerOperations) throws(KFACError) -> Void) -> Int32 {
    withHandle(opt) { (handle) throws(KFACError) in
        switch handle.engine {
        case .float32(let o): try body(o)
        case .float64(let o): try body(o)
        }
    }
}

/// The precision-independent operations of an optimizer, so that functions without buffers are
/// written once.
protocol OptimizerOperations: AnyObject {
    var parameters: KFACParameters { get }
    var stepCount: Int { get }
    var lastKLScale: Double { get }
    var lastReductionRatio: Double { get }
    var hasReportedLossChange: Bool { get }
    var candidateCount: Int { get }
    func reportLossChange(before: Double, after: Double) throws(KFACError) -> Double
    var nextReportAdjustsDamping: Bool { get }
    func skipLossReport() throws(KFACError)
    var layerCount: Int { get }
    var wantsStatistics: Bool { get }
    var stateSize: Int { get }
    func set(_ p: ParameterID, _ value: Double) throws(KFACError)
    func set(_ p: ParameterID, _ value: Int64) throws(KFACError)
    func addDense(inFeatures: Int, outFeatures: Int, hasBias: Bool, grouping: ChannelGrouping) throws(KFACError) -> Int
    func addConv2d(_ geometry: Conv2dGeometry, approximation: ConvApproximation, grouping: ChannelGrouping) throws(KFACError) -> Int
    func layerInfo(_ layer: Int) throws(KFACError) -> LayerInfo
    func updateFactors() throws(KFACError)
    func updateInverses() throws(KFACError)
    func discardStatistics()
    func linkLayers(lower: Int, upper: Int) throws(KFACError)
    func saveState(into buffer: UnsafeMutableRawBufferPointer) throws(KFACError) -> Int
    func loadState(from image: UnsafeRawBufferPointer) throws(KFACError)
    func saveState(toFilePath path: UnsafePointer<CChar>) throws(KFACError)
    func loadState(fromFilePath path: UnsafePointer<CChar>) throws(KFACError)
}

extension KFACOptimizer: OptimizerOperations {}
