/// The status codes of the library. The raw values are the pinned `kfac_status` values of
/// `include/kfac.h`; they never change.
public enum KFACStatus: Int32, Sendable, CaseIterable {
    case ok = 0

    case nullPointer = -1
    case invalidArgument = -2
    case unknownParameter = -3
    case parameterType = -4
    case parameterRange = -5

    case invalidSize = -10
    case sizeOverflow = -11
    case unknownLayer = -12
    case dtypeMismatch = -13

    case noStatistics = -20
    case noInverses = -21
    case layersFrozen = -22
    case noStep = -23
    case noSolve = -24
    case noColumns = -25

    case nonFinite = -30
    case notPositiveDefinite = -31
    case eigenFailed = -32

    case outOfMemory = -40

    case unsupported = -50

    case io = -60
    case bufferTooSmall = -61
    case corruptState = -62
    case stateVersion = -63
    case stateMismatch = -64

    case callback = -70

    case `internal` = -99

    /// A short English description.
    public var description: String { "\(staticDescription)" }

    /// The description as a static, NUL-terminated string: what `kfac_status_string` returns.
    public var staticDescription: StaticString {
        switch self {
        case .ok: return "ok"
        case .nullPointer: return "a required pointer argument is NULL"
        case .invalidArgument: return "an argument has no defined meaning"
        case .unknownParameter: return "unknown parameter"
        case .parameterType: return "parameter has the other type (int vs double)"
        case .parameterRange: return "parameter value out of range"
        case .invalidSize: return "invalid size or count"
        case .sizeOverflow: return "sizes overflow"
        case .unknownLayer: return "unknown layer"
        case .dtypeMismatch: return "buffer precision does not match the optimizer's"
        case .noStatistics: return "layer has no statistics yet"
        case .noInverses: return "inverses have not been computed"
        case .layersFrozen: return "layers cannot be added after statistics were recorded"
        case .noStep: return "no step to act on (solve the step size after a step, report the loss after a solve)"
        case .noColumns: return "no Jacobian columns or chain forward pass to multiply with"
        case .noSolve: return "no conjugate-gradient solve in the state this call needs (begin, supply the products, finish)"
        case .nonFinite: return "NaN or Inf in input or result"
        case .notPositiveDefinite: return "damped factor is not positive definite"
        case .eigenFailed: return "eigendecomposition did not converge"
        case .outOfMemory: return "out of memory"
        case .unsupported: return "unsupported"
        case .io: return "I/O error"
        case .bufferTooSmall: return "buffer too small"
        case .corruptState: return "corrupt or truncated state image"
        case .stateVersion: return "state image has an incompatible format version"
        case .stateMismatch: return "state image does not match this optimizer's layers or precision"
        case .callback: return "a caller-supplied function returned an error"
        case .internal: return "internal error"
        }
    }
}

/// The error every throwing function of the library throws: a status and a message that says
/// what exactly went wrong (which layer, which size, which value).
public struct KFACError: Error, CustomStringConvertible, Sendable {
    public let status: KFACStatus
    public let message: String

    public init(_ status: KFACStatus, _ message: String) {
        self.status = status
        self.message = message
    }

    public var description: String { "\(status.description): \(message)" }
}

/// Runs a closure through an API that only rethrows untyped errors, restoring the typed error.
func asKFACError<R>(_ body: () throws -> R) throws(KFACError) -> R {
    do {
        return try body()
    } catch let error as KFACError {
        throw error
    } catch {
        throw KFACError(.internal, "unexpected error: \(error)")
    }
}
